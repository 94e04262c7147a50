"""Drivers: the multi-rank test files of tests/mpi under `mpirun -np 2` and `-np 4`, per backend.

The files of one backend run in one job (a launch costs seconds of start-up per rank on a small
machine). A case passes only if mpirun exits 0 and every rank reports its own "N passed" line (a
failing rank aborts the whole job: tests/mpi/conftest.py, and -x stops at the first failure, whose
name and traceback are in the output). The torch backend's rank 0 address is broadcast by MPI here;
horovodrun and torchrun start theirs in test_horovod_launch.py and test_backends.py.

On 2 ranks every file runs on the backend. On 4, the files about the backend itself: its contract
(every collective, split into sub-communicators), groups (a world of 4 splits into 2 groups of 2)
and, for mpi, the prepared collectives against raw MPI. The files that check strategies to the
value (the exchange, compression, the library, the averaging modes) run on 2 and 4 thread ranks in
the unit tier (tests/unit/test_on_thread_ranks.py, tests/cases) and on 2 real ranks here; the byte
counters against the traffic model on 2 real ranks here, and the model's own counts at 4 and 16
ranks in the unit tier (tests/unit/test_traffic.py: the tallies are one module for every Comm). On 4
real ranks these took about two thirds of these launches' time, for calls of the backend the
contract makes at 4 too.
"""
import pytest

from helpers import mpi_pytest, passed_on_every_rank, requires

pytestmark = requires("mpi", "slow")

BACKEND_FILES = {  # backend -> the files about the backend itself (run on 2 and 4 ranks)
    "mpi": ["tests/mpi/test_comm_contract.py", "tests/mpi/test_comm.py", "tests/mpi/test_groups.py"],
    "torch": ["tests/mpi/test_comm_contract.py", "tests/mpi/test_groups.py"],
}
STRATEGY_FILES = {  # backend -> the files that check strategies to the value (run on 2 ranks)
    "mpi": ["tests/mpi/test_resist_exchange.py", "tests/mpi/test_compression.py", "tests/mpi/test_library.py",
            "tests/mpi/test_averaging_modes.py", "tests/mpi/test_traffic_mpi.py"],
    "torch": ["tests/mpi/test_compression.py", "tests/mpi/test_library.py", "tests/mpi/test_averaging_modes.py"],
}


def suite(backend, np_):
    return BACKEND_FILES[backend] + (STRATEGY_FILES[backend] if np_ == 2 else [])


@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("backend", list(BACKEND_FILES))
def test_mpi_suite(backend, np_):
    passed_on_every_rank(mpi_pytest(np_, suite(backend, np_), timeout=1800, RESIST_TEST_BACKEND=backend), np_)


def test_every_multi_rank_file_runs_on_real_ranks():
    """No file of tests/mpi is left out: each runs under mpirun on some backend (the Horovod ones
    under horovodrun, test_horovod_launch.py)."""
    import os
    from helpers import ROOT
    files = {f"tests/mpi/{f}" for f in os.listdir(ROOT / "tests" / "mpi") if f.startswith("test_") and f.endswith(".py")}
    ran = {f for backend in BACKEND_FILES for np_ in (2, 4) for f in suite(backend, np_)}
    assert files == ran, files ^ ran
