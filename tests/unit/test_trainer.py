"""The CLI's trainer and checkpoints in one process (the self backend): a run, its records, and a
resume from a checkpoint that continues bit for bit, for every strategy and the warm-up."""
import json
import os
import shutil

import pytest
import torch

from resist_mpi.cli import checkpoint as ckpt
from resist_mpi import comm
from resist_mpi.cli.config import Config, validate
from resist_mpi.cli.trainer import Trainer

TINY = dict(model="preact_resnet34", width=2, dataset="synthetic", epochs=2, batch_size=128, local_steps=3,
            bn_batches=1, checkpoint_every=1, keep_checkpoints=5, progress="off")


def _run(out, **kw):
    cfg = validate(Config(**{**TINY, "out": str(out), **kw}))
    result = Trainer(cfg, comm.init("self", fail_fast=False)).run()
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return result, recs


@pytest.mark.parametrize("kw", [dict(strategy="resist"), dict(strategy="local_sgd"),
                                dict(strategy="data_parallel"), dict(strategy="resist", warmup_epochs=1),
                                dict(strategy="resist", optimizer_state="keep_shared"),
                                dict(strategy="local_sgd", wire_dtype="int8"),
                                dict(strategy="resist", overlap=True, outer_optimizer="nesterov", checkpoint_rounds=1)],
                         ids=["resist", "local_sgd", "data_parallel", "warmup", "resist-momentum", "local_sgd-int8",
                              "resist-overlap-outer-every-round"])
