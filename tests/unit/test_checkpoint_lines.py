"""A checkpoint folder written over in place is incomplete until its new manifest lands; a resumed
run moves the checkpoints of another line aside (never deletes them), so that rotation prunes only
its own and a later --resume auto continues its line; a resume with settings the checkpoint's run
cannot be continued with is refused with one line. In one process (the self backend, thread ranks)."""
import json
import os
import shutil
import time
import zipfile

import pytest
import torch

from resist_mpi import comm
from resist_mpi.cli import checkpoint as ckpt
from resist_mpi.cli import metrics
from resist_mpi.cli.config import Config, validate
from resist_mpi.cli.trainer import Trainer
from resist_mpi.comm.thread import run_ranks

TINY = dict(model="preact_resnet34", width=2, dataset="synthetic", epochs=2, batch_size=128, local_steps=3,
            bn_batches=1, checkpoint_rounds=1, eval_every=0, progress="off")


def _run(out, capsys=None, **kw):
    cfg = validate(Config(**{**TINY, "out": str(out), **kw}))
    if capsys is not None:
        capsys.readouterr()
    Trainer(cfg, comm.init("self", fail_fast=False)).run()
    return capsys.readouterr().out if capsys is not None else None


def _names(out):
    base = out / "checkpoints"
    return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


def _manifest(path):
    return json.load(open(os.path.join(path, ckpt.MANIFEST)))


def _fake_checkpoint(directory, round_index, files=("shared.pt", "rank-00000.pt")):
    os.makedirs(directory, exist_ok=True)
    for name in files:
        ckpt.atomic_save({"x": torch.full((4,), float(round_index))}, os.path.join(directory, name))
    manifest = {"format": ckpt.FORMAT, "round": round_index, "files": list(files),
                "bytes": {n: os.path.getsize(os.path.join(directory, n)) for n in files}}
    ckpt.atomic_write_text(json.dumps(manifest), os.path.join(directory, ckpt.MANIFEST))


# -- A: a folder written over in place ---------------------------------------------------------------------
def test_a_folder_written_over_is_incomplete_until_its_new_manifest(tmp_path, monkeypatch):
    """The old manifest goes before any new file: a write that fails half-way (a full disk after
    the first file) leaves no manifest naming a mix of new and old files of the same sizes."""
    d = str(tmp_path / "checkpoints" / "ckpt-000007")
    _fake_checkpoint(d, 7)
    assert ckpt.verify(d)[0] is not None
    real, calls = ckpt.atomic_save, []

    def full_disk(obj, path, crc32=True):
        calls.append(os.path.basename(path))
        if len(calls) == 2:
            raise OSError(f"cannot write checkpoint {path}: [Errno 28] No space left on device")
        real(obj, path, crc32)

    monkeypatch.setattr(ckpt, "atomic_save", full_disk)
    writer = ckpt.ShardWriter()
    new = {"x": torch.full((4,), 99.0)}  # the same size as the old files
    writer.submit(7, d, {"rank-00000.pt": new, "shared.pt": new})
    writer.wait()
    assert calls == ["rank-00000.pt", "shared.pt"] and "No space left" in str(writer.error)
    assert sorted(os.listdir(d)) == ["rank-00000.pt", "shared.pt"]  # the new rank file, the old shared.pt
    assert ckpt.verify(d) == (None, "no manifest (it was still being written)")

    # a write that succeeds: still incomplete (no manifest) until rank 0 commits the new one
    monkeypatch.setattr(ckpt, "atomic_save", real)
    _fake_checkpoint(d, 7)
    writer = ckpt.ShardWriter()
    writer.submit(7, d, {"rank-00000.pt": new, "shared.pt": new})
    writer.wait()
    assert writer.error is None and writer.done == 7
    assert ckpt.verify(d) == (None, "no manifest (it was still being written)")


