"""Launching multi-rank commands from single-process tests."""
import atexit
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository


def benchmark_module(name: str):
    """benchmarks/NAME.py imported as a module (the scripts are not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def out_lock_held_elsewhere(out):
    """Another process holds --out out's lock while the block runs, as a live run does; yields it."""
    holder = subprocess.Popen([sys.executable, "-c", f"import time; from resist_mpi.cli.checkpoint import OutLock; "
                               f"l = OutLock({str(out)!r}); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


# Open MPI, run by several jobs at once on a few cores (the suite runs launches side by side and the
# unit tier beside them): with no more ranks than cores it binds rank k to core k and busy-polls
# without yielding, so every 2-rank job stacks its ranks on the same cores as the others and a rank
# waiting for its peer takes a core's share from the ones working. Unbound and yielding, the
# scheduler spreads them (benchmarks/contention.py: three 2-rank trainings beside a busy process).
# What the user's environment sets wins.
SHARED_CORES = {"OMPI_MCA_hwloc_base_binding_policy": "none", "OMPI_MCA_mpi_yield_when_idle": "1"}


def mpi_env(**extra):
    env = {**SHARED_CORES, **os.environ}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra)
    return env


def have_mpirun():
    return shutil.which("mpirun") is not None


def mpirun(np_, args, timeout=600, **env):
    """Run `mpirun -np np_ python args...` from the repo root; returns CompletedProcess (text)."""
    cmd = ["mpirun", "--oversubscribe", "-np", str(np_), sys.executable] + list(args)
    return subprocess.run(cmd, cwd=ROOT, env=mpi_env(**env), capture_output=True, text=True, timeout=timeout)


# Several trainings in one launch: each rank calls the CLI's own entry point (resist_mpi.cli.train.main:
# config, comm.init, Trainer) once per argument list, in order, and stops at the first non-zero status
# (its exit status). A launch pays torch's and MPI's start-up on every rank, seconds each on a small
# machine; what a test compares between trainings does not need a process of its own.
TRAININGS = """\
import json, sys
from resist_mpi.cli.train import main
for args in json.loads(sys.argv[1]):
    rc = main(args)
    if rc:
        sys.exit(rc)
"""


# The short training that each backend must reproduce to the value: digits, a thin ResNet-34, 3 steps per
# rank in 2 rounds, every strategy (the mpi backend's run: the `mpi_backend_trainings` fixture).
BACKEND_STRATEGIES = ("resist", "local_sgd", "data_parallel")
BACKEND_TRAIN = ["--model", "preact_resnet34", "--width", "2", "--epochs", "1", "--batch-size", "256",
                 "--local-steps", "2", "--bn-batches", "1", "--seed", "3", "--progress", "off"]


def trainings_args(runs):
    """The arguments after `python` that run each argument list of runs in turn (TRAININGS)."""
    import json
    return ["-c", TRAININGS, json.dumps([[str(a) for a in args] for args in runs])]


@functools.cache
def _doc_tmpdir():
    """One temporary directory per test process for the documented commands' TMPDIR, removed when
    the process ends: what they leave there (a torchrun agent's torchelastic_* folder on every
    launch) does not pile up in /tmp, and the simulated cluster's state (kept under TMPDIR) is found
    by the commands that follow the one that started it."""
    path = tempfile.mkdtemp(prefix="resist-doc-")
    atexit.register(shutil.rmtree, path, True)
    return path


def documented_env():
    """The environment of the documentation's commands: the interpreter's directory first on PATH
    (a bare `python`, `torchrun` or `horovodrun` is the venv's), the repository on PYTHONPATH,
    TMPDIR in _doc_tmpdir()."""
    env = mpi_env(PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", TMPDIR=_doc_tmpdir())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_documented(command, timeout=600):
    """Run a command of the documentation as written: bash, from the repository root, in
    documented_env(). Returns CompletedProcess (text)."""
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=documented_env(), capture_output=True, text=True,
                          timeout=timeout)


def records(out, event):
    """The records of one event ("round", "eval", "membership", ...) of a run's metrics.jsonl."""
    from resist_mpi.cli.metrics import read_metrics
    return read_metrics(str(out), event)


def round_records(out, *keys):
    """The round records of a run, each cut to keys (what two runs must agree on)."""
    return [{k: r[k] for k in keys} for r in records(out, "round")]


def mpi_pytest(np_, test_files, timeout=600, **env):
    """Run tests/mpi files (one path or a list) with pytest on np_ ranks, in one job (no cache plugin:
    N ranks would race on it)."""
    files = [test_files] if isinstance(test_files, str) else list(test_files)
    return mpirun(np_, ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"] + files, timeout=timeout, **env)


def passed_on_every_rank(p, np_):
    """Assert a multi-rank pytest job passed: exit 0 and one non-empty "N passed" line per rank."""
    import re
    out = p.stdout + p.stderr
    assert p.returncode == 0, failure_digest(out)
    passed = re.findall(r"(\d+) passed", out)
    assert len(passed) == np_ and all(int(n) > 0 for n in passed), failure_digest(out)


def failure_digest(out, first=3000, last=3000):
    """What a failed multi-rank pytest job's output says first: every rank's summary lines (which
    test failed where, "N passed"/"N failed"), the first failure's report (where the ranks parted:
    one rank's error often makes the others fail later, with errors of their own), and the end."""
    import re
    summary = [line for line in out.splitlines()
               if re.search(r"\b(FAILED|ERROR)\b|\d+ (passed|failed|error)", line)]
    start = re.search(r"^.*_{3,} (test_\S+|ERROR \S+.*) _{3,}", out, re.M)
    parts = ["-- summary lines:", *summary[:40]]
    if start:
        parts += ["-- the first failure:", out[start.start():start.start() + first]]
    return "\n".join(parts + ["-- the end:", out[-last:]])


# -- what a test needs: one marker and one skip reason per need -------------------------------------------
def horovodrun_path():
    beside = Path(sys.executable).parent / "horovodrun"  # the venv's, when pytest runs from it
    return str(beside) if beside.exists() else shutil.which("horovodrun")


def _why_no_horovod():
    import importlib.util
    try:
        found = importlib.util.find_spec("horovod.torch") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        return "Horovod is not installed (make horovod)"
    return None if horovodrun_path() else "horovodrun is not on PATH"


def _why_no_cluster():
    from resist_mpi.tools.cluster import why_unavailable
    return why_unavailable()


def _why_no_slurm():
    from slurm_helpers import why_no_slurm
    return why_no_slurm()


_WHY_NOT = {  # need -> () -> None when available, else the reason the tests skip
    "mpi": lambda: None if have_mpirun() else "mpirun not found (run `make setup`)",
    "horovod": _why_no_horovod,
    "root": lambda: None if os.geteuid() == 0 else "needs root",
    "cluster": _why_no_cluster,
    "slurm": _why_no_slurm,
    "slow": lambda: None,
}


class _Marks(list):
    def __call__(self, test):  # used as a decorator: apply every mark
        for mark in self:
            test = mark(test)
        return test


def requires(*needs):
    """The marks of a test that needs each of `needs`: the marker of that name (so `-m "not cluster"`
    deselects it) and a skip with the reason when it is missing here. A module's `pytestmark =
    requires(...)`, or a decorator `@requires(...)` on one test."""
    import pytest
    marks = _Marks()
    for need in needs:
        if need not in _WHY_NOT:
            raise ValueError(f"requires({need!r}): not one of {sorted(_WHY_NOT)}")
        marks.append(getattr(pytest.mark, need))
        reason = _WHY_NOT[need]()
        if reason:
            marks.append(pytest.mark.skip(reason=reason))
    return marks



_SEED_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int):
    """``with seeded(s): model = ...``: torch's global generator seeded with s for the block, then
    restored; one thread at a time, so rank threads (resist_mpi.comm.thread) building their models at
    once each get the weights a rank process gets after torch.manual_seed(s)."""
    import torch
    with _SEED_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
