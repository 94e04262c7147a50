"""Defects found reading the code and trying it as a new user, each pinned by a test that failed
before its fix (issue #20). Multi-rank cases run on thread ranks."""
import errno
import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision

import resist_mpi as rm
from cases import library as L
from resist_mpi.cli import checkpoint as ckpt
from resist_mpi.comm import ring_allreduce_bytes
from resist_mpi.comm.thread import run_ranks
from resist_mpi.data.loader import ShardLoader
from resist_mpi.data.datasets import TensorImageDataset


def test_warmup_takes_the_first_strategys_gradient_hooks_off_at_the_switch():
    """--warmup-epochs with --group-size: local SGD's gradient hooks stayed on after the switch, so
    every backward ran two gradient averages in the group (356 kB became 712 kB a round)."""
    models = [L.make_model() for _ in range(4)]

    def body(c):
        model = models[c.rank]
        opt = torch.optim.SGD(model.parameters(), lr=L.LR)
        job = rm.Warmup(rm.LocalSGD(model, c, optimizer=opt, group_size=2),
                        lambda: rm.ResIST(model, c, optimizer=opt, group_size=2, synchronized=True, seed=7), 1)
        per_backward = []
        for r in job.rounds(3):
            before = c.bytes_sent
            x, y = L.batch(c.rank, r)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            per_backward.append((job.name, c.bytes_sent - before, sum(p.numel() for p in job.parameters())))
            opt.step()
        return per_backward
    for per_backward in run_ranks(4, body):
        for name, sent, numel in per_backward:  # one average of this round's parameters in the group of 2
            assert sent == ring_allreduce_bytes(4 * numel, 2), (name, sent, numel)
        assert [n for n, _, _ in per_backward] == ["local_sgd", "resist", "resist"]


def test_bn_helpers_leave_the_models_statistics_as_they_found_them():
    model = L.make_model()
    c = rm.init("self", fail_fast=False)
    model.train()
    model(L.batch(0, 0)[0])
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    batches = [L.batch(0, k) for k in range(3)]

    def unchanged():
        now = model.state_dict()
        return all(torch.equal(saved[k], now[k]) for k in saved)
    rm.evaluate(model, c, batches, batch_stats=True)  # train-mode BN used to update the running stats
    assert unchanged() and model.training
    with rm.recalibrate_bn(model, c, batches, 2):
        assert not unchanged()  # recalibrated inside the block
    assert unchanged()
    job = rm.ResIST(model, c, seed=1)
    for _ in job.rounds(1):
        pass
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with job.full_model() as full:
        rm.recalibrate_bn(full, c, batches, 2)  # called plainly: full_model() still puts them back
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    def failing():  # a calibration whose second batch fails (a damaged image, a stop)
        yield batches[0]
        raise OSError("damaged")
    with pytest.raises(OSError):
        rm.recalibrate_bn(model, c, failing(), 2)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)  # they were left re-estimated
    read = []
    rm.recalibrate_bn(model, c, (read.append(b) or b for b in batches), 2, only=[])  # nothing to re-estimate
    assert read == []  # it read and ran the batches all the same (DataLoader workers started for nothing)


def test_a_last_batch_of_one_is_dropped_and_torchvision_trains_through_the_epoch():
    """129 samples on one rank with batch 128: the second batch had one sample, and torchvision's
    BatchNorm raised 'Expected more than 1 value per channel when training'."""
    images = torch.rand(129, 3, 32, 32)
    data = TensorImageDataset(images, torch.arange(129) % 10, (0.5,) * 3, (0.25,) * 3)
    loader = ShardLoader(data, 0, 1, 128)
    assert loader.steps_per_epoch == 1 and [len(y) for _, y in loader.epoch(0)] == [128]
    assert [len(y) for _, y in ShardLoader(data, 0, 1, 64).epoch(0)] == [64, 64]
    two = [ShardLoader(data, r, 2, 64) for r in range(2)]  # 65 per rank: the lone 65th is dropped
    assert [[len(y) for _, y in ld.epoch(0)] for ld in two] == [[64], [64]]
    model = torchvision.models.resnet18(num_classes=10)
    for x, y in ShardLoader(data, 0, 1, 128).epoch(0):
        F.cross_entropy(model(x), y).backward()
    test = ShardLoader(data, 0, 1, 128, train=False)  # evaluation keeps every sample
    assert [len(y) for _, y in test.epoch(0)] == [128, 1]
    # --eval-bn batch (BN with each test batch's own statistics) raised on that batch of one after
    # the whole training; it joins the batch before it, every sample counted
    c = rm.init("self", fail_fast=False)
    loss, acc = rm.evaluate(model, c, test.epoch(0), batch_stats=True)
    x, y = (torch.cat(t) for t in zip(*test.epoch(0)))
    model.train()
    out = model(x)
    assert acc == (out.argmax(1) == y).sum().item() / 129 and loss == pytest.approx(F.cross_entropy(out, y).item())