# -- B: another line's checkpoints are moved aside -----------------------------------------------------------
def test_set_aside_moves_newer_checkpoints_and_rotation_ignores_newer_ones(tmp_path, monkeypatch):
    out = tmp_path / "run"
    for r in (1, 2, 3, 4, 5):
        _fake_checkpoint(str(out / "checkpoints" / f"ckpt-{r:06d}"), r)
    (out / "checkpoints" / "ckpt-000006").mkdir()  # a killed write's half: no manifest
    monkeypatch.setattr(ckpt.time, "strftime", lambda fmt: "20250101-120000")
    line = ckpt.set_aside_after(str(out), 3)
    aside = out / "checkpoints" / "abandoned-20250101-120000"
    assert line == (f"moved 2 checkpoint(s) not of this run's line (newer than round 3, the one resumed from: "
                    f"ckpt-000004, ckpt-000005) to {aside}; --resume auto and --keep-checkpoints ignore them there")
    assert _names(out) == ["abandoned-20250101-120000", "ckpt-000001", "ckpt-000002", "ckpt-000003"]
    assert sorted(p.name for p in aside.iterdir()) == ["ckpt-000004", "ckpt-000005"]
    assert ckpt.verify(str(aside / "ckpt-000005"))[0]["round"] == 5  # moved whole, still a checkpoint
    assert ckpt.newest_verified(str(out)) == (str(out / "checkpoints" / "ckpt-000003"), [])
    assert ckpt.set_aside_after(str(out), 3) is None  # nothing newer: nothing moved
    # a second set-aside in the same second gets its own folder; starting afresh (-1): all of them
    keep = str(out / "checkpoints" / "ckpt-000002")
    line = ckpt.set_aside_after(str(out), -1, keep=keep)
    assert line.startswith("moved 2 checkpoint(s) not of this run's line (all: ckpt-000001, ckpt-000003) to "
                           f"{aside}-2;")
    assert _names(out) == ["abandoned-20250101-120000", "abandoned-20250101-120000-2", "ckpt-000002"]

    # rotation: folders newer than this run's newest are neither counted nor removed
    for r in (3, 4, 5, 6):
        _fake_checkpoint(str(out / "checkpoints" / f"ckpt-{r:06d}"), r)
    ckpt.rotate(str(out), 2, newest=4)
    assert [n for n in _names(out) if n.startswith("ckpt")] == ["ckpt-000003", "ckpt-000004", "ckpt-000005",
                                                               "ckpt-000006"]
    ckpt.rotate(str(out), 2)  # without newest: as before, the newest 2 of all
    assert [n for n in _names(out) if n.startswith("ckpt")] == ["ckpt-000005", "ckpt-000006"]
    # --overwrite starts afresh: the set-aside lines go too
    ckpt.clear_out_dir(validate(Config(**{**TINY, "out": str(out), "overwrite": True})))
    assert _names(out) == []


def test_resume_auto_skipping_corrupt_checkpoints_moves_them_aside_and_keeps_its_own(tmp_path, capsys):
    """The audit's r3: the newest 3 checkpoints corrupt, --resume auto starts afresh; they used to
    stay "the newest", so rotation deleted every checkpoint the new run wrote. Now they are moved
    aside (not deleted) and the new run keeps its own newest 3."""
    out = tmp_path / "run"
    _run(out, keep_checkpoints=3)  # 8 steps an epoch, 3 a round: rounds 0-5, ckpt 1-6, the newest 3 kept
    assert _names(out) == ["ckpt-000004", "ckpt-000005", "ckpt-000006"]
    for n in _names(out):
        (out / "checkpoints" / n / "shared.pt").write_bytes(b"PK\x03\x04 not a zip")  # same name, any size
    old = {n: _manifest(out / "checkpoints" / n)["time"] for n in _names(out)}
    said = _run(out, capsys, epochs=1, keep_checkpoints=3, resume="auto", lr=0.05)  # afresh: writes ckpt 1-3
    (aside,) = [n for n in _names(out) if n.startswith("abandoned-")]
    assert _names(out) == [aside, "ckpt-000001", "ckpt-000002", "ckpt-000003"]  # its own, not pruned
    assert sorted(os.listdir(out / "checkpoints" / aside)) == list(old)
    assert {n: _manifest(out / "checkpoints" / aside / n)["time"] for n in old} == old  # moved, untouched
    for n in ("ckpt-000001", "ckpt-000002", "ckpt-000003"):  # the new run's own, complete
        manifest, why = ckpt.verify(str(out / "checkpoints" / n))
        assert why is None and manifest["config"]["lr"] == 0.05
    lines = [line for line in said.splitlines() if line.startswith("resume: ")]
    sizes = {n: _manifest(out / "checkpoints" / aside / n)["bytes"]["shared.pt"] for n in old}
    assert lines[:3] == [f"resume: skipped ckpt-00000{r}: shared.pt has 14 bytes, not {sizes[f'ckpt-00000{r}']} "
                         f"(truncated?)" for r in (6, 5, 4)]
    assert lines[3] == (f"resume: moved 3 checkpoint(s) not of this run's line (all: ckpt-000004, ckpt-000005, "
                        f"ckpt-000006) to {out / 'checkpoints' / aside}; --resume auto and --keep-checkpoints "
                        f"ignore them there")
    assert len(lines) == 4


