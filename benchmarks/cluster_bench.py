"""The three strategies on a simulated multi-node cluster at a sweep of link rates.

    python benchmarks/cluster_bench.py                                   # 4 nodes, 3 strategies x seeds 0,1,2,
                                                                         # unshaped,1gbit,100mbit,auto; demo config
    python benchmarks/cluster_bench.py --rates 20mbit,10mbit --out runs/bench/cluster-slow   # "at least half"
    python benchmarks/cluster_bench.py --report-only --out runs/bench/cluster                # re-read finished runs
    python benchmarks/cluster_bench.py --extra-args "--epochs 2 --model preact_resnet34 --width 4" \\
        --rates unshaped,50mbit --seeds 0 --out runs/bench/cluster-smoke                         # a quick check
    python benchmarks/cluster_bench.py --ranks-per-node 4 --baseline hlsgd --goals resist-node:0.6 \
        --strategies "resist-node=resist --group-size node,resist,hlsgd=local_sgd --group-size node"  # groups

--strategies takes variants, LABEL=STRATEGY FLAGS (compare.parse_strategies); --baseline names the
one that times are relative to and that `auto` probes, --goals the time-to-97% ratios to check.

Needs root and iproute2: one cluster of resist_mpi.cluster (namespaces <prefix>node0.., default
prefix rcb-) comes up once and is torn down at the end, also on errors and SIGTERM. Its links are
reshaped with set_rate between runs; runs go one after another (never two at once: they would
compete for the cores). Each run is the training CLI across the nodes, started on node0:

    mpirun -H node0:K,node1:K,... --mca btl tcp,self -np N*K python -m resist_mpi.train \\
        --config CONFIG --strategy X --seed s --out OUT/<rate>/X-s --progress off --overwrite [EXTRA]

with the kernel's byte counters of every node's interface read before and after (OUT/<rate>/X-s/kernel.json).

Rates: `unshaped` (veth at CPU copy speed), any tc rate (`1gbit`, `100mbit`, `20mbit`, ...) and
`auto`: the rate at which local SGD spends half its round time communicating. auto runs short
local-SGD probes (--probe-epochs) at --probe-rates into OUT/probes/<rate>/, puts the line
comm/compute = A + B / rate through the two probes around 1 and solves comm/compute = 1
(cluster_report.fit_half_rate); then one more probe at that rate checks it and joins the fit, which
is saved in OUT/auto_rate.json (--report-only reads it). Machine load moves compute times by tens
of percent, so the sweep's local SGD lands near, not at, 0.5: the table and figure use its own.

Reported per strategy and rate (cluster_report.py): time to each --targets accuracy (mean over the
seeds that reached it, how many did) and relative to local SGD at the same rate; final accuracy
mean ± std; median t_compute and t_comm per round and the comm fraction; bytes sent per round by
the package (summed over ranks) and by the kernel (tx summed over nodes, all traffic of the job /
rounds), and their ratio over the whole job. Each shaped rate is mapped to the rate beside the
published GPUs with the same communication-to-compute ratio for local SGD (gpu_scale.py).

Writes OUT/cluster_bench.json (everything, with command lines, rates, probes and git commit),
OUT/cluster_bench.png (time to target relative to local SGD against local SGD's comm fraction) and
OUT/cluster_bench_rounds.png (per rate and strategy: compute, exposed and hidden communication per
round). Times to target are given with and without what the evaluations took from training
(t_eval; for one in the background, the default across nodes, only t_eval_wait).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # run from a checkout: the package, compare, cluster_report

import compare  # noqa: E402
import cluster_report as report  # noqa: E402
import gpu_scale  # noqa: E402
from resist_mpi.tools.cluster import Cluster, ClusterError, parse_rate, why_unavailable  # noqa: E402

ROOT = compare.ROOT
AUTO_FILE = "auto_rate.json"  # the fit that resolved `auto`, with its probes


# -- running jobs on the cluster -------------------------------------------------------------------------------
def job_args(args, out: str, extra_args: str) -> SimpleNamespace:
    """What compare.train_command / run_one read, for a job across the nodes into out/<strategy>-<seed>."""
    hosts = ",".join(f"node{k}:{args.ranks_per_node}" for k in range(args.nodes))
    return SimpleNamespace(mpirun=f"mpirun -H {hosts} --mca btl tcp,self", np=args.nodes * args.ranks_per_node,
                           config=args.config, epochs=0, extra_args=extra_args, out=out, timeout=args.timeout,
                           variants=args.variants)


def run_job(cl: Cluster, jargs: SimpleNamespace, strategy: str, seed: int) -> Dict:
    """One training job on the cluster (compare.run_one on node0), with the nodes' kernel counters
    around it written to kernel.json beside the run's metrics."""
    before = cl.counters()
    launch = compare.run_one(jargs, strategy, seed, prefix=cl.on("node0"), env=cl.env(compare.mpi_env()),
                             tag="cluster_bench")
    after = cl.counters()
    if launch["returncode"] != 0:
        cl.kill()  # a failed or timed-out job's ranks on other nodes, should any outlive mpirun
    kernel = {"rate": cl.rate, "shaping": cl.shaping(),
              "tx_bytes": {h: after[h]["tx_bytes"] - before[h]["tx_bytes"] for h in cl.hosts},
              "rx_bytes": {h: after[h]["rx_bytes"] - before[h]["rx_bytes"] for h in cl.hosts}}
    with open(os.path.join(jargs.out, f"{strategy}-{seed}", "kernel.json"), "w") as fh:
        json.dump(kernel, fh, indent=2)
    return launch


