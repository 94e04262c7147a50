"""resist_mpi.plot: a figure from fake run directories, labels, resumed clocks, one-line errors."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402  (matplotlib depends on Pillow)

from resist_mpi.tools import plot  # noqa: E402


def _fake_run(d, strategy, world_size, rounds=6, config=True, bytes_per_round=1e6, resume_at=None, lost_at=None):
    """A run directory like resist_mpi.train writes: round records, an eval every 2 rounds; lost_at:
    a node is lost and the run resumes on one rank fewer at that round."""
    d.mkdir(parents=True)
    recs, clock = [], 0.0
    for r in range(rounds):
        if r == lost_at:
            recs.append({"event": "membership", "round": r, "world_size": world_size - 1,
                         "previous_world_size": world_size, "left": ["node3"], "joined": [], "rounds_repeated": 1,
                         "t_recovery": 24.5, "time": 1e9})
        if r in (resume_at, lost_at):
            clock = 0.0  # a resumed run's clock starts again
        clock += 1.5
        recs.append({"event": "round", "round": r, "epoch": (r + 1) / 2, "strategy": strategy,
                     "world_size": world_size, "train_loss": 2.0 - 0.1 * r, "train_acc": 0.1 * r, "lr": 0.1,
                     "bytes_sent": bytes_per_round * (1 + 0.1 * r), "bytes_recv": bytes_per_round,
                     "t_compute": 1.2, "t_comm": 0.3, "wallclock": clock})
        if r % 2 == 1:
            clock += 0.2
            recs.append({"event": "eval", "round": r, "epoch": (r + 1) / 2, "test_loss": 1.5 - 0.1 * r,
                         "test_acc": 0.3 + 0.05 * r, "bytes_sent": 100, "bytes_recv": 100, "wallclock": clock})
    (d / "metrics.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in recs))
    if config:
        (d / "config.json").write_text(json.dumps({"config": {"strategy": strategy}, "world_size": world_size}))
    return d


def test_figure_written_with_requested_size(tmp_path):
    a = _fake_run(tmp_path / "run_a", "resist", 4, bytes_per_round=2e5)
    b = _fake_run(tmp_path / "run_b", "data_parallel", 4, bytes_per_round=5e7)  # log scale kicks in
    out = tmp_path / "figs" / "cmp.png"  # parent is created
    assert plot.main([str(a), str(b), "-o", str(out), "--dpi", "80", "--title", "fake"]) == 0
    assert out.stat().st_size > 10_000
    with Image.open(out) as im:
        assert im.size == (12 * 80, 8 * 80)


def test_labels_from_config_or_directory(tmp_path):
    a = plot.load_run(str(_fake_run(tmp_path / "x", "local_sgd", 8)))
    b = plot.load_run(str(_fake_run(tmp_path / "nocfg", "resist", 2, config=False)))
    c = plot.load_run(str(_fake_run(tmp_path / "y", "local_sgd", 8)))
    assert (a.label, b.label) == ("local_sgd (8 ranks)", "nocfg")
    plot._unique_labels([a, b, c])  # same strategy and size: the directory tells them apart
    assert (a.label, b.label, c.label) == ("local_sgd (8 ranks) x", "nocfg", "local_sgd (8 ranks) y")
    assert len(a.rounds) == 6 and [e["round"] for e in a.evals] == [1, 3, 5]


def test_resumed_run_clock_keeps_growing(tmp_path):
    run = plot.load_run(str(_fake_run(tmp_path / "r", "resist", 2, rounds=8, resume_at=4)))
    clocks = [e["wallclock"] for e in run.evals]
    # 8 rounds of 1.5 s and 4 evals of 0.2 s, as if the run had not stopped
    assert clocks == sorted(clocks) and clocks[-1] == pytest.approx(8 * 1.5 + 4 * 0.2)


def test_an_evaluation_written_after_the_round_it_ran_beside_is_no_restart():
    """A background evaluation's record comes after the next round's with the clock of its start:
    each one was taken for a restart and the whole time so far added again (round 5 of 6 x 10 s
    drawn at 120 s). A resume record is one."""
    recs = [{"event": "round", "round": 0, "wallclock": 10.0}, {"event": "round", "round": 1, "wallclock": 20.0},
            {"event": "eval", "round": 0, "wallclock": 12.0}, {"event": "round", "round": 2, "wallclock": 30.0},
            {"event": "eval", "round": 1, "wallclock": 22.0}, {"event": "round", "round": 3, "wallclock": 40.0},
            {"event": "resume", "round": 4}, {"event": "round", "round": 4, "wallclock": 45.0},
            {"event": "eval", "round": 4, "wallclock": 46.0}]
    clocks = [r["wallclock"] for r in plot._continuous_wallclock(recs) if "wallclock" in r]
    assert clocks == [10.0, 20.0, 12.0, 30.0, 22.0, 40.0, 85.0, 86.0]


def test_a_lost_node_is_marked_where_the_world_changed(tmp_path, monkeypatch):
    run = plot.load_run(str(_fake_run(tmp_path / "m", "resist", 4, rounds=8, lost_at=4)))
    # rounds 0-3 took 4 x 1.5 s plus 2 evals of 0.2 s; epoch 2.0 is round 3's
    assert run.marks == [{"round": 4, "wallclock": pytest.approx(6.4), "epoch": 2.0, "label": "4->3 ranks"}]
    assert plot.load_run(str(_fake_run(tmp_path / "n", "resist", 4))).marks == []
    import matplotlib.axes
    lines = []
    real = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda ax, x, **kw: lines.append(x) or real(ax, x, **kw))
    plot.plot_runs([run], str(tmp_path / "m.png"))
    assert sorted(lines) == [2.0, 4, pytest.approx(6.4)]  # the epoch, round and wall-clock panels


def test_cli_runs_as_module(tmp_path):
    a = _fake_run(tmp_path / "a", "resist", 2)
    out = tmp_path / "f.png"
    proc = subprocess.run([sys.executable, "-m", "resist_mpi.plot", str(a), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize("case,msg", [
    ("missing", "no such run directory"),
    ("no_metrics", "no metrics.jsonl"),
    ("empty", "no round or eval records"),
    ("only_other_events", "no round or eval records"),
    ("bad_json", "not a JSON record"),
])
def test_errors_one_line_exit_2(tmp_path, capsys, case, msg):
    good = _fake_run(tmp_path / "good", "resist", 2)
    bad = tmp_path / case
    if case != "missing":
        bad.mkdir()
    if case == "empty":
        (bad / "metrics.jsonl").write_text("\n")
    elif case == "only_other_events":
        (bad / "metrics.jsonl").write_text(json.dumps({"event": "checkpoint", "round": 3}) + "\n")
    elif case == "bad_json":
        (bad / "metrics.jsonl").write_text('{"event": "round", "round": 0}\n{"event": \n')
    out = tmp_path / "f.png"
    assert plot.main([str(good), str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resist_mpi.plot: error: ") and msg in err and err.count("\n") == 1, err
    assert str(bad) in err
    assert not out.exists()


def test_unknown_figure_format_is_one_line(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", "resist", 2)
    assert plot.main([str(a), "-o", str(tmp_path / "f.notaformat")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resist_mpi.plot: error: ") and err.count("\n") == 1, err
