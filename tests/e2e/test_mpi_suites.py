"""Drivers: every multi-rank test file of tests/mpi under `mpirun -np 2` and `-np 4`.

A case passes only if mpirun exits 0 and every rank reports its own "N passed" line (a failing rank
aborts the whole job: tests/mpi/conftest.py). The comm contract runs once per backend that mpirun
can start (mpi, and torch with rank 0's address broadcast by MPI); horovodrun and torchrun start
theirs in test_horovod_launch.py and test_backends.py.
"""
import pytest

from helpers import have_mpirun, mpi_pytest, passed_on_every_rank

pytestmark = pytest.mark.skipif(not have_mpirun(), reason="mpirun not found (run `make setup`)")

SUITES = [  # (test file, backend)
    ("tests/mpi/test_comm_contract.py", "mpi"),
    ("tests/mpi/test_comm_contract.py", "torch"),
    ("tests/mpi/test_comm.py", "mpi"),
    ("tests/mpi/test_resist_exchange.py", "mpi"),
    ("tests/mpi/test_traffic_mpi.py", "mpi"),
    ("tests/mpi/test_groups.py", "mpi"),
    ("tests/mpi/test_groups.py", "torch"),
    ("tests/mpi/test_compression.py", "mpi"),
    ("tests/mpi/test_compression.py", "torch"),
]


@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("test_file, backend", SUITES, ids=[f"{f.split('/')[-1][:-3]}-{b}" for f, b in SUITES])
def test_mpi_suite(test_file, backend, np_):
    passed_on_every_rank(mpi_pytest(np_, test_file, RESIST_TEST_BACKEND=backend), np_)
