"""Bytes per round of each strategy, from the real model and the real partition / routing code.

    python -m resist_mpi.traffic --model preact_resnet101 --num-classes 100 --world-size 4 --min-depth 0
    python -m resist_mpi.traffic --model preact_resnet101 --num-classes 100 --world-size 8 --json

Two accountings, both float32 and both counting what leaves *and* what reaches every worker
(up + down, sent + received), summed over the S workers:

paper   the ResIST paper's view (a parameter server in spirit), in trainable parameters only, as
        the paper counts them. ResIST: every worker uploads its trained sub-model (shared layers +
        the blocks it trained this round) and downloads its next sub-model (shared layers + its
        next blocks). Local SGD: the full model up and down per worker. Data-parallel: the full
        gradient up and down per worker per step, l steps.
wire    what this package moves per round, with the backend counters' own formulas (comm/base.py):
        a ring allreduce of n bytes costs every rank 2(S-1)/S * n sent and as much received;
        an alltoallv counts what goes to other ranks (routing.Plan send counts, self excluded).
        ResIST: the block exchange planned from last round's holders to this round's assignment
        (routing.plan_exchange, blocks several ranks trained are averaged where needed next) plus
        the shared-layer allreduce. Local SGD: one allreduce of the full model. Data-parallel: l
        gradient allreduces plus one allreduce of the BN buffers per round.

Tensors: in the wire accounting a model transfer (sub-model, block, shared layers, full model) is
its parameters AND its floating-point BatchNorm buffers (running mean / variance), as the package
moves them; the paper accounting counts parameters only; a gradient is parameters only. The integer
num_batches_tracked never moves. The assignment broadcast and the
per-round metric reduction are control traffic, not counted.

ResIST's wire bytes depend on the drawn assignments: they are averaged over --rounds rounds drawn
exactly as rank 0 draws them (partition.round_rng(seed, r)). Round 0 is excluded from the average:
its blocks all come from rank 0's freshly built model, not from last round's holders. Evaluation
rounds are not modelled either (after an evaluation every rank holds every block, so the next
exchange moves nothing, but the evaluation's gather moved the blocks).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import partition
from .comm.base import ELEMENT_BYTES, ring_allreduce_bytes
from .blocks import find_blocks, module_tensors
from .models import create_model
from .compression import WIRE_DTYPES, Codec, wire_elements
from .groups import slice_counts
from .routing import simulate


@dataclass(frozen=True)
class ModelSizes:
    """Element counts of a partitioned model (tensors as the package moves them, see module docstring).

    Attributes:
        shared: shared layers, parameters + float BN buffers (ResIST's allreduce).
        blocks: per partitionable block, parameters + float BN buffers (ResIST's exchange unit).
        params: all parameters (a data-parallel gradient).
        buffers: all float BN buffers (data-parallel's per-round allreduce).
        shared_params, block_params: the parameters alone (the paper's accounting).
    """

    shared: int
    blocks: Tuple[int, ...]
    params: int
    buffers: int
    shared_params: int
    block_params: Tuple[int, ...]

    @property
    def full(self) -> int:
        """The whole model, parameters + float BN buffers (local SGD's allreduce)."""
        return self.params + self.buffers


def model_sizes(model, blocks: Union[str, Sequence] = "auto", stages: Sequence[int] = (3,)) -> ModelSizes:
    """ModelSizes of any model ResIST can partition (any device, meta included); blocks and stages
    as for resist_mpi.blocks.find_blocks."""
    parts = [m for _, m in find_blocks(model, blocks, stages)]
    params = sum(p.numel() for p in model.parameters())
    block_params = tuple(sum(p.numel() for p in b.parameters()) for b in parts)
    full = sum(t.numel() for t in module_tensors(model))
    blocks_numel = tuple(sum(t.numel() for t in module_tensors(b)) for b in parts)
    return ModelSizes(shared=full - sum(blocks_numel), blocks=blocks_numel, params=params, buffers=full - params,
                      shared_params=params - sum(block_params), block_params=block_params)


def build_sizes(name: str, num_classes: int, width: int = 64, stages: Sequence[int] = (3,)) -> ModelSizes:
    """ModelSizes of a registered model, built on the meta device (shapes only, no memory); stages
    are 1-based, as --partition-stages."""
    with torch.device("meta"):
        model = create_model(name, num_classes, width)
    return model_sizes(model, "auto", stages)


# -- paper accounting (trainable parameters only) --------------------------------------------------------
def submodel_params(sizes: ModelSizes, blocks: Sequence[int]) -> int:
    return sizes.shared_params + sum(sizes.block_params[b] for b in blocks)


def resist_paper_round(sizes: ModelSizes, trained, nxt) -> Dict[str, int]:
    """Bytes up (trained sub-models) and down (next sub-models), summed over workers."""
    up = ELEMENT_BYTES * sum(submodel_params(sizes, blocks) for blocks in trained)
    down = ELEMENT_BYTES * sum(submodel_params(sizes, blocks) for blocks in nxt)
    return {"up": up, "down": down, "total": up + down}


def local_sgd_paper_round(sizes: ModelSizes, size: int) -> int:
    return 2 * size * ELEMENT_BYTES * sizes.params


def data_parallel_paper_round(sizes: ModelSizes, size: int, local_steps: int) -> int:
    return 2 * size * ELEMENT_BYTES * sizes.params * local_steps


# -- wire accounting (the backend counters' formulas) ------------------------------------------------
def allreduce_wire(numel: int, size: int) -> int:
    """sent + received, summed over ranks, of one allreduce_mean_ of numel float32 elements."""
    return 2 * size * ring_allreduce_bytes(numel * ELEMENT_BYTES, size) if numel else 0


@dataclass(frozen=True)
class Layout:
    """S ranks in groups of G consecutive ranks (--group-size), on nodes of R consecutive ranks."""

    size: int
    group: int = 1
    per_node: Optional[int] = None  # None: every rank on one node

    def __post_init__(self):
        if self.size % self.group or (self.per_node and self.size % self.per_node):
            raise ValueError(f"{self.size} ranks do not split into groups of {self.group}"
                             + (f" and nodes of {self.per_node}" if self.per_node else ""))

    @property
    def groups(self) -> int:
        return self.size // self.group

    def node(self, rank: int) -> int:
        return rank // self.per_node if self.per_node else 0

    def group_ranks(self, g: int) -> List[int]:
        return list(range(g * self.group, (g + 1) * self.group))

    def across_ranks(self, member: int) -> List[int]:
        return [g * self.group + member for g in range(self.groups)]


class Wire:
    """Bytes sent, summed over ranks, and the part sent across nodes, counted as the backends count
    them (comm/base.py): a ring sends to the next member, an exchange to each destination. Every
    byte sent is received once, so received bytes are the same totals."""

    def __init__(self, layout: Layout):
        self.layout, self.sent, self.cross = layout, 0, 0

    def send(self, src: int, dst: int, nbytes: int) -> None:
        self.sent += nbytes
        if self.layout.node(src) != self.layout.node(dst):
            self.cross += nbytes

    def ring(self, members: Sequence[int], nbytes: Sequence[int]) -> None:
        """members[i] sends nbytes[i] to members[i + 1] (wrapping)."""
        for i, m in enumerate(members):
            if len(members) > 1:
                self.send(m, members[(i + 1) % len(members)], nbytes[i])

    def allreduce(self, members: Sequence[int], numel: int) -> None:
        moved = ring_allreduce_bytes(numel * ELEMENT_BYTES, len(members)) if numel else 0
        self.ring(members, [moved] * len(members))

    def allgather(self, members: Sequence[int], counts: Sequence[int]) -> None:
        total = ELEMENT_BYTES * sum(counts)
        self.ring(members, [total - ELEMENT_BYTES * counts[(i + 1) % len(counts)] for i in range(len(counts))])

    def compressed_allreduce(self, members: Sequence[int], numel: int, codec: Codec) -> None:
        """compression.compressed_mean: an all-to-all of compressed chunks, an allgather of the
        compressed means (float32 containers of the compressed bytes, scales included)."""
        if len(members) < 2:
            return
        sizes = wire_elements(numel, len(members), codec)
        for i, src in enumerate(members):
            for d, dst in enumerate(members):
                if d != i:
                    self.send(src, dst, ELEMENT_BYTES * sizes[d])
        self.allgather(members, sizes)

    def average(self, members: Sequence[int], numel: int, codec: Optional[Codec] = None) -> None:
        if codec is None:
            self.allreduce(members, numel)
        else:
            self.compressed_allreduce(members, numel, codec)

    def hierarchical_allreduce(self, numel: int, codec: Optional[Codec] = None) -> None:
        """An Averager's average: in the group, across the groups by slices (compressed with a
        codec), gathered in the group."""
        lay = self.layout
        if lay.group == 1:
            return self.average(list(range(lay.size)), numel, codec)
        counts = slice_counts(numel, lay.group)
        for g in range(lay.groups):
            self.allreduce(lay.group_ranks(g), numel)
        for j in range(lay.group):
            self.average(lay.across_ranks(j), counts[j], codec)
        for g in range(lay.groups):
            self.allgather(lay.group_ranks(g), counts)

    def totals(self) -> Dict[str, int]:
        return {"sent": self.sent, "recv": self.sent, "total": 2 * self.sent, "sent_cross": self.cross,
                "sent_within": self.sent - self.cross}


def resist_wire_rounds(sizes: ModelSizes, size: int, assignments: Sequence[Sequence[Sequence[int]]],
                       holders: Optional[Sequence[Sequence[int]]] = None, group_size: int = 1,
                       ranks_per_node: Optional[int] = None, local_steps: int = 0,
                       wire_dtype: str = "float32") -> List[Dict[str, int]]:
    """Wire bytes of ResIST rounds, as ResIST.begin_round / end_round (and, with groups, the local
    steps' gradient averages inside each group) move them.

    Args:
        sizes: the model's ModelSizes.
        size: S, the number of ranks.
        assignments: the assignment of each round (group -> blocks), in order.
        holders: who holds each block before the first of these rounds, copies identical (as after
            an evaluation or a warm-up); None: group 0 (rank 0) alone holds every block (a fresh model).
        group_size, ranks_per_node: the Layout (G ranks per group, nodes of R ranks; None: one node).
        local_steps: steps per round (the gradient averages inside the groups; nothing when G == 1).
        wire_dtype: what the shared layers' average moves as (blocks stay float32).
    Returns:
        Per round: exchange_sent (the block exchange and the groups' gathers), shared_allreduce
        (sent + received), sent, recv, total (sent + received), sent_cross, sent_within; summed over ranks.
    """
    lay = Layout(size, group_size, ranks_per_node)
    G, P = lay.group, len(sizes.blocks)
    rounds = []
    for plan, assignment in zip(simulate(assignments, P, lay.groups, sizes.blocks, holders), assignments):
        wire = Wire(lay)
        for (src, dst), blocks in plan.transfers.items():  # member j moves slice j
            for b in blocks:
                for j, n in enumerate(slice_counts(sizes.blocks[b], G)):
                    wire.send(src * G + j, dst * G + j, ELEMENT_BYTES * n)
        if G > 1:
            for g in range(lay.groups):
                for b in plan.needed(g):
                    if plan.sources[(g, b)] != (g,):
                        wire.allgather(lay.group_ranks(g), slice_counts(sizes.blocks[b], G))
        exchange = wire.sent
        if G > 1:
            for g, blocks in enumerate(assignment):
                params = sizes.shared_params + sum(sizes.block_params[b] for b in blocks)
                for _ in range(local_steps):
                    wire.allreduce(lay.group_ranks(g), params)
                wire.allreduce(lay.group_ranks(g), sum(sizes.blocks[b] for b in blocks))  # BN stats made one
        before = wire.sent
        wire.hierarchical_allreduce(sizes.shared, _codec(wire_dtype))
        rounds.append({"exchange_sent": exchange, "shared_allreduce": 2 * (wire.sent - before), **wire.totals()})
    return rounds


def local_sgd_wire(sizes: ModelSizes, size: int, group_size: int = 1, ranks_per_node: Optional[int] = None,
                   local_steps: int = 0, wire_dtype: str = "float32") -> Dict[str, int]:
    """A round of (hierarchical) local SGD: the groups' gradient averages, the model's average."""
    lay = Layout(size, group_size, ranks_per_node)
    wire = Wire(lay)
    if lay.group > 1:
        for g in range(lay.groups):
            for _ in range(local_steps):
                wire.allreduce(lay.group_ranks(g), sizes.params)
    wire.hierarchical_allreduce(sizes.full, _codec(wire_dtype))
    return wire.totals()


def data_parallel_wire(sizes: ModelSizes, size: int, local_steps: int,
                       ranks_per_node: Optional[int] = None, wire_dtype: str = "float32") -> Dict[str, int]:
    """A round of data-parallel SGD: a gradient average per step (compressed with a wire dtype) and
    the BN statistics' average."""
    wire = Wire(Layout(size, 1, ranks_per_node))
    for _ in range(local_steps):
        wire.average(list(range(size)), sizes.params, _codec(wire_dtype))
    wire.allreduce(list(range(size)), sizes.buffers)
    return wire.totals()


def _codec(wire_dtype: str) -> Optional[Codec]:
    return None if wire_dtype == "float32" else Codec(wire_dtype)


def local_sgd_wire_round(sizes: ModelSizes, size: int) -> int:
    return allreduce_wire(sizes.full, size)


def data_parallel_wire_round(sizes: ModelSizes, size: int, local_steps: int) -> int:
    return local_steps * allreduce_wire(sizes.params, size) + allreduce_wire(sizes.buffers, size)


# -- the report ----------------------------------------------------------------------------------------
def draw_rounds(num_blocks: int, size: int, min_depth: int, seed: int, count: int):
    """The assignments of rounds 0..count-1, drawn as ResIST's rank 0 draws them."""
    return [partition.draw_assignment(num_blocks, size, min_depth, partition.round_rng(seed, r))
            for r in range(count)]


def traffic(sizes: ModelSizes, size: int, min_depth: int = 0, local_steps: int = 50, rounds: int = 100,
            seed: int = 0, group_size: int = 1, ranks_per_node: Optional[int] = None,
            wire_dtype: str = "float32") -> Dict:
    """Bytes per round of resist, local_sgd and data_parallel, in both accountings (module docstring).

    ResIST's numbers are means over rounds 1..rounds (round 0 excluded). With group_size G > 1,
    ResIST and local SGD run between groups of G ranks (hierarchical local SGD), data-parallel inside
    them; the paper accounting then treats a group as one worker. With ranks_per_node, "cross" is
    the part of the wire bytes sent between nodes (nodes of that many consecutive ranks). wire_dtype:
    what the averages move as (--wire-dtype; blocks that move stay float32).
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    lay = Layout(size, group_size, ranks_per_node)
    P = len(sizes.blocks)
    partition.check_partition(P, lay.groups, min_depth)
    drawn = draw_rounds(P, lay.groups, min_depth, seed, rounds + 2)  # round rounds+1: the "next" of the last
    wire = resist_wire_rounds(sizes, size, drawn[:rounds + 1], group_size=group_size,
                              ranks_per_node=ranks_per_node, local_steps=local_steps, wire_dtype=wire_dtype)[1:]
    paper = [resist_paper_round(sizes, drawn[r], drawn[r + 1]) for r in range(1, rounds + 1)]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    resist = {"paper_bytes": mean(paper, "total"), "wire_bytes": mean(wire, "total"),
              "paper_up": mean(paper, "up"), "paper_down": mean(paper, "down"),
              "wire_sent": mean(wire, "sent"), "wire_sent_cross": mean(wire, "sent_cross"),
              "exchange_sent": mean(wire, "exchange_sent"), "shared_allreduce": mean(wire, "shared_allreduce")}
    lw = local_sgd_wire(sizes, size, group_size, ranks_per_node, local_steps, wire_dtype)
    local = {"paper_bytes": local_sgd_paper_round(sizes, lay.groups), "wire_bytes": lw["total"],
             "wire_sent": lw["sent"], "wire_sent_cross": lw["sent_cross"]}
    dw = data_parallel_wire(sizes, size, local_steps, ranks_per_node, wire_dtype)
    dp = {"paper_bytes": data_parallel_paper_round(sizes, size, local_steps), "wire_bytes": dw["total"],
          "wire_sent": dw["sent"], "wire_sent_cross": dw["sent_cross"]}
    ratios = {f"{other}_over_resist": {k: (d[k] / resist[k] if resist[k] else float("inf"))
                                       for k in ("paper_bytes", "wire_bytes", "wire_sent_cross")}
              for other, d in (("local_sgd", local), ("data_parallel", dp))}
    return {"world_size": size, "group_size": group_size, "ranks_per_node": ranks_per_node or size,
            "wire_dtype": wire_dtype,
            "min_depth": min_depth, "local_steps": local_steps, "rounds": rounds,
            "seed": seed, "element_bytes": ELEMENT_BYTES,
            "elements": {**asdict(sizes), "blocks": list(sizes.blocks), "block_params": list(sizes.block_params),
                         "full": sizes.full,
                         "num_partitionable": P},
            "resist": resist, "local_sgd": local, "data_parallel": dp, "ratios": ratios}


def format_table(report: Dict) -> str:
    MB = 1e6
    e = report["elements"]
    G, R, S = report["group_size"], report["ranks_per_node"], report["world_size"]
    lines = [f"{report['model']} ({report['num_classes']} classes, width {report['width']}): "
             f"{e['params']:,} parameters + {e['buffers']:,} BN buffer elements; shared {e['shared']:,}, "
             f"{e['num_partitionable']} partitionable blocks of {min(e['blocks']):,}..{max(e['blocks']):,}",
             f"S={S} ranks" + (f" in {S // G} groups of {G}" if G > 1 else "") + f" on {S // R} node(s) of {R}, "
             f"averages as {report['wire_dtype']}, "
             f"min depth {report['min_depth']}, l={report['local_steps']} steps/round; bytes per round, "
             f"up+down summed over workers (ResIST: mean of rounds 1..{report['rounds']}, round 0 excluded); "
             f"MB = 10^6 bytes",
             f"{'strategy':>14} | {'paper MB':>12} | {'wire MB':>12} | {'wire sent MB':>12} | {'across nodes':>12}",
             "-" * 77]
    for name in ("resist", "local_sgd", "data_parallel"):
        d = report[name]
        lines.append(f"{name:>14} | {d['paper_bytes'] / MB:12.2f} | {d['wire_bytes'] / MB:12.2f} | "
                     f"{d['wire_sent'] / MB:12.2f} | {d['wire_sent_cross'] / MB:12.2f}")
    r = report["resist"]
    lines.append(f"resist wire = exchange {2 * r['exchange_sent'] / MB:.2f} MB + shared allreduce "
                 f"{r['shared_allreduce'] / MB:.2f} MB" + (" + the groups' gradient and BN averages" if G > 1 else ""))
    for key, d in report["ratios"].items():
        lines.append(f"{key}: paper {d['paper_bytes']:.2f}x, wire {d['wire_bytes']:.2f}x"
                     + (f", across nodes {d['wire_sent_cross']:.2f}x" if R < S else ""))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m resist_mpi.traffic",
        description="Bytes per round of resist, local_sgd and data_parallel (float32), in the paper's "
                    "accounting (trainable parameters only) and as this package moves them (wire: model "
                    "transfers count parameters AND floating-point BatchNorm buffers, running mean/var); "
                    "gradients count parameters only; data_parallel also allreduces the BN buffers once "
                    "per round. Up and down (sent and received) are both counted, summed over workers. "
                    "ResIST is averaged over --rounds drawn rounds, round 0 (blocks from rank 0's "
                    "fresh model) excluded.")
    p.add_argument("--model", default="preact_resnet101", help="registered model (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the head (default: %(default)s)")
    p.add_argument("--width", type=int, default=64, help="channels of the first stage (default: %(default)s)")
    p.add_argument("--partition-stages", default="3", help="1-based stages whose non-strided blocks are "
                   "partitioned, as in training (default: %(default)s)")
    p.add_argument("--world-size", type=int, required=True, help="S, the number of ranks")
    p.add_argument("--min-depth", type=int, default=0, help="minimum blocks per sub-ResNet (default: %(default)s)")
    p.add_argument("--local-steps", type=int, default=50, help="l, SGD steps per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=100, help="ResIST rounds to average (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the training seed the assignments are drawn from")
    p.add_argument("--group-size", type=int, default=1, help="ranks per group, as --group-size in training "
                   "(default: %(default)s)")
    p.add_argument("--ranks-per-node", type=int, default=None, help="ranks per node, for the bytes that cross "
                   "nodes (default: all on one node)")
    p.add_argument("--wire-dtype", default="float32", choices=WIRE_DTYPES,
                   help="what the averages move as, as --wire-dtype in training (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    try:
        stages = [int(s) for s in args.partition_stages.split(",") if s.strip()]
        sizes = build_sizes(args.model, args.num_classes, args.width, stages)
        report = traffic(sizes, args.world_size, args.min_depth, args.local_steps, args.rounds, args.seed,
                         args.group_size, args.ranks_per_node, args.wire_dtype)
    except ValueError as e:  # unknown model, impossible partition, bad numbers: one line
        sys.stderr.write(f"resist_mpi.traffic: error: {e}\n")
        return 2
    report = {"model": args.model, "num_classes": args.num_classes, "width": args.width,
              "partition_stages": args.partition_stages, **report}
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
