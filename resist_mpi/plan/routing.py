"""The exchange plan: from who holds each block now to who needs it next, who sends what to whom.

Pure and deterministic, so every rank computes the identical plan from the broadcast assignments
and no extra metadata moves. One plan = one all-to-all exchange:

- a block whose copies are identical (synced) and that its next owner already holds does not move;
  otherwise one holder sends it, the holder with the least load so far (ties: lowest rank);
- a block trained by several ranks this round (divergent copies) is averaged *where it is needed
  next*: every trainer sends its copy to every next owner, which averages them in rank order (its
  own copy included when it trained the block too);
- holders that are not next owners drop the block after the exchange.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

Pair = Tuple[int, int]


@dataclass(frozen=True)
class Plan:
    """One exchange.

    Attributes:
        size: number of ranks.
        transfers: (src, dst) -> block ids src sends to dst, ascending (the order of the messages).
        sources: (dst, block) -> ranks whose copies dst averages into block, ascending; (dst,) alone
            means dst keeps its own copy untouched.
        holders_after: block -> ranks holding it after the exchange (its next owners).
    """

    size: int
    transfers: Dict[Pair, Tuple[int, ...]]
    sources: Dict[Pair, Tuple[int, ...]]
    holders_after: Tuple[Tuple[int, ...], ...]

    def sends(self, rank: int) -> List[Tuple[int, Tuple[int, ...]]]:
        """[(dst, blocks)] this rank sends, by ascending dst (self excluded)."""
        return [(dst, self.transfers[(rank, dst)]) for dst in range(self.size) if (rank, dst) in self.transfers]

    def recvs(self, rank: int) -> List[Tuple[int, Tuple[int, ...]]]:
        """[(src, blocks)] this rank receives, by ascending src (self excluded)."""
        return [(src, self.transfers[(src, rank)]) for src in range(self.size) if (src, rank) in self.transfers]

    def needed(self, rank: int) -> List[int]:
        """Blocks this rank holds after the exchange, ascending."""
        return sorted(b for (dst, b) in self.sources if dst == rank)

    def send_counts(self, rank: int, block_numel: Sequence[int]) -> List[int]:
        """Elements this rank sends to each rank (for byte accounting and alltoallv counts)."""
        return [sum(block_numel[b] for b in self.transfers.get((rank, dst), ())) for dst in range(self.size)]

    def recv_counts(self, rank: int, block_numel: Sequence[int]) -> List[int]:
        """Elements this rank receives from each rank (for byte accounting and alltoallv counts)."""
        return [sum(block_numel[b] for b in self.transfers.get((src, rank), ())) for src in range(self.size)]

    def bytes_sent(self, rank: int, block_numel: Sequence[int], element_bytes: int = 4) -> int:
        return element_bytes * sum(self.send_counts(rank, block_numel))

    def bytes_recv(self, rank: int, block_numel: Sequence[int], element_bytes: int = 4) -> int:
        return element_bytes * sum(self.recv_counts(rank, block_numel))

    def total_bytes(self, block_numel: Sequence[int], element_bytes: int = 4) -> int:
        """Bytes crossing the network in this exchange, all ranks together."""
        return sum(self.bytes_sent(r, block_numel, element_bytes) for r in range(self.size))

    def busiest_bytes(self, block_numel: Sequence[int], element_bytes: int = 4) -> int:
        """Bytes the busiest rank sends or receives in this exchange (what its time is bounded by)."""
        return max(max(self.bytes_sent(r, block_numel, element_bytes), self.bytes_recv(r, block_numel, element_bytes))
                   for r in range(self.size))


def plan_exchange(holders: Sequence[Sequence[int]], needers: Sequence[Sequence[int]], size: int,
                  divergent: Optional[Set[int]] = None,
                  block_numel: Optional[Sequence[int]] = None) -> Plan:
    """Plan the exchange that brings every block to the ranks that need it next.

    Args:
        holders: holders[b] = ranks holding a copy of block b now (at least one).
        needers: needers[b] = ranks that must hold block b after the exchange.
        size: number of ranks.
        divergent: blocks whose holders' copies differ (trained by several ranks) and must be
            averaged; the copies of any other block are identical.
        block_numel: element count per block, to balance the sending load (equal when None).
    Returns:
        The Plan.
    """
    divergent = set() if divergent is None else set(divergent)
    if len(holders) != len(needers):
        raise ValueError(f"holders has {len(holders)} blocks, needers {len(needers)}")
    numel = block_numel if block_numel is not None else [1] * len(holders)
    load = [0] * size
    transfers: Dict[Pair, List[int]] = {}
    sources: Dict[Pair, Tuple[int, ...]] = {}
    for b, (have, need) in enumerate(zip(holders, needers)):
        have = tuple(sorted(set(have)))
        if not have:
            raise ValueError(f"block {b} has no holder: nothing to send")
        for r in list(have) + list(need):
            if not 0 <= r < size:
                raise ValueError(f"block {b} names rank {r}, the world has ranks 0..{size - 1}")
        for dst in sorted(set(need)):
            if b in divergent and len(have) > 1:
                srcs = have  # every trained copy goes into the average
            elif dst in have:
                srcs = (dst,)
            else:
                src = min(have, key=lambda r: (load[r], r))
                srcs = (src,)
            for src in srcs:
                if src != dst:
                    transfers.setdefault((src, dst), []).append(b)
                    load[src] += numel[b]
            sources[(dst, b)] = srcs
    return Plan(size=size,
                transfers={k: tuple(sorted(v)) for k, v in sorted(transfers.items())},
                sources=sources,
                holders_after=tuple(tuple(sorted(set(n))) for n in needers))


def gather_contributions(plan: Plan, block_numel: Sequence[int]) -> Optional[List[Tuple[int, ...]]]:
    """The same exchange as one allgather, when plan is a gather (every rank holds every block after
    it; else None): contributions[r] = the blocks rank r puts in, ascending. A block whose copies are
    averaged goes in from each of its holders (every rank averages the same copies in the same order
    as plan says); any other block that moves, from one of the ranks plan sends it from (the least
    loaded so far, ties: lowest rank). A rank receives every contribution but its own, so it may get
    a block it already holds: compare ring_bytes with plan.busiest_bytes before choosing."""
    S = plan.size
    if not plan.transfers or any(h != tuple(range(S)) for h in plan.holders_after):
        return None
    senders: Dict[int, Set[int]] = {}
    for (src, _dst), blocks in plan.transfers.items():
        for b in blocks:
            senders.setdefault(b, set()).add(src)
    load = [0] * S
    out: List[List[int]] = [[] for _ in range(S)]
    for b in sorted(senders):
        copies = {plan.sources[(dst, b)] for dst in range(S) if len(plan.sources[(dst, b)]) > 1}
        for r in (next(iter(copies)) if copies else (min(senders[b], key=lambda r: (load[r], r)),)):
            out[r].append(b)
            load[r] += block_numel[b]
    return [tuple(blocks) for blocks in out]


def ring_bytes(contributions: Sequence[Sequence[int]], block_numel: Sequence[int], element_bytes: int = 4) -> int:
    """Bytes the busiest rank sends or receives in a ring allgather of contributions (each rank sends
    every segment but its successor's and receives every segment but its own)."""
    counts = [sum(block_numel[b] for b in blocks) for blocks in contributions]
    total, S = sum(counts), len(counts)
    return element_bytes * max(total - min(counts[r], counts[(r + 1) % S]) for r in range(S))


def needers_from_assignment(assignment: Sequence[Sequence[int]], num_blocks: int) -> List[Tuple[int, ...]]:
    """needers[b] for an assignment (rank -> blocks)."""
    result: List[List[int]] = [[] for _ in range(num_blocks)]
    for rank, blocks in enumerate(assignment):
        for b in blocks:
            result[b].append(rank)
    return [tuple(r) for r in result]


def everyone(num_blocks: int, size: int) -> List[Tuple[int, ...]]:
    """needers for "every rank gets every block" (evaluation, checkpoints, the final model)."""
    return [tuple(range(size))] * num_blocks


class Holdings:
    """Who holds each block and whether its copies differ: the state the next plan starts from.

    One object follows a run round by round, for the strategy on real ranks and for the simulation
    (simulate(), used by traffic.py and the benchmarks) alike:

        plan = h.plan(needers, sizes)   # this round's exchange
        h.exchanged(plan)               # now needers hold identical copies
        h.trained()                     # blocks several ranks trained now differ: averaged next time

    Args:
        holders: holders[b] = ranks holding block b; None: rank 0 holds every block (a fresh model).
    """

    def __init__(self, num_blocks: int, size: int, holders: Optional[Sequence[Sequence[int]]] = None):
        self.size = size
        self.holders: List[Tuple[int, ...]] = ([(0,)] * num_blocks if holders is None
                                               else [tuple(sorted(set(h))) for h in holders])
        self.divergent: Set[int] = set()

    def plan(self, needers: Sequence[Sequence[int]], block_numel: Optional[Sequence[int]] = None) -> Plan:
        return plan_exchange(self.holders, needers, self.size, self.divergent, block_numel)

    def exchanged(self, plan: Plan) -> None:
        self.holders, self.divergent = list(plan.holders_after), set()

    def trained(self) -> None:
        self.divergent = {b for b, h in enumerate(self.holders) if len(h) > 1}

    def synchronized(self, holders: Sequence[Sequence[int]]) -> None:
        """holders[b] hold identical copies of b (after an evaluation's gather, or a resume)."""
        self.holders, self.divergent = [tuple(sorted(set(h))) for h in holders], set()


def simulate(assignments: Sequence[Sequence[Sequence[int]]], num_blocks: int, size: int,
             block_numel: Optional[Sequence[int]] = None,
             holders: Optional[Sequence[Sequence[int]]] = None) -> List[Plan]:
    """The exchange plans of consecutive training rounds, as ResIST runs them (pure, no communication).

    Args:
        assignments: each round's assignment (rank -> blocks), in order.
        holders: who holds each block, copies identical, before the first round; None: rank 0 alone
            (a fresh model).
    """
    h = Holdings(num_blocks, size, holders)
    plans = []
    for assignment in assignments:
        plans.append(h.plan(needers_from_assignment(assignment, num_blocks), block_numel))
        h.exchanged(plans[-1])
        h.trained()
    return plans
