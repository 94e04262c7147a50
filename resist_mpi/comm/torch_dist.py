"""The torch.distributed backend: NCCL for CUDA tensors, gloo on the CPU.

    torchrun --nproc-per-node 4 -m resist_mpi.train --backend torch
    mpirun -np 4 python -m resist_mpi.train --backend torch         # or srun; rank 0's address by MPI
    python -m resist_mpi.train --backend auto --device cuda         # auto: torch when NCCL is there

On GPUs this is the backend to use: NCCL moves device memory over NVLink/InfiniBand directly, where
mpi4py stages every exchange through host memory unless the MPI is CUDA-aware. On the CPU, gloo is
slower than the MPI library (benchmarks/results: comm_bench and sync_bench with --backend torch).

Rendezvous: torchrun sets MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK. Under mpirun,
srun or horovodrun (anything world_info_from_env recognises) with no MASTER_ADDR, rank 0 picks its
address and a free port and MPI broadcasts them once (Horovod does, under horovodrun's Gloo
controller, where there is no MPI).

Collectives are synchronous and issued in the same order on every rank. Byte counting is the
base class's (comm/base.py), so the counters equal the mpi and horovod backends' to the byte.
"""
from __future__ import annotations

import atexit
import collections
import datetime
import functools
import os
import socket
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import PeerLost
from .accounting import ELEMENT_BYTES, Counters, ring_allreduce_bytes
from .base import Comm, check_flat
from .work import DoneWork, Work
from .failfast import abort_process
from .launch import world_info_from_env

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

# The tensors of the last few collectives, each with its reference count (C++ side) from before the
# collective. gloo's worker thread lets go of a finished collective's tensors a moment after the
# collective has returned, and letting go of a tensor Python knows takes the GIL: after the
# interpreter has begun to exit, that aborts the process (SIGABRT from ProcessGroupGloo::runLoop,
# "terminate called without an active exception", in about one run of three when the run's last
# collective came just before the exit). _destroy, at exit, waits until the worker has let go.
_RECENT: "collections.deque" = collections.deque(maxlen=8)


def _held(*tensors):
    """tensors, remembered with their reference counts (see _RECENT); returns the first."""
    _RECENT.append([(t, t._use_count()) for t in tensors])
    return tensors[0]


