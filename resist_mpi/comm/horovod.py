"""The Horovod backend: the comm primitives as Horovod collectives (MPI or Gloo controller).

Launch with horovodrun (``comm.init("auto")`` then picks this backend):

    horovodrun -np 4 python -m resist_mpi.train ...            # MPI controller
    horovodrun --gloo -np 4 python -m resist_mpi.train ...     # Gloo controller, no mpirun

Two Horovod rules this module keeps (see DESIGN.md):
- Every collective has a fixed name per kind of call, the same on every rank. Horovod matches
  ranks' requests by name, and a stable name lets its response cache skip negotiation when a
  call repeats (the per-round allreduce of shared layers). Calls are synchronous and issued in
  the same order on every rank, so one name is never in flight twice.
- Process sets only for sub-communicators (--group-size), created once at start-up (creating a
  set is a global blocking call): never per round.

Build Horovod with ``make horovod`` (scripts/build_horovod.sh).
"""
from __future__ import annotations

from typing import Optional

import torch

from .accounting import ELEMENT_BYTES, Counters, ring_allreduce_bytes
from .base import Comm, check_flat
from .work import DoneWork, Work
from .failfast import abort_process


# ranks -> process set, for the whole process: Horovod's sets outlive any Comm object, and it refuses
# to add the same set twice
_PROCESS_SETS = {}


def _hvd():
    import horovod.torch as hvd  # imported lazily: an optional dependency
    return hvd


