"""The Horovod backend on every rank: exact values and exact byte counts for each API call.

Run under horovodrun (either controller), any number of ranks:

    horovodrun -np 4 python -m pytest -q tests/mpi/test_comm_horovod.py
    horovodrun --gloo -np 2 python -m pytest -q tests/mpi/test_comm_horovod.py

tests/test_horovod_launch.py does this from the plain test session. Every rank runs the same
tests in the same order, so each test is one collective conversation.
"""
import copy
import pickle
import warnings

import pytest
import torch

pytest.importorskip("horovod.torch", reason="Horovod is not installed (make horovod)")

from resist_mpi import comm as C  # noqa: E402
from resist_mpi.comm.base import ring_allreduce_bytes  # noqa: E402
from resist_mpi.comm.horovod import HorovodComm  # noqa: E402

if not C.launched_by_horovodrun():
    pytest.skip("run under horovodrun (tests/test_horovod_launch.py does)", allow_module_level=True)


@pytest.fixture(scope="module")
def comm():
    return HorovodComm()


def snapshot(c):
    return c.bytes_sent, c.bytes_recv, c.control_bytes


def delta(c, before):
    return tuple(a - b for a, b in zip(snapshot(c), before))


def test_world_matches_launcher(comm):
    import horovod.torch as hvd
    info = C.world_info_from_env()
    assert comm.name == "horovod"
    assert (comm.rank, comm.size, comm.local_rank, comm.local_size) == \
        (hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())
    assert (info.rank, info.size, info.local_rank, info.local_size) == \
        (comm.rank, comm.size, comm.local_rank, comm.local_size)
    assert info.launcher == "horovodrun"
    assert C.resolve_backend("auto") == "horovod"


@pytest.mark.parametrize("n", [1, 7, 1000, 0])
def test_allreduce_mean(comm, n):
    S, r = comm.size, comm.rank
    # rank r holds i + S*r: the mean i + S*(S-1)/2 is exact in float32.
    t = torch.arange(n, dtype=torch.float32) + S * r
    before = snapshot(comm)
    out = comm.allreduce_mean_(t)
    assert out is t
    assert torch.equal(t, torch.arange(n, dtype=torch.float32) + S * (S - 1) / 2)
    moved = ring_allreduce_bytes(4 * n, S)
    assert delta(comm, before) == (moved, moved, 0)


def _counts(src, dst):
    # zeros between some pairs (1 -> 0 among them), and a non-empty share for itself on every rank,
    # so a backend that counted bytes sent to itself, or dropped its own segment, is caught
    return (src + 2 * dst + 1) % 3


def _segment(src, dst):
    return torch.tensor([1000.0 * src + 10 * dst + k for k in range(_counts(src, dst))])


@pytest.mark.parametrize("known", [True, False], ids=["recv_counts_given", "recv_counts_exchanged"])
def test_alltoallv(comm, known):
    S, r = comm.size, comm.rank
    send_counts = [_counts(r, d) for d in range(S)]
    expected_counts = [_counts(s, r) for s in range(S)]
    send = torch.cat([_segment(r, d) for d in range(S)]).to(torch.float32)
    before = snapshot(comm)
    recv, recv_counts = comm.alltoallv(send, send_counts, expected_counts if known else None)
    assert recv_counts == expected_counts
    assert torch.equal(recv, torch.cat([_segment(s, r) for s in range(S)]).to(torch.float32))
    assert send_counts[r] > 0 and (S == 1 or 0 in [_counts(s, d) for s in range(S) for d in range(S)])
    sent = 4 * (sum(send_counts) - send_counts[r])
    got = 4 * (sum(expected_counts) - expected_counts[r])
    assert delta(comm, before) == (sent, got, 0 if known else 2 * 8 * (S - 1))


def test_alltoallv_nothing_to_send(comm):
    S = comm.size
    before = snapshot(comm)
    recv, recv_counts = comm.alltoallv(torch.zeros(0), [0] * S, [0] * S)
    assert recv.numel() == 0 and recv_counts == [0] * S
    assert delta(comm, before) == (0, 0, 0)


def test_alltoallv_wrong_recv_counts_raises(comm):
    # Every rank claims one element too many from itself, so every rank raises (no rank hangs).
    S, r = comm.size, comm.rank
    send_counts = [1] * S
    wrong = [1] * S
    wrong[r] = 2
    with pytest.raises(RuntimeError, match="alltoallv"):
        comm.alltoallv(torch.ones(S), send_counts, wrong)


