"""Bad input stops every rank before training with one line from one rank and exit status 2, and
leaves the user's files as they were: the trainer's set-up on 1, 2 and 4 thread ranks (one real
launch per kind of failure: tests/e2e/test_cli.py::test_bad_input_one_line_nonzero_everywhere)."""
import json
import os
import shutil
from types import SimpleNamespace

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
    # a "resist" run that would have trained local SGD only (no switch record, exit 0)
    (2, dict(epochs=2, warmup_epochs=1, local_steps=12, batch_size=128), "--warmup-epochs 1 of 2 takes all 1 rounds"),
    # 4 images on 4 ranks: batches of one (a BatchNorm traceback on a 1x1 map, on every rank)
    (4, dict(dataset="imagefolder", data_dir="FOLDER32", image_size=32, model="preact_resnet34"),
     "the training set's 4 images give each of the 4 ranks one"),
]


@pytest.mark.parametrize("size, settings, message", CASES, ids=[m[:30] for _, _, m in CASES])
def test_bad_input_stops_every_rank_with_one_line(tmp_path, capsys, size, settings, message):
    made = {"TRUNCATED_H5": lambda: _truncated_h5(tmp_path), "FOLDER64": lambda: _image_folder(tmp_path, 64),
            "FOLDER32": lambda: _image_folder(tmp_path, 32),
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
    (["--group-size", "\u00b2"], "--group-size '\u00b2': give a number of ranks per group"),  # isdigit(), not int()
    (["--group-size", "2", "--strategy", "data_parallel"], "--group-size applies to resist and local_sgd"),
    # trained at full width while the start line said "width 8"
    (["--model", "torchvision.resnet18", "--width", "8"], "--width 8: torchvision.resnet18 has torchvision's own"),
    # --overlap-steps 3 without --overlap was refused, 0 passed
    (["--overlap-steps", "0"], "--overlap-steps 0: needs --overlap"),
])
def test_bad_settings_are_refused_before_any_rank_starts(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        validate(parse_config(argv))
    assert "\n" not in str(e.value)


BAD_FILE_VALUES = [  # (file name, its text, what the one line says)
    ("c.yaml", "overlap: 'false'\n", 'overlap "false" must be true or false (a boolean, unquoted)'),
    ("c.json", '{"overlap": "false"}', 'overlap "false" must be true or false (a boolean, unquoted)'),
    ("c.yaml", "eval_background: 'no'\n", 'eval_background "no" must be true or false or null'),
    ("c.yaml", "tensorboard: 0\n", "tensorboard 0 must be true or false"),
    ("c.yaml", "epochs: null\n", "epochs null must be an integer"),
    ("c.yaml", "batch_size: [1, 2]\n", "batch_size [1, 2] must be an integer"),
    ("c.yaml", "epochs: 2.5\n", "epochs 2.5 must be an integer (written without a decimal point)"),
    ("c.yaml", "epochs: 3.0\n", "epochs 3.0 must be an integer"),  # an integral float too
    ("c.json", '{"width": 8.0}', "width 8.0 must be an integer"),
    ("c.yaml", "checkpoint_rounds: true\n", "checkpoint_rounds true must be an integer"),
    ("c.yaml", "local-steps: five\n", 'local-steps "five" must be an integer'),  # the file's spelling
    ("c.yaml", "image_size: 2.5\n", "image_size 2.5 must be an integer or null"),
    ("c.yaml", "lr: fast\n", 'lr "fast" must be a number'),
    ("c.yaml", "lr: true\n", "lr true must be a number"),
    ("c.yaml", "momentum: {a: 1}\n", 'momentum {"a": 1} must be a number'),
    ("c.yaml", "model: null\n", "model null must be a string"),
    ("c.yaml", "partition_stages: 2.5\n", "partition_stages 2.5 must be a string"),
    ("c.yaml", "data_dir: [a]\n", 'data_dir ["a"] must be a string or null'),
    ("c.yaml", "schedule: linear\n", 'schedule "linear" must be one of step, cosine'),
    ("c.yaml", "progress: 1\n", "progress 1 must be one of auto, on, off"),
    ("c.yaml", "lr: .nan\n", "--lr must be a finite number, got nan"),
    ("c.json", '{"lr": NaN}', "--lr must be a finite number, got nan"),
    ("c.yaml", "outer_lr: .inf\n", "--outer-lr must be a finite number, got inf"),
    ("c.yaml", "momentum: .nan\n", "--momentum must be a finite number, got nan"),
    ("c.yaml", "weight_decay: -.inf\n", "--weight-decay must be a finite number, got -inf"),
]


@pytest.mark.parametrize("text, message", [
    ("lr: 0.1\nepochs: 3\nlr: 0.2\n", "the key 'lr' is given twice"),
    ("local-steps: 5\nlocal_steps: 6\n", "sets local-steps twice (local-steps and local_steps): keep one"),
])
def test_a_setting_given_twice_in_a_config_file_is_one_line(tmp_path, text, message):
    """PyYAML keeps the last of two equal keys, and the two spellings of a key were one after
    their dashes became underscores: the first value was dropped without a word."""
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(path)])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_home_relative_path_in_a_config_file_is_expanded(tmp_path, monkeypatch):
    """The shell expands ~ on the command line, nothing did in a file: `out: ~/runs/x` made a
    folder named "~" in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text("out: ~/runs/x\ndata_dir: ~/data\nresume: auto\n")
    cfg = validate(parse_config(["--config", str(path)]))
    assert (cfg.out, cfg.data_dir, cfg.resume) == (f"{tmp_path}/runs/x", f"{tmp_path}/data", "auto")


def test_a_config_file_that_is_not_utf8_text_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("out: caf\u00e9\n".encode("latin-1"))
    code, errors, err = _main_exit_and_errors(["--config", str(path)], capsys)
    assert code == 2 and len(errors) == 1 and f"cannot read config file {path}: 'utf-8' codec" in errors[0], err
    assert "Traceback" not in err


def _main_exit_and_errors(argv, capsys):
    """The CLI's exit status, its error lines, and all it wrote to stderr."""
    from resist_mpi.cli.train import main
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    return code, _error_lines_of(err), err


