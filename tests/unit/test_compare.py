"""benchmarks/compare.py's report from finished runs: training and evaluation traffic apart."""
import json
import os

from helpers import benchmark_module

compare = benchmark_module("compare")


def _run(path, rounds, evals):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as fh:
        for r in rounds + evals:
            fh.write(json.dumps(r) + "\n")


def test_train_and_eval_bytes_reported_apart(tmp_path):
    rounds = [{"event": "round", "round": i, "step": 10 * (i + 1), "bytes_sent": 100, "bytes_recv": 100,
               "t_compute": 1.0, "t_comm": 0.5} for i in range(3)]
    evals = [{"event": "eval", "round": 2, "epoch": 1.0, "test_acc": 0.96, "wallclock": 4.5, "t_eval": 1.5,
              "bytes_sent": 7_000_000, "bytes_recv": 7_000_000}]
    _run(tmp_path / "resist-0", rounds, evals)
    run = compare.summarise_run(str(tmp_path / "resist-0"), [0.95, 0.97])
    assert run["bytes"] == 600 and run["eval_bytes"] == 14_000_000
    # the time to target with and without the evaluation's own 1.5 s
    assert run["time_to_target"] == {"0.95": {"wallclock": 4.5, "epoch": 1.0, "train_wallclock": 3.0}, "0.97": None}
    assert run["eval_time"] == 1.5 and run["evals"] == 1
    summary = compare.aggregate({"resist": {0: run}}, [0.95, 0.97])
    assert summary["resist"]["bytes_mean"] == 600 and summary["resist"]["eval_bytes_mean"] == 14_000_000
    table = compare.format_table(summary, [0.95, 0.97])
    assert "bytes (train)" in table and "bytes (eval)" in table
    cells = [c.strip() for c in table.splitlines()[-1].split("|")]
    assert cells[-4:-2] == ["0.0 MB", "14.0 MB"]  # training, then evaluation


def test_training_rounds_fold_an_evaluations_early_exchange_back_into_its_round():
    from resist_mpi.cli.metrics import training_rounds
    recs = [{"event": "round", "round": 0, "t_comm": 1.0, "bytes_sent": 10, "bytes_recv": 10},
            {"event": "eval", "round": 0, "t_next_exchange": 0.5, "bytes_next_exchange": 7},
            {"event": "round", "round": 1, "t_comm": 0.25, "bytes_sent": 3, "bytes_recv": 3},
            {"event": "eval", "round": 1, "t_next_exchange": 0.0, "bytes_next_exchange": 0},
            {"event": "round", "round": 2, "t_comm": 1.0, "bytes_sent": 10, "bytes_recv": 10}]
    out = training_rounds(recs)
    assert [(r["round"], r["t_comm"], r["bytes_sent"], r["bytes_recv"]) for r in out] == \
        [(0, 1.0, 10, 10), (1, 0.75, 10, 10), (2, 1.0, 10, 10)]
    assert recs[2]["bytes_sent"] == 3  # the records themselves are left as they were
    # across nodes too (those bytes were in neither record)
    recs[1].update(bytes_cross_next_exchange=4)
    for r, cross in zip(recs[::2], (6, 1, 6)):
        r["bytes_cross_node"] = cross
    assert [r["bytes_cross_node"] for r in training_rounds(recs)] == [6, 5, 6]


def test_the_early_exchanges_bytes_across_nodes_are_counted_apart():
    """EvalMeter counted the next round's early exchange's bytes sent, not those across nodes,
    and started the evaluation's own counts after it: they were in no record."""
    import torch

    from resist_mpi.cli.trainer import EvalMeter
    from resist_mpi.comm.thread import run_ranks

    def body(c):
        meter = EvalMeter(c)
        c.allreduce_mean_(torch.ones(1000))  # the exchange, between the two nodes
        meter.mark_next_exchange()
        sent, _, cross, *_, early_sent, _, early_cross = meter.totals()
        return sent, cross, early_sent, early_cross
    for sent, cross, early_sent, early_cross in run_ranks(2, body, nodes=[0, 1]):
        assert (sent, cross) == (0, 0) and early_sent == early_cross == 2 * 4000  # 4000 bytes a rank, 2 ranks


