"""Averaging tensors over ranks: model tensors in place (Averager), gradients after backward
(GradientAverager). The strategies' only collectives besides ResIST's block exchange."""
from __future__ import annotations

import time
from typing import Callable, List, Sequence

import torch

from .comm import Comm, pack, unpack_
from .comm.fusion import flatten_, is_view_of
from .compression import Codec, ErrorFeedback, compressed_mean
from .groups import slice_counts


class Averager:
    """Averages a fixed list of tensors over ranks in place, with one allreduce and no copies.

    The tensors are moved into one flat buffer and become views of it (the "flat parameter"
    technique), so each average() is one prepared allreduce of that buffer: packing 60 MB of
    ResNet-101 shared layers into a fresh buffer and back made the average 1.5-3x slower than raw
    MPI. Parameter objects stay the same (their .data moves), so optimizers built before keep
    working. If something replaced the tensors since (module.to(), load_state_dict(assign=True)),
    the buffer is rebuilt.

    With groups (resist_mpi.groups) the average is hierarchical: averaged inside the group (the fast
    link), then each member averages its slice across the groups, then the group puts the slices
    back together; every rank ends with the average over all ranks, every member the same bits.

    Args:
        comm: the Comm to average over.
        tensors: a function returning the tensors, in a fixed order (called on every average, so
            tensors replaced since are seen).
        groups: a Groups of comm's ranks, or None (one flat allreduce).
        wire_dtype: float32, or float16 / bfloat16 / int8: each round's update moves compressed,
            with error feedback (the strategy calls mark() when a round starts).
    """

    def __init__(self, comm: Comm, tensors: Callable[[], List[torch.Tensor]], groups=None,
                 wire_dtype: str = "float32"):
        self.comm, self._tensors = comm, tensors
        self.groups = groups if groups is not None and groups.inner is not None else None
        across = self.groups.across if self.groups is not None else comm
        # compressed: each round's update, with error feedback (resist_mpi.compression)
        self.feedback = ErrorFeedback(across, wire_dtype) if wire_dtype != "float32" else None
        self.flat = None
        self._steps: List[Callable] = []

    def _buffer(self) -> torch.Tensor:
        tensors = self._tensors()
        if self.flat is None or not is_view_of(tensors, self.flat):
            self.flat = flatten_(tensors)
            self._steps = self._prepare(self.flat)
        return self.flat

    def _part(self, flat: torch.Tensor) -> torch.Tensor:
        """What this rank averages across: the whole buffer, or its slice of it with groups."""
        if self.groups is None:
            return flat
        start, stop = self.groups.my_slice(flat.numel())
        return flat[start:stop]

    def mark(self) -> None:
        """The round starts: with a compressed wire, remember the values the updates start from."""
        if self.feedback is not None:
            self.feedback.mark(self._part(self._buffer()))

    def average(self) -> None:
        flat = self._buffer()
        if self.feedback is None:
            # ---- distributed step: one allreduce of the flat buffer (three, hierarchical, with groups) ----
            for step in self._steps:
                step()
            return
        inner, _, gather = self._steps if self.groups is not None else (None, None, None)
        if inner is not None:
            inner()  # ---- distributed step: the group's average (full precision, the fast link) ----
        # ---- distributed step: the compressed average of the round's update across ranks (or groups) ----
        self.feedback.average(self._part(flat))
        if gather is not None:
            gather()  # ---- distributed step: the group puts the slices together ----

    def _prepare(self, flat: torch.Tensor) -> List[Callable]:
        g = self.groups
        if g is None:
            return [self.comm.prepare_allreduce(flat)]
        start, stop = g.my_slice(flat.numel())
        return [g.inner.prepare_allreduce(flat), g.across.prepare_allreduce(flat[start:stop]),
                g.inner.prepare_allgather(flat, slice_counts(flat.numel(), g.size))]


def average_tensors_(c: Comm, tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors over ranks once, with one fused allreduce (pack, reduce, unpack)."""
    if tensors:
        flat = pack(tensors)
        c.allreduce_mean_(flat)
        unpack_(flat, tensors)


def broadcast_tensors_(c: Comm, tensors: Sequence[torch.Tensor], root: int = 0) -> None:
    """Give every rank root's values of tensors, with one fused broadcast."""
    if tensors:
        flat = pack(tensors)
        c.bcast_(flat, root)
        unpack_(flat, tensors)


class GradientAverager:
    """Averages the gradients of parameters over ranks at the end of every backward pass.

    Data-parallel SGD without touching the user's loop: a hook on each parameter fires when its
    gradient is accumulated; the first one of a backward pass queues a callback that runs when the
    whole backward is done, and that callback averages every gradient with one fused allreduce
    (what DDP does, without bucketing). So `loss.backward(); opt.step()` steps on averaged gradients.
    Every rank must produce gradients for the same parameters (replicas of one model do).

    Args:
        comm: the Comm to average over.
        params: the parameters whose gradients are averaged (attach() replaces them).
        wire_dtype: float32, or float16 / bfloat16 / int8 to move them compressed (resist_mpi.compression).
    Attributes:
        comm_time: seconds spent in the averages, cumulative.
    """

    def __init__(self, comm: Comm, params: Sequence[torch.nn.Parameter] = (), wire_dtype: str = "float32"):
        self.comm = comm
        self.codec = Codec(wire_dtype) if wire_dtype != "float32" else None
        self.comm_time = 0.0
        self._queued = False
        self.params: List[torch.nn.Parameter] = []
        self._handles: List = []
        self.attach(params)

    def attach(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average the gradients of params from now on (ResIST's round parameters change)."""
        self.remove()
        self.params = [p for p in params if p.requires_grad]
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _on_grad(self, _param) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    def _average(self) -> None:
        self._queued = False
        t0 = time.perf_counter()
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.codec is None:
            # ---- distributed step: one fused gradient allreduce per backward ----
            average_tensors_(self.comm, grads)
        elif grads:
            # ---- distributed step: the gradients' compressed average (no error feedback, as Horovod's) ----
            unpack_(compressed_mean(self.comm, pack(grads), self.codec)[0], grads)
        self.comm_time += time.perf_counter() - t0

    def remove(self) -> None:
        """Take the hooks off (the parameters then train alone again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
