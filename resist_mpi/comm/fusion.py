"""Tensor fusion: many tensors <-> one flat float32 buffer, so a phase costs one collective."""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch


def flat_size(tensors: Iterable[torch.Tensor]) -> int:
    """Total number of elements of tensors."""
    return sum(t.numel() for t in tensors)


def pack(tensors: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Copy tensors, in order, into one 1-D float32 buffer (out, when given, is reused).

    Tensors of another floating dtype are converted; all must live on one device.
    """
    n = flat_size(tensors)
    if out is None:
        device = tensors[0].device if len(tensors) else "cpu"
        out = torch.empty(n, dtype=torch.float32, device=device)
    elif out.numel() != n:
        raise ValueError(f"pack: out has {out.numel()} elements, the tensors {n}")
    if n:
        # torch.cat writes straight into out: one pass, no per-tensor python copy loop on the data.
        torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors], out=out)
    return out


def unpack_(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of flat back into tensors, in place (the inverse of pack)."""
    n = flat_size(tensors)
    if flat.numel() != n:
        raise ValueError(f"unpack_: flat has {flat.numel()} elements, the tensors {n}")
    offset = 0
    with torch.no_grad():
        for t in tensors:
            k = t.numel()
            t.copy_(flat[offset:offset + k].view_as(t))
            offset += k


def split_sizes(tensors: Sequence[torch.Tensor]) -> List[int]:
    """numel of each tensor, in order."""
    return [t.numel() for t in tensors]
