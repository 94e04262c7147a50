"""The comm API on real ranks: exact values and exact byte counts for every call.

Run: mpirun -np 4 python -m pytest tests/mpi/test_comm.py. Each test body runs on COMM_SELF and
on COMM_WORLD (the mpi4py test-suite pattern).
"""
import pickle

import numpy as np
import pytest
import torch
from mpi4py import MPI

from resist_mpi.comm import ring_allreduce_bytes
from resist_mpi.comm.mpi import MPIComm


@pytest.fixture(params=["self", "world"])
def c(request):
    return MPIComm(MPI.COMM_SELF if request.param == "self" else MPI.COMM_WORLD)


def test_identity(c):
    assert c.size == (1 if c.comm == MPI.COMM_SELF else MPI.COMM_WORLD.Get_size())
    assert 0 <= c.local_rank < c.local_size <= c.size


@pytest.mark.parametrize("n", [1, 7, 1000, 1 << 18])
def test_allreduce_mean_exact(c, n):
    t = torch.arange(n, dtype=torch.float32) + 1000 * c.rank
    ptr = t.data_ptr()
    before = c.counters()
    out = c.allreduce_mean_(t)
    assert out is t and t.data_ptr() == ptr  # in place
    expected = torch.arange(n, dtype=torch.float32) + 1000 * (c.size - 1) / 2
    assert torch.equal(t, expected)
    moved = ring_allreduce_bytes(4 * n, c.size)
    assert (c.bytes_sent - before[0], c.bytes_recv - before[1]) == (moved, moved)


def test_allreduce_mean_repeated_calls_reuse_nothing_stale(c):
    """Averaging the same tensor again reuses the prepared buffer; new values, the tensor moved to
    new memory, another tensor at its address, and a freed tensor are all handled exactly."""
    import gc
    import weakref

    S, r = c.size, c.rank
    moved = ring_allreduce_bytes(4 * 64, S)

    def check(t, base):
        for k in range(3):  # values change between repeats: each call reduces what t holds now
            t.copy_(torch.arange(64, dtype=torch.float32) * (k + 1) + 1000 * r + base)
            before = c.counters()
            assert c.allreduce_mean_(t) is t
            want = torch.arange(64, dtype=torch.float32) * (k + 1) + 1000 * (S - 1) / 2 + base
            assert torch.equal(t, want)
            assert (c.bytes_sent - before[0], c.bytes_recv - before[1]) == (moved, moved)

    t = torch.empty(64)
    check(t, 0)
    t.set_(torch.empty(64))  # the same tensor object, moved to new memory
    check(t, 5)
    with pytest.raises(ValueError, match="float32"):  # another tensor at the same address
        c.allreduce_mean_(t.view(torch.int32))
    ref = weakref.ref(t)
    del t
    gc.collect()
    assert ref() is None  # the prepared buffer holds no reference to the tensor
    check(torch.empty(64), 7)


def _segment(src, dst, k):
    return torch.tensor([src * 10000 + dst * 100 + i for i in range(k)], dtype=torch.float32)


def _count(src, dst):
    return (src + 2 * dst) % 3 + 1 if src != dst or src % 2 == 0 else 0


@pytest.mark.parametrize("give_counts", [True, False])
def test_alltoallv_exact(c, give_counts):
    S, r = c.size, c.rank
    send = torch.cat([_segment(r, d, _count(r, d)) for d in range(S)])
    send_counts = [_count(r, d) for d in range(S)]
    expect_counts = [_count(s, r) for s in range(S)]
    before, ctrl = c.counters(), c.control_bytes
    recv, counts = c.alltoallv(send, send_counts, expect_counts if give_counts else None)
    assert counts == expect_counts
    assert torch.equal(recv, torch.cat([_segment(s, r, _count(s, r)) for s in range(S)]))
    assert c.bytes_sent - before[0] == 4 * (sum(send_counts) - send_counts[r])
    assert c.bytes_recv - before[1] == 4 * (sum(expect_counts) - expect_counts[r])
    assert c.control_bytes - ctrl == (0 if give_counts else 16 * (S - 1))


