"""Launching multi-rank commands from single-process tests."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository


def mpi_env(**extra):
    env = dict(os.environ)
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


def mpi_pytest(np_, test_files, timeout=600, **env):
    """Run tests/mpi files (one path or a list) with pytest on np_ ranks, in one job (no cache plugin:
    N ranks would race on it)."""
    files = [test_files] if isinstance(test_files, str) else list(test_files)
    return mpirun(np_, ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"] + files, timeout=timeout, **env)


def passed_on_every_rank(p, np_):
    """Assert a multi-rank pytest job passed: exit 0 and one non-empty "N passed" line per rank."""
    import re
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    passed = re.findall(r"(\d+) passed", out)
    assert len(passed) == np_ and all(int(n) > 0 for n in passed), out[-4000:]
