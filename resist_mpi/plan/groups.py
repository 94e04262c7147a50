"""Groups of ranks: ResIST (or local SGD) between groups, data-parallel inside each (--group-size).

A cluster node has several GPUs on a fast link and a slow link to the other nodes. With groups of G
consecutive ranks (typically the ranks of a node), a strategy runs between the S/G groups as it
would between single ranks, and inside each group the G members train the same sub-network on their
own data, averaging gradients at every step over the fast link. Every member holds the same copy of
what its group holds, so whatever crosses groups is split into G slices: member j moves slice j,
over its own links, to member j of the other group, and the receivers put the slices together over
their fast link. One block, or one average, crosses the slow link once, spread over G links.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union


class GroupError(ValueError):
    """A group size that does not fit the ranks (one-line message)."""


def resolve_group_size(group_size: Union[int, str], comm) -> int:
    """G for group_size: an integer, or "node" (the ranks of one node, every node alike).

    Raises GroupError unless the S ranks split into S/G groups of G consecutive ranks, each group on
    one node when "node" is asked for.
    """
    S = comm.size
    if group_size == "node":
        counts = [comm.nodes.count(n) for n in dict.fromkeys(comm.nodes)]
        if len(set(counts)) != 1:
            raise GroupError(f"--group-size node: the nodes run different numbers of ranks ({counts}); "
                             f"give --group-size as a number")
        G = counts[0]
        if any(comm.nodes[r] != comm.nodes[r - r % G] for r in range(S)):
            raise GroupError("--group-size node: the ranks of a node are not consecutive (launch them "
                             "block by block, e.g. mpirun --map-by ppr:N:node)")
        return G
    try:
        G = int(group_size)
    except (TypeError, ValueError):
        raise GroupError(f"--group-size {group_size!r}: give a number of ranks or 'node'") from None
    if G < 1 or S % G:
        raise GroupError(f"--group-size {G}: the {S} ranks do not split into groups of {G}")
    return G


def slice_counts(n: int, parts: int) -> List[int]:
    """n elements in `parts` consecutive slices whose sizes differ by at most one (the first ones larger)."""
    base, extra = divmod(n, parts)
    return [base + (k < extra) for k in range(parts)]


class Groups:
    """The S ranks of comm in S/G groups of G consecutive ranks, and their communicators.

    Attributes:
        size: G, members per group; count: S/G, the number of groups.
        index: this rank's group; member: this rank's position in it.
        inner: the group's communicator (its G ranks), None when G == 1.
        across: this member's communicator across the groups (member j of every group, S/G ranks,
            ranked by group): the world itself when G == 1.
    Creating it is collective (two splits) when G > 1.
    """

    def __init__(self, comm, group_size: Union[int, str] = 1):
        self.comm = comm
        self.size = resolve_group_size(group_size, comm)
        self.count = comm.size // self.size
        self.index, self.member = divmod(comm.rank, self.size)
        self.inner: Optional[object] = None
        self.across = comm
        if self.size > 1:
            # ---- distributed step (once): the group's and the cross-group communicators ----
            self.inner = comm.split(self.index)
            self.across = comm.split(self.member, key=self.index)

    def my_slice(self, n: int) -> Tuple[int, int]:
        """[start, stop) of this member's slice of n elements."""
        counts = slice_counts(n, self.size)
        start = sum(counts[:self.member])
        return start, start + counts[self.member]
