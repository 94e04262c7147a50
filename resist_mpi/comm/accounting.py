"""The byte accounting every backend shares: one set of counters and tallies for every Comm.

Everything above this package speaks in flat float32 tensors and plans; only the backends know
MPI or Horovod. Byte counters are *payload* bytes this rank put on / took off the wire:

- ``allreduce_mean_`` of n bytes on S ranks counts the ring-algorithm volume, 2(S-1)/S * n sent and
  the same received per rank (reduce-scatter then allgather), rounded down to whole bytes. This is
  the bandwidth-optimal algorithmic count; the MPI library may pick another algorithm internally.
- ``alltoallv`` counts exactly what goes to / comes from *other* ranks; the part a rank keeps for
  itself never touches the wire and is not counted.
- ``bcast_`` / ``bcast_object`` count a flat broadcast: the root sends n bytes to each of the S-1
  others, each of them receives n bytes (for an object, n is its pickled size).

- ``allgather_`` counts the ring volume: rank r sends every segment but its successor's and
  receives every segment but its own.

Small bookkeeping traffic (the per-round metric reduction, the recv-count exchange of an
alltoallv whose counts are not given) is counted separately in ``control_bytes`` so that the
payload counters equal what a routing plan predicts, to the byte.

Levels: ``bytes_sent_cross`` / ``bytes_recv_cross`` are the part of the payload exchanged with ranks
on other nodes (``nodes``: a node id per rank, from the ranks' host names), by the same model: a
ring sends to the next rank and receives from the previous one, a broadcast goes from the root to
each rank, an all-to-all to each destination. A communicator split from another (``split``) shares
its counters, so a job's totals always include every sub-communicator's traffic. A background
communicator (``dup``, for averages that run while training computes) counts apart, and its
bytes are added to its parent's when the work is waited for (``Work.wait`` by the caller), on the
training thread: per-round counts stay deterministic and no counter is written by two threads.
"""
from __future__ import annotations

import contextlib
from typing import List, Sequence, Tuple

ELEMENT_BYTES = 4  # payload is float32


def ring_allreduce_bytes(nbytes: int, size: int) -> int:
    """Bytes one rank sends (and receives) in a ring allreduce of an nbytes buffer over size ranks."""
    return 2 * (size - 1) * nbytes // size if size > 1 else 0


class Counters:
    """Bytes counted by a Comm and by every communicator split from it (one object, shared)."""

    __slots__ = ("sent", "recv", "sent_cross", "recv_cross", "control")

    def __init__(self):
        self.sent = self.recv = self.sent_cross = self.recv_cross = self.control = 0

    def take(self) -> Tuple[int, int, int, int, int]:
        """The counts so far, and zero them (a background communicator's, merged by its parent)."""
        counts = (self.sent, self.recv, self.sent_cross, self.recv_cross, self.control)
        self.sent = self.recv = self.sent_cross = self.recv_cross = self.control = 0
        return counts


class Accounting:
    """The byte counters of a communicator and the tallies every backend's collectives use
    (mixed into Comm; needs self.rank, self.size and self._counters)."""

    bytes_sent = property(lambda self: self._counters.sent, lambda self, v: setattr(self._counters, "sent", v))
    bytes_recv = property(lambda self: self._counters.recv, lambda self, v: setattr(self._counters, "recv", v))

    bytes_sent_cross = property(lambda self: self._counters.sent_cross,
                                lambda self, v: setattr(self._counters, "sent_cross", v))
    bytes_recv_cross = property(lambda self: self._counters.recv_cross,
                                lambda self, v: setattr(self._counters, "recv_cross", v))

    control_bytes = property(lambda self: self._counters.control,
                             lambda self, v: setattr(self._counters, "control", v))

    def set_nodes(self, nodes: Sequence[int]) -> None:
        """Which node every rank is on (the backends learn it from the host names)."""
        self.nodes = list(nodes)
        me = self.nodes[self.rank]
        self._remote = [n != me for n in self.nodes]  # per peer: on another node?
        self._single_node = not any(self._remote)

    def _tally(self, sent: int, recv: int, sent_cross: int = 0, recv_cross: int = 0) -> None:
        c = self._counters
        c.sent += sent
        c.recv += recv
        c.sent_cross += sent_cross
        c.recv_cross += recv_cross

    def _ring_tally(self, nbytes_sent: int, nbytes_recv: int) -> Tuple[int, int, int, int]:
        """(sent, recv, sent across nodes, recv across nodes) of a ring step: to the next rank, from the previous."""
        if self._single_node:
            return nbytes_sent, nbytes_recv, 0, 0
        succ, pred = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        return (nbytes_sent, nbytes_recv, nbytes_sent if self._remote[succ] else 0,
                nbytes_recv if self._remote[pred] else 0)

    def _peer_tally(self, sent_to: Sequence[int], recv_from: Sequence[int]) -> Tuple[int, int, int, int]:
        """Counts of a personalised exchange from bytes per destination and per source (self excluded)."""
        r = self.rank
        sent, recv = sum(sent_to) - sent_to[r], sum(recv_from) - recv_from[r]
        if self._single_node:
            return sent, recv, 0, 0
        remote = self._remote
        return (sent, recv, sum(b for p, b in enumerate(sent_to) if remote[p]),
                sum(b for p, b in enumerate(recv_from) if remote[p]))

    def counters(self) -> Tuple[int, int]:
        """(bytes_sent, bytes_recv) so far; subtract two snapshots to count one phase."""
        return self.bytes_sent, self.bytes_recv

    def cross_counters(self) -> Tuple[int, int]:
        """(bytes_sent_cross, bytes_recv_cross) so far: the part exchanged with other nodes."""
        return self.bytes_sent_cross, self.bytes_recv_cross

    @contextlib.contextmanager
    def as_control(self):
        """Inside this block, payload counters are moved to control_bytes (for metadata calls)."""
        c = self._counters
        saved = (c.sent, c.recv, c.sent_cross, c.recv_cross)
        try:
            yield
        finally:
            c.control += (c.sent - saved[0]) + (c.recv - saved[1])
            c.sent, c.recv, c.sent_cross, c.recv_cross = saved

    def _alltoallv_tally(self, send_counts: List[int], recv_counts: List[int]) -> Tuple[int, int, int, int]:
        """Payload of an alltoallv: what goes to and comes from other ranks (not the own segment)."""
        return self._peer_tally([ELEMENT_BYTES * n for n in send_counts], [ELEMENT_BYTES * n for n in recv_counts])

    def _count_bcast(self, nbytes: int, root: int) -> None:
        if self.rank == root:
            self._tally(nbytes * (self.size - 1), 0, nbytes * sum(self._remote), 0)
        else:
            self._tally(0, nbytes, 0, nbytes if self._remote[root] else 0)
