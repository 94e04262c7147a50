"""What an evaluation costs against a training round, and how many images BN recalibration needs.

    python benchmarks/eval_bench.py                                  # demo config and width 16, resist + local
                                                                     # SGD, seeds 0,1,2, 4 ranks
    python benchmarks/eval_bench.py --report-only --out runs/bench/eval

1. Trains each (model, strategy, seed) once with the CLI (mpirun -np N), keeping the final
   checkpoint; the run's metrics give the evaluation's phases (gather, calibrate, test, return:
   t_gather ... in the eval records) against the median training round, for the default settings.
2. Re-evaluates every final checkpoint under mpirun with each calibration setting of --settings
   (`images:N`: --bn-images N, from the first partitioned block on; `all:N`: every BN layer;
   `batches:N`: --bn-batches N per rank, every layer, the old default being batches:20): the final
   test accuracy that setting would have given, since an evaluation changes nothing in training.

Prints, per model and strategy, the accuracy of each setting (mean over seeds, and its difference to
the reference setting --reference), and the eval/round time ratio; writes OUT/eval_bench.json.
The smallest setting within 0.3 points of the reference on every model and strategy is the default
(docs/method.md, "Evaluation").
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import compare  # noqa: E402

ROOT = compare.ROOT
MODELS = {"demo": "", "w16": "--width 16"}


def setting_flags(setting: str) -> List[str]:
    kind, _, n = setting.partition(":")
    if kind == "images":
        return ["--bn-images", n, "--bn-batches", "0", "--eval-bn", "recalibrate"]
    if kind == "all":
        return ["--bn-images", n, "--bn-batches", "0", "--eval-bn", "recalibrate_all"]
    if kind == "batches":
        return ["--bn-batches", n, "--eval-bn", "recalibrate_all"]
    raise ValueError(f"--settings: {setting!r} (images:N, all:N or batches:N)")


# -- the evaluation of one checkpoint, on every rank (mpirun -np N python eval_bench.py --evaluate ...) --------
def evaluate_checkpoint(path: str, flags: List[str]) -> None:
    import torch
    from resist_mpi.cli import checkpoint as ckpt
    from resist_mpi import comm
    from resist_mpi.cli.config import Config, validate
    from resist_mpi.data.loader import ShardLoader
    from resist_mpi.data.datasets import load_dataset
    from resist_mpi.models import create_model
    from resist_mpi.cli.trainer import build_strategy, evaluate_full
    manifest, why = ckpt.verify(path)
    if manifest is None:
        raise SystemExit(f"eval_bench: {path}: {why}")
    saved = dict(manifest["config"])
    saved.update(resume=None, overwrite=False)
    cfg = Config(**saved)
    for flag, value in zip(flags[::2], flags[1:][::2]):
        name = flag[2:].replace("-", "_")
        setattr(cfg, name, type(getattr(cfg, name))(value))
    validate(cfg)
    c = comm.init(cfg.backend, device="cpu")
    train, test, info = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    tl = ShardLoader(train, c.rank, c.size, cfg.batch_size, cfg.seed, True)
    vl = ShardLoader(test, c.rank, c.size, max(cfg.batch_size, 256), cfg.seed, False)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, info.num_classes, cfg.width)
    job = build_strategy(cfg, model, c, tl.steps_per_epoch)
    job.load_shards(ckpt.Reader(path, manifest), int(manifest["round"]), int(manifest["world_size"]) == c.size)
    with job.full_model() as full:
        loss, acc, t_cal, t_test = evaluate_full(full, c, cfg, vl, tl, torch.device("cpu"), job.bn_to_recalibrate())
    if c.rank == 0:
        print("RESULT " + json.dumps({"test_acc": acc, "test_loss": loss, "t_calibrate": t_cal, "t_test": t_test}),
              flush=True)


# -- the driver ------------------------------------------------------------------------------------------------
def train_all(args) -> None:
    for model, extra in MODELS.items():
        if model not in args.models:
            continue
        for seed in args.seeds:
            for strategy in args.strategies:
                out = os.path.join(args.out, model, f"{strategy}-{seed}")
                if compare.finished(out):
                    continue
                cmd = ["mpirun", "--oversubscribe", "-np", str(args.np), sys.executable, "-m", "resist_mpi.train",
                       "--config", args.config, "--strategy", strategy, "--seed", str(seed), "--out", out,
                       "--progress", "off", "--overwrite", "--checkpoint-every", "1000", *extra.split(),
                       *args.extra_args.split()]
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, "bench.log"), "w") as log:
                    rc = compare.run_logged(cmd, log, compare.mpi_env(), args.timeout)
                print(f"eval_bench: trained {model} {strategy} seed {seed}: exit {rc}", flush=True)


def evaluate_all(args) -> Dict:
    results = {}
    for run in sorted(glob.glob(os.path.join(args.out, "*", "*-*"))):
        from resist_mpi.cli.checkpoint import list_checkpoints
        ckpts = list_checkpoints(run)
        if not ckpts:
            continue
        cache = os.path.join(run, "eval_bench.json")
        done = json.load(open(cache)) if os.path.isfile(cache) else {}
        for setting in [args.reference] + args.settings:
            if setting in done:
                continue
            cmd = ["mpirun", "--oversubscribe", "-np", str(args.np), sys.executable, os.path.abspath(__file__),
                   "--evaluate", ckpts[-1], "--flags", json.dumps(setting_flags(setting))]
            p = subprocess.run(cmd, cwd=ROOT, env=compare.mpi_env(), capture_output=True, text=True,
                               timeout=args.timeout)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                raise SystemExit(f"eval_bench: evaluating {ckpts[-1]} with {setting} failed:\n{p.stderr[-2000:]}")
            done[setting] = json.loads(line[0][len("RESULT "):])
            json.dump(done, open(cache, "w"), indent=1)
        results[run] = done
    return results


def round_and_eval_times(run: str) -> Dict:
    from resist_mpi.cli.metrics import read_metrics, training_rounds
    recs = read_metrics(run)
    rounds = [r for r in training_rounds(recs) if r["round"] > 0]  # an evaluation's early exchange folded back
    evals = [r for r in recs if r.get("event") == "eval"]
    t_round = statistics.median(r["t_compute"] + r["t_comm"] for r in rounds)
    phases = {k: statistics.median(e[k] for e in evals) for k in ("t_eval", "t_gather", "t_calibrate", "t_test",
                                                                   "t_return") if all(k in e for e in evals)}
    return {"t_round": t_round, **phases, "ratio": phases.get("t_eval", 0) / t_round}


def report(args, results: Dict) -> Dict:
    table = {}
    for run, res in results.items():
        model, name = run.split(os.sep)[-2:]
        strategy = name.rsplit("-", 1)[0]
        row = table.setdefault(f"{model}/{strategy}", {"acc": {}, "times": []})
        for setting, r in res.items():
            row["acc"].setdefault(setting, []).append(r["test_acc"])
        row["times"].append(round_and_eval_times(run))
    print(f"{'model/strategy':18} " + " ".join(f"{s:>12}" for s in [args.reference] + args.settings) +
          "   eval/round (default settings)")
    for key, row in sorted(table.items()):
        ref = statistics.mean(row["acc"][args.reference])
        cells = [f"{100 * ref:11.2f}%"] + [f"{100 * (statistics.mean(row['acc'][s]) - ref):+11.2f}p"
                                            for s in args.settings if s in row["acc"]]
        ratio = statistics.mean(t["ratio"] for t in row["times"])
        t = row["times"][0]
        print(f"{key:18} " + " ".join(cells) + f"   {ratio:.3f} (round {t['t_round']:.2f} s, eval "
              f"{t.get('t_eval', 0):.2f} s: gather {t.get('t_gather', 0):.2f}, calibrate {t.get('t_calibrate', 0):.2f},"
              f" test {t.get('t_test', 0):.2f}, return {t.get('t_return', 0):.3f})")
        row["mean_acc"] = {s: statistics.mean(v) for s, v in row["acc"].items()}
    out = {"reference": args.reference, "settings": args.settings, "np": args.np, "table": table,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()}
    with open(os.path.join(args.out, "eval_bench.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--evaluate", help=argparse.SUPPRESS)
    p.add_argument("--flags", help=argparse.SUPPRESS)
    p.add_argument("--out", default="runs/bench/eval")
    p.add_argument("--np", type=int, default=4)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--models", default="demo,w16", type=lambda s: s.split(","))
    p.add_argument("--strategies", default="resist,local_sgd", type=lambda s: s.split(","))
    p.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--reference", default="batches:20", help="the setting the others are compared with")
    p.add_argument("--settings", default="images:64,images:128,images:256,images:512,images:1024,all:128",
                   type=lambda s: s.split(","))
    p.add_argument("--extra-args", default="")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.evaluate:
        evaluate_checkpoint(args.evaluate, json.loads(args.flags))
        return 0
    if not args.report_only:
        train_all(args)
    report(args, evaluate_all(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