def _settle(timeout_s: float = 0.5) -> None:
    """Wait until no recent collective's tensor is still referenced by torch's worker threads (at
    most timeout_s: a tensor referenced since by something else keeps its higher count)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and any(t._use_count() > n for op in list(_RECENT) for t, n in op):
        time.sleep(0.001)


def _rendezvous(rank: int, size: int) -> None:
    """Set MASTER_ADDR/MASTER_PORT from rank 0 when the launcher did not: broadcast by MPI (mpirun,
    srun, horovodrun's MPI controller) or by Horovod itself (horovodrun's Gloo controller, no MPI)."""
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return
    addr_port = None
    if rank == 0:
        addr = socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:  # a free port (released: init_process_group binds it right away)
            s.bind(("", 0))
            addr_port = (addr, s.getsockname()[1])
    if world_info_from_env().launcher == "horovodrun" and "OMPI_COMM_WORLD_RANK" not in os.environ:
        import horovod.torch as hvd
        hvd.init()
        addr_port = hvd.broadcast_object(addr_port, root_rank=0, name="resist.rendezvous")
        hvd.shutdown()  # only the address was needed: no Horovod thread competes with training
    else:
        from mpi4py import MPI
        if MPI.COMM_WORLD.Get_size() != size:
            raise RuntimeError(f"--backend torch: no MASTER_ADDR/MASTER_PORT set and MPI sees "
                               f"{MPI.COMM_WORLD.Get_size()} ranks, not {size}: launch with torchrun, "
                               f"mpirun, srun or horovodrun")
        addr_port = MPI.COMM_WORLD.bcast(addr_port, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr_port[0], str(addr_port[1])


def nccl_usable(device: str = "auto") -> bool:
    """Whether this process would run NCCL: CUDA present, NCCL built in, and no CPU device asked for."""
    return device != "cpu" and torch.cuda.is_available() and dist.is_nccl_available()


def _elastic_with_shared_store() -> bool:
    """Under torchrun with restarts allowed and its rendezvous store shared with the workers (its
    default): the keys of a dead generation stay in that one store, so a restarted world can read a
    dead worker's address (gloo: "Connection refused" at init) and burn its restarts."""
    return (bool(os.environ.get("TORCHELASTIC_RUN_ID")) and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
            and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0") != "1")


# What gloo and NCCL say when the other end of a collective is gone (a process that died, a link
# that is down): those failures are a lost peer, not a bug, and end the job with one line. A
# DistNetworkError (a socket of the store or of gloo failed) is one whatever its text, e.g. the
# store's "Failed to recv, got 0 bytes. Connection was likely closed" when the rank that hosted it
# has gone.
_PEER_GONE = ("connection closed by peer", "connection reset", "connection timed out", "connection refused",
              "broken pipe", "socket timeout", "timed out", "remote worker", "ncclremoteerror",
              "no route to host", "connection was likely closed")


def _peer_errors(fn):
    """Turn a collective's failure that says the peer is gone into PeerLost (one line, exit 3)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # torch.distributed.DistError is a RuntimeError
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if isinstance(e, dist.DistNetworkError) or any(s in text.lower() for s in _PEER_GONE):
                raise PeerLost(f"a collective failed because a peer is gone: {text[:200]}") from None
            raise
    return call


class TorchComm(Comm):
    """Backend over torch.distributed's default process group (NCCL on GPUs, gloo otherwise).

    Args:
        device: "auto"/"cuda"/"cuda:N" use NCCL when CUDA and NCCL are available; "cpu" uses gloo.
        timeout_s: how long a collective may wait before torch.distributed gives up.
    """

    dups_subcommunicators = False  # every rank creates every group (_dup)

    name = "torch"

    def __init__(self, device: str = "auto", timeout_s: float = 1800.0):
        info = world_info_from_env()
        rank = int(os.environ.get("RANK", info.rank))
        size = int(os.environ.get("WORLD_SIZE", info.size))
        local_rank = int(os.environ.get("LOCAL_RANK", info.local_rank))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", info.local_size))
        self.nccl = nccl_usable(device)
        if rank == 0 and _elastic_with_shared_store():
            sys.stderr.write("resist_mpi: note: torchrun may restart these workers, but it shares one rendezvous "
                             "store across restarts, where a restarted world can read a dead worker's address and "
                             "fail to connect; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (docs/multinode.md)\n")
        if not dist.is_initialized():
            if size > 1:
                _rendezvous(rank, size)
            else:
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(_free_port()))
            kw = {}
            if self.nccl:
                # one GPU per local rank, as select_device chooses it
                kw["device_id"] = torch.device("cuda", local_rank % torch.cuda.device_count())
                torch.cuda.set_device(kw["device_id"])
            dist.init_process_group("nccl" if self.nccl else "gloo", rank=rank, world_size=size,
                                    timeout=datetime.timedelta(seconds=timeout_s), **kw)
            # torch's background threads must be gone before the interpreter is: exiting with the
            # group alive aborts the process ("terminate called without an active exception")
            atexit.register(_destroy)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.nccl else torch.device("cpu")
        self.group, self.global_ranks = None, list(range(dist.get_world_size()))
        super().__init__(dist.get_rank(), dist.get_world_size(), local_rank, local_size)
        self.learn_nodes()

    @_peer_errors
    def _split(self, color, key, groups):
        # torch's rule: every rank creates every group, in the same order; a group's ranks are
        # ordered by global rank
        mine = None
        for col in sorted(groups):
            ranks = [self.global_ranks[r] for r in groups[col]]
            if ranks != sorted(ranks):
                raise ValueError("the torch backend orders a sub-communicator's ranks by global rank: "
                                 "split with keys in rank order")
            pg = dist.new_group(ranks)
            if col == color:
                mine = (pg, ranks)
        sub = TorchComm.__new__(TorchComm)
        sub.nccl, sub.device, (sub.group, sub.global_ranks) = self.nccl, self.device, mine
        Comm.__init__(sub, sub.global_ranks.index(dist.get_rank()), len(sub.global_ranks), 0, 1, self._counters)
        return sub

    @_peer_errors  # every rank creates the group through the store: a lost peer or store shows here
    def _dup(self):
        if len(self.global_ranks) != dist.get_world_size():
            raise ValueError("the torch backend duplicates only the world communicator (every rank creates "
                             "every group): dup() the world, then split the copy")
        sub = TorchComm.__new__(TorchComm)
        sub.nccl, sub.device = self.nccl, self.device
        sub.group, sub.global_ranks = dist.new_group(self.global_ranks), list(self.global_ranks)
        Comm.__init__(sub, self.rank, self.size, self.local_rank, self.local_size, Counters())
        return sub

    @_peer_errors
    def start_allreduce_mean_(self, t):
        """An asynchronous all_reduce (a work handle: gloo's threads on the CPU, NCCL's stream on GPUs)."""
        check_flat(t, "start_allreduce_mean_")
        if self.size == 1 or t.numel() == 0:
            return DoneWork()
        w = _held(self._on(t), t)
        work = dist.all_reduce(w, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        moved = ring_allreduce_bytes(ELEMENT_BYTES * t.numel(), self.size)
        self._tally(*self._ring_tally(moved, moved))
        return _TorchWork(work, w, t, self.size)

    # NCCL only takes device tensors: host tensors (metrics, pickled metadata) go through the GPU.
    def _on(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if t.device != self.device else t

    def _inplace(self, t: torch.Tensor, fn) -> None:
        work = _held(self._on(t), t)
        fn(work)
        if work is not t:
            t.copy_(work)

    @_peer_errors
    def _allreduce_(self, t, op):
        def reduce(w):
            dist.all_reduce(w, op=dist.ReduceOp.SUM, group=self.group)
            w.div_(self.size)
        self._inplace(t, reduce)

    @_peer_errors
    def _alltoallv(self, send, send_counts, recv_counts):
        out = torch.empty(sum(recv_counts), dtype=send.dtype, device=self.device)
        dist.all_to_all_single(out, _held(self._on(send), out, send), output_split_sizes=list(recv_counts),
                               input_split_sizes=list(send_counts), group=self.group)
        return out.to(send.device)

    @_peer_errors
    def _alltoallv_into(self, send, send_counts, recv_counts, out):
        self._inplace(out, lambda w: dist.all_to_all_single(w, _held(self._on(send), send), output_split_sizes=list(recv_counts),
                                                            input_split_sizes=list(send_counts), group=self.group))
        return out

    @_peer_errors
    def _alltoallv_tensors(self, sends, recvs):
        tensors = [t for ts in list(sends) + list(recvs) for t in ts]
        if any(t.device != self.device for t in tensors):
            return super()._alltoallv_tensors(sends, recvs)  # packed into one buffer, moved once
        # One point-to-point message per tensor, all posted together (NCCL groups them into one
        # launch); tags keep the k-th tensor between a pair matched with the k-th on the other side.
        g, peer = self.group, self.global_ranks
        ops = [dist.P2POp(dist.irecv, t, peer[src], g, tag=k) for src, ts in enumerate(recvs) for k, t in enumerate(ts)
               if t.numel()]
        ops += [dist.P2POp(dist.isend, t, peer[dst], g, tag=k) for dst, ts in enumerate(sends) for k, t in enumerate(ts)
                if t.numel()]
        if ops:
            _held(*tensors)
            for req in dist.batch_isend_irecv(ops):
                req.wait()

    @_peer_errors
    def _allgather_(self, flat, counts):
        """The ring the counters tally (every segment but its successor's sent to the successor,
        every segment but its own received from the predecessor), in S-1 steps of one send and one
        receive; the base class's fallback, one alltoallv, sent each segment to every rank."""
        starts = [sum(counts[:r]) for r in range(self.size)]
        succ, pred = (self.rank + 1) % self.size, (self.rank - 1) % self.size

        def ring(w):
            for k in range(self.size - 1):
                out, into = (self.rank - k) % self.size, (self.rank - k - 1) % self.size
                ops = []
                if counts[into]:
                    ops.append(dist.P2POp(dist.irecv, w[starts[into]:starts[into] + counts[into]],
                                          self.global_ranks[pred], self.group, tag=k))
                if counts[out]:
                    ops.append(dist.P2POp(dist.isend, w[starts[out]:starts[out] + counts[out]],
                                          self.global_ranks[succ], self.group, tag=k))
                if ops:
                    for req in dist.batch_isend_irecv(ops):
                        req.wait()
        self._inplace(flat, ring)

    @_peer_errors
    def _exchange_counts(self, send_counts):
        send = torch.tensor(send_counts, dtype=torch.int64, device=self.device)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, _held(send, recv), group=self.group)
        return recv.tolist()

    @_peer_errors
    def _bcast_(self, t, root):
        self._inplace(t, lambda w: dist.broadcast(w, src=self.global_ranks[root], group=self.group))

    @_peer_errors
    def _bcast_bytes(self, payload: Optional[bytes], root: int) -> bytes:
        src = self.global_ranks[root]
        n = torch.tensor([len(payload) if self.rank == root else 0], dtype=torch.int64, device=self.device)
        dist.broadcast(_held(n), src=src, group=self.group)
        if self.rank == root:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        dist.broadcast(_held(buf), src=src, group=self.group)
        return payload if self.rank == root else buf.cpu().numpy().tobytes()

    @_peer_errors
    def _reduce_stats_(self, t, op):
        self._inplace(t, lambda w: dist.all_reduce(w, op=_OPS[op], group=self.group))

    @_peer_errors
    def _barrier(self):
        dist.barrier(group=self.group)

    def _abort(self, code):
        abort_process(code)


class _TorchWork(Work):
    """A torch.distributed work handle of a sum; wait() divides (and copies back a staged tensor)."""

    def __init__(self, work, staged, target, size):
        super().__init__()
        self.work, self.staged, self.target, self.size = work, staged, target, size

    def _finished(self) -> bool:
        if self.work is not None and self.work.is_completed():
            self._complete()  # done means the mean is there, as on the other backends (not the sum yet)
        return self.work is None

    @_peer_errors
    def _complete(self) -> None:
        if self.work is None:
            return
        self.work.wait()
        self.staged.div_(self.size)
        if self.staged is not self.target:
            self.target.copy_(self.staged)
        self.work = None


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _settle()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["TorchComm", "nccl_usable"]
