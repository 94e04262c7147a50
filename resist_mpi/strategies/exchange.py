"""Executing a routing Plan on a BlockStore: one all-to-all exchange moves every block that must move."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..comm import Comm
from ..comm.fusion import empty_flat
from ..plan.routing import Plan, gather_contributions, ring_bytes


def _workspace(buffers: Dict, key: str, n: int, device) -> torch.Tensor:
    """A float32 tensor of n elements from buffers[key], grown when too small (reused across rounds)."""
    buf = buffers.get(key)
    if buf is None or buf.numel() < n or buf.device != torch.device(device):
        buf = empty_flat(n, device)
        buffers[key] = buf
    return buf[:n]


def run_exchange(c: Comm, store, plan: Plan, device, buffers: Optional[Dict] = None,
                 route: str = "auto") -> None:
    """Carry out plan on this rank: send, receive, average, and drop blocks no longer needed.

    Every rank calls this with the identical plan. Blocks go in the plan's order (by destination,
    then block id) straight from their storage: a block with a single source is received straight
    into its new storage; copies to be averaged land in a workspace and are summed in ascending
    source-rank order, so the result equals a single-process computation that averages in that
    order.

    A gather (every rank needs every block: an evaluation, a checkpoint) goes as one allgather
    instead where that moves no more bytes to or from the busiest rank (gather_contributions): with
    the backends' ring, one connection per link carries it, where the all-to-all's S-1 concurrent
    messages per rank ran at about half the link's rate on slow links (docs/backends.md). Either way
    every rank ends with the same blocks, to the bit.

    Args:
        buffers: a dict the caller keeps between rounds; the averaging workspace is reused from it.
        route: "auto" (the above); "direct" (the all-to-all always) or "allgather" (one allgather
            wherever plan is a gather), for tests and comparisons.
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

    contributions = gather_contributions(plan, numel) if route != "direct" else None
    if contributions is not None and (route == "allgather"
                                      or ring_bytes(contributions, numel) <= plan.busiest_bytes(numel)):
        _run_as_allgather(c, store, plan, contributions, device, buffers)
        return

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

    # ---- distributed step: the exchange (MPI: one message per block, pairwise steps or all at once) ----
    c.alltoallv_tensors(sends, recvs)
    _average_copies(store, plan, rank, needed, lambda s, b: landing[(s, b)])
    _drop_unneeded(store, needed)


def _average_copies(store, plan: Plan, rank: int, needed, copy_of) -> None:
    """Each needed block with several sources becomes the mean of their copies, summed in ascending
    source order (copy_of(src, b): src's copy as it arrived; this rank's own is its slab)."""
    with torch.no_grad():
        for b in needed:
            srcs = plan.sources[(rank, b)]
            if len(srcs) == 1:
                continue  # kept, or received in place
            slab = store.slab(b)  # not written to until the average is complete
            parts = [slab if s == rank else copy_of(s, b) for s in srcs]
            value = parts[0].clone()
            for p in parts[1:]:
                value.add_(p)
            value.div_(len(parts))
            slab.copy_(value)


def _run_as_allgather(c: Comm, store, plan: Plan, contributions, device, buffers: Dict) -> None:
    """plan, a gather, as one allgather_ of every rank's contributions (segment r: rank r's blocks,
    ascending), then each rank takes what it lacks from the gathered buffer."""
    rank, numel = c.rank, store.sizes()
    counts = [sum(numel[b] for b in blocks) for blocks in contributions]
    flat = _workspace(buffers, "gather", sum(counts), device)
    at: Dict = {}  # (contributor, block) -> its copy in flat
    offset = 0
    for r, blocks in enumerate(contributions):
        for b in blocks:
            at[(r, b)] = flat[offset:offset + numel[b]]
            offset += numel[b]
    with torch.no_grad():
        for b in contributions[rank]:
            at[(rank, b)].copy_(store.slab(b))
    # ---- distributed step: the gather (one allgather; the ring on the mpi backend) ----
    c.allgather_(flat, counts)
    single = {b: r for r, blocks in enumerate(contributions) for b in blocks}  # a one-copy block's contributor
    needed = plan.needed(rank)
    with torch.no_grad():
        for b in needed:
            srcs = plan.sources[(rank, b)]
            if len(srcs) == 1 and srcs != (rank,):
                store.slab(b).copy_(at[(single[b], b)])
    _average_copies(store, plan, rank, needed, lambda s, b: at[(s, b)])
    _drop_unneeded(store, needed)


def _drop_unneeded(store, needed) -> None:
    keep = set(needed)
    for b in range(len(store)):
        if b not in keep and store.holds(b):
            store.release(b)
    store.trim_spares(len(needed))