def test_resume_from_an_older_checkpoint_moves_the_newer_line_aside(tmp_path, capsys):
    """The audit's r5: --resume PATH to an older checkpoint with another --lr left the old line's
    newer checkpoints in place, and a later --resume auto continued that line. Now they are moved
    aside, and --resume auto continues the line of the run that resumed."""
    out = tmp_path / "run"
    _run(out, keep_checkpoints=10)  # rounds 0-5, ckpt 1-6, lr 0.1
    assert _names(out) == [f"ckpt-{r:06d}" for r in range(1, 7)]
    said = _run(out, capsys, keep_checkpoints=10, epochs=1, lr=0.5,
                resume=str(out / "checkpoints" / "ckpt-000002"))  # trains round 2, ends at epoch 1
    (aside,) = [n for n in _names(out) if n.startswith("abandoned-")]
    assert _names(out) == [aside, "ckpt-000001", "ckpt-000002", "ckpt-000003"]
    assert [(n, _manifest(out / "checkpoints" / aside / n)["config"]["lr"])
            for n in sorted(os.listdir(out / "checkpoints" / aside))] == \
        [(f"ckpt-{r:06d}", 0.1) for r in range(3, 7)]
    assert [_manifest(out / "checkpoints" / f"ckpt-{r:06d}")["config"]["lr"] for r in (1, 2, 3)] == [0.1, 0.1, 0.5]
    assert [line for line in said.splitlines() if line.startswith("resume")] == [
        f"resume: moved 4 checkpoint(s) not of this run's line (newer than round 2, the one resumed from: "
        f"ckpt-000003, ckpt-000004, ckpt-000005, ckpt-000006) to {out / 'checkpoints' / aside}; --resume auto "
        f"and --keep-checkpoints ignore them there",
        f"resumed from {out / 'checkpoints' / 'ckpt-000002'} at round 2"]
    said = _run(out, capsys, keep_checkpoints=10, lr=0.5, resume="auto")
    assert f"resumed from {out / 'checkpoints' / 'ckpt-000003'} at round 3" in said.splitlines()
    assert [_manifest(out / "checkpoints" / f"ckpt-{r:06d}")["config"]["lr"] for r in range(1, 7)] == \
        [0.1, 0.1, 0.5, 0.5, 0.5, 0.5]


def test_going_back_to_a_line_set_aside_takes_it_back_and_sets_the_other_aside(tmp_path, capsys):
    """--resume PATH to a checkpoint in abandoned-*/ (what the docs advise to go back to that line)
    left the line it replaced in checkpoints/, interleaved with the resumed one: a later --resume
    auto (the resumed run killed before its first commit) went on with the other line, and rotation
    deleted the other line's checkpoints. Now that line goes aside whole and the checkpoint resumed
    from comes back, under its own name, where --resume auto and the records find it."""
    out = tmp_path / "run"
    _run(out, keep_checkpoints=10)  # line A: ckpt 1-6, lr 0.1
    _run(out, keep_checkpoints=10, epochs=1, lr=0.5, resume=str(out / "checkpoints" / "ckpt-000002"))  # line B
    (aside,) = [n for n in _names(out) if n.startswith("abandoned-")]
    back = out / "checkpoints" / aside / "ckpt-000005"
    said = _run(out, capsys, keep_checkpoints=10, resume=str(back))  # line A again, from its round 5
    names = _names(out)
    assert not back.exists() and [n for n in names if not n.startswith("abandoned-")] == ["ckpt-000005", "ckpt-000006"]
    assert [_manifest(out / "checkpoints" / n)["config"]["lr"] for n in ("ckpt-000005", "ckpt-000006")] == [0.1, 0.1]
    (b_aside,) = [n for n in names if n.startswith("abandoned-") and n != aside]
    assert sorted(os.listdir(out / "checkpoints" / b_aside)) == ["ckpt-000001", "ckpt-000002", "ckpt-000003"]
    assert f"resumed from {out / 'checkpoints' / 'ckpt-000005'} at round 5" in said.splitlines(), said
    from helpers import records
    assert records(out, "resume")[-1]["path"] == str(out / "checkpoints" / "ckpt-000005")
    newest, _ = ckpt.newest_verified(str(out))
    assert os.path.basename(newest) == "ckpt-000006" and _manifest(newest)["config"]["lr"] == 0.1


def test_a_rank_file_only_one_rank_reads_damaged_stops_every_rank_with_one_line_and_moves_nothing(tmp_path,
                                                                                                 capsys):
    """Rank 0 reads the shared files, rank 1 its own: a damaged rank-00001.pt raised on rank 1
    alone, in the middle of the run's start (a traceback, the job aborted with exit 1), after rank 0
    had moved the newer checkpoints aside for a line that never started."""
    kw = dict(epochs=1, batch_size=64, overlap=True, keep_checkpoints=10)
    out = tmp_path / "run"
    cfg = validate(Config(**{**TINY, **kw, "out": str(out)}))
    torch.set_num_threads(1)
    run_ranks(2, lambda c: Trainer(cfg, c).run())
    older, newest = ckpt.list_checkpoints(str(out))[-2:]
    rank_file = os.path.join(older, "rank-00001.pt")
    with zipfile.ZipFile(rank_file) as z:  # a tensor record's header zeroed: verify() reads no records
        record = [i for i in z.infolist() if "/data/" in i.filename][0]
    with open(rank_file, "r+b") as fh:
        fh.seek(record.header_offset)
        fh.write(b"\0" * 4)
    # its checksum tells it now (below); a manifest without them (an earlier version's) does not
    manifest_path = os.path.join(older, "manifest.json")
    manifest = json.load(open(manifest_path))
    del manifest["crc32"]
    open(manifest_path, "w").write(json.dumps(manifest))
    assert ckpt.verify(older)[0] is not None
    cfg = validate(Config(**{**TINY, **kw, "out": str(out), "epochs": 2, "resume": older}))
    capsys.readouterr()

    def body(c):
        try:
            Trainer(cfg, c).run()
        except SystemExit as e:
            return e.code
        return 0
    assert run_ranks(2, body) == [2, 2]
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resist_mpi: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"resist_mpi: error: checkpoint {older}: cannot read "
                                                     f"rank-00001.pt"), errors
    assert ckpt.list_checkpoints(str(out))[-2:] == [older, newest]  # nothing moved aside


