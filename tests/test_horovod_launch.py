"""Run the Horovod backend's multi-rank tests under horovodrun, both controllers.

Skipped when Horovod (make horovod) or horovodrun is missing. Each case starts a fresh job and
passes only if every rank's pytest passed: horovodrun's exit status is non-zero when any rank
fails, and each rank must report its own "N passed" line.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/mpi/test_comm_horovod.py"


def _horovodrun():
    beside = Path(sys.executable).parent / "horovodrun"  # the venv's, when pytest runs from it
    return str(beside) if beside.exists() else shutil.which("horovodrun")


def _horovod_importable():
    try:
        return importlib.util.find_spec("horovod.torch") is not None
    except ModuleNotFoundError:
        return False


pytestmark = [
    pytest.mark.skipif(not _horovod_importable(), reason="Horovod is not installed (make horovod)"),
    pytest.mark.skipif(_horovodrun() is None, reason="horovodrun is not on PATH"),
]


@pytest.mark.parametrize("np_, controller", [(2, "mpi"), (2, "gloo"), (4, "mpi")],
                         ids=["np2-mpi", "np2-gloo", "np4-mpi"])
def test_horovod_backend_under_horovodrun(np_, controller):
    env = dict(os.environ)
    env.update(
        # Open MPI (behind horovodrun's MPI controller) refuses root and more ranks than cores.
        OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    cmd = [_horovodrun(), "-np", str(np_), "-H", f"localhost:{np_}"]
    cmd += ["--gloo"] if controller == "gloo" else ["--mpi"]
    # No cache plugin: N ranks writing one .pytest_cache at once would race.
    cmd += [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} timed out after 300 s (a rank hung?):\n{e.stdout or ''}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}"
    passed = re.findall(r"(\d+) passed", out)
    assert len(passed) == np_ and all(int(n) > 0 for n in passed), \
        f"expected one 'N passed' line per rank:\n{out[-6000:]}"