# -- the half-communication rate ------------------------------------------------------------------------------------
def probe_args(args, rate: str) -> SimpleNamespace:
    extra = f"{args.extra_args} --epochs {args.probe_epochs} --eval-every 0"  # later flags win
    return job_args(args, os.path.join(args.out, "probes", rate), extra)


def read_probes(out: str, seed: int, baseline: str = report.BASELINE, args=None) -> List[Dict]:
    """Every probe in out/probes/<rate>/<baseline>-<seed>, slowest rate first; with args, those
    that ran the command these args give (a probe of other settings, an earlier bench into the same
    OUT, would join the fit otherwise)."""
    root = os.path.join(out, "probes")
    found = []
    for rate in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, rate, f"{baseline}-{seed}")
        launch = _launch(path)
        if args is not None and launch is not None and launch.get("cmd") != compare.planned(probe_args(args, rate),
                                                                                          baseline, seed)[1]:
            print(f"cluster_bench: probe {rate} left out of the fit: it ran other settings ({path})", flush=True)
            continue
        p = report.probe_summary(path, rate)
        if p is not None:
            found.append(p)
    return sorted(found, key=lambda p: p["rate_bits"] or float("inf"))


def find_half_rate(cl: Optional[Cluster], args, seed: int) -> Dict:
    """Probe local SGD at --probe-rates, fit, probe once more at the fitted rate, refit (cluster None:
    only read the probes already in OUT). Returns the fit with the probes it used."""
    if cl is not None:
        for rate in args.probe_rates:
            _probe(cl, args, rate, seed)
        first = report.fit_half_rate(read_probes(args.out, seed, args.baseline, args))
        if first["label"] and args.probe_confirm:
            _probe(cl, args, first["label"], seed)
    probes = read_probes(args.out, seed, args.baseline, args)
    fit = report.fit_half_rate(probes)
    fit["probes"] = probes
    for p in fit["probes"]:
        print(f"cluster_bench: probe {p['rate']:>9}: {args.baseline} t_comm {p['t_comm_s']:.2f} s, t_compute "
              f"{p['t_compute_s']:.2f} s, comm fraction {p['comm_fraction']:.2f} ({p['rounds']} rounds)", flush=True)
    print(f"cluster_bench: half-communication rate: {fit['label'] or 'none (' + str(fit['why']) + ')'}", flush=True)
    return fit