def test_a_file_damaged_in_place_fails_its_checksum_and_resume_auto_takes_the_checkpoint_before(tmp_path, capsys):
    """256 bytes of a tensor overwritten, the size the same: verify() said complete (its load maps
    the file and reads no tensor) and the run resumed with 64 weights changed. The manifest holds
    every file's CRC-32, which the writing rank took as it wrote; the damaged checkpoint is skipped
    with a line that says why."""
    out = tmp_path / "run"
    _run(out, capsys, keep_checkpoints=10)
    *_, older, newest = ckpt.list_checkpoints(str(out))
    manifest = _manifest(newest)
    assert sorted(manifest["crc32"]) == sorted(manifest["files"])
    assert all(manifest["crc32"][n] == ckpt.file_crc32(os.path.join(newest, n)) for n in manifest["files"])
    blocks = sorted(n for n in manifest["files"] if n.startswith("blocks-"))[0]
    with zipfile.ZipFile(os.path.join(newest, blocks)) as z:
        record = [i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 1024][0]
    with open(os.path.join(newest, blocks), "r+b") as fh:
        fh.seek(record.header_offset + 30 + len(record.filename) + len(record.extra) + 256)
        fh.write(b"\x7f" * 256)
    assert ckpt.verify(older)[0] is not None
    assert ckpt.verify(newest)[1].startswith(f"{blocks} is damaged (its CRC-32 is ")
    said = _run(out, capsys, keep_checkpoints=10, epochs=3, resume="auto")
    assert f"resume: skipped {os.path.basename(newest)}: {blocks} is damaged (its CRC-32 is " in said
    assert f"resumed from {older} at round" in said


# -- C: settings a checkpoint cannot be continued with ---------------------------------------------------------
def _exit_code(cfg, c):
    try:
        Trainer(cfg, c)
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "run"
    cfg = validate(Config(**{**TINY, "out": str(out), "epochs": 1, "checkpoint_rounds": 0, "checkpoint_every": 1,
                             "batch_size": 64}))
    torch.set_num_threads(1)
    run_ranks(2, lambda c: Trainer(cfg, c).run())
    (path,) = ckpt.list_checkpoints(str(out))
    return path


@pytest.mark.parametrize("settings, said", [
    (dict(local_steps=6), "--local-steps 3, this run has --local-steps 6"),
    (dict(batch_size=32), "--batch-size 64, this run has --batch-size 32"),
    (dict(overlap=True), "no --overlap, this run has --overlap"),
    (dict(outer_optimizer="nesterov"), "--outer-optimizer average, this run has --outer-optimizer nesterov"),
    (dict(wire_dtype="int8"), "--wire-dtype float32, this run has --wire-dtype int8"),
    (dict(partition_stages="2,3"), "--partition-stages 3, this run has --partition-stages 2,3"),
    (dict(seed=5), "--seed 0, this run has --seed 5"),
    (dict(dataset="digits"), "--dataset synthetic, this run has --dataset digits"),
], ids=["local_steps", "batch_size", "overlap", "outer_optimizer", "wire_dtype", "partition_stages", "seed",
        "dataset"])
def test_resume_with_settings_the_checkpoint_cannot_continue_is_refused(two_rank_checkpoint, tmp_path, capsys,
                                                                      settings, said):
    """One line from one rank, exit 2 on every rank, before training, the checkpoint untouched."""
    files = {p: open(os.path.join(two_rank_checkpoint, p), "rb").read() for p in os.listdir(two_rank_checkpoint)}
    cfg = validate(Config(**{**TINY, "out": str(tmp_path / "new"), "epochs": 1, "batch_size": 64,
                             "resume": two_rank_checkpoint, **settings}))
    capsys.readouterr()
    assert run_ranks(2, lambda c: _exit_code(cfg, c)) == [2, 2]
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resist_mpi: error:")]
    assert errors == [f"resist_mpi: error: checkpoint {two_rank_checkpoint} was written with {said}: resume it "
                      f"with the checkpoint's setting, or start afresh with --overwrite"]
    assert files == {p: open(os.path.join(two_rank_checkpoint, p), "rb").read() for p in os.listdir(two_rank_checkpoint)}


