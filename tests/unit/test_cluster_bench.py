"""benchmarks/cluster_bench.py without a cluster: the half-communication rate from probes, summaries of
fabricated runs (round medians, bytes per round, kernel counters, time to target relative to local
SGD), the GPU-equivalent rate, the verdict lines, the figure; compare.run_logged's timeout."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

import cluster_bench  # noqa: E402
import cluster_report as report  # noqa: E402
import compare  # noqa: E402
import gpu_scale  # noqa: E402
from resist_mpi.tools.cluster import parse_rate  # noqa: E402


def test_rate_labels_round_trip_through_parse_rate():
    cases = {23_412_000: "23.4mbit", 1.5e9: "1.5gbit", 100e6: "100mbit", 999_000: "999kbit", 7.25e6: "7.25mbit"}
    for bits, label in cases.items():
        assert report.rate_label(bits) == label
        assert parse_rate(label) == pytest.approx(bits, rel=5e-3)


def _probe(rate, t_comm, t_compute=1.0):
    return {"rate": rate, "rate_bits": parse_rate(rate), "comm_fraction": t_comm / (t_comm + t_compute)}


def test_half_rate_solves_comm_equal_compute():
    # t_comm = 0.2 s + 40 Mbit / rate, compute 1 s: equal (fraction 0.5) at 40e6 / 0.8 = 50 Mbit/s
    comm = lambda r: 0.2 + 40e6 / parse_rate(r)  # noqa: E731
    probes = [_probe(r, comm(r)) for r in ("100mbit", "25mbit", "10mbit")] + [_probe("unshaped", 0.01)]
    fit = report.fit_half_rate(probes)
    assert fit["A"] == pytest.approx(0.2) and fit["B_bit_s"] == pytest.approx(40e6)
    assert fit["rate_bits"] == pytest.approx(50e6) and fit["label"] == "50mbit" and fit["why"] is None


def test_half_rate_from_the_two_probes_around_the_crossing():
    # the slowest link does much worse than 1/R (a line through all probes would miss); the pair that
    # brackets compute (1 s) is 10mbit (0.4 s) and 2mbit (1.2 s): t_comm = 0.2 + 2e6 / R = 1 at 2.5 Mbit/s
    probes = [_probe("100mbit", 0.12), _probe("10mbit", 0.4), _probe("2mbit", 1.2), _probe("1mbit", 9.0)]
    fit = report.fit_half_rate(probes)
    assert fit["used"] == ["10mbit", "2mbit"] and fit["A"] == pytest.approx(0.2)
    assert fit["rate_bits"] == pytest.approx(2.5e6) and fit["label"] == "2.5mbit"
    # all probes below the crossing: the two slowest links extrapolate
    fit = report.fit_half_rate([_probe("100mbit", 0.1), _probe("50mbit", 0.2), _probe("20mbit", 0.5)])
    assert fit["used"] == ["50mbit", "20mbit"] and fit["rate_bits"] == pytest.approx(10e6)


def test_half_rate_says_why_when_there_is_none():
    assert "two different" in report.fit_half_rate([_probe("100mbit", 0.5), _probe("unshaped", 0.1)])["why"]
    fixed = report.fit_half_rate([_probe("100mbit", 2.0 + 0.1), _probe("10mbit", 2.0 + 1.0)])  # 2 s > 1 s
    assert fixed["rate_bits"] is None and fixed["why"] == "fixed communication costs alone are 2.00x compute"
    flat = report.fit_half_rate([_probe("100mbit", 0.5), _probe("10mbit", 0.4)])
    assert flat["rate_bits"] is None and "does not grow" in flat["why"]


def test_auto_becomes_the_fitted_rate_or_is_left_out():
    fit = {"label": "31.6mbit", "rate_bits": 31_600_000}
    assert cluster_bench.resolve_rates(["unshaped", "auto", "10mbit", "auto/4"], fit) == [
        {"label": "unshaped", "requested": "unshaped", "bits": None},
        {"label": "31.6mbit", "requested": "auto", "bits": 31_600_000},
        {"label": "10mbit", "requested": "10mbit", "bits": 10_000_000},
        {"label": "7.9mbit", "requested": "auto/4", "bits": 7_900_000}]  # a quarter of the fitted rate
    assert [r["label"] for r in cluster_bench.resolve_rates(["auto", "1gbit", "auto/4"], {"label": None})] == ["1gbit"]


def _fake_run(path, t_comm, t_compute, acc_times, sent=1_000_000, kernel_tx=None):
    """A finished run: 5 rounds of 10 steps, evaluations at the given (wallclock, acc)."""
    os.makedirs(path)
    rounds = [{"event": "round", "round": i, "step": 10 * (i + 1), "bytes_sent": sent, "bytes_recv": sent,
               "t_compute": t_compute[i], "t_comm": t_comm[i]} for i in range(5)]
    evals = [{"event": "eval", "round": 4, "epoch": 1.0 + i, "test_acc": acc, "wallclock": w, "t_eval": 2.0,
              "bytes_sent": 500_000, "bytes_recv": 500_000} for i, (w, acc) in enumerate(acc_times)]
    with open(os.path.join(path, "metrics.jsonl"), "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rounds + evals))
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump({"config": {"model": "preact_resnet101", "width": 8, "local_steps": 10, "batch_size": 32},
                   "num_classes": 10, "world_size": 4}, fh)
    if kernel_tx is not None:
        with open(os.path.join(path, "kernel.json"), "w") as fh:
            json.dump({"tx_bytes": {f"node{k}": kernel_tx / 4 for k in range(4)},
                       "rx_bytes": {f"node{k}": kernel_tx / 4 for k in range(4)}}, fh)


@pytest.fixture
def fabricated(tmp_path):
    rate = tmp_path / "20mbit"
    # local SGD: compute 2 s, comm 2.5 s (median of rounds; round 0 slow), reaches 97% at 60 s
    _fake_run(rate / "local_sgd-0", [9, 2.5, 2.4, 2.6, 2.5], [2.0, 2.0, 2.1, 1.9, 2.0], [(30, 0.93), (60, 0.975)],
              sent=4_000_000, kernel_tx=4.2 * 4_000_000 * 5 + 1.05 * 2 * 500_000)
    # resist: 95% at 20 s, 97% at 27 s; seed 1 never reaches 97%
    _fake_run(rate / "resist-0", [1.0] * 5, [1.0] * 5, [(20, 0.95), (27, 0.971)], sent=2_000_000, kernel_tx=10_500_000)
    _fake_run(rate / "resist-1", [1.2] * 5, [1.0] * 5, [(22, 0.955), (29, 0.96)], sent=2_000_000)
    return tmp_path


def test_summaries_of_fabricated_runs(fabricated):
    targets = [0.95, 0.97]
    run = report.summarise_run(str(fabricated / "20mbit" / "local_sgd-0"), targets)
    assert run["t_comm_s"] == 2.5 and run["t_compute_s"] == 2.0 and run["rounds"] == 5
    assert run["comm_fraction"] == pytest.approx(2.5 / 4.5)  # median of per-round fractions
    assert run["bytes_sent_per_round"] == 4_000_000 and run["bytes_sent"] == 5 * 4_000_000 + 2 * 500_000
    assert run["kernel"]["tx_per_round"] == pytest.approx((84_000_000 + 1_050_000) / 5)
    assert run["kernel"]["over_package"] == pytest.approx(85_050_000 / 21_000_000)
    assert run["model"] == {"model": "preact_resnet101", "width": 8, "local_steps": 10, "batch_size": 32,
                            "num_classes": 10, "world_size": 4}

    runs = {s: {seed: report.summarise_run(str(fabricated / "20mbit" / f"{s}-{seed}"), targets) for seed in (0, 1)}
            for s in ("resist", "local_sgd")}
    assert runs["local_sgd"][1] is None  # never ran
    summary = report.aggregate_rate(runs, targets)
    resist, local = summary["resist"], summary["local_sgd"]
    # with and without the evaluations' own time (2 s each, two of them by the time 97% is seen)
    assert resist["time_to_target"]["0.97"] == {"mean_s": 27, "std_s": 0.0, "train_mean_s": 23, "reached": 1, "of": 2}
    assert resist["relative_train_time_to_target"]["0.97"] == pytest.approx(23 / 56)
    assert resist["t_eval_s"] == 2.0
    assert resist["time_to_target"]["0.95"]["mean_s"] == 21
    assert resist["relative_time_to_target"] == {"0.95": pytest.approx(21 / 60), "0.97": pytest.approx(27 / 60)}
    assert local["relative_time_to_target"] == {"0.95": 1.0, "0.97": 1.0}
    assert resist["t_comm_s"] == pytest.approx(1.1) and resist["comm_fraction"] == pytest.approx((0.5 + 1.2 / 2.2) / 2)
    assert resist["kernel_tx_per_round"] == pytest.approx(10_500_000 / 5)  # seed 1 has no kernel.json
    assert resist["round_over_compute"] == pytest.approx(2.1) and local["round_over_compute"] == pytest.approx(2.25)
    table = report.format_table({"20mbit": summary}, targets)
    resist_row = next(line for line in table.splitlines() if "resist" in line)
    assert "27.0s 1/2  0.45   23.0s  0.41" in resist_row and "21.0s 2/2  0.35" in resist_row
    assert "|   1.10s |   0.00s |  2.10x |  2.00s |" in resist_row, resist_row  # comm, hidden, round/compute, eval


def test_gpu_equivalent_rate():
    assert gpu_scale.published_step_s() == pytest.approx(5486 / (40 * 391)) == pytest.approx(0.35077, abs=1e-5)
    # bytes per step 64e6/50 vs 1e6/10: x12.8; step times 0.2 s here vs 0.1 s there: x2
    got = gpu_scale.equivalent_rate(20e6, here_elements=1_000_000, here_local_steps=10, here_step_s=0.2,
                                    gpu_elements=64_000_000, gpu_local_steps=50, gpu_step_s=0.1)
    assert got == pytest.approx(512e6)
    assert gpu_scale.format_rate(512e6) == "512 Mbit/s" and gpu_scale.format_rate(1.234e9) == "1.23 Gbit/s"


def test_gpu_mapping_and_verdicts_from_a_summary(fabricated):
    targets = [0.95, 0.97]
    runs = {s: {0: report.summarise_run(str(fabricated / "20mbit" / f"{s}-0"), targets)} for s in ("resist", "local_sgd")}
    summary = {"20mbit": report.aggregate_rate(runs, targets)}
    m = report.gpu_mapping("20mbit", summary["20mbit"]["local_sgd"], runs["local_sgd"][0]["model"], 0.0877)
    from resist_mpi.tools.traffic import build_sizes
    here, gpu = build_sizes("preact_resnet101", 10, 8).full, build_sizes("preact_resnet101", 10, 64).full
    assert (m["here_elements"], m["gpu_elements"], m["here_step_s"]) == (here, gpu, 0.2)
    assert m["gpu_equivalent_bits"] == pytest.approx(20e6 * (gpu / 50) / (here / 10) * 0.2 / 0.0877)
    assert report.gpu_mapping("unshaped", summary["20mbit"]["local_sgd"], runs["local_sgd"][0]["model"], 0.0877) is None
    lines = cluster_bench.verdicts(summary, {"20mbit": m}, targets)
    assert lines[0].startswith("20mbit here (local_sgd 56% communicating, 200 ms compute/step, l=10) stands for >= ")
    assert lines[1].endswith("resist's time to 97% <= 0.5x local_sgd's: 0.45x local_sgd's (met)")
    lines = cluster_bench.verdicts(summary, {}, targets, goals={"resist": 0.4, "nothing": 0.5})
    assert lines == ["target at 20mbit (local_sgd 56% communicating): resist's time to 97% <= 0.4x local_sgd's: "
                     "0.45x local_sgd's (NOT met)",
                     "target at 20mbit (local_sgd 56% communicating): nothing's time to 97% <= 0.5x local_sgd's: "
                     "no run reached 97%"]
    # against the fastest of several baselines, and a round against its compute (median of each run's
    # (compute + exposed comm) / compute, mean over seeds; seed 0 only here: resist 2.0, local SGD 2.25)
    assert summary["20mbit"]["resist"]["round_over_compute"] == 2.0
    lines = cluster_bench.verdicts(summary, {}, targets, goals={}, best_of=["local_sgd", "nothing"],
                                   best_goals={"resist": 0.4}, round_goals={"resist": 1.9, "local_sgd": 2.5})
    where = "target at 20mbit (local_sgd 56% communicating): "
    assert lines == [where + "resist's time to 97% <= 0.4x the best of local_sgd, nothing: 0.45x local_sgd's (NOT met)",
                     where + "resist's round <= 1.9x its compute: 2.00x (NOT met)",
                     where + "local_sgd's round <= 2.5x its compute: 2.25x (met)"]
    lines = cluster_bench.verdicts(summary, {}, targets, goals={}, best_of=["nothing"], best_goals={"resist": 0.8})
    assert lines == [where + "resist's time to 97% <= 0.8x the best of nothing: no baseline reached 97% on every seed"]
    args = cluster_bench.parse_args(["--strategies", "resist,local_sgd", "--best-of", "local_sgd",
                                     "--best-goals", "resist:0.8", "--round-goals", "resist:1.2"])
    assert (args.best_of, args.best_goals, args.round_goals) == (["local_sgd"], {"resist": 0.8}, {"resist": 1.2})
    for bad in (["--best-goals", "resist:0.8"], ["--best-of", "diloco"], ["--round-goals", "x:1"]):
        with pytest.raises(SystemExit):
            cluster_bench.parse_args(["--strategies", "resist,local_sgd"] + bad)


def test_variants_name_runs_and_carry_their_flags(fabricated):
    v = compare.parse_strategies("resist, hlsgd=local_sgd --group-size node,r8=resist --wire-dtype int8")
    assert v == {"resist": ["--strategy", "resist"], "hlsgd": ["--strategy", "local_sgd", "--group-size", "node"],
                 "r8": ["--strategy", "resist", "--wire-dtype", "int8"]}
    for bad in ("", "resist,resist", "a b=resist", "x=sgd", "local"):
        with pytest.raises(ValueError):
            compare.parse_strategies(bad)
    args = cluster_bench.parse_args(["--strategies", "resist,hlsgd=local_sgd --group-size node", "--baseline", "hlsgd",
                                     "--goals", "resist:0.6", "--ranks-per-node", "4", "--extra-args", "--wire-dtype x"])
    assert (args.strategies, args.baseline, args.goals) == (["resist", "hlsgd"], "hlsgd", {"resist": 0.6})
    jargs = cluster_bench.job_args(args, "/o", args.extra_args)
    cmd = compare.train_command(jargs, "hlsgd", 2, "/o/hlsgd-2")
    assert cmd[:3] == ["mpirun", "-H", "node0:4,node1:4,node2:4,node3:4"] and cmd[cmd.index("-np") + 1] == "16"
    assert cmd[-6:] == ["--wire-dtype", "x", "--strategy", "local_sgd", "--group-size", "node"]  # variant last
    assert cmd[cmd.index("--seed") + 1] == "2" and cmd[cmd.index("--out") + 1] == "/o/hlsgd-2"
    for bad in (["--baseline", "local_sgd", "--strategies", "resist"], ["--goals", "resist"],
                ["--goals", "resist:x"]):
        with pytest.raises(SystemExit):
            cluster_bench.parse_args(bad)
    # relative times against another baseline: local_sgd against resist
    targets = [0.95, 0.97]
    runs = {s: {0: report.summarise_run(str(fabricated / "20mbit" / f"{s}-0"), targets)} for s in ("resist", "local_sgd")}
    summary = report.aggregate_rate(runs, targets, baseline="resist")
    assert summary["resist"]["relative_time_to_target"]["0.97"] == 1.0
    assert summary["local_sgd"]["relative_time_to_target"]["0.97"] == pytest.approx(60 / 27)


def test_figure_written(fabricated, tmp_path):
    targets = [0.95, 0.97]
    runs = {s: {0: report.summarise_run(str(fabricated / "20mbit" / f"{s}-0"), targets)} for s in ("resist", "local_sgd")}
    png = tmp_path / "fig.png"
    assert report.plot({"20mbit": report.aggregate_rate(runs, targets)}, [0.97, 0.95], str(png), "test")
    assert png.stat().st_size > 10_000
    assert not report.plot({"20mbit": {"local_sgd": {"comm_fraction": None}}}, [0.97], str(tmp_path / "none.png"), "t")


def test_run_logged_ends_the_whole_job_on_timeout(tmp_path):
    marker = f"sleep {os.getpid() % 1000 + 1000}"  # a command line only this test runs
    t0 = time.perf_counter()
    with open(tmp_path / "log", "w") as log:
        rc = compare.run_logged(["sh", "-c", f"{marker} & {marker}"], log, compare.mpi_env(), timeout=1)
    assert rc is None and time.perf_counter() - t0 < 5
    time.sleep(0.2)
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 1  # no child left


def test_a_cluster_left_by_a_killed_run_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """`with Cluster(...)` refusing (the namespaces of a killed run still there) used to end the
    bench in a traceback that hid the `down --prefix` hint; now it is one line and exit 2."""
    class Stale:
        def __init__(self, **kw):
            pass

        def __enter__(self):
            raise cluster_bench.ClusterError("namespaces rcb-sw exist (a cluster is up or was left half-made): "
                                             "run `python -m resist_mpi.cluster down --prefix rcb-`")

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(cluster_bench, "Cluster", Stale)
    monkeypatch.setattr(cluster_bench, "why_unavailable", lambda: None)
    assert cluster_bench.main(["--out", str(tmp_path / "out"), "--rates", "24mbit", "--seeds", "0"]) == 2
    assert capsys.readouterr().err == ("cluster_bench: error: namespaces rcb-sw exist (a cluster is up or was "
                                       "left half-made): run `python -m resist_mpi.cluster down --prefix rcb-`\n")


def _run(acc, at=None, failed=False):
    return {"failed": failed, "final_acc": acc, "time_to_target": {"0.97": at and {"wallclock": at, "epoch": 1.0}},
            "bytes": 1, "eval_bytes": 1, "step_time": 1.0, "wallclock": 50.0, "eval_time": 0.0, "evals": 3}


def test_crashed_seeds_count_as_not_reaching_and_verdicts_need_every_seed():
    """A seed that crashed (no evaluation) or exited non-zero was left out of "of" and its last
    evaluation went into the final accuracy; a goal was "met" off one seed of three, and the best
    baseline could be one that reached 97% once."""
    runs = {"local_sgd": {0: _run(0.98, 40.0), 1: _run(0.98, 40.0), 2: _run(0.98, 40.0)},
            "resist": {0: _run(0.975, 15.0), 1: _run(0.93, failed=True), 2: None},
            "diloco": {0: _run(0.97, 25.0), 1: _run(0.96), 2: _run(0.96)}}
    summary = {"20mbit": report.aggregate_rate(runs, [0.97])}
    resist = summary["20mbit"]["resist"]
    assert (resist["time_to_target"]["0.97"]["reached"], resist["time_to_target"]["0.97"]["of"]) == (1, 3)
    assert resist["failed_seeds"] == [1, 2] and resist["final_acc_mean"] == 0.975
    summary["20mbit"]["local_sgd"]["comm_fraction"] = 0.6
    lines = cluster_bench.verdicts(summary, {}, [0.97], goals={"resist": 0.5}, best_of=["local_sgd", "diloco"],
                                   best_goals={"resist": 0.8})
    where = "target at 20mbit (local_sgd 60% communicating): "
    assert lines == [where + "resist's time to 97% <= 0.5x local_sgd's: 0.38x local_sgd's "
                             "(not judged: 97% on 1/3 seeds, local_sgd 3/3)",
                     where + "resist's time to 97% <= 0.8x the best of local_sgd, diloco: 0.38x local_sgd's "
                             "(not judged: 97% on 1/3 seeds, local_sgd 3/3)"]


def test_a_ratio_just_over_its_goal_is_printed_on_its_side_of_it():
    """A verdict judged 0.5004 against 0.5 "NOT met" and printed "0.50x" beside it; the printed
    ratio now shows as many decimals as the verdict needs, two where they agree with it."""
    runs = {"local_sgd": {s: _run(0.98, 40.0) for s in range(3)},
            "resist": {s: _run(0.98, 20.016) for s in range(3)}}
    summary = {"20mbit": report.aggregate_rate(runs, [0.97])}
    summary["20mbit"]["local_sgd"]["comm_fraction"] = 0.6
    summary["20mbit"]["resist"]["round_over_compute"] = 1.2
    lines = cluster_bench.verdicts(summary, {}, [0.97], goals={"resist": 0.5}, round_goals={"resist": 1.2})
    where = "target at 20mbit (local_sgd 60% communicating): "
    assert lines == [where + "resist's time to 97% <= 0.5x local_sgd's: 0.5004x local_sgd's (NOT met)",
                     where + "resist's round <= 1.2x its compute: 1.20x (met)"]
    assert [cluster_bench._ratio(r, g) for r, g in [(0.4996, 0.5), (0.5049, 0.5), (1.23, 1.2)]] == \
        ["0.50x", "0.505x", "1.23x"]  # (0.50 is met, as 0.4996 is)


def test_skip_existing_and_the_fit_take_only_runs_of_the_settings_asked_for(tmp_path, capsys):
    """--skip-existing took any run in OUT that had exited 0, and the fit of `auto` every probe in
    OUT/probes: a bench run again into the same OUT with other settings (--extra-args, a config)
    reported the earlier runs as its own, and fitted its rate through their probes."""
    args = cluster_bench.parse_args(["--out", str(tmp_path), "--extra-args", "--width 16"])
    jargs = cluster_bench.probe_args(args, "25mbit")
    out, cmd = compare.planned(jargs, "local_sgd", 0)
    for rate, t_comm, extra in [("25mbit", 1.0, "--width 16"), ("10mbit", 2.5, "--width 16"), ("5mbit", 9.0, "--width 8")]:
        path = tmp_path / "probes" / rate / "local_sgd-0"
        _fake_run(path, [t_comm] * 5, [1.0] * 5, [(60, 0.9)])
        then = cluster_bench.parse_args(["--out", str(tmp_path), "--extra-args", extra])
        with open(path / "launch.json", "w") as fh:
            json.dump({"cmd": compare.planned(cluster_bench.probe_args(then, rate), "local_sgd", 0)[1],
                       "returncode": 0}, fh)
    assert compare.finished(out, cmd) and compare.finished(out)
    other = cluster_bench.parse_args(["--out", str(tmp_path), "--extra-args", "--width 8"])
    assert not compare.finished(*compare.planned(cluster_bench.probe_args(other, "25mbit"), "local_sgd", 0))
    assert "had other settings: running it again" in capsys.readouterr().out
    probes = cluster_bench.read_probes(str(tmp_path), 0, "local_sgd", args)
    assert [p["rate"] for p in probes] == ["10mbit", "25mbit"]
    assert "probe 5mbit left out of the fit: it ran other settings" in capsys.readouterr().out
    assert [p["rate"] for p in cluster_bench.read_probes(str(tmp_path), 0, "local_sgd")] == ["5mbit", "10mbit", "25mbit"]
