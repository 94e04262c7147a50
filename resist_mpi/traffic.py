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


def resist_wire_rounds(sizes: ModelSizes, size: int, assignments: Sequence[Sequence[Sequence[int]]],
                       holders: Optional[Sequence[Sequence[int]]] = None) -> List[Dict[str, int]]:
    """Wire bytes of ResIST rounds, as ResIST.begin_round / end_round move them.

    Args:
        sizes: the model's ModelSizes.
        size: S, the number of ranks.
        assignments: the assignment of each round, in order.
        holders: who holds each block before the first of these rounds, copies identical (as after
            an evaluation or a warm-up); None: rank 0 alone holds every block (a fresh model).
    Returns:
        Per round: exchange_sent (= exchange_recv), shared_allreduce (sent + received), sent, recv,
        total (sent + received), all summed over ranks.
    """
    shared_ring = ring_allreduce_bytes(sizes.shared * ELEMENT_BYTES, size)
    rounds = []
    for plan in simulate(assignments, len(sizes.blocks), size, sizes.blocks, holders):
        moved = plan.total_bytes(sizes.blocks, ELEMENT_BYTES)  # every byte sent is received once
        sent = moved + size * shared_ring
        rounds.append({"exchange_sent": moved, "shared_allreduce": 2 * size * shared_ring,
                       "sent": sent, "recv": sent, "total": 2 * sent})
    return rounds


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
            seed: int = 0) -> Dict:
    """Bytes per round of resist, local_sgd and data_parallel, in both accountings (module docstring).

    ResIST's numbers are means over rounds 1..rounds (round 0 excluded).
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    P = len(sizes.blocks)
    partition.check_partition(P, size, min_depth)
    drawn = draw_rounds(P, size, min_depth, seed, rounds + 2)  # round rounds+1: the "next" of the last
    wire = resist_wire_rounds(sizes, size, drawn[:rounds + 1])[1:]
    paper = [resist_paper_round(sizes, drawn[r], drawn[r + 1]) for r in range(1, rounds + 1)]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    resist = {"paper_bytes": mean(paper, "total"), "wire_bytes": mean(wire, "total"),
              "paper_up": mean(paper, "up"), "paper_down": mean(paper, "down"),
              "wire_sent": mean(wire, "sent"), "exchange_sent": mean(wire, "exchange_sent"),
              "shared_allreduce": mean(wire, "shared_allreduce")}
    local = {"paper_bytes": local_sgd_paper_round(sizes, size), "wire_bytes": local_sgd_wire_round(sizes, size)}
    local["wire_sent"] = local["wire_bytes"] // 2
    dp = {"paper_bytes": data_parallel_paper_round(sizes, size, local_steps),
          "wire_bytes": data_parallel_wire_round(sizes, size, local_steps)}
    dp["wire_sent"] = dp["wire_bytes"] // 2
    ratios = {f"{other}_over_resist": {k: (d[k] / resist[k] if resist[k] else float("inf"))
                                       for k in ("paper_bytes", "wire_bytes")}
              for other, d in (("local_sgd", local), ("data_parallel", dp))}
    return {"world_size": size, "min_depth": min_depth, "local_steps": local_steps, "rounds": rounds,
            "seed": seed, "element_bytes": ELEMENT_BYTES,
            "elements": {**asdict(sizes), "blocks": list(sizes.blocks), "block_params": list(sizes.block_params),
                         "full": sizes.full,
                         "num_partitionable": P},
            "resist": resist, "local_sgd": local, "data_parallel": dp, "ratios": ratios}


def format_table(report: Dict) -> str:
    MB = 1e6
    e = report["elements"]
    lines = [f"{report['model']} ({report['num_classes']} classes, width {report['width']}): "
             f"{e['params']:,} parameters + {e['buffers']:,} BN buffer elements; shared {e['shared']:,}, "
             f"{e['num_partitionable']} partitionable blocks of {min(e['blocks']):,}..{max(e['blocks']):,}",
             f"S={report['world_size']} ranks, min depth {report['min_depth']}, l={report['local_steps']} steps/round; "
             f"bytes per round, up+down summed over workers (ResIST: mean of rounds 1..{report['rounds']}, "
             f"round 0 excluded); MB = 10^6 bytes",
             f"{'strategy':>14} | {'paper MB':>12} | {'wire MB':>12} | {'wire sent MB':>12}",
             "-" * 62]
    for name in ("resist", "local_sgd", "data_parallel"):
        d = report[name]
        lines.append(f"{name:>14} | {d['paper_bytes'] / MB:12.2f} | {d['wire_bytes'] / MB:12.2f} | "
                     f"{d['wire_sent'] / MB:12.2f}")
    r = report["resist"]
    lines.append(f"resist wire = exchange {2 * r['exchange_sent'] / MB:.2f} MB + shared allreduce "
                 f"{r['shared_allreduce'] / MB:.2f} MB")
    for key, d in report["ratios"].items():
        lines.append(f"{key}: paper {d['paper_bytes']:.2f}x, wire {d['wire_bytes']:.2f}x")
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
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    try:
        stages = [int(s) for s in args.partition_stages.split(",") if s.strip()]
        sizes = build_sizes(args.model, args.num_classes, args.width, stages)
        report = traffic(sizes, args.world_size, args.min_depth, args.local_steps, args.rounds, args.seed)
    except ValueError as e:  # unknown model, impossible partition, bad numbers: one line
        sys.stderr.write(f"resist_mpi.traffic: error: {e}\n")
        return 2
    report = {"model": args.model, "num_classes": args.num_classes, "width": args.width,
              "partition_stages": args.partition_stages, **report}
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
