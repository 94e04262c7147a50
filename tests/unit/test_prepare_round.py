"""prepare_round() before an evaluation (the trainer's order): the next round's exchange first, the
gather of the rest, every rank left holding its next round's blocks. On 2 and 4 thread ranks: the
evaluation sees the same full model, training goes on bit for bit as with no evaluation at all
(under every optimizer-state policy, and so it does without prepare_round()), the next round's
start moves nothing, and with blocks several ranks trained or not, the evaluation and the next
round together move fewer bytes than before."""
import pytest
import torch

from cases import library as L
from resist_mpi.comm.thread import run_ranks


def _run(size, **kw):
    models = [L.make_model() for _ in range(size)]  # built here: torch's global RNG is shared by threads
    torch.set_num_threads(1)
    return run_ranks(size, lambda c: L.train_with_evaluations(c, models[c.rank], **kw))


def _momenta_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("size, kw", [(2, {}), (4, {}), (4, dict(min_depth=2)), (4, dict(group_size=2))],
                         ids=["2", "4", "4-shared-blocks", "4-groups"])
@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_evaluation_after_prepare_round_changes_nothing_in_training(size, kw, policy):
    plain = _run(size, prepare=False, evaluate=False, optimizer_state=policy, **kw)
    old = _run(size, prepare=False, optimizer_state=policy, **kw)
    new = _run(size, prepare=True, optimizer_state=policy, **kw)
    for r in range(size):
        # training: what a run without evaluations trains, weights and momentum, to the bit, with
        # prepare_round() or without (the gather then averages the copies several ranks trained,
        # whose kept momentum the next round's exchange would have dropped)
        for run in (new, old):
            assert L.states_equal(run[r][1], plain[r][1]) and _momenta_equal(run[r][4], plain[r][4])
        # the round after an evaluation begins with every block in place: nothing moves
        assert all(b == (0, 0) for b in new[r][2][1:])
        assert len(new[r][3]) == L.ROUNDS - 1
    for r in range(size):  # every rank evaluates the same full model
        assert all(L.states_equal(x, y) for x, y in zip(new[r][0], new[0][0]))
    if policy == "reset":  # the evaluations themselves see what they saw before
        for r in range(size):
            assert all(L.states_equal(x, y) for x, y in zip(new[r][0], old[r][0]))
    # bytes: what an evaluation and the round after it move together is less than before (when
    # that round's exchange moved anything), and on no rank more
    before = [sum(e[0] + e[1] for e in old[r][3]) + sum(b[0] + b[1] for b in old[r][2][1:]) for r in range(size)]
    after = [sum(e[0] + e[1] for e in new[r][3]) + sum(b[0] + b[1] for b in new[r][2][1:]) for r in range(size)]
    assert sum(b[0] for r in range(size) for b in old[r][2][1:]) > 0
    assert sum(after) < sum(before) and max(after) <= max(before)
