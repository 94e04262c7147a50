"""One ResIST round on real ranks equals the same round computed in one process, for every kind of
residual stack: the package's pre-activation ResNet, a torchvision ResNet, a TransformerEncoder.

Every rank also computes the reference: it simulates all S ranks sequentially from the same initial
weights, assignments and batches, then averages the way the method says (shared layers over all
ranks, each block over the ranks that trained it). Then it checks its own sub-network, and that the
bytes the backend counted equal what the plan says.

RESIST_TEST_DEVICE=cuda runs the same checks on the GPU (`make gpu-check`: the reference is then
computed on the GPU too, with deterministic algorithms); RESIST_TEST_BACKEND picks the backend
(default mpi; horovod under horovodrun, torch).
"""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from resist_mpi import comm
from resist_mpi.blocks.switch import activate, make_switchable
from resist_mpi.blocks.find import find_blocks
from resist_mpi.blocks.tensors import shared_slots
from resist_mpi.models import create_model
from resist_mpi.plan.routing import (everyone, gather_contributions, needers_from_assignment, plan_exchange,
                                     ring_bytes)
from resist_mpi.strategies import ResIST
from resist_mpi.strategies.exchange import run_exchange
from resist_mpi.strategies.store import BlockStore
from helpers import seeded

STEPS = 2
DEVICE = torch.device(os.environ.get("RESIST_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":  # one GPU shared by the ranks; bit-for-bit block copies need determinism
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class Tokens(nn.Module):
    """A small sequence classifier: a linear embedding, a TransformerEncoder, mean pooling, a head."""

    def __init__(self, layers=5, d=16):
        super().__init__()
        self.embed = nn.Linear(8, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


# name: (factory, ResIST keyword arguments, input shape); each model has 5 partitionable blocks
MODELS = {
    "preact": (lambda: create_model("preact_resnet34", 10, width=4), {}, (3, 32, 32)),
    "torchvision": (lambda: torchvision.models.resnet18(num_classes=10), {"stages": (1, 2, 3, 4)}, (3, 32, 32)),
    "transformer": (Tokens, {}, (6, 8)),
}


def factory(name):
    with seeded(1234):
        return MODELS[name][0]()


def batches(name, rank):
    g = torch.Generator().manual_seed(100 + rank)
    shape = MODELS[name][2]
    return [(torch.randn(8, *shape, generator=g).to(DEVICE), torch.randint(0, 10, (8,), generator=g).to(DEVICE))
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


def reference_replica(name, init, assignment_of_rank, rank):
    """Rank `rank`'s round computed here: a copy of the initial model, its blocks switched."""
    m = copy.deepcopy(init)
    blocks = [b for _, b in find_blocks(m, "auto", MODELS[name][1].get("stages"))]
    for b in blocks:
        make_switchable(b)
    activate(blocks, assignment_of_rank)
    shared = [d[n] for d, n in shared_slots(m, blocks) if isinstance(d[n], nn.Parameter)]
    local_train(m, shared + [p for b in assignment_of_rank for p in blocks[b].parameters()], batches(name, rank))
    return m, blocks


def tensors_of(block):
    return list(block.parameters()) + [t for t in block.buffers() if t.is_floating_point()]


@pytest.mark.parametrize("min_depth", [0, 3])  # 3 with 5 blocks forces overlap on >= 2 ranks
@pytest.mark.parametrize("name", list(MODELS))
def test_round_matches_single_process(c, name, min_depth):
    torch.set_num_threads(1)
    model = factory(name).to(DEVICE)
    s = ResIST(model, c, seed=7, min_depth=min_depth, device=DEVICE, **MODELS[name][1])
    P = len(s.blocks)
    numel = s.store.sizes()
    init = factory(name).to(DEVICE)
    init_blocks = [b for _, b in find_blocks(init, "auto", MODELS[name][1].get("stages"))]
    init_shared = [d[n] for d, n in shared_slots(init, init_blocks)]

    # round 0: blocks come from rank 0's initial model
    before = c.counters()
    s.begin_round()
    a0 = s.assignment
    assert c.bytes_sent - before[0] == s.last_plan.bytes_sent(c.rank, numel)
    assert c.bytes_recv - before[1] == s.last_plan.bytes_recv(c.rank, numel)
    for b in range(P):
        assert s.store.holds(b) == (b in a0[c.rank])
        if b in a0[c.rank]:
            assert all(torch.equal(x, y) for x, y in zip(s.store.tensors(b), tensors_of(init_blocks[b])))
    assert all(torch.equal(x, y) for x, y in zip(s.shared_tensors(), init_shared))

    local_train(model, s.parameters(), batches(name, c.rank))
    s.end_round()
    before = c.counters()
    s.begin_round()
    a1 = s.assignment
    plan = s.last_plan
    assert c.bytes_sent - before[0] == plan.bytes_sent(c.rank, numel)
    assert c.bytes_recv - before[1] == plan.bytes_recv(c.rank, numel)
    total = c.reduce_stats([c.bytes_sent - before[0]], "sum")[0]
    assert total == plan.total_bytes(numel)

    # the same round in one process
    replicas = [reference_replica(name, init, a0[r], r) for r in range(c.size)]
    ref_shared = [[d[n] for d, n in shared_slots(m, blocks)] for m, blocks in replicas]
    for k, mine in enumerate(s.shared_tensors()):
        assert torch.allclose(mine, mean_in_rank_order([ref[k] for ref in ref_shared]), rtol=1e-5, atol=1e-6)
    trainers = needers_from_assignment(a0, P)
    for b in range(P):
        assert s.store.holds(b) == (b in a1[c.rank])
        if b not in a1[c.rank]:
            continue
        got = s.store.tensors(b)
        for i, t in enumerate(got):
            want = mean_in_rank_order([tensors_of(replicas[r][1][b])[i] for r in trainers[b]])
            if len(trainers[b]) == 1:
                assert torch.equal(t, want)  # a copy, bit for bit
            else:
                assert torch.allclose(t, want, rtol=1e-6, atol=1e-7)
    if min_depth and c.size > 1:
        assert any(len(t) > 1 for t in trainers)  # the overlap path really ran


def test_other_ranks_may_build_on_meta(c):
    """The CLI builds the model on the meta device on ranks other than 0: they get rank 0's shared
    layers and, in round 0, its blocks; the result equals every rank building the model itself."""
    if c.rank == 0:
        model = factory("preact").to(DEVICE)
    else:
        with torch.device("meta"):
            model = factory("preact")
    s = ResIST(model, c, seed=7, device=DEVICE)
    s.begin_round()
    init = factory("preact").to(DEVICE)
    init_blocks = [b for _, b in find_blocks(init)]
    assert all(torch.equal(x, y) for x, y in zip(s.shared_tensors(), [d[n] for d, n in shared_slots(init, init_blocks)]))
    for b in s.assignment[c.rank]:
        assert all(torch.equal(x, y) for x, y in zip(s.store.tensors(b), tensors_of(init_blocks[b])))
    assert not any(t.is_meta for t in s.shared_tensors())
    assert all(s.store.holds(b) == (b in s.assignment[c.rank]) for b in range(len(s.blocks)))


def test_full_model_gathers_scales_and_goes_back(c):
    model = factory("preact").to(DEVICE)
    s = ResIST(model, c, seed=3, device=DEVICE)
    s.begin_round()
    s.end_round()
    P = len(s.blocks)
    with s.full_model() as full:
        assert full is model
        assert all(s.store.holds(b) and b_._resist_switch.active for b, b_ in enumerate(s.blocks))
        assert s.blocks[0]._resist_switch.scale == pytest.approx(1 / c.size)
        with s.full_model():  # re-entrant: an inner one (state_dict) reuses the gather
            pass
        assert all(s.store.holds(b) for b in range(P))
        # every rank holds the identical full model
        flat = torch.cat([t.reshape(-1) for t in full.state_dict().values() if t.is_floating_point()])
        mean = flat.clone()
        c.allreduce_mean_(mean)
        assert torch.allclose(flat, mean, atol=1e-6)
    assert s.blocks[0]._resist_switch.scale == 1.0
    # back to its own sub-network: only round 0's blocks are held (and active)
    a0 = s.assignment
    assert [b for b in range(P) if s.store.holds(b)] == list(a0[c.rank])
    assert [b for b in range(P) if s.blocks[b]._resist_switch.active] == list(a0[c.rank])
    # so round 1 moves what it would have moved without the evaluation: round 0's trainers send
    before = c.counters()
    s.begin_round()
    numel = s.store.sizes()
    plan = plan_exchange(needers_from_assignment(a0, P), needers_from_assignment(s.assignment, P), c.size,
                         set(), numel)
    assert c.counters() == (before[0] + plan.bytes_sent(c.rank, numel), before[1] + plan.bytes_recv(c.rank, numel))


@pytest.mark.parametrize("route", ["auto", "allgather"])
def test_a_gather_as_one_allgather_gives_the_all_to_alls_blocks(c, route):
    """A gather (every rank needs every block) carried out as one allgather leaves every rank with the
    blocks the all-to-all exchange leaves it, to the bit: blocks held by one rank, by several
    (identical copies, one sends), and trained by several (divergent copies, averaged in rank order).
    The bytes are the ring's; "auto" takes it only where the busiest rank moves no more."""
    S, P = c.size, 5
    divergent = {3}
    holders = [(0,), (S - 1,), tuple(range(S)), (0, S - 1), ((1 % S),)]

    def store_as_held():  # values from the block id (and the rank where divergent), not the shared RNG
        blocks = [m for _, m in find_blocks(create_model("preact_resnet34", 10, width=4).to(DEVICE), "auto")]
        assert len(blocks) == P
        store = BlockStore(blocks, DEVICE)
        with torch.no_grad():
            for b in range(P):
                if c.rank in holders[b]:
                    slab = store.slab(b)
                    slab.copy_(torch.linspace(-1, 1, slab.numel(), device=DEVICE) * (b + 1) / 7)
                    slab.add_(c.rank / 3 if b in divergent else 0)  # copies differ only where divergent
                else:
                    store.release(b)
        return store

    numel = store_as_held().sizes()
    plan = plan_exchange(holders, everyone(P, S), S, divergent, numel)
    want = store_as_held()
    run_exchange(c, want, plan, DEVICE, route="direct")
    got = store_as_held()
    before = c.counters()
    run_exchange(c, got, plan, DEVICE, route=route)
    for b in range(P):
        assert got.holds(b) and torch.equal(got.slab(b), want.slab(b)), b
    contributions = gather_contributions(plan, numel)
    if S in (2, 4):  # each moved block once, from its sender; the divergent block 3 from both holders
        assert contributions == {2: [(0, 3), (1, 3, 4)], 4: [(0, 3), (4,), (), (1, 3)]}[S]
    ring = route == "allgather" or ring_bytes(contributions, numel) <= plan.busiest_bytes(numel)
    counts = [sum(numel[b] for b in blocks) for blocks in contributions]
    expected = ((sum(counts) - counts[(c.rank + 1) % S]) * 4, (sum(counts) - counts[c.rank]) * 4) if ring \
        else (plan.bytes_sent(c.rank, numel), plan.bytes_recv(c.rank, numel))
    assert c.counters() == (before[0] + expected[0], before[1] + expected[1])


def test_state_dict_round_trip_continues_identically(c):
    """state_dict() (collective) then load_state_dict() into a fresh job continues as the first."""
    a = ResIST(factory("preact").to(DEVICE), c, seed=5, device=DEVICE)
    for _ in a.rounds(2):
        local_train(a.model, a.parameters(), batches("preact", c.rank))
    state = a.state_dict()
    assert state["round"] == 2 and set(state["model"]) == set(a.model.state_dict())
    b = ResIST(factory("preact").to(DEVICE), c, seed=5, device=DEVICE)
    b.load_state_dict(state)
    for job in (a, b):
        for r in job.rounds(3):
            assert r == 2
            local_train(job.model, job.parameters(), batches("preact", c.rank + 10))
    with a.full_model() as fa:
        wa = {k: v.clone() for k, v in fa.state_dict().items()}
    with b.full_model() as fb:
        assert all(torch.equal(wa[k], v) for k, v in fb.state_dict().items())


def test_assignments_come_from_rank_0_a_batch_per_broadcast(c, monkeypatch):
    """Every rank gets rank 0's draw for each round, even where its own random stream differs, and
    the assignments of ASSIGNMENTS_PER_BROADCAST rounds travel in one broadcast."""
    import numpy as np

    from resist_mpi.plan import partition
    from resist_mpi.strategies.resist import ASSIGNMENTS_PER_BROADCAST as K

    s = ResIST(factory("preact").to(DEVICE), c, seed=3, min_depth=2, device=DEVICE)
    P = len(s.blocks)
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
