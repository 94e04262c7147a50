"""Executing a routing Plan on a BlockStore: one all-to-all exchange moves every block that must move."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..comm import Comm
from ..comm.fusion import empty_flat
from ..plan.routing import Plan


def _workspace(buffers: Dict, key: str, n: int, device) -> torch.Tensor:
    """A float32 tensor of n elements from buffers[key], grown when too small (reused across rounds)."""
    buf = buffers.get(key)
    if buf is None or buf.numel() < n or buf.device != torch.device(device):
        buf = empty_flat(n, device)
        buffers[key] = buf
    return buf[:n]


def run_exchange(c: Comm, store, plan: Plan, device, buffers: Optional[Dict] = None) -> None:
    """Carry out plan on this rank: send, receive, average, and drop blocks no longer needed.

    Every rank calls this with the identical plan. Blocks go in the plan's order (by destination,
    then block id) straight from their storage: a block with a single source is received straight
    into its new storage; copies to be averaged land in a workspace and are summed in ascending
    source-rank order, so the result equals a single-process computation that averages in that
    order.

    Args:
        buffers: a dict the caller keeps between rounds; the averaging workspace is reused from it.
    """
    buffers = {} if buffers is None else buffers
    rank = c.rank
    numel = store.sizes()
    needed = plan.needed(rank)

    # New blocks get storage before the collective (spare slabs from earlier rounds first). Blocks
    # being dropped are released only afterwards: they may still be sent in this very exchange.
    for b in needed:
        if plan.sources[(rank, b)] != (rank,) and not store.holds(b):
            store.materialize(b, device)

    sends: List[List[torch.Tensor]] = [[] for _ in range(c.size)]
    for dst, blocks in plan.sends(rank):
        sends[dst] = [store.slab(b) for b in blocks]  # one message per block
    recvs: List[List[torch.Tensor]] = [[] for _ in range(c.size)]
    to_average = [(src, b) for src, blocks in plan.recvs(rank) for b in blocks if len(plan.sources[(rank, b)]) > 1]
    work = _workspace(buffers, "average", sum(numel[b] for _src, b in to_average), device)
    landing: Dict = {}  # (src, block) -> workspace slice holding src's copy
    offset = 0
    for src, b in to_average:
        landing[(src, b)] = work[offset:offset + numel[b]]
        offset += numel[b]
    for src, blocks in plan.recvs(rank):
        for b in blocks:
            # a single-source block goes straight into its storage; copies to average land aside
            recvs[src].append(landing[(src, b)] if (src, b) in landing else store.slab(b))

    # ---- distributed step: the exchange (MPI: every message posted at once, one wait) ----
    c.alltoallv_tensors(sends, recvs)

    with torch.no_grad():
        for b in needed:
            srcs = plan.sources[(rank, b)]
            if len(srcs) == 1:
                continue  # kept, or received in place
            slab = store.slab(b)  # not written to until the average is complete
            parts = [slab if s == rank else landing[(s, b)] for s in srcs]
            value = parts[0].clone()
            for p in parts[1:]:
                value.add_(p)
            value.div_(len(parts))
            slab.copy_(value)
    keep = set(needed)
    for b in range(len(store)):
        if b not in keep and store.holds(b):
            store.release(b)
    store.trim_spares(len(needed))

