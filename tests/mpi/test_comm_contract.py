"""The comm contract, one set of tests for every backend: exact values and exact byte counts.

The backend comes from RESIST_TEST_BACKEND (mpi, horovod, torch); every rank runs the same tests in
the same order, so each test is one collective conversation:

    mpirun -np 4 python -m pytest tests/mpi/test_comm_contract.py                          # mpi
    RESIST_TEST_BACKEND=torch mpirun -np 4 python -m pytest tests/mpi/test_comm_contract.py
    RESIST_TEST_BACKEND=torch torchrun --nproc-per-node 2 -m pytest tests/mpi/test_comm_contract.py
    RESIST_TEST_BACKEND=horovod horovodrun -np 2 python -m pytest tests/mpi/test_comm_contract.py

tests/e2e/test_backends.py and tests/e2e/test_horovod_launch.py launch these. Backend-specific behaviour
(the MPI backend on COMM_SELF, its prepared handles) has its own file beside this one.
"""
import os
import pickle

import pytest
import torch

from resist_mpi import comm as C
from resist_mpi.comm import ring_allreduce_bytes

BACKEND = os.environ.get("RESIST_TEST_BACKEND", "mpi")


@pytest.fixture(scope="module")
def c():
    return C.init(BACKEND, fail_fast=False, device="cpu")


def snapshot(c):
    return c.bytes_sent, c.bytes_recv, c.control_bytes


def delta(c, before):
    return tuple(a - b for a, b in zip(snapshot(c), before))


def _count(src, dst):
    # zeros between some pairs, and a non-empty share for itself on every rank: a backend that
    # counted the bytes a rank keeps, or dropped its own segment, is caught
    return (src + 2 * dst + 1) % 3


def _segment(src, dst, k=None):
    k = _count(src, dst) if k is None else k
    return torch.tensor([src * 10000 + dst * 100 + i for i in range(k)], dtype=torch.float32)


def test_world_matches_launcher(c):
    info = C.world_info_from_env()
    assert c.name == BACKEND
    assert (c.rank, c.size) == (info.rank, info.size)
    assert 0 <= c.local_rank < c.local_size <= c.size
    assert (c.local_rank, c.local_size) == (info.local_rank, info.local_size)


@pytest.mark.parametrize("n", [0, 1, 7, 1000, 1 << 18])
def test_allreduce_mean(c, n):
    S, r = c.size, c.rank
    t = torch.arange(n, dtype=torch.float32) + 1000 * r  # the mean is exact in float32
    before = snapshot(c)
    assert c.allreduce_mean_(t) is t
    assert torch.equal(t, torch.arange(n, dtype=torch.float32) + 1000 * (S - 1) / 2)
    moved = ring_allreduce_bytes(4 * n, S)
    assert delta(c, before) == (moved, moved, 0)


@pytest.mark.parametrize("known", [True, False], ids=["recv_counts_given", "recv_counts_exchanged"])
def test_alltoallv(c, known):
    S, r = c.size, c.rank
    send_counts = [_count(r, d) for d in range(S)]
    expect = [_count(s, r) for s in range(S)]
    assert send_counts[r] > 0
    send = torch.cat([_segment(r, d) for d in range(S)])
    before = snapshot(c)
    recv, counts = c.alltoallv(send, send_counts, expect if known else None)
    assert counts == expect
    assert torch.equal(recv, torch.cat([_segment(s, r) for s in range(S)]))
    sent, got = 4 * (sum(send_counts) - send_counts[r]), 4 * (sum(expect) - expect[r])
    assert delta(c, before) == (sent, got, 0 if known else 16 * (S - 1))


def test_alltoallv_out_and_empty(c):
    S, r = c.size, c.rank
    send = torch.cat([_segment(r, d) for d in range(S)])
    expect = [_count(s, r) for s in range(S)]
    out = torch.full((sum(expect),), -1.0)
    recv, _ = c.alltoallv(send, [_count(r, d) for d in range(S)], expect, out=out)
    want = torch.cat([_segment(s, r) for s in range(S)])
    assert torch.equal(recv, want)
    if c.name != "horovod":  # Horovod cannot receive in place: it returns a new tensor (documented)
        assert recv.data_ptr() == out.data_ptr() and torch.equal(out, want)
    with pytest.raises(ValueError, match="out has"):
        c.alltoallv(send, [_count(r, d) for d in range(S)], expect, out=torch.empty(sum(expect) + 1))
    before = snapshot(c)
    recv, counts = c.alltoallv(torch.empty(0), [0] * S, [0] * S)
    assert recv.numel() == 0 and counts == [0] * S and delta(c, before) == (0, 0, 0)