def test_the_outer_step_size_and_momentum_of_a_nesterov_run_are_checked_at_a_resume():
    """The outer optimizer's loaded state overrode --outer-lr and --outer-momentum unsaid; with the
    plain average they do nothing, and another value is no reason to refuse."""
    nesterov = dict(overlap=False, outer_optimizer="nesterov", wire_dtype="float32", outer_lr=0.7, outer_momentum=0.9)
    manifest = {"world_size": 2, "config": nesterov}
    for changed, said in ((dict(outer_lr=0.5), "--outer-lr 0.7, this run has --outer-lr 0.5"),
                          (dict(outer_momentum=0.0), "--outer-momentum 0.9, this run has --outer-momentum 0.0")):
        cfg = validate(Config(**{**TINY, **nesterov, **changed}))
        with pytest.raises(ckpt.CheckpointError, match=f"written with {said}: resume it"):
            ckpt.check_resume_settings("ckpt", manifest, cfg, 2)
    ckpt.check_resume_settings("ckpt", manifest, validate(Config(**{**TINY, **nesterov})), 2)
    plain = {**nesterov, "outer_optimizer": "average"}
    ckpt.check_resume_settings("ckpt", {"world_size": 2, "config": plain},
                               validate(Config(**{**TINY, **plain, "outer_lr": 0.5})), 2)


def test_another_batch_size_on_another_world_size_still_resumes(two_rank_checkpoint, tmp_path):
    """With another number of ranks the start comes from the checkpoint's epoch (an elastic
    restart may change the per-rank batch to keep the global one): not refused."""
    cfg = validate(Config(**{**TINY, "out": str(tmp_path / "new"), "epochs": 1, "batch_size": 128,
                             "resume": two_rank_checkpoint}))
    assert _exit_code(cfg, comm.init("self", fail_fast=False)) == 0


@pytest.mark.parametrize("text, why", [
    ("[]", "its manifest is unreadable (not a JSON object)"),
    ('{"format": FORMAT}', "its manifest is unreadable (no list of files with their sizes)"),
    ('{"format": FORMAT, "files": ["shared.pt"], "bytes": {}}', "its manifest is unreadable (no list of files with their sizes)"),
    ('{"format": FORMAT, "files": "shared.pt", "bytes": {"shared.pt": 1}}',
     "its manifest is unreadable (no list of files with their sizes)"),
])
def test_a_malformed_manifest_is_unreadable_not_a_traceback(tmp_path, text, why):
    """verify() (behind --resume and `python -m resist_mpi.checkpoint verify`) says why a manifest of
    the wrong shape cannot be used, where it raised AttributeError or KeyError."""
    d = tmp_path / "ckpt-000003"
    d.mkdir()
    (d / ckpt.MANIFEST).write_text(text.replace("FORMAT", json.dumps(ckpt.FORMAT)))
    assert ckpt.verify(str(d)) == (None, why)
    assert ckpt.verify(str(tmp_path / "nope")) == (None, "no such directory")


def test_resume_path_into_an_out_that_holds_another_run_is_refused(tmp_path):
    """--resume PATH continues PATH's run: into an --out holding a run of which PATH is not a
    checkpoint it would write that run's continuation after the other run's records. Refused with
    one line; its own checkpoints (set-aside ones too), --resume auto and --overwrite go on."""
    out, other = tmp_path / "out", tmp_path / "other" / "checkpoints" / "ckpt-000004"
    (out / "checkpoints" / "ckpt-000002").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_out_dir(Config(out=str(out), resume=str(other)))
    assert str(e.value) == (f"--out {out} holds a run, and --resume {other} is not one of its checkpoints: "
                            "resume it into another --out, or pass --overwrite")
    for resume in (out / "checkpoints" / "ckpt-000002", out / "checkpoints" / "abandoned-1" / "ckpt-000005", "auto"):
        ckpt.check_out_dir(Config(out=str(out), resume=str(resume)))
    ckpt.check_out_dir(Config(out=str(out), resume=str(other), overwrite=True))
    ckpt.check_out_dir(Config(out=str(tmp_path / "new"), resume=str(other)))  # an empty --out: fine
    with pytest.raises(ckpt.CheckpointError, match="holds a run; pass --resume auto"):
        ckpt.check_out_dir(Config(out=str(out)))


def test_rounds_trained_again_after_a_world_size_change_count_the_old_worlds_rounds(tmp_path):
    """The membership record's rounds_repeated: the rounds the world before the change trained
    after the checkpoint (their work is lost and trained again), in that world's numbering; the new
    world's start round numbers another round length and said 0 here."""
    from helpers import records
    out = tmp_path / "run"
    cfg = validate(Config(**{**TINY, "out": str(out), "batch_size": 64, "keep_checkpoints": 10}))
    torch.set_num_threads(1)
    run_ranks(2, lambda c: Trainer(cfg, c).run())
    last = max(r["round"] for r in records(out, "round"))
    for name in _names(out):  # the job lost a node after ckpt-000002's round: the newer ones never landed
        if int(name[-6:]) > 2:
            shutil.rmtree(out / "checkpoints" / name)
    _run(out, resume="auto", batch_size=64, keep_checkpoints=10)
    (member,) = records(out, "membership")
    assert (member["previous_world_size"], member["world_size"]) == (2, 1)
    assert last >= 4 and member["rounds_repeated"] == last + 1 - 2


