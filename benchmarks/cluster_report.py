"""cluster_bench's analysis: finished runs -> per strategy and link rate numbers, the half-communication
rate from probes, the GPU-equivalent rates, the table and the figure. No cluster, no MPI: unit-tested
on fabricated runs (tests/unit/test_cluster_bench.py).

Per run (OUT/<rate>/<strategy>-<seed>): compare.summarise_run's numbers (time to each target,
final accuracy, bytes) plus, from the round records, the medians over rounds of t_compute, t_comm
(each already the max over ranks) and of the communication fraction t_comm / (t_comm + t_compute);
the package's bytes per round (bytes_sent summed over ranks); and from kernel.json the kernel's
tx bytes of every node's interface around the job (start-up, rounds, evaluations: all of it).
"""
from __future__ import annotations

import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence

import compare
import gpu_scale
from resist_mpi.tools.cluster import parse_rate
from resist_mpi.cli.metrics import read_metrics, training_rounds

BASELINE = "local_sgd"


# -- link rates -----------------------------------------------------------------------------------------
def rate_label(bits: float) -> str:
    """A rate as resist_mpi.cluster takes it, to 3 significant digits: 23_412_000 -> '23.4mbit'."""
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale or unit == "kbit":
            value = bits / scale
            decimals = max(0, 2 - int(math.floor(math.log10(value)))) if value > 0 else 0
            text = f"{value:.{decimals}f}"
            text = text.rstrip("0").rstrip(".") if "." in text else text
            return text + unit
    raise AssertionError("unreachable")


def fit_half_rate(probes: Sequence[Dict]) -> Dict:
    """The link rate at which local SGD's communication fraction is 0.5.

    A probe's fraction f (median over its rounds of t_comm / (t_comm + t_compute)) gives its
    communication-to-compute ratio f / (1 - f), which is 1 at fraction 0.5. With compute time
    independent of the rate and communication time a + b / R (latency and per-call costs, bits
    over the link), the ratio is linear in 1 / R: ratio(R) = A + B / R. The line goes through the two
    probes nearest ratio 1: the two that bracket it, or the two closest when all lie on one side.
    Local, because at very low rates TCP behind a small tbf queue does worse than 1 / R, so one line
    through far probes misses. Then ratio(R) = 1 at R = B / (1 - A).

    Args:
        probes: dicts with rate (label), rate_bits (None for unshaped: not used) and comm_fraction.
    Returns:
        {"A", "B_bit_s", "used" (the two rates), "rate_bits" and "label" (None when no rate gives
        0.5), "why"}.
    """
    by_rate = {p["rate_bits"]: p for p in probes if p.get("rate_bits")}  # one probe per rate
    shaped = [by_rate[r] for r in sorted(by_rate, reverse=True)]  # fastest link first: 1/R ascending
    if len(shaped) < 2:
        return {"rate_bits": None, "label": None, "why": "needs probes at two different shaped rates"}
    ratio = {id(p): p["comm_fraction"] / max(1.0 - p["comm_fraction"], 1e-9) for p in shaped}
    below = [p for p in shaped if ratio[id(p)] < 1.0]
    above = [p for p in shaped if ratio[id(p)] >= 1.0]
    if below and above:
        pair = [below[-1], above[0]]  # the slowest link still below, the fastest already above
    else:
        pair = shaped[-2:] if below else shaped[:2]
    (x1, y1), (x2, y2) = ((1.0 / p["rate_bits"], ratio[id(p)]) for p in pair)
    B = (y2 - y1) / (x2 - x1)
    A = y1 - B * x1
    out = {"A": A, "B_bit_s": B, "used": [p["rate"] for p in pair], "rate_bits": None, "label": None, "why": None}
    if B <= 0:
        out["why"] = "communication does not grow as the rate falls"
    elif A >= 1.0:
        out["why"] = f"fixed communication costs alone are {A:.2f}x compute"
    else:
        out["rate_bits"] = B / (1.0 - A)
        out["label"] = rate_label(out["rate_bits"])
    return out


