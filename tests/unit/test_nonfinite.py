"""A diverging run stops: non-finite values are refused, agreed on by every rank, never averaged
away, never checkpointed; metrics.jsonl stays strict JSON. Ranks are threads of one process."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import resist_mpi as rm
from cases import library as L
from resist_mpi.averaging.gradients import GradientAverager
from resist_mpi.comm.thread import run_ranks
from resist_mpi.averaging.compression import Codec, ErrorFeedback
from resist_mpi.averaging.tensors import all_finite


def test_all_finite_decides_exactly_also_when_the_sum_overflows():
    x = torch.linspace(-1, 1, 100_003)
    assert all_finite(x) and all_finite(x.double()) and all_finite(x.half()) and all_finite(x.bfloat16())
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            y = x.to(dtype)
            y[77_777] = bad
            assert not all_finite(y), (bad, dtype)
    # finite values whose sum is not: the element-wise test decides
    assert all_finite(torch.full((4,), 3e38))
    assert all_finite(torch.full((4,), 6e4, dtype=torch.float16).repeat(10_000))
    assert all_finite(torch.tensor([3e38, 3e38, -3e38]))
    big = torch.full((4,), 3e38)
    big[2] = float("inf")
    assert not all_finite(big)
    both = torch.tensor([float("inf"), float("-inf")])  # their sum is NaN, each is not finite
    assert not all_finite(both)
    # nothing to test: integers, empty, meta
    assert all_finite(torch.arange(5)) and all_finite(torch.empty(0))
    assert all_finite(torch.empty(10, device="meta"))


def test_the_codec_refuses_non_finite_values():
    for wire in ("float16", "bfloat16", "int8"):
        with pytest.raises(rm.NonFiniteError, match=wire):
            Codec(wire).encode(torch.tensor([1.0, float("nan"), 2.0]))


@pytest.mark.parametrize("wire", ["float16", "bfloat16", "int8"])
def test_a_non_finite_update_on_one_rank_stops_every_rank_before_anything_is_lost(wire):
    """int8 used to turn a NaN chunk into zeros (its scale fell back to 1): the model stayed finite,
    the rank's error-feedback residual kept the NaN and its updates to the chunk were lost."""
    def body(c):
        fb = ErrorFeedback(c, wire)
        x = torch.linspace(-1, 1, 10_000)
        fb.mark(x)
        x += 1e-3 * (c.rank + 1)
        fb.average(x)  # a good round leaves a residual
        residual = fb.residual.clone()
        fb.mark(x)
        x += 1e-3
        if c.rank == 1:
            x[5000] = float("nan")
        try:
            fb.average(x)
        except rm.NonFiniteError as e:
            return "raised", torch.equal(fb.residual, residual), str(e)
        return "passed", None, None
    for raised, kept, msg in run_ranks(2, body):
        assert raised == "raised" and kept and "not finite" in msg


@pytest.mark.parametrize("wire", ["int8", "bfloat16"])
@pytest.mark.parametrize("mode", ["plain", "overlap", "outer"])
def test_a_non_finite_update_in_one_group_members_slice_stops_every_rank(wire, mode):
    """With groups each member averages its own slice across the groups: the members whose slice
    held the NaN raised before the group's gather, and the others waited in it for good."""
    kw = dict(group_size=2, wire_dtype=wire)
    if mode == "overlap":
        kw["overlap"] = True
    if mode == "outer":
        kw["outer_optimizer"] = lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)

    def body(c, model):
        job = rm.LocalSGD(model, c, **kw)
        try:
            for r in range(3):
                job.begin_round()
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.01 * (c.rank + 1))
                    if r == 0 and c.rank == 1:
                        model[0].weight.view(-1)[0] = float("nan")  # in the first slice: the first members' (ranks 0, 2)
                job.end_round()
            job.flush()
        except rm.NonFiniteError as e:
            return str(e)
        return "finished"

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    models = [make() for _ in range(4)]
    out = run_ranks(4, lambda c: body(c, models[c.rank]), timeout=60)
    assert all("not finite" in m for m in out), out