@pytest.mark.parametrize("with_out", [False, True])
def test_alltoallv_repeated_calls_reuse_nothing_stale(c, with_out):
    """A call repeating the previous one reuses its prepared MPI arguments; every way a repeat can
    differ (new values, count lists changed in place, another tensor at the same address, the same
    tensor moved, a freed one) still gives what raw MPI gives, with exact byte counts, and the
    reuse keeps no tensor alive."""
    import gc
    import weakref

    S, r = c.size, c.rank
    counts = [_count(r, d) for d in range(S)]
    expect = [_count(s, r) for s in range(S)]

    def raw(send, sc, rc):
        got = np.empty(sum(rc), dtype=np.float32)
        sd, rd = np.cumsum([0] + sc[:-1]), np.cumsum([0] + rc[:-1])
        c.comm.Alltoallv([send.numpy(), (sc, sd), MPI.FLOAT], [got, (rc, rd), MPI.FLOAT])
        return torch.from_numpy(got)

    def check(send):
        out = torch.full((sum(expect),), -1.0) if with_out else None
        for _ in range(3):  # the second and third calls repeat the first
            want = raw(send, counts, expect)
            before = c.counters()
            recv, got = c.alltoallv(send, counts, expect, out=out)
            assert got == expect and (out is None or recv is out)
            assert torch.equal(recv, want)
            assert (c.bytes_sent - before[0], c.bytes_recv - before[1]) == (
                4 * (sum(counts) - counts[r]), 4 * (sum(expect) - expect[r]))

    send = torch.cat([_segment(r, d, counts[d]) for d in range(S)])
    check(send)
    send.mul_(2)  # new values in the same tensor
    check(send)
    if S > 1:  # the same tensor, its count lists changed in place: one element moves from rank 0's
        counts[0] -= 1  # segment to rank 1's on every rank (every rank sends rank 0 at least one)
        counts[1] += 1
        expect[:] = [n - (r == 0) + (r == 1) for n in expect]
        check(send)
    with pytest.raises(ValueError, match="float32"):  # another tensor at the same address, not float32
        c.alltoallv(send.view(torch.int32), counts, expect)
    send.set_(send.clone().mul_(5))  # the same tensor object, moved to new memory
    check(send)
    other = send.clone()  # another tensor with the same counts
    del send
    check(other)
    ref = weakref.ref(other)
    del other
    gc.collect()
    assert ref() is None  # the prepared arguments hold no reference to the tensor
    check(torch.cat([_segment(r, d, counts[d]) * 3 for d in range(S)]))


def test_alltoallv_empty_segments(c):
    recv, counts = c.alltoallv(torch.empty(0), [0] * c.size, [0] * c.size)
    assert recv.numel() == 0 and counts == [0] * c.size


def test_bcast_exact(c):
    root = c.size - 1
    t = torch.arange(10, dtype=torch.float32) * (7 if c.rank == root else 0)
    before = c.counters()
    c.bcast_(t, root=root)
    assert torch.equal(t, torch.arange(10, dtype=torch.float32) * 7)
    sent, recv = c.bytes_sent - before[0], c.bytes_recv - before[1]
    assert (sent, recv) == ((40 * (c.size - 1), 0) if c.rank == root else (0, 40))


def test_bcast_object_exact(c):
    obj = {"assignment": ((0, 3), (1,), (2,)), "round": 5}
    n = len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    before = c.counters()
    got = c.bcast_object(obj if c.rank == 0 else None, root=0)
    assert got == obj
    sent, recv = c.bytes_sent - before[0], c.bytes_recv - before[1]
    if c.size == 1:
        assert (sent, recv) == (0, 0)
    else:
        assert (sent, recv) == ((n * (c.size - 1), 0) if c.rank == 0 else (0, n))


