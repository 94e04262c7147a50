"""Compare runs in one figure: accuracy against time and epochs, traffic and time per round.

    python -m resist_mpi.plot runs/resist runs/local_sgd runs/data_parallel -o compare.png
    python -m resist_mpi.plot runs/baselines-*/* -o baselines.png --title "CIFAR-10, 8 ranks"

Each RUN_DIR is an --out directory of resist_mpi.train: metrics.jsonl (round and eval records)
and, when present, config.json. The line for a run is labelled "strategy (N ranks)" from
config.json, or with the directory name when config.json is missing. The 2x2 figure shows:

    test accuracy vs wall-clock      |  test accuracy vs epoch
    bytes sent per round vs round    |  mean time per round: compute + communication

A change of the world (a `membership` record: a node lost, the job going on with the ranks left)
is a dotted vertical line in the first three panels, labelled "4->3 ranks".

Bytes are those of the round records: the sum over ranks of the payload each rank sent. Times are
the maximum over ranks. A resumed run's clock restarts at 0; the time before the restart is added,
so its wall-clock axis is the time spent in training. A missing directory, a missing metrics.jsonl or one with no records is
reported on one line, and the exit status is 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..cli.metrics import read_metrics, training_rounds


class PlotError(ValueError):
    """A run directory that cannot be plotted; reported as one line."""


@dataclass
class Run:
    """What the figure needs from one run directory."""
    path: str
    label: str
    rounds: List[Dict] = field(default_factory=list)  # "round" records, in file order
    evals: List[Dict] = field(default_factory=list)   # "eval" records
    marks: List[Dict] = field(default_factory=list)   # changes of the world (membership_marks)


def _read_records(path: str) -> List[Dict]:
    try:
        return read_metrics(path)
    except ValueError as e:
        raise PlotError(str(e)) from None


def _continuous_wallclock(recs: List[Dict]) -> List[Dict]:
    """A resumed run's clock starts again at 0: add the time before each restart so that
    wall-clock only grows (records are copied, not changed). A restart is a `resume` record, or a
    round whose clock is behind the last one's; not an evaluation's record, whose clock can be a
    round behind (one that ran in the background is written after the round it ran beside)."""
    out, offset, last, restarted = [], 0.0, 0.0, False
    for rec in recs:
        if rec.get("event") == "resume":
            restarted = True
        wc = rec.get("wallclock")
        if isinstance(wc, (int, float)):
            if restarted or (rec.get("event") == "round" and wc + offset < last):
                offset, restarted = last, False
            rec = {**rec, "wallclock": wc + offset}
            last = max(last, rec["wallclock"])
        out.append(rec)
    return out


def membership_marks(recs: List[Dict]) -> List[Dict]:
    """Where each change of the world (a `membership` record: a node lost or joined) goes in the
    figure: its round, the wall-clock and epoch training had reached before the change (records in
    file order, clock made continuous), and a label "4->3 ranks"."""
    marks, wallclock, epoch = [], 0.0, 0.0
    for rec in recs:
        if rec.get("event") == "membership":
            marks.append({"round": rec.get("round"), "wallclock": wallclock, "epoch": epoch,
                          "label": f"{rec.get('previous_world_size')}->{rec.get('world_size')} ranks"})
            continue
        if isinstance(rec.get("wallclock"), (int, float)):
            wallclock = rec["wallclock"]
        if isinstance(rec.get("epoch"), (int, float)):
            epoch = rec["epoch"]
    return marks


def _label(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    try:
        with open(os.path.join(path, "config.json")) as fh:
            info = json.load(fh)
        strategy, ranks = info["config"]["strategy"], int(info["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return name
    return f"{strategy} ({ranks} rank{'s' if ranks != 1 else ''})"


def load_run(path: str) -> Run:
    """The round and eval records of a run directory and its label; PlotError when unusable."""
    if not os.path.isdir(path):
        raise PlotError(f"{path}: no such run directory")
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise PlotError(f"{path}: no metrics.jsonl (not an --out directory of resist_mpi.train?)")
    recs = _continuous_wallclock(_read_records(metrics))
    rounds = training_rounds(recs)  # an evaluation's early exchange back in its round
    evals = [r for r in recs if r.get("event") == "eval"]
    if not rounds and not evals:
        raise PlotError(f"{metrics}: no round or eval records")
    return Run(path, _label(path), rounds, evals, membership_marks(recs))


def _unique_labels(runs: Sequence[Run]) -> None:
    """Two runs with the same label (same strategy and size) get their directory name appended."""
    seen: Dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.label} {os.path.basename(os.path.normpath(run.path))}"


def _series(recs: List[Dict], x: str, y: str, scale: float = 1.0):
    pts = [(r[x], r[y] * scale) for r in recs if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _mean(recs: List[Dict], key: str) -> float:
    vals = [r[key] for r in recs if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else 0.0


def plot_runs(runs: Sequence[Run], out: str, dpi: int = 100, title: Optional[str] = None,
              figsize=(12.0, 8.0)) -> None:
    """Draw the 2x2 comparison of runs into out (any format matplotlib knows by extension)."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=figsize)
    (ax_time, ax_epoch), (ax_bytes, ax_split) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>ph*"
    for i, run in enumerate(runs):
        style = dict(color=colors[i % len(colors)], marker=markers[i % len(markers)], markersize=4, label=run.label)
        ax_time.plot(*_series(run.evals, "wallclock", "test_acc", 100.0), **style)
        ax_epoch.plot(*_series(run.evals, "epoch", "test_acc", 100.0), **style)
        rx, ry = _series(run.rounds, "round", "bytes_sent", 1e-6)
        ax_bytes.plot(rx, ry, **{**style, "marker": None if len(rx) > 30 else style["marker"]})
        for mark in run.marks:  # a lost or joined node: a dotted line where the world changed
            for ax, key in ((ax_time, "wallclock"), (ax_epoch, "epoch"), (ax_bytes, "round")):
                if isinstance(mark.get(key), (int, float)):
                    ax.axvline(mark[key], color=style["color"], linestyle=":", linewidth=1)
                    ax.annotate(mark["label"], (mark[key], 1.0), xycoords=("data", "axes fraction"), rotation=90,
                                ha="right", va="top", fontsize=7, color=style["color"])

    # time per round: one stacked bar per run, compute below, communication (hatched) on top
    xs = list(range(len(runs)))
    compute = [_mean(r.rounds, "t_compute") for r in runs]
    comm = [_mean(r.rounds, "t_comm") for r in runs]
    bar_colors = [colors[i % len(colors)] for i in xs]
    ax_split.bar(xs, compute, color=bar_colors, edgecolor="black", linewidth=0.5)
    ax_split.bar(xs, comm, bottom=compute, color=bar_colors, alpha=0.45, hatch="//", edgecolor="black", linewidth=0.5)
    for x, c, m in zip(xs, compute, comm):
        if c + m > 0:
            ax_split.annotate(f"{100 * m / (c + m):.0f}% comm", (x, c + m), ha="center", va="bottom", fontsize=8)
    ax_split.set_xticks(xs)
    tilt = len(runs) > 2  # long labels side by side would overlap
    ax_split.set_xticklabels([r.label for r in runs], rotation=15 if tilt else 0, ha="right" if tilt else "center",
                             fontsize=8)
    ax_split.legend(handles=[Patch(facecolor="0.5", edgecolor="black", label="compute"),
                             Patch(facecolor="0.5", alpha=0.45, hatch="//", edgecolor="black", label="communication")],
                    fontsize=8, loc="upper center", ncol=2)
    ax_split.margins(y=0.3)  # room for the legend and the percentages above the bars

    ax_time.set(xlabel="wall-clock (s)", ylabel="test accuracy (%)", title="Test accuracy vs wall-clock")
    ax_epoch.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy vs epoch")
    ax_bytes.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_bytes.set(xlabel="round", ylabel="MB sent per round (all ranks)", title="Communication per round")
    ax_split.set(ylabel="seconds per round (mean, max over ranks)", title="Time per round")
    positive = [y for run in runs for y in _series(run.rounds, "round", "bytes_sent", 1e-6)[1] if y > 0]
    if positive and max(positive) / min(positive) > 100:  # baselines and ResIST differ by orders
        ax_bytes.set_yscale("log")
    for ax in (ax_time, ax_epoch, ax_bytes):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m resist_mpi.plot",
                                description="Plot one or more resist_mpi.train run directories in one 2x2 figure.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--out directories of resist_mpi.train")
    p.add_argument("-o", "--output", required=True, metavar="FIG", help="figure file, e.g. compare.png or .pdf")
    p.add_argument("--dpi", type=int, default=100, help="resolution (default: %(default)s; 12x8 inches)")
    p.add_argument("--title", help="title above the figure")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.dpi < 1:
            raise PlotError(f"--dpi must be at least 1, got {args.dpi}")
        runs = [load_run(path) for path in args.runs]
        _unique_labels(runs)
        plot_runs(runs, args.output, dpi=args.dpi, title=args.title)
    except (ValueError, OSError) as e:  # PlotError, and matplotlib on an unknown file format
        sys.stderr.write(f"resist_mpi.plot: error: {e}\n")
        return 2
    print(f"wrote {args.output} ({len(runs)} run{'s' if len(runs) != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