def test_run_then_resume_from_a_checkpoint_bit_for_bit(tmp_path, kw):
    result, recs = _run(tmp_path / "full", **kw)
    rounds = [r for r in recs if r["event"] == "round"]
    assert [r["round"] for r in rounds] == list(range(6)) and result["epoch"] == 2.0
    # 8 steps an epoch, 3 a round: the warm-up's rounds are those starting before step 8 (0, 1, 2)
    assert [r["strategy"] for r in rounds] == \
        [("local_sgd" if kw.get("warmup_epochs") and r["round"] < 3 else kw["strategy"]) for r in rounds]
    assert len([r for r in recs if r["event"] == "switch"]) == (1 if kw.get("warmup_epochs") else 0)
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path / "full"))]
    every = kw.get("checkpoint_rounds")
    assert names == ([f"ckpt-{r:06d}" for r in range(2, 7)] if every else ["ckpt-000003", "ckpt-000006"])
    first = "ckpt-000003"  # after epoch 1 (round 2)
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / first, part / first)
    resumed, recs2 = _run(tmp_path / "part", resume="auto", **kw)
    assert resumed == result
    assert [r for r in recs2 if r["event"] == "resume"][0]["round"] == 3
    keep = ("round", "train_loss", "train_acc", "bytes_sent")
    assert [{k: r[k] for k in keep} for r in recs2 if r["event"] == "round"] == \
        [{k: r[k] for k in keep} for r in rounds[3:]]
    a = ckpt.full_state_dict(ckpt.Reader(*_verified(tmp_path / "full" / "checkpoints" / "ckpt-000006")))
    b = ckpt.full_state_dict(ckpt.Reader(*_verified(part / "ckpt-000006")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_record_cut_short_at_the_end_of_the_metrics_does_not_stop_a_resume(tmp_path):
    """A full disk or a kill in the middle of a record's write leaves a last line without its
    newline: the resume read it as a bad record (ValueError, a traceback, every requeue the same).
    It goes; a bad line anywhere else is still an error."""
    from resist_mpi.cli.metrics import read_metrics
    out = tmp_path / "run"
    _run(out, epochs=1)
    whole = (out / "metrics.jsonl").read_text()
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"event": "round", "round": 3, "trai')
    assert len(read_metrics(str(out))) == whole.count("\n")
    result, recs = _run(out, epochs=2, resume="auto")
    assert result["epoch"] == 2.0 and [r["round"] for r in recs if r["event"] == "round"] == list(range(6))
    (tmp_path / "bad.jsonl").write_text('{"event": "round", "round": 0}\n{"event": \n{"event": "eval"}')
    with pytest.raises(ValueError, match="bad.jsonl:2: not a JSON record"):
        read_metrics(str(tmp_path / "bad.jsonl"))
    assert read_metrics(str(tmp_path / "bad.jsonl"), until_damaged=True) == [{"event": "round", "round": 0}]


def test_a_damaged_record_in_the_metrics_is_kept_aside_and_the_resume_goes_on(tmp_path, capsys):
    """A line in the middle that is not JSON (a disk's damage, an edit gone wrong) stopped every
    resume with a traceback. The records before it go on; the whole file is copied aside first."""
    out = tmp_path / "run"
    _run(out, epochs=1)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    damaged = "".join(lines[:2] + ["{not json\n"] + lines[2:])
    (out / "metrics.jsonl").write_text(damaged)
    capsys.readouterr()
    result, recs = _run(out, epochs=2, resume="auto")
    said = capsys.readouterr().out
    (aside,) = [p for p in os.listdir(out) if p.startswith("metrics.jsonl.damaged-")]
    assert (out / aside).read_text() == damaged
    assert f"resume: {out / 'metrics.jsonl'}:3: not a JSON record" in said and str(out / aside) in said
    assert recs[:2] == [json.loads(line) for line in lines[:2]] and result["epoch"] == 2.0
    assert [r["round"] for r in recs if r["event"] == "round"] == [r["round"] for r in map(json.loads, lines[:2])
                                                                   if r["event"] == "round"] + list(range(3, 6))


def test_the_round_at_a_checkpoints_epoch_is_not_lost_to_rounding():
    from resist_mpi.cli.trainer import round_at_epoch
    assert 15 / 11 * 22 < 30 and round_at_epoch(15 / 11, 22, 1) == 30 and round_at_epoch(15 / 11, 22, 3) == 10
    assert round_at_epoch(29.99 / 22, 22, 1) == 29 and round_at_epoch(0.5, 8, 3) == 1 and round_at_epoch(0.0, 8, 3) == 0


def _verified(path):
    manifest, why = ckpt.verify(str(path))
    assert manifest is not None, why
    return str(path), manifest


def _run_ranks(out, size, nodes=None, **kw):
    from resist_mpi.comm.thread import run_ranks
    cfg = validate(Config(**{**TINY, "out": str(out), "checkpoint_rounds": 1, "keep_checkpoints": 10,
                             "eval_every": 0, "batch_size": 64, **kw}))
    torch.set_num_threads(1)
    return run_ranks(size, lambda c: Trainer(cfg, c).run(), nodes=nodes)[0]


def test_group_size_node_resumed_on_nodes_of_another_shape_drops_the_per_rank_state(tmp_path, capsys):
    """4 ranks as 2 nodes of 2 (--group-size node: groups of 2) resumed as 4 nodes of 1 (groups of
    1): the layout was judged by the setting, "node" both times, so the same; the groups' per-rank
    state was read as this layout's (IndexError on ranks 2 and 3). The manifest now records the
    groups' size, and the same shape again keeps the per-rank state."""
    kw = dict(strategy="resist", epochs=1, batch_size=32, group_size="node", wire_dtype="int8")
    out = tmp_path / "run"
    _run_ranks(out, 4, nodes=[0, 0, 1, 1], **kw)
    path = ckpt.list_checkpoints(str(out))[-2]
    assert json.load(open(os.path.join(path, "manifest.json")))["group_size"] == "2"
    for nodes, same in (([0, 1, 2, 3], False), ([0, 0, 1, 1], True)):
        capsys.readouterr()
        result = _run_ranks(tmp_path / f"again-{same}", 4, nodes=nodes, resume=path, **kw)
        assert result["epoch"] == 1.0
        lines = capsys.readouterr().out.splitlines()
        dropped = [m for m in lines if "per-rank state" in m]
        assert (dropped == []) == same, lines
        if not same:
            assert "written by 4 ranks in groups of 2, this run has 4 in groups of 1" in dropped[0]


@pytest.mark.parametrize("size, kw, dealt", [
    (2, dict(strategy="resist"), True),
    (4, dict(strategy="resist", group_size="2", wire_dtype="int8"), True),
    (4, dict(strategy="local_sgd"), True),
    (2, dict(strategy="data_parallel"), True),
    (2, dict(strategy="resist", overlap=True), False),
    (2, dict(strategy="resist", overlap=True, outer_optimizer="nesterov", optimizer_state="keep_shared"), False),
], ids=["resist-2", "resist-groups-int8-4", "local_sgd-4", "data_parallel-2", "resist-overlap-2",
        "resist-overlap-outer-keep-2"])
def test_sharded_checkpoints_deal_the_shared_layers_out_and_resume_bit_for_bit(tmp_path, size, kw, dealt):
    """With plain averages every rank holds the shared layers alike at a round boundary, so each
    writes its part (shared-RRRRR.pt) instead of rank 0 writing them all; every shared entry is in
    exactly one file, and a run resumed from such a checkpoint (thread ranks) continues bit for bit.
    With an overlapped average the ranks' values differ: rank 0 writes them all, as before, and the
    average in flight when the checkpoint was written is in every rank's file and applied on resume."""
    result = _run_ranks(tmp_path / "full", size, **kw)
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path / "full"))]
    path, manifest = _verified(tmp_path / "full" / "checkpoints" / names[1])
    if kw.get("overlap"):
        for r in range(size):
            ranks = torch.load(os.path.join(path, ckpt.shard_name("rank", r)), weights_only=True)
            assert ranks["averagers"][0]["pending_update"].numel() > 0
    shared = torch.load(os.path.join(path, "shared.pt"), weights_only=True)
    owner = shared["dealt"]
    parts = {f for f in manifest["files"] if f.startswith("shared-")}
    if not dealt:
        assert owner == {} and parts == set() and all(v is not None for v in shared["model"].values())
    else:
        assert parts == {ckpt.shard_name("shared", r) for r in range(1, size)}  # every rank has a part
        assert set(owner) == {k for k, v in shared["model"].items() if v is None}
        assert set(owner) <= set(shared["averaged_keys"])
        for r in range(1, size):
            part = torch.load(os.path.join(path, ckpt.shard_name("shared", r)), weights_only=True)["model"]
            assert set(part) == {k for k, o in owner.items() if o == r}
    full = ckpt.full_state_dict(ckpt.Reader(path, manifest))
    assert all(v is not None for v in full.values())
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(path, part / names[1])
    assert _run_ranks(tmp_path / "part", size, resume="auto", **kw) == result
    a = ckpt.full_state_dict(ckpt.Reader(*_verified(tmp_path / "full" / "checkpoints" / names[-1])))
    b = ckpt.full_state_dict(ckpt.Reader(*_verified(part / names[-1])))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_deal_balances_the_bytes_each_rank_writes():
    """shard.deal: largest entry first to the rank with the fewest bytes so far (its blocks
    counted), ties to the lowest rank; the same answer for the same input."""
    from resist_mpi.strategies.shard import deal, merge_dealt
    sizes = {"a": 50, "b": 40, "c": 30, "d": 20, "e": 10, "f": 10}
    assert deal(sizes, [0, 0, 0]) == {"a": 0, "b": 1, "c": 2, "d": 2, "e": 1, "f": 0}  # 60, 50, 50 bytes
    assert deal(sizes, [100, 0, 0]) == {"a": 1, "b": 2, "c": 2, "d": 1, "e": 1, "f": 2}  # rank 0's blocks
    assert deal(sizes, [0]) == {k: 0 for k in sizes}
    assert deal({}, [0, 0]) == {}
    shared = {"model": {"a": None, "x": torch.ones(1), "b": None}, "dealt": {"a": 1, "b": 2}}
    merged = merge_dealt(shared, {1: {"a": torch.zeros(2)}, 2: {"b": torch.full((1,), 2.0)}})
    assert list(merged["model"]) == ["a", "x", "b"] and merged["model"]["b"].item() == 2.0
    with pytest.raises(KeyError):
        merge_dealt(shared, {1: {}, 2: {"b": torch.ones(1)}})