def test_resume_auto_of_a_finished_run_says_so_and_leaves_its_records(tmp_path, capsys):
    """A requeued job whose run had finished: one line naming its last checkpoint, nothing trained,
    metrics.jsonl as it was (no second resume record), no final accuracy line."""
    out = tmp_path / "run"
    _run(out, epochs=1)
    records = (out / "metrics.jsonl").read_text()
    said = _run(out, capsys, epochs=1, resume="auto")
    newest = ckpt.list_checkpoints(str(out))[-1]
    assert said.strip().splitlines()[-1] == (f"resist_mpi: {newest} ends the run's 1 epochs: nothing to train (a larger "
                                             "--epochs trains on; --overwrite starts afresh)")
    assert (out / "metrics.jsonl").read_text() == records
    # the finished run's last record says so (what the job scripts read after a launcher's exit 0)
    lines = records.splitlines()
    done = json.loads(lines[-1])
    rounds = [json.loads(line) for line in lines if '"event": "round"' in line]
    assert (done["event"], done["round"], done["epoch"]) == ("done", rounds[-1]["round"], 1.0), done
    assert [json.loads(line)["event"] for line in lines[-3:-1]] == ["eval", "checkpoint"] and metrics.finished(str(out))
    # a run killed after its last checkpoint, before that record (here with a record cut short):
    # the requeue with nothing to train adds it, after the records that were whole
    (out / "metrics.jsonl").write_text("\n".join(lines[:-1]) + '\n{"event": "eva')
    assert not metrics.finished(str(out))
    _run(out, capsys, epochs=1, resume="auto")
    again = (out / "metrics.jsonl").read_text().splitlines()
    assert again[:-1] == lines[:-1] and json.loads(again[-1])["event"] == "done" and metrics.finished(str(out))


def test_a_resume_on_more_ranks_numbers_the_checkpoints_by_the_new_worlds_rounds(tmp_path, capsys):
    """More ranks number the same epoch with a lower round (fewer steps per rank to an epoch): the
    1-rank run's checkpoint of round 8 (epoch 3 of 4) continues on 2 ranks at round 4. The folder
    it was read from becomes ckpt-000004, the old world's folders from 4 on are moved aside, so the
    run's own checkpoints are the newest by number: a later --resume auto finds the finished run,
    not the old world's ckpt-000008 (which would train epoch 4 again). Then metrics.jsonl through
    further resumes (again on 2 ranks, on 4, on 4 once more): both worlds' rounds, each epoch once
    and in order, every change of the world recorded once."""
    out = tmp_path / "run"
    torch.set_num_threads(1)
    _run(out, epochs=4, keep_checkpoints=20)  # 1 rank: 8 steps an epoch, 11 rounds of 3
    for name in _names(out):  # a node lost after ckpt-000008 (the state after round 7, epoch 3)
        if int(name[-6:]) > 8:
            shutil.rmtree(out / "checkpoints" / name)
    old = {name: _manifest(out / "checkpoints" / name) for name in _names(out)}
    cfg = validate(Config(**{**TINY, "out": str(out), "epochs": 4, "keep_checkpoints": 20, "resume": "auto"}))
    capsys.readouterr()
    run_ranks(2, lambda c: Trainer(cfg, c).run())  # 4 steps an epoch: rounds 4 and 5 of 6
    said = capsys.readouterr().out
    assert "resume: renamed ckpt-000008 to ckpt-000004: this world of more ranks numbers the same epoch as round 4" \
        in said, said
    names = _names(out)
    aside = [n for n in names if n.startswith(ckpt.ABANDONED)]
    assert len(aside) == 1 and sorted(os.listdir(out / "checkpoints" / aside[0])) == [
        f"ckpt-00000{k}" for k in (4, 5, 6, 7)]
    for k in (4, 5, 6, 7):  # moved, not deleted: the old world's checkpoints as they were
        assert _manifest(out / "checkpoints" / aside[0] / f"ckpt-00000{k}") == old[f"ckpt-00000{k}"]
    assert [n for n in names if not n.startswith(ckpt.ABANDONED)] == [f"ckpt-00000{k}" for k in range(1, 7)]
    manifests = {k: _manifest(out / "checkpoints" / f"ckpt-00000{k}") for k in range(1, 7)}
    assert manifests[4] == old["ckpt-000008"]  # renamed, its manifest as written (round 8 of 1 rank)
    assert [(manifests[k]["world_size"], manifests[k]["round"]) for k in (5, 6)] == [(2, 5), (2, 6)]
    newest, skipped = ckpt.newest_verified(str(out))
    assert (os.path.basename(newest), skipped, _manifest(newest)["epoch"]) == ("ckpt-000006", [], 4.0)
    run_ranks(2, lambda c: Trainer(cfg, c).run())  # a requeue of the finished job: nothing to train
    assert "ckpt-000006 ends the run's 4 epochs: nothing to train" in capsys.readouterr().out
    # the record keeps both worlds' rounds, each stretch of training once, in order; a resume on
    # the same 2 ranks (from ckpt-000005) keeps the 1-rank world's rounds numbered above 5
    from helpers import records
    epochs = [r["epoch"] for r in records(out, "round")]
    shutil.rmtree(out / "checkpoints" / "ckpt-000006")
    run_ranks(2, lambda c: Trainer(cfg, c).run())
    again = [r["epoch"] for r in records(out, "round")]
    assert again == sorted(set(again)) and again == epochs, (again, epochs)
    assert [r["epoch"] for r in records(out, "resume")] == [3.0, 3.75]  # both resumes, once each
    # on 4 ranks from ckpt-000005 (epoch 3.75: round 2 there): renumbered again, and the record
    # keeps the first change's membership record (its round, 4, counts the 2-rank world's rounds)
    shutil.rmtree(out / "checkpoints" / "ckpt-000006")
    run_ranks(4, lambda c: Trainer(cfg, c).run())
    assert [(m["previous_world_size"], m["world_size"], m["round"], m["epoch"]) for m in records(out, "membership")] \
        == [(1, 2, 4, 3.0), (2, 4, 2, 3.0)]
    final = [r["epoch"] for r in records(out, "round")]
    assert final == sorted(set(final)) and final[:len(epochs) - 1] == epochs[:-1] and final[-1] == 4.0, final
    assert [n for n in _names(out) if not n.startswith(ckpt.ABANDONED)] == ["ckpt-000001", "ckpt-000002", "ckpt-000003"]
    assert _manifest(out / "checkpoints" / "ckpt-000002")["round"] == 5  # the 2-rank world's, renamed
    # the resume on 2 ranks from ckpt-000005 came after that checkpoint: its record went with its rounds
    resumes = [(r["epoch"], r["world_size"]) for r in records(out, "resume")]
    assert resumes == [(3.0, 2), (3.0, 4)], resumes
    # the 4-rank run lost before its first checkpoint landed: the same resume again, its records once
    shutil.rmtree(out / "checkpoints" / "ckpt-000003")
    run_ranks(4, lambda c: Trainer(cfg, c).run())
    assert [(r["epoch"], r["world_size"]) for r in records(out, "resume")] == resumes
    assert [(m["previous_world_size"], m["world_size"]) for m in records(out, "membership")] == [(1, 2), (2, 4)]
    assert [r["epoch"] for r in records(out, "round")] == final


