"""Allreduce bus bandwidth with raw mpi4py: a sanity check of a network (e.g. the simulated cluster).

    mpirun -np 4 python benchmarks/allreduce_bw.py                      # shared memory, one node
    python -m resist_mpi.cluster run -- mpirun -np 4 -H node0,node1,node2,node3 --mca btl tcp,self \\
        python benchmarks/allreduce_bw.py --size-mb 64 --iters 5

Bus bandwidth = 2 (S-1)/S * bytes / time (nccl-tests' definition): what each rank's link carries
in a bandwidth-optimal allreduce, so it is comparable with the link rate whatever S is.

`--ops allreduce,iallreduce` times the blocking MPI_Allreduce and the nonblocking MPI_Iallreduce
progressed as resist_mpi's background average progresses it (MPI_Test, then a 0.2 ms sleep), one
line each. This is raw MPI: Open MPI picks each one's algorithm itself unless told by an MCA
setting, e.g. OMPI_MCA_coll_libnbc_iallreduce_algorithm=1 (ring), which resist_mpi's mpi backend
sets by default (resist_mpi/comm/mpi.py, OPEN_MPI_DEFAULTS); the line prints the setting it ran
under.
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
from mpi4py import MPI

SETTINGS = ("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "OMPI_MCA_coll_tuned_use_dynamic_rules",
            "OMPI_MCA_coll_tuned_allreduce_algorithm")


def _iallreduce(comm, buf):
    req = comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    while not req.Test():
        time.sleep(0.0002)


def allreduce_bw(size_mb: float = 64, iters: int = 5, warmup: int = 1, op: str = "allreduce") -> dict:
    comm = MPI.COMM_WORLD
    n = int(size_mb * 2 ** 20) // 4
    buf = np.ones(n, dtype=np.float32)
    run = {"allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
           "iallreduce": lambda: _iallreduce(comm, buf)}[op]
    times = []
    for i in range(warmup + iters):
        comm.Barrier()
        t0 = MPI.Wtime()
        run()
        dt = comm.allreduce(MPI.Wtime() - t0, op=MPI.MAX)
        if i >= warmup:
            times.append(dt)
    s, nbytes = comm.Get_size(), 4 * n
    t = statistics.median(times)
    return {"op": op, "ranks": s, "bytes": nbytes, "median_s": t,
            "busbw_gbit_s": 2 * (s - 1) / s * nbytes * 8 / t / 1e9,
            "hosts": sorted(set(comm.allgather(MPI.Get_processor_name()))),
            "settings": {k: os.environ[k] for k in SETTINGS if k in os.environ}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--ops", default="allreduce", help="comma-separated: allreduce, iallreduce")
    a = p.parse_args()
    for op in a.ops.split(","):
        result = allreduce_bw(a.size_mb, a.iters, op=op)
        if MPI.COMM_WORLD.Get_rank() == 0:
            print(json.dumps(result), flush=True)
