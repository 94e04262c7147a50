"""traffic.py's wire bytes equal the backend's counters, to the byte, on real strategy rounds.

Run under mpirun (tests/e2e/test_mpi_suites.py does, with 2 and 4 ranks):

    mpirun -np 4 python -m pytest -q -p no:cacheprovider tests/mpi/test_traffic_mpi.py

Every rank runs the same tests in the same order. Each test runs a few real rounds of a strategy
(ResIST: begin_round, one SGD step on the sub-ResNet so copies diverge, end_round), sums the
payload counter deltas over ranks and compares them with what resist_mpi.traffic predicts for the
very assignments rank 0 drew.
"""
import pytest
import torch
import torch.nn.functional as F

from resist_mpi import comm as C
from resist_mpi.tools import traffic as T

if C.world_info_from_env().launcher == "none":
    pytest.skip("run under mpirun -np 2|4 (tests/e2e/test_mpi_suites.py does)", allow_module_level=True)

from resist_mpi.models import create_model  # noqa: E402
from resist_mpi.strategies import DataParallel, LocalSGD, ResIST  # noqa: E402

MODEL, CLASSES, WIDTH = "preact_resnet101", 10, 2  # 22 partitionable blocks, tiny tensors


@pytest.fixture(scope="module")
def comm():
    return C.init("mpi", fail_fast=False)


def factory():
    return create_model(MODEL, CLASSES, WIDTH)


def summed(c, before):
    """(sent, recv) since before, summed over ranks (the reduction itself is control traffic)."""
    sent, recv = c.bytes_sent - before[0], c.bytes_recv - before[1]
    return tuple(int(v) for v in c.reduce_stats([sent, recv], "sum"))


def one_step(model, params, rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(4, 3, 32, 32, generator=g)
    y = torch.randint(0, CLASSES, (4,), generator=g)
    opt = torch.optim.SGD(params, lr=0.1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("overlap", [False, True], ids=["min_depth0", "overlap"])
def test_resist_rounds_match_traffic(comm, overlap):
    S, R, seed = comm.size, 5, 3
    P = 22
    min_depth = P // S + 1 if overlap else 0  # S * m > P: blocks are shared by several ranks
    model = factory()
    strategy = ResIST(model, comm, min_depth=min_depth, seed=seed)
    with torch.device("meta"):
        sizes = T.model_sizes(factory())
    assert sizes.shared == sum(t.numel() for t in strategy.shared_tensors()) and len(sizes.blocks) == P

    measured, drawn = [], []
    for r in range(R):
        before = comm.counters()
        strategy.begin_round()
        one_step(model, strategy.parameters(), comm.rank, r)
        strategy.end_round()
        measured.append(summed(comm, before))
        drawn.append(strategy.assignment)

    assert drawn == T.draw_rounds(P, S, min_depth, seed, R)  # traffic.py draws what rank 0 drew
    expected = T.resist_wire_rounds(sizes, S, drawn)
    assert measured == [(e["sent"], e["recv"]) for e in expected]
    if overlap:
        assert any(e["exchange_sent"] > 0 for e in expected[1:])
    # and the report's steady-state mean (rounds 1..R-1) is the measured mean, to the byte
    report = T.traffic(sizes, S, min_depth, rounds=R - 1, seed=seed)
    assert report["resist"]["wire_bytes"] == sum(s + v for s, v in measured[1:]) / (R - 1)
    assert report["resist"]["wire_sent"] == sum(s for s, _ in measured[1:]) / (R - 1)


def test_local_sgd_round_matches_traffic(comm):
    S = comm.size
    model = factory()
    strategy = LocalSGD(model, comm)
    sizes = T.model_sizes(model)
    before = comm.counters()
    strategy.begin_round()
    one_step(model, list(model.parameters()), comm.rank, 0)
    strategy.end_round()
    sent, recv = summed(comm, before)
    assert sent + recv == T.local_sgd_wire_round(sizes, S)
    assert sent == recv == T.traffic(sizes, S, rounds=1)["local_sgd"]["wire_sent"]


def test_data_parallel_round_matches_traffic(comm):
    S, l = comm.size, 3
    model = factory()
    strategy = DataParallel(model, comm)
    sizes = T.model_sizes(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = comm.counters()
    strategy.begin_round()
    for step in range(l):
        g = torch.Generator().manual_seed(100 * comm.rank + step)
        opt.zero_grad()
        # the gradient average runs by itself when backward is done
        F.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=g)), torch.randint(0, CLASSES, (4,), generator=g)).backward()
        opt.step()
    strategy.end_round()
    sent, recv = summed(comm, before)
    assert sent + recv == T.data_parallel_wire_round(sizes, S, l)
    assert sent + recv == T.traffic(sizes, S, local_steps=l, rounds=1)["data_parallel"]["wire_bytes"]


def cross(c, before):
    return int(c.reduce_stats([c.bytes_sent_cross - before], "sum")[0])


@pytest.mark.parametrize("nodes_of", [None, 2], ids=["one_node", "nodes_of_2"])
def test_grouped_rounds_match_traffic_per_level(comm, nodes_of):
    """Groups of 2 (ResIST between groups, data-parallel inside): every round's bytes, and the part
    that crosses nodes, equal traffic.py's. nodes_of=2 counts as if every 2 ranks were a node (the
    counters take the node of every rank from Comm.nodes; the kernel's view is tested on the
    simulated cluster)."""
    S, R, seed, steps = comm.size, 4, 5, 2
    if S % 2:
        pytest.skip("needs an even number of ranks")
    c = C.init("mpi", fail_fast=False)
    if nodes_of:
        c.set_nodes([r // nodes_of for r in range(S)])
    model = factory()
    strategy = ResIST(model, c, seed=seed, group_size=2)
    sizes = T.model_sizes(factory())
    measured, drawn = [], []
    for r in range(R):
        before, cross0 = c.counters(), c.bytes_sent_cross
        strategy.begin_round()
        for step in range(steps):
            one_step(model, strategy.parameters(), c.rank, 10 * r + step)
        strategy.end_round()
        measured.append((*summed(c, before), cross(c, cross0)))
        drawn.append(strategy.assignment)
    assert drawn == T.draw_rounds(len(sizes.blocks), S // 2, 0, seed, R)
    expected = T.resist_wire_rounds(sizes, S, drawn, group_size=2, ranks_per_node=nodes_of, local_steps=steps)
    assert measured == [(e["sent"], e["recv"], e["sent_cross"]) for e in expected]
    assert (nodes_of is None or nodes_of >= S) == all(m[2] == 0 for m in measured)


def test_hierarchical_local_sgd_matches_traffic(comm):
    S, steps = comm.size, 3
    if S % 2:
        pytest.skip("needs an even number of ranks")
    c = C.init("mpi", fail_fast=False)
    c.set_nodes([r // 2 for r in range(S)])
    model = factory()
    strategy = LocalSGD(model, c, group_size=2)
    sizes = T.model_sizes(model)
    before, cross0 = c.counters(), c.bytes_sent_cross
    strategy.begin_round()
    for step in range(steps):
        one_step(model, list(model.parameters()), c.rank, step)
    strategy.end_round()
    want = T.local_sgd_wire(sizes, S, group_size=2, ranks_per_node=2, local_steps=steps)
    assert (*summed(c, before), cross(c, cross0)) == (want["sent"], want["recv"], want["sent_cross"])