@pytest.mark.parametrize("kw", [{}, dict(overlap=True), dict(overlap=True, overlap_steps=1)],
                         ids=["plain", "overlap", "overlap-steps"])
def test_a_diverging_round_raises_on_every_rank_and_the_loop_does_not_average_it_again(kw):
    """(--overlap: the average lands a round later, at the round's end or, with overlap_steps, in
    the optimizer's step, from which it raises.)"""
    def body(c, model):
        opt = torch.optim.SGD(model.parameters(), lr=1e6, momentum=0.9)
        try:
            with rm.ResIST(model, c, optimizer=opt, local_steps=2, seed=7, **kw):
                for k in range(20):
                    L.step(model, opt, c, k)
        except rm.NonFiniteError as e:
            return str(e)
        return None
    models = [L.make_model() for _ in range(2)]
    out = run_ranks(2, lambda c: body(c, models[c.rank]))
    assert all(m and "not finite" in m for m in out), out


def test_gradient_average_not_finite_raises_from_backward_on_every_rank():
    def body(c):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.ones(3))
        GradientAverager(c, [w])
        scale = float("inf") if c.rank == 0 else 1.0
        try:
            (w * scale).sum().backward()
        except rm.NonFiniteError:
            return True
        return False
    assert run_ranks(2, body) == [True, True]


def test_gradient_averager_recovers_after_a_backward_that_raised():
    """The averager queued its callback on the first gradient of a backward and waited for the
    callback to clear the flag: a backward that raised in between left it set for ever, and the
    group silently stopped averaging."""
    def body(c):
        w = torch.nn.Parameter(torch.ones(2))
        v = torch.nn.Parameter(torch.ones(2))
        GradientAverager(c, [w, v])
        boom = {"on": True}

        def hook(grad):
            if boom["on"]:
                raise RuntimeError("a failing backward")
            return grad
        z = v * 2.0  # built first: autograd runs the later-built w branch first, then z's failing hook
        z.register_hook(hook)
        y = w * (c.rank + 1.0)
        try:
            (z.sum() + y.sum()).backward()  # w's gradient arrives first, then z's hook raises
        except RuntimeError:
            pass
        boom["on"] = False
        w.grad = v.grad = None
        (w * (c.rank + 1.0)).sum().backward()
        return w.grad.tolist()
    assert run_ranks(2, body) == [[1.5, 1.5], [1.5, 1.5]]  # the average of 1 and 2


def DILOCO(params):  # DiLoCo's outer step
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


@pytest.mark.parametrize("strategy, size, group_size, overlap, poison, kw", [
    ("data_parallel", 2, None, False, "all", {}), ("data_parallel", 4, None, False, "all", {}),
    ("local_sgd", 2, 2, False, "all", {}), ("local_sgd", 4, 2, False, "all", {}), ("resist", 4, 2, False, "all", {}),
    ("local_sgd", 2, None, False, "all", {}), ("resist", 2, None, False, "all", {}), ("warmup", 4, 2, False, "all", {}),
    ("local_sgd", 4, 2, True, "all", {}), ("resist", 4, 2, True, "all", {}),
    ("local_sgd", 4, None, False, "all", {"optimizer_state": "keep"}),
    ("local_sgd", 4, 2, False, "one", {}), ("resist", 4, 2, False, "one", {}), ("warmup", 4, 2, False, "one", {}),
    ("local_sgd", 4, 2, True, "one", {}), ("resist", 4, 2, True, "one", {}),
    ("resist", 4, 2, False, "one", {"wire_dtype": "int8"}), ("resist", 4, 2, True, "one", {"wire_dtype": "int8"}),
    ("local_sgd", 4, 2, False, "one", {"outer_optimizer": DILOCO})])