def test_eval_cost_net_cost_from_runs_with_and_without_evaluations(tmp_path, capsys):
    eval_cost = benchmark_module("eval_cost")

    def rounds(n, early_after=()):
        return [{"event": "round", "round": i, "step": i + 1, "t_compute": 3.0, "bytes_sent": 1, "bytes_recv": 1,
                 "t_comm": 0.5 if i in early_after else 1.0} for i in range(n)]

    def ev(i, wall, t_eval, early=0.0):
        return {"event": "eval", "round": i, "epoch": i + 1, "test_acc": 0.9, "wallclock": wall, "t_eval": t_eval,
                "t_gather": t_eval / 2, "t_calibrate": t_eval / 4, "t_test": t_eval / 4, "t_return": 0.0,
                "t_next_exchange": early, "bytes_next_exchange": 5 if early else 0}

    _run(tmp_path / "every-0", rounds(5, early_after=(2, 4)), [ev(1, 10.0, 2.0, 0.5), ev(3, 20.0, 2.0, 0.5),
                                                                 ev(4, 30.0, 2.0)])
    _run(tmp_path / "none-0", rounds(5), [ev(4, 22.0, 1.0)])
    out = tmp_path / "cost.json"
    assert eval_cost.main(["--every", str(tmp_path / "every-0"), "--label", "x", "--none", str(tmp_path / "none-0"),
                           "--every", str(tmp_path / "every-0"), "--label", "y", "--none", "", "--json", str(out)]) == 0
    assert "net_eval_s" not in json.load(open(out))["groups"]["y"]["mean"]  # no run without evaluations given
    mean = json.load(open(out))["groups"]["x"]["mean"]
    # rounds 2 and 4 get their early exchange back: every training round is 4 s
    assert mean["t_round"] == 4.0 and mean["t_eval"] == 2.0 and mean["eval_over_round"] == 0.5
    assert mean["net_eval_s"] == (30.0 - 22.0) / (3 - 1) and mean["net_over_round"] == 1.0
    assert "x" in capsys.readouterr().out


def test_time_to_target_without_evaluations_counts_only_what_background_ones_made_training_wait(tmp_path):
    """A synchronous evaluation's record is written when it is done (all of t_eval came before its
    wallclock); a background one's wallclock is when it started, and training lost only t_eval_wait."""
    rounds = [{"event": "round", "round": i, "step": 10 * (i + 1), "bytes_sent": 0, "bytes_recv": 0,
               "t_compute": 1.0, "t_comm": 0.5} for i in range(4)]
    evals = [{"event": "eval", "round": 0, "epoch": 0.5, "test_acc": 0.5, "wallclock": 2.0, "t_eval": 1.0,
              "background": True, "t_eval_wait": 0.25, "bytes_sent": 0, "bytes_recv": 0},
             {"event": "eval", "round": 1, "epoch": 1.0, "test_acc": 0.96, "wallclock": 5.0, "t_eval": 1.0,
              "background": True, "t_eval_wait": 0.5, "bytes_sent": 0, "bytes_recv": 0},
             {"event": "eval", "round": 3, "epoch": 2.0, "test_acc": 0.98, "wallclock": 9.0, "t_eval": 2.0,
              "bytes_sent": 0, "bytes_recv": 0}]
    _run(tmp_path / "resist-0", rounds, evals)
    run = compare.summarise_run(str(tmp_path / "resist-0"), [0.95, 0.97])
    assert run["time_to_target"] == {"0.95": {"wallclock": 5.0, "epoch": 1.0, "train_wallclock": 4.75},
                                     "0.97": {"wallclock": 9.0, "epoch": 2.0, "train_wallclock": 6.25}}
    # --overlap: a delayed evaluation's wallclock is when its round's average landed, before it ran
    # (training waited for all of it, which counts for the later ones)
    evals[1] = {**evals[1], "delayed": True, "background": False}
    _run(tmp_path / "resist-1", rounds, evals)
    run = compare.summarise_run(str(tmp_path / "resist-1"), [0.95, 0.97])
    assert run["time_to_target"] == {"0.95": {"wallclock": 5.0, "epoch": 1.0, "train_wallclock": 4.75},
                                     "0.97": {"wallclock": 9.0, "epoch": 2.0, "train_wallclock": 5.75}}


def test_a_run_started_outside_the_repo_root_writes_its_metrics_beside_its_launch_record(tmp_path, monkeypatch):
    """The job ran from the repo root with the relative --out, the bench wrote train.log and
    launch.json relative to where it was started: two folders, and the report found no metrics."""
    from types import SimpleNamespace
    ran = []

    def fake_run(cmd, log, env, timeout):
        ran.append(cmd)
        # the job runs from the repo root (its folder there would be missing: the write fails)
        open(os.path.join(compare.ROOT, cmd[cmd.index("--out") + 1], "metrics.jsonl"), "w").close()
        return 0
    monkeypatch.setattr(compare, "run_logged", fake_run)
    monkeypatch.chdir(tmp_path)
    args = SimpleNamespace(out="bench", mpirun="mpirun", np=2, config="configs/demo.yaml", epochs=0, extra_args="",
                           timeout=10)
    compare.run_one(args, "local_sgd", 0)
    out = ran[0][ran[0].index("--out") + 1]
    assert out == str(tmp_path / "bench" / "local_sgd-0")
    assert sorted(os.listdir(out)) == ["launch.json", "metrics.jsonl", "train.log"]