def _probe(cl: Cluster, args, rate: str, seed: int) -> None:
    jargs = probe_args(args, rate)
    if args.skip_existing and compare.finished(*compare.planned(jargs, args.baseline, seed)):
        return
    cl.set_rate(rate)
    run_job(cl, jargs, args.baseline, seed)


# -- the sweep ---------------------------------------------------------------------------------------------------
def run_sweep(cl: Cluster, args, rates: List[str]) -> None:
    """Every rate, seed and strategy, in that nesting (a strategy's seeds spread over the run's time)."""
    for rate in rates:
        cl.set_rate(rate)
        print(f"cluster_bench: links {rate}", flush=True)
        jargs = job_args(args, os.path.join(args.out, rate), args.extra_args)
        for seed in args.seeds:
            for strategy in args.strategies:
                if args.skip_existing and compare.finished(*compare.planned(jargs, strategy, seed)):
                    continue
                run_job(cl, jargs, strategy, seed)


def resolve_rates(requested: List[str], fit: Optional[Dict]) -> List[Dict]:
    """[{"label", "requested", "bits"}]: `auto` becomes the fitted rate's label, `auto/K` that rate
    divided by K (left out if there is no fit)."""
    out = []
    for r in requested:
        if r == "auto" or r.startswith("auto/"):
            bits = (fit or {}).get("rate_bits")
            if not bits:
                continue
            label = (fit or {}).get("label") if r == "auto" else report.rate_label(bits / float(r.split("/", 1)[1]))
        else:
            label = r
        if label:
            out.append({"label": label, "requested": r, "bits": parse_rate(label)})
    return out


def collect(args, rates: List[Dict]) -> Dict:
    """The analysis of every run in OUT (cluster_report), as written to cluster_bench.json."""
    runs, summary, mapping, commands = {}, {}, {}, {}
    for r in rates:
        rate = r["label"]
        runs[rate] = {s: {seed: report.summarise_run(os.path.join(args.out, rate, f"{s}-{seed}"), args.targets)
                          for seed in args.seeds} for s in args.strategies}
        summary[rate] = report.aggregate_rate(runs[rate], args.targets, args.baseline)
        done = [run for run in runs[rate].get(args.baseline, {}).values() if run]
        if done and args.baseline in summary[rate]:
            mapping[rate] = report.gpu_mapping(rate, summary[rate][args.baseline], done[0].get("model"),
                                               args.gpu_step_ms / 1e3)
        commands[rate] = {s: {str(seed): _launch(os.path.join(args.out, rate, f"{s}-{seed}")) for seed in args.seeds}
                          for s in args.strategies}
    return {"runs": runs, "summary": summary, "gpu_mapping": mapping, "commands": commands}


def _launch(run_dir: str) -> Optional[Dict]:
    """launch.json of a run (command line, prefix, exit status), also of a failed run; None if never started."""
    path = os.path.join(run_dir, "launch.json")
    return json.load(open(path)) if os.path.exists(path) else None


def _time_to_97(by_strategy: Dict, label: str) -> Optional[float]:
    return by_strategy.get(label, {}).get("time_to_target", {}).get("0.97", {}).get("mean_s")


def _seeds_at_97(by_strategy: Dict, label: str) -> Tuple[int, int]:
    """(seeds that reached 97%, seeds run) of label."""
    t = by_strategy.get(label, {}).get("time_to_target", {}).get("0.97", {})
    return t.get("reached", 0), t.get("of", 0)


def _ratio(rel: float, ratio: float) -> str:
    """rel with 2 decimals, or as many more as it takes to show it on the verdict's side of ratio
    (0.5004 against 0.5: "0.5004x", not a "0.50x" beside "NOT met")."""
    for digits in range(2, 7):
        if (float(f"{rel:.{digits}f}") <= ratio) == (rel <= ratio):
            break
    return f"{rel:.{digits}f}x"