def test_imagenet_style_model_trains_on_an_image_folder(tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(d / f"{i}.png")
    result, recs = _run(tmp_path / "run", model="preact_resnet50_imagenet", dataset="imagefolder",
                        data_dir=str(tmp_path / "data"), image_size=64, epochs=1, batch_size=8, local_steps=2,
                        checkpoint_every=0)
    rounds = [r for r in recs if r["event"] == "round"]
    assert len(rounds) == 1 and rounds[0]["step"] == 2  # 16 images, 8 a step: one round of 2 steps
    assert 0.0 <= result["test_acc"] <= 1.0


def test_checkpoint_cli_verifies_and_exports_a_plain_state_dict(tmp_path, capsys):
    """`python -m resist_mpi.checkpoint verify|export`: a complete checkpoint verifies; export
    writes one state_dict file that torch alone loads (weights_only), equal to the checkpoint's full
    model and shaped like a fresh model; a damaged newest checkpoint in a run directory is skipped
    with a line saying why, and the previous one exported."""
    from resist_mpi.models import create_model
    _run(tmp_path / "run", strategy="resist")
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path / "run"))]
    old, new = [str(tmp_path / "run" / "checkpoints" / n) for n in names[-2:]]
    assert ckpt.main(["verify", new]) == 0
    assert "complete (round" in capsys.readouterr().out
    out = tmp_path / "model.pt"
    assert ckpt.main(["export", new, str(out)]) == 0
    state = torch.load(out, weights_only=True)
    fresh = create_model(TINY["model"], num_classes=10, width=TINY["width"]).state_dict()
    assert state.keys() == fresh.keys() and all(state[k].shape == fresh[k].shape for k in fresh)
    full = ckpt.full_state_dict(ckpt.Reader(*_verified(new)))
    assert all(torch.equal(state[k], full[k]) for k in state)
    blocks = next(p for p in os.listdir(new) if p.startswith("blocks-"))
    with open(os.path.join(new, blocks), "r+b") as f:  # an interrupted copy
        f.truncate(os.path.getsize(os.path.join(new, blocks)) // 2)
    capsys.readouterr()
    assert ckpt.main(["verify", new]) == 1
    assert "incomplete" in capsys.readouterr().out
    assert ckpt.main(["export", str(tmp_path / "run"), str(tmp_path / "older.pt")]) == 0
    captured = capsys.readouterr()
    assert os.path.basename(new) in captured.err and os.path.basename(old) in captured.out
    older = torch.load(tmp_path / "older.pt", weights_only=True)
    expect = ckpt.full_state_dict(ckpt.Reader(*_verified(old)))
    assert older.keys() == fresh.keys() and all(torch.equal(older[k], expect[k]) for k in older)


@pytest.mark.parametrize("nodes, flag, background", [
    ([0, 0], None, False), ([0, 1], None, True), ([0, 1], False, False), ([0, 0], True, True)],
    ids=["one-node", "two-nodes", "two-nodes-off", "one-node-on"])
def test_evaluations_run_in_the_background_by_default_only_where_the_ranks_span_nodes(tmp_path, capsys, nodes, flag,
                                                                                       background):
    from resist_mpi.comm.thread import run_ranks
    cfg = validate(Config(**{**TINY, "out": str(tmp_path), "strategy": "resist", "checkpoint_every": 0,
                             "batch_size": 64, "eval_every": 1, "eval_background": flag}))
    torch.set_num_threads(1)

    def rank(c):
        c.set_nodes(nodes)  # where each rank runs, as learn_nodes would have found it
        return Trainer(cfg, c).run()

    results = run_ranks(2, rank)
    assert results[0] == results[1]
    evals = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["event"] == "eval"]
    # epoch 1's evaluation in the background or not; the last one always waited for
    assert [r.get("background", False) for r in evals] == [background, False]
    out = capsys.readouterr().out
    assert ("each evaluation but the last runs in the background" in out) == (background and flag is None)
    assert "--overlap:" not in out  # (no --overlap here)


