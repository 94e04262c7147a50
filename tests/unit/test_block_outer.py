"""benchmarks/block_outer.py's emulation of an outer step on ResIST's blocks with travelling momentum,
on 2 thread ranks: the rank that trained a block steps it from the round's starting values with the
block's momentum, whoever trained it before, and the bytes a travelling momentum would add are
counted where a block's trainer changes (tests/cases/averaging.py's exact values and updates)."""
import torch

from cases import averaging as A
from helpers import benchmark_module
from resist_mpi.comm.thread import run_ranks

block_outer = benchmark_module("block_outer")

LR, MU, ROUNDS = 0.5, 0.5, 3


def _rank(c, model):
    job = block_outer.travelling_resist(LR, MU)(model, c, seed=3)
    seen = []
    for r in range(ROUNDS):
        job.begin_round()
        start = {b: [p.detach().clone() for p in job.blocks[b].parameters()] for b in job.mine()}
        A.local_steps(c, job, r)
        trained = {b: [p.detach().clone() for p in job.blocks[b].parameters()] for b in job.mine()}
        job.end_round()
        after = {b: [p.detach().clone() for p in job.blocks[b].parameters()] for b in job.mine()}
        seen.append((job.assignment, start, trained, after, [[m.clone() for m in ms] for ms in job._momentum],
                     job.momentum_bytes))
    return seen


def test_each_block_steps_with_the_momentum_its_last_trainer_left():
    torch.set_num_threads(1)
    models = [A.make_model() for _ in range(2)]
    got = run_ranks(2, lambda c: _rank(c, models[c.rank]))
    blocks = block_outer_blocks(A.make_model())
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    momentum = [[torch.zeros_like(p) for p in b.parameters()] for b in blocks]  # as it would travel
    trainer, travelled = {}, 0
    for r in range(ROUNDS):
        assignment = got[0][r][0]
        assert got[1][r][0] == assignment and sorted(sum(map(list, assignment), [])) == list(range(len(sizes)))
        for g, blocks in enumerate(assignment):
            _, start, trained, after, _, _ = got[g][r]
            for b in blocks:
                travelled += 4 * sizes[b] if trainer.get(b, g) != g else 0
                trainer[b] = g
                grads = [s - t for s, t in zip(start[b], trained[b])]
                assert any(bool(x.abs().sum() > 0) for x in grads)  # it trained
                m = momentum[b] = [MU * m_ + g_ for g_, m_ in zip(grads, momentum[b])]
                for s, g_, m_, a in zip(start[b], grads, m, after[b]):
                    assert torch.equal(a, s - LR * (g_ + MU * m_)), (r, b)
        for rank in range(2):  # every rank holds every block's momentum, as its next trainer would
            for b, m in enumerate(momentum):
                for want, held in zip(m, got[rank][r][4][b]):
                    assert torch.equal(held, want), (r, rank, b)
            assert got[rank][r][5] == travelled, (r, rank)
    assert travelled > 0  # blocks changed hands, and their momenta were counted


def block_outer_blocks(model):
    from resist_mpi.blocks.find import find_blocks
    return [m for _, m in find_blocks(model, "auto", None)]