def test_after_a_non_finite_average_the_last_good_state_reloads_and_training_goes_on(strategy, size, group_size,
                                                                                      overlap, poison, kw):
    """A per-step average (data-parallel; inside each group) that is not finite raises from
    backward() in the middle of a round: `with job:` left that round open, and load_state_dict()
    refused ("in the middle of a round"). Reloaded, the job trains what a job that never met the
    NaN trains, bit for bit; as it did already after a round's average that was not finite (no
    per-step average: the NaN gradient is stepped, the round's end raises). A Warmup (local SGD,
    then ResIST from round 1) closed only its own round, not its strategy's: its last good state
    is taken after the switch (the warm-up's own no longer loads there). With --overlap the first
    round's average was still pending when the second raised, and the reload applied it on top of
    the good state at the next round's end.

    poison "one": the NaN in one group only (rank 0). That group raised alone and left the round,
    the others waited in the average across the groups (or met the group's next round in it);
    now every rank raises and leaves the same round. The good state is taken after a trained round,
    so it holds the optimizer's momentum: state_dict() handed out the live state tensors, which the
    steps after it changed, and the reload took the NaN's momentum (the keep policy, data-parallel)."""
    G = group_size or size
    averaged = "gradient" if strategy == "data_parallel" or group_size else "round's"
    start = 2 if strategy == "warmup" else 1  # rounds before the last good state

    def body(c, model, poisoned):
        opt = torch.optim.SGD(model.parameters(), lr=L.LR, momentum=0.9)
        job = L._strategy(strategy, model, c, optimizer=opt, local_steps=L.STEPS,
                          **({"group_size": group_size} if group_size else {}), **({"overlap": True} if overlap else {}),
                          **kw)
        with job:
            for k in range(start * L.STEPS):
                L.step(model, opt, c, k)
        job.flush()
        good, raised, steps = job.state_dict(), None, range(start * L.STEPS, (start + 2) * L.STEPS)
        if poisoned:
            try:
                with job:
                    for k in steps:
                        opt.zero_grad()
                        x, y = L.batch(c.rank, k)
                        loss = F.cross_entropy(model(x), y)
                        # 2nd round: the first rank of each group (or of all), or rank 0 only
                        if k == (start + 1) * L.STEPS + 1 and (c.rank % G == 0 if poison == "all" else c.rank == 0):
                            loss = loss * math.nan
                        loss.backward()
                        opt.step()
            except rm.NonFiniteError as e:
                raised = str(e)
            job.load_state_dict(good)
        with job:
            for k in steps:
                L.step(model, opt, c, k)
        return raised, job.name, job.round, L.full_state(job)

    def run(poisoned):
        models = [L.make_model() for _ in range(size)]
        torch.set_num_threads(1)
        return run_ranks(size, lambda c: body(c, models[c.rank], poisoned))
    clean = run(False)
    for rank, ((raised, name, r, state), (_, _, r_clean, state_clean)) in enumerate(zip(run(True), clean)):
        if poison == "all" or rank < G:
            assert raised == f"the {averaged} average is not finite"
        else:  # the groups without the NaN learn of it in the round's average
            assert raised is not None and raised.endswith("is not finite"), raised
        assert r == r_clean == start + 2
        assert name == ("resist" if strategy == "warmup" else strategy)
        assert L.states_equal(state, state_clean)