def test_evaluations_under_overlap_leave_the_training_as_without_them(tmp_path, capsys):
    """--overlap: each evaluation but the last waits in a copy for its round's average, which lands in
    the next round (Strategy.evaluation_copy(flush=False)), so the rounds are those of a run
    without evaluations, to the bit (an evaluation that applied the average early changed them).
    2 epochs of 8 steps, rounds of 3: evaluations due after rounds 2 and 5; the first is recorded
    after round 3, marked delayed, with the run's clock then; in the background (--eval-background)
    the same results. The run says so once. The average lands after 1 step of the next round (the
    default, half of 3): with --overlap-steps 0 (at the round's end) every round after the first differs."""
    from helpers import records, round_records
    kw = dict(strategy="resist", epochs=2, overlap=True, checkpoint_every=0, bn_batches=2)
    keys = ("round", "train_loss", "bytes_sent", "bytes_recv")
    runs = {name: tmp_path / name for name in ("final", "every", "background", "late")}
    results = {}
    for name, extra in [("final", dict(eval_every=0)), ("every", dict(eval_every=1, eval_background=False)),
                        ("background", dict(eval_every=1, eval_background=True)),
                        ("late", dict(eval_every=0, overlap_steps=0))]:
        results[name] = _run_ranks(runs[name], 2, **kw, **extra)
    losses = [round_records(runs[name], "train_loss") for name in ("final", "late")]
    assert losses[0][0] == losses[1][0] and all(a != b for a, b in zip(losses[0][1:], losses[1][1:]))
    assert results["late"] != results["final"]
    out = capsys.readouterr().out
    assert out.count("--overlap: a round's average lands after 1 of the next round's 3 steps (--overlap-steps); each "
                     "evaluation but the last is of its round's model with that average") == 2
    assert round_records(runs["every"], *keys) == round_records(runs["final"], *keys)
    assert round_records(runs["background"], *keys) == round_records(runs["final"], *keys)
    assert results["every"] == results["background"] == results["final"]
    every, background = records(runs["every"], "eval"), records(runs["background"], "eval")
    assert [(e["round"], e.get("delayed", False), e.get("background", False)) for e in every] == \
        [(2, True, False), (5, False, False)]
    assert [(e["round"], e.get("delayed", False), e.get("background", False)) for e in background] == \
        [(2, True, True), (5, False, False)]
    assert [(e["test_loss"], e["test_acc"]) for e in every] == [(e["test_loss"], e["test_acc"]) for e in background]
    lines = [json.loads(line) for line in open(runs["every"] / "metrics.jsonl")]
    order = [(r["event"], r["round"]) for r in lines if r["event"] in ("round", "eval")]
    assert order.index(("eval", 2)) == order.index(("round", 3)) + 1  # recorded when the average landed
    clock = {r["round"]: r["wallclock"] for r in lines if r["event"] == "round"}
    assert clock[3] <= every[0]["wallclock"] < clock[4]


