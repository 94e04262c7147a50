"""The mpi4py backend: buffer (uppercase) methods on zero-copy numpy views of CPU tensors.

CUDA tensors are staged through host memory (copy to CPU, communicate, copy back) unless the MPI
library reports CUDA awareness (``MPI.Query_cuda_support()``, Open MPI >= 4 built with CUDA) or
``RESIST_CUDA_AWARE=1`` is set; then device buffers are handed to MPI directly.
"""
from __future__ import annotations

import itertools
import os
from typing import List, Optional

import numpy as np
import torch

from .base import Comm


def _mpi():
    from mpi4py import MPI  # imported lazily: importing initialises MPI
    return MPI


def cuda_aware() -> bool:
    """Whether device buffers can go to MPI directly (see the module docstring)."""
    flag = os.environ.get("RESIST_CUDA_AWARE")
    if flag is not None:
        return flag not in ("0", "", "false", "no")
    try:
        return bool(_mpi().Query_cuda_support())
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def _displs(counts: List[int]) -> List[int]:
    # a plain list: building a numpy array per call measured as real overhead on small messages
    return list(itertools.accumulate(counts[:-1], initial=0))


class MPIComm(Comm):
    """Backend over mpi4py's COMM_WORLD (or a given communicator, e.g. COMM_SELF in tests)."""

    name = "mpi"

    def __init__(self, comm=None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        # Local rank from MPI itself (ranks sharing memory), whatever the launcher was.
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.comm.Get_rank())
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()
        super().__init__(self.comm.Get_rank(), self.comm.Get_size(), local_rank, local_size)
        self._cuda_aware = None
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    # Host staging for device tensors ----------------------------------------------------------
    def _host(self, t: torch.Tensor):
        """(buffer MPI can use, tensor to copy back into afterwards or None)."""
        if t.device.type == "cpu":
            return t.numpy(), None
        if self._cuda_aware is None:
            self._cuda_aware = cuda_aware()
        if self._cuda_aware:
            return t, None
        staged = t.cpu()
        return staged.numpy(), staged

    def _allreduce_(self, t, op):
        buf, staged = self._host(t)
        self.comm.Allreduce(self.MPI.IN_PLACE, [buf, self.MPI.FLOAT], op=self.MPI.SUM)
        (staged if staged is not None else t).div_(self.size)
        if staged is not None:
            t.copy_(staged)

    def _alltoallv(self, send, send_counts, recv_counts):
        sbuf, staged = self._host(send)
        direct = staged is None  # a CPU tensor, or a device tensor with CUDA-aware MPI
        recv = torch.empty(sum(recv_counts), dtype=torch.float32, device=send.device if direct else "cpu")
        rbuf = recv.numpy() if recv.device.type == "cpu" else recv
        self.comm.Alltoallv([sbuf, (send_counts, _displs(send_counts)), self.MPI.FLOAT],
                            [rbuf, (recv_counts, _displs(recv_counts)), self.MPI.FLOAT])
        return recv if direct else recv.to(send.device)

    def _exchange_counts(self, send_counts):
        recv = np.empty(self.size, dtype=np.int64)
        self.comm.Alltoall([np.asarray(send_counts, dtype=np.int64), self.MPI.INT64_T],
                           [recv, self.MPI.INT64_T])
        return recv.tolist()

    def _bcast_(self, t, root):
        buf, staged = self._host(t)
        self.comm.Bcast([buf, self.MPI.FLOAT], root=root)
        if staged is not None:
            t.copy_(staged)

    def _bcast_bytes(self, payload: Optional[bytes], root: int) -> bytes:
        n = np.array([len(payload) if self.rank == root else 0], dtype=np.int64)
        self.comm.Bcast([n, self.MPI.INT64_T], root=root)
        buf = bytearray(payload) if self.rank == root else bytearray(int(n[0]))
        self.comm.Bcast([buf, self.MPI.BYTE], root=root)
        return bytes(buf)

    def _reduce_stats_(self, t, op):
        self.comm.Allreduce(self.MPI.IN_PLACE, [t.numpy(), self.MPI.DOUBLE], op=self._ops[op])

    def _barrier(self):
        self.comm.Barrier()

    def _abort(self, code):
        self.comm.Abort(code)