def test_checkpoint_rename_is_followed_by_a_directory_fsync(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    ckpt.atomic_save({"a": torch.ones(1)}, str(tmp_path / "x.pt"))
    assert synced[-1] == str(tmp_path)  # the directory, after the file itself
    assert str(tmp_path / "x.pt.tmp") in synced


def test_shards_are_written_without_zip_checksums_and_load_exactly_while_exports_keep_them(tmp_path):
    import zipfile
    state = {"w": torch.randn(64, 32), "n": torch.arange(7), "h": torch.randn(5).half()}
    writer = ckpt.ShardWriter()
    writer.submit(3, str(tmp_path / "ckpt"), {"blocks-00000.pt": {"rank": 0, "blocks": {1: state}}})
    writer.wait()
    assert writer.error is None and writer.done == 3
    shard = str(tmp_path / "ckpt" / "blocks-00000.pt")
    assert all(i.CRC == 0 for i in zipfile.ZipFile(shard).infolist())  # left out: the writer's CPU
    for mmap in (False, True):  # torch.load (resume) and verify's mmap read both take them
        back = torch.load(shard, map_location="cpu", weights_only=True, mmap=mmap)["blocks"][1]
        assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    ckpt.atomic_save(state, str(tmp_path / "export.pt"))  # the default (export): checksums written, valid
    with zipfile.ZipFile(str(tmp_path / "export.pt")) as z:
        assert z.testzip() is None and any(i.CRC != 0 for i in z.infolist())
    assert torch.serialization.get_crc32_options() is True  # the process-wide setting is restored


def test_a_checkpoint_that_cannot_be_written_leaves_nothing_under_its_name(tmp_path, monkeypatch):
    def full(*a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="cannot write checkpoint .*x.pt: .*unexpected pos"):
        ckpt.atomic_save({"a": torch.ones(1)}, str(tmp_path / "x.pt"))
    assert os.listdir(tmp_path) == []


def test_a_full_disk_in_the_middle_of_a_record_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    """torch's zip writer swallows the file's ENOSPC and reports "unexpected pos"; the one line
    must say the disk is full (seen when the shared layers were dealt out and the disk filled in
    the middle of a record)."""
    import errno

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def save(obj, f):
        f.fh = Full()
        try:
            f.write(b"PK")
        except OSError:
            pass
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match=r"cannot write checkpoint .*x.pt: \[Errno 28\] No space left on device$"):
        ckpt.atomic_save({"a": torch.ones(1)}, str(tmp_path / "x.pt"))
    assert os.listdir(tmp_path) == []


def test_the_checkpoint_writer_survives_any_error_and_runs_tasks_in_order(tmp_path):
    """A shard that torch cannot save (here: a lambda) ended the writer thread, and wait() then
    never returned; now it is the writer's one-line error and nothing after it is written. Tasks
    (rotation) run in submission order and their errors are ignored."""
    writer = ckpt.ShardWriter()
    seen = []
    writer.submit(0, str(tmp_path / "r0"), {"a.pt": {"x": torch.ones(2)}})
    writer.submit_task(lambda: seen.append(sorted(os.listdir(tmp_path / "r0"))))
    writer.submit_task(lambda: 1 / 0)
    writer.submit(1, str(tmp_path / "r1"), {"b.pt": {"f": lambda: 0}})
    writer.submit(2, str(tmp_path / "r2"), {"c.pt": {"x": torch.ones(2)}})
    waiting = threading.Thread(target=writer.wait, daemon=True)
    waiting.start()
    waiting.join(60)
    assert not waiting.is_alive(), "the writer thread died: wait() never returns"
    assert seen == [["a.pt"]] and writer.done == 0
    assert isinstance(writer.error, OSError) and "cannot write" in str(writer.error) and "\n" not in str(writer.error)
    assert not (tmp_path / "r2").exists() and not list(tmp_path.rglob("*.tmp"))


