"""Train ResIST and its baselines on the same data and seeds; compare time-to-accuracy, accuracy, bytes.

    python benchmarks/compare.py                                   # 3 strategies x seeds 0,1,2, 4 ranks, demo config
    python benchmarks/compare.py --epochs 2 --seeds 0 --out runs/bench/compare-quick   # a quick check
    python benchmarks/compare.py --np 2 --extra-args "--width 4 --local-steps 5"
    python benchmarks/compare.py --report-only --out runs/bench/compare                # re-read finished runs
    python benchmarks/compare.py --strategies "resist,resist-int8=resist --wire-dtype int8"  # variants

Each run is one job, started one after another (the runs would otherwise compete for the cores):

    mpirun --oversubscribe -np N python -m resist_mpi.train --config CONFIG --strategy X --seed s \\
        --out OUT/X-s --progress off [--epochs E] [EXTRA ARGS]

Runs are ordered seed by seed, all strategies within a seed, so slow phases of a shared machine
spread over the strategies. Then every OUT/X-s/metrics.jsonl is read and, per strategy, reported:

  time_to_target   wall-clock (the run's own clock, at the evaluation) when test accuracy first
                   reached each --targets value; mean over the seeds that reached it, and how many did
  final_acc        test accuracy of the last evaluation, mean and std over seeds
  bytes            payload bytes sent + received by all ranks in training rounds
  eval_bytes       the same for evaluations (ResIST's gather of the full model, BN statistics), apart,
                   so that neither hides in the other
  step_time        sum over rounds of (t_compute + t_comm), each the max over ranks, / training steps

Writes OUT/compare.json and OUT/compare.png (test accuracy vs wall-clock, seed 0 bold, other seeds faint).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

from resist_mpi.cli.metrics import read_metrics, training_rounds  # noqa: E402


def mpi_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))
    return env


STRATEGIES = ("resist", "local_sgd", "data_parallel")
LABEL = re.compile(r"[A-Za-z0-9_.+-]+")


def parse_strategies(text: str) -> Dict[str, List[str]]:
    """--strategies: comma-separated entries, each a strategy or a variant LABEL=STRATEGY FLAGS...
    (e.g. `resist-int8=resist --wire-dtype int8`). Returns {label: its train flags}, in order; the
    label names the run directories (OUT/LABEL-SEED) and the report's rows."""
    out: Dict[str, List[str]] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        label, _, spec = entry.partition("=")
        label = label.strip()
        words = shlex.split(spec) if spec else [label]
        if not LABEL.fullmatch(label) or label in out:
            raise ValueError(f"--strategies: bad or repeated label {label!r} (letters, digits, _ . + -)")
        if words[0] not in STRATEGIES:
            raise ValueError(f"--strategies: {entry!r}: the strategy must be one of {', '.join(STRATEGIES)}")
        out[label] = ["--strategy", words[0]] + words[1:]
    if not out:
        raise ValueError("--strategies: none given")
    return out


def train_command(args, strategy: str, seed: int, out: str) -> List[str]:
    """The job's command; strategy is a label of args.variants (parse_strategies) or a strategy name.
    A variant's flags come last, so they win over --extra-args."""
    flags = getattr(args, "variants", {}).get(strategy, ["--strategy", strategy])
    cmd = shlex.split(args.mpirun) + ["-np", str(args.np), sys.executable, "-m", "resist_mpi.train",
                                      "--config", args.config, "--seed", str(seed),
                                      "--out", out, "--progress", "off", "--overwrite"]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    return cmd + shlex.split(args.extra_args) + flags


def planned(args, strategy: str, seed: int) -> Tuple[str, List[str]]:
    """(run directory, command) of a run: OUT/strategy-seed, absolute (the job runs from the repo
    root, the bench's own files are written from where it started)."""
    out = os.path.abspath(os.path.join(args.out, f"{strategy}-{seed}"))
    return out, train_command(args, strategy, seed, out)


