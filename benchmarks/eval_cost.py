"""What an evaluation costs a run, from finished runs: the same training with evaluations every epoch
and with the final one only.

    python benchmarks/eval_cost.py --every runs/a/resist-0,runs/a/resist-1 --label new \\
        --none runs/a/resist-noeval-0,runs/a/resist-noeval-1 --every runs/b/resist-0 --label old --none "" \\
        --json benchmarks/results/eval_cost_cluster.json

Groups of runs: each --every (run directories with evaluations, comma-separated) with the --label
and --none given after it (in order; --none "" for a group without). Per run with evaluations:
the median training round (compute + communication, an evaluation's early exchange folded back in:
resist_mpi.cli.metrics.training_rounds), the median evaluation (`t_eval`) and its phases over every
evaluation but the last (which no round follows), and their ratio. Where the group has a run
without evaluations of the same seed (--none, matched by the seed at the end of the directory
name), also the net cost of one evaluation: the difference of the two
runs' wall-clock times at their final evaluation over the difference of their evaluation counts
(training is the same bit for bit, so the difference is what the evaluations cost the run,
including what they save the rounds after them), and its ratio to the median round. Runs with
--eval-background: "eval" and its phases ran beside training; "wait" (t_eval_wait) is what
training waited for them, and the net cost is what they cost the run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from resist_mpi.cli.metrics import read_metrics, training_rounds  # noqa: E402

PHASES = ("t_gather", "t_calibrate", "t_test", "t_return", "t_next_exchange", "t_eval_wait")


def seed_of(path: str) -> Optional[str]:
    found = re.search(r"-(\d+)$", os.path.basename(os.path.normpath(path)))
    return found.group(1) if found else None


def run_numbers(path: str) -> Dict:
    recs = read_metrics(path)
    rounds = [r for r in training_rounds(recs) if r["round"] > 0]  # round 0 deals every block from rank 0
    evals = [r for r in recs if r.get("event") == "eval"]
    if not rounds or not evals:
        raise SystemExit(f"eval_cost: {path} has no round or no eval records")
    t_round = statistics.median(r["t_compute"] + r["t_comm"] for r in rounds)
    phases = {k: statistics.median(e.get(k, 0.0) for e in evals[:-1] or evals) for k in ("t_eval",) + PHASES}
    return {"path": path, "evals": len(evals), "wallclock": evals[-1]["wallclock"], "final_acc": evals[-1]["test_acc"],
            "t_round": t_round, **phases, "eval_over_round": phases["t_eval"] / t_round}


def summarise(every: List[Dict], none: Dict[str, Dict]) -> Dict:
    for run in every:
        base = none.get(seed_of(run["path"]))
        if base is not None and run["evals"] > base["evals"]:
            run["net_eval_s"] = (run["wallclock"] - base["wallclock"]) / (run["evals"] - base["evals"])
            run["net_over_round"] = run["net_eval_s"] / run["t_round"]
            run["same_final_acc"] = run["final_acc"] == base["final_acc"]
    keys = ["t_round", "t_eval", *PHASES, "eval_over_round", "net_eval_s", "net_over_round", "final_acc"]
    return {k: statistics.fmean(r[k] for r in every) for k in keys if all(k in r for r in every)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", action="append", default=[], help="run directories with evaluations, comma-separated")
    p.add_argument("--label", action="append", default=[], help="the name of the group of the --every before it")
    p.add_argument("--none", action="append", default=[],
                   help="the group's run directories of the same seeds without evaluations, comma-separated")
    p.add_argument("--json", help="results file")
    args = p.parse_args(argv)
    groups = {}
    for k, dirs in enumerate(args.every):
        label = args.label[k] if k < len(args.label) else f"group{k}"
        runs = [run_numbers(d) for d in dirs.split(",") if d]
        none = {seed_of(d): run_numbers(d) for d in (args.none[k] if k < len(args.none) else "").split(",") if d}
        groups[label] = {"runs": runs, "none": list(none.values()), "mean": summarise(runs, none)}
    print(f"{'group':10} {'runs':>4} {'round':>7} {'eval':>7} {'gather':>7} {'calib':>7} {'test':>6} {'early':>6} "
          f"{'wait':>6} {'eval/round':>10} {'net eval':>8} {'net/round':>9} {'final acc':>9}")
    for label, g in groups.items():
        m = g["mean"]
        net = f"{m['net_eval_s']:7.2f}s {m['net_over_round']:9.3f}" if "net_eval_s" in m else f"{'-':>8} {'-':>9}"
        print(f"{label:10} {len(g['runs']):4d} {m['t_round']:6.2f}s {m['t_eval']:6.2f}s {m['t_gather']:6.2f}s "
              f"{m['t_calibrate']:6.2f}s {m['t_test']:5.2f}s {m['t_next_exchange']:5.2f}s {m['t_eval_wait']:5.2f}s "
              f"{m['eval_over_round']:10.3f} "
              f"{net} {100 * m['final_acc']:8.2f}%")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"benchmark": "eval_cost", "argv": sys.argv[1:] if argv is None else argv, "groups": groups},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