def test_trainer_stops_on_a_diverging_round_with_its_own_exit_and_keeps_the_finite_checkpoint(tmp_path):
    from resist_mpi.cli import checkpoint as ckpt
    from resist_mpi.comm import init
    from resist_mpi.cli.config import Config, validate
    from resist_mpi.cli.trainer import Trainer
    tiny = dict(model="preact_resnet34", width=4, dataset="synthetic", batch_size=128, local_steps=4,
                bn_batches=1, checkpoint_every=1, keep_checkpoints=1, progress="off", out=str(tmp_path), epochs=1)
    first = Trainer(validate(Config(**tiny)), init("self", fail_fast=False))
    first.run()
    assert first.exit_code == 0
    good = ckpt.list_checkpoints(str(tmp_path))
    assert len(good) == 1
    bad = Trainer(validate(Config(**{**tiny, "epochs": 3, "lr": 1e6, "resume": "auto"})),
                  init("self", fail_fast=False))
    bad.run()
    assert bad.exit_code == rm.NONFINITE_EXIT == 4
    # the newest checkpoint is still the finite one: nothing was written from the broken model, and
    # rotation (--keep-checkpoints 1) did not delete it
    assert ckpt.list_checkpoints(str(tmp_path)) == good
    manifest, why = ckpt.verify(good[0])
    state = ckpt.full_state_dict(ckpt.Reader(good[0], manifest))
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    # metrics.jsonl is strict JSON: non-finite values are strings
    lines = open(tmp_path / "metrics.jsonl").read().splitlines()
    recs = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl")) for line in lines]
    diverged = [r for r in recs if r["event"] == "diverged"]
    assert len(diverged) == 1 and diverged[0]["exit"] == 4 and "non-finite" in diverged[0]["message"]
    assert "rank 0" in diverged[0]["message"]
    assert [r["round"] for r in recs if r["event"] == "round"][-1] == diverged[0]["round"] == 2


def test_metrics_write_non_finite_values_as_strings_and_read_them_back(tmp_path):
    from resist_mpi.cli.metrics import RunLog, read_metrics
    log = RunLog(str(tmp_path), True, progress="off")
    log.record("round", round=0, train_loss=math.nan, lr=math.inf, x=[1.0, -math.inf], name="NaN-free")
    log.close()
    line = open(tmp_path / "metrics.jsonl").read()
    rec = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert rec["train_loss"] == "NaN" and rec["lr"] == "Infinity" and rec["x"] == [1.0, "-Infinity"]
    back = read_metrics(str(tmp_path))[0]
    assert math.isnan(back["train_loss"]) and back["lr"] == math.inf and back["name"] == "NaN-free"


def test_the_divergence_line_offers_a_resume_only_from_a_checkpoint_that_exists(tmp_path, capsys):
    """Diverged before any checkpoint: the line says none was written and does not send the user to
    --resume auto; with one on disk it names it and says how to resume from it. (stop_diverged
    alone: the whole run is tested above.)"""
    from types import SimpleNamespace
    from resist_mpi.cli import checkpoint as ckpt
    from resist_mpi.cli.config import Config
    from resist_mpi.cli.trainer import Trainer
    trainer = Trainer.__new__(Trainer)  # no model or data: only what stop_diverged reads
    trainer.cfg, trainer.c = Config(out=str(tmp_path)), SimpleNamespace(rank=0)
    log = SimpleNamespace(record=lambda *a, **kw: None)
    what = "training diverged: non-finite train loss at round 0 (rank 0)"
    trainer.stop_diverged(log, what, 0, 0.0)
    assert trainer.exit_code == rm.NONFINITE_EXIT
    assert capsys.readouterr().err == f"resist_mpi: error: {what}; no checkpoint was written (lower --lr); exit 4\n"
    newest = tmp_path / "checkpoints" / "ckpt-000003"
    newest.mkdir(parents=True)
    (newest / ckpt.MANIFEST).write_text("{}")
    trainer.stop_diverged(log, what, 5, 1.5)
    assert capsys.readouterr().err == (f"resist_mpi: error: {what}; the newest checkpoint, {newest}, is from before "
                                       "it (lower --lr, or resume from it with --resume auto); exit 4\n")


def test_a_non_finite_model_is_never_checkpointed():
    from resist_mpi.cli.checkpoint import check_finite
    check_finite({"model": {"w": torch.ones(2), "n": torch.tensor(3)}})
    with pytest.raises(rm.NonFiniteError, match="checkpoint not written"):
        check_finite({"model": {"w": torch.tensor([1.0, math.inf])}})
    with pytest.raises(rm.NonFiniteError, match=r"blocks.3.w"):
        check_finite({"blocks": {3: {"w": torch.tensor([math.nan])}}})


