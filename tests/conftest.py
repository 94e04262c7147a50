"""Tests in three tiers:

  tests/unit/  one process, no MPI: pure logic, the models, blocks, the trainer in-process (self backend)
  tests/mpi/   run on every rank under a launcher (mpirun, horovodrun, torchrun); skipped otherwise
  tests/e2e/   drivers that launch those, the CLI, the examples, the job scripts and the clusters

helpers.py is the one launcher helper (mpirun, mpi_pytest, mpi_env, passed_on_every_rank).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from resist_mpi.comm import world_info_from_env  # noqa: E402

collect_ignore_glob = [] if world_info_from_env().launcher != "none" else ["mpi/*"]


# -- the launching tests in two workers ---------------------------------------------------------------
# `make test` runs tests/e2e with pytest-xdist (``-n 2 --dist loadgroup``): a launch spends much of its
# time starting processes and waiting for its peers, and two workers keep both cores busy. Each file
# goes to one of two groups, and a group runs in one worker, in order: a file's module-scoped fixtures
# (a simulated cluster, a SLURM) are made once, and what must not run at the same time stays apart.
#   "network": the simulated clusters and SLURMs (their cgroups), with the longest runs, and the
#              demo, whose run is also the elastic tests' reference (the `demo_run` fixture below);
#   "local": launches on localhost, among them the two plain torchruns on torchrun's default port
#            (test_backends and the README's, in test_docs).
# The groups' files take about as long as each other (docs/testing.md: the launching tier alone, 2026-12-06:
# network 792 s, local 751 s, before seven of test_cli.py's launches went (the unit tier or one launch) and
# test_gpu_check.py moved to local). xdist's own loadgroup reads a node id that pytest 9 no longer uses
# (markers are ignored), so the scheduler is chosen here.
NETWORK = {"test_demo.py", "test_elastic.py", "test_multinode.py", "test_scheduler.py", "test_examples.py"}


def group_of(nodeid: str) -> str:
    """The worker group of a test by its file: "network" or "local"."""
    return "network" if os.path.basename(nodeid.split("::")[0]) in NETWORK else "local"


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: none without it
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return group_of(nodeid)
    return ByGroup(config, log)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`make demo`'s run, once per session: `mpirun -np 4 python -m resist_mpi.train --config
    configs/demo.yaml`, into a temporary --out. (its --out, the CompletedProcess). Checked by
    tests/e2e/test_demo.py; the uninterrupted reference of tests/e2e/test_elastic.py."""
    from helpers import ROOT, mpirun
    out = tmp_path_factory.mktemp("demo")
    p = mpirun(4, ["-m", "resist_mpi.train", "--config", os.path.join(ROOT, "configs", "demo.yaml"), "--out", str(out),
                   "--progress", "off"], timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


@pytest.fixture(scope="session")
def mpi_backend_trainings(tmp_path_factory):
    """Every strategy trained with helpers.BACKEND_TRAIN under `mpirun -np 2 --backend mpi`, in one
    launch, once per session: (the base directory, which holds each strategy's --out by its name,
    the CompletedProcess). The reference that the torch backend (tests/e2e/test_backends.py) and the
    Horovod backend (tests/e2e/test_horovod_launch.py) must equal; both files run in one worker."""
    from helpers import BACKEND_STRATEGIES, BACKEND_TRAIN, mpirun, trainings_args
    base = tmp_path_factory.mktemp("mpi_backend")
    p = mpirun(2, trainings_args([BACKEND_TRAIN + ["--strategy", s, "--out", base / s, "--backend", "mpi"]
                                  for s in BACKEND_STRATEGIES]), timeout=300)
    return base, p
