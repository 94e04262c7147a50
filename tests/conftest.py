"""Tests in two tiers: tests/unit and the drivers here run in one process; tests/mpi/* run on every
rank under mpirun/horovodrun (the drivers launch them), so they are skipped when not launched."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from resist_mpi.comm import world_info_from_env  # noqa: E402

collect_ignore_glob = [] if world_info_from_env().launcher != "none" else ["mpi/*"]
