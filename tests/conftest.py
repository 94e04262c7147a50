"""Tests in three tiers:

  tests/unit/  one process, no MPI: pure logic, the models, blocks, the trainer in-process (self backend)
  tests/mpi/   run on every rank under a launcher (mpirun, horovodrun, torchrun); skipped otherwise
  tests/e2e/   drivers that launch those, the CLI, the examples, the job scripts and the clusters

helpers.py is the one launcher helper (mpirun, mpi_pytest, mpi_env, passed_on_every_rank).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from resist_mpi.comm import world_info_from_env  # noqa: E402

collect_ignore_glob = [] if world_info_from_env().launcher != "none" else ["mpi/*"]
