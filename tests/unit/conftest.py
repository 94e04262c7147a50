"""The unit tier runs in pytest-xdist workers (`make test`: ``-n auto``), each pinned to a CPU of its
own: a test's thread ranks then hand the interpreter lock to each other on one CPU instead of across
cores (docs/testing.md says what that saves), and the workers together use every CPU (`make test`
and `make test-fast`); each worker's torch computes with one thread. Without ``-n`` nothing is
pinned."""
import os


def pytest_configure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    if not worker.startswith("gw"):
        return
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[int(worker[2:]) % len(cpus)]})
    except (AttributeError, OSError, ValueError):
        return  # no affinity here (another OS, a sandbox): the workers run unpinned
    # one CPU, one intra-op thread: torch sized its pool from the CPUs it saw, and a second
    # OpenMP thread on the same CPU spins against the first (a trainer test without
    # set_num_threads(1) of its own took 120 s in a worker instead of 4 s alone)
    import torch
    torch.set_num_threads(1)