class _Writer:
    """torch.utils.tensorboard.SummaryWriter as RunLog calls it (tensorboard is an optional extra)."""
    made = []

    def __init__(self, logdir, purge_step=None):
        self.logdir, self.purge_step, self.scalars = logdir, purge_step, []
        _Writer.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        pass


def test_tensorboard_events_follow_the_record_at_a_resume_and_go_with_overwrite(tmp_path, monkeypatch):
    """The records after a resumed checkpoint are dropped from metrics.jsonl, and TensorBoard purges
    its events from the first round the resumed run logs (they used to show beside the new ones);
    --overwrite deletes the old run's tb/ with its records (it used to stay, mixing two runs)."""
    import types

    from resist_mpi.cli.metrics import RunLog
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=_Writer))
    out = tmp_path / "run"
    log = RunLog(str(out), True, "off", 6, tensorboard=True)
    for r in range(6):
        log.record("round", round=r, epoch=r / 2, train_loss=1.0 / (r + 1))
    log.close()
    log = RunLog(str(out), True, "off", 2, tensorboard=True, resume_round=4, resume_epoch=1.5)
    log.record("round", round=4, epoch=2.0, train_loss=0.5)
    log.close()
    first, resumed = _Writer.made[-2:]
    assert (first.purge_step, resumed.purge_step) == (0, 4)  # a fresh run: any older events purged too
    assert resumed.logdir == str(out / "tb") and resumed.scalars == [("round/epoch", 2.0, 4), ("round/train_loss", 0.5, 4)]
    assert [r["round"] for r in map(json.loads, open(out / "metrics.jsonl"))] == [0, 1, 2, 3, 4]

    (out / "tb").mkdir()
    (out / "tb" / "events.out.tfevents.1.host").write_bytes(b"old run")
    ckpt.clear_out_dir(validate(Config(**{**TINY, "out": str(out), "overwrite": True})))
    assert sorted(os.listdir(out)) == []


def test_a_resume_that_starts_at_round_0_of_a_larger_world_keeps_the_records_before_its_epoch(tmp_path):
    """A checkpoint early in epoch 0 resumed on more ranks starts at the new world's round 0
    (round_at_epoch), and the record was then read as a fresh run's: every record was deleted."""
    from resist_mpi.cli.metrics import RunLog
    out = tmp_path / "run"
    log = RunLog(str(out), True, "off", 6)
    for r in range(3):
        log.record("round", round=r, epoch=r / 20, train_loss=1.0)
    log.close()
    RunLog(str(out), True, "off", 6, resume_round=0, resume_epoch=0.05, resumed_as=(0.0, 8)).close()
    assert [(r["round"], r["epoch"]) for r in map(json.loads, open(out / "metrics.jsonl"))] == [(0, 0.0), (1, 0.05)]


