"""--group-size: one grouped round on real ranks equals the same round computed in one process.

Run on 4 ranks (2 groups of 2), any backend (RESIST_TEST_BACKEND): ResIST between the groups, data-parallel
inside each. Every rank computes the reference: every member of every group trains a copy of the initial model on its own
batches, the members of a group stepping on their averaged gradients; then the round's averages as
the method says (a group's blocks averaged over its members, the shared layers over the groups'
averages), and the next round's blocks arrive in slices that the receiving group puts together.
Also: the bytes counted for the sliced exchange equal the plan's slices plus the group's gathers,
and hierarchical local SGD averages exactly as a flat average of the same numbers would.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from resist_mpi import comm
from resist_mpi.blocks.switch import activate, make_switchable
from resist_mpi.blocks.find import find_blocks
from resist_mpi.blocks.tensors import shared_slots
from resist_mpi.plan.groups import slice_counts
from resist_mpi.models import create_model
from resist_mpi.plan.routing import needers_from_assignment
from resist_mpi.strategies import LocalSGD, ResIST
from helpers import seeded

STEPS, G = 2, 2


@pytest.fixture(scope="module")
def c():
    c = comm.init(os.environ.get("RESIST_TEST_BACKEND", "mpi"), fail_fast=False, device="cpu")
    if c.size % G:
        pytest.skip(f"needs a multiple of {G} ranks")
    return c


def factory():
    with seeded(1234):
        return create_model("preact_resnet34", 10, width=4)  # 5 partitionable blocks


def batch(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def tensors_of(block):
    return list(block.parameters()) + [t for t in block.buffers() if t.is_floating_point()]


def mean(ts):
    acc = ts[0].clone()
    for t in ts[1:]:
        acc.add_(t)
    return acc.div_(len(ts))


def train_group(init, blocks_ids, ranks):
    """The members `ranks` of one group train copies of init data-parallel; returns their models."""
    models, opts = [], []
    for _ in ranks:
        m = copy.deepcopy(init)
        blocks = [b for _, b in find_blocks(m)]
        for b in blocks:
            make_switchable(b)
        activate(blocks, blocks_ids)
        params = [d[n] for d, n in shared_slots(m, blocks) if isinstance(d[n], torch.nn.Parameter)]
        params += [p for b in blocks_ids for p in blocks[b].parameters()]
        models.append((m, blocks, params))
        opts.append(torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4))
    for step in range(STEPS):
        for (m, _, _), opt, r in zip(models, opts, ranks):
            opt.zero_grad()
            x, y = batch(r, step)
            F.cross_entropy(m(x), y).backward()
        for k in range(len(models[0][2])):  # gradients averaged over the group, in member order
            g = mean([params[k].grad for _, _, params in models])
            for _, _, params in models:
                params[k].grad.copy_(g)
        for opt in opts:
            opt.step()
    return models


@pytest.mark.parametrize("min_depth", [0, 3])
def test_grouped_round_matches_single_process(c, min_depth):
    torch.set_num_threads(1)
    model = factory()
    s = ResIST(model, c, seed=7, min_depth=min_depth, group_size=G)
    groups = s.groups
    assert (groups.size, groups.count, groups.index) == (G, c.size // G, c.rank // G)
    P, numel = len(s.blocks), s.store.sizes()
    init = factory()
    s.begin_round()
    a0 = s.assignment
    assert len(a0) == groups.count
    opt = torch.optim.SGD(s.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for step in range(STEPS):
        opt.zero_grad()
        x, y = batch(c.rank, step)
        F.cross_entropy(model(x), y).backward()  # the group's gradient average runs in a hook
        opt.step()
    s.end_round()
    before = c.counters()
    s.begin_round()
    a1, plan = s.assignment, s.last_plan

    # bytes: my slice of every block my group sends or receives, plus the ring allgather of each
    # block my group receives
    me, succ = groups.member, (groups.member + 1) % G
    sl = [slice_counts(n, G) for n in numel]
    sent = sum(4 * sl[b][me] for dst, blocks in plan.sends(groups.index) for b in blocks)
    recv = sum(4 * sl[b][me] for src, blocks in plan.recvs(groups.index) for b in blocks)
    arrived = [b for b in plan.needed(groups.index) if plan.sources[(groups.index, b)] != (groups.index,)]
    sent += sum(4 * (numel[b] - sl[b][succ]) for b in arrived)
    recv += sum(4 * (numel[b] - sl[b][me]) for b in arrived)
    assert (c.bytes_sent - before[0], c.bytes_recv - before[1]) == (sent, recv)

    # the same round in one process
    trained = [train_group(init, a0[g], list(range(g * G, (g + 1) * G))) for g in range(groups.count)]
    group_shared = [mean_over_members(models) for models in trained]
    for k, mine in enumerate(s.shared_tensors()):
        assert torch.equal(mine, mean([gs[k] for gs in group_shared]))
    trainers = needers_from_assignment(a0, P)
    for b in range(P):
        assert s.store.holds(b) == (b in a1[groups.index])
        if b not in a1[groups.index]:
            continue
        copies = [[mean([tensors_of(models[m][1][b])[i] for m in range(G)]) for i in range(len(s.store.tensors(b)))]
                  for g, models in enumerate(trained) if g in trainers[b]]
        for i, t in enumerate(s.store.tensors(b)):
            assert torch.equal(t, mean([cp[i] for cp in copies])), (b, i)
    if min_depth and groups.count > 1:
        assert any(len(t) > 1 for t in trainers)  # the overlap path really ran


def mean_over_members(models):
    shared = [[d[n] for d, n in shared_slots(m, blocks)] for m, blocks, _ in models]
    return [mean([sh[k] for sh in shared]) for k in range(len(shared[0]))]


def test_group_members_hold_identical_models(c):
    """After a round every member of a group holds the same bits (parameters and BN statistics)."""
    model = factory()
    s = ResIST(model, c, seed=1, group_size=G)
    for r in s.rounds(2):
        opt = torch.optim.SGD(s.parameters(), lr=0.05)
        opt.zero_grad()
        x, y = batch(c.rank, r)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    flat = torch.cat([t.reshape(-1) for t in s.shared_tensors()] +
                     [s.store.slab(b) for b in s.mine()])
    other = flat.clone()
    s.groups.inner.bcast_(other, root=0)
    assert torch.equal(flat, other)


def test_hierarchical_local_sgd_average(c):
    """Hierarchical local SGD: the model average equals the mean over the groups of the groups' means."""
    model = factory()
    s = LocalSGD(model, c, group_size=G)
    with torch.no_grad():
        for k, p in enumerate(model.parameters()):
            p.fill_(float(c.rank * 10 + k % 3))
    s.begin_round()
    s.end_round()
    groups_means = [mean([torch.tensor(float(r * 10)) for r in range(g * G, (g + 1) * G)]) for g in range(c.size // G)]
    want0 = mean(groups_means)
    assert torch.equal(next(model.parameters()).reshape(-1)[0], want0)