def _judged(by: Dict, label: str, other: str, rel: float, ratio: float) -> str:
    """"met" or "NOT met", with each side's seeds; judged only where every seed of both reached 97%
    (a mean over the seeds that did would favour the side that rarely gets there)."""
    (k, n), (kb, nb) = _seeds_at_97(by, label), _seeds_at_97(by, other)
    if k < n or kb < nb or not n:
        return f"not judged: 97% on {k}/{n} seeds, {other} {kb}/{nb}"
    return "met" if rel <= ratio else "NOT met"


def verdicts(summary: Dict, mapping: Dict, targets: List[float], baseline: str = report.BASELINE,
             goals: Optional[Dict[str, float]] = None, best_of: Sequence[str] = (),
             best_goals: Optional[Dict[str, float]] = None,
             round_goals: Optional[Dict[str, float]] = None) -> List[str]:
    """Lines saying what each shaped rate stands for beside GPUs, and each goal where it applies (the
    baseline spends at least half its time communicating): a `goals` strategy reaches 97% in at most
    RATIO x the baseline's time (default: resist, 0.5, local SGD); a `best_goals` one in at most RATIO x
    the fastest to 97% of the `best_of` strategies; a `round_goals` one has a median round (compute and
    exposed communication) of at most RATIO x its compute."""
    goals = {"resist": 0.5} if goals is None else goals
    lines = []
    for rate, by in summary.items():
        frac = by.get(baseline, {}).get("comm_fraction")
        m = mapping.get(rate)
        if m:
            lines.append(f"{rate} here ({baseline} {100 * frac:.0f}% communicating, "
                         f"{1e3 * m['here_step_s']:.0f} ms compute/step, l={m['here_local_steps']}) stands for "
                         f">= {gpu_scale.format_rate(m['gpu_equivalent_bits'])} for ResNet-101 w64 on the "
                         f"published GPUs ({1e3 * m['gpu_step_s']:.1f} ms/step, l={m['gpu_local_steps']}): "
                         f"x{m['factor']:.0f}")
        if frac is None or frac < 0.5 or 0.97 not in targets:
            continue
        where = f"target at {rate} ({baseline} {100 * frac:.0f}% communicating)"
        for label, ratio in goals.items():
            rel = by.get(label, {}).get("relative_time_to_target", {}).get("0.97")
            verdict = ("no run reached 97%" if rel is None
                       else f"{_ratio(rel, ratio)} {baseline}'s ({_judged(by, label, baseline, rel, ratio)})")
            lines.append(f"{where}: {label}'s time to 97% <= {ratio:g}x {baseline}'s: {verdict}")
        # the best baseline: the fastest of those that reached 97% on every seed
        reached = {b: t for b in best_of if (t := _time_to_97(by, b)) is not None
                   and _seeds_at_97(by, b)[0] == _seeds_at_97(by, b)[1]}
        best = min(reached, key=reached.get) if reached else None
        for label, ratio in (best_goals or {}).items():
            rel = report.relative_times(by, label, [0.97], best)["0.97"] if best else None
            if rel is None:
                verdict = ("no baseline reached 97% on every seed" if best is None
                           else f"no run of {label} reached 97%")
            else:
                verdict = f"{_ratio(rel, ratio)} {best}'s ({_judged(by, label, best, rel, ratio)})"
            lines.append(f"{where}: {label}'s time to 97% <= {ratio:g}x the best of {', '.join(best_of)}: {verdict}")
        for label, ratio in (round_goals or {}).items():
            rel = by.get(label, {}).get("round_over_compute")
            verdict = ("no round" if rel is None
                       else f"{_ratio(rel, ratio)} ({'met' if rel <= ratio else 'NOT met'})")
            lines.append(f"{where}: {label}'s round <= {ratio:g}x its compute: {verdict}")
    return lines