# -- one run ----------------------------------------------------------------------------------------------
def round_stats(records: List[Dict]) -> Optional[Dict]:
    """Medians over the round records of t_compute, t_comm and the comm fraction; bytes per round."""
    rounds = training_rounds(records)  # an evaluation's early exchange back in its round
    if not rounds:
        return None
    fractions = [r["t_comm"] / (r["t_comm"] + r["t_compute"]) for r in rounds if r["t_comm"] + r["t_compute"] > 0]
    over_compute = [(r["t_comm"] + r["t_compute"]) / r["t_compute"] for r in rounds if r["t_compute"] > 0]
    evals = [r for r in records if r.get("event") == "eval"]
    return {"rounds": len(rounds),
            "t_compute_s": statistics.median(r["t_compute"] for r in rounds),
            "t_comm_s": statistics.median(r["t_comm"] for r in rounds),
            "t_hidden_s": statistics.median(r.get("t_comm_hidden", 0.0) for r in rounds),
            "t_eval_s": statistics.median(e["t_eval"] for e in evals) if evals and "t_eval" in evals[0] else None,
            "comm_fraction": statistics.median(fractions) if fractions else None,
            "round_over_compute": statistics.median(over_compute) if over_compute else None,
            "bytes_sent_per_round": statistics.fmean(r["bytes_sent"] for r in rounds),
            "bytes_sent": sum(r["bytes_sent"] for r in rounds + evals)}


def summarise_run(path: str, targets: List[float]) -> Optional[Dict]:
    """compare.summarise_run + round_stats + the kernel counters of OUT/<rate>/<strategy>-<seed>."""
    run = compare.summarise_run(path, targets)
    if run is None:
        return None
    run.update(round_stats(read_metrics(path)))
    cfg = os.path.join(path, "config.json")
    if os.path.exists(cfg):
        c = json.load(open(cfg))
        run["model"] = {k: c["config"][k] for k in ("model", "width", "local_steps", "batch_size")}
        run["model"]["num_classes"] = c.get("num_classes")
        run["model"]["world_size"] = c.get("world_size")
    kernel = os.path.join(path, "kernel.json")
    if os.path.exists(kernel):
        k = json.load(open(kernel))
        tx = sum(k["tx_bytes"].values())
        run["kernel"] = {"tx_bytes": tx, "rx_bytes": sum(k["rx_bytes"].values()), "per_node_tx": k["tx_bytes"],
                         "tx_per_round": tx / run["rounds"],
                         "over_package": tx / run["bytes_sent"] if run["bytes_sent"] else None}
    return run


def probe_summary(path: str, rate: str) -> Optional[Dict]:
    """A local-SGD probe run: its rate and median t_comm, t_compute, comm fraction."""
    if not os.path.exists(os.path.join(path, "metrics.jsonl")):
        return None
    s = round_stats(read_metrics(path))
    return None if s is None else {"rate": rate, "rate_bits": parse_rate(rate), "path": path, **s}


# -- per strategy and rate ----------------------------------------------------------------------------------
def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def aggregate_rate(runs: Dict[str, Dict[int, Optional[Dict]]], targets: List[float],
                   baseline: str = BASELINE) -> Dict:
    """compare.aggregate for one rate, plus the means over seeds of the per-run round medians and
    bytes per round, and each strategy's time to target relative to the baseline's (local SGD's)."""
    summary = compare.aggregate(runs, targets)
    for strategy, by_seed in runs.items():
        done = list(compare.finished_runs(by_seed).values())
        if not done:
            continue
        s = summary[strategy]
        for key in ("t_compute_s", "t_comm_s", "t_hidden_s", "t_eval_s", "comm_fraction", "round_over_compute",
                    "bytes_sent_per_round", "rounds"):
            s[key] = _mean(r.get(key) for r in done)
        s["kernel_tx_per_round"] = _mean(r["kernel"]["tx_per_round"] for r in done if r.get("kernel"))
        s["kernel_over_package"] = _mean(r["kernel"]["over_package"] for r in done if r.get("kernel"))
    for strategy, s in summary.items():
        s["relative_time_to_target"] = relative_times(summary, strategy, targets, baseline)
        s["relative_train_time_to_target"] = relative_times(summary, strategy, targets, baseline, "train_mean_s")
    return summary