def run_one(args, strategy: str, seed: int, prefix: Sequence[str] = (), env: Optional[Dict[str, str]] = None,
            tag: str = "compare") -> Dict:
    """Train one run into OUT/strategy-seed, its output in train.log; writes and returns launch.json's dict.

    Args:
        prefix: argv the command runs under (e.g. Cluster.on(): on a node of a simulated cluster).
        env: the launcher's environment (default mpi_env()).
        tag: what the progress lines start with.
    """
    out, cmd = planned(args, strategy, seed)
    os.makedirs(out, exist_ok=True)
    print(f"{tag}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(os.path.join(out, "train.log"), "w") as log:
        returncode = run_logged(list(prefix) + cmd, log, env or mpi_env(), args.timeout)
    elapsed = time.perf_counter() - t0
    launch = {"cmd": cmd, "prefix": list(prefix), "returncode": returncode, "elapsed_s": elapsed}
    with open(os.path.join(out, "launch.json"), "w") as fh:
        json.dump(launch, fh, indent=2)
    tail = open(os.path.join(out, "train.log")).read().strip().splitlines()[-1:] or [""]
    status = "timed out" if returncode is None else f"exit {returncode}"
    print(f"{tag}: {strategy} seed {seed}: {status} in {elapsed:.0f}s | {tail[0]}", flush=True)
    return launch


def run_logged(cmd: List[str], log, env: Dict[str, str], timeout: float) -> Optional[int]:
    """Run cmd from the repo root, output to log; its exit status, or None when it ran past timeout.

    The job gets a session of its own so that a timeout ends mpirun *and* the ranks it started.
    """
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        proc.wait()
        return None


def finished(run_dir: str, cmd: Optional[Sequence[str]] = None) -> bool:
    """Whether run_dir holds a run whose launch.json says it exited 0 (for --skip-existing); with
    cmd, one that ran that command too: a run of other settings in the folder (another --extra-args,
    --epochs, config, np) is not the one asked for, and runs again."""
    launch = os.path.join(run_dir, "launch.json")
    if not os.path.exists(launch):
        return False
    with open(launch) as fh:
        rec = json.load(fh)
    if rec["returncode"] != 0:
        return False
    if cmd is not None and rec.get("cmd") != list(cmd):
        print(f"{os.path.basename(run_dir)}: the run in {run_dir} had other settings: running it again", flush=True)
        return False
    return True


def time_taken_from_training(e: Dict) -> float:
    """Seconds an eval record's evaluation took from training: all of it (t_eval) when training
    waited for it, only the wait (t_eval_wait) when it ran in the background beside the next round."""
    return e.get("t_eval_wait", 0.0) if e.get("background") else e.get("t_eval", 0.0)


def summarise_run(path: str, targets: List[float]) -> Optional[Dict]:
    """Per-run numbers from OUT/X-s/metrics.jsonl (None when the run left no evaluation)."""
    if not os.path.exists(os.path.join(path, "metrics.jsonl")):
        return None
    recs = read_metrics(path)
    evals = [r for r in recs if r.get("event") == "eval"]
    rounds = training_rounds(recs)  # an evaluation's early exchange back in its round
    if not evals or not rounds:
        return None
    steps = rounds[-1]["step"]
    reached = {}
    for t in targets:
        k = next((i for i, e in enumerate(evals) if e["test_acc"] >= t), None)
        if k is None:
            reached[str(t)] = None
            continue
        # training time: the wall-clock at that evaluation less what the evaluations so far took from
        # training (a background one's wallclock is when it started, a delayed one's (--overlap) when
        # its round's average landed: their own time came after)
        hit = evals[k]
        own = 0.0 if hit.get("background") or hit.get("delayed") else hit.get("t_eval", 0.0)
        taken = sum(map(time_taken_from_training, evals[:k])) + own
        reached[str(t)] = {"wallclock": hit["wallclock"], "epoch": hit["epoch"], "train_wallclock": hit["wallclock"] - taken}
    launch = os.path.join(path, "launch.json")
    launched = json.load(open(launch)) if os.path.exists(launch) else None
    return {
        # a run that did not exit 0 (a crash, a timeout: returncode None) is not a finished run
        "failed": launched is not None and launched.get("returncode") != 0,
        "final_acc": evals[-1]["test_acc"], "final_epoch": evals[-1]["epoch"],
        "time_to_target": reached,
        "bytes": sum(r["bytes_sent"] + r["bytes_recv"] for r in rounds),
        "eval_bytes": sum(e["bytes_sent"] + e["bytes_recv"] for e in evals),
        "steps": steps,
        "step_time": sum(r["t_compute"] + r["t_comm"] for r in rounds) / steps,
        "comm_time": sum(r["t_comm"] for r in rounds),
        "eval_time": sum(e.get("t_eval", 0.0) for e in evals),
        "evals": len(evals),
        "wallclock": evals[-1]["wallclock"],
        "launch": launched,
        "curve": [(e["wallclock"], e["test_acc"]) for e in evals],
    }


def mean_std(values: List[float]):
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def finished_runs(by_seed: Dict[int, Optional[Dict]]) -> Dict[int, Dict]:
    """The runs that finished (exited 0, left evaluations): the only ones means are taken over; the
    others count in "of" (a seed that crashed is a seed that did not reach a target)."""
    return {s: r for s, r in by_seed.items() if r is not None and not r.get("failed")}


def aggregate(runs: Dict[str, Dict[int, Dict]], targets: List[float]) -> Dict:
    summary = {}
    for strategy, by_seed in runs.items():
        done = finished_runs(by_seed)
        failed = sorted(s for s in by_seed if s not in done)  # no evaluation, or exited other than 0
        if not done:
            summary[strategy] = {"seeds": [], "failed_seeds": failed}
            continue
        acc_mean, acc_std = mean_std([r["final_acc"] for r in done.values()])
        ttt = {}
        for t in targets:
            hits = [r["time_to_target"][str(t)] for r in done.values() if r["time_to_target"][str(t)]]
            walls = [h["wallclock"] for h in hits]
            train = [h.get("train_wallclock", h["wallclock"]) for h in hits]
            ttt[str(t)] = {"mean_s": mean_std(walls)[0], "std_s": mean_std(walls)[1],
                           "train_mean_s": mean_std(train)[0], "reached": len(hits), "of": len(by_seed)}
        summary[strategy] = {
            "seeds": sorted(done), "failed_seeds": failed, "final_acc_mean": acc_mean, "final_acc_std": acc_std,
            "time_to_target": ttt,
            "bytes_mean": statistics.fmean(r["bytes"] for r in done.values()),
            "eval_bytes_mean": statistics.fmean(r["eval_bytes"] for r in done.values()),
            "step_time_mean_s": statistics.fmean(r["step_time"] for r in done.values()),
            "wallclock_mean_s": statistics.fmean(r["wallclock"] for r in done.values()),
            "eval_time_mean_s": statistics.fmean(r.get("eval_time", 0.0) for r in done.values()),
            "eval_time_per_eval_s": statistics.fmean(r.get("eval_time", 0.0) / max(1, r.get("evals", 1))
                                                     for r in done.values()),
        }
    return summary


def format_table(summary: Dict, targets: List[float]) -> str:
    head = f"{'strategy':>14} | {'seeds':>5} | {'final acc':>15} | " + " | ".join(
        f"{'t@' + format(t, '.0%'):>12}" for t in targets) + \
        f" | {'bytes (train)':>13} | {'bytes (eval)':>13} | {'step':>8} | {'wall':>7}"
    lines = [head, "-" * len(head)]
    for strategy, s in summary.items():
        if not s.get("seeds"):
            lines.append(f"{strategy:>14} | {0:>5} | (no finished run)")
            continue
        cells = []
        for t in targets:
            d = s["time_to_target"][str(t)]
            cells.append(f"{d['mean_s']:7.1f}s {d['reached']}/{d['of']}" if d["reached"] else f"{'-':>8} 0/{d['of']}")
        lines.append(f"{strategy:>14} | {len(s['seeds']):>5} | "
                     f"{100 * s['final_acc_mean']:6.2f}% ± {100 * s['final_acc_std']:4.2f} | "
                     + " | ".join(f"{c:>12}" for c in cells)
                     + f" | {s['bytes_mean'] / 1e6:10.1f} MB | {s['eval_bytes_mean'] / 1e6:10.1f} MB"
                     f" | {1e3 * s['step_time_mean_s']:6.1f}ms | "
                     f"{s['wallclock_mean_s']:6.1f}s")
    return "\n".join(lines)


def plot(runs: Dict[str, Dict[int, Dict]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (strategy, by_seed) in enumerate(runs.items()):
        color = f"C{i}"
        for seed, r in sorted(by_seed.items()):
            if r is None:
                continue
            xs, ys = zip(*r["curve"])
            first = seed == min(s for s, v in by_seed.items() if v is not None)
            ax.plot(xs, ys, color=color, marker="o" if first else None, ms=3,
                    lw=2 if first else 0.8, alpha=1.0 if first else 0.35,
                    label=f"{strategy} (seed {seed})" if first else None)
    ax.set_xlabel("wall-clock (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_run_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """--timeout, --skip-existing, --report-only, --json, --plot: shared with cluster_bench.py."""
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run (default: %(default)s)")
    p.add_argument("--skip-existing", action="store_true",
                   help="do not rerun runs whose launch.json says they ran the same command and exited 0")
    p.add_argument("--report-only", action="store_true", help="only read the runs already in --out")
    p.add_argument("--json", help=f"results file (default: OUT/{name}.json)")
    p.add_argument("--plot", help=f"figure (default: OUT/{name}.png)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default="resist,local_sgd,data_parallel",
                   help="strategies or variants LABEL=STRATEGY FLAGS, comma-separated (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="(default: %(default)s)")
    p.add_argument("--np", type=int, default=4, help="ranks per run (default: %(default)s)")
    p.add_argument("--config", default="configs/demo.yaml", help="training config (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=0, help="override the config's epochs (0: keep)")
    p.add_argument("--extra-args", default="", help="more resist_mpi.train flags, one string")
    p.add_argument("--targets", default="0.9,0.95,0.97", help="test-accuracy targets (default: %(default)s)")
    p.add_argument("--out", default="runs/bench/compare", help="run directories and results (default: %(default)s)")
    p.add_argument("--mpirun", default="mpirun --oversubscribe", help="launcher (default: %(default)s)")
    add_run_arguments(p, "compare")
    args = p.parse_args(argv)
    try:
        args.variants = parse_strategies(args.strategies)
    except ValueError as e:
        p.error(str(e))
    strategies = list(args.variants)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    os.makedirs(args.out, exist_ok=True)

    if not args.report_only:
        for seed in seeds:
            for strategy in strategies:
                if args.skip_existing and finished(*planned(args, strategy, seed)):
                    continue
                run_one(args, strategy, seed)

    runs = {s: {seed: summarise_run(os.path.join(args.out, f"{s}-{seed}"), targets) for seed in seeds}
            for s in strategies}
    summary = aggregate(runs, targets)
    print(format_table(summary, targets), flush=True)
    result = {"benchmark": "compare", "argv": sys.argv, "np": args.np, "config": args.config,
              "epochs": args.epochs or None, "extra_args": args.extra_args, "seeds": seeds,
              "targets": targets, "summary": summary,
              "runs": {s: {str(seed): r for seed, r in by.items()} for s, by in runs.items()}}
    path = args.json or os.path.join(args.out, "compare.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    if any(r for by in runs.values() for r in by.values()):
        png = args.plot or os.path.join(args.out, "compare.png")
        plot(runs, png, f"{args.np} ranks, {os.path.basename(args.config)}, seeds {args.seeds}")
        print(f"compare: wrote {path} and {png}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
