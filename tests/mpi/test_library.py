"""The library on the user's own optimizer on real ranks (RESIST_TEST_BACKEND: mpi, torch, horovod),
the bodies of tests/cases/library.py, which tests/unit/test_library.py runs on thread ranks.

    mpirun -np 4 python -m pytest tests/mpi/test_library.py
"""
import os

import pytest
import torch

from cases import library as L
from resist_mpi import UsageError
from resist_mpi import comm as C

BACKEND = os.environ.get("RESIST_TEST_BACKEND", "mpi")


@pytest.fixture(scope="module")
def c():
    torch.set_num_threads(1)
    return C.init(BACKEND, fail_fast=False, device="cpu")


def _same_everywhere(c, state):
    flat = torch.cat([v.reshape(-1).float() for k, v in sorted(state.items()) if v.is_floating_point()])
    other = flat.clone()
    c.bcast_(other, root=0)
    return torch.equal(flat, other)


@pytest.mark.parametrize("strategy", ["resist", "local_sgd"])
def test_one_optimizer_built_before_the_loop_equals_a_fresh_one_per_round(c, strategy):
    per_round = L.train_per_round_optimizer(c, L.make_model(), strategy)
    state, lrs, trained = L.train_one_optimizer_hooks(c, L.make_model(), strategy)
    rounds = L.train_one_optimizer_rounds(c, L.make_model(), strategy)
    assert L.states_equal(state, per_round) and L.states_equal(rounds, per_round)
    assert lrs == L.single_process_lrs() and len(trained) == L.ROUNDS and all(trained)
    assert _same_everywhere(c, per_round)
    if strategy == "resist":
        assert L.blocks_all_changed(c, L.make_model(), per_round)


def test_data_parallel_hooks_and_rounds_agree(c):
    state, lrs, _ = L.train_one_optimizer_hooks(c, L.make_model(), "data_parallel")
    assert L.states_equal(state, L.train_one_optimizer_rounds(c, L.make_model(), "data_parallel"))


@pytest.mark.parametrize("strategy", ["resist", "data_parallel"])
def test_a_loss_scaler_skips_the_overflowing_steps_and_rounds_stay_aligned(c, strategy):
    """As on thread ranks (tests/unit/test_library.py): the hook form with a GradScaler whose
    overflows differ between ranks trains what the loop without a scaler trains when the
    overflowing iterations take no step, on real ranks of each backend."""
    reference = L.train_with_scaler(c, L.make_model(), strategy, "reference")[0]
    state, round_, _, scale = L.train_with_scaler(c, L.make_model(), strategy, "hooks")
    assert L.states_equal(state, reference) and round_ == L.ROUNDS
    overflowed = sum(any(L.overflows(r, k) for r in L.step_peers(c.rank, c.size, strategy))
                     for k in range(L.ROUNDS * L.STEPS))
    assert scale == L.SCALE / 2 ** overflowed


@pytest.mark.parametrize("case, message", [
    ("foreign", "not parameters of the model"),
    ("missing", r"does not hold \d+ trainable parameter"),
    ("parameters_first", "before the first round"),
    ("full_model_mid_round", r"full_model\(\) in the middle of round 0"),
])
def test_misuse_is_one_clear_error_on_every_rank(c, case, message):
    with pytest.raises(UsageError, match=message):
        L.misuse(c, L.make_model(), case)


@pytest.mark.parametrize("how", ["break", "exception"])
def test_leaving_the_rounds_early_leaves_every_rank_consistent(c, how):
    flat, r = L.leave_early(c, L.make_model(), how)
    other = flat.clone()
    c.bcast_(other, root=0)
    assert torch.equal(flat, other) and r == 2


@pytest.mark.parametrize("kw", [dict(optimizer_state="keep"), dict(optimizer_state="keep", min_depth=2)],
                         ids=["keep", "keep-shared-blocks"])
def test_prepare_round_before_evaluations_trains_as_without_them(c, kw):
    """tests/unit/test_prepare_round.py on real ranks: training (weights, momentum) is a run's without
    evaluations to the bit, the round after an evaluation moves nothing, every rank sees one model."""
    plain = L.train_with_evaluations(c, L.make_model(), prepare=False, evaluate=False, **kw)
    new = L.train_with_evaluations(c, L.make_model(), prepare=True, **kw)
    assert L.states_equal(new[1], plain[1])
    assert new[4].keys() == plain[4].keys() and all(torch.equal(new[4][k], plain[4][k]) for k in new[4])
    assert all(b == (0, 0) for b in new[2][1:])
    assert all(_same_everywhere(c, seen) for seen in new[0])


@pytest.mark.parametrize("kw", [{}, dict(min_depth=2), dict(strategy="local_sgd")],
                         ids=["resist", "shared-blocks", "local_sgd"])
def test_background_evaluation_sees_the_full_model_on_real_ranks(c, kw):
    """tests/unit/test_eval_background.py on real ranks and backends (collectives of the background
    thread on background communicators while the training thread runs its own): every evaluation
    equals the synchronous one to the bit, training and its bytes a run's without evaluations."""
    sync = L.train_with_background_evaluations(c, L.make_model(), background=False, **kw)
    bg = L.train_with_background_evaluations(c, L.make_model(), background=True, **kw)
    plain = L.train_with_background_evaluations(c, L.make_model(), background=None, **kw)
    assert len(bg[0]) == len(sync[0]) == L.ROUNDS - 1
    for (sa, oa, ma), (sb, ob, mb) in zip(bg[0], sync[0]):
        assert L.states_equal(sa, sb) and torch.equal(oa, ob) and ma == mb
        assert _same_everywhere(c, sa)
    assert L.states_equal(bg[1], sync[1]) and L.states_equal(bg[1], plain[1])
    assert bg[2] == plain[2]


@pytest.mark.parametrize("kw", [{}, dict(strategy="local_sgd", wire_dtype="int8")], ids=["resist", "local_sgd-int8"])
def test_a_delayed_evaluation_under_overlap_on_real_ranks(c, kw):
    """tests/unit/test_eval_background.py's delayed evaluation on real ranks and backends (the
    average landing in the copy while the background thread has the copy's own collectives): the
    copy is the model full_model() gave right after round 0, to the bit, and training and its bytes
    are a run's without the evaluation."""
    flushed = L.train_with_a_delayed_evaluation(c, L.make_model(), "flush", **kw)
    delayed = L.train_with_a_delayed_evaluation(c, L.make_model(), "delayed", **kw)
    plain = L.train_with_a_delayed_evaluation(c, L.make_model(), None, **kw)
    assert delayed[1] == [False, "refused", True]
    (sa, oa, ma), (sb, ob, mb) = delayed[0], flushed[0]
    assert L.states_equal(sa, sb) and torch.equal(oa, ob) and ma == mb and _same_everywhere(c, sa)
    assert L.states_equal(delayed[2], plain[2]) and not L.states_equal(flushed[2], plain[2])
    assert delayed[3] == plain[3]
