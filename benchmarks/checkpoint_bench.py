"""What a sharded checkpoint every round costs: the same run with and without --checkpoint-rounds 1.

    python benchmarks/checkpoint_bench.py                          # demo config and ResNet-101 width 64, 4 ranks
    python benchmarks/checkpoint_bench.py --models demo --repeats 1 --out runs/bench/ckpt-quick

For each model, runs without and with a checkpoint after every round, alternating (--repeats times
each), evaluations off. The round period is the time between consecutive round records (wallclock:
training, the round's reductions, and the checkpoint's snapshot when there is one), median over
rounds after the first; the cost is (with - without) / without. The checkpoint records also give
the training thread's own part (the snapshot: a copy of each rank's tensors) and the background
writer's seconds per round (its disk time, which the 2 shared cores of the development machine feel
as compute taken from training). Writes OUT/checkpoint_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import compare  # noqa: E402

ROOT = compare.ROOT
MODELS = {
    "demo": ["--config", os.path.join(ROOT, "configs", "demo.yaml"), "--epochs", "6"],
    "resnet101-w64": ["--model", "preact_resnet101", "--width", "64", "--dataset", "synthetic", "--batch-size", "8",
                      "--local-steps", "3", "--epochs", "1"],
}


def periods(run: str):
    from resist_mpi.cli.metrics import read_metrics
    rounds = read_metrics(run, "round")
    walls = [r["wallclock"] for r in rounds]
    return [b - a for a, b in zip(walls[1:], walls[2:])], read_metrics(run, "checkpoint")


def bytes_by_rank(run: str):
    """The bytes each rank wrote for the run's newest checkpoint (its manifest's file sizes)."""
    from resist_mpi.cli import checkpoint as ckpt
    found = ckpt.list_checkpoints(run)
    if not found:
        return None
    manifest = ckpt.load_manifest(found[-1])
    out = [0] * int(manifest["world_size"])
    for name, size in manifest["bytes"].items():
        out[int(name[-8:-3]) if name[-8:-3].isdigit() else 0] += size  # shared.pt: rank 0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench/checkpoint")
    p.add_argument("--np", type=int, default=4)
    p.add_argument("--models", default=",".join(MODELS), type=lambda s: s.split(","))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    result = {"np": args.np, "models": {}}
    for model in args.models:
        runs = {"without": [], "with": []}
        for k in range(args.repeats):
            for mode, extra in (("without", []), ("with", ["--checkpoint-rounds", "1"])):
                out = os.path.join(args.out, model, f"{mode}-{k}")
                runs[mode].append(out)
                if args.report_only or compare.finished(out):
                    continue
                cmd = ["mpirun", "--oversubscribe", "-np", str(args.np), sys.executable, "-m", "resist_mpi.train",
                       *MODELS[model], "--eval-every", "0", "--bn-batches", "1", "--out", out, "--overwrite",
                       "--progress", "off", "--keep-checkpoints", "2", *extra]
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, "bench.log"), "w") as log:
                    rc = compare.run_logged(cmd, log, compare.mpi_env(), args.timeout)
                with open(os.path.join(out, "launch.json"), "w") as fh:
                    json.dump({"returncode": rc, "cmd": cmd}, fh)
                print(f"checkpoint_bench: {model} {mode} #{k}: exit {rc}", flush=True)
        per = {mode: [x for run in paths for x in periods(run)[0]] for mode, paths in runs.items()}
        ckpts = [c for run in runs["with"] for c in periods(run)[1]]
        without, with_ = statistics.median(per["without"]), statistics.median(per["with"])
        snap = statistics.median(c["t_snapshot"] for c in ckpts) if ckpts else None
        write = statistics.median(c["t_write"] for c in ckpts if c.get("t_write") is not None) if ckpts else None
        commit = [c["t_commit"] for c in ckpts if c.get("t_commit") is not None]
        commit = statistics.median(commit) if commit else None
        result["models"][model] = {"round_s_without": without, "round_s_with": with_,
                                   "cost": (with_ - without) / without, "snapshot_s": snap, "commit_s": commit, "write_s": write,
                                   "snapshot_fraction": snap / without if snap is not None else None,
                                   "rounds": {m: len(v) for m, v in per.items()}}
        result["models"][model]["bytes_by_rank"] = bytes_by_rank(runs["with"][-1])
        r = result["models"][model]
        print(f"checkpoint_bench: {model}: round {without:.3f} s without, {with_:.3f} s with a checkpoint every round "
              f"({100 * r['cost']:+.1f}%); snapshot {snap:.4f} s ({100 * r['snapshot_fraction']:.2f}% of a round), "
              f"manifest {commit if commit is None else round(commit, 4)} s, "
              f"background write {write:.3f} s (rank 0); MB written by rank: "
              f"{' '.join(f'{b / 1e6:.1f}' for b in r['bytes_by_rank'] or [])}", flush=True)
    result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                      text=True).stdout.strip()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "checkpoint_bench.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
