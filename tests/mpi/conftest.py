"""Under mpirun every rank runs the same tests. A failure on one rank would leave the others waiting
in their next collective, so a failing rank prints its report and aborts the whole job."""
import os
import sys

import pytest

if os.environ.get("RESIST_TEST_BACKEND", "mpi") == "mpi" and "OMPI_COMM_WORLD_SIZE" in os.environ:
    # MPI starts as the mpi backend starts it, with its Open MPI defaults (comm/mpi.py), before a test
    # file's own `from mpi4py import MPI` would start it without them
    from resist_mpi.comm.mpi import _mpi
    _mpi()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK", "?"))
        sys.stderr.write(f"\n[rank {rank}] FAILED {item.nodeid}\n{report.longreprtext}\n")
        sys.stderr.flush()
        if "OMPI_COMM_WORLD_SIZE" in os.environ:
            from mpi4py import MPI
            MPI.COMM_WORLD.Abort(1)
        os._exit(1)


def pytest_sessionfinish(session, exitstatus):
    """Every rank leaves together. Under Horovod a rank whose process ends shuts Horovod down on every
    rank (its exit's shutdown is agreed at the next negotiation), and a rank still working in a
    process set of its own then fails with "Process set provided does not exist": a file that ends
    in sub-communicators (the contract's split test on 2 ranks gives each rank a set of its own)
    must not let one rank leave first. (A failing rank has aborted the job already.)"""
    if os.environ.get("RESIST_TEST_BACKEND") == "horovod":
        import horovod.torch as hvd
        if hvd.is_initialized():
            hvd.barrier()