def parse_goals(text: str) -> Dict[str, float]:
    """--goals LABEL:RATIO,...: {label: ratio}."""
    out = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        label, sep, ratio = entry.rpartition(":")
        try:
            out[label] = float(ratio)
        except ValueError:
            raise ValueError(f"--goals: {entry!r} is not LABEL:RATIO") from None
        if not sep or not label:
            raise ValueError(f"--goals: {entry!r} is not LABEL:RATIO")
    return out


def git_commit() -> Optional[str]:
    p = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=ROOT,
                       capture_output=True, text=True)
    return p.stdout.strip() or None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=4, help="simulated nodes (default: %(default)s)")
    p.add_argument("--ranks-per-node", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--strategies", default="resist,local_sgd,data_parallel",
                   help="strategies or variants LABEL=STRATEGY FLAGS, comma-separated (compare.py) "
                        "(default: %(default)s)")
    p.add_argument("--baseline", default=report.BASELINE, help="the label times are relative to, whose "
                   "comm fraction the rates and `auto` refer to (default: %(default)s)")
    p.add_argument("--goals", default="resist:0.5", help="LABEL:RATIO,...: check LABEL's time to 97%% "
                   "<= RATIO x the baseline's where it communicates half the time (default: %(default)s)")
    p.add_argument("--best-of", default="", help="LABELS: the baselines whose fastest to 97%% --best-goals "
                   "compares with (default: none)")
    p.add_argument("--best-goals", default="", help="LABEL:RATIO,...: check LABEL's time to 97%% <= RATIO x "
                   "the fastest of --best-of (default: none)")
    p.add_argument("--round-goals", default="", help="LABEL:RATIO,...: check LABEL's median round <= RATIO x "
                   "its compute (default: none)")
    p.add_argument("--seeds", default="0,1,2", help="(default: %(default)s)")
    p.add_argument("--rates", default="unshaped,1gbit,100mbit,auto", help="link rates, tc syntax, `unshaped` or "
                   "`auto` (local SGD half the time communicating) (default: %(default)s)")
    p.add_argument("--config", default="configs/demo.yaml", help="training config (default: %(default)s)")
    p.add_argument("--extra-args", default="", help="more resist_mpi.train flags, one string")
    p.add_argument("--targets", default="0.9,0.95,0.97", help="test-accuracy targets (default: %(default)s)")
    p.add_argument("--probe-rates", default="100mbit,25mbit",
                   help="auto: local-SGD probes at these rates first (default: %(default)s)")
    p.add_argument("--probe-epochs", type=int, default=4, help="auto: epochs of each probe (default: %(default)s)")
    p.add_argument("--probe-confirm", action=argparse.BooleanOptionalAction, default=True,
                   help="auto: one more probe at the fitted rate, joining the fit (default: on)")
    p.add_argument("--gpu-step-ms", type=float, default=1e3 * gpu_scale.published_step_s(),
                   help="GPU step time of ResNet-101 w64, batch 128, for the rate mapping (default: the "
                        "published upper bound, %(default).1f)")
    p.add_argument("--out", default="runs/bench/cluster", help="run directories and results (default: %(default)s)")
    p.add_argument("--prefix", default="rcb-", help="namespace prefix of the cluster (default: %(default)s)")
    p.add_argument("--subnet", default="10.79.0", help="the cluster's private /24 (default: %(default)s)")
    compare.add_run_arguments(p, "cluster_bench")
    args = p.parse_args(argv)
    try:
        args.variants = compare.parse_strategies(args.strategies)
        args.goals = parse_goals(args.goals)
        args.best_goals = parse_goals(args.best_goals)
        args.round_goals = parse_goals(args.round_goals)
    except ValueError as e:
        p.error(str(e))
    args.strategies = list(args.variants)
    if args.baseline not in args.variants:
        p.error(f"--baseline {args.baseline} is not one of --strategies ({', '.join(args.variants)})")
    args.best_of = [b.strip() for b in args.best_of.split(",") if b.strip()]
    for label in args.best_of + list(args.best_goals) + list(args.round_goals):
        if label not in args.variants:
            p.error(f"{label} is not one of --strategies ({', '.join(args.variants)})")
    if args.best_goals and not args.best_of:
        p.error("--best-goals needs --best-of")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.targets = [float(t) for t in args.targets.split(",") if t.strip()]
    args.rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    args.probe_rates = [r.strip() for r in args.probe_rates.split(",") if r.strip()]
    for r in args.probe_rates + [r for r in args.rates if not r.startswith("auto")]:
        parse_rate(r)  # a typo fails here, not after an hour of runs
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ClusterError as e:
        print(f"cluster_bench: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    fit = None
    if not args.report_only:
        reason = why_unavailable()
        if reason:
            print(f"cluster_bench: error: {reason}", file=sys.stderr)
            return 2
        profile = {k: v for k, v in compare.mpi_env().items() if k in ("OMP_NUM_THREADS", "PYTHONUNBUFFERED")}
        try:
            with Cluster(nodes=args.nodes, prefix=args.prefix, subnet=args.subnet, profile=profile) as cl:
                if any(r.startswith("auto") for r in args.rates):
                    fit = find_half_rate(cl, args, args.seeds[0])
                    with open(os.path.join(args.out, AUTO_FILE), "w") as fh:
                        json.dump(fit, fh, indent=2)  # --report-only reads the rate the runs used
                run_sweep(cl, args, [r["label"] for r in resolve_rates(args.rates, fit)])
        except ClusterError as e:  # e.g. a cluster of this prefix left by a killed run: one line, the way out
            print(f"cluster_bench: error: {e}", file=sys.stderr)
            return 2
    elif any(r.startswith("auto") for r in args.rates):
        saved = os.path.join(args.out, AUTO_FILE)
        fit = json.load(open(saved)) if os.path.exists(saved) else find_half_rate(None, args, args.seeds[0])
    rates = resolve_rates(args.rates, fit)
    result = collect(args, rates)
    print(report.format_table(result["summary"], args.targets), flush=True)
    for line in verdicts(result["summary"], result["gpu_mapping"], args.targets, args.baseline, args.goals,
                         args.best_of, args.best_goals, args.round_goals):
        print(f"cluster_bench: {line}", flush=True)
    path = args.json or os.path.join(args.out, "cluster_bench.json")
    with open(path, "w") as fh:
        json.dump({"benchmark": "cluster_bench", "argv": sys.argv, "git_commit": git_commit(),
                   "nodes": args.nodes, "ranks_per_node": args.ranks_per_node, "config": args.config,
                   "extra_args": args.extra_args, "strategies": args.strategies, "variants": args.variants,
                   "baseline": args.baseline, "goals": args.goals, "best_of": args.best_of,
                   "best_goals": args.best_goals, "round_goals": args.round_goals, "seeds": args.seeds,
                   "targets": args.targets, "rates": rates, "half_rate_fit": fit,
                   "published_gpu": {**gpu_scale.PUBLISHED, "step_s_used": args.gpu_step_ms / 1e3},
                   **result}, fh, indent=2)
    png = args.plot or os.path.join(args.out, "cluster_bench.png")
    title = (f"{args.nodes} nodes x {args.ranks_per_node}, {os.path.basename(args.config)} {args.extra_args}, "
             f"seeds {','.join(map(str, args.seeds))}")
    drawn = report.plot(result["summary"], sorted(args.targets, reverse=True)[:2], png, title, args.baseline,
                        args.goals)
    rounds_png = png[:-len(".png")] + "_rounds.png" if png.endswith(".png") else png + "_rounds.png"
    report.plot_round_times(result["summary"], rounds_png, title)
    print(f"cluster_bench: wrote {path}, {rounds_png}" + (f" and {png}" if drawn else " (no figure: no rate has "
                                                          "local SGD and a strategy reaching a target)"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
