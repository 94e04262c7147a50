"""The mpi4py backend: buffer (uppercase) methods on zero-copy numpy views of CPU tensors.

CUDA tensors are staged through host memory (copy to CPU, communicate, copy back) unless the MPI
library reports CUDA awareness (``MPI.Query_cuda_support()``, Open MPI >= 4 built with CUDA) or
``RESIST_CUDA_AWARE=1`` is set; then device buffers are handed to MPI directly.

Background averages (--overlap) are MPI_Iallreduce on a duplicated communicator. Open MPI moves
their bytes only while some thread is inside the library, so something must call it while torch
computes. ``RESIST_MPI_PROGRESS`` picks who: ``thread`` (default) the process's background thread,
which tests the request every 0.2 ms and sleeps in between (a blocking wait would spin a core the
ranks need), or ``poll``, the training thread itself after every optimizer step (the Averager's
poll()). Both need the MPI_THREAD_MULTIPLE level for work on the background thread (mpi4py asks
for it): without it (``MPIComm.thread_multiple`` False) every background job runs where it is
started, on the training thread, so nothing is hidden, and one line says so.

Where this module starts MPI, it gives Open MPI the ring for model-sized allreduces and for
allgathers (OPEN_MPI_DEFAULTS, OPEN_MPI_RULES below; docs/backends.md has the measurements), and
alltoallv_tensors, the block exchange, sends large exchanges in pairwise steps.
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from typing import List, Optional

import numpy as np
import torch

from .accounting import ELEMENT_BYTES, Counters, ring_allreduce_bytes
from .base import Comm, check_flat
from .work import DoneWork, Work
from .fusion import empty_flat


# Open MPI settings this backend defaults to (a value the user set, in the environment or by
# mpirun --mca, wins). MPI reads them once, when it starts, so they apply only where this module
# starts MPI (not where Horovod or the user's own mpi4py import started it first).
#
# coll_libnbc_iallreduce_algorithm=1 (ring) for --overlap's background average: with its own choice
# (a heuristic by size) Open MPI 4.1's MPI_Iallreduce of a 4.8 MB buffer over 4 simulated nodes on
# 22.7 Mbit/s links took 8.9 s (29% of the link's rate), the ring 3.0 s (86%)
# (benchmarks/allreduce_bw.py --ops allreduce,iallreduce; docs/backends.md).
OPEN_MPI_DEFAULTS = {"OMPI_MCA_coll_libnbc_iallreduce_algorithm": "1"}

# The blocking collectives' rules (open_mpi_rules.conf): the ring for allreduces from 256 KiB and for
# every allgatherv (the int8 wire's and the groups' gathers, the evaluation's gather). Open MPI lets a
# rules file override an algorithm forced by coll_tuned_<collective>_algorithm, so the file is given
# only where the environment sets no coll_tuned parameter at all.
OPEN_MPI_RULES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "open_mpi_rules.conf")
_TUNED = "OMPI_MCA_coll_tuned_"


def with_open_mpi_defaults(environ) -> None:
    """Give environ (a mapping) each of OPEN_MPI_DEFAULTS that it has no value for, and the rules
    file for the tuned collectives where it sets no coll_tuned parameter."""
    for key, value in OPEN_MPI_DEFAULTS.items():
        environ.setdefault(key, value)
    if not any(key.startswith(_TUNED) for key in environ):
        environ[_TUNED + "use_dynamic_rules"] = "1"
        environ[_TUNED + "dynamic_rules_filename"] = OPEN_MPI_RULES


def _mpi():
    if "mpi4py.MPI" not in sys.modules:  # MPI is not started yet: it reads its settings when it starts
        with_open_mpi_defaults(os.environ)
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


_FRAME = 1024  # bytes of bcast_object's first broadcast (below Open MPI's shared-memory eager limit)
_TAG = 7100  # tags of alltoallv_tensors messages: _TAG + position in the per-peer list
# From this many bytes sent and received by a rank, alltoallv_tensors goes pairwise (see there).
PAIRWISE_BYTES = int(os.environ.get("RESIST_MPI_PAIRWISE_BYTES", 256 * 1024))


def _array(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor (detach() only when needed: it costs a tensor object)."""
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _displs(counts: List[int]) -> List[int]:
    # a plain list: building a numpy array per call measured as real overhead on small messages
    return list(itertools.accumulate(counts[:-1], initial=0))


