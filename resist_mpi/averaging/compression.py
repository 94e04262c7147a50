"""Fewer bytes per average: --wire-dtype float16, bfloat16 or int8, with error feedback.

What is compressed (docs/method.md, "Compressed averaging"):

- Model averages (ResIST's shared layers, local SGD's whole model): every rank knows the values the
  round started from, so it sends its *update* (trained value minus round-start value) plus the
  rounding error it made last round (error feedback: nothing is lost, it only arrives a round later).
  The average is formed as a reduce-scatter done by an all-to-all of compressed chunks, summed in
  float32, then an allgather of the compressed result, so every rank ends with the same bits. The
  owner of a chunk also keeps the rounding error of its compressed average, for next round.
- Data-parallel gradients: the same compressed average, without error feedback (what Horovod's
  fp16 compression does, except that the sum here is taken in float32).
- Blocks that move to a new owner stay float32: the receiver has no earlier copy to add an update to,
  and rounding a block's weights every time it moves would compound.

Compressed payloads travel in float32 containers (their bytes reinterpreted), so every backend moves
them with the float32 collectives it has, and the byte counters count the real compressed bytes.
int8 scales every chunk of INT8_CHUNK elements by its largest magnitude; the scales travel with it.

Non-finite values are never rounded away: Codec.encode refuses them (NonFiniteError), and inside a
compressed mean a rank whose update is not finite sends NaN in their place (int8: a NaN scale), so
the mean is NaN on every rank alike and ErrorFeedback raises NonFiniteError on every rank, before
the model or the residual is touched (a lost update can then never hide in a residual).
"""
from __future__ import annotations

import math
from itertools import accumulate
from typing import List, Optional, Tuple

import torch

from ..errors import NonFiniteError
from ..plan.groups import slice_counts
from .tensors import all_finite

WIRE_DTYPES = ("float32", "float16", "bfloat16", "int8")
INT8_CHUNK = 4096


class Codec:
    """Encode float32 values into a float32 container of their compressed bytes, and back."""

    def __init__(self, wire_dtype: str):
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire dtype {wire_dtype!r}: choose one of {', '.join(WIRE_DTYPES)}")
        self.name = wire_dtype
        self.half = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(wire_dtype)

    def size(self, n: int) -> int:
        """float32 elements of the container of n values."""
        if self.half is not None:
            return (n + 1) // 2
        if self.name == "int8":
            return math.ceil(n / INT8_CHUNK) + (n + 3) // 4
        return n

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The container of x's compressed values; NonFiniteError when x holds NaN or inf."""
        if not all_finite(x):
            raise NonFiniteError(f"cannot encode non-finite values for a {self.name} wire")
        return self._encode(x)

    def poison(self, n: int, device) -> torch.Tensor:
        """A container that decodes to n NaNs (what a rank with a non-finite update sends)."""
        out = torch.zeros(self.size(n), dtype=torch.float32, device=device)
        if self.half is not None:
            out.view(self.half)[:n] = float("nan")
        elif self.name == "int8":
            out[:math.ceil(n / INT8_CHUNK)] = float("nan")
        else:
            out.fill_(float("nan"))
        return out

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        out = torch.zeros(self.size(n), dtype=torch.float32, device=x.device)
        if self.half is not None:
            out.view(self.half)[:n] = x
        elif self.name == "int8":
            k = math.ceil(n / INT8_CHUNK)
            padded = torch.zeros(k * INT8_CHUNK, dtype=torch.float32, device=x.device)
            padded[:n] = x
            chunks = padded.view(k, INT8_CHUNK)
            scale = chunks.abs().amax(1) / 127
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero chunk; NaN stays NaN
            out[:k] = scale
            q = torch.round(chunks / scale[:, None]).clamp_(-127, 127).to(torch.int8).reshape(-1)[:n]
            out[k:].view(torch.int8)[:n] = q
        else:
            out.copy_(x)
        return out

    def decode(self, container: torch.Tensor, n: int) -> torch.Tensor:
        if self.half is not None:
            return container.view(self.half)[:n].to(torch.float32)
        if self.name == "int8":
            k = math.ceil(n / INT8_CHUNK)
            q = torch.zeros(k * INT8_CHUNK, dtype=torch.float32, device=container.device)
            q[:n] = container[k:].view(torch.int8)[:n].to(torch.float32)
            return (q.view(k, INT8_CHUNK) * container[:k, None]).reshape(-1)[:n]
        return container.clone()


