"""The communication engine: one small API over mpi4py or Horovod.

    from resist_mpi import comm
    c = comm.init("mpi")            # "auto": horovod when launched by horovodrun, else mpi
    c.allreduce_mean_(flat)         # 1-D float32, in place
    recv, recv_counts = c.alltoallv(send, send_counts)
    obj = c.bcast_object(obj, root=0)
    c.barrier(); c.abort(1)
    c.bytes_sent, c.bytes_recv      # payload bytes (see base.py for the accounting)
"""
from __future__ import annotations

from .base import ELEMENT_BYTES, Comm, SelfComm, check_flat, ring_allreduce_bytes
from .fusion import flat_size, pack, unpack_
from .launch import WorldInfo, launched_by_horovodrun, select_device, world_info_from_env

BACKENDS = ("auto", "mpi", "horovod", "self")


def resolve_backend(name: str = "auto") -> str:
    """The concrete backend for name: "auto" is horovod under horovodrun, else mpi."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "horovod" if launched_by_horovodrun() else "mpi"
    return name


def init(backend: str = "auto", fail_fast: bool = True) -> Comm:
    """Start the communication backend and return its Comm.

    Args:
        backend: "mpi", "horovod", "self" (a world of one, no MPI) or "auto".
        fail_fast: install an excepthook so an uncaught exception on any rank aborts the job.
    """
    name = resolve_backend(backend)
    if name == "mpi":
        from .mpi import MPIComm
        c = MPIComm()
    elif name == "horovod":
        from .horovod import HorovodComm
        c = HorovodComm()
    else:
        c = SelfComm()
    if fail_fast:
        c.install_excepthook()
    return c


__all__ = ["Comm", "SelfComm", "init", "resolve_backend", "pack", "unpack_", "flat_size",
           "world_info_from_env", "WorldInfo", "select_device", "launched_by_horovodrun",
           "check_flat", "ring_allreduce_bytes", "ELEMENT_BYTES", "BACKENDS"]
