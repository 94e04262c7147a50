"""Allreduce bus bandwidth with raw mpi4py: a sanity check of a network (e.g. the simulated cluster).

    mpirun -np 4 python benchmarks/allreduce_bw.py                      # shared memory, one node
    python -m resist_mpi.cluster run -- mpirun -np 4 -H node0,node1,node2,node3 --mca btl tcp,self \\
        python benchmarks/allreduce_bw.py --size-mb 64 --iters 5

Bus bandwidth = 2 (S-1)/S * bytes / time (nccl-tests' definition): what each rank's link carries
in a bandwidth-optimal allreduce, so it is comparable with the link rate whatever S is.
"""
import argparse
import json
import statistics

import numpy as np
from mpi4py import MPI


def allreduce_bw(size_mb: float = 64, iters: int = 5, warmup: int = 1) -> dict:
    comm = MPI.COMM_WORLD
    n = int(size_mb * 2 ** 20) // 4
    buf = np.ones(n, dtype=np.float32)
    times = []
    for i in range(warmup + iters):
        comm.Barrier()
        t0 = MPI.Wtime()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        dt = comm.allreduce(MPI.Wtime() - t0, op=MPI.MAX)
        if i >= warmup:
            times.append(dt)
    s, nbytes = comm.Get_size(), 4 * n
    t = statistics.median(times)
    return {"ranks": s, "bytes": nbytes, "median_s": t, "busbw_gbit_s": 2 * (s - 1) / s * nbytes * 8 / t / 1e9,
            "hosts": sorted(set(comm.allgather(MPI.Get_processor_name())))}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=64)
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args()
    result = allreduce_bw(a.size_mb, a.iters)
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(json.dumps(result), flush=True)