class _StopAtRound2:
    """StopRequest as if a signal came during round 2 (each rank reads it once per round)."""

    def __init__(self, *args, **kwargs):
        self.reads, self.signal_name = 0, "SIGUSR1"

    @property
    def requested(self) -> bool:
        self.reads += 1
        return self.reads == 3

    def close(self) -> None:
        pass


def test_a_stop_under_overlap_checkpoints_before_its_evaluation_and_the_requeue_goes_on_bit_for_bit(
        tmp_path, monkeypatch):
    """A stop after round 2, where an evaluation is due: the evaluation applies the average in flight
    (the run ends there), so the checkpoint is written before it and holds the run as it would have
    gone on; the requeued run's rounds and results are the uninterrupted run's, to the bit."""
    import resist_mpi.cli.trainer as trainer_module
    from helpers import records, round_records
    kw = dict(strategy="resist", epochs=2, overlap=True, checkpoint_every=0, checkpoint_rounds=0, eval_every=1)
    keys = ("round", "train_loss", "train_acc", "bytes_sent")
    full = _run_ranks(tmp_path / "full", 2, **kw)
    with monkeypatch.context() as patched:
        patched.setattr(trainer_module, "StopRequest", _StopAtRound2)
        _run_ranks(tmp_path / "part", 2, **kw)
    assert [(r["round"], r["exit"]) for r in records(tmp_path / "part", "stop")] == [(2, 99)]
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path / "part"))] == ["ckpt-000003"]
    stopped = records(tmp_path / "part", "eval")
    assert [e["round"] for e in stopped] == [2] and not stopped[0].get("delayed")
    resumed = _run_ranks(tmp_path / "part", 2, resume="auto", **kw)
    assert resumed == full
    assert round_records(tmp_path / "part", *keys) == round_records(tmp_path / "full", *keys)
    assert [(e["round"], e["test_loss"], e["test_acc"]) for e in records(tmp_path / "part", "eval")] == \
        [(e["round"], e["test_loss"], e["test_acc"]) for e in records(tmp_path / "full", "eval")]


def test_a_resists_checkpoint_resumed_with_a_longer_warmup_goes_on_as_resist(tmp_path):
    """A checkpoint ResIST wrote after the switch, resumed where this run's --warmup-epochs puts the
    switch later (or another world size puts its round before it): the warm-up handed ResIST's
    shards to local SGD, which had no blocks to read (a traceback on every rank). ResIST's state
    says the warm-up is over: the run goes on as ResIST, as the run that wrote it."""
    kw = dict(strategy="resist", epochs=3, warmup_epochs=1, eval_every=0, checkpoint_every=0, checkpoint_rounds=1)
    full = tmp_path / "full"
    result, recs = _run(full, **kw)
    rounds = [r for r in recs if r["event"] == "round"]
    assert [r["strategy"] for r in rounds] == ["local_sgd"] * 3 + ["resist"] * 5  # 8 steps an epoch, 3 a round
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "ckpt-000005", part / "ckpt-000005")  # after round 4: ResIST's
    resumed, recs2 = _run(tmp_path / "part", resume="auto", **{**kw, "warmup_epochs": 2})  # the switch at round 6
    assert resumed == result
    keep = ("round", "strategy", "train_loss", "train_acc", "bytes_sent")
    assert [{k: r[k] for k in keep} for r in recs2 if r["event"] == "round"] == \
        [{k: r[k] for k in keep} for r in rounds[5:]]


