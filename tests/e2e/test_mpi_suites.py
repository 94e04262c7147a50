"""Drivers: the multi-rank test files of tests/mpi under `mpirun -np 2` and `-np 4`, per backend.

The files of one backend run in one job (a launch costs seconds of start-up per rank on a small
machine). A case passes only if mpirun exits 0 and every rank reports its own "N passed" line (a
failing rank aborts the whole job: tests/mpi/conftest.py, and -x stops at the first failure, whose
name and traceback are in the output). The torch backend's rank 0 address is broadcast by MPI here;
horovodrun and torchrun start theirs in test_horovod_launch.py and test_backends.py.
"""
import pytest

from helpers import mpi_pytest, passed_on_every_rank, requires

pytestmark = requires("mpi", "slow")

SUITES = {  # backend -> files
    "mpi": ["tests/mpi/test_comm_contract.py", "tests/mpi/test_comm.py", "tests/mpi/test_resist_exchange.py",
            "tests/mpi/test_traffic_mpi.py", "tests/mpi/test_groups.py", "tests/mpi/test_compression.py",
            "tests/mpi/test_library.py", "tests/mpi/test_averaging_modes.py"],
    "torch": ["tests/mpi/test_comm_contract.py", "tests/mpi/test_groups.py", "tests/mpi/test_compression.py",
              "tests/mpi/test_library.py", "tests/mpi/test_averaging_modes.py"],
}


@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("backend", list(SUITES))
def test_mpi_suite(backend, np_):
    passed_on_every_rank(mpi_pytest(np_, SUITES[backend], timeout=1800, RESIST_TEST_BACKEND=backend), np_)
