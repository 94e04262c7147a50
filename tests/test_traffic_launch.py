"""Run tests/mpi/test_traffic_mpi.py under mpirun with 2 and 4 ranks (traffic.py vs the counters).

Skipped when mpirun or mpi4py is missing. A case passes only if mpirun exits 0 and every rank
reports its own "N passed" line (a failing rank aborts the job: tests/mpi/conftest.py).
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
TEST = "tests/mpi/test_traffic_mpi.py"

pytestmark = [
    pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not on PATH (make mpi)"),
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py is not installed"),
]


@pytest.mark.parametrize("np_", [2, 4])
def test_traffic_matches_counters_under_mpirun(np_):
    env = dict(os.environ)
    env.update(
        # Open MPI refuses root and more ranks than cores unless told.
        OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    # No cache plugin: N ranks writing one .pytest_cache at once would race.
    cmd = ["mpirun", "--oversubscribe", "-np", str(np_), sys.executable, "-m", "pytest", "-q",
           "-p", "no:cacheprovider", TEST]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} timed out after 300 s (a rank hung?):\n{e.stdout or ''}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}"
    passed = re.findall(r"(\d+) passed", out)
    assert len(passed) == np_ and all(int(n) > 0 for n in passed) and len(set(passed)) == 1, \
        f"expected one identical 'N passed' line per rank:\n{out[-6000:]}"
