"""The training CLI end to end under mpirun: what only a real launch shows. Whole-job behaviour (a
failing or unreachable rank, bad input, a diverging run, a full disk, an unreadable image: one line
and a non-zero exit on every rank), DataLoader workers forked by a rank, resume bit for bit across
processes. The arithmetic of rounds is tested on thread ranks in tests/unit; the messages of every
bad input, an --out that holds a run or is in use by a live one, in tests/unit/test_cli_errors.py."""
import json
import os
import shutil
import subprocess
import time

import pytest
import torch

from helpers import mpirun, records, requires, round_records, trainings_args

pytestmark = requires("mpi", "slow")

TINY = ["--model", "preact_resnet34", "--width", "4", "--batch-size", "64", "--local-steps", "4"]


def test_failing_rank_aborts_job_fast(tmp_path):
    """Rank 1's uncaught exception ends the whole job within seconds of it (the others would wait in
    the barrier for ever). Timed from the moment rank 1 raises, not from the launch: the ranks'
    start-up takes from seconds to most of a minute with what shares the cores."""
    script, raised = tmp_path / "boom.py", tmp_path / "raised"
    script.write_text(
        "import time\n"
        "from resist_mpi import comm\n"
        "c = comm.init('mpi')\n"
        "if c.rank == 1:\n"
        f"    open({str(raised)!r}, 'w').write(repr(time.time()))\n"
        "    raise RuntimeError('rank one fails')\n"
        "c.barrier()  # the others would wait here forever\n")
    p = mpirun(4, [str(script)], timeout=180)  # a hang ends in TimeoutExpired
    assert time.time() - float(raised.read_text()) < 20
    assert p.returncode != 0
    assert p.stderr.count("RuntimeError: rank one fails") == 1
    assert "[rank 1/4] uncaught exception" in p.stderr


def test_unreachable_rank_ends_job_with_one_line(tmp_path):
    """A rank that stops answering (SIGSTOP: like a node whose link is cut) makes the others' watchdog
    abort the job with one line naming it, instead of waiting in the collective for ever."""
    script, stopped = tmp_path / "lost.py", tmp_path / "stopped"
    script.write_text(
        "import os, signal, time\n"
        "from resist_mpi import comm\n"
        "from resist_mpi.cli.watchdog import Watchdog\n"
        "c = comm.init('mpi')\n"
        "wd = Watchdog(c, timeout=3, probe_timeout=2)\n"
        "wd.beat('the test phase')\n"
        "if c.rank == 2:\n"
        f"    open({str(stopped)!r}, 'w').write(repr(time.time()))\n"
        "    os.kill(os.getpid(), signal.SIGSTOP)\n"
        "    time.sleep(120)  # Open MPI sends SIGCONT before it kills: stay as silent as a cut-off node\n"
        "c.barrier()\n"
        "print('passed the barrier')\n")
    p = mpirun(3, [str(script)], timeout=180)  # a hang ends in TimeoutExpired
    assert time.time() - float(stopped.read_text()) < 30  # timed from the loss, not the ranks' start-up
    assert p.returncode != 0 and "passed the barrier" not in p.stdout
    errors = _errors(p)
    assert len(errors) == 1, p.stderr[-3000:]
    assert errors[0].startswith("resist_mpi: error: lost rank 2 (") and "in the test phase" in errors[0]


def _train(np_, out, *args, timeout=600):
    return mpirun(np_, ["-m", "resist_mpi.train", "--out", str(out), "--progress", "off", *args], timeout=timeout)


def _errors(p):
    return [line for line in p.stderr.splitlines() if line.startswith("resist_mpi: error:")]


def _copy_checkpoint(full, part, name):
    os.makedirs(part / "checkpoints")
    shutil.copytree(full / "checkpoints" / name, part / "checkpoints" / name)


def _full_state(run, name):
    from resist_mpi.cli import checkpoint as ckpt
    path = str(run / "checkpoints" / name)
    manifest, why = ckpt.verify(path)
    assert manifest is not None, why
    return ckpt.full_state_dict(ckpt.Reader(path, manifest))


