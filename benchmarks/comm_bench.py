"""Communication microbenchmark: the package's comm API against raw mpi4py on the same buffers.

    mpirun -np 4 python benchmarks/comm_bench.py
    mpirun -np 2 python benchmarks/comm_bench.py --sizes 1MB,16MB --reps 21 --json runs/bench/comm.json
    horovodrun -np 4 python benchmarks/comm_bench.py --backend horovod   # skipped if Horovod is absent
    mpirun -np 4 python benchmarks/comm_bench.py --backend torch         # torch.distributed (gloo on the CPU)

For each message size (bytes of float32 payload per rank) it times, osu_bw style (warm-up, a
barrier before each timed batch, ``MPI.Wtime()``, ``--iters`` calls per batch):

  allreduce   package ``h = c.prepare_allreduce(t); h()`` (how the strategies average, round after
              round) and the one-shot ``c.allreduce_mean_(t)``, vs raw ``Allreduce(IN_PLACE, arr,
              SUM); arr /= size`` (a mean needs the division, so the raw side does it too)
  alltoallv   package ``c.prepare_alltoallv(send, counts, recv_counts)()`` (recv counts given, as a
              routing plan knows them), the same with ``out=buf`` when the backend takes one, the
              one-shot ``c.alltoallv(send, counts, recv_counts)`` and ``c.alltoallv(send, counts)``
              (counts exchanged first), vs raw ``comm.Alltoallv`` with the same counts and the
              same work (a receive buffer allocated per call where the package allocates one; an
              Alltoall of the counts first where the package exchanges them)

The size is split evenly over the destinations of the alltoallv (the rank's own share included).
Package and raw batches are interleaved (the order alternates every repetition), each batch's
per-call time is the maximum over ranks, and the table shows the median over ``--reps`` batches
and the ratio package/raw (plus the ratio of the fastest batches, "min-ratio", which other jobs
on a shared machine disturb less). The project's target: prepared calls (a handle from
prepare_allreduce / prepare_alltoallv, called again and again, as the strategies do) within 10% of raw
(ratio <= 1.10) for messages of 1 MB and more; one-shot calls, which check their arguments and build
the MPI arguments every time, are reported beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Callable, Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from resist_mpi import comm as C  # noqa: E402

UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def parse_size(text: str) -> int:
    """'64KB' -> 65536 (binary units); a bare number is bytes."""
    text = text.strip().upper()
    for unit in ("GB", "MB", "KB", "B"):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * UNITS[unit])
    return int(text)


def human(nbytes: int) -> str:
    for unit in ("GB", "MB", "KB"):
        if nbytes >= UNITS[unit] and nbytes % UNITS[unit] == 0:
            return f"{nbytes // UNITS[unit]}{unit}"
    return f"{nbytes}B"


def even_counts(numel: int, size: int) -> List[int]:
    """numel // size elements for every destination (so every rank receives what it sends)."""
    return [numel // size] * size


def time_batches(MPI, mpicomm, variants: Dict[str, Callable[[], None]], iters: int, warmup: int,
                 reps: int, best: Dict[str, float] = None) -> Dict[str, float]:
    """Median over reps of the per-call time (max over ranks) of each variant, batches interleaved.

    best, when given, receives the minimum over reps too (less sensitive to other jobs on the machine).
    """
    names = list(variants)
    for name in names:  # warm-up: connections, caches, allocator pools
        for _ in range(warmup):
            variants[name]()
    local = {name: [] for name in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]  # neither variant always runs first
        for name in order:
            fn = variants[name]
            mpicomm.Barrier()
            t0 = MPI.Wtime()
            for _ in range(iters):
                fn()
            local[name].append((MPI.Wtime() - t0) / iters)
    result = {}
    for name in names:
        mine = np.asarray(local[name], dtype=np.float64)
        worst = np.empty_like(mine)
        mpicomm.Allreduce(mine, worst, op=MPI.MAX)  # a collective is as slow as its slowest rank
        result[name] = float(statistics.median(worst.tolist()))
        if best is not None:
            best[name] = float(worst.min())
    return result


def check_same_results(c, MPI, mpicomm, numel: int) -> None:
    """The package and raw mpi4py compute the same thing (so the timings compare like with like)."""
    S, r = c.size, c.rank
    t = torch.arange(numel, dtype=torch.float32) + r
    raw = t.numpy().copy()
    c.allreduce_mean_(t)
    mpicomm.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM)
    raw /= S
    assert np.allclose(t.numpy(), raw), "allreduce_mean_ differs from raw Allreduce + division"
    counts = even_counts(numel, S)
    numel = sum(counts)
    send = torch.arange(numel, dtype=torch.float32) + 1000 * r
    recv, _ = c.alltoallv(send, counts, counts)
    rraw = np.empty(numel, dtype=np.float32)
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    mpicomm.Alltoallv([send.numpy(), (counts, displs), MPI.FLOAT], [rraw, (counts, displs), MPI.FLOAT])
    assert np.array_equal(recv.numpy(), rraw), "alltoallv differs from raw Alltoallv"