@pytest.mark.parametrize("root_is_last", [False, True], ids=["root0", "root_last"])
def test_bcast_(comm, root_is_last):
    S, r = comm.size, comm.rank
    root = S - 1 if root_is_last else 0
    n = 33
    t = torch.full((n,), float(r)) + torch.arange(n, dtype=torch.float32)
    before = snapshot(comm)
    assert comm.bcast_(t, root=root) is t
    assert torch.equal(t, torch.full((n,), float(root)) + torch.arange(n, dtype=torch.float32))
    if S == 1:
        expected = (0, 0, 0)
    elif r == root:
        expected = (4 * n * (S - 1), 0, 0)
    else:
        expected = (0, 4 * n, 0)
    assert delta(comm, before) == expected


@pytest.mark.parametrize("root_is_last", [False, True], ids=["root0", "root_last"])
def test_bcast_object(comm, root_is_last):
    S, r = comm.size, comm.rank
    root = S - 1 if root_is_last else 0
    obj = {"round": 3, "assignment": [[b for b in range(8) if b % S == s] for s in range(S)],
           "blob": bytes(range(256)) * 3, "root": root}
    nbytes = len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    before = snapshot(comm)
    got = comm.bcast_object(obj if r == root else None, root=root)
    assert got == obj
    if S == 1:
        expected = (0, 0, 0)
    elif r == root:
        expected = (nbytes * (S - 1), 0, 0)
    else:
        expected = (0, nbytes, 0)
    assert delta(comm, before) == expected


@pytest.mark.parametrize("op", ["sum", "max", "min"])
def test_reduce_stats(comm, op):
    S, r = comm.size, comm.rank
    values = [float(r), 1.0, 2.5 * r - 1.0]
    expected = {
        "sum": [S * (S - 1) / 2, float(S), 2.5 * S * (S - 1) / 2 - S],
        "max": [float(S - 1), 1.0, 2.5 * (S - 1) - 1.0],
        "min": [0.0, 1.0, -1.0],
    }[op]
    before = snapshot(comm)
    assert comm.reduce_stats(values, op=op) == expected
    assert delta(comm, before) == (0, 0, 2 * ring_allreduce_bytes(3 * 8, S))


def test_barrier_moves_no_counted_bytes(comm):
    before = snapshot(comm)
    comm.barrier()
    comm.barrier()
    assert delta(comm, before) == (0, 0, 0)


def test_repeated_calls_with_changing_sizes(comm):
    # The same collective name with other shapes from round to round (Horovod's response cache).
    S, r = comm.size, comm.rank
    for n in (5, 50, 5, 3):
        t = torch.full((n,), float(2 * r))
        comm.allreduce_mean_(t)
        assert torch.equal(t, torch.full((n,), float(S - 1)))
        counts = [n + d for d in range(S)]
        recv, _ = comm.alltoallv(torch.full((sum(counts),), float(r)), counts)
        assert torch.equal(recv, torch.cat([torch.full((n + r,), float(s)) for s in range(S)]))


# -- strategies on the Horovod backend ---------------------------------------------------------------
def _rank_input(r):
    return torch.arange(6, dtype=torch.float32).reshape(2, 3) * (r + 1) - r


def test_only_data_parallel_wraps_in_distributed_optimizer(comm):
    from resist_mpi.strategies import DataParallel, LocalSGD, ResIST
    for cls in (ResIST, LocalSGD):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        assert cls(comm, None, "cpu").wrap_optimizer(opt) is opt
    torch.manual_seed(0)  # the same weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    dp = DataParallel(comm, None, "cpu")
    dp.model = model
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    wrapped = dp.wrap_optimizer(opt)
    assert wrapped is not opt and isinstance(wrapped, torch.optim.SGD) and hasattr(wrapped, "synchronize")
    with pytest.raises(RuntimeError, match="already created"):
        dp.wrap_optimizer(opt)

    # The expected step: every rank's gradient, averaged, computed here on a copy.
    ref = copy.deepcopy(model)
    grads = []
    for s in range(comm.size):
        ref.zero_grad(set_to_none=True)
        ref(_rank_input(s)).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in ref.parameters()])
    mean = [sum(g[i] for g in grads) / comm.size for i in range(len(grads[0]))]

    numel = sum(p.numel() for p in model.parameters())
    for step in range(2):  # the trainer's order of calls, twice (the second with momentum state)
        before = snapshot(comm)
        wrapped.zero_grad(set_to_none=True)
        model(_rank_input(comm.rank)).pow(2).sum().backward()
        dp.after_backward()
        moved = ring_allreduce_bytes(4 * numel, comm.size)
        assert delta(comm, before) == (moved, moved, 0)
        if step == 0:
            for p, m in zip(model.parameters(), mean):
                assert torch.allclose(p.grad, m, rtol=1e-6, atol=1e-7)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "step() after synchronize()" warning
            wrapped.step()
    # every replica took the same steps
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    check = flat.clone()
    comm.allreduce_mean_(check)
    assert torch.allclose(flat, check, rtol=1e-6, atol=1e-7)