def test_resume_on_another_world_size_continues_at_the_same_epoch(tmp_path):
    """2 ranks wrote it, 4 (then 1) continue: each loads the blocks of its new first round, an
    overlapped average in flight is applied, a membership record says what changed. (Thread ranks:
    the checkpoint and the trainer are the ones a launch runs; tests/e2e/test_cli.py resumes under
    mpirun.)"""
    kw = dict(strategy="resist", epochs=2, overlap=True, checkpoint_every=0)
    full = tmp_path / "np2"
    _run_ranks(full, 2, **kw)
    rounds = [r for r in map(json.loads, open(full / "metrics.jsonl")) if r["event"] == "round"]
    for size in (4, 1):
        run = tmp_path / f"np{size}"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(full / "checkpoints" / "ckpt-000003", run / "checkpoints" / "ckpt-000003")
        result = _run_ranks(run, size, resume="auto", **kw)
        recs = list(map(json.loads, open(run / "metrics.jsonl")))
        first = [r for r in recs if r["event"] == "round"][0]
        spe = json.load(open(run / "config.json"))["steps_per_epoch"]
        assert abs(first["epoch"] - first["step"] / spe) < 1e-9
        assert first["epoch"] > rounds[2]["epoch"] and first["world_size"] == size
        member = [r for r in recs if r["event"] == "membership"]
        assert len(member) == 1 and member[0]["previous_world_size"] == 2 and member[0]["world_size"] == size
        assert result["epoch"] == 2.0 and result["test_acc"] > 0.05


def test_round_records_do_not_depend_on_evaluations(tmp_path):
    """Training does not depend on evaluations: the rounds' losses are those of a run without them.
    An evaluation that a round follows leaves each rank its next round's blocks (ResIST's
    prepare_round), so that round moves fewer bytes than without the evaluation (the part of its
    exchange that ran early is the eval record's bytes_next_exchange), the others the same.
    Evaluations in the background (--eval-background) see the same models and give the same
    results, and leave the rounds exactly as without evaluations (the gather on background
    communicators). On 2 thread ranks; the same with DataLoader workers under mpirun:
    tests/e2e/test_cli.py::test_round_records_do_not_depend_on_loader_workers."""
    from helpers import records, round_records
    kw = dict(strategy="resist", epochs=3, checkpoint_every=0, bn_batches=2)
    keys = ("round", "train_loss", "bytes_sent", "bytes_recv")
    rounds = {}
    for name, extra in [("final", dict(eval_every=0)), ("every", dict(eval_every=1)),
                        ("background", dict(eval_every=1, eval_background=True))]:
        _run_ranks(tmp_path / name, 2, **kw, **extra)
        rounds[name] = round_records(tmp_path / name, *keys)
    evals, final = records(tmp_path / "every", "eval"), rounds["final"]
    assert len(evals) == 3 and len(records(tmp_path / "final", "eval")) == 1 and len(final) > 3
    early = {e["round"] + 1: e["bytes_next_exchange"] for e in evals[:-1]}
    assert evals[-1]["bytes_next_exchange"] == 0  # nothing follows the last round
    every = rounds["every"]
    assert [(r["round"], r["train_loss"]) for r in every] == [(r["round"], r["train_loss"]) for r in final]
    for r, f in zip(every, final):
        if r["round"] in early:
            assert r["bytes_sent"] + early[r["round"]] <= f["bytes_sent"]
        else:
            assert r["bytes_sent"] == f["bytes_sent"]
    assert any(r["bytes_sent"] + early[r["round"]] < f["bytes_sent"] for r, f in zip(every, final) if r["round"] in early)
    assert all(e["bytes_sent"] > 0 for e in evals)  # the gather is counted where it happens
    assert rounds["background"] == final
    background = records(tmp_path / "background", "eval")
    assert [(e["round"], e["test_loss"], e["test_acc"]) for e in background] == \
        [(e["round"], e["test_loss"], e["test_acc"]) for e in evals]
    assert [e.get("background", False) for e in background] == [True, True, False]
    assert all(e["bytes_sent"] > 0 and e["t_eval_wait"] >= 0 for e in background[:-1])