def test_a_disk_slower_than_the_rounds_holds_training_back_and_a_failed_write_keeps_the_rounds_before(
        tmp_path, monkeypatch):
    """The writer's queue had no bound: with files slower to write than a round, every round queued
    a CPU copy of the state (4-6 rounds behind in an audit), and when a write then failed (a full
    disk) every rank ended before rank 0 committed, so the rounds whose files were all written got
    no manifest and --resume auto went back to the last one committed. Now a snapshot waits while
    one is queued behind the one being written, and the rounds written whole are committed before
    the run ends."""
    out = tmp_path / "run"
    real, failing = ckpt.atomic_save, "ckpt-000006"

    def slow(obj, path, crc32=True):
        if failing in path:
            raise OSError(f"cannot write checkpoint {path}: [Errno 28] No space left on device")
        time.sleep(0.25)
        return real(obj, path, crc32)
    monkeypatch.setattr(ckpt, "atomic_save", slow)
    queued, most, submit, write = [0], [0], ckpt.ShardWriter.submit, ckpt.ShardWriter._write

    def counting(self, *args):
        queued[0] += 1
        most[0] = max(most[0], queued[0])
        submit(self, *args)

    def written(self, *args):
        try:
            write(self, *args)
        finally:
            queued[0] -= 1
    monkeypatch.setattr(ckpt.ShardWriter, "submit", counting)
    monkeypatch.setattr(ckpt.ShardWriter, "_write", written)
    cfg = validate(Config(**{**TINY, "out": str(out), "epochs": 4, "keep_checkpoints": 20}))
    c = comm.init("self", fail_fast=False)

    def abort(code):
        raise SystemExit(code)
    c.abort = abort
    torch.set_num_threads(1)
    with pytest.raises(SystemExit):
        Trainer(cfg, c).run()
    assert most[0] <= 2  # one being written, one waiting
    newest, _ = ckpt.newest_verified(str(out))
    assert os.path.basename(newest) == "ckpt-000005", _names(out)  # every round before the failed one


def test_a_resume_on_other_training_data_is_refused_where_it_would_land_at_another_epoch(tmp_path, capsys):
    """On the same world size a resume continues at the checkpoint's round: with another training
    set (a --data-dir packed again with fewer images) that round was another epoch, and the
    schedule and the data order jumped without a word."""
    import h5py
    from resist_mpi.data.packing import main as data_main
    full, part = str(tmp_path / "a.h5"), str(tmp_path / "b.h5")
    assert data_main(["pack", "digits", full]) == 0
    with h5py.File(full, "r") as src, h5py.File(part, "w") as dst:
        for key in ("train/images", "train/labels"):
            dst.create_dataset(key, data=src[key][:1000])
        for key in ("test/images", "test/labels"):
            dst.create_dataset(key, data=src[key][:])
        dst.attrs.update(dict(src.attrs))
    out = tmp_path / "run"
    settings = dict(TINY, dataset="hdf5", data_dir=full, epochs=1, checkpoint_every=1, out=str(out))
    Trainer(validate(Config(**settings)), comm.init("self", fail_fast=False)).run()
    (newest,) = ckpt.list_checkpoints(str(out))[-1:]
    assert _manifest(newest)["steps_per_epoch"] == 12  # 1437 images in batches of 128
    capsys.readouterr()
    cfg = validate(Config(**{**settings, "data_dir": part, "epochs": 2, "resume": "auto"}))
    with pytest.raises(SystemExit) as e:
        Trainer(cfg, comm.init("self", fail_fast=False))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"resist_mpi: error: checkpoint {newest} was written with 12 steps an epoch on 1 ranks, "
                             f"this run has 8 (1000 training images): its training data changed"), err
    Trainer(validate(Config(**{**settings, "epochs": 2, "resume": "auto"})), comm.init("self", fail_fast=False)).run()


def test_after_two_changes_of_the_world_the_records_name_the_renamed_folder_and_count_no_round_twice(tmp_path):
    """1 rank, then 2 (from ckpt-000004, renamed ckpt-000002 for their rounds), then 1 again: the
    resume record named ckpt-000004, which the renaming had moved (and which the new world later
    wrote again); the second membership record took the 1-rank world's round 3 for the last one
    trained (round numbers of two worlds compared) and said 1 round was trained again, where the
    2-rank world had stopped exactly at its checkpoint."""
    from helpers import records
    out = tmp_path / "run"
    kw = dict(strategy="local_sgd", keep_checkpoints=10)
    _run(out, **kw)
    cfg = validate(Config(**{**TINY, **kw, "out": str(out), "resume": str(out / "checkpoints" / "ckpt-000004")}))
    torch.set_num_threads(1)
    run_ranks(2, lambda c: Trainer(cfg, c).run())
    first = records(out, "resume")[-1]
    assert (first["round"], first["path"]) == (2, str(out / "checkpoints" / "ckpt-000002"))
    _run(out, **kw, epochs=3, resume="auto")
    last = records(out, "membership")[-1]
    assert (last["previous_world_size"], last["world_size"], last["rounds_repeated"]) == (2, 1, 0), last