class _RequestWork(Work):
    """An MPI request of a mean in flight, progressed by the caller's done() polls."""

    def __init__(self, req, arr, size):
        super().__init__()
        self.req, self.arr, self.size, self._divided = req, arr, size, False

    def _finish(self):
        if not self._divided:
            np.divide(self.arr, self.size, out=self.arr)
            self._divided = True

    def _finished(self) -> bool:
        if self.req.Test():
            self._finish()
            return True
        return False

    def _complete(self) -> None:
        self.req.Wait()
        self._finish()


class MPIComm(Comm):
    """Backend over mpi4py's COMM_WORLD (or a given communicator, e.g. COMM_SELF in tests)."""

    name = "mpi"

    def __init__(self, comm=None, counters=None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        # Local rank from MPI itself (ranks sharing memory), whatever the launcher was.
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.comm.Get_rank())
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()
        super().__init__(self.comm.Get_rank(), self.comm.Get_size(), local_rank, local_size, counters)
        self._cuda_aware = None
        self._displs_cache = {}
        self._counts_buffers = (np.empty(self.size, dtype=np.int64), np.empty(self.size, dtype=np.int64))
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self.thread_multiple = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        self.progress = os.environ.get("RESIST_MPI_PROGRESS", "thread")
        if self.progress not in ("thread", "poll"):
            raise ValueError(f"RESIST_MPI_PROGRESS={self.progress!r}: use thread or poll")
        if counters is None:  # a world of its own (a split is told its nodes by its parent)
            self.learn_nodes()

    def _split(self, color, key, groups):
        return MPIComm(self.comm.Split(color, key), counters=self._counters)

    def _dup(self):
        return MPIComm(self.comm.Dup(), counters=Counters())

    def submit(self, fn):
        if self.thread_multiple:
            return super().submit(fn)
        if not getattr(MPIComm, "_warned_threads", False) and self.rank == 0:
            MPIComm._warned_threads = True
            sys.stderr.write("resist_mpi: note: this MPI gives no MPI_THREAD_MULTIPLE: background averages run "
                             "on the training thread (--overlap hides nothing)\n")
        # run here, on the training thread: its time is exposed (no t_start: nothing hidden), and an
        # error comes out of wait(), as a background job's does on every backend
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- raised again by wait()
            return DoneWork(error=e)
        return DoneWork()

    def start_allreduce_mean_(self, t):
        """Iallreduce on this (background) communicator; progressed by the background thread or by
        polls from the training thread (RESIST_MPI_PROGRESS, see the module docstring)."""
        check_flat(t, "start_allreduce_mean_")
        if t.device.type != "cpu" or self.size == 1 or t.numel() == 0:
            return super().start_allreduce_mean_(t)
        moved = ring_allreduce_bytes(ELEMENT_BYTES * t.numel(), self.size)
        arr, MPI, comm, size = t.detach().numpy(), self.MPI, self.comm, self.size

        def start():
            return comm.Iallreduce(MPI.IN_PLACE, [arr, MPI.FLOAT], op=MPI.SUM)

        if self.progress == "poll" or not self.thread_multiple:
            work = _RequestWork(start(), arr, size)
        else:
            def run():  # test-and-sleep: progress without spinning a core the ranks compute on
                req = start()
                while not req.Test():
                    time.sleep(0.0002)
                np.divide(arr, size, out=arr)
            work = super().submit(run)
        self._tally(*self._ring_tally(moved, moved))
        return work

    # Host staging for device tensors ----------------------------------------------------------
    def _host(self, t: torch.Tensor):
        """(buffer MPI can use, tensor to copy back into afterwards or None)."""
        if self._direct(t):
            return (t.detach().numpy() if t.device.type == "cpu" else t), None
        staged = t.cpu()
        return staged.numpy(), staged

    def prepare_allreduce(self, t):
        """Comm.prepare_allreduce; for a CPU tensor, h() is one MPI call on a numpy view made once
        (on 4 ranks sharing 2 cores each microsecond of Python per call cost ~7 us of wall time)."""
        if t.device.type != "cpu" or self.size == 1 or t.numel() == 0:
            return super().prepare_allreduce(t)
        check_flat(t, "allreduce_mean_")
        arr, MPI, comm, size = t.detach().numpy(), self.MPI, self.comm, self.size
        moved = ring_allreduce_bytes(ELEMENT_BYTES * t.numel(), size)
        tally, count = self._ring_tally(moved, moved), self._tally

        def run():
            comm.Allreduce(MPI.IN_PLACE, [arr, MPI.FLOAT], op=MPI.SUM)
            np.divide(arr, size, out=arr)  # measured faster than torch's div_ on one thread
            count(*tally)
            return t
        return run

    def _allreduce_(self, t, op):
        buf, staged = self._host(t)
        self.comm.Allreduce(self.MPI.IN_PLACE, [buf, self.MPI.FLOAT], op=self.MPI.SUM)
        if isinstance(buf, np.ndarray):
            np.divide(buf, self.size, out=buf)  # measured faster than torch's div_ on one thread
        else:
            t.div_(self.size)
        if staged is not None:
            t.copy_(staged)

    def alltoallv(self, send, send_counts, recv_counts=None, out=None):
        """Comm.alltoallv; for CPU tensors a one-shot call puts as little Python as it can around
        the MPI call (no handle is built; displacements come from a small cache of count lists)."""
        if send.device.type != "cpu" or (out is not None and out.device.type != "cpu"):
            return super().alltoallv(send, send_counts, recv_counts, out)
        sc, rc = self._check_alltoallv(send, send_counts, recv_counts, out)
        rbuf = np.empty(sum(rc), dtype=np.float32) if out is None else _array(out)
        self.comm.Alltoallv([_array(send), (sc, self._displs(sc)), self.MPI.FLOAT],
                            [rbuf, (rc, self._displs(rc)), self.MPI.FLOAT])
        self._tally(*self._alltoallv_tally(sc, rc))
        return (torch.from_numpy(rbuf) if out is None else out), rc

    def _displs(self, counts: List[int]) -> List[int]:
        key = tuple(counts)
        d = self._displs_cache.get(key)
        if d is None:
            if len(self._displs_cache) > 64:  # a few plans repeat; do not grow without bound
                self._displs_cache.clear()
            d = self._displs_cache[key] = _displs(counts)
        return d

    def prepare_alltoallv(self, send, send_counts, recv_counts=None, out=None):
        """Comm.prepare_alltoallv; for CPU tensors the MPI buffer specs are built once and h() is one
        Alltoallv (plus the receive allocation when no out= is given)."""
        if send.device.type != "cpu" or (out is not None and out.device.type != "cpu"):
            return super().prepare_alltoallv(send, send_counts, recv_counts, out)
        sc, rc = self._check_alltoallv(send, send_counts, recv_counts, out)
        tally, count = self._alltoallv_tally(sc, rc), self._tally
        MPI, comm, n_recv = self.MPI, self.comm, sum(rc)
        sspec = [send.detach().numpy(), (sc, _displs(sc)), MPI.FLOAT]
        rcd = (rc, _displs(rc))
        rspec = None if out is None else [out.detach().numpy(), rcd, MPI.FLOAT]

        def run():
            if rspec is None:
                rbuf = np.empty(n_recv, dtype=np.float32)
                comm.Alltoallv(sspec, [rbuf, rcd, MPI.FLOAT])
                recv = torch.from_numpy(rbuf)
            else:
                comm.Alltoallv(sspec, rspec)
                recv = out
            count(*tally)
            return recv, rc
        return run

    def _direct(self, t: torch.Tensor) -> bool:
        """Whether MPI can use t's memory as it is (a CPU tensor, or CUDA-aware MPI)."""
        if t.device.type == "cpu":
            return True
        if self._cuda_aware is None:
            self._cuda_aware = cuda_aware()
        return self._cuda_aware

    def _alltoallv(self, send, send_counts, recv_counts):
        # receive on the host when the send side has to be staged there, and move once at the end
        recv = empty_flat(sum(recv_counts), send.device if self._direct(send) else "cpu")
        recv = self._alltoallv_into(send, send_counts, recv_counts, recv)
        return recv if recv.device == send.device else recv.to(send.device)

    def _alltoallv_into(self, send, send_counts, recv_counts, out):
        sbuf, _ = self._host(send)
        rbuf, staged = self._host(out)
        self.comm.Alltoallv([sbuf, (send_counts, _displs(send_counts)), self.MPI.FLOAT],
                            [rbuf, (recv_counts, _displs(recv_counts)), self.MPI.FLOAT])
        if staged is not None:  # out is a device tensor and MPI is not CUDA-aware
            out.copy_(staged)
        return out

    def _alltoallv_tensors(self, sends, recvs):
        tensors = [t for ts in list(sends) + list(recvs) for t in ts]
        if any(t.device.type != "cpu" for t in tensors):
            return super()._alltoallv_tensors(sends, recvs)  # staged through one host buffer
        # Every tensor is its own contiguous message (large contiguous messages take Open MPI's
        # single-copy path, which a derived datatype over several blocks, Alltoallw, did not).
        # Where this rank moves PAIRWISE_BYTES or more, in S-1 steps: at step k it sends to rank+k and
        # receives from rank-k, so each link carries one flow at a time (no S-1 flows converging on
        # one receiver); below that, every message is posted at once and completed with one wait.
        # Ranks may choose differently: messages match by source and tag in any order, and every rank
        # walks the steps in the same order.
        MPI, comm, S, rank = self.MPI, self.comm, self.size, self.rank

        def post(src=None, dst=None):  # the receives from src and the sends to dst
            requests = []
            if src is not None:
                requests += [comm.Irecv([t.detach().numpy(), MPI.FLOAT], source=src, tag=_TAG + k)
                             for k, t in enumerate(recvs[src]) if t.numel()]
            if dst is not None:
                requests += [comm.Isend([t.detach().numpy(), MPI.FLOAT], dest=dst, tag=_TAG + k)
                             for k, t in enumerate(sends[dst]) if t.numel()]
            return requests

        if ELEMENT_BYTES * sum(t.numel() for t in tensors) >= PAIRWISE_BYTES:
            for step in range(1, S):
                MPI.Request.Waitall(post((rank - step) % S, (rank + step) % S))
        else:
            requests = [r for src in range(S) for r in post(src=src)]
            MPI.Request.Waitall(requests + [r for dst in range(S) for r in post(dst=dst)])

    def _allgather_(self, flat, counts):
        buf, staged = self._host(flat)
        self.comm.Allgatherv(self.MPI.IN_PLACE, [buf, (counts, self._displs(counts)), self.MPI.FLOAT])
        if staged is not None:
            flat.copy_(staged)

    def _exchange_counts(self, send_counts):
        send, recv = self._counts_buffers  # two int64 arrays of size S, reused
        send[:] = send_counts
        self.comm.Alltoall([send, self.MPI.INT64_T], [recv, self.MPI.INT64_T])
        return recv.tolist()

    def _bcast_(self, t, root):
        buf, staged = self._host(t)
        self.comm.Bcast([buf, self.MPI.FLOAT], root=root)
        if staged is not None:
            t.copy_(staged)

    def _bcast_bytes(self, payload: Optional[bytes], root: int) -> bytes:
        # One fixed-size frame (length + the first bytes) and, only for a longer payload, a second
        # broadcast of the rest: an assignment fits in the frame, so a round's draw costs one
        # collective (two, length then payload, measured 0.1-1.7 ms of skew on 4 oversubscribed ranks).
        frame = np.zeros(_FRAME, dtype=np.uint8)
        if self.rank == root:
            head = payload[:_FRAME - 8]
            frame[:8] = np.frombuffer(np.int64(len(payload)).tobytes(), dtype=np.uint8)
            frame[8:8 + len(head)] = np.frombuffer(head, dtype=np.uint8)
        self.comm.Bcast([frame, self.MPI.BYTE], root=root)
        n = int(frame[:8].view(np.int64)[0])
        if n <= _FRAME - 8:
            return payload if self.rank == root else frame[8:8 + n].tobytes()
        rest = bytearray(payload[_FRAME - 8:]) if self.rank == root else bytearray(n - (_FRAME - 8))
        self.comm.Bcast([rest, self.MPI.BYTE], root=root)
        return payload if self.rank == root else frame[8:].tobytes() + bytes(rest)

    def _reduce_stats_(self, t, op):
        self.comm.Allreduce(self.MPI.IN_PLACE, [t.numpy(), self.MPI.DOUBLE], op=self._ops[op])

    def _barrier(self):
        self.comm.Barrier()

    def _abort(self, code):
        self.comm.Abort(code)
