"""The Horovod backend: the comm primitives as Horovod collectives (MPI or Gloo controller).

Launch with horovodrun (``comm.init("auto")`` then picks this backend):

    horovodrun -np 4 python -m resist_mpi.train ...            # MPI controller
    horovodrun --gloo -np 4 python -m resist_mpi.train ...     # Gloo controller, no mpirun

Two Horovod rules this module keeps (see DESIGN.md):
- Every collective has a fixed name per kind of call, the same on every rank. Horovod matches
  ranks' requests by name, and a stable name lets its response cache skip negotiation when a
  call repeats (the per-round allreduce of shared layers). Calls are synchronous and issued in
  the same order on every rank, so one name is never in flight twice.
- No process sets: all calls run on the global set (creating a set is a global blocking call).

Build Horovod with ``make horovod`` (scripts/build_horovod.sh).
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Comm, abort_process


def _hvd():
    import horovod.torch as hvd  # imported lazily: an optional dependency
    return hvd


class HorovodComm(Comm):
    """Backend over horovod.torch; rank, size and local rank are Horovod's own."""

    name = "horovod"

    def __init__(self):
        hvd = _hvd()
        if not hvd.is_initialized():
            hvd.init()
        self.hvd = hvd
        self._ops = {"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}
        super().__init__(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())

    def _allreduce_(self, t, op):
        self.hvd.allreduce_(t, op=self.hvd.Average, name="resist.allreduce_mean")

    def _alltoallv(self, send, send_counts, recv_counts):
        splits = torch.tensor(send_counts, dtype=torch.int32)
        out = self.hvd.alltoall(send, splits=splits, name="resist.alltoallv")
        recv, got = out if isinstance(out, tuple) else (out, None)
        got = [int(c) for c in got] if got is not None else None
        if (got is not None and got != recv_counts) or recv.numel() != sum(recv_counts):
            raise RuntimeError(f"alltoallv on rank {self.rank}: expected {recv_counts} elements from "
                               f"ranks 0..{self.size - 1}, received {got or recv.numel()} (the "
                               f"recv_counts given disagree with the senders' send_counts)")
        return recv

    def _exchange_counts(self, send_counts):
        counts = torch.tensor(send_counts, dtype=torch.int64)
        ones = torch.ones(self.size, dtype=torch.int32)
        out = self.hvd.alltoall(counts, splits=ones, name="resist.exchange_counts")
        recv = out[0] if isinstance(out, tuple) else out
        return [int(c) for c in recv]

    def _bcast_(self, t, root):
        self.hvd.broadcast_(t, root_rank=root, name="resist.bcast")

    def _bcast_bytes(self, payload: Optional[bytes], root: int) -> bytes:
        # Length first, then the bytes as a uint8 tensor: no second pickling of the payload.
        n = torch.tensor([len(payload) if self.rank == root else 0], dtype=torch.int64)
        self.hvd.broadcast_(n, root_rank=root, name="resist.bcast_bytes.len")
        if self.rank == root:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        else:
            buf = torch.empty(int(n.item()), dtype=torch.uint8)
        self.hvd.broadcast_(buf, root_rank=root, name="resist.bcast_bytes")
        return payload if self.rank == root else buf.numpy().tobytes()

    def _reduce_stats_(self, t, op):
        self.hvd.allreduce_(t, op=self._ops[op], name=f"resist.reduce_stats.{op}")

    def _barrier(self):
        if hasattr(self.hvd, "barrier"):
            self.hvd.barrier()
        else:  # Horovod < 0.23: a one-element allreduce synchronises just as well
            self.hvd.allreduce(torch.zeros(1), op=self.hvd.Sum, name="resist.barrier")

    def _abort(self, code):
        # Horovod has no abort: MPI_Abort under its MPI controller, else exit (horovodrun stops the rest)
        abort_process(code)


__all__ = ["HorovodComm"]