def test_alltoallv_tensors_in_place(c):
    """Each rank sends two tensors of different shapes to every other rank, received in place."""
    S, r = c.size, c.rank
    sends = [[] if d == r else [_segment(r, d, 3).reshape(3, 1), _segment(r, d, d + 2) + 0.5] for d in range(S)]
    recvs = [[] if s == r else [torch.empty(3, 1), torch.empty(r + 2)] for s in range(S)]
    ptrs = [t.data_ptr() for ts in recvs for t in ts]
    before = snapshot(c)
    c.alltoallv_tensors(sends, recvs)
    for s in range(S):
        if s != r:
            assert torch.equal(recvs[s][0], _segment(s, r, 3).reshape(3, 1))
            assert torch.equal(recvs[s][1], _segment(s, r, r + 2) + 0.5)
    assert ptrs == [t.data_ptr() for ts in recvs for t in ts]
    assert delta(c, before) == (4 * sum(3 + d + 2 for d in range(S) if d != r), 4 * (S - 1) * (3 + r + 2), 0)
    with pytest.raises(ValueError, match="itself"):
        c.alltoallv_tensors([[torch.zeros(1)]] * S, [[]] * S)


@pytest.mark.parametrize("root_is_last", [False, True], ids=["root0", "root_last"])
def test_bcast(c, root_is_last):
    S, r = c.size, c.rank
    root = S - 1 if root_is_last else 0
    t = torch.arange(33, dtype=torch.float32) + (7 if r == root else 0)
    before = snapshot(c)
    assert c.bcast_(t, root=root) is t
    assert torch.equal(t, torch.arange(33, dtype=torch.float32) + 7)
    assert delta(c, before) == ((0, 0, 0) if S == 1 else (132 * (S - 1), 0, 0) if r == root else (0, 132, 0))


@pytest.mark.parametrize("length", [300, 1015, 1016, 1017, 5000])
def test_bcast_object_any_length(c, length):
    """Objects small and large (across the mpi backend's first frame) arrive whole, counted exactly."""
    S, r = c.size, c.rank
    overhead = len(pickle.dumps(b"x" * 1000, protocol=pickle.HIGHEST_PROTOCOL)) - 1000
    obj = (bytes(range(256)) * 20)[:length - overhead]
    n = len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    assert n == length
    root = 1 % S
    before = snapshot(c)
    assert c.bcast_object(obj if r == root else None, root=root) == obj
    assert delta(c, before) == ((0, 0, 0) if S == 1 else (n * (S - 1), 0, 0) if r == root else (0, n, 0))


def test_allgather_object_and_as_control(c):
    S, r = c.size, c.rank
    before = snapshot(c)
    with c.as_control():
        got = c.allgather_object(("host", r, [r] * r))
    assert got == [("host", s, [s] * s) for s in range(S)]
    assert delta(c, before)[:2] == (0, 0)
    assert (delta(c, before)[2] > 0) == (S > 1)


@pytest.mark.parametrize("op", ["sum", "max", "min"])
def test_reduce_stats(c, op):
    S, r = c.size, c.rank
    expected = {"sum": [S * (S - 1) / 2, float(S), 2.5 * S * (S - 1) / 2 - S],
                "max": [float(S - 1), 1.0, 2.5 * (S - 1) - 1.0], "min": [0.0, 1.0, -1.0]}[op]
    before = snapshot(c)
    assert c.reduce_stats([float(r), 1.0, 2.5 * r - 1.0], op) == expected
    assert delta(c, before) == (0, 0, 2 * ring_allreduce_bytes(3 * 8, S))


