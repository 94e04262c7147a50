"""--overlap and --outer-optimizer to the bit on 2 and 4 thread ranks (tests/cases/averaging.py)."""
import itertools

import pytest
import torch

import resist_mpi as rm
from cases import averaging as A
from resist_mpi.comm.thread import run_ranks

MODES = [dict(overlap=o, outer=out) for o, out in itertools.product((False, True), (None, (0.5, 0.5)))]
IDS = ["plain", "outer", "overlap", "overlap+outer"]


def on_ranks(size, **kw):
    models = [A.make_model() for _ in range(size)]
    torch.set_num_threads(1)
    return run_ranks(size, lambda c: A.run(c, models[c.rank], **kw))


def check(size, **kw):
    got = on_ranks(size, **kw)
    want = A.reference(size, **{k: v for k, v in kw.items() if k in ("strategy", "overlap", "outer", "wire",
                                                                        "group_size", "flush_at", "settle")})
    for r, per_rank in enumerate(want):
        for rank in range(size):
            assert torch.equal(got[rank][0][r], per_rank[rank]), (r, rank)
    return got


@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("wire", ["float32", "int8", "bfloat16"])
@pytest.mark.parametrize("size, group_size", [(2, 1), (4, 1), (4, 2)], ids=["S2", "S4", "S4-G2"])
@pytest.mark.parametrize("strategy", ["local_sgd", "resist"])
def test_rounds_equal_the_single_process_computation(strategy, size, group_size, wire, mode):
    got = check(size, strategy=strategy, wire=wire, group_size=group_size, **mode)
    if mode["overlap"]:  # the delay is real: after round 0 the ranks differ, after the flush they agree
        assert not torch.equal(got[0][0][0], got[-1][0][0])  # ranks of two groups
    assert all(torch.equal(g[0][-1], got[0][0][-1]) for g in got)
    if strategy == "resist":  # blocks move and average as without overlap or outer step
        plain = on_ranks(size, strategy=strategy, wire=wire, group_size=group_size)
        block_keys = [k for k in got[0][1] if k.startswith("stages.2.") and not k.startswith("stages.2.0.")]
        assert block_keys and all(torch.equal(got[0][1][k], plain[0][1][k]) for k in block_keys)


@pytest.mark.parametrize("mode", MODES[2:], ids=IDS[2:])  # (without overlap nothing is pending: a flush does nothing)
@pytest.mark.parametrize("step", [0, 1], ids=["before-its-steps", "after-a-step"])
@pytest.mark.parametrize("strategy, size, group_size, wire", [
    ("local_sgd", 2, 1, "float32"), ("resist", 2, 1, "int8"), ("local_sgd", 4, 2, "bfloat16"),
    ("resist", 4, 2, "float32")], ids=["local_sgd-S2", "resist-S2-int8", "local_sgd-S4-G2-bf16", "resist-S4-G2"])
def test_a_flush_inside_a_round_counts_the_rounds_update_from_the_flushed_values(strategy, size, group_size,
                                                                                  wire, mode, step):
    """An evaluation or a checkpoint in the `with job:` form, once the next round has begun,
    flushes the overlapped average inside that round: its update counted from the round's start
    before, so it held mean - own of the round before, and each rank went back to its own values
    of that round for a round (0.04 apart on the library's model)."""
    got = check(size, strategy=strategy, wire=wire, group_size=group_size, flush_at=(1, step), **mode)
    assert all(torch.equal(g[0][-1], got[0][0][-1]) for g in got)


@pytest.mark.parametrize("mode", MODES[2:], ids=IDS[2:])
@pytest.mark.parametrize("strategy, size, group_size, wire", [
    ("local_sgd", 2, 1, "float32"), ("resist", 2, 1, "int8"), ("local_sgd", 4, 2, "bfloat16"),
    ("resist", 4, 2, "float32")], ids=["local_sgd-S2", "resist-S2-int8", "local_sgd-S4-G2-bf16", "resist-S4-G2"])