@pytest.mark.parametrize("np_, extra", [
    (4, ["--group-size", "2", "--wire-dtype", "int8", "--optimizer-state", "keep"]),
], ids=["resist-groups-int8-keep"])
def test_resume_continues_bit_for_bit(tmp_path, np_, extra):
    """Every rank's own state must come back (the optimizer's under a keep policy, error feedback,
    with groups every member's copy), or the resumed run drifts: a real launch, stopped and started
    again, resumes from its second checkpoint. Plain ResIST on 2 ranks and an overlapped average with
    the outer step in flight resume bit for bit on thread ranks (tests/unit/test_trainer.py,
    test_sharded_checkpoints_deal_the_shared_layers_out_and_resume_bit_for_bit)."""
    args = [*TINY, "--epochs", "2", "--eval-every", "1", "--checkpoint-rounds", "1", "--keep-checkpoints", "10",
            "--bn-batches", "1", *extra]
    full, part = tmp_path / "full", tmp_path / "part"
    p = _train(np_, full, *args)
    assert p.returncode == 0, p.stderr[-3000:]
    names = sorted(os.listdir(full / "checkpoints"))
    assert names[-1] == f"ckpt-{len(records(full, 'round')):06d}" and len(names) >= 3
    copy = names[1]
    _copy_checkpoint(full, part, copy)
    p = _train(np_, part, *args, "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _full_state(full, names[-1]), _full_state(part, names[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(full, "eval")[-1]["test_loss"] == records(part, "eval")[-1]["test_loss"]
    # the resumed rounds are the uninterrupted run's rounds, their traffic included
    keys = ("round", "train_loss", "bytes_sent", "bytes_recv")
    resumed = round_records(part, *keys)
    assert resumed and resumed == round_records(full, *keys)[-len(resumed):]
    assert records(part, "resume")[0]["round"] == resumed[0]["round"] == int(copy[-6:])


def test_bad_input_one_line_nonzero_everywhere(tmp_path):
    """One launch per kind of failure that the ranks must agree on before training (a bad setting,
    a partition that cannot be, a damaged checkpoint): one line from one rank, exit 2 everywhere,
    no traceback, nothing of the user's touched. (Every message: tests/unit/test_cli_errors.py.)
    The bad setting reaches rank 0 last (it starts 3 s late): the line must still come, although
    the other rank rejected the setting first (its exit makes mpirun end the job, rank 0 too)."""
    cut = tmp_path / "ckpt"
    cut.mkdir()
    (cut / "manifest.json").write_text("{truncated")
    late = tmp_path / "rank0_late.py"
    late.write_text("import os, sys, time\n"
                    "if os.environ['OMPI_COMM_WORLD_RANK'] == '0':\n"
                    "    time.sleep(3)\n"
                    "from resist_mpi.cli.train import main\n"
                    "sys.exit(main(sys.argv[1:]))\n")
    train = ["-m", "resist_mpi.train"]
    for np_, program, args, message in [
            (2, [str(late)], ["--epochs", "0"], "--epochs must be at least 1"),
            (4, train, ["--epochs", "1", "--model", "preact_resnet18"], "4 ranks but only 1 partitionable blocks"),
            (2, train, ["--epochs", "1", "--resume", str(cut)], "its manifest is unreadable")]:
        before = sorted(p.name for p in cut.iterdir())
        p = mpirun(np_, [*program, "--out", str(tmp_path / "run"), "--progress", "off", "--width", "4", *args],
                   timeout=120)  # a hang ends in TimeoutExpired; the start-up's time is the machine's
        assert p.returncode == 2
        assert len(_errors(p)) == 1 and message in _errors(p)[0], p.stderr[-2000:]
        assert "Traceback" not in p.stderr
        assert sorted(q.name for q in cut.iterdir()) == before


def test_diverging_run_stops_with_its_own_exit_and_keeps_the_finite_checkpoint(tmp_path):
    """--lr 1e6: every rank stops after the first non-finite round with one line and exit 4; the
    checkpoint on disk is the finite one from before, and metrics.jsonl is strict JSON. One launch:
    a finite epoch with its checkpoint, then the diverging run resumed from it (helpers.TRAININGS
    ends the launch with the status of the first training that fails)."""
    out = tmp_path / "run"
    base = ["--out", out, "--progress", "off", *TINY]
    p = mpirun(2, trainings_args([[*base, "--epochs", "1", "--checkpoint-every", "1", "--bn-batches", "1"],
                                  [*base, "--epochs", "3", "--lr", "1e6", "--resume", "auto", "--checkpoint-rounds", "1"]]),
               timeout=600)
    assert p.returncode == 4, p.stderr[-3000:]
    errors = _errors(p)
    assert len(errors) == 1 and "training diverged: non-finite" in errors[0] and "exit 4" in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    first = [r for r in records(out, "round") if r["epoch"] <= 1 + 1e-9]  # the finite epoch's rounds
    good = [f"ckpt-{len(first):06d}"]  # its checkpoint, at the epoch's end
    assert records(out, "diverged")[0]["round"] == len(first)  # the resumed run's first round
    assert sorted(os.listdir(out / "checkpoints")) == good  # nothing from the broken model
    state = _full_state(out, good[-1])
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    for line in open(out / "metrics.jsonl"):
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a tmpfs")
def test_a_full_disk_ends_every_rank_with_one_line_and_no_half_written_checkpoint(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(small)], check=True)
    try:
        p = _train(2, small / "run", *TINY, "--epochs", "3", "--checkpoint-rounds", "1", "--eval-every", "0")
        assert p.returncode == 2, p.stderr[-3000:]
        errors = _errors(p)
        assert len(errors) == 1 and "cannot write" in errors[0] and "No space left" in errors[0], p.stderr[-3000:]
        assert "Traceback" not in p.stderr
        from resist_mpi.cli import checkpoint as ckpt
        for d in ckpt.list_checkpoints(str(small / "run")):  # whatever has a manifest is complete
            assert ckpt.verify(d)[0] is not None
        assert not list((small / "run").rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_an_unreadable_image_ends_every_rank_with_one_line(tmp_path):
    from PIL import Image
    import numpy as np
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(np.full((40, 40, 3), 30 * i, dtype=np.uint8)).save(d / f"{i}.png")
    (tmp_path / "data" / "train" / "b" / "5.png").write_bytes(b"\x89PNG broken")
    p = _train(2, tmp_path / "run", "--model", "preact_resnet50_imagenet", "--width", "4", "--dataset",
               "imagefolder", "--data-dir", str(tmp_path / "data"), "--image-size", "32", "--epochs", "2",
               "--batch-size", "4", "--local-steps", "2")
    assert p.returncode == 2, p.stderr[-3000:]
    errors = _errors(p)
    assert len(errors) == 1 and "cannot read image" in errors[0] and "5.png" in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr


def test_round_records_do_not_depend_on_loader_workers(tmp_path):
    """DataLoader workers (processes forked by an MPI rank) deliver the very batches of --workers 0,
    evaluation's reads included: the rounds and the evaluations of --workers 2 with evaluations in
    the background are those of --workers 0 with evaluations in line. (That evaluations leave the
    rounds as they were, and what their early exchange saves: thread ranks,
    tests/unit/test_trainer.py::test_round_records_do_not_depend_on_evaluations.)"""
    args = [*TINY, "--epochs", "3", "--bn-batches", "2", "--progress", "off", "--eval-every", "1"]
    p = mpirun(2, trainings_args([[*args, "--out", tmp_path / "inline"],
                                  [*args, "--out", tmp_path / "workers", "--workers", "2", "--eval-background"]]),
               timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    keys = ("round", "train_loss")
    assert round_records(tmp_path / "workers", *keys) == round_records(tmp_path / "inline", *keys)
    evals, background = records(tmp_path / "inline", "eval"), records(tmp_path / "workers", "eval")
    assert len(evals) == 3
    assert [(e["round"], e["test_loss"], e["test_acc"]) for e in background] == \
        [(e["round"], e["test_loss"], e["test_acc"]) for e in evals]
    assert [e.get("background", False) for e in background] == [True, True, False]


@pytest.mark.parametrize("np_", [2, 4])
def test_sync_bench_times_what_it_says(tmp_path, np_):
    """sync_bench on a thin ResNet-101: the payload it measured equals the plans' and the ring's bytes."""
    from resist_mpi.tools import traffic
    from resist_mpi.comm import ring_allreduce_bytes
    from resist_mpi.models import create_model

    out = tmp_path / "sync.json"
    p = mpirun(np_, ["benchmarks/sync_bench.py", "--width", "4", "--rounds", "4", "--warmup", "2",
                     "--json", str(out)], timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "efficiency_vs_raw" in p.stdout
    res = json.loads(out.read_text())
    sizes = traffic.model_sizes(create_model("preact_resnet101", 100, 4))
    assert res["elements"]["full"] == sizes.full and res["warmup_rounds"] == 2 and res["rounds_timed"] == 4
    b = res["bytes_sent_per_round_all_ranks"]
    assert b["local_sgd"] == np_ * ring_allreduce_bytes(4 * sizes.full, np_)
    shared = np_ * ring_allreduce_bytes(4 * sizes.shared, np_)
    assert b["resist_total"] - b["resist_exchange"] == pytest.approx(shared, rel=1e-12)
    assert 0 < res["efficiency_vs_raw"] and 0 < res["resist_over_local_sgd"]
