"""Allreduce bus bandwidth with raw mpi4py: a sanity check of a network (e.g. the simulated cluster).

    mpirun -np 4 python benchmarks/allreduce_bw.py                      # shared memory, one node
    python -m resist_mpi.cluster run -- mpirun -np 4 -H node0,node1,node2,node3 --mca btl tcp,self \\
        python benchmarks/allreduce_bw.py --size-mb 64 --iters 5

Bus bandwidth = 2 (S-1)/S * bytes / time (nccl-tests' definition): what each rank's link carries
in a bandwidth-optimal allreduce, so it is comparable with the link rate whatever S is.

`--ops allreduce,iallreduce,allgatherv,gather_p2p,gather_pairwise` times, one line each: the
blocking MPI_Allreduce; the nonblocking MPI_Iallreduce progressed as resist_mpi's background
average progresses it (MPI_Test, then a 0.2 ms sleep); MPI_Allgatherv of a buffer of --size-mb in
S equal segments (in place); and the same gather as resist_mpi's block exchange sends it, every
segment to every other rank, with every message posted at once (gather_p2p) or in S-1 pairwise
steps (gather_pairwise: at step k, to rank+k and from rank-k). For the gathers, bandwidth = the
bytes each rank receives / time (comparable with the link rate). This is raw MPI: Open MPI picks
each one's algorithm itself unless told by an MCA setting; `--resist-defaults` starts MPI with
what resist_mpi's mpi backend gives it (resist_mpi/comm/mpi.py: OPEN_MPI_DEFAULTS, the ring for
the nonblocking allreduce, and the rules file open_mpi_rules.conf, the ring for allreduces from
256 KiB and for allgatherv). Each line prints the settings it ran under.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

if __name__ == "__main__" and "--resist-defaults" in sys.argv:  # before MPI starts: it reads them then
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from resist_mpi.comm.mpi import with_open_mpi_defaults
    with_open_mpi_defaults(os.environ)
from mpi4py import MPI  # noqa: E402  (starts MPI)

SETTINGS = ("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "OMPI_MCA_coll_tuned_use_dynamic_rules",
            "OMPI_MCA_coll_tuned_allreduce_algorithm", "OMPI_MCA_coll_tuned_dynamic_rules_filename")


def _iallreduce(comm, buf):
    req = comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    while not req.Test():
        time.sleep(0.0002)


def _gather_p2p(comm, buf, seg):
    r, S = comm.Get_rank(), comm.Get_size()
    reqs = [comm.Irecv(buf[src * seg:(src + 1) * seg], source=src, tag=7) for src in range(S) if src != r]
    reqs += [comm.Isend(buf[r * seg:(r + 1) * seg], dest=dst, tag=7) for dst in range(S) if dst != r]
    MPI.Request.Waitall(reqs)


def _gather_pairwise(comm, buf, seg):
    r, S = comm.Get_rank(), comm.Get_size()
    for k in range(1, S):
        src, dst = (r - k) % S, (r + k) % S
        MPI.Request.Waitall([comm.Irecv(buf[src * seg:(src + 1) * seg], source=src, tag=7),
                             comm.Isend(buf[r * seg:(r + 1) * seg], dest=dst, tag=7)])


def allreduce_bw(size_mb: float = 64, iters: int = 5, warmup: int = 1, op: str = "allreduce") -> dict:
    comm = MPI.COMM_WORLD
    S = comm.Get_size()
    n = int(size_mb * 2 ** 20) // 4 // S * S
    seg = n // S
    buf = np.ones(n, dtype=np.float32)
    counts, displs = [seg] * S, [seg * i for i in range(S)]
    run = {"allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
           "iallreduce": lambda: _iallreduce(comm, buf),
           "allgatherv": lambda: comm.Allgatherv(MPI.IN_PLACE, [buf, (counts, displs), MPI.FLOAT]),
           "gather_p2p": lambda: _gather_p2p(comm, buf, seg),
           "gather_pairwise": lambda: _gather_pairwise(comm, buf, seg)}[op]
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
    carried = (s - 1) / s * nbytes * (2 if op.endswith("allreduce") else 1)  # what each rank's link carries
    return {"op": op, "ranks": s, "bytes": nbytes, "median_s": t,
            "busbw_gbit_s": carried * 8 / t / 1e9,
            "hosts": sorted(set(comm.allgather(MPI.Get_processor_name()))),
            "settings": {k: os.environ[k] for k in SETTINGS if k in os.environ}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--ops", default="allreduce",
                   help="comma-separated: allreduce, iallreduce, allgatherv, gather_p2p, gather_pairwise")
    p.add_argument("--resist-defaults", action="store_true",
                   help="start MPI with resist_mpi's mpi backend's Open MPI settings")
    a = p.parse_args()
    for op in a.ops.split(","):
        result = allreduce_bw(a.size_mb, a.iters, op=op)
        if MPI.COMM_WORLD.Get_rank() == 0:
            print(json.dumps(result), flush=True)
