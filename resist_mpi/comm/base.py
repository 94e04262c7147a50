"""The communication API every backend implements.

Everything above this package speaks in flat float32 tensors and plans; only the backends know
MPI or Horovod. What each call counts (payload bytes, the part across nodes, control bytes) is
accounting.py's: Comm mixes in its counters and tallies.
"""
from __future__ import annotations

import pickle
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .accounting import ELEMENT_BYTES, Accounting, Counters, ring_allreduce_bytes
from .work import ThreadWork, Work, _Process


def check_flat(t: torch.Tensor, what: str) -> None:
    """Raise a plain-words error unless t is a 1-D contiguous float32 tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32 or t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{what}: expected a 1-D contiguous float32 tensor, got dtype={t.dtype} "
                         f"shape={tuple(t.shape)} contiguous={t.is_contiguous()} (use comm.pack)")


class Comm(Accounting):
    """Base class of the backends: attributes, counters, argument checks and fail-fast handling.

    Attributes:
        rank, size: this process's rank and the number of ranks.
        local_rank, local_size: rank and number of ranks on this node.
        nodes: node id of every rank (ranks with the same id share a host).
        bytes_sent, bytes_recv: cumulative payload bytes (see the module docstring).
        bytes_sent_cross, bytes_recv_cross: the part of them exchanged with other nodes.
        control_bytes: cumulative bytes of bookkeeping messages (sent + received).
        name: backend name ("mpi", "horovod", "torch" or "self").
        dups_subcommunicators: whether dup() works on a communicator that split() made (False:
            only the world's, e.g. torch's process groups, which every rank must create: dup() the
            world, then split the copy).
    """

    name = "base"
    dups_subcommunicators = True

    def __init__(self, rank: int, size: int, local_rank: int, local_size: int,
                 counters: Optional[Counters] = None):
        self.rank, self.size = rank, size
        self.local_rank, self.local_size = local_rank, local_size
        self._counters = counters or Counters()
        self._process = _Process()
        self.set_nodes([0] * size)
        self.hosts: List[str] = ["localhost"] * size  # every rank's host name (learn_nodes)

    # -- topology (the byte counters and tallies: Accounting) ------------------------------------
    def learn_nodes(self) -> None:
        """Every rank's node, from the host names (one allgather of metadata: control bytes)."""
        import socket
        if self.size == 1:
            self.hosts = [socket.gethostname()]
            return
        with self.as_control():
            hosts = self.allgather_object(socket.gethostname())
        self.hosts = list(hosts)
        ids = {h: k for k, h in enumerate(dict.fromkeys(hosts))}
        self.set_nodes([ids[h] for h in hosts])







    # -- the API (backends implement the underscored primitives) ---------------------------------
    def allreduce_mean_(self, t: torch.Tensor) -> torch.Tensor:
        """Average t over all ranks, in place. t: 1-D contiguous float32 tensor. Returns t."""
        return self.prepare_allreduce(t)()

    def prepare_allreduce(self, t: torch.Tensor) -> Callable[[], torch.Tensor]:
        """allreduce_mean_(t) prepared once, to run many times: h = c.prepare_allreduce(flat); h().

        Like an MPI persistent request: the arguments are checked and turned into what the library
        needs once, and each h() only communicates (a strategy averages the same flat buffer every
        round). t must keep its storage while the handle is used (values may change freely).
        """
        check_flat(t, "allreduce_mean_")
        moved = ring_allreduce_bytes(t.numel() * ELEMENT_BYTES, self.size)
        if self.size == 1 or t.numel() == 0:
            return lambda: t
        tally = self._ring_tally(moved, moved)

        def run():
            self._allreduce_(t, "mean")
            self._tally(*tally)
            return t
        return run

    def alltoallv(self, send: torch.Tensor, send_counts: Sequence[int],
                  recv_counts: Optional[Sequence[int]] = None,
                  out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[int]]:
        """Personalised all-to-all of float32 elements.

        Args:
            send: 1-D float32 tensor, the segments for rank 0, 1, ... laid end to end.
            send_counts: elements for each destination rank (len == size, sum == send.numel()).
            recv_counts: elements expected from each source rank, when the caller knows them (a
                routing plan does); otherwise they are exchanged first (counted as control bytes).
            out: a 1-D float32 tensor of exactly sum(recv_counts) elements to receive into, reused
                between calls to spare the allocation; backends that cannot receive in place
                (Horovod) return a new tensor instead.
        Returns:
            (recv, recv_counts): the received segments laid end to end by source rank, and counts.
        """
        return self.prepare_alltoallv(send, send_counts, recv_counts, out)()

    def prepare_alltoallv(self, send: torch.Tensor, send_counts: Sequence[int],
                          recv_counts: Optional[Sequence[int]] = None,
                          out: Optional[torch.Tensor] = None) -> Callable[[], Tuple[torch.Tensor, List[int]]]:
        """alltoallv(...) prepared once, to run many times with the same tensors and counts (see
        prepare_allreduce); recv counts not given are exchanged here, once."""
        send_counts, recv_counts = self._check_alltoallv(send, send_counts, recv_counts, out)
        tally = self._alltoallv_tally(send_counts, recv_counts)
        into = out is not None and hasattr(self, "_alltoallv_into")

        def run():
            if into:
                recv = self._alltoallv_into(send, send_counts, recv_counts, out)
            else:
                recv = self._alltoallv(send, send_counts, recv_counts)
            self._tally(*tally)
            return recv, recv_counts
        return run

    def _check_alltoallv(self, send, send_counts, recv_counts, out) -> Tuple[List[int], List[int]]:
        """Checked count lists (copies) of an alltoallv; exchanges the recv counts when not given."""
        check_flat(send, "alltoallv")
        send_counts = list(send_counts) if type(send_counts) is list else [int(c) for c in send_counts]
        if len(send_counts) != self.size or sum(send_counts) != send.numel() or min(send_counts) < 0:
            raise ValueError(f"alltoallv: send_counts {send_counts} must have one non-negative entry "
                             f"per rank ({self.size}) summing to send.numel() ({send.numel()})")
        if recv_counts is None:
            recv_counts = self._exchange_counts_counted(send_counts)
        recv_counts = list(recv_counts) if type(recv_counts) is list else [int(c) for c in recv_counts]
        if len(recv_counts) != self.size:
            raise ValueError(f"alltoallv: recv_counts needs one entry per rank ({self.size})")
        if out is not None:
            check_flat(out, "alltoallv out")
            if out.numel() != sum(recv_counts):
                raise ValueError(f"alltoallv: out has {out.numel()} elements, recv_counts sum to {sum(recv_counts)}")
        return send_counts, recv_counts


    def allgather_(self, flat: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Every rank's segment of flat to every rank, in place: segment r (counts[r] elements from
        offset sum(counts[:r])) holds rank r's values before; afterwards every rank holds all of them."""
        return self.prepare_allgather(flat, counts)()

    def prepare_allgather(self, flat: torch.Tensor, counts: Sequence[int]) -> Callable[[], torch.Tensor]:
        """allgather_(flat, counts) prepared once, to run many times (see prepare_allreduce)."""
        check_flat(flat, "allgather_")
        counts = [int(n) for n in counts]
        if len(counts) != self.size or sum(counts) != flat.numel() or min(counts) < 0:
            raise ValueError(f"allgather_: counts {counts} must have one non-negative entry per rank "
                             f"({self.size}) summing to flat.numel() ({flat.numel()})")
        if self.size == 1:
            return lambda: flat
        total, succ = ELEMENT_BYTES * sum(counts), (self.rank + 1) % self.size
        tally = self._ring_tally(total - ELEMENT_BYTES * counts[succ], total - ELEMENT_BYTES * counts[self.rank])

        def run():
            self._allgather_(flat, counts)
            self._tally(*tally)
            return flat
        return run

    def _allgather_(self, flat: torch.Tensor, counts: List[int]) -> None:
        """Fallback: each rank sends its segment to every rank in one alltoallv, received into flat."""
        start = sum(counts[:self.rank])
        mine = flat[start:start + counts[self.rank]]
        send = mine.repeat(self.size)  # a copy: flat is received into
        if hasattr(self, "_alltoallv_into"):
            self._alltoallv_into(send, [mine.numel()] * self.size, counts, flat)
        else:
            flat.copy_(self._alltoallv(send, [mine.numel()] * self.size, counts))

    def split(self, color: int, key: Optional[int] = None) -> "Comm":
        """The communicator of the ranks that pass the same color (collective: every rank calls it),
        ordered by key (default: rank). It shares this Comm's counters and knows its ranks' nodes.

        Attributes of the result: members (this communicator's ranks of its members, in order).
        """
        key = self.rank if key is None else key
        if int(color) < 0:  # MPI_Comm_split refuses it (or, as MPI_UNDEFINED, gives no communicator)
            raise ValueError(f"split(color={color}): a color must be >= 0")
        with self.as_control():  # every rank learns every group: some backends create them all
            table = self.allgather_object((int(color), int(key), self.rank))
        groups: Dict[int, List[int]] = {}
        for col, _, r in sorted(table):
            groups.setdefault(col, []).append(r)
        members = groups[int(color)]
        sub = self._split(int(color), int(key), groups)
        sub._process = self._process
        sub.members = members
        sub.hosts = [self.hosts[r] for r in members]
        sub.set_nodes([self.nodes[r] for r in members])
        mine = self.nodes[self.rank]
        sub.local_rank = sum(1 for r in members[:members.index(self.rank)] if self.nodes[r] == mine)
        sub.local_size = sum(1 for r in members if self.nodes[r] == mine)
        return sub

    def _split(self, color: int, key: int, groups: Dict[int, List[int]]) -> "Comm":
        raise NotImplementedError(f"the {self.name} backend has no sub-communicators")

    # -- background communication (--overlap) ------------------------------------------------------
    def dup(self) -> "Comm":
        """A communicator of the same ranks whose collectives never meet this one's (collective:
        every rank calls it), for work that runs while training computes. It counts its bytes apart
        (its own Counters): merge them into this one with absorb(), on this thread."""
        sub = self._dup()
        sub._process = self._process
        sub.members = getattr(self, "members", list(range(self.size)))
        sub.set_nodes(self.nodes)
        sub.hosts = list(self.hosts)
        sub.local_rank, sub.local_size = self.local_rank, self.local_size
        return sub

    def _dup(self) -> "Comm":
        raise NotImplementedError(f"the {self.name} backend has no background communicators")

    def absorb(self, other: "Comm") -> None:
        """Add the bytes other (a dup() of this communicator or of its world) counted since the
        last absorb to this one's counters."""
        sent, recv, sent_cross, recv_cross, control = other._counters.take()
        self._tally(sent, recv, sent_cross, recv_cross)
        self._counters.control += control

    def submit(self, fn: Callable[[], Any]) -> Work:
        """Run fn() on this process's background thread (jobs run one at a time, in the order
        submitted); fn must use only background communicators. Returns its Work."""
        return ThreadWork(self._process.submit(fn))

    def start_allreduce_mean_(self, t: torch.Tensor) -> Work:
        """allreduce_mean_(t) started in the background; call on a dup() communicator and do not
        touch t until the Work is waited for. Backends with nonblocking collectives override it
        (torch work handles, Horovod's asynchronous ops, MPI's Iallreduce)."""
        check_flat(t, "start_allreduce_mean_")
        return self.submit(lambda: self.allreduce_mean_(t))

    def alltoallv_tensors(self, sends: Sequence[Sequence[torch.Tensor]],
                          recvs: Sequence[Sequence[torch.Tensor]]) -> None:
        """Personalised all-to-all straight from and into tensors, with no buffer the caller manages.

        Args:
            sends: sends[d] = contiguous float32 tensors for rank d, in order (sends[self.rank] empty).
            recvs: recvs[s] = contiguous float32 tensors to fill from rank s, in the order s sends
                them (recvs[self.rank] empty); their sizes must match what s sends.
        The mpi backend sends every tensor as its own message, all posted at once and completed
        with one wait, so nothing is packed; other backends (and device tensors without CUDA-aware
        MPI) pack into one buffer and use alltoallv. Bytes are counted as for alltoallv.
        """
        if len(sends) != self.size or len(recvs) != self.size:
            raise ValueError(f"alltoallv_tensors: need one send and one receive list per rank ({self.size})")
        if sends[self.rank] or recvs[self.rank]:
            raise ValueError("alltoallv_tensors: a rank sends nothing to itself (copy it locally)")
        for t in [t for ts in list(sends) + list(recvs) for t in ts]:
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"alltoallv_tensors: tensors must be contiguous float32, got {t.dtype}")
        self._alltoallv_tensors(sends, recvs)
        self._tally(*self._peer_tally([ELEMENT_BYTES * sum(t.numel() for t in ts) for ts in sends],
                                      [ELEMENT_BYTES * sum(t.numel() for t in ts) for ts in recvs]))

    def _alltoallv_tensors(self, sends, recvs) -> None:
        """Fallback: pack into one flat buffer, alltoallv, unpack."""
        from .fusion import pack, unpack_
        flat_send = [t for ts in sends for t in ts]
        device = (flat_send or [t for ts in recvs for t in ts] or [torch.empty(0)])[0].device
        send = pack(flat_send) if flat_send else torch.empty(0, dtype=torch.float32, device=device)
        send_counts = [sum(t.numel() for t in ts) for ts in sends]
        recv_counts = [sum(t.numel() for t in ts) for ts in recvs]
        recv = self._alltoallv(send, send_counts, recv_counts)
        targets = [t for ts in recvs for t in ts]
        if targets:
            unpack_(recv, targets)

    def bcast_(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Broadcast t from root into t on every rank, in place. Returns t."""
        check_flat(t, "bcast_")
        if self.size > 1 and t.numel() > 0:
            self._bcast_(t, root)
            self._count_bcast(t.numel() * ELEMENT_BYTES, root)
        return t

    def bcast_object(self, obj: Any = None, root: int = 0) -> Any:
        """Broadcast a small picklable object (metadata: assignments, configs) from root."""
        if self.size == 1:
            return obj
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == root else None
        payload = self._bcast_bytes(payload, root)
        self._count_bcast(len(payload), root)
        return obj if self.rank == root else pickle.loads(payload)

    def allgather_object(self, obj: Any) -> List[Any]:
        """Every rank's small picklable object, in rank order (metadata exchanged once, at start-up:
        one broadcast per rank)."""
        return [self.bcast_object(obj if r == self.rank else None, root=r) for r in range(self.size)]

    def reduce_stats(self, values: Sequence[float], op: str = "sum") -> List[float]:
        """Reduce a few float64 metrics over ranks (op: sum, max or min); counted as control bytes."""
        if op not in ("sum", "max", "min"):
            raise ValueError(f"reduce_stats: op must be sum, max or min, not {op!r}")
        t = torch.tensor(list(values), dtype=torch.float64)
        if self.size > 1 and t.numel() > 0:
            self._reduce_stats_(t, op)
            self.control_bytes += 2 * ring_allreduce_bytes(t.numel() * 8, self.size)
        return t.tolist()

    def barrier(self) -> None:
        """Block until every rank got here."""
        if self.size > 1:
            self._barrier()

    def abort(self, code: int = 1) -> None:
        """Terminate every rank of the job with exit status code (never returns)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self._abort(code)

    def _exchange_counts_counted(self, send_counts: List[int]) -> List[int]:
        """The recv counts of an alltoallv whose caller did not give them (control traffic)."""
        self.control_bytes += 2 * 8 * (self.size - 1)
        return self._exchange_counts(send_counts)


    # -- fail fast --------------------------------------------------------------------------------
    def install_excepthook(self) -> None:
        """Make an uncaught exception on any rank print once (from that rank) and abort the job.

        Without this, the other ranks would wait forever in their next collective.
        """
        previous = sys.excepthook

        def hook(exc_type, exc, tb):
            if issubclass(exc_type, KeyboardInterrupt):
                previous(exc_type, exc, tb)
            else:
                text = "".join(traceback.format_exception(exc_type, exc, tb))
                sys.stderr.write(f"[rank {self.rank}/{self.size}] uncaught exception, aborting the job:\n{text}")
            self.abort(1)

        sys.excepthook = hook

    # -- primitives a backend provides --------------------------------------------------------------
    def _allreduce_(self, t: torch.Tensor, op: str) -> None:
        raise NotImplementedError

    def _alltoallv(self, send, send_counts, recv_counts) -> torch.Tensor:
        raise NotImplementedError

    def _exchange_counts(self, send_counts: List[int]) -> List[int]:
        raise NotImplementedError

    def _bcast_(self, t: torch.Tensor, root: int) -> None:
        raise NotImplementedError

    def _bcast_bytes(self, payload: Optional[bytes], root: int) -> bytes:
        raise NotImplementedError

    def _reduce_stats_(self, t: torch.Tensor, op: str) -> None:
        raise NotImplementedError

    def _barrier(self) -> None:
        raise NotImplementedError

    def _abort(self, code: int) -> None:
        raise NotImplementedError