def compressed_mean(c, u: torch.Tensor, codec: Codec) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
    """The mean over c's ranks of u, moved compressed; (mean, the error of encoding u, own chunk).

    Collective. u is cut into one chunk per rank; rank r receives every rank's compressed chunk r
    (one all-to-all), decodes and sums them in float32 in rank order, divides by the number of ranks,
    encodes the result, and an allgather gives every rank every chunk's encoded mean, which every
    rank decodes the same way: the mean is identical, bit for bit, everywhere.

    Returns:
        (mean, err, (start, stop)): err = u - decode(encode(u)) chunk by chunk (this rank's rounding
        error), plus, on this rank's own chunk [start, stop), the rounding error of the encoded mean
        times the number of ranks (so that adding err to next round's update restores it in the mean).
    """
    S, n = c.size, u.numel()
    counts = slice_counts(n, S)
    starts = [0, *accumulate(counts)]
    sizes = wire_elements(n, S, codec)
    offsets = [0, *accumulate(sizes)]  # of each chunk's container in the gathered means
    finite = all_finite(u)
    parts = [codec._encode(u[starts[d]:starts[d] + counts[d]]) if finite else codec.poison(counts[d], u.device)
             for d in range(S)]
    err = torch.cat([u[starts[d]:starts[d] + counts[d]] - codec.decode(parts[d], counts[d]) for d in range(S)]) \
        if n else u.clone()
    r, mine = c.rank, counts[c.rank]
    # ---- distributed step: every rank's compressed chunk r to rank r ----
    recv, _ = c.alltoallv(torch.cat(parts) if parts else u.new_zeros(0), sizes, [sizes[r]] * S)
    total = torch.zeros(mine, dtype=torch.float32, device=u.device)
    for s in range(S):  # float32 accumulation, in rank order: every chunk's owner adds the same way
        total.add_(codec.decode(recv[s * sizes[r]:(s + 1) * sizes[r]], mine))
    own_mean = total.div_(S)
    gathered = torch.empty(offsets[-1], dtype=torch.float32, device=u.device)
    gathered[offsets[r]:offsets[r + 1]] = codec._encode(own_mean)  # NaN from a poisoned chunk stays NaN
    # ---- distributed step: every chunk's compressed mean to every rank ----
    c.allgather_(gathered, sizes)
    mean = torch.cat([codec.decode(gathered[offsets[d]:offsets[d + 1]], counts[d]) for d in range(S)]) \
        if n else u.clone()
    start = starts[r]
    err[start:start + mine] += S * (own_mean - mean[start:start + mine])
    return mean, err, (start, start + mine)


class ErrorFeedback:
    """Compressed averaging of a flat buffer's round updates, with error feedback (one per buffer).

    mark(x) at the round's start remembers x; average(x) replaces x by start + the mean update,
    identical on every rank, and keeps this rank's rounding error for the next round.
    Attributes:
        residual: this rank's error to add to its next update (float32, a per-rank state: it is
            part of the checkpoint, so that a resume continues bit for bit).
    """

    def __init__(self, c, wire_dtype: str):
        self.c, self.codec = c, Codec(wire_dtype)
        self.start: Optional[torch.Tensor] = None
        self.residual: Optional[torch.Tensor] = None

    def mark(self, x: torch.Tensor) -> None:
        if self.start is None or self.start.numel() != x.numel():
            self.start = torch.empty_like(x)
        self.start.copy_(x)
        if self.residual is None or self.residual.numel() != x.numel():
            self.residual = torch.zeros_like(x)
        elif self.residual.device != x.device:  # one loaded from a checkpoint
            self.residual = self.residual.to(x.device)

    def average(self, x: torch.Tensor, check: bool = True) -> None:
        """x <- the round's start + the mean update (identical on every rank). check: see reduce()."""
        if self.start is None:
            self.mark(x)  # nothing trained since: a zero update
        mean = self.reduce(x - self.start, check=check)
        x.copy_(self.start.add_(mean))

    def reduce(self, update: torch.Tensor, c=None, check: bool = True) -> torch.Tensor:
        """The mean over ranks of update (+ this rank's residual, which is renewed), compressed;
        NonFiniteError on every rank, before the residual changes, when the mean is not finite.
        c: the communicator to average over (a background one for --overlap; default: self.c).
        check=False: a mean that is not finite is returned (the residual still unchanged) instead of
        raised, for a caller whose ranks average different slices and must all take part in what
        comes next (a group's allgather) before they check the whole result together."""
        if self.residual is None or self.residual.numel() != update.numel():
            self.residual = torch.zeros_like(update)
        elif self.residual.device != update.device:  # one loaded from a checkpoint
            self.residual = self.residual.to(update.device)
        mean, residual, _ = compressed_mean(c or self.c, update + self.residual, self.codec)
        if not all_finite(mean):
            if check:
                hint = (" (a float16 wire holds magnitudes up to 65504: a larger value overflows to inf; "
                        "--wire-dtype bfloat16 keeps float32's range)" if self.codec.name == "float16" else "")
                raise NonFiniteError(f"the {self.codec.name} average of a round's update is not finite{hint}")
            return mean
        self.residual = residual
        return mean


def wire_elements(numel: int, size: int, codec: Codec) -> List[int]:
    """Container sizes (float32 elements) of the chunks of a compressed mean of numel values over size ranks."""
    return [codec.size(k) for k in slice_counts(numel, size)]