def _error_lines_of(err):
    return [line for line in err.splitlines() if line.startswith("resist_mpi: error:")]


@pytest.mark.parametrize("name, text, message", BAD_FILE_VALUES, ids=[t.strip() for _, t, _ in BAD_FILE_VALUES])
def test_a_config_file_value_of_the_wrong_type_is_one_line_exit_2(tmp_path, capsys, name, text, message):
    """A file's values are checked against the Config fields' types: 'false' is not false, null
    and lists are no numbers, NaN no learning rate; the same one line and exit 2 as a bad flag."""
    path = tmp_path / name
    path.write_text(text)
    code, errors, err = _main_exit_and_errors(["--config", str(path), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert errors[0].startswith(f"resist_mpi: error: config file {path}: ") or "finite" in message, errors
    assert "Traceback" not in err and err.strip() == errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--outer-lr", "nan"], "--outer-lr must be a finite number, got nan"),
    (["--outer-momentum", "nan"], "--outer-momentum must be a finite number, got nan"),
    (["--momentum", "nan"], "--momentum must be a finite number, got nan"),
    (["--momentum", "-0.5"], "--momentum must be >= 0, got -0.5"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["--checkpoint-minutes", "inf"], "--checkpoint-minutes must be a finite number, got inf"),
    (["--comm-timeout", "nan"], "--comm-timeout must be a finite number, got nan"),
])
def test_a_non_finite_float_flag_is_one_line_exit_2(tmp_path, capsys, argv, message):
    code, errors, err = _main_exit_and_errors([*argv, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and errors == [f"resist_mpi: error: {message}"] and "Traceback" not in err, err


def test_every_float_field_is_checked_for_finite_values():
    """validate's finiteness check covers each float field (read from the dataclass), not a list."""
    import math
    from resist_mpi.cli.config import field_types
    floats = sorted(n for n, (tp, _) in field_types().items() if tp is float)
    assert {"lr", "momentum", "weight_decay", "outer_lr", "outer_momentum"} <= set(floats)
    for name in floats:
        with pytest.raises(ConfigError, match="must be a finite number, got nan"):
            validate(Config(**{name: math.nan}))


@pytest.mark.parametrize("config", ["demo.yaml", "cifar100_resnet101.yaml"])
def test_the_repositorys_config_files_load_as_before(config):
    """configs/*.yaml give the Config their raw YAML values give, each value of its field's type
    (checkpoint_minutes: 20 becomes 20.0, as --checkpoint-minutes 20 does)."""
    import glob
    import yaml
    from helpers import ROOT
    from resist_mpi.cli.config import field_types
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))) == \
        ["cifar100_resnet101.yaml", "demo.yaml"]  # a new one: add it here
    path = os.path.join(ROOT, "configs", config)
    raw = yaml.safe_load(open(path))
    cfg = validate(parse_config(["--config", path]))
    assert cfg == Config(**{k.replace("-", "_"): v for k, v in raw.items()})
    for name, (tp, optional) in field_types().items():
        value = getattr(cfg, name)
        assert (value is None and optional) or type(value) is tp, (name, value)


