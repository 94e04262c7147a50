import numpy as np
import pytest

from resist_mpi.plan.partition import PartitionError, check_partition, draw_assignment, eval_residual_scale, round_rng
from resist_mpi.plan.routing import needers_from_assignment


@pytest.mark.parametrize("P,S", [(22, 2), (22, 4), (22, 8), (22, 22), (5, 3), (35, 16), (49, 16)])
def test_balanced_cover_without_overlap(P, S):
    for seed in range(20):
        a = draw_assignment(P, S, 0, np.random.default_rng(seed))
        sizes = [len(x) for x in a]
        assert max(sizes) - min(sizes) <= 1
        assert sorted(b for x in a for b in x) == list(range(P))  # each block exactly once
        assert all(list(x) == sorted(x) for x in a)


@pytest.mark.parametrize("P,S,m", [(22, 8, 4), (22, 16, 2), (5, 4, 3), (22, 4, 6), (3, 4, 1)])
def test_min_depth_overlap_only_when_needed(P, S, m):
    for seed in range(20):
        a = draw_assignment(P, S, m, np.random.default_rng(seed))
        sizes = [len(x) for x in a]
        assert min(sizes) >= m
        assert max(sizes) - min(sizes) <= 1
        assert all(len(set(x)) == len(x) for x in a)  # no block twice on a rank
        owners = needers_from_assignment(a, P)
        assert all(owners)  # every block trained by someone
        copies = sum(sizes)
        assert copies == max(P, sum(max(m, len(range(k, P, S))) for k in range(S)))
        # overlap spread evenly: no block has more than one copy more than another
        counts = [len(o) for o in owners]
        assert max(counts) - min(counts) <= 1


def test_no_overlap_when_min_depth_is_satisfied():
    a = draw_assignment(22, 4, 5, np.random.default_rng(0))  # 22/4 -> 6,6,5,5 >= 5
    assert sorted(b for x in a for b in x) == list(range(22))


def test_reproducible_by_seed_and_round():
    a = draw_assignment(22, 4, 0, round_rng(7, 3))
    b = draw_assignment(22, 4, 0, round_rng(7, 3))
    c = draw_assignment(22, 4, 0, round_rng(7, 4))
    assert a == b and a != c


def test_draws_vary_over_rounds():
    draws = {draw_assignment(22, 4, 0, round_rng(0, r)) for r in range(50)}
    assert len(draws) == 50


@pytest.mark.parametrize("P,S,m,msg", [(22, 4, 23, "exceeds"), (1, 4, 0, "only 1 partitionable"),
                                       (22, 0, 0, "at least 1"), (0, 2, 0, "no partitionable"),
                                       (22, 4, -1, ">= 0")])
def test_impossible_requests(P, S, m, msg):
    with pytest.raises(PartitionError, match=msg):
        check_partition(P, S, m)
    with pytest.raises(PartitionError):
        draw_assignment(P, S, m, np.random.default_rng(0))


def test_eval_scale():
    assert eval_residual_scale(22, 4) == 0.25
    assert eval_residual_scale(22, 8, 4) == pytest.approx(4 / 22)
    assert eval_residual_scale(22, 2, 4) == 0.5
    assert eval_residual_scale(22, 1) == 1.0


def test_a_negative_seed_draws_like_its_64_bit_twin_and_a_resist_run_takes_it():
    """numpy's generators refuse negative seeds, which --seed accepts (torch's takes them): rank 0
    crashed drawing the first round's assignment while the other ranks waited for its broadcast."""
    import torch
    import resist_mpi as rm
    from cases import library as L
    from resist_mpi.comm.thread import run_ranks
    assert draw_assignment(22, 4, 0, round_rng(-1, 3)) == draw_assignment(22, 4, 0, round_rng(2 ** 64 - 1, 3))

    def body(c, model):
        job = rm.ResIST(model, c, seed=-1)
        for _ in job.rounds(2):
            pass
        return job.assignment
    models = [L.make_model() for _ in range(2)]
    torch.set_num_threads(1)
    a, b = run_ranks(2, lambda c: body(c, models[c.rank]))
    assert a == b and a is not None