@pytest.mark.parametrize("length", [1015, 1016, 1017, 5000])
def test_bcast_object_any_length(c, length):
    """Objects that fill the first broadcast frame exactly, or need the second one, arrive whole."""
    overhead = len(pickle.dumps(b"x" * 1000, protocol=pickle.HIGHEST_PROTOCOL)) - 1000
    obj = bytes(range(256)) * 20
    obj = obj[:length - overhead]  # pickles to exactly `length` bytes (the frame holds 1016)
    n = len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    assert n == length
    before = c.counters()
    got = c.bcast_object(obj if c.rank == 1 % c.size else None, root=1 % c.size)
    assert got == obj
    sent, recv = c.bytes_sent - before[0], c.bytes_recv - before[1]
    if c.size > 1:
        assert (sent, recv) == ((n * (c.size - 1), 0) if c.rank == 1 else (0, n))


def test_as_control_moves_counts(c):
    before, ctrl = c.counters(), c.control_bytes
    with c.as_control():
        c.bcast_object("x" * 100)
    assert c.counters() == before
    assert c.control_bytes - ctrl == (0 if c.size == 1 else
                                      len(pickle.dumps("x" * 100, protocol=pickle.HIGHEST_PROTOCOL))
                                      * (c.size - 1 if c.rank == 0 else 1))


def test_reduce_stats_and_barrier(c):
    before = c.counters()
    assert c.reduce_stats([c.rank, 1.5], "sum") == [c.size * (c.size - 1) / 2, 1.5 * c.size]
    assert c.reduce_stats([c.rank], "max") == [c.size - 1]
    assert c.reduce_stats([c.rank], "min") == [0]
    c.barrier()
    assert c.counters() == before  # metrics traffic is control, not payload


def test_misuse_is_reported(c):
    with pytest.raises(ValueError, match="float32"):
        c.allreduce_mean_(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D"):
        c.allreduce_mean_(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="send_counts"):
        c.alltoallv(torch.zeros(3), [3] * (c.size + 1))


def test_alltoallv_into_out_buffer(c):
    S, r = c.size, c.rank
    send = torch.cat([_segment(r, d, _count(r, d)) for d in range(S)])
    counts = [_count(s, r) for s in range(S)]
    out = torch.full((sum(counts),), -1.0)
    recv, _ = c.alltoallv(send, [_count(r, d) for d in range(S)], counts, out=out)
    assert recv.data_ptr() == out.data_ptr()
    assert torch.equal(out, torch.cat([_segment(s, r, _count(s, r)) for s in range(S)]))
    with pytest.raises(ValueError, match="out has"):
        c.alltoallv(send, [_count(r, d) for d in range(S)], counts, out=torch.empty(sum(counts) + 1))


@pytest.mark.parametrize("fallback", [False, True])
def test_alltoallv_tensors_in_place(c, fallback):
    """Each rank sends two tensors of different shapes to every other rank, received in place."""
    S, r = c.size, c.rank
    sends = [[] if d == r else [_segment(r, d, 3).reshape(3, 1), _segment(r, d, d + 2) + 0.5] for d in range(S)]
    recvs = [[] if s == r else [torch.empty(3, 1), torch.empty(r + 2)] for s in range(S)]
    ptrs = [t.data_ptr() for ts in recvs for t in ts]
    before = c.counters()
    if fallback:  # the pack/alltoallv path other backends use
        from resist_mpi.comm.base import Comm
        Comm._alltoallv_tensors(c, sends, recvs)
    else:
        c.alltoallv_tensors(sends, recvs)
    for s in range(S):
        if s != r:
            assert torch.equal(recvs[s][0], _segment(s, r, 3).reshape(3, 1))
            assert torch.equal(recvs[s][1], _segment(s, r, r + 2) + 0.5)
    assert ptrs == [t.data_ptr() for ts in recvs for t in ts]
    if not fallback:
        assert c.bytes_sent - before[0] == 4 * sum(3 + d + 2 for d in range(S) if d != r)
        assert c.bytes_recv - before[1] == 4 * (S - 1) * (3 + r + 2)
    with pytest.raises(ValueError, match="itself"):
        c.alltoallv_tensors([[torch.zeros(1)]] * S, [[]] * S)
