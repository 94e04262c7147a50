"""Bad input stops every rank before training with one line from one rank and exit status 2, and
leaves the user's files as they were: the trainer's set-up on 1, 2 and 4 thread ranks (one real
launch per kind of failure: tests/e2e/test_cli.py::test_bad_input_one_line_nonzero_everywhere)."""
import json
import os
import shutil

import pytest
import torch

from resist_mpi.comm import init
from resist_mpi.comm.thread import run_ranks
from resist_mpi.cli.config import Config, ConfigError, parse_config, validate
from resist_mpi.cli.trainer import Trainer


def _truncated_h5(tmp_path):
    """A real packed dataset cut in half, as an interrupted copy leaves it."""
    from resist_mpi.data.packing import main as data_main
    full = tmp_path / "digits.h5"
    assert data_main(["pack", "digits", str(full)]) == 0
    cut = tmp_path / "cut.h5"
    cut.write_bytes(full.read_bytes()[: os.path.getsize(full) // 2])
    return str(cut)


def _image_folder(tmp_path, size):
    from PIL import Image
    import numpy as np
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / "folder" / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return str(tmp_path / "folder")


def _checkpoint(tmp_path, kind):
    """A damaged checkpoint, or a real one of another model."""
    if kind == "corrupt":
        d = tmp_path / "ckpt-000001"
        d.mkdir()
        (d / "manifest.json").write_text('{"format": "resist_mpi-sharded-1", "files": ["shared.pt"], '
                                         '"bytes": {"shared.pt": 16}}')
        (d / "shared.pt").write_bytes(b"PK\x03\x04 this is not")
        return str(d)
    out = tmp_path / "other"
    cfg = validate(Config(model="preact_resnet18", width=4, epochs=1, batch_size=256, min_depth=1, checkpoint_every=1,
                          out=str(out), progress="off", bn_batches=1))
    Trainer(cfg, init("self", fail_fast=False)).run()
    return str(next((out / "checkpoints").iterdir()))


CASES = [
    (2, dict(min_depth=99), "exceeds the 22 partitionable blocks"),
    (4, dict(model="preact_resnet18"), "4 ranks but only 1 partitionable blocks"),
    (2, dict(dataset="cifar10", data_dir="/nonexistent/cifar"), "cifar10"),
    (2, dict(resume="CORRUPT"), "shared.pt is unreadable"),
    (2, dict(resume="OTHER"), "holds preact_resnet18"),
    (2, dict(dataset="hdf5", data_dir="TRUNCATED_H5"), "TRUNCATED_H5"),
    (2, dict(dataset="imagefolder", data_dir="FOLDER64"), "expects 32x32"),
    (2, dict(device="cuda:7"), "device cuda:7 requested but only"),
    (1, dict(device="cuda"), "no GPU is visible"),
    (4, dict(group_size="3"), "--group-size 3: the 4 ranks do not split into groups of 3"),
    (2, dict(resume="/nonexistent/ckpt-000003"), "checkpoint /nonexistent/ckpt-000003 not found"),
]


@pytest.mark.parametrize("size, settings, message", CASES, ids=[m[:30] for _, _, m in CASES])
def test_bad_input_stops_every_rank_with_one_line(tmp_path, capsys, size, settings, message):
    made = {"TRUNCATED_H5": lambda: _truncated_h5(tmp_path), "FOLDER64": lambda: _image_folder(tmp_path, 64),
            "CORRUPT": lambda: _checkpoint(tmp_path, "corrupt"), "OTHER": lambda: _checkpoint(tmp_path, "other")}
    settings = {k: made[v]() if isinstance(v, str) and v in made else v for k, v in settings.items()}
    message = settings["data_dir"] if message in made else message
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    cfg = validate(Config(**{"width": 4, "epochs": 1, "out": str(tmp_path / "run"), "progress": "off", **settings}))
    torch.set_num_threads(1)
    outcome = run_ranks(size, lambda c: _exit_code(cfg, c))
    assert outcome == [2] * size
    errors = _error_lines(capsys)
    assert len(errors) == 1 and message in errors[0], errors
    assert files == {p: p.read_bytes() for p in files}  # the user's files, untouched


def _exit_code(cfg, c, run=False):
    """A thread rank's set-up (and with run, its whole run): 0, or the exit status it stopped with."""
    try:
        trainer = Trainer(cfg, c)
        if run:
            trainer.run()
    except SystemExit as e:
        return e.code
    return 0


def _error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("resist_mpi: error:")]


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet_nope"], "unknown model"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--device", "gpu"], "--device 'gpu': use auto, cpu, cuda"),
    (["--overwrite", "--resume", "auto"], "--overwrite starts afresh and --resume continues"),
    (["--group-size", "two"], "--group-size 'two': give a number of ranks per group, or 'node'"),
    (["--group-size", "2", "--strategy", "data_parallel"], "--group-size applies to resist and local_sgd"),
])
def test_bad_settings_are_refused_before_any_rank_starts(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        validate(parse_config(argv))
    assert "\n" not in str(e.value)


def test_a_rank_that_crashes_in_native_code_prints_where(tmp_path):
    """A segmentation fault (in MPI, torch, a driver) ends a rank with its threads' Python stacks on
    stderr, the training loop's among them, instead of Open MPI's bare "Signal: Segmentation fault"."""
    import signal
    import subprocess
    import sys
    import time
    from helpers import ROOT
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "resist_mpi.train", "--config", "configs/demo.yaml", "--progress", "off",
                          "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert p.poll() is None and time.time() - t0 < 120, "the run did not start training"
            time.sleep(0.1)
        p.send_signal(signal.SIGSEGV)
        err = p.communicate(timeout=60)[1]
    finally:
        p.kill()
    assert p.returncode == -signal.SIGSEGV, err[-2000:]
    assert "Fatal Python error: Segmentation fault" in err and "Current thread" in err, err[-2000:]
    assert os.path.join("resist_mpi", "cli", "trainer.py") in err.split("Current thread")[1], err[-2000:]


def test_out_dir_holding_a_run_is_never_overwritten_unasked(tmp_path, capsys):
    """A second run into the same --out stops every rank with one line and leaves the first run's
    files as they were; --resume auto continues it (finished: trains nothing); --overwrite starts
    afresh, the old run's checkpoints gone. On 2 thread ranks: the check, the agreement and the
    deletion are the trainer's; a real launch's agreement on a bad input:
    tests/e2e/test_cli.py::test_bad_input_one_line_nonzero_everywhere."""
    from helpers import records
    out = tmp_path / "run"
    base = dict(model="preact_resnet18", width=4, epochs=1, batch_size=256, min_depth=1, checkpoint_every=1,
                bn_batches=1, out=str(out), progress="off")
    torch.set_num_threads(1)

    def run(**kw):
        cfg = validate(Config(**{**base, **kw}))
        capsys.readouterr()
        codes = run_ranks(2, lambda c: _exit_code(cfg, c, run=True))
        return codes, _error_lines(capsys)

    assert run() == ([0, 0], [])
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert run(seed=1) == ([2, 2], [f"resist_mpi: error: --out {out} holds a run; pass --resume auto to continue it, "
                                    "or --overwrite"])
    assert files == {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    rounds = records(out, "round")
    assert run(resume="auto") == ([0, 0], [])  # finished: loads its last checkpoint, trains nothing
    assert records(out, "round") == rounds and len(rounds) > 0
    (ckpt,) = (out / "checkpoints").iterdir()
    shutil.copytree(ckpt, out / "checkpoints" / "ckpt-000099")
    assert run(seed=1, overwrite=True) == ([0, 0], [])
    assert sorted(q.name for q in (out / "checkpoints").iterdir()) == [ckpt.name]  # the old run's are gone
    assert json.load(open(out / "config.json"))["config"]["seed"] == 1


def test_a_second_job_into_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys):
    """The same batch script submitted twice: the second job (here 2 thread ranks, --resume auto)
    stops on every rank with one line naming the live run that holds the --out (another process),
    and leaves that run's files as they were. (The lock itself: tests/unit/test_defects.py.)"""
    from helpers import out_lock_held_elsewhere
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"event": "round", "round": 0}\n')
    with out_lock_held_elsewhere(out) as holder:
        files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        cfg = validate(Config(width=4, epochs=1, out=str(out), progress="off", resume="auto"))
        capsys.readouterr()
        torch.set_num_threads(1)
        assert run_ranks(2, lambda c: _exit_code(cfg, c, run=True)) == [2, 2]
        errors = _error_lines(capsys)
        assert len(errors) == 1 and f"--out {out} is in use by another run (host" in errors[0], errors
        assert f"pid {holder.pid}," in errors[0]
        assert files == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