def auto_iters(nbytes: int) -> int:
    """Calls per timed batch: many for small messages (timer resolution), few for large ones."""
    return int(max(2, min(200, (32 << 20) // max(nbytes, 1))))


def bench(c, sizes: List[int], iters: int = 0, warmup: int = 3, reps: int = 15) -> List[Dict]:
    """Time the package against raw mpi4py for every size; every rank returns the same rows."""
    from mpi4py import MPI
    mpicomm = MPI.COMM_WORLD
    S = c.size
    check_same_results(c, MPI, mpicomm, 1000 + 7)
    rows = []
    for nbytes in sizes:
        counts = even_counts(max(S, nbytes // C.ELEMENT_BYTES), S)
        numel = sum(counts)  # a multiple of S (all standard sizes already are)
        k = iters or auto_iters(nbytes)
        # allreduce: the same tensor for both sides; values stay bounded (a mean of equal values)
        t = torch.ones(numel, dtype=torch.float32)
        arr = t.numpy()

        pkg_allreduce = c.prepare_allreduce(t)

        def pkg_allreduce_call():
            c.allreduce_mean_(t)

        def raw_allreduce():
            mpicomm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
            np.divide(arr, S, out=arr)  # arr /= S: the mean; the package divides too

        ar_min, a2_min = {}, {}
        ar = time_batches(MPI, mpicomm, {"package": pkg_allreduce, "package_call": pkg_allreduce_call,
                                         "raw": raw_allreduce}, k, warmup, reps, ar_min)

        send = torch.ones(numel, dtype=torch.float32)
        sbuf = send.numpy()
        # raw receives into a torch-allocated buffer too: a np.empty buffer measured ~20% slower
        # as an MPI receive buffer at >= 4 MB here (allocator/alignment), which would flatter the package
        rbuf = torch.empty(numel, dtype=torch.float32).numpy()
        displs = np.zeros(S, dtype=np.int64)
        np.cumsum(counts[:-1], out=displs[1:])
        cnt = np.asarray(counts, dtype=np.int64)

        pkg_a2av = c.prepare_alltoallv(send, counts, counts)

        def pkg_a2av_call():
            c.alltoallv(send, counts, counts)

        def pkg_a2av_nocounts():
            c.alltoallv(send, counts)

        def raw_a2av():
            mpicomm.Alltoallv([sbuf, (cnt, displs), MPI.FLOAT], [rbuf, (cnt, displs), MPI.FLOAT])

        # Like for like: c.alltoallv without out= returns a new tensor, so raw code doing the same
        # allocates its receive buffer per call; without recv_counts the counts must be exchanged
        # first, which raw code does with an Alltoall.
        def raw_a2av_alloc():
            mpicomm.Alltoallv([sbuf, (cnt, displs), MPI.FLOAT], [np.empty(numel, dtype=np.float32), (cnt, displs), MPI.FLOAT])

        def raw_a2av_counts():
            rcnt = np.empty(S, dtype=np.int64)
            mpicomm.Alltoall([cnt, MPI.INT64_T], [rcnt, MPI.INT64_T])
            rdis = np.zeros(S, dtype=np.int64)
            np.cumsum(rcnt[:-1], out=rdis[1:])
            mpicomm.Alltoallv([sbuf, (cnt, displs), MPI.FLOAT],
                              [np.empty(int(rcnt.sum()), dtype=np.float32), (rcnt, rdis), MPI.FLOAT])

        variants = {"package": pkg_a2av, "package_call": pkg_a2av_call, "package_no_counts": pkg_a2av_nocounts,
                    "raw": raw_a2av, "raw_alloc": raw_a2av_alloc, "raw_counts": raw_a2av_counts}
        if hasattr(c, "_alltoallv_into"):  # the backend receives into a caller-owned buffer
            variants["package_out"] = c.prepare_alltoallv(send, counts, counts, out=torch.empty(numel))
        a2 = time_batches(MPI, mpicomm, variants, k, warmup, reps, a2_min)
        rows.append({
            "bytes": numel * C.ELEMENT_BYTES, "size": human(numel * C.ELEMENT_BYTES), "iters": k, "reps": reps,
            "allreduce_package_s": ar["package"], "allreduce_raw_s": ar["raw"],
            "allreduce_ratio": ar["package"] / ar["raw"],
            "allreduce_package_call_s": ar["package_call"], "allreduce_call_ratio": ar["package_call"] / ar["raw"],
            "alltoallv_package_call_s": a2["package_call"], "alltoallv_call_ratio": a2["package_call"] / a2["raw_alloc"],
            "alltoallv_package_s": a2["package"], "alltoallv_package_no_counts_s": a2["package_no_counts"],
            "alltoallv_raw_s": a2["raw"], "alltoallv_ratio": a2["package"] / a2["raw"],
            "alltoallv_no_counts_ratio": a2["package_no_counts"] / a2["raw"],
            "alltoallv_raw_alloc_s": a2["raw_alloc"], "alltoallv_raw_counts_s": a2["raw_counts"],
            # like-for-like ratios: the same work on both sides
            "alltoallv_ratio_same_work": a2["package"] / a2["raw_alloc"],
            "alltoallv_no_counts_ratio_same_work": a2["package_no_counts"] / a2["raw_counts"],
            "alltoallv_package_out_s": a2.get("package_out"),
            "alltoallv_out_ratio": a2["package_out"] / a2["raw"] if "package_out" in a2 else None,
            "min_over_reps_s": {"allreduce_package": ar_min["package"], "allreduce_raw": ar_min["raw"],
                                "alltoallv_package": a2_min["package"], "alltoallv_raw": a2_min["raw"]},
            "allreduce_ratio_of_min": ar_min["package"] / ar_min["raw"],
            "alltoallv_ratio_of_min": a2_min["package"] / a2_min["raw"],
        })
    return rows


def table(rows: List[Dict], size: int, backend: str) -> str:
    us = 1e6
    lines = [f"comm_bench: {size} ranks, backend {backend}; median time per call (max over ranks), "
             f"ratio = package / raw mpi4py",
             f"{'size':>6} | {'allreduce pkg':>13} {'raw':>10} {'ratio':>6} | {'alltoallv pkg':>13} "
             f"{'no-counts':>10} {'raw':>10} {'ratio':>6} {'ratio(nc)':>9} | {'min-ratio ar':>12} {'a2av':>6}",
             "-" * 124]
    for r in rows:
        lines.append(f"{r['size']:>6} | {r['allreduce_package_s'] * us:11.1f}us {r['allreduce_raw_s'] * us:8.1f}us "
                     f"{r['allreduce_ratio']:6.3f} | {r['alltoallv_package_s'] * us:11.1f}us "
                     f"{r['alltoallv_package_no_counts_s'] * us:8.1f}us {r['alltoallv_raw_s'] * us:8.1f}us "
                     f"{r['alltoallv_ratio']:6.3f} {r['alltoallv_no_counts_ratio']:9.3f} | "
                     f"{r['allreduce_ratio_of_min']:12.3f} {r['alltoallv_ratio_of_min']:6.3f}")
    if rows and rows[0]["alltoallv_out_ratio"] is not None:
        lines.append("alltoallv with out= (caller-owned receive buffer) / raw: " + ", ".join(
            f"{r['size']} {r['alltoallv_out_ratio']:.3f}" for r in rows))
    lines.append("like for like (raw does the same work): alltoallv / raw allocating its receive buffer: " + ", ".join(
        f"{r['size']} {r['alltoallv_ratio_same_work']:.3f}" for r in rows))
    lines.append("  alltoallv without recv_counts / raw Alltoall of counts + Alltoallv: " + ", ".join(
        f"{r['size']} {r['alltoallv_no_counts_ratio_same_work']:.3f}" for r in rows))
    lines.append("one-shot calls (checks and MPI arguments built at every call) / raw: allreduce_mean_ " + ", ".join(
        f"{r['size']} {r['allreduce_call_ratio']:.3f}" for r in rows) + "; alltoallv " + ", ".join(
        f"{r['size']} {r['alltoallv_call_ratio']:.3f}" for r in rows))
    big = [r for r in rows if r["bytes"] >= UNITS["MB"]]
    if big:
        # the target is on prepared calls: how the strategies call the backend round after round
        pairs = ["allreduce_ratio", "alltoallv_ratio_same_work"]
        if big[0]["alltoallv_out_ratio"] is not None:
            pairs.append("alltoallv_out_ratio")
        worst = max(r[k] for r in big for k in pairs)
        lines.append(f"target (>= 1MB, prepared calls within 10% of raw code doing the same work): worst ratio "
                     f"{worst:.3f} -> {'met' if worst <= 1.10 else 'MISSED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1KB,64KB,1MB,4MB,16MB", help="message sizes per rank (default: %(default)s)")
    p.add_argument("--iters", type=int, default=0, help="calls per timed batch (0: by size, 2..200)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first (default: %(default)s)")
    p.add_argument("--reps", type=int, default=15, help="timed batches per variant; the median is reported")
    p.add_argument("--backend", default="mpi", choices=("mpi", "horovod", "torch"), help="the package backend to time")
    p.add_argument("--json", help="write the rows (and the setup) to this JSON file (rank 0)")
    args = p.parse_args(argv)

    if args.backend == "horovod":
        try:
            import horovod.torch  # noqa: F401
        except Exception as e:  # ImportError, or a half-built install
            if C.world_info_from_env().rank == 0:
                print(f"comm_bench: --backend horovod skipped: horovod.torch does not import "
                      f"({type(e).__name__}: {e}); build it with `make horovod`", flush=True)
            return 0
    c = C.init(args.backend, device="cpu")
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_size() != c.size:  # e.g. horovodrun --gloo, torchrun: no MPI world to compare with
        if c.rank == 0:
            print(f"comm_bench: the {c.name} backend sees {c.size} ranks but MPI.COMM_WORLD has "
                  f"{MPI.COMM_WORLD.Get_size()}: raw mpi4py needs the same world (horovodrun --mpi or "
                  f"mpirun); skipped", flush=True)
        return 0
    if c.size == 1 and c.rank == 0:
        print("comm_bench: a world of one rank: the package skips collectives (nothing to move); "
              "launch with mpirun -np N", flush=True)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    rows = bench(c, sizes, args.iters, args.warmup, args.reps)
    if c.rank == 0:
        print(table(rows, c.size, c.name), flush=True)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            import mpi4py
            with open(args.json, "w") as fh:
                json.dump({"benchmark": "comm_bench", "world_size": c.size, "backend": c.name,
                           "argv": sys.argv, "torch": torch.__version__, "mpi4py": mpi4py.__version__,
                           "mpi": __import__("mpi4py.MPI").MPI.Get_library_version().strip(),
                           "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
