"""The communication engine: one small API over mpi4py or Horovod.

    from resist_mpi import comm
    c = comm.init("mpi")            # or "horovod", "torch" (torch.distributed), "self"; "auto": see resolve_backend
    c.allreduce_mean_(flat)         # 1-D float32, in place
    recv, recv_counts = c.alltoallv(send, send_counts)
    obj = c.bcast_object(obj, root=0)
    c.barrier(); c.abort(1)
    c.bytes_sent, c.bytes_recv      # payload bytes (see base.py for the accounting)
"""
from __future__ import annotations

import os

from .accounting import ELEMENT_BYTES, ring_allreduce_bytes
from .base import Comm, check_flat
from .single import SelfComm
from .fusion import flat_size, pack, unpack_
from .launch import WorldInfo, launched_by_horovodrun, select_device, world_info_from_env

BACKENDS = ("auto", "mpi", "horovod", "torch", "self")


def resolve_backend(name: str = "auto", device: str = "auto") -> str:
    """The concrete backend for name. "auto" picks the fastest correct one for the launch:

    - torch (NCCL) when this rank will run on a GPU and NCCL is there; torch under torchrun;
    - mpi under mpirun/srun, and under horovodrun's MPI controller too: its ranks are MPI processes,
      and mpi4py moves the same bytes without Horovod's background thread (benchmarks/results);
    - torch (gloo) under horovodrun's Gloo controller, where there is no MPI: gloo through
      torch.distributed was faster than Horovod's (docs/backends.md, "Horovod").
    Horovod itself is used when asked for by name (--backend horovod).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    from .torch_dist import nccl_usable
    info = world_info_from_env()
    if info.launcher == "torchrun" or nccl_usable(device):
        return "torch"
    if launched_by_horovodrun() and "OMPI_COMM_WORLD_RANK" not in os.environ:
        return "torch"  # horovodrun --gloo
    return "mpi"


def init(backend: str = "auto", fail_fast: bool = True, device: str = "auto") -> Comm:
    """Start the communication backend and return its Comm.

    Args:
        backend: "mpi", "horovod", "torch" (torch.distributed: NCCL on GPUs, gloo on the CPU),
            "self" (a world of one, no MPI) or "auto" (see resolve_backend).
        fail_fast: install an excepthook so an uncaught exception on any rank aborts the job.
        device: the device training will use ("auto", "cpu", "cuda", "cuda:N"): the torch backend
            runs NCCL for GPUs and gloo for the CPU.
    """
    name = resolve_backend(backend, device)
    if name == "mpi":
        from .mpi import MPIComm
        c = MPIComm()
    elif name == "horovod":
        from .horovod import HorovodComm
        c = HorovodComm()
    elif name == "torch":
        from .torch_dist import TorchComm
        c = TorchComm(device)
    else:
        c = SelfComm()
    if fail_fast:
        c.install_excepthook()
    return c


__all__ = ["Comm", "SelfComm", "init", "resolve_backend", "pack", "unpack_", "flat_size",
           "world_info_from_env", "WorldInfo", "select_device", "launched_by_horovodrun",
           "check_flat", "ring_allreduce_bytes", "ELEMENT_BYTES", "BACKENDS"]
