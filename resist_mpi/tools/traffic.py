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
wire    what this package moves per round, counted, not derived: the real strategies (ResIST,
        LocalSGD, DataParallel) run their rounds on S ranks that are threads of this process
        (comm.thread) on meta tensors (shapes only: nothing is computed, nothing is stored), and the
        backends' own counters (comm/base.py) add up what every collective moves. So the model
        cannot drift from the code: a new collective or another byte layout shows here at once.
        ResIST: the block exchange planned from last round's holders to this round's assignment
        plus the shared layers' average; local SGD: the model's average; data-parallel: l gradient
        averages plus one average of the BN buffers per round (with groups, also the gradient
        averages inside each group at every step).

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
import copy
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..averaging.compression import WIRE_DTYPES
from ..blocks.find import find_blocks
from ..blocks.tensors import module_tensors
from ..comm.accounting import ELEMENT_BYTES
from ..models import create_model
from ..plan import partition


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
    model: Any = field(default=None, compare=False, repr=False)  # the model on the meta device (for counting)
    stages: Tuple[int, ...] = field(default=(3,), compare=False, repr=False)

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
    meta = model if all(t.is_meta for t in model.state_dict().values()) else copy.deepcopy(model).to("meta")
    return ModelSizes(shared=full - sum(blocks_numel), blocks=blocks_numel, params=params, buffers=full - params,
                      shared_params=params - sum(block_params), block_params=block_params, model=meta,
                      stages=tuple(stages))


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


