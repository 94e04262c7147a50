"""One ResIST round on real ranks equals the same round computed in one process.

Every rank also computes the reference: it simulates all S ranks sequentially from the same initial
weights, assignments and batches, then averages the way the method says (shared layers over all
ranks, each block over the ranks that trained it). Then it checks its own sub-ResNet, and that the
bytes the backend counted equal what the plan says.

RESIST_TEST_DEVICE=cuda runs the same checks on the GPU (`make gpu-check`: the reference is then
computed on the GPU too, with deterministic algorithms); RESIST_TEST_BACKEND picks the backend
(default mpi; horovod under horovodrun).
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from resist_mpi import comm
from resist_mpi.config import Config
from resist_mpi.exchange import block_sizes
from resist_mpi.models import create_model
from resist_mpi.routing import needers_from_assignment
from resist_mpi.strategies import ResIST

STEPS = 2
DEVICE = torch.device(os.environ.get("RESIST_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":  # one GPU shared by the ranks; bit-for-bit block copies need determinism
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def factory():
    torch.manual_seed(1234)
    return create_model("preact_resnet34", 10, width=4)  # 5 partitionable blocks


def batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(8, 3, 32, 32, generator=g).to(DEVICE), torch.randint(0, 10, (8,), generator=g).to(DEVICE))
            for _ in range(STEPS)]


def local_train(model, params, data):
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def mean_in_rank_order(tensors):
    acc = tensors[0].clone()
    for t in tensors[1:]:
        acc.add_(t)
    return acc.div_(len(tensors))


@pytest.fixture(scope="module")
def c():
    return comm.init(os.environ.get("RESIST_TEST_BACKEND", "mpi"), fail_fast=False)


@pytest.mark.parametrize("min_depth", [0, 3])  # 3 with 5 blocks forces overlap on >= 2 ranks
def test_round_matches_single_process(c, min_depth):
    torch.set_num_threads(1)
    cfg = Config(seed=7, min_depth=min_depth)
    s = ResIST(c, cfg, DEVICE)
    model = s.build_model(factory)
    P = model.num_partitionable
    numel = block_sizes(model)
    init = factory().to(DEVICE)

    # round 0: blocks come from rank 0's initial model
    before = c.counters()
    s.begin_round(0)
    a0 = s.assignment
    assert c.bytes_sent - before[0] == s.last_plan.bytes_sent(c.rank, numel)
    assert c.bytes_recv - before[1] == s.last_plan.bytes_recv(c.rank, numel)
    for b in range(P):
        assert model.holds_block(b) == (b in a0[c.rank])
        if b in a0[c.rank]:
            assert all(torch.equal(x, y) for x, y in zip(model.block_tensors(b), init.block_tensors(b)))
    assert all(torch.equal(x, y) for x, y in zip(model.shared_tensors(), init.shared_tensors()))

    groups = s.param_groups()
    local_train(model, [p for g in groups for p in g["params"]], batches(c.rank))
    s.end_round()
    before = c.counters()
    s.begin_round(1)
    a1 = s.assignment
    plan = s.last_plan
    assert c.bytes_sent - before[0] == plan.bytes_sent(c.rank, numel)
    assert c.bytes_recv - before[1] == plan.bytes_recv(c.rank, numel)
    total = c.reduce_stats([c.bytes_sent - before[0]], "sum")[0]
    assert total == plan.total_bytes(numel)

    # the same round in one process
    replicas = []
    for r in range(c.size):
        m = copy.deepcopy(init)
        m.activate(a0[r])
        mine = [p for b in a0[r] for p in m.partitionable[b].parameters()]
        shared = [p for mod in m.shared_modules() for p in mod.parameters()]
        local_train(m, shared + mine, batches(r))
        replicas.append(m)
    for mine, *ref in zip(model.shared_tensors(), *[m.shared_tensors() for m in replicas]):
        assert torch.allclose(mine, mean_in_rank_order(ref), rtol=1e-5, atol=1e-6)
    trainers = needers_from_assignment(a0, P)
    for b in range(P):
        assert model.holds_block(b) == (b in a1[c.rank])
        if b not in a1[c.rank]:
            continue
        expected = [mean_in_rank_order([replicas[r].block_tensors(b)[i] for r in trainers[b]])
                    for i in range(len(model.block_tensors(b)))]
        for got, want in zip(model.block_tensors(b), expected):
            if len(trainers[b]) == 1:
                assert torch.equal(got, want)  # a copy, bit for bit
            else:
                assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
    if min_depth:
        assert any(len(t) > 1 for t in trainers)  # the overlap path really ran


def test_full_model_gathers_and_scales(c):
    cfg = Config(seed=3)
    s = ResIST(c, cfg, DEVICE)
    model = s.build_model(factory)
    s.begin_round(0)
    s.end_round()
    with s.full_model() as full:
        assert all(full.holds_block(b) and full.partitionable[b].active for b in range(full.num_partitionable))
        assert full.partitionable[0].res_scale == pytest.approx(1 / c.size)
        # every rank holds the identical full model
        flat = torch.cat([t.reshape(-1) for t in full.state_dict().values() if t.is_floating_point()])
        mean = flat.clone()
        c.allreduce_mean_(mean)
        assert torch.allclose(flat, mean, atol=1e-6)
    assert model.partitionable[0].res_scale == 1.0
    # back to its own sub-ResNet: only round 0's blocks are held (and active)
    a0, P = s.assignment, model.num_partitionable
    assert [b for b in range(P) if model.holds_block(b)] == list(a0[c.rank])
    assert [b for b in range(P) if model.partitionable[b].active] == list(a0[c.rank])
    # so round 1 moves what it would have moved without the evaluation: round 0's trainers send
    from resist_mpi.routing import plan_exchange
    before = c.counters()
    s.begin_round(1)
    plan = plan_exchange(needers_from_assignment(a0, P), needers_from_assignment(s.assignment, P), c.size,
                         set(), block_sizes(model))
    numel = block_sizes(model)
    assert c.counters() == (before[0] + plan.bytes_sent(c.rank, numel), before[1] + plan.bytes_recv(c.rank, numel))
    assert c.size == 1 or c.reduce_stats([c.bytes_sent - before[0]], "sum")[0] > 0
    assert sum(model.holds_block(b) for b in range(model.num_partitionable)) == len(s.assignment[c.rank])


def test_assignments_come_from_rank_0_a_batch_per_broadcast(c, monkeypatch):
    """Every rank gets rank 0's draw for each round, even where its own random stream differs, and
    the assignments of ASSIGNMENTS_PER_BROADCAST rounds travel in one broadcast."""
    import numpy as np

    from resist_mpi import partition
    from resist_mpi.strategies.resist import ASSIGNMENTS_PER_BROADCAST as K

    s = ResIST(c, Config(seed=3, min_depth=2), DEVICE)
    P = s.build_model(factory).num_partitionable
    rounds = list(range(2 * K + 6)) + [500, 501]
    expected = {r: partition.draw_assignment(P, c.size, 2, partition.round_rng(3, r)) for r in rounds}
    if c.rank != 0:  # a rank drawing for itself would now get other assignments
        monkeypatch.setattr(partition, "round_rng", lambda seed, r: np.random.default_rng(10_000 + r))
    broadcasts = []
    for r in rounds:
        before = c.control_bytes
        assert s.draw(r) == expected[r]
        if c.control_bytes != before:
            broadcasts.append(r)
    # a round outside the current batch (a resume) starts a new one
    assert broadcasts == ([0, K, 2 * K, 500] if c.size > 1 else [])
