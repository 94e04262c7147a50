"""Tensor fusion: many tensors <-> one flat float32 buffer, so a phase costs one collective."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import torch


HUGE_PAGE = 2 << 20          # bytes: x86-64/aarch64 transparent huge page
_ALIGN_FROM = 4 << 20        # numpy asks for huge pages on arrays of this size and more


def empty_flat(n: int, device="cpu") -> torch.Tensor:
    """An uninitialised 1-D float32 tensor for communication buffers.

    On the CPU it is allocated by numpy, which asks Linux for transparent huge pages on large
    arrays: MPI's shared-memory copies into and out of such buffers measured 15-20% faster here
    than into torch's own allocations (fewer TLB misses, fewer pages to pin for single-copy
    transfers). A large buffer also starts on a huge-page boundary: only whole, aligned 2 MiB
    ranges become huge pages, and a 4.7 MB ResNet-101 block slab at malloc's address got one at
    most (per-block messages measured 4.3 ms vs 3.5 ms aligned for one exchange on 4 ranks,
    benchmarks/sync_bench.py). The extra address space before the start is never touched, so it
    costs no memory.
    """
    if torch.device(device).type != "cpu":
        return torch.empty(n, dtype=torch.float32, device=device)
    if 4 * n < _ALIGN_FROM:
        return torch.from_numpy(np.empty(n, dtype=np.float32))
    raw = np.empty(n + HUGE_PAGE // 4, dtype=np.float32)
    start = (-raw.ctypes.data % HUGE_PAGE) // 4
    return torch.from_numpy(raw[start:start + n])


def flat_size(tensors: Iterable[torch.Tensor]) -> int:
    """Total number of elements of tensors."""
    return sum(t.numel() for t in tensors)


def pack(tensors: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Copy tensors, in order, into one 1-D float32 buffer (out, when given, is reused).

    Tensors of another floating dtype are converted; all must live on one device.
    """
    n = flat_size(tensors)
    if out is None:
        out = empty_flat(n, tensors[0].device if len(tensors) else "cpu")
    elif out.numel() != n:
        raise ValueError(f"pack: out has {out.numel()} elements, the tensors {n}")
    if n and out.device.type != "meta":  # a meta tensor has no values to copy (the traffic model's runs)
        # torch.cat writes straight into out: one pass, no per-tensor python copy loop on the data.
        torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors], out=out)
    return out


def unpack_(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of flat back into tensors, in place (the inverse of pack)."""
    n = flat_size(tensors)
    if flat.numel() != n:
        raise ValueError(f"unpack_: flat has {flat.numel()} elements, the tensors {n}")
    if flat.device.type == "meta":
        return
    offset = 0
    with torch.no_grad():
        for t in tensors:
            k = t.numel()
            t.copy_(flat[offset:offset + k].view_as(t))
            offset += k


def flatten_(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Move tensors into one new flat float32 buffer and make each of them a view of it.

    Afterwards a collective on the returned buffer acts on the tensors themselves, with no pack or
    unpack copy (the "flat parameter" technique). In-place updates (optimizer steps, load_state_dict,
    copy_) keep the views; anything that *replaces* a tensor (module.to(), to_empty()) breaks them,
    so call this after the model is placed on its device. All tensors must be float32 on one device.
    """
    bad = [t.dtype for t in tensors if t.dtype != torch.float32]
    if bad:  # checked before anything is rebound: a failure leaves the tensors as they were
        raise ValueError(f"flatten_: tensors must be float32, got {bad[0]}")
    flat = pack(tensors)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            k = t.numel()
            t.data = flat[offset:offset + k].view_as(t)
            offset += k
    return flat


def is_view_of(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> bool:
    """Whether tensors are still, in order, the consecutive views flatten_ made of flat."""
    offset, base = 0, flat.data_ptr()
    for t in tensors:
        if t.data_ptr() != base + 4 * offset or not t.is_contiguous():
            return False
        offset += t.numel()
    return offset == flat.numel()