def relative_times(summary: Dict, strategy: str, targets: List[float],
                   baseline: str = BASELINE, key: str = "mean_s") -> Dict[str, Optional[float]]:
    """Time to each target of strategy / the baseline's at the same rate (None where either never got
    there); key "train_mean_s": the training time alone (evaluations' own time left out)."""
    out = {}
    for t in targets:
        mine = summary.get(strategy, {}).get("time_to_target", {}).get(str(t), {}).get(key)
        base = summary.get(baseline, {}).get("time_to_target", {}).get(str(t), {}).get(key)
        out[str(t)] = mine / base if mine is not None and base else None
    return out


def gpu_mapping(rate: str, local_sgd: Dict, model: Dict, gpu_step_s: float) -> Optional[Dict]:
    """The rate beside the published GPUs equivalent to `rate` here (gpu_scale), from local SGD's
    measured compute time per step at this rate; None for unshaped links or without local SGD."""
    bits = parse_rate(rate)
    if bits is None or not local_sgd.get("t_compute_s") or not model:
        return None
    from resist_mpi.tools.traffic import build_sizes
    here = build_sizes(model["model"], model["num_classes"], model["width"]).full
    anchor = gpu_scale.PUBLISHED
    gpu = build_sizes(anchor["model"], 10, anchor["width"]).full  # the anchor is CIFAR-10
    step_s = local_sgd["t_compute_s"] / model["local_steps"]
    equiv = gpu_scale.equivalent_rate(bits, here_elements=here, here_local_steps=model["local_steps"],
                                      here_step_s=step_s, gpu_elements=gpu, gpu_step_s=gpu_step_s)
    return {"rate_bits": bits, "here_elements": here, "here_local_steps": model["local_steps"],
            "here_step_s": step_s, "gpu_elements": gpu, "gpu_local_steps": anchor["local_steps"],
            "gpu_step_s": gpu_step_s, "gpu_equivalent_bits": equiv, "factor": equiv / bits}


# -- output ---------------------------------------------------------------------------------------------------
def format_table(summary: Dict[str, Dict], targets: List[float]) -> str:
    """One block per rate: accuracy, time to targets (and relative to local SGD), round times, bytes."""
    head = (f"{'rate':>10} | {'strategy':>13} | {'final acc':>14} | "
            + " | ".join(f"{'t@' + format(t, '.0%') + ' (rel) train (rel)':>31}" for t in targets)
            + f" | {'compute':>7} | {'comm':>7} | {'hidden':>7} | {'rd/cmp':>6} | {'eval':>6} | {'comm%':>5} | "
              f"{'pkg MB/rd':>9} | {'kern MB/rd':>10} | {'kern/pkg':>8}")
    lines = [head, "-" * len(head)]
    for rate, by_strategy in summary.items():
        for strategy, s in by_strategy.items():
            if not s.get("seeds"):
                lines.append(f"{rate:>10} | {strategy:>13} | (no finished run)")
                continue
            cells = []
            for t in targets:
                d, rel = s["time_to_target"][str(t)], s["relative_time_to_target"][str(t)]
                trel = s.get("relative_train_time_to_target", {}).get(str(t))
                cell = f"{d['mean_s']:6.1f}s {d['reached']}/{d['of']}" if d["reached"] else f"{'-':>7} 0/{d['of']}"
                cell += f" {rel:5.2f}" if rel is not None else f" {'':5}"
                train = d.get("train_mean_s")
                cell += f" {train:6.1f}s" if d["reached"] and train is not None else f" {'-':>7}"
                cells.append(cell + (f" {trel:5.2f}" if trel is not None else f" {'':5}"))
            kern = s.get("kernel_tx_per_round")
            kover = s.get("kernel_over_package")
            lines.append(f"{rate:>10} | {strategy:>13} | {100 * s['final_acc_mean']:6.2f}% ± {100 * s['final_acc_std']:4.2f} | "
                         + " | ".join(f"{c:>31}" for c in cells)
                         + f" | {s['t_compute_s']:6.2f}s | {s['t_comm_s']:6.2f}s | {s.get('t_hidden_s') or 0:6.2f}s | "
                           f"{s.get('round_over_compute') or 0:5.2f}x | "
                           f"{s.get('t_eval_s') or 0:5.2f}s | {100 * (s['comm_fraction'] or 0):4.0f}%"
                         f" | {s['bytes_sent_per_round'] / 1e6:9.2f} | "
                         + (f"{kern / 1e6:10.2f} | {kover:8.3f}" if kern is not None else f"{'-':>10} | {'-':>8}"))
    return "\n".join(lines)


