"""The mpi backend beyond the contract (tests/mpi/test_comm_contract.py): prepared handles, the
packing fallback of alltoallv_tensors, and every test on COMM_SELF as well as COMM_WORLD (the
mpi4py test-suite pattern). Exact values and exact byte counts.

Run: mpirun -np 4 python -m pytest tests/mpi/test_comm.py
"""
import numpy as np
import pytest
import torch
from mpi4py import MPI

from resist_mpi.comm import ring_allreduce_bytes
from resist_mpi.comm.base import Comm
from resist_mpi.comm.mpi import MPIComm


@pytest.fixture(params=["self", "world"])
def c(request):
    return MPIComm(MPI.COMM_SELF if request.param == "self" else MPI.COMM_WORLD)


def _reduction_sizes(comm, n):
    """The element counts MPI hands a commutative user-defined sum while it allreduces n floats (how
    the algorithm cut the buffer), and the result."""
    sizes = []

    def add(inbuf, inoutbuf, datatype):
        a, b = np.frombuffer(inbuf, np.float32), np.frombuffer(inoutbuf, np.float32)
        sizes.append(len(a))
        b += a

    op = MPI.Op.Create(add, commute=True)
    try:
        buf = np.full(n, comm.Get_rank() + 1, np.float32)
        comm.Allreduce(MPI.IN_PLACE, buf, op=op)
    finally:
        op.Free()
    return sizes, buf


