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

from .base import ELEMENT_BYTES, Comm, SelfComm, check_flat, ring_allreduce_bytes
from .fusion import flat_size, pack, unpack_
from .launch import WorldInfo, launched_by_horovodrun, select_device, world_info_from_env

BACKENDS = ("auto", "mpi", "horovod", "torch", "self")


def resolve_backend(name: str = "auto", device: str = "auto") -> str:
    """The concrete backend for name. "auto": torch (NCCL) when this rank will run on a GPU with
    NCCL available, or when launched by torchrun; horovod under horovodrun; mpi otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    from .torch_dist import nccl_usable
    if world_info_from_env().launcher == "torchrun" or nccl_usable(device):
        return "torch"
    return "horovod" if launched_by_horovodrun() else "mpi"


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
