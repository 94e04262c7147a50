"""The mpi4py backend: buffer (uppercase) methods on zero-copy numpy views of CPU tensors.

CUDA tensors are staged through host memory (copy to CPU, communicate, copy back) unless the MPI
library reports CUDA awareness (``MPI.Query_cuda_support()``, Open MPI >= 4 built with CUDA) or
``RESIST_CUDA_AWARE=1`` is set; then device buffers are handed to MPI directly.
"""
from __future__ import annotations

import itertools
import os
import weakref
from typing import Any, List, NamedTuple, Optional

import numpy as np
import torch

from .base import ELEMENT_BYTES, Comm, ring_allreduce_bytes
from .fusion import empty_flat


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


_FRAME = 1024  # bytes of bcast_object's first broadcast (below Open MPI's shared-memory eager limit)
_TAG = 7100  # tags of alltoallv_tensors messages: _TAG + position in the per-peer list


class _Prepared(NamedTuple):
    """The checked MPI arguments of the last lean alltoallv (see MPIComm.alltoallv)."""
    send: Any            # weakref to the send tensor
    sptr: int
    n_send: int
    sc: List[int]        # copies: a caller mutating its count list in place gets a miss
    sspec: list
    rc: List[int]
    n_recv: int
    rcd: tuple           # (recv counts, displacements) for a freshly allocated receive buffer
    out: Any             # weakref to the caller's out tensor, or None (allocated per call)
    optr: int
    rspec: Optional[list]
    sent: int            # payload bytes to count
    recvd: int