def test_model_sized_allreduces_take_the_ring_small_ones_open_mpis_choice():
    """The backend started Open MPI with its rules file (tests/mpi/conftest.py starts MPI the way the
    backend does): from 256 KiB the allreduce is the ring, which reduces the buffer in S pieces;
    below, Open MPI's own choice, which at 2 and 4 ranks reduces it whole (recursive doubling). At 4
    ranks Open MPI's own choice for the large buffer (Rabenseifner's) reduces halves, so there the
    check tells the ring from it."""
    import os
    from resist_mpi.comm.mpi import OPEN_MPI_RULES
    assert os.environ["OMPI_MCA_coll_tuned_dynamic_rules_filename"] == OPEN_MPI_RULES
    world = MPI.COMM_WORLD
    S = world.Get_size()
    expected = S * (S + 1) / 2
    big = 262144 // 4 * 3  # 768 KiB
    sizes, buf = _reduction_sizes(world, big)
    assert (buf == expected).all()
    assert sizes and max(sizes) <= -(-big // S), sizes
    small = 1000
    sizes, buf = _reduction_sizes(world, small)
    assert (buf == expected).all()
    assert sizes and max(sizes) == small, sizes


def _segment(src, dst, k):
    return torch.tensor([src * 10000 + dst * 100 + i for i in range(k)], dtype=torch.float32)


def _count(src, dst):
    return (src + 2 * dst) % 3 + 1 if src != dst or src % 2 == 0 else 0


def test_identity(c):
    assert c.size == (1 if c.comm == MPI.COMM_SELF else MPI.COMM_WORLD.Get_size())
    assert 0 <= c.local_rank < c.local_size <= c.size


def test_prepared_allreduce_reduces_what_the_tensor_holds_at_each_call(c):
    S, r = c.size, c.rank
    t = torch.empty(1 << 12)
    h = c.prepare_allreduce(t)
    moved = ring_allreduce_bytes(4 * t.numel(), S)
    for k in range(3):
        t.copy_(torch.arange(t.numel(), dtype=torch.float32) * (k + 1) + 1000 * r)
        before = c.counters()
        assert h() is t
        assert torch.equal(t, torch.arange(t.numel(), dtype=torch.float32) * (k + 1) + 1000 * (S - 1) / 2)
        assert (c.bytes_sent - before[0], c.bytes_recv - before[1]) == (moved, moved)
    with pytest.raises(ValueError, match="float32"):
        c.prepare_allreduce(t.view(torch.int32))


@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("give_counts", [False, True])
def test_prepared_alltoallv_against_raw_mpi(c, with_out, give_counts):
    """A prepared alltoallv moves what raw MPI moves at every call, new values included; counts not
    given are exchanged once, when it is prepared (control bytes)."""
    S, r = c.size, c.rank
    counts = [_count(r, d) for d in range(S)]
    expect = [_count(s, r) for s in range(S)]
    send = torch.cat([_segment(r, d, counts[d]) for d in range(S)])
    out = torch.full((sum(expect),), -1.0) if with_out else None
    ctrl = c.control_bytes
    h = c.prepare_alltoallv(send, counts, expect if give_counts else None, out=out)
    assert c.control_bytes - ctrl == (0 if give_counts or S == 1 else 16 * (S - 1))
    for k in range(3):
        send.mul_(k + 1)  # new values in the same tensor
        want = np.empty(sum(expect), dtype=np.float32)
        sd, rd = np.cumsum([0] + counts[:-1]), np.cumsum([0] + expect[:-1])
        c.comm.Alltoallv([send.numpy(), (counts, sd), MPI.FLOAT], [want, (expect, rd), MPI.FLOAT])
        before, ctrl = c.counters(), c.control_bytes
        recv, got = h()
        assert got == expect and torch.equal(recv, torch.from_numpy(want))
        assert (recv is out) if with_out else (recv.numel() == sum(expect))
        assert (c.bytes_sent - before[0], c.bytes_recv - before[1]) == (
            4 * (sum(counts) - counts[r]), 4 * (sum(expect) - expect[r]))
        assert c.control_bytes == ctrl  # nothing exchanged again


def test_alltoallv_of_a_tensor_that_requires_grad(c):
    S, r = c.size, c.rank
    counts = [_count(r, d) for d in range(S)]
    send = torch.cat([_segment(r, d, counts[d]) for d in range(S)]).requires_grad_()
    recv, got = c.alltoallv(send, counts)
    assert torch.equal(recv, torch.cat([_segment(s, r, _count(s, r)) for s in range(S)]))


@pytest.mark.parametrize("schedule", ["pairwise", "at_once", "mixed"])
def test_alltoallv_tensors_pairwise_or_at_once_deliver_the_same(c, monkeypatch, schedule):
    """The S-1 pairwise steps (from PAIRWISE_BYTES a rank moves) and every message at once give the
    same result, also when ranks choose differently and some pairs exchange nothing."""
    from resist_mpi.comm import mpi
    S, r = c.size, c.rank
    pairwise = {"pairwise": True, "at_once": False, "mixed": r % 2 == 0}[schedule]
    monkeypatch.setattr(mpi, "PAIRWISE_BYTES", 0 if pairwise else 1 << 60)
    talks = [d != r and (r + d) % 3 != 1 for d in range(S)]  # symmetric: some pairs send nothing either way
    sends = [[_segment(r, d, 3), _segment(r, d, d + 2) + 0.5] if talks[d] else [] for d in range(S)]
    recvs = [[torch.empty(3), torch.empty(r + 2)] if talks[s] else [] for s in range(S)]
    before = c.counters()
    c.alltoallv_tensors(sends, recvs)
    for s in range(S):
        if talks[s]:
            assert torch.equal(recvs[s][0], _segment(s, r, 3)) and torch.equal(recvs[s][1], _segment(s, r, r + 2) + 0.5)
    sent = 4 * sum(3 + d + 2 for d in range(S) if talks[d])
    assert c.counters() == (before[0] + sent, before[1] + 4 * sum(3 + r + 2 for s in range(S) if talks[s]))


def test_alltoallv_tensors_packing_fallback(c):
    """The pack/alltoallv path other backends (and device tensors without CUDA-aware MPI) take."""
    S, r = c.size, c.rank
    sends = [[] if d == r else [_segment(r, d, 3).reshape(3, 1), _segment(r, d, d + 2) + 0.5] for d in range(S)]
    recvs = [[] if s == r else [torch.empty(3, 1), torch.empty(r + 2)] for s in range(S)]
    Comm._alltoallv_tensors(c, sends, recvs)
    for s in range(S):
        if s != r:
            assert torch.equal(recvs[s][0], _segment(s, r, 3).reshape(3, 1))
            assert torch.equal(recvs[s][1], _segment(s, r, r + 2) + 0.5)