def test_barrier_and_misuse(c):
    before = snapshot(c)
    c.barrier()
    assert delta(c, before) == (0, 0, 0)
    with pytest.raises(ValueError, match="float32"):
        c.allreduce_mean_(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D"):
        c.allreduce_mean_(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="send_counts"):
        c.alltoallv(torch.zeros(3), [3] * (c.size + 1))


def test_repeated_calls_with_changing_sizes(c):
    S, r = c.size, c.rank
    for n in (5, 50, 5, 3):
        t = torch.full((n,), float(2 * r))
        c.allreduce_mean_(t)
        assert torch.equal(t, torch.full((n,), float(S - 1)))
        counts = [n + d for d in range(S)]
        recv, _ = c.alltoallv(torch.full((sum(counts),), float(r)), counts)
        assert torch.equal(recv, torch.cat([torch.full((n + r,), float(s)) for s in range(S)]))


@pytest.mark.parametrize("empty", [False, True], ids=["segments", "some-empty"])
def test_allgather_in_place(c, empty):
    S, r = c.size, c.rank
    # 1, 2, 3, 1, ... elements; or 0, 1, 2, 0, ...: a rank may put nothing in (an evaluation's gather)
    counts = [s % 3 + (0 if empty and S > 1 else 1) for s in range(S)]
    flat = torch.full((sum(counts),), -1.0)
    start = sum(counts[:r])
    flat[start:start + counts[r]] = torch.arange(counts[r], dtype=torch.float32) + 100 * r
    before = snapshot(c)
    assert c.allgather_(flat, counts) is flat
    assert torch.equal(flat, torch.cat([torch.arange(counts[s], dtype=torch.float32) + 100 * s for s in range(S)]))
    total = 4 * sum(counts)
    want = (0, 0) if S == 1 else (total - 4 * counts[(r + 1) % S], total - 4 * counts[r])
    assert delta(c, before) == (*want, 0)


@pytest.mark.skipif(BACKEND != "torch", reason="the torch backend's own allgather")
def test_torch_allgather_sends_what_its_counters_count(c, monkeypatch):
    """The torch backend had no allgather of its own: the base class's fallback, one alltoallv,
    sent each rank's segment to every rank while the counters tallied the ring. Now it runs the
    ring: every message goes to the successor, and their bytes are the ones counted."""
    import torch.distributed as dist
    S, r = c.size, c.rank
    sent = []
    real = dist.batch_isend_irecv

    def spy(ops):
        sent.extend((op.peer, op.tensor.numel()) for op in ops if op.op is dist.isend)
        return real(ops)
    monkeypatch.setattr(dist, "batch_isend_irecv", spy)
    counts = [s % 3 + 1 for s in range(S)]
    flat = torch.zeros(sum(counts))
    before = snapshot(c)
    c.allgather_(flat, counts)
    assert {peer for peer, _ in sent} <= {(r + 1) % S}
    assert delta(c, before)[0] == 4 * sum(n for _, n in sent)


@pytest.mark.parametrize("how", ["blocks", "strided"])
def test_split_sub_communicators(c, how):
    """Groups of consecutive ranks (how --group-size makes them) and of every other rank (the
    cross-group communicators): collectives inside each, counted on the parent's counters."""
    S, r = c.size, c.rank
    color = r // 2 if how == "blocks" else r % 2
    sub = c.split(color)
    members = [s for s in range(S) if (s // 2 if how == "blocks" else s % 2) == color]
    assert sub.members == members and (sub.rank, sub.size) == (members.index(r), len(members))
    assert sub.nodes == [c.nodes[m] for m in members]
    t = torch.full((5,), float(r))
    before = snapshot(c)
    sub.allreduce_mean_(t)
    assert torch.equal(t, torch.full((5,), sum(members) / len(members)))
    moved = ring_allreduce_bytes(20, sub.size)
    assert delta(c, before) == (moved, moved, 0)  # the parent's counters saw it
    root = len(members) - 1
    b = torch.arange(7, dtype=torch.float32) + (50 if sub.rank == root else 0)
    sub.bcast_(b, root=root)
    assert torch.equal(b, torch.arange(7, dtype=torch.float32) + 50)
    assert sub.bcast_object(("from", members[root]) if sub.rank == root else None, root=root) == ("from", members[root])
    sends = [[] if d == sub.rank else [torch.full((d + 1,), float(r))] for d in range(sub.size)]
    recvs = [[] if s == sub.rank else [torch.empty(sub.rank + 1)] for s in range(sub.size)]
    sub.alltoallv_tensors(sends, recvs)
    for s in range(sub.size):
        if s != sub.rank:
            assert torch.equal(recvs[s][0], torch.full((sub.rank + 1,), float(members[s])))
    recv, _ = sub.alltoallv(torch.full((sub.size,), float(r)), [1] * sub.size)
    assert torch.equal(recv, torch.tensor([float(m) for m in members]))
    sub.barrier()
    # a negative color: MPI refuses it (-1) or gives no communicator (MPI_UNDEFINED); every backend
    # refuses it the same way, before any rank communicates
    with pytest.raises(ValueError, match=r"split\(color=-1\): a color must be >= 0"):
        c.split(-1)