class _PreparedReduce(NamedTuple):
    """The checked buffer of the last allreduce_mean_ (see MPIComm.allreduce_mean_)."""
    t: Any               # weakref to the tensor
    ptr: int
    n: int
    arr: np.ndarray      # a view of the tensor's memory made from its raw address (keeps nothing alive)
    moved: int           # payload bytes to count, each way


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
        self._displs_cache = {}
        self._last_alltoallv: Optional[_Prepared] = None
        self._last_allreduce: Optional[_PreparedReduce] = None
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    # Host staging for device tensors ----------------------------------------------------------
    def _host(self, t: torch.Tensor):
        """(buffer MPI can use, tensor to copy back into afterwards or None)."""
        if self._direct(t):
            return (t.numpy() if t.device.type == "cpu" else t), None
        staged = t.cpu()
        return staged.numpy(), staged

    def allreduce_mean_(self, t):
        """Comm.allreduce_mean_; averaging the same CPU tensor again (a strategy's flat buffer,
        every round) reuses the previous call's checked buffer, like alltoallv."""
        last = self._last_allreduce
        if last is not None and last.t() is t and t.data_ptr() == last.ptr and t.numel() == last.n:
            arr = last.arr
            self.comm.Allreduce(self.MPI.IN_PLACE, [arr, self.MPI.FLOAT], op=self.MPI.SUM)
            np.divide(arr, self.size, out=arr)
            self.bytes_sent += last.moved
            self.bytes_recv += last.moved
            return t
        self._last_allreduce = None
        super().allreduce_mean_(t)  # checks, reduces, counts
        n = t.numel()
        if self.size > 1 and n and t.device.type == "cpu":
            # weak reference and raw address: no tensor is kept alive, a dead one never matches
            arr = np.frombuffer(self.MPI.buffer.fromaddress(t.data_ptr(), ELEMENT_BYTES * n), dtype=np.float32)
            self._last_allreduce = _PreparedReduce(weakref.ref(t), t.data_ptr(), n, arr,
                                                   ring_allreduce_bytes(ELEMENT_BYTES * n, self.size))
        return t

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
        """Comm.alltoallv. CPU tensors take a lean path, and a call that repeats the previous one
        (the same tensors and counts: a training loop's exchange) reuses its checked MPI arguments.

        Measured why: on 4 ranks sharing 2 cores each microsecond of Python per call cost ~7 us of
        wall time at 1 MB (comm_bench: 1.13x raw with the checks redone every call), and the
        general path's checks alone cost ~6 us, 10% of a 1 MB exchange between two ranks.
        """
        last = self._last_alltoallv
        if (last is not None and type(send_counts) is list and type(recv_counts) is list
                and last.send() is send and send_counts == last.sc and recv_counts == last.rc
                and send.data_ptr() == last.sptr and send.numel() == last.n_send
                and (last.out is None if out is None else
                     last.out() is out and out.data_ptr() == last.optr and out.numel() == last.n_recv)):
            if out is None:
                rbuf = np.empty(last.n_recv, dtype=np.float32)
                self.comm.Alltoallv(last.sspec, [rbuf, last.rcd, self.MPI.FLOAT])
                out = torch.from_numpy(rbuf)
            else:
                self.comm.Alltoallv(last.sspec, last.rspec)
            self.bytes_sent += last.sent
            self.bytes_recv += last.recvd
            return out, recv_counts
        given_out = out is not None
        try:  # .numpy() refuses device tensors and tensors that require grad: the general path handles them
            sbuf = send.numpy()
            rbuf = out.numpy() if given_out else None
        except (TypeError, RuntimeError):
            return super().alltoallv(send, send_counts, recv_counts, out)
        sc = send_counts if type(send_counts) is list else [int(c) for c in send_counts]
        n_send = sum(sc)
        if not (sbuf.dtype == np.float32 and sbuf.ndim == 1 and sbuf.flags.c_contiguous
                and len(sc) == self.size and n_send == sbuf.size and min(sc) >= 0):
            return super().alltoallv(send, send_counts, recv_counts, out)  # raises the plain-words error
        if recv_counts is None:
            rc = self._exchange_counts_counted(sc)
        else:
            rc = recv_counts if type(recv_counts) is list else [int(c) for c in recv_counts]
        n_recv = sum(rc)
        if len(rc) != self.size or (rbuf is not None and not (
                rbuf.dtype == np.float32 and rbuf.ndim == 1 and rbuf.flags.c_contiguous and rbuf.size == n_recv)):
            return super().alltoallv(send, send_counts, rc, out)
        scd, rcd = (sc, self._displs(sc)), (rc, self._displs(rc))
        if rbuf is None:
            rbuf = np.empty(n_recv, dtype=np.float32)
            out = torch.from_numpy(rbuf)
        self.comm.Alltoallv([sbuf, scd, self.MPI.FLOAT], [rbuf, rcd, self.MPI.FLOAT])
        sent, recvd = self._alltoallv_bytes(sc, rc)
        self.bytes_sent += sent
        self.bytes_recv += recvd
        self._last_alltoallv = None
        if type(send_counts) is list and type(recv_counts) is list and n_send and n_recv:
            # Reused only while the same tensor objects come back at the same addresses with equal
            # counts. Weak references and raw addresses: the cache keeps no tensor alive, and a
            # tensor that died never matches.
            fromaddress, FLOAT = self.MPI.buffer.fromaddress, self.MPI.FLOAT
            sc, rc_copy = list(sc), list(rc)  # the caller's lists may change in place
            rcd = (rc_copy, rcd[1])
            self._last_alltoallv = _Prepared(
                send=weakref.ref(send), sptr=send.data_ptr(), n_send=n_send, sc=sc,
                sspec=[fromaddress(send.data_ptr(), ELEMENT_BYTES * n_send), (sc, scd[1]), FLOAT],
                rc=rc_copy, n_recv=n_recv, rcd=rcd,
                out=weakref.ref(out) if given_out else None, optr=out.data_ptr() if given_out else 0,
                rspec=[fromaddress(out.data_ptr(), ELEMENT_BYTES * n_recv), rcd, FLOAT] if given_out else None,
                sent=sent, recvd=recvd)
        return out, rc

    def _displs(self, counts: List[int]) -> List[int]:
        key = tuple(counts)
        d = self._displs_cache.get(key)
        if d is None:
            if len(self._displs_cache) > 64:
                self._displs_cache.clear()
            d = self._displs_cache[key] = _displs(counts)
        return d

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
        self.comm.Alltoallv([sbuf, (send_counts, self._displs(send_counts)), self.MPI.FLOAT],
                            [rbuf, (recv_counts, self._displs(recv_counts)), self.MPI.FLOAT])
        if staged is not None:  # out is a device tensor and MPI is not CUDA-aware
            out.copy_(staged)
        return out

    def _alltoallv_tensors(self, sends, recvs):
        tensors = [t for ts in list(sends) + list(recvs) for t in ts]
        if any(t.device.type != "cpu" for t in tensors):
            return super()._alltoallv_tensors(sends, recvs)  # staged through one host buffer
        # Every tensor is its own contiguous message, all posted at once and completed together
        # (what MPI's linear alltoallv does inside): large contiguous messages take Open MPI's
        # single-copy path, which a derived datatype over several blocks (Alltoallw) did not.
        MPI, comm = self.MPI, self.comm
        requests = []
        for src, ts in enumerate(recvs):
            for k, t in enumerate(ts):
                if t.numel():
                    requests.append(comm.Irecv([t.detach().numpy(), MPI.FLOAT], source=src, tag=_TAG + k))
        for dst, ts in enumerate(sends):
            for k, t in enumerate(ts):
                if t.numel():
                    requests.append(comm.Isend([t.detach().numpy(), MPI.FLOAT], dest=dst, tag=_TAG + k))
        MPI.Request.Waitall(requests)

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