def test_a_config_file_takes_what_the_flags_would_read(tmp_path):
    """Accepted: a number's text (PyYAML reads 1e-3 as a string; '5' is 5 as --local-steps 5),
    an integer for a text setting ('2' as --group-size 2), an integer for a float, null where the
    field is optional, real booleans."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nlocal_steps: '5'\ngroup_size: 2\npartition_stages: 3\ncheckpoint_minutes: 20\n"
                    "eval_background: false\noverlap: true\ndata_dir: null\nimage_size: 64\nresume: null\n")
    cfg = validate(parse_config(["--config", str(path)]))
    got = {k: getattr(cfg, k) for k in ("lr", "local_steps", "group_size", "partition_stages", "checkpoint_minutes",
                                        "eval_background", "overlap", "data_dir", "image_size", "resume")}
    assert got == dict(lr=0.001, local_steps=5, group_size="2", partition_stages="3", checkpoint_minutes=20.0,
                       eval_background=False, overlap=True, data_dir=None, image_size=64, resume=None)
    assert type(cfg.checkpoint_minutes) is float and type(cfg.lr) is float
    path.write_text("eval_background: null\n")
    assert parse_config(["--config", str(path)]).eval_background is None
    # `progress: off`, the spelling of the docs and the job scripts, which YAML reads as false: it
    # was refused ("progress false must be one of auto, on, off")
    for text, want in (("progress: off\n", "off"), ("progress: on\n", "on"), ("progress: 'auto'\n", "auto")):
        path.write_text(text)
        assert validate(parse_config(["--config", str(path)])).progress == want


def test_a_rank_that_crashes_in_native_code_prints_where(tmp_path):
    """A segmentation fault (in MPI, torch, a driver) ends a rank with its threads' Python stacks on
    stderr, the trainer's among them, instead of Open MPI's bare "Signal: Segmentation fault". (The
    signal comes once the run's config.json is written: the trainer runs from then on.)"""
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
        while not (out / "config.json").is_file():
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


@pytest.mark.parametrize("argv, launch", [
    (["--epochs", "0", "--backend", "torch", "--device", "cuda", "--download"], ("torch", "cuda", True)),
    (["--epochs", "0"], ("auto", "auto", False)),
    (["--no-such-flag", "--backend=horovod", "--device", "cpu"], ("horovod", "cpu", False)),  # did not parse
])
def test_a_rank_that_refuses_its_settings_meets_the_others_on_their_backend(monkeypatch, capsys, argv, launch):
    """A rank whose settings fail (a file only some nodes see) joins the others' agreement: it
    started "auto" on the CPU, so beside accepting ranks on GPUs (NCCL, or the torch backend under
    torchrun) it waited in another world, and with --download it skipped the barrier the others
    pass first: a hang either way. It now starts what they start."""
    from resist_mpi import comm as comm_pkg
    from resist_mpi.cli import train as train_cli
    from resist_mpi.comm.thread import run_ranks
    started = []

    def fake_init(backend="auto", fail_fast=True, device="auto"):
        started.append((backend, device))
        return world[0]
    monkeypatch.setattr(comm_pkg, "world_info_from_env", lambda: SimpleNamespace(size=2, rank=0))
    monkeypatch.setattr(comm_pkg, "init", fake_init)
    world, seen = [None], []

    def rank(c):
        if c.rank == 1:  # an accepting rank, as the trainer's set-up meets the others
            if launch[2]:
                c.barrier()  # rank 0 downloaded first
            try:
                from resist_mpi.cli.trainer import agree
                agree(c, None)
            except SystemExit as e:
                seen.append(e.code)
            return None
        world[0] = c  # what init() gives the refusing rank: the same world
        return train_cli.main(argv)
    codes = run_ranks(2, rank)
    assert started == [launch[:2]] and codes[0] == 2 and seen == [2], (started, codes, seen)
