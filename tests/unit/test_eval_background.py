"""Evaluation in the background (Strategy.evaluation_copy, --eval-background): the copy, completed
on the background thread while the next round trains, is the full model full_model() gives, to the
bit (state, outputs, recalibrated test loss and accuracy), and training goes on exactly as without
it: the same weights, momentum and bytes per round on the training communicator. On 2 and 4 thread
ranks, with blocks several ranks trained (divergent copies averaged by the gather), with groups,
for local SGD and across a warm-up's switch to ResIST."""
import pytest
import torch

from cases import library as L
from resist_mpi.comm.thread import run_ranks


def _run(size, **kw):
    models = [L.make_model() for _ in range(size)]  # built here: torch's global RNG is shared by threads
    torch.set_num_threads(1)
    return run_ranks(size, lambda c: L.train_with_background_evaluations(c, models[c.rank], **kw))


def _looks_equal(a, b):
    (sa, oa, ma), (sb, ob, mb) = a, b
    return L.states_equal(sa, sb) and torch.equal(oa, ob) and ma == mb


@pytest.mark.parametrize("size, kw", [(2, {}), (4, {}), (4, dict(min_depth=2)), (4, dict(group_size=2)),
                                      (2, dict(strategy="local_sgd")), (2, dict(strategy="warmup"))],
                         ids=["2", "4", "4-shared-blocks", "4-groups", "local_sgd-2", "warmup-2"])
def test_background_evaluation_sees_the_full_model_and_changes_nothing(size, kw):
    sync = _run(size, background=False, **kw)
    bg = _run(size, background=True, **kw)
    for r in range(size):
        assert len(bg[r][0]) == len(sync[r][0]) == L.ROUNDS - 1
        assert all(_looks_equal(x, y) for x, y in zip(bg[r][0], sync[r][0]))
        assert all(_looks_equal(x, y) for x, y in zip(bg[r][0], bg[0][0]))  # every rank the same result
        assert L.states_equal(bg[r][1], sync[r][1])
        assert bg[r][3].keys() == sync[r][3].keys() and all(torch.equal(bg[r][3][n], sync[r][3][n]) for n in bg[r][3])
    # the gather went over background communicators: the training communicator moved what a run
    # without evaluations moves, round by round
    plain = _run(size, background=None, **kw)
    assert [x[2] for x in bg] == [x[2] for x in plain]


def test_with_groups_on_a_backend_that_dups_only_the_world_the_evaluation_splits_a_copy_of_it(monkeypatch):
    """The torch backend dups only the world (every rank creates every process group): the copy's
    gather dup()ed the groups' communicators and raised at the first evaluation of a run with
    --group-size over several nodes (or with --overlap). Here the thread world refuses the same."""
    from resist_mpi.comm.thread import ThreadComm
    dup = ThreadComm._dup

    def world_only(self):
        if self.size != 4:
            raise ValueError("the torch backend duplicates only the world communicator")
        return dup(self)
    monkeypatch.setattr(ThreadComm, "_dup", world_only)
    monkeypatch.setattr(ThreadComm, "dups_subcommunicators", False)
    bg = _run(4, background=True, group_size=2)
    monkeypatch.undo()
    sync = _run(4, background=False, group_size=2)
    for r in range(4):
        assert all(_looks_equal(x, y) for x, y in zip(bg[r][0], sync[r][0])) and len(bg[r][0]) == L.ROUNDS - 1
        assert L.states_equal(bg[r][1], sync[r][1])


def test_the_copy_is_the_ranks_own():
    """Training after evaluation_copy() does not change the copy, and the copy's completion does
    not touch the training model: its released blocks stay released."""
    def body(c, model):
        opt = torch.optim.SGD(model.parameters(), lr=L.LR)
        job = L._strategy("resist", model, c, optimizer=opt)
        job.begin_round()
        L.step(model, opt, c, 0)
        job.end_round()
        held = [job.store.holds(b) for b in range(len(job.blocks))]
        copy = job.evaluation_copy()
        before = {k: v.clone() for k, v in copy.model.state_dict().items()}
        job.begin_round()
        L.step(model, opt, c, 1)
        job.end_round()
        after_training = {k: v.clone() for k, v in copy.model.state_dict().items()}
        held_now = [job.store.holds(b) for b in range(len(job.blocks))]
        counted = c.counters()
        copy.complete()
        unchanged = c.counters() == counted
        copy.count_into(c)
        moved = tuple(x - y for x, y in zip(c.counters(), counted))
        return before, after_training, held, held_now, [job.store.holds(b) for b in range(len(job.blocks))], \
            (unchanged, moved)
    models = [L.make_model() for _ in range(2)]
    out = run_ranks(2, lambda c: body(c, models[c.rank]))
    for before, after_training, held, held_now, held_after, moved in out:
        assert L.states_equal(before, after_training)
        assert not all(held) and held_after == held_now  # the copy's gather leaves the training store alone
        unchanged, moved = moved
        assert unchanged and moved[0] > 0 and moved[1] > 0  # its bytes were counted on its own communicators


def _delayed(size, how, **kw):
    models = [L.make_model() for _ in range(size)]
    torch.set_num_threads(1)
    return run_ranks(size, lambda c: L.train_with_a_delayed_evaluation(c, models[c.rank], how, **kw))


@pytest.mark.parametrize("size, kw", [
    (2, {}), (4, dict(group_size=2)), (2, dict(strategy="local_sgd", wire_dtype="int8")),
    (2, dict(strategy="local_sgd", outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True))),
    (2, dict(strategy="warmup"))], ids=["resist-2", "resist-4-groups", "local_sgd-int8", "diloco", "warmup"])
def test_an_evaluation_under_overlap_waits_for_the_average_in_a_copy_and_changes_nothing(size, kw):
    """--overlap: evaluation_copy(flush=False) is not ready until round 0's average lands (round 1's
    end), then it is the model full_model() gave right after round 0 (which applied the average
    early), to the bit; and training goes on exactly as without an evaluation, where the early
    application changes the rest of the run."""
    flushed = _delayed(size, "flush", **kw)
    delayed = _delayed(size, "delayed", **kw)
    plain = _delayed(size, None, **kw)
    for r in range(size):
        assert delayed[r][1] == [False, "refused", True]
        assert _looks_equal(delayed[r][0], flushed[r][0])
        assert _looks_equal(delayed[r][0], delayed[0][0])  # every rank the same result
        assert L.states_equal(delayed[r][2], plain[r][2])
        if kw.get("strategy") != "warmup":  # (whose switch at round 1's start applies it anyway)
            assert not L.states_equal(flushed[r][2], plain[r][2])  # applying it early changes training
    assert [x[3] for x in delayed] == [x[3] for x in plain]  # nothing more on the training communicator
