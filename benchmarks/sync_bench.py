"""Synchronisation benchmark: one ResIST round's communication vs one local-SGD average, and raw mpi4py.

    mpirun -np 4 python benchmarks/sync_bench.py                       # ResNet-101, 100 classes, width 64
    mpirun -np 4 python benchmarks/sync_bench.py --rounds 60 --json runs/bench/sync_np4.json
    mpirun -np 2 python benchmarks/sync_bench.py --width 16 --rounds 5 --warmup 2  # a quick look
    horovodrun -np 4 python benchmarks/sync_bench.py --backend horovod          # the package over Horovod
    mpirun -np 4 python benchmarks/sync_bench.py --backend torch                # over torch.distributed (gloo)

On the real parameter sizes it times, per repetition and interleaved (the order rotates):

  resist          ResIST.begin_round() + end_round(): the round's assignment (rank 0 broadcasts
                  those of 32 rounds at once: one timed round in 32 has the broadcast), the routing
                  plan's block exchange (run_exchange: one message per block straight from and into
                  block slabs, averages, dropped blocks) and the shared-layer allreduce (in place on
                  the flat buffer the shared layers are views of).
                  Steady state: round 0 (blocks coming from rank 0's fresh model) and --warmup
                  repetitions of every variant (a rank's first rounds allocate block slabs until
                  its spare pool covers a round) are not reported.
  resist_raw      raw mpi4py moving the identical bytes: an Alltoallv with the same round's plan
                  counts on preallocated buffers (allocated like the package's), then
                  Allreduce(IN_PLACE) + division of the shared layers' flat buffer (the package's
                  own; --raw-allreduce-buffers separate: a buffer of that size of its own).
  local_sgd       LocalSGD.end_round(): the in-place allreduce of the full model (params + BN buffers).
  local_sgd_raw   raw Allreduce(IN_PLACE) + division of the full model's flat buffer (or its own).

No training happens between rounds (communication only). Each time is the maximum over ranks of
one call (a barrier first); the medians over --rounds repetitions are reported, with
resist_over_local_sgd = resist / local_sgd and efficiency_vs_raw = resist_raw / resist.
Targets with 4 ranks on ResNet-101 sizes: resist_over_local_sgd <= 0.55, efficiency_vs_raw >= 0.9.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from resist_mpi import comm as C  # noqa: E402
from resist_mpi.comm.fusion import empty_flat  # noqa: E402
from resist_mpi.tools import traffic as T  # noqa: E402
from resist_mpi.models import create_model  # noqa: E402
from resist_mpi.plan.routing import simulate  # noqa: E402
from resist_mpi.strategies import LocalSGD, ResIST  # noqa: E402


def planned_rounds(sizes: T.ModelSizes, S: int, min_depth: int, seed: int, count: int):
    """The plans of rounds 0..count-1, computed as ResIST computes them (pure: no communication)."""
    P = len(sizes.blocks)
    return simulate(T.draw_rounds(P, S, min_depth, seed, count), P, S, sizes.blocks)


def run(model_name: str, num_classes: int, width: int, rounds: int, min_depth: int, seed: int,
        warmup: int = 10, same_buffers: bool = True, backend: str = "mpi") -> Dict:
    from mpi4py import MPI
    mpicomm = MPI.COMM_WORLD
    c = C.init(backend, device="cpu")
    S, rank = c.size, c.rank
    if mpicomm.Get_size() != S:
        raise SystemExit(f"sync_bench: the {c.name} backend sees {S} ranks but MPI.COMM_WORLD has "
                         f"{mpicomm.Get_size()}: raw mpi4py needs the same world (mpirun, horovodrun --mpi)")

    def factory():
        return create_model(model_name, num_classes, width)

    resist = ResIST(factory(), c, min_depth=min_depth, seed=seed)
    local = LocalSGD(factory(), c)
    sizes = T.model_sizes(local.model)

    plans = planned_rounds(sizes, S, min_depth, seed, warmup + rounds + 1)
    counts = [(np.asarray(p.send_counts(rank, sizes.blocks), dtype=np.int64),
               np.asarray(p.recv_counts(rank, sizes.blocks), dtype=np.int64)) for p in plans]

    def displs(cnt):
        d = np.zeros_like(cnt)
        np.cumsum(cnt[:-1], out=d[1:])
        return d

    displacements = [(displs(s), displs(r)) for s, r in counts]
    # Raw buffers come from the package's own allocator (comm.fusion.empty_flat) and are touched
    # before timing, so both sides use identically allocated memory and the ratio measures only
    # the package's overhead (torch- and numpy-allocated buffers measured 15-20% apart here).
    # The raw allreduces run, by default, on the very buffers the package reduces (the flat
    # buffers the shared layers / the full model are views of), as comm_bench does: the same
    # Allreduce on two equally allocated 62 MB buffers still measured up to 10% apart within one
    # run here (memory placement), which would swamp the package's own overhead.
    def buffer(n, value):
        b = empty_flat(n)
        b.fill_(value)
        return b.numpy()

    sbuf = buffer(max(int(s.sum()) for s, _ in counts) or 1, 1.0)
    rbuf = buffer(max(int(r.sum()) for _, r in counts) or 1, 0.0)
    if not same_buffers:
        shared_buf, full_buf = buffer(sizes.shared, 1.0), buffer(sizes.full, 1.0)

    # round 0 (not timed): blocks leave rank 0's fresh model; also warms up every code path
    resist.begin_round()
    resist.end_round()
    local.begin_round()
    local.end_round()
    if same_buffers:  # the flat buffers the strategies' Averagers reduce
        shared_buf, full_buf = resist._average.flat.numpy(), local._average.flat.numpy()
        assert shared_buf.size == sizes.shared and full_buf.size == sizes.full
    for buf in (shared_buf, full_buf):
        mpicomm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        np.divide(buf, S, out=buf)

    times: Dict[str, List[float]] = {k: [] for k in (
        "resist", "resist_exchange", "resist_allreduce", "resist_raw", "resist_raw_alltoallv",
        "resist_raw_allreduce", "local_sgd", "local_sgd_raw")}
    exchange_bytes, resist_bytes, local_bytes = [], [], []

    def t_resist(r):
        before = c.counters()
        mpicomm.Barrier()
        t0 = MPI.Wtime()
        resist.round = r
        resist.begin_round()
        t1 = MPI.Wtime()
        resist.end_round()
        t2 = MPI.Wtime()
        times["resist"].append(t2 - t0)
        times["resist_exchange"].append(t1 - t0)
        times["resist_allreduce"].append(t2 - t1)
        resist_bytes.append(c.bytes_sent - before[0])
        assert resist.last_plan == plans[r], "the benchmark's plan differs from ResIST's"

    def t_resist_raw(r):
        (sc, rc), (sd, rd) = counts[r], displacements[r]
        mpicomm.Barrier()
        t0 = MPI.Wtime()
        mpicomm.Alltoallv([sbuf, (sc, sd), MPI.FLOAT], [rbuf, (rc, rd), MPI.FLOAT])
        t1 = MPI.Wtime()
        mpicomm.Allreduce(MPI.IN_PLACE, shared_buf, op=MPI.SUM)
        np.divide(shared_buf, S, out=shared_buf)
        t2 = MPI.Wtime()
        times["resist_raw"].append(t2 - t0)
        times["resist_raw_alltoallv"].append(t1 - t0)
        times["resist_raw_allreduce"].append(t2 - t1)
        exchange_bytes.append(4 * int(sc.sum()))

    def t_local(_r):
        local.begin_round()  # moves nothing for local SGD: only opens the round
        before = c.counters()
        mpicomm.Barrier()
        t0 = MPI.Wtime()
        local.end_round()
        times["local_sgd"].append(MPI.Wtime() - t0)
        local_bytes.append(c.bytes_sent - before[0])

    def t_local_raw(_r):
        mpicomm.Barrier()
        t0 = MPI.Wtime()
        mpicomm.Allreduce(MPI.IN_PLACE, full_buf, op=MPI.SUM)
        np.divide(full_buf, S, out=full_buf)
        times["local_sgd_raw"].append(MPI.Wtime() - t0)

    variants = [t_resist, t_resist_raw, t_local, t_local_raw]
    for r in range(1, warmup + rounds + 1):
        k = r % len(variants)  # rotate: no variant always runs first or after the same one
        for fn in variants[k:] + variants[:k]:
            fn(r)
        if r == warmup:  # warm-up repetitions are not reported
            for recorded in list(times.values()) + [exchange_bytes, resist_bytes, local_bytes]:
                recorded.clear()

    med = {}
    for name, values in times.items():
        mine = np.asarray(values, dtype=np.float64)
        worst = np.empty_like(mine)
        mpicomm.Allreduce(mine, worst, op=MPI.MAX)
        med[name] = float(statistics.median(worst.tolist()))
    per_rank = np.asarray([np.mean(exchange_bytes), np.mean(resist_bytes), np.mean(local_bytes)])
    total = np.empty_like(per_rank)
    mpicomm.Allreduce(per_rank, total, op=MPI.SUM)
    report = T.traffic(sizes, S, min_depth, rounds=rounds, seed=seed)
    return {
        "benchmark": "sync_bench", "backend": c.name, "world_size": S, "model": model_name, "num_classes": num_classes,
        "width": width, "min_depth": min_depth, "seed": seed, "rounds_timed": rounds, "warmup_rounds": warmup,
        "raw_allreduce_buffers": "same" if same_buffers else "separate",
        "elements": {"shared": sizes.shared, "block": list(sizes.blocks), "full": sizes.full},
        "median_s": med,
        "resist_over_local_sgd": med["resist"] / med["local_sgd"],
        "efficiency_vs_raw": med["resist_raw"] / med["resist"],
        "efficiency_exchange_vs_raw": med["resist_raw_alltoallv"] / med["resist_exchange"],
        "efficiency_allreduce_vs_raw": med["resist_raw_allreduce"] / med["resist_allreduce"],
        "local_sgd_efficiency_vs_raw": med["local_sgd_raw"] / med["local_sgd"],
        "raw_resist_over_raw_local_sgd": med["resist_raw"] / med["local_sgd_raw"],
        "bytes_sent_per_round_all_ranks": {"resist_exchange": float(total[0]), "resist_total": float(total[1]),
                                           "local_sgd": float(total[2])},
        "traffic_wire_sent_per_round": {"resist": report["resist"]["wire_sent"],
                                        "local_sgd": report["local_sgd"]["wire_sent"]},
    }


def format_result(res: Dict) -> str:
    m = {k: v * 1e3 for k, v in res["median_s"].items()}
    b = res["bytes_sent_per_round_all_ranks"]
    return "\n".join([
        f"sync_bench: {res['world_size']} ranks, {res['backend']} backend, {res['model']} width {res['width']}, "
        f"{res['num_classes']} classes: "
        f"shared {res['elements']['shared']:,} + {len(res['elements']['block'])} blocks of "
        f"{res['elements']['block'][0]:,} elements; median of {res['rounds_timed']} rounds, max over ranks; "
        f"raw allreduces on "
        f"{'the package' + chr(39) + 's own' if res['raw_allreduce_buffers'] == 'same' else 'separate'} buffers",
        f"{'':>24} {'package':>10} {'raw mpi4py':>11} {'raw/pkg':>8}",
        f"{'ResIST sync':>24} {m['resist']:8.1f}ms {m['resist_raw']:9.1f}ms {res['efficiency_vs_raw']:8.3f}",
        f"{'  block exchange':>24} {m['resist_exchange']:8.1f}ms {m['resist_raw_alltoallv']:9.1f}ms "
        f"{res['efficiency_exchange_vs_raw']:8.3f}",
        f"{'  shared allreduce':>24} {m['resist_allreduce']:8.1f}ms {m['resist_raw_allreduce']:9.1f}ms "
        f"{res['efficiency_allreduce_vs_raw']:8.3f}",
        f"{'local-SGD average':>24} {m['local_sgd']:8.1f}ms {m['local_sgd_raw']:9.1f}ms "
        f"{res['local_sgd_efficiency_vs_raw']:8.3f}",
        f"bytes sent per round, all ranks: ResIST {b['resist_total'] / 1e6:.1f} MB (exchange "
        f"{b['resist_exchange'] / 1e6:.1f} MB), local SGD {b['local_sgd'] / 1e6:.1f} MB",
        f"resist_over_local_sgd = {res['resist_over_local_sgd']:.3f} (target <= 0.55; raw: "
        f"{res['raw_resist_over_raw_local_sgd']:.3f}); efficiency_vs_raw = {res['efficiency_vs_raw']:.3f} "
        f"(target >= 0.9)",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="preact_resnet101", help="registered model (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=100, help="(default: %(default)s)")
    p.add_argument("--width", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--min-depth", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="assignment seed (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds per variant (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed rounds of every variant first (default: %(default)s): a rank's first rounds "
                        "allocate and fault in block slabs until its spare pool covers a round")
    p.add_argument("--raw-allreduce-buffers", choices=("same", "separate"), default="same",
                   help="raw allreduces on the package's own flat buffers, or on separately allocated "
                        "ones (default: %(default)s)")
    p.add_argument("--backend", default="mpi", choices=("mpi", "horovod", "torch"),
                   help="the package's backend (raw mpi4py needs an MPI world: mpirun, horovodrun --mpi)")
    p.add_argument("--json", help="write the result to this JSON file (rank 0)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    res = run(args.model, args.num_classes, args.width, args.rounds, args.min_depth, args.seed, args.warmup,
              args.raw_allreduce_buffers == "same", args.backend)
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(format_result(res), flush=True)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as fh:
                json.dump({**res, "argv": sys.argv}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
