"""Executing a routing Plan on a model: one fused alltoallv moves every block that must move."""
from __future__ import annotations

from typing import List

import torch

from .comm import Comm, pack, unpack_
from .routing import Plan


def block_sizes(model) -> List[int]:
    """Element count of every partitionable block (known even for released blocks)."""
    return [model.block_numel(b) for b in range(model.num_partitionable)]


def run_exchange(c: Comm, model, plan: Plan, device) -> None:
    """Carry out plan on this rank: send, receive, average, and drop blocks no longer needed.

    Every rank calls this with the identical plan. Blocks are packed into one flat buffer in the
    plan's order (by destination, then block id); the receiver slices by (source, block id). An
    averaged block sums its copies in ascending source-rank order, so the result is the same as a
    single-process computation that averages in that order.
    """
    rank = c.rank
    numel = block_sizes(model)
    send_tensors = [t for _dst, blocks in plan.sends(rank) for b in blocks for t in model.block_tensors(b)]
    send = pack(send_tensors) if send_tensors else torch.empty(0, dtype=torch.float32, device=device)

    # Own copies that take part in an average must be read before anything is overwritten.
    needed = plan.needed(rank)
    own = {b: pack(model.block_tensors(b)) for b in needed
           if len(plan.sources[(rank, b)]) > 1 and rank in plan.sources[(rank, b)]}

    # ---- distributed step: the one collective of the exchange ----
    recv, _ = c.alltoallv(send, plan.send_counts(rank, numel), plan.recv_counts(rank, numel))

    offsets = {}
    offset = 0
    for src, blocks in plan.recvs(rank):
        for b in blocks:
            offsets[(src, b)] = offset
            offset += numel[b]

    for b in needed:
        srcs = plan.sources[(rank, b)]
        if srcs == (rank,):
            continue  # kept as is: the block does not move
        parts = [own[b] if s == rank else recv[offsets[(s, b)]:offsets[(s, b)] + numel[b]] for s in srcs]
        if len(parts) == 1:
            value = parts[0]
        else:
            value = parts[0].clone()
            for p in parts[1:]:
                value.add_(p)
            value.div_(len(parts))
        if not model.holds_block(b):
            model.materialize_block(b, device)
        unpack_(value, model.block_tensors(b))

    keep = set(needed)
    for b in range(model.num_partitionable):
        if b not in keep and model.holds_block(b):
            model.release_block(b)