def plot(summary: Dict[str, Dict], targets: Sequence[float], path: str, title: str, baseline: str = BASELINE,
         goals: Optional[Dict[str, float]] = None) -> bool:
    """x: the baseline's (local SGD's) comm fraction at each rate; y: time to target / the baseline's,
    one line per strategy and target; a line at each goal ratio. False when no rate has both numbers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    strategies = sorted({s for by in summary.values() for s in by if s != baseline})
    for i, strategy in enumerate(strategies):
        for j, (t, style) in enumerate(zip(targets, ("-", "--", ":", "-."))):
            pts = sorted((by[baseline]["comm_fraction"], by[strategy]["relative_time_to_target"][str(t)], rate)
                         for rate, by in summary.items()
                         if by.get(baseline, {}).get("comm_fraction") is not None
                         and by.get(strategy, {}).get("relative_time_to_target", {}).get(str(t)) is not None)
            if not pts:
                continue
            xs, ys, rates = zip(*pts)
            ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=f"{strategy}, {t:.0%}")
            for x, y, rate in pts if j == 0 else ():  # rate names once per strategy
                ax.annotate(rate, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i}")
            drawn = True
    ax.axhline(1.0, color="grey", lw=0.8, alpha=0.6)
    for k, (label, ratio) in enumerate(sorted((goals or {"resist": 0.5}).items())):
        ax.axhline(ratio, color="k", ls=(":", "-.", "--")[k % 3], lw=1.2, label=f"{ratio:g} (target for {label})")
    ax.axvline(0.5, color="grey", ls=":", lw=0.8, alpha=0.6)
    ax.set_xlabel(f"{baseline}: communication fraction of round time (median over rounds)")
    ax.set_ylabel(f"time to target / {baseline}'s")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_round_times(summary: Dict[str, Dict], path: str, title: str) -> bool:
    """Per rate and strategy, the median round split into compute, exposed communication (the
    training thread waited for it) and hidden communication (background averages that ran while it
    computed; drawn beside, since they took no round time). False when there is nothing to draw."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = [r for r, by in summary.items() if any(s.get("seeds") for s in by.values())]
    if not rates:
        return False
    fig, axes = plt.subplots(1, len(rates), figsize=(4.5 * len(rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        names = [n for n, s in summary[rate].items() if s.get("seeds")]
        compute = [summary[rate][n]["t_compute_s"] for n in names]
        exposed = [summary[rate][n]["t_comm_s"] for n in names]
        hidden = [summary[rate][n].get("t_hidden_s") or 0.0 for n in names]
        x = range(len(names))
        ax.bar(x, compute, color="C0", label="compute")
        ax.bar(x, exposed, bottom=compute, color="C3", label="exposed communication")
        ax.bar([i + 0.28 for i in x], hidden, width=0.25, color="C2", alpha=0.7, label="hidden communication")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("seconds per round (median)")
        ax.set_title(f"{title}: {rate}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
