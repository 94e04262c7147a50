"""Several small mpirun jobs at once on a few cores, as the test suite runs them: Open MPI's own
placement against the settings tests/helpers.py gives every launch (helpers.SHARED_CORES: no
binding, yield while waiting).

    python benchmarks/contention.py                   # 3 jobs of 2 ranks, 3 repetitions
    python benchmarks/contention.py --jobs 2 --np 2 --reps 5

Each repetition runs, once per setting (interleaved, so a slow phase of the machine hits both):
--jobs concurrent `mpirun -np NP python -m resist_mpi.train` trainings (a thin ResNet-34 on the
digits, 2 epochs), beside one busy process pinned to CPU 0 (the unit tier's workers are pinned to a
CPU each, tests/unit/conftest.py), and times until all have ended. Prints each repetition's times,
the medians and their ratio. With no more ranks than cores, Open MPI binds rank k of every job to
core k and busy-polls without yielding while a rank waits for its peer.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from helpers import SHARED_CORES, mpi_env  # noqa: E402

TRAIN = ["-m", "resist_mpi.train", "--model", "preact_resnet34", "--width", "4", "--batch-size", "64",
         "--local-steps", "4", "--epochs", "2", "--progress", "off"]
BUSY = "import os, torch; os.sched_setaffinity(0, {0}); x = torch.randn(300, 300)\nfor _ in range(3000): x @ x"


def environment(shared: bool) -> dict:
    env = mpi_env()
    for key, value in SHARED_CORES.items():
        if shared:
            env[key] = value
        else:
            env.pop(key, None)
    return env


def one(jobs: int, np_: int, shared: bool, base: str) -> float:
    """Seconds from the start of the jobs and the busy process until the last has ended."""
    env = environment(shared)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["mpirun", "--oversubscribe", "-np", str(np_), sys.executable, *TRAIN,
                               "--out", os.path.join(base, f"job{j}"), "--overwrite"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for j in range(jobs)]
    procs.append(subprocess.Popen([sys.executable, "-c", BUSY], env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"contention: a job failed (exit {p.returncode}): {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=3, help="concurrent mpirun jobs (default 3)")
    ap.add_argument("--np", type=int, default=2, help="ranks per job (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each setting (default 3)")
    args = ap.parse_args(argv)
    names = {False: "Open MPI's own", True: "helpers.SHARED_CORES"}
    times = {False: [], True: []}
    print(f"contention: {args.jobs} jobs of {args.np} ranks beside a busy process on CPU 0, "
          f"{os.cpu_count()} CPUs; {' '.join(f'{k}={v}' for k, v in SHARED_CORES.items())}")
    with tempfile.TemporaryDirectory(prefix="resist-contention-") as base:
        for rep in range(args.reps):
            for shared in (False, True):
                times[shared].append(one(args.jobs, args.np, shared, base))
            print(f"rep {rep}: " + ", ".join(f"{names[s]} {times[s][-1]:.1f} s" for s in (False, True)))
    own, shared = statistics.median(times[False]), statistics.median(times[True])
    print(f"median: Open MPI's own {own:.1f} s, helpers.SHARED_CORES {shared:.1f} s, ratio {shared / own:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
