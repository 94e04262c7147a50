"""What a strategy hands to a sharded checkpoint (resist_mpi.cli.checkpoint writes and reads the files):
one rank's part, and on load the averaging of a block's copies and of an average that was in flight
(reader: a resist_mpi.cli.checkpoint.Reader). Below the strategies, so that they
need nothing of the checkpoint machinery."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class Shard:
    """One rank's part of a checkpoint (CPU tensors, taken at a round boundary).

    shared: what every rank holds alike (written by rank 0 only; None elsewhere). Its "model" has
        every shared entry in order; those another rank writes are None there, and "dealt" says
        which rank (when every rank holds the entries alike, they are dealt out: deal()).
    dealt: {state_dict key: tensor} of the shared entries this rank writes for everyone (rank > 0).
    blocks: {block id: the block's state_dict entries} this rank writes.
    rank: this rank's own state (always written, possibly empty).
    writers: {block id: ranks whose blocks file holds a copy} (every rank computes the same).
    """

    shared: Optional[Dict] = None
    dealt: Dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: Dict[int, Dict[str, torch.Tensor]] = field(default_factory=dict)
    rank: Dict = field(default_factory=dict)
    writers: Dict[int, List[int]] = field(default_factory=dict)


def deal(sizes: Dict[str, int], loads: Sequence[int]) -> Dict[str, int]:
    """Who writes each shared entry of a checkpoint: the largest first, each to the rank that has
    the fewest bytes to write so far (ties: the lowest rank), starting from loads (the bytes each
    rank writes anyway: its blocks). Pure; every rank computes the same from the same sizes, so
    nobody is told. It evens out the bytes each rank's background writer has to write."""
    loads = list(loads)
    owner = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        r = min(range(len(loads)), key=lambda i: (loads[i], i))
        owner[key] = r
        loads[r] += sizes[key]
    return owner


def dealt_ranks(shared: Dict) -> List[int]:
    """The ranks > 0 that wrote part of shared's entries (shared-RRRRR.pt), ascending."""
    return sorted(set((shared.get("dealt") or {}).values()))


def merge_dealt(shared: Dict, parts: Dict[int, Dict[str, torch.Tensor]]) -> Dict:
    """shared (shared.pt) with the entries other ranks wrote (parts: rank -> its "model" dict) put
    back in their places (a KeyError names an entry that no part holds)."""
    dealt = shared.get("dealt") or {}
    if not dealt:
        return shared
    model = {k: (parts[dealt[k]][k] if v is None else v) for k, v in shared["model"].items()}
    return {**shared, "model": model}


def average_copies(copies: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Copies of one block averaged in the order given (floating tensors; counters from the first)."""
    out = {}
    for k, v in copies[0].items():
        if not v.is_floating_point() or len(copies) == 1:
            out[k] = v.clone()
            continue
        acc = v.clone()
        for other in copies[1:]:
            acc.add_(other[k])
        out[k] = acc.div_(len(copies))
    return out


def flushed_values(reader, index: int) -> Optional[Tuple[torch.Tensor, Optional[Dict]]]:
    """Averager `index`'s values with its in-flight average applied, and its outer optimizer's
    state after that (a float32 mean in rank order of every old rank's update, each with its
    error-feedback residual added where that covers the whole update: with groups a rank's
    residual is of its slice only, and is dropped, as error feedback is at any change of the
    world); None when nothing was in flight."""
    shared = reader.shared
    agreed = (shared.get("averagers") or [None])[index]
    if agreed is None:
        return None
    updates = []
    for r in range(reader.world_size):
        own = (reader.rank_state(r).get("averagers") or [None])[index] or {}
        if own.get("pending_update") is None:
            return None
        u = own["pending_update"]
        if own.get("residual") is not None and own["residual"].numel() == u.numel():
            u = u + own["residual"]
        updates.append(u)
    mean = updates[0].clone()
    for u in updates[1:]:
        mean.add_(u)
    mean.div_(len(updates))
    if agreed.get("outer") is None:
        return agreed["agreed"].clone().add_(mean), None
    from ..averaging.rounds import replay_outer_step
    return replay_outer_step(agreed["agreed"], mean, agreed)
