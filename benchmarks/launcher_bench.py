"""The same training under every launcher and backend: communication and compute time per round.

    python benchmarks/launcher_bench.py                              # 4 ranks, demo config at width 32, 4 epochs
    python benchmarks/launcher_bench.py --np 2 --extra-args "--width 8" --epochs 1   # a quick look

Each variant is one training run (the same config, seed and ranks, so the same bytes per round):

  mpirun            mpirun -np N ... --backend mpi            (the reference)
  mpirun-torch      mpirun -np N ... --backend torch          (torch.distributed, gloo on the CPU)
  hvd-mpi-auto      horovodrun -np N ...                      (MPI controller, --backend auto)
  hvd-mpi-horovod   horovodrun -np N ... --backend horovod    (MPI controller, Horovod collectives)
  hvd-gloo-auto     horovodrun --gloo -np N ...               (Gloo controller, --backend auto)
  hvd-gloo-horovod  horovodrun --gloo -np N ... --backend horovod

Per variant: the backend the run used (config.json), the median over rounds of t_comm and t_compute
(each the max over ranks, from metrics.jsonl), and t_comm relative to the mpirun reference. Round 0
(blocks leave rank 0's fresh model) is left out. Runs go one after another; HOROVOD_* variables in
the environment (HOROVOD_CYCLE_TIME, HOROVOD_FUSION_THRESHOLD) reach the horovodrun variants.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

from compare import mpi_env, run_logged  # noqa: E402
from resist_mpi.cli.metrics import read_metrics  # noqa: E402

VARIANTS = {  # name: (launcher argv before the interpreter, --backend or None for auto)
    "mpirun": (["mpirun", "--oversubscribe", "-np", "{np}"], "mpi"),
    "mpirun-torch": (["mpirun", "--oversubscribe", "-np", "{np}"], "torch"),
    "hvd-mpi-auto": (["{horovodrun}", "--mpi", "-np", "{np}", "-H", "localhost:{np}"], None),
    "hvd-mpi-horovod": (["{horovodrun}", "--mpi", "-np", "{np}", "-H", "localhost:{np}"], "horovod"),
    "hvd-gloo-auto": (["{horovodrun}", "--gloo", "-np", "{np}", "-H", "localhost:{np}"], None),
    "hvd-gloo-horovod": (["{horovodrun}", "--gloo", "-np", "{np}", "-H", "localhost:{np}"], "horovod"),
}


def command(variant: str, args, out: str) -> List[str]:
    launcher, backend = VARIANTS[variant]
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    cmd = [a.format(np=args.np, horovodrun=horovodrun) for a in launcher]
    cmd += [sys.executable, "-m", "resist_mpi.train", "--config", args.config, "--strategy", args.strategy,
            "--epochs", str(args.epochs), "--out", out, "--progress", "off", "--overwrite"]
    if backend:
        cmd += ["--backend", backend]
    return cmd + shlex.split(args.extra_args)


def summarise(out: str) -> Dict:
    rounds = [r for r in read_metrics(out, "round") if r["round"] > 0]
    config = json.load(open(os.path.join(out, "config.json")))
    return {"backend": config["backend"], "rounds": len(rounds),
            "t_comm_median_s": statistics.median(r["t_comm"] for r in rounds),
            "t_compute_median_s": statistics.median(r["t_compute"] for r in rounds),
            "bytes_sent_per_round": statistics.median(r["bytes_sent"] for r in rounds)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--np", type=int, default=4)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--strategy", default="resist")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--extra-args", default="--width 32", help="more train flags (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="(default: all)")
    p.add_argument("--out", default="runs/bench/launchers")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", help="results file (default: OUT/launcher_bench.json)")
    args = p.parse_args(argv)
    results = {}
    for variant in [v for v in args.variants.split(",") if v]:
        out = os.path.join(args.out, variant)
        os.makedirs(out, exist_ok=True)
        cmd = command(variant, args, out)
        print(f"launcher_bench: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        t0 = time.perf_counter()
        # Open MPI busy-polls while waiting unless it sees more ranks than slots; horovodrun tells it
        # there are N slots here, so its ranks must be told to yield like oversubscribed mpirun's do
        env = {**mpi_env(), "OMPI_MCA_mpi_yield_when_idle": "1"}
        with open(os.path.join(out, "train.log"), "w") as log:
            rc = run_logged(cmd, log, env, args.timeout)
        results[variant] = {"cmd": cmd, "returncode": rc, "elapsed_s": time.perf_counter() - t0}
        if rc == 0:
            results[variant].update(summarise(out))
    ref = results.get("mpirun", {}).get("t_comm_median_s")
    print(f"{'variant':>17} | {'backend':>8} | {'t_comm':>9} | {'vs mpirun':>9} | {'t_compute':>9} | {'MB sent':>8}")
    for name, r in results.items():
        if r["returncode"] != 0:
            print(f"{name:>17} | failed (exit {r['returncode']}): see {args.out}/{name}/train.log")
            continue
        r["t_comm_vs_mpirun"] = r["t_comm_median_s"] / ref if ref else None
        rel = f"{r['t_comm_vs_mpirun']:9.2f}" if ref else f"{'-':>9}"
        print(f"{name:>17} | {r['backend']:>8} | {r['t_comm_median_s']:8.3f}s | {rel} | "
              f"{r['t_compute_median_s']:8.2f}s | {r['bytes_sent_per_round'] / 1e6:8.1f}")
    path = args.json or os.path.join(args.out, "launcher_bench.json")
    with open(path, "w") as fh:
        json.dump({"benchmark": "launcher_bench", "argv": sys.argv, "np": args.np, "config": args.config,
                   "epochs": args.epochs, "extra_args": args.extra_args, "variants": results}, fh, indent=2)
    print(f"launcher_bench: wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