class HorovodComm(Comm):
    """Backend over horovod.torch; rank, size and local rank are Horovod's own. A sub-communicator
    (split) is a Horovod process set; names carry the set's id, so two sets never share a name."""

    name = "horovod"

    def __init__(self):
        hvd = _hvd()
        if not hvd.is_initialized():
            hvd.init(process_sets="dynamic")  # sub-communicators (--group-size) are added later
        self.hvd = hvd
        self._ops = {"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}
        self.process_set, self.global_ranks, self._tag = hvd.global_process_set, list(range(hvd.size())), "resist"
        super().__init__(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())
        self.learn_nodes()

    def _split(self, color, key, groups):
        mine = None
        for col in sorted(groups):  # every rank adds every set, in the same order
            ranks = tuple(self.global_ranks[r] for r in groups[col])
            if list(ranks) != sorted(ranks):
                raise ValueError("the horovod backend orders a process set's ranks by global rank: "
                                 "split with keys in rank order")
            ps = _PROCESS_SETS.get(ranks)
            if ps is None and len(ranks) == self.hvd.size():
                ps = self.hvd.global_process_set  # Horovod has it already, and refuses a duplicate
            elif ps is None:
                ps = _PROCESS_SETS[ranks] = self.hvd.add_process_set(list(ranks))
            if col == color:
                mine = (ps, list(ranks))
        sub = HorovodComm.__new__(HorovodComm)
        sub.hvd, sub._ops = self.hvd, self._ops
        (sub.process_set, sub.global_ranks), sub._tag = mine, f"{self._tag}.ps{mine[0].process_set_id}"
        Comm.__init__(sub, sub.global_ranks.index(self.hvd.rank()), len(sub.global_ranks), 0, 1, self._counters)
        return sub

    def _dup(self):
        # Horovod matches ranks' requests by name: the copy's names differ, the process set is the same
        sub = HorovodComm.__new__(HorovodComm)
        sub.hvd, sub._ops = self.hvd, self._ops
        sub.process_set, sub.global_ranks = self.process_set, list(self.global_ranks)
        self._dups = getattr(self, "_dups", 0) + 1
        sub._tag = f"{self._tag}.bg{self._dups}"
        Comm.__init__(sub, self.rank, self.size, self.local_rank, self.local_size, Counters())
        return sub

    def start_allreduce_mean_(self, t):
        """Horovod's asynchronous allreduce (its background thread moves it); wait() synchronizes."""
        check_flat(t, "start_allreduce_mean_")
        if self.size == 1 or t.numel() == 0:
            return DoneWork()
        handle = self.hvd.allreduce_async_(t, op=self.hvd.Average, name=f"{self._tag}.allreduce_async",
                                           process_set=self.process_set)
        moved = ring_allreduce_bytes(ELEMENT_BYTES * t.numel(), self.size)
        self._tally(*self._ring_tally(moved, moved))
        return _HorovodWork(self.hvd, handle)

    def _allreduce_(self, t, op):
        self.hvd.allreduce_(t, op=self.hvd.Average, name=f"{self._tag}.allreduce_mean", process_set=self.process_set)

    def _alltoallv(self, send, send_counts, recv_counts):
        splits = torch.tensor(send_counts, dtype=torch.int32)
        out = self.hvd.alltoall(send, splits=splits, name=f"{self._tag}.alltoallv", process_set=self.process_set)
        recv, got = out if isinstance(out, tuple) else (out, None)
        got = [int(c) for c in got] if got is not None else None
        if (got is not None and got != recv_counts) or recv.numel() != sum(recv_counts):
            raise RuntimeError(f"alltoallv on rank {self.rank}: expected {recv_counts} elements from "
                               f"ranks 0..{self.size - 1}, received {got or recv.numel()} (the "
                               f"recv_counts given disagree with the senders' send_counts)")
        return recv

    def _allgather_(self, flat, counts):
        start = sum(counts[:self.rank])
        # Horovod gathers along the first dimension, sizes may differ per rank
        flat.copy_(self.hvd.allgather(flat[start:start + counts[self.rank]].clone(), name=f"{self._tag}.allgather",
                                      process_set=self.process_set))

    def _exchange_counts(self, send_counts):
        counts = torch.tensor(send_counts, dtype=torch.int64)
        ones = torch.ones(self.size, dtype=torch.int32)
        out = self.hvd.alltoall(counts, splits=ones, name=f"{self._tag}.exchange_counts", process_set=self.process_set)
        recv = out[0] if isinstance(out, tuple) else out
        return [int(c) for c in recv]

    def _bcast_(self, t, root):
        self.hvd.broadcast_(t, root_rank=self._root_rank(root), name=f"{self._tag}.bcast", process_set=self.process_set)

    def _root_rank(self, root: int) -> int:
        # Horovod names the root of a broadcast by its global rank, also inside a process set
        return self.global_ranks[root]

    def _bcast_bytes(self, payload: Optional[bytes], root: int) -> bytes:
        # Length first, then the bytes as a uint8 tensor: no second pickling of the payload.
        n = torch.tensor([len(payload) if self.rank == root else 0], dtype=torch.int64)
        kw = dict(root_rank=self._root_rank(root), process_set=self.process_set)
        self.hvd.broadcast_(n, name=f"{self._tag}.bcast_bytes.len", **kw)
        if self.rank == root:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        else:
            buf = torch.empty(int(n.item()), dtype=torch.uint8)
        self.hvd.broadcast_(buf, name=f"{self._tag}.bcast_bytes", **kw)
        return payload if self.rank == root else buf.numpy().tobytes()

    def _reduce_stats_(self, t, op):
        self.hvd.allreduce_(t, op=self._ops[op], name=f"{self._tag}.reduce_stats.{op}", process_set=self.process_set)

    def _barrier(self):
        self.hvd.barrier(process_set=self.process_set)

    def _abort(self, code):
        # Horovod has no abort: MPI_Abort under its MPI controller, else exit (horovodrun stops the rest)
        abort_process(code)


class _HorovodWork(Work):
    def __init__(self, hvd, handle):
        super().__init__()
        self.hvd, self.handle = hvd, handle

    def _finished(self) -> bool:
        return self.handle is None or self.hvd.poll(self.handle)

    def _complete(self) -> None:
        if self.handle is not None:
            self.hvd.synchronize(self.handle)
            self.handle = None


__all__ = ["HorovodComm"]
