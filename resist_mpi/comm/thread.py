"""Ranks as threads of one process: the comm contract without a launcher, for fast exact tests.

    from resist_mpi.comm.thread import run_ranks
    results = run_ranks(4, lambda c: train_one_round(c))     # c.rank, c.size, c.allreduce_mean_ ...

Each collective is one meeting of the S threads: every rank puts its contribution in its slot,
waits at a barrier, takes what it needs from the others' slots, and waits again (so a slot is never
overwritten while another rank still reads it). Results are bit for bit what a single process
computes in rank order: a mean is the sum over ranks 0, 1, ... divided by S, on every rank alike.

Byte counting, sub-communicators (split), nodes and the prepared calls are the base class's, so a
strategy run here counts exactly what it counts under mpirun. Tensors may be on the meta device
(shapes only): the collectives then move nothing, and the counters still count, which is how the
traffic model counts what the strategies do without training anything (resist_mpi.traffic).

An exception on one rank aborts the world: the other ranks' next collective raises WorldAborted,
and run_ranks re-raises the first real exception (abort(code) raises SystemExit(code) the same way).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .base import Comm
from .accounting import Counters


class WorldAborted(RuntimeError):
    """Another rank of this thread world failed or aborted; this rank stops too."""


class CollectiveMismatch(RuntimeError):
    """Ranks of a thread world called different collectives, or sizes that do not match."""


class ThreadWorld:
    """The shared state of S thread ranks: slots, a barrier, and the sub-worlds split from it.

    Args:
        size: number of ranks.
        nodes: node id of each rank (default: all on node 0), for the cross-node counters.
        timeout: seconds a rank waits at a collective before the world is declared hung.
    """

    def __init__(self, size: int, nodes: Optional[Sequence[int]] = None, timeout: float = 300.0):
        if size < 1:
            raise ValueError(f"a thread world needs at least one rank, got {size}")
        self.size, self.timeout = size, timeout
        self.nodes = list(nodes) if nodes is not None else [0] * size
        if len(self.nodes) != size:
            raise ValueError(f"nodes names {len(self.nodes)} ranks, the world has {size}")
        self._slots: List[Any] = [None] * size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._lock = threading.Lock()
        self._children: Dict[tuple, "ThreadWorld"] = {}
        self.failure: Optional[BaseException] = None

    def meet(self, rank: int, value: Any, call: Optional[tuple] = None) -> List[Any]:
        """Every rank's value, in rank order (a collective of this world). call: what this rank calls
        (the collective and the sizes that must agree): ranks that call different ones raise
        CollectiveMismatch, all of them, where real ranks would wait for each other for good or
        move garbage."""
        self._slots[rank] = (call, value)
        self._wait()
        calls, values = zip(*self._slots)
        self._wait()
        if any(c != calls[0] for c in calls):
            raise CollectiveMismatch("ranks called different collectives: " +
                                     ", ".join(f"rank {r} {c}" for r, c in enumerate(calls)))
        return list(values)

    def _wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise WorldAborted(f"a rank of this thread world failed: {self.failure!r}") from None

    def abort(self, error: BaseException) -> None:
        """Break every barrier of this world and of the worlds split from it."""
        with self._lock:
            if self.failure is None:
                self.failure = error
            children = list(self._children.values())
        self._barrier.abort()
        for child in children:
            child.abort(error)

    def child(self, key: tuple, size: int, nodes: Sequence[int]) -> "ThreadWorld":
        """The sub-world named key (created by the first rank that asks, shared by the others)."""
        with self._lock:
            world = self._children.get(key)
            if world is None:
                world = self._children[key] = ThreadWorld(size, nodes, self.timeout)
                if self.failure is not None:
                    world.abort(self.failure)
            return world


class ThreadComm(Comm):
    """One rank of a ThreadWorld, with the contract of every backend (see comm/base.py)."""

    name = "thread"

    def __init__(self, world: ThreadWorld, rank: int, counters: Optional[Counters] = None):
        nodes = world.nodes
        local = [r for r in range(world.size) if nodes[r] == nodes[rank]]
        super().__init__(rank, world.size, local.index(rank), len(local), counters)
        self.world = world
        self.set_nodes(nodes)
        self._calls = 0  # how many splits/dups this rank made: names the sub-worlds

    # -- the primitives ------------------------------------------------------------------------
    def _meet(self, value: Any, *call) -> List[Any]:
        return self.world.meet(self.rank, value, call)

    def _allreduce_(self, t: torch.Tensor, op: str) -> None:
        parts = self._meet(t, "allreduce", op, t.numel(), t.dtype)
        total = _ordered_sum(parts)
        self._meet(None, "allreduce (written)")  # everyone summed before anyone writes into its own tensor
        with torch.no_grad():
            t.copy_(total.div_(self.size) if op == "mean" else total)

    def _reduce_stats_(self, t: torch.Tensor, op: str) -> None:
        parts = self._meet(t.clone(), "reduce_stats", op, t.numel())
        if op == "sum":
            out = _ordered_sum(parts)
        else:
            out = torch.stack(parts).amax(0) if op == "max" else torch.stack(parts).amin(0)
        t.copy_(out)

    def _alltoallv_tensors(self, sends, recvs) -> None:
        table = self._meet((sends, [[t.numel() for t in ts] for ts in recvs]), "alltoallv_tensors")
        _check_pairs([[[t.numel() for t in ts] for ts in sent] for sent, _ in table], [r for _, r in table])
        table = [sent for sent, _ in table]
        with torch.no_grad():
            for src, ts in enumerate(recvs):
                for t, piece in zip(ts, table[src][self.rank] if src != self.rank else ()):
                    t.copy_(piece.reshape(t.shape))
        self._meet(None, "alltoallv_tensors (written)")

    def _alltoallv(self, send, send_counts, recv_counts) -> torch.Tensor:
        out = torch.empty(sum(recv_counts), dtype=send.dtype, device=send.device)
        return self._alltoallv_into(send, send_counts, recv_counts, out)

    def _alltoallv_into(self, send, send_counts, recv_counts, out) -> torch.Tensor:
        table = self._meet((send, list(send_counts), list(recv_counts)), "alltoallv")
        _check_pairs([counts for _, counts, _ in table], [expected for _, _, expected in table])
        pieces = []
        for src, (buf, counts, _) in enumerate(table):
            start = sum(counts[:self.rank])
            pieces.append(buf[start:start + counts[self.rank]].clone())
        self._meet(None, "alltoallv (written)")
        if pieces:
            with torch.no_grad():
                torch.cat(pieces, out=out)
        return out

    def _allgather_(self, flat: torch.Tensor, counts: List[int]) -> None:
        starts = [sum(counts[:r]) for r in range(self.size)]
        table = self._meet(flat, "allgather", tuple(counts))
        pieces = [table[r][starts[r]:starts[r] + counts[r]].clone() for r in range(self.size)]
        self._meet(None, "allgather (written)")
        with torch.no_grad():
            for r, piece in enumerate(pieces):
                flat[starts[r]:starts[r] + counts[r]].copy_(piece)

    def _exchange_counts(self, send_counts: List[int]) -> List[int]:
        table = self._meet(list(send_counts), "exchange_counts", len(send_counts))
        return [table[src][self.rank] for src in range(self.size)]

    def _bcast_(self, t: torch.Tensor, root: int) -> None:
        table = self._meet(t if self.rank == root else None, "bcast", root, t.numel(), t.dtype)
        value = table[root].clone() if self.rank != root else None
        self._meet(None, "bcast (written)")
        if value is not None:
            with torch.no_grad():
                t.copy_(value)

    def _bcast_bytes(self, payload: Optional[bytes], root: int) -> bytes:
        return self._meet(payload, "bcast_object", root)[root]

    def _barrier(self) -> None:
        self._meet(None, "barrier")

    def _abort(self, code: int) -> None:
        error = SystemExit(code)
        self.world.abort(error)
        raise error

    def _split(self, color: int, key: int, groups: Dict[int, List[int]]) -> "ThreadComm":
        self._calls += 1
        members = groups[color]
        world = self.world.child(("split", self._calls, color), len(members), [self.nodes[r] for r in members])
        return ThreadComm(world, members.index(self.rank), self._counters)

    def _dup(self) -> "ThreadComm":
        self._calls += 1
        self._meet(None, "dup")
        world = self.world.child(("dup", self._calls), self.size, self.nodes)
        return ThreadComm(world, self.rank, Counters())


def _check_pairs(sent: Sequence[Sequence[Any]], expected: Sequence[Sequence[Any]]) -> None:
    """sent[s][d] (what rank s sends rank d) against expected[d][s] (what d receives from s), on
    every rank alike: a mismatch raises CollectiveMismatch everywhere (real ranks would wait for a
    message never sent, or read past one)."""
    for s, row in enumerate(sent):
        for d, what in enumerate(row):
            if s != d and what != expected[d][s]:
                raise CollectiveMismatch(f"rank {s} sends rank {d} {what} element(s), rank {d} expects {expected[d][s]}")


def _ordered_sum(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """parts[0] + parts[1] + ... in rank order (float32 stays float32), as a new tensor."""
    total = parts[0].clone()
    for p in parts[1:]:
        total.add_(p)
    return total


def _one_cpu() -> Optional[int]:
    """A CPU this thread may run on, where threads can be pinned (else None)."""
    try:
        return min(os.sched_getaffinity(0))
    except (AttributeError, OSError, ValueError):
        return None


def _pin(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu})  # this thread only (Linux: 0 is the calling thread)
    except OSError:
        pass  # a sandbox that forbids it: run unpinned


def run_ranks(size: int, fn: Callable[[ThreadComm], Any], nodes: Optional[Sequence[int]] = None,
              timeout: float = 300.0, one_cpu: bool = False) -> List[Any]:
    """Run fn(comm) on `size` thread ranks of a new ThreadWorld; their return values in rank order.

    The first exception raised on any rank (not the WorldAborted it causes on the others) is
    re-raised here, once every thread has stopped.

    one_cpu: run every rank thread on one CPU (Linux; elsewhere ignored). For work that is all
    Python under the interpreter lock (meta tensors: nothing to compute), where many threads on
    several cores spend their time handing the lock across cores (kernel time) instead of running:
    `python -m resist_mpi.tools.traffic` counts that way. Only the rank threads are pinned.
    """
    world = ThreadWorld(size, nodes, timeout)
    results: List[Any] = [None] * size
    errors: List[Optional[BaseException]] = [None] * size
    cpu = _one_cpu() if one_cpu else None

    def body(rank: int) -> None:
        try:
            if cpu is not None:
                _pin(cpu)
            results[rank] = fn(ThreadComm(world, rank))
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            errors[rank] = e
            if not isinstance(e, WorldAborted):
                world.abort(e)

    threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}", daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 60)
        if t.is_alive():
            world.abort(TimeoutError("a rank did not finish"))
            raise TimeoutError(f"thread rank {t.name} did not finish within {timeout + 60:.0f} s")
    real = [e for e in errors if e is not None and not isinstance(e, WorldAborted)]
    if real:
        raise real[0]
    if any(errors):
        raise next(e for e in errors if e is not None)
    return results


__all__ = ["ThreadWorld", "ThreadComm", "WorldAborted", "run_ranks"]