def test_an_out_directory_in_use_by_a_live_run_is_refused_and_a_dead_runs_lock_is_free(tmp_path):
    from helpers import out_lock_held_elsewhere
    out = str(tmp_path / "run")
    with out_lock_held_elsewhere(out) as holder:
        with pytest.raises(ckpt.CheckpointError, match=r"--out .* is in use by another run \(host .*, pid "
                                                       rf"{holder.pid}, since"):
            ckpt.OutLock(out)
    time.sleep(0.1)
    lock = ckpt.OutLock(out)  # the dead run's lock file is still there; its lock went with it
    assert f"pid {os.getpid()}" in open(os.path.join(out, ".lock")).read()
    lock.release()


def test_a_relaunch_waits_for_the_lock_a_lost_node_held_and_an_unlockable_out_says_so(tmp_path, monkeypatch, capsys):
    """After a lost node, NFS keeps its lock on --out until its lease ends: the relaunch was
    refused as "in use by another run" by the run it replaces, and the job script took that exit 2
    for bad input. --lock-wait waits for it. Where --out cannot be locked at all the run went on
    without a word."""
    from helpers import out_lock_held_elsewhere
    from resist_mpi.cli.config import parse_config, validate
    out = str(tmp_path / "run")
    with out_lock_held_elsewhere(out) as holder:
        with pytest.raises(ckpt.CheckpointError, match=r"in use by another run .*\(waited 1 s for it\)"):
            ckpt.OutLock(out, wait=1)
        threading.Timer(1.5, holder.kill).start()  # the lease ends
        t0 = time.monotonic()
        lock = ckpt.OutLock(out, wait=30)
        assert 1.0 < time.monotonic() - t0 < 30
    lock.release()
    assert validate(parse_config(["--lock-wait", "180"])).lock_wait == 180.0

    def no_locks(fh, how):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(ckpt.fcntl, "flock", no_locks)
    capsys.readouterr()
    ckpt.OutLock(str(tmp_path / "nfs")).release()
    assert f"--out {tmp_path / 'nfs'} cannot be locked (Function not implemented)" in capsys.readouterr().err


def _fake_checkpoint(directory, **over):
    """A complete sharded checkpoint of 4 ranks in groups of 2 (the whole model in shared.pt)."""
    import json
    os.makedirs(directory)
    files = {"shared.pt": {"model": L.make_model().state_dict(), "averagers": []}}
    files.update({ckpt.shard_name("rank", r): {"rank": r} for r in range(4)})
    for name, obj in files.items():
        torch.save(obj, os.path.join(directory, name))
    manifest = {"format": ckpt.FORMAT, "model_name": "preact_resnet34", "strategy": "resist", "round": 1,
                "world_size": 4, "epoch": 1.0, "config": {"width": 4, "group_size": "2"}, "blocks": {},
                "files": sorted(files), "bytes": {n: os.path.getsize(os.path.join(directory, n)) for n in files}}
    manifest.update(over)
    json.dump(manifest, open(os.path.join(directory, ckpt.MANIFEST), "w"))


def test_resume_under_another_strategy_is_refused_in_one_line(tmp_path):
    from resist_mpi.cli.config import Config
    path = tmp_path / "ckpt-000001"
    _fake_checkpoint(path)
    with torch.device("meta"):
        probe = L.make_model()
    cfg = Config(model="preact_resnet34", width=4, strategy="local_sgd", resume=str(path))
    with pytest.raises(ckpt.CheckpointError, match="written by --strategy resist, not local_sgd") as e:
        ckpt.resolve_and_load(cfg, probe, 0, 4)
    assert "\n" not in str(e.value)


def test_resume_with_another_group_size_says_its_per_rank_state_starts_afresh(tmp_path):
    from resist_mpi.cli.config import Config
    path = tmp_path / "ckpt-000001"
    _fake_checkpoint(path)
    with torch.device("meta"):
        probe = L.make_model()
    same = ckpt.resolve_and_load(Config(model="preact_resnet34", width=4, group_size="2", resume=str(path)), probe, 1, 4)
    assert same["same_layout"] and "rank_state_dropped" not in same
    assert same["reader"].rank_state(1) == {"rank": 1}
    other = ckpt.resolve_and_load(Config(model="preact_resnet34", width=4, group_size="1", resume=str(path)), probe, 1, 4)
    assert not other["same_layout"]
    assert other["rank_state_dropped"] == ("the checkpoint was written by 4 ranks in groups of 2, this run has 4 "
                                           "in groups of 1")