def test_round_meter_names_the_ranks():
    from resist_mpi.cli.trainer import RoundMeter

    def body(c):
        m = RoundMeter(3, 0, 1, loss_sum=math.nan if c.rank in (1, 2) else 1.0, seen=1)
        m.reduce(c)
        return m.divergence()
    out = run_ranks(4, body)
    assert out == ["round 3: training diverged: non-finite loss on 2 ranks (1 to 2)"] * 4
    assert run_ranks(2, lambda c: _one(c)) == ["round 0: training diverged: non-finite round update on rank 1"] * 2


def _one(c):
    from resist_mpi.cli.trainer import RoundMeter
    m = RoundMeter(0, 0, 1, loss_sum=1.0, seen=1, bad_update=c.rank == 1)
    m.reduce(c)
    return m.divergence()



@pytest.mark.parametrize("size, group_size, overlap", [(2, None, False), (4, 2, False), (2, None, True)])
def test_a_block_made_non_finite_by_a_rounds_last_step_stops_every_rank_at_its_end(size, group_size, overlap):
    """Only the shared layers' average was checked: a block that went non-finite in a round's last
    steps (its trainer alone holds it) passed the round's end, and a state_dict() taken then held
    it. Now the round's average raises on every rank (with --overlap: where it lands)."""
    def body(c, model):
        job = rm.ResIST(model, c, seed=7, **({"group_size": group_size} if group_size else {}),
                        **({"overlap": True} if overlap else {}))
        try:
            for r in job.rounds(1):
                opt = torch.optim.SGD(job.parameters(), lr=L.LR)
                for k in range(L.STEPS):
                    L.step(model, opt, c, k)
                if c.rank == 0:
                    with torch.no_grad():
                        job.param_groups()[1]["params"][0].fill_(math.inf)  # one of its blocks, after the steps
            job.flush()  # (with --overlap the average lands here)
        except rm.NonFiniteError as e:
            return str(e)
        state = job.state_dict()["model"]
        return f"no error; the state finite: {all(torch.isfinite(v).all() for v in state.values())}"
    models = [L.make_model() for _ in range(size)]
    torch.set_num_threads(1)
    said = run_ranks(size, lambda c: body(c, models[c.rank]))
    assert all(s is not None and s.endswith("is not finite") for s in said), said


@pytest.mark.parametrize("strategy", ["local_sgd", "resist"])
def test_a_nan_in_one_groups_gradient_average_stops_every_rank_in_the_rounds_loop_too(strategy):
    """The explicit loop (`for r in job.rounds(n)`): the group whose gradient average raised left the
    loop, closing the generator, which ended the round with a finite model: the other groups' average
    passed and they trained on alone. Now every rank raises, and the reload trains as a clean run."""
    def body(c, model, poisoned):
        opt = torch.optim.SGD(model.parameters(), lr=L.LR)
        job = L._strategy(strategy, model, c, optimizer=opt, group_size=2)
        good, raised = job.state_dict(), None
        if poisoned:
            try:
                for r in job.rounds(2):
                    for k in range(L.STEPS):
                        opt.zero_grad()
                        x, y = L.batch(c.rank, r * L.STEPS + k)
                        loss = F.cross_entropy(model(x), y) * (math.nan if (r, k, c.rank) == (1, 1, 0) else 1.0)
                        loss.backward()
                        opt.step()
            except rm.NonFiniteError as e:
                raised = str(e)
            job.load_state_dict(good)
        for r in job.rounds(2):
            for k in range(L.STEPS):
                L.step(model, opt, c, r * L.STEPS + k)
        return raised, L.full_state(job)
    runs = {}
    for poisoned in (False, True):
        models = [L.make_model() for _ in range(4)]
        torch.set_num_threads(1)
        runs[poisoned] = run_ranks(4, lambda c: body(c, models[c.rank], poisoned), timeout=60)
    for rank, ((raised, state), (_, clean)) in enumerate(zip(runs[True], runs[False])):
        assert raised is not None and raised.endswith("is not finite"), (rank, raised)
        assert L.states_equal(state, clean)