def test_an_average_landing_after_some_steps_equals_the_single_process_computation(strategy, size, group_size,
                                                                                   wire, mode):
    """overlap_steps=1 of 2: last round's average lands after the first step of each round (the
    optimizer's step hook), those steps kept: the values after every step, every rank, to the bit."""
    kw = dict(strategy=strategy, wire=wire, group_size=group_size, **mode)
    seen = [[] for _ in range(size)]
    models = [A.make_model() for _ in range(size)]
    got = run_ranks(size, lambda c: A.run(c, models[c.rank], settle=1, seen=seen[c.rank], **kw))
    want_seen, late_seen = [], []
    want = A.reference(size, settle=1, seen=want_seen, **kw)
    A.reference(size, seen=late_seen, **kw)
    for r, per_rank in enumerate(want):
        assert all(torch.equal(got[rank][0][r], per_rank[rank]) for rank in range(size)), r
    assert len(want_seen) == A.ROUNDS * A.STEPS
    for k, per_rank in enumerate(want_seen):
        assert all(torch.equal(seen[rank][k], per_rank[rank]) for rank in range(size)), k
    # round 0 had nothing in flight; in round 1 round 0's average is in the values after its first step
    assert all(torch.equal(seen[0][k], late_seen[k][0]) for k in range(A.STEPS))
    assert not torch.equal(seen[0][A.STEPS], late_seen[A.STEPS][0])
    assert all(torch.equal(g[0][-1], got[0][0][-1]) for g in got)


def test_overlap_steps_is_refused_where_it_cannot_count_or_has_nothing_to_land():
    model = A.make_model()
    c = rm.init("self", device="cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kw in (dict(overlap=False, optimizer=opt), dict(overlap=True), dict(overlap=True, optimizer=opt, local_steps=1),
               dict(overlap=True, optimizer=opt, local_steps=4, overlap_steps_=4),
               dict(overlap=True, optimizer=opt, overlap_steps_=0)):
        k = kw.pop("overlap_steps_", 1)
        with pytest.raises(ValueError, match=f"overlap_steps={k}: needs overlap=True and optimizer="):
            rm.LocalSGD(model, c, overlap_steps=k, **kw)
    assert rm.ResIST(model, c, overlap=True, optimizer=opt, local_steps=4, overlap_steps=3).overlap_steps == 3


def test_diloco_settings_equal_the_single_process_computation():
    """DiLoCo's outer lr 0.7 and momentum 0.9 (thread ranks add in rank order, as the reference)."""
    check(4, strategy="local_sgd", outer=(0.7, 0.9))
    check(4, strategy="local_sgd", outer=(0.7, 0.9), overlap=True, wire="int8")


@pytest.mark.parametrize("mode", MODES[1:], ids=IDS[1:])
def test_state_dict_and_load_continue_bit_for_bit(mode):
    for wire in ("float32", "int8"):
        a = on_ranks(2, strategy="resist", wire=wire, checkpoint_at=1, **mode)
        b = on_ranks(2, strategy="resist", wire=wire, checkpoint_at=1, resume=True, **mode)
        for x, y in zip(a, b):
            assert all(torch.equal(u, v) for u, v in zip(x[0], y[0]))
            assert x[1].keys() == y[1].keys() and all(torch.equal(x[1][k], y[1][k]) for k in x[1])


@pytest.mark.parametrize("mode", MODES[2:], ids=IDS[2:])
def test_state_dict_and_load_continue_bit_for_bit_with_an_average_landing_inside_rounds(mode):
    a = on_ranks(4, strategy="resist", wire="int8", group_size=2, checkpoint_at=1, settle=1, **mode)
    b = on_ranks(4, strategy="resist", wire="int8", group_size=2, checkpoint_at=1, resume=True, settle=1, **mode)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x[0], y[0]))
        assert x[1].keys() == y[1].keys() and all(torch.equal(x[1][k], y[1][k]) for k in x[1])


def test_overlap_on_one_rank_changes_nothing():
    plain = on_ranks(1, strategy="local_sgd")
    for mode in MODES[2:3]:
        got = on_ranks(1, strategy="local_sgd", **mode)
        assert all(torch.equal(u, v) for u, v in zip(plain[0][0], got[0][0]))


def test_an_overlapped_average_starts_after_the_next_rounds_block_exchange(monkeypatch):
    """--overlap: round r's average starts when round r+1 starts, after ResIST's block exchange (which
    would otherwise share the link with it), and the final flush starts the last one."""
    import threading
    from resist_mpi.comm.base import Comm
    events, lock = [], threading.Lock()
    real_exchange, real_start = Comm.alltoallv_tensors, Comm.start_allreduce_mean_

    def exchange(self, *args, **kwargs):
        with lock:
            events.append((self.rank, "exchange"))
        return real_exchange(self, *args, **kwargs)

    def start(self, t):
        with lock:
            events.append((self.rank, "average"))
        return real_start(self, t)

    monkeypatch.setattr(Comm, "alltoallv_tensors", exchange)
    monkeypatch.setattr(Comm, "start_allreduce_mean_", start)
    on_ranks(2, strategy="resist", overlap=True)
    for rank in (0, 1):
        mine = [what for r, what in events if r == rank]
        assert mine[:2 * A.ROUNDS] == ["exchange"] + ["exchange", "average"] * (A.ROUNDS - 1) + ["average"], mine