# -- wire accounting: the strategies' own rounds, counted ------------------------------------------------
def count_rounds(sizes: ModelSizes, size: int, strategy: str = "resist", rounds: int = 1, *,
                 assignments: Optional[Sequence] = None, holders: Optional[Sequence[Sequence[int]]] = None,
                 group_size: int = 1, ranks_per_node: Optional[int] = None, local_steps: int = 0,
                 wire_dtype: str = "float32", min_depth: int = 0, seed: int = 0) -> List[Dict[str, int]]:
    """Bytes of `rounds` rounds of a strategy, summed over `size` thread ranks on meta tensors.

    Per round: sent, recv, total (sent + received), sent_cross (to ranks of other nodes: nodes of
    ranks_per_node consecutive ranks), sent_within; for ResIST also exchange_sent (the block
    exchange and the groups' gathers of what arrived) and shared_allreduce (the shared layers'
    average, sent + received). Local steps move nothing but, with groups or data-parallel, the
    gradient average of every step. assignments: ResIST's assignment of each round (default: drawn
    as rank 0 draws them from seed); holders: who holds each block before the first of them, copies
    identical (default: rank 0's fresh model). A backward's gradient average is the same at every
    step of a round: it is counted once and taken local_steps times.
    """
    from ..comm.thread import run_ranks
    from ..strategies import DataParallel, LocalSGD, ResIST
    if sizes.model is None:
        raise ValueError("count_rounds needs ModelSizes with its model (model_sizes or build_sizes)")
    nodes = [r // ranks_per_node for r in range(size)] if ranks_per_node else None
    models = [copy.deepcopy(sizes.model) for _ in range(size)]
    if assignments is not None and not min_depth:  # given assignments may share blocks: allow it
        min_depth = max(1, min(len(blocks) for a in assignments for blocks in a))

    def body(c) -> List[Dict[str, int]]:
        model = models[c.rank]
        if strategy == "resist":
            job = ResIST(model, c, stages=sizes.stages, min_depth=min_depth, seed=seed, device="meta",
                         group_size=group_size, wire_dtype=wire_dtype)
            if assignments is not None:  # the rounds' assignments, as rank 0 would have broadcast them
                job._drawn = {r: tuple(tuple(a) for a in asg) for r, asg in enumerate(assignments)}
            if holders is not None:
                _hold(job, holders)
        elif strategy == "local_sgd":
            job = LocalSGD(model, c, device="meta", group_size=group_size, wire_dtype=wire_dtype)
        else:
            job = DataParallel(model, c, device="meta", wire_dtype=wire_dtype)
        shared = _meter(c, getattr(job, "_average", None)) if strategy == "resist" else None
        out = []
        for _ in range(rounds):
            start = _snapshot(c)
            job.begin_round()
            exchange = c.bytes_sent - start[0]
            step = (0, 0, 0)
            if local_steps and job._gradient_averagers:  # what a backward pass averages: the same every step
                before = _snapshot(c)
                for averager in job._gradient_averagers:
                    for p in averager.params:
                        if p.grad is None:  # made once (meta: no values), kept over the rounds
                            p.grad = torch.empty_like(p)
                    averager._average()
                step = tuple((local_steps - 1) * (a - b) for a, b in zip(_snapshot(c), before))
            before_shared = shared["bytes"] if shared else 0
            job.end_round()
            sent, recv, cross = (a - b + k for a, b, k in zip(_snapshot(c), start, step))
            rec = {"sent": sent, "recv": recv, "sent_cross": cross}
            if strategy == "resist":
                rec.update(exchange_sent=exchange, shared_allreduce=shared["bytes"] - before_shared)
            out.append(rec)
        return out

    per_rank = run_ranks(size, body, nodes=nodes, one_cpu=True)  # meta tensors: all under the lock
    rows = []
    for r in range(rounds):
        row = {k: sum(rank[r][k] for rank in per_rank) for k in per_rank[0][r]}
        row.update(total=row["sent"] + row["recv"], sent_within=row["sent"] - row["sent_cross"])
        rows.append(row)
    return rows


def _snapshot(c) -> Tuple[int, int, int]:
    return c.bytes_sent, c.bytes_recv, c.bytes_sent_cross


def _meter(c, averager) -> Dict[str, int]:
    """Count what averager.average() moves (sent + received) into the returned dict."""
    counted = {"bytes": 0}
    average = averager.average

    def measured():
        sent, recv = c.bytes_sent, c.bytes_recv
        average()
        counted["bytes"] += (c.bytes_sent - sent) + (c.bytes_recv - recv)
    averager.average = measured
    return counted


def _hold(job, holders: Sequence[Sequence[int]]) -> None:
    """Start a ResIST job from the given holders (group ids per block, identical copies)."""
    from ..plan.routing import Holdings
    g = job.groups.index
    for b, hs in enumerate(holders):
        if g in hs and not job.store.holds(b):
            job.store.materialize(b, "meta")
        elif g not in hs and job.store.holds(b):
            job.store.release(b)
    job.holdings = Holdings(len(job.blocks), job.groups.count, holders)


def resist_wire_rounds(sizes: ModelSizes, size: int, assignments: Sequence[Sequence[Sequence[int]]],
                       holders: Optional[Sequence[Sequence[int]]] = None, group_size: int = 1,
                       ranks_per_node: Optional[int] = None, local_steps: int = 0,
                       wire_dtype: str = "float32") -> List[Dict[str, int]]:
    """Wire bytes of ResIST rounds with the given assignments (count_rounds)."""
    return count_rounds(sizes, size, "resist", len(assignments), assignments=assignments, holders=holders,
                        group_size=group_size, ranks_per_node=ranks_per_node, local_steps=local_steps,
                        wire_dtype=wire_dtype)


def local_sgd_wire(sizes: ModelSizes, size: int, group_size: int = 1, ranks_per_node: Optional[int] = None,
                   local_steps: int = 0, wire_dtype: str = "float32") -> Dict[str, int]:
    """A round of (hierarchical) local SGD: the groups' gradient averages, the model's average."""
    return count_rounds(sizes, size, "local_sgd", group_size=group_size, ranks_per_node=ranks_per_node,
                        local_steps=local_steps, wire_dtype=wire_dtype)[0]


def data_parallel_wire(sizes: ModelSizes, size: int, local_steps: int,
                       ranks_per_node: Optional[int] = None, wire_dtype: str = "float32") -> Dict[str, int]:
    """A round of data-parallel SGD: a gradient average per step, the BN statistics' average."""
    return count_rounds(sizes, size, "data_parallel", ranks_per_node=ranks_per_node, local_steps=local_steps,
                        wire_dtype=wire_dtype)[0]


def local_sgd_wire_round(sizes: ModelSizes, size: int) -> int:
    return local_sgd_wire(sizes, size)["total"]


def data_parallel_wire_round(sizes: ModelSizes, size: int, local_steps: int) -> int:
    return data_parallel_wire(sizes, size, local_steps)["total"]


def average_wire(numel: int, size: int, wire_dtype: str = "float32") -> int:
    """Bytes sent, summed over ranks, by one average of numel float32 elements (an Averager's)."""
    from ..averaging.rounds import Averager
    from ..comm.thread import run_ranks

    def body(c):
        t = torch.empty(numel, device="meta")
        averager = Averager(c, lambda: [t], wire_dtype=wire_dtype)
        averager.mark()
        before = c.bytes_sent
        averager.average()
        return c.bytes_sent - before
    return sum(run_ranks(size, body, one_cpu=True))


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
    if size % group_size or (ranks_per_node and size % ranks_per_node):
        raise ValueError(f"{size} ranks do not split into groups of {group_size}"
                         + (f" and nodes of {ranks_per_node}" if ranks_per_node else ""))
    groups = size // group_size
    P = len(sizes.blocks)
    partition.check_partition(P, groups, min_depth)
    drawn = draw_rounds(P, groups, min_depth, seed, rounds + 2)  # round rounds+1: the "next" of the last
    wire = count_rounds(sizes, size, "resist", rounds + 1, group_size=group_size, ranks_per_node=ranks_per_node,
                        local_steps=local_steps, wire_dtype=wire_dtype, min_depth=min_depth, seed=seed)[1:]
    paper = [resist_paper_round(sizes, drawn[r], drawn[r + 1]) for r in range(1, rounds + 1)]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    resist = {"paper_bytes": mean(paper, "total"), "wire_bytes": mean(wire, "total"),
              "paper_up": mean(paper, "up"), "paper_down": mean(paper, "down"),
              "wire_sent": mean(wire, "sent"), "wire_sent_cross": mean(wire, "sent_cross"),
              "exchange_sent": mean(wire, "exchange_sent"), "shared_allreduce": mean(wire, "shared_allreduce")}
    lw = local_sgd_wire(sizes, size, group_size, ranks_per_node, local_steps, wire_dtype)
    local = {"paper_bytes": local_sgd_paper_round(sizes, groups), "wire_bytes": lw["total"],
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
            "elements": {"shared": sizes.shared, "blocks": list(sizes.blocks), "params": sizes.params,
                         "buffers": sizes.buffers, "shared_params": sizes.shared_params,
                         "block_params": list(sizes.block_params),
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
    for flag, value, least in (("--world-size", args.world_size, 1), ("--group-size", args.group_size, 1),
                               ("--local-steps", args.local_steps, 1), ("--rounds", args.rounds, 1),
                               ("--ranks-per-node", args.ranks_per_node, 1), ("--min-depth", args.min_depth, 0),
                               ("--seed", args.seed, 0), ("--width", args.width, 1),
                               ("--num-classes", args.num_classes, 1)):
        if value is not None and value < least:
            p.error(f"{flag} {value}: must be at least {least}")
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
