"""The library on the user's own optimizer: bodies run by every rank, on any Comm.

tests/unit/test_library.py runs them on ranks that are threads of one process (2 and 4 of them);
tests/mpi/test_library.py runs them on real ranks under mpirun/torchrun/horovodrun, for every
backend. Each body takes the rank's Comm and its own copy of the initial model (built by the
caller: in a thread world, before the threads start, since torch's global RNG is shared).
"""
import itertools

import torch
import torch.nn.functional as F

import resist_mpi as rm
from resist_mpi.models import create_model

ROUNDS, STEPS, LR = 3, 2, 0.05


def make_model():
    torch.manual_seed(1234)
    return create_model("preact_resnet34", 10, width=4)  # 5 partitionable blocks in stage 3


def batch(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def lr_of_step(k):
    """What StepLR(step_size=3, gamma=0.5) gives at step k (powers of two: exact in floats)."""
    return LR * 0.5 ** (k // 3)


def full_state(job):
    with job.full_model() as full:
        return {k: v.detach().clone() for k, v in full.state_dict().items()}


def step(model, opt, c, k):
    opt.zero_grad()
    x, y = batch(c.rank, k)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def train_per_round_optimizer(c, model, strategy="resist", **kw):
    """Today's pattern: a fresh optimizer over job.parameters() every round, lr set by hand."""
    job = _strategy(strategy, model, c, **kw)
    k = 0
    for _ in job.rounds(ROUNDS):
        opt = torch.optim.SGD(job.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
        for _ in range(STEPS):
            for g in opt.param_groups:
                g["lr"] = lr_of_step(k)
            step(model, opt, c, k)
            k += 1
    return full_state(job)


def train_one_optimizer_hooks(c, model, strategy="resist", **kw):
    """The Horovod/torchft shape: one optimizer and a scheduler built before, a plain batch loop.
    Returns (full state, lr of every step, per round: whether every held block's parameters changed
    in the round, looked at in the last step between the optimizer's update and the round's end)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    lrs, trained, at = [], [], {}

    def look(optimizer, args, kwargs):  # registered before the strategy's hooks: runs before them
        if at["k"] % STEPS == STEPS - 1:
            trained.append(all(not torch.equal(p, q) for b in at["held"] for p, q in zip(at["held"][b], at["before"][b])))
    opt.register_step_post_hook(look)
    job = _strategy(strategy, model, c, optimizer=opt, scheduler=sched, local_steps=STEPS, **kw)
    with job:
        for k in range(ROUNDS * STEPS):
            at["k"] = k
            if k % STEPS == 0:
                at["held"] = _held_blocks(job)
                at["before"] = {b: [p.detach().clone() for p in ps] for b, ps in at["held"].items()}
            lrs.append(opt.param_groups[0]["lr"])
            step(model, opt, c, k)
            sched.step()
    return full_state(job), lrs, trained


def _held_blocks(job):
    if not hasattr(job, "blocks"):
        return {}
    return {b: list(job.blocks[b].parameters()) for b in job.mine()}


def train_one_optimizer_rounds(c, model, strategy="resist", **kw):
    """The explicit form with an optimizer built once."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    job = _strategy(strategy, model, c, optimizer=opt, **kw)
    k = 0
    for _ in job.rounds(ROUNDS):
        for _ in range(STEPS):
            for g in opt.param_groups:
                g["lr"] = lr_of_step(k)
            step(model, opt, c, k)
            k += 1
    return full_state(job)


def train_with_evaluations(c, model, prepare, optimizer_state="reset", evaluate=True, **kw):
    """Explicit rounds, one optimizer, the full model looked at after every round but the last
    (evaluate), with or without prepare_round() first (what the trainer does before an evaluation).
    Returns (the full states seen, the final one, per round (bytes sent, received) by begin_round(),
    per evaluation (bytes sent, received) by prepare_round() and the gather, the momentum buffers)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    job = _strategy("resist", model, c, optimizer=opt, optimizer_state=optimizer_state, **kw)
    seen, begins, evals, k = [], [], [], 0
    for r in range(ROUNDS):
        before = c.counters()
        job.begin_round()
        after = c.counters()
        begins.append((after[0] - before[0], after[1] - before[1]))
        for _ in range(STEPS):
            step(model, opt, c, k)
            k += 1
        job.end_round()
        if evaluate and r < ROUNDS - 1:
            before = c.counters()
            if prepare:
                job.prepare_round()
                job.prepare_round()  # a second call does nothing
            seen.append(full_state(job))
            after = c.counters()
            evals.append((after[0] - before[0], after[1] - before[1]))
    momenta = {job._names[p]: opt.state[p]["momentum_buffer"].clone() for p in opt.state if p.numel()}
    return seen, full_state(job), begins, evals, momenta


def _look(model, c, only):
    """What an evaluation sees of a full model: its state, its outputs on a fixed batch in eval mode,
    and the test loss and accuracy after a BN recalibration of the layers only names (collectives on c)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calibration = [batch(50 + c.rank, i) for i in range(2)]
    with rm.recalibrate_bn(model, c, iter(calibration), 2, None, only=only):
        loss, acc = rm.evaluate(model, c, [batch(90 + c.rank, 0)])
        model.eval()
        with torch.no_grad():
            out = model(batch(99, 0)[0])
        model.train()
    return state, out, (loss, acc)


def _counted_round(job, model, opt, c, k):
    """One explicit round of STEPS steps from step k: (the next step, (bytes sent, received) of
    the training communicator in it)."""
    before = c.counters()
    job.begin_round()
    for _ in range(STEPS):
        step(model, opt, c, k)
        k += 1
    job.end_round()
    after = c.counters()
    return k, (after[0] - before[0], after[1] - before[1])


def train_with_background_evaluations(c, model, background, **kw):
    """Explicit rounds, one optimizer, an evaluation after every round but the last: of full_model()
    after prepare_round() (background False: the trainer's synchronous evaluation), or of
    job.evaluation_copy() completed and evaluated on the background thread while the next round
    trains, collected at that round's end (True); None: no evaluations. Returns (what each
    evaluation saw: _look(), the final state, per round bytes (sent, received) of the training
    communicator, the momentum buffers)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    job = _strategy(kw.pop("strategy", "resist"), model, c, optimizer=opt, optimizer_state="keep", **kw)
    seen, rounds, pending, k = [], [], None, 0
    for r in range(ROUNDS):
        k, moved = _counted_round(job, model, opt, c, k)
        rounds.append(moved)
        if pending is not None:
            pending[0].wait()
            seen.append(pending[1]["look"])
            pending = None
        if background is None:
            continue
        if r < ROUNDS - 1 and not background:
            job.prepare_round()  # as the trainer does before a synchronous evaluation
            with job.full_model() as full:
                seen.append(_look(full, c, job.bn_to_recalibrate()))
        elif r < ROUNDS - 1:
            copy, out = job.evaluation_copy(), {}

            def run(copy=copy, out=out):
                copy.complete()
                out["look"] = _look(copy.model, copy.comm, copy.bn)
            pending = (c.submit(run), out)
    momenta = {job._names[p]: opt.state[p]["momentum_buffer"].clone() for p in opt.state if p.numel()}
    return seen, full_state(job), rounds, momenta


def train_with_a_delayed_evaluation(c, model, how, **kw):
    """overlap=True, explicit rounds: one evaluation, of round 0's model: with full_model() right
    after round 0 (how "flush": the average in flight applied at once), or of
    job.evaluation_copy(flush=False), completed and looked at after round 1, when round 0's average
    has landed in it ("delayed"); None: no evaluation. Returns (what the evaluation saw: _look(),
    the copy's readiness after round 0 and after round 1 and whether complete() refused it before,
    the final state, per round bytes (sent, received) of the training communicator)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    job = _strategy(kw.pop("strategy", "resist"), model, c, optimizer=opt, optimizer_state="keep", overlap=True, **kw)
    seen, ready, rounds, copy, k = None, [], [], None, 0
    for r in range(ROUNDS):
        k, moved = _counted_round(job, model, opt, c, k)
        rounds.append(moved)
        if r == 0 and how == "flush":
            with job.full_model() as full:
                seen = _look(full, c, job.bn_to_recalibrate())
        elif r == 0 and how == "delayed":
            copy = job.evaluation_copy(flush=False)
            ready.append(copy.ready)
            try:
                copy.complete()
                ready.append("completed")
            except rm.UsageError:
                ready.append("refused")
        elif r == 1 and copy is not None:
            ready.append(copy.ready)
            out = {}

            def run():
                copy.complete()
                out["look"] = _look(copy.model, copy.comm, copy.bn)
            c.submit(run).wait()
            seen = out["look"]
    return seen, ready, full_state(job), rounds


def look_inside_hook_rounds(c, model, strategy, how):
    """overlap=True in the `with job:` form: the full model looked at (how: "full_model",
    "state_dict" or "evaluation_copy") right after the step that ended round 0, when round 1 has
    begun, then two rounds that change nothing (lr 0, BN in eval mode). Returns (the full state
    seen, the averaged entries after each of those rounds' ends, the full state at the end)."""
    from resist_mpi.blocks.tensors import shared_keys
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    job = _strategy(strategy, model, c, optimizer=opt, local_steps=STEPS, overlap=True)
    keys = shared_keys(model, getattr(job, "blocks", []))
    after = []
    with job:
        for k in range(STEPS):
            step(model, opt, c, k)
        if how == "full_model":
            seen = full_state(job)
        elif how == "state_dict":
            seen = job.state_dict()["model"]
        else:
            copy = job.evaluation_copy()
            c.submit(copy.complete).wait()
            seen = {n: v.detach().clone() for n, v in copy.model.state_dict().items()}
        for g in opt.param_groups:
            g["lr"] = 0.0
        model.eval()
        for k in range(STEPS, 3 * STEPS):
            step(model, opt, c, k)
            if k % STEPS == STEPS - 1:
                state = model.state_dict()
                after.append({n: state[n].detach().clone() for n in keys})
    return seen, after, full_state(job)


def settle_in_hook_rounds(c, model, strategy, overlap_steps):
    """overlap=True with overlap_steps in the `with job:` form (a Warmup: local SGD for its first two
    rounds): round 0 trains, then a round that changes nothing (lr 0, BN in eval mode); the shared
    entries after each of its steps (look_inside_hook_rounds shows the averaged ones)."""
    from resist_mpi.blocks.tensors import shared_keys
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    kw = dict(optimizer=opt, local_steps=STEPS, overlap=True, overlap_steps=overlap_steps)
    if strategy == "warmup":
        job = rm.Warmup(rm.LocalSGD(model, c, **kw), lambda: rm.ResIST(model, c, seed=7, **kw), 2)
    else:
        job = _strategy(strategy, model, c, **kw)
    keys = shared_keys(model, getattr(job, "blocks", []))
    after = []
    with job:
        for k in range(STEPS):
            step(model, opt, c, k)
        for g in opt.param_groups:
            g["lr"] = 0.0
        model.eval()
        for k in range(STEPS, 2 * STEPS):
            step(model, opt, c, k)
            state = model.state_dict()
            after.append({n: state[n].detach().clone() for n in keys})
    return after


def single_process_lrs():
    """The same scheduler in a plain single-process loop."""
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    lrs = []
    for _ in range(ROUNDS * STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def _strategy(name, model, c, **kw):
    if name == "warmup":  # local SGD for the first round, then ResIST
        return rm.Warmup(rm.LocalSGD(model, c, **kw), lambda: rm.ResIST(model, c, seed=7, **kw), 1)
    cls = {"resist": rm.ResIST, "local_sgd": rm.LocalSGD, "data_parallel": rm.DataParallel}[name]
    if name == "resist":
        kw.setdefault("seed", 7)
    return cls(model, c, **kw)


def states_equal(a, b):
    """Equal weights and BN statistics (BN's step counters are not exchanged: they restart when a
    block moves, and the hook form's last step already began the next round's exchange)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def blocks_all_changed(c, init, state):
    """Every partitioned block's parameters differ from the initial model's (trained at least once)."""
    job_blocks = [n for n, _ in rm.find_blocks(init)]
    names = [k for k in state if any(k.startswith(b + ".") for b in job_blocks) and "running" not in k
             and "num_batches" not in k]
    return bool(names) and all(not torch.equal(state[k], init.state_dict()[k]) for k in names)


def train_resumed(c, model, strategy, fresh=None, legacy=False):
    """The explicit form with one optimizer and a StepLR scheduler stepped every step. fresh: the
    model a restart after round 1 goes on with, as a new process would: state_dict(), then a new
    optimizer, scheduler and job over fresh, loaded from it (legacy: a state without param_groups,
    as saved before they were). Returns (the full state, the lr of every step)."""
    def build(m):
        opt = torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return opt, sched, _strategy(strategy, m, c, optimizer=opt, scheduler=sched)
    opt, sched, job = build(model)
    lrs = []
    for stop in ((2, ROUNDS) if fresh is not None else (ROUNDS,)):
        if job.round:  # the restart
            state = job.state_dict()
            if legacy:
                del state["param_groups"]
            model = fresh
            opt, sched, job = build(model)
            job.load_state_dict(state)
        for r in job.rounds(stop):
            for s in range(STEPS):
                lrs.append(opt.param_groups[0]["lr"])
                step(model, opt, c, r * STEPS + s)
                sched.step()
    return full_state(job), lrs


def train_frozen(c, model, strategy):
    """The stem, stage 1 and a convolution of a partitioned block frozen (requires_grad=False), the
    optimizer built over the trainable parameters only, as fine-tuning does, the hook form.
    Returns (the frozen parameters' names, the full state)."""
    frozen = [n for n, _ in model.named_parameters()
              if n == "stem.weight" or n.startswith("stages.0.") or n == "stages.2.2.conv1.weight"]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9, weight_decay=5e-4)
    with _strategy(strategy, model, c, optimizer=opt, local_steps=STEPS) as job:
        for k in range(ROUNDS * STEPS):
            step(model, opt, c, k)
    return frozen, full_state(job)


# -- tied weights ----------------------------------------------------------------------------------------------
class TiedLM(torch.nn.Module):
    """A small transformer language model whose output layer's weight is its embedding (weight
    tying): one Parameter under two names, both outside the blocks (the encoder's layers)."""

    def __init__(self, vocab=50, dim=16, layers=4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.enc(self.emb(x)))


def make_tied_model():
    torch.manual_seed(0)
    return TiedLM()


def tied_rounds(c, model, strategy, fresh=None, **kw):
    """ROUNDS rounds on a TiedLM, a state_dict() after round 1 (it flushes an overlapped average);
    with fresh (another TiedLM), a new job on it loaded from that state goes on instead. Returns
    (per round: whether the tied weight after the round's end is the mean over ranks of its values
    before it, None with overlap, where it lands a round later; per round: the round's averaged
    buffer, None for data-parallel; the full state at the end; whether the model is still tied)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    job = _strategy(strategy, model, c, optimizer=opt, **kw)
    g = torch.Generator().manual_seed(c.rank)
    averaged, buffers = [], []
    for r in range(ROUNDS):
        job.begin_round()
        for _ in range(STEPS):
            x = torch.randint(0, 50, (4, 8), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x).reshape(-1, 50), x.reshape(-1)).backward()
            opt.step()
        mean = model.emb.weight.detach().clone()
        c.allreduce_mean_(mean.view(-1))
        job.end_round()
        averaged.append(None if kw.get("overlap") else torch.equal(model.emb.weight, mean))
        buffers.append(job._model_averagers[0].flat if job._model_averagers else None)
        if r == 1:
            state = job.state_dict()
            if fresh is not None:
                model, opt = fresh, torch.optim.SGD(fresh.parameters(), lr=LR)
                job = _strategy(strategy, model, c, optimizer=opt, **kw)
                job.load_state_dict(state)
    return averaged, buffers, full_state(job), model.head.weight is model.emb.weight


# -- a warm-up's checkpoints ---------------------------------------------------------------------------------
def _warmup(c, m, o, switch, **kw):
    """Local SGD until round switch, then ResIST."""
    return rm.Warmup(rm.LocalSGD(m, c, optimizer=o, **kw),
                     lambda: rm.ResIST(m, c, optimizer=o, synchronized=True, seed=7, **kw), switch)


def _train_until(c, job, m, o, until, saved_round, state=None):
    """Rounds on the shared batches until job.round == until; job.state_dict() taken once
    saved_round rounds ended (or state, when that never comes)."""
    while job.round < until:
        job.begin_round()
        for s in range(STEPS):
            step(m, o, c, job.round * STEPS + s)
        job.end_round()
        if job.round == saved_round:
            state = job.state_dict()
    return state


def warmup_reload(c, model, fresh, saved_round, **kw):
    """A Warmup (local SGD for rounds 0-1, then ResIST) through round 3, with state_dict() taken
    once saved_round rounds ended (saved_round 2: by local SGD, at the end of the warm-up). Then
    the state goes back into the same job (switched by then: a roll-back), and into a new Warmup
    on fresh; each goes on through round 3 on the same batches. Returns (the uninterrupted full
    state, the rolled-back one or the exception raised, the new job's)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    job = _warmup(c, model, opt, 2, **kw)
    state = _train_until(c, job, model, opt, 4, saved_round)
    straight = full_state(job)
    try:
        job.load_state_dict(state)
        _train_until(c, job, model, opt, 4, saved_round, state)
        rolled_back = full_state(job)
    except rm.UsageError as e:
        rolled_back = e
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=LR, momentum=0.9)
    job = _warmup(c, fresh, fresh_opt, 2, **kw)
    job.load_state_dict(state)
    _train_until(c, job, fresh, fresh_opt, 4, saved_round, state)
    return straight, rolled_back, full_state(job)


def warmup_later_switch(c, model, fresh):
    """A Warmup switching at round 2 saves its state after round 4 (ResIST's); a new Warmup on fresh
    whose switch comes at round 6 (a longer warm-up) loads it. Both go on through round 5 on the
    same batches. Returns (the first's full state, the new job's strategy name, its full state)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    job = _warmup(c, model, opt, 2)
    state = _train_until(c, job, model, opt, 6, 4)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=LR, momentum=0.9)
    later = _warmup(c, fresh, fresh_opt, 6)
    later.load_state_dict(state)
    _train_until(c, later, fresh, fresh_opt, 6, 4)
    return full_state(job), later.name, full_state(later)


# -- misuse ------------------------------------------------------------------------------------------------
def misuse(c, model, case):
    """Raise the UsageError (or return None) that `case` should produce, on every rank alike."""
    if case == "foreign":
        other = make_model()
        opt = torch.optim.SGD(other.parameters(), lr=LR)
        rm.ResIST(model, c, optimizer=opt)
    elif case in ("missing", "missing_one_block"):
        blocks = [n + "." for n, _ in rm.find_blocks(model)][-1 if case == "missing_one_block" else 0:]
        shared = [p for n, p in model.named_parameters() if not any(n.startswith(b) for b in blocks)]
        opt = torch.optim.SGD(shared, lr=LR)
        with rm.ResIST(model, c, optimizer=opt, local_steps=STEPS):
            pass
    elif case == "parameters_first":
        rm.ResIST(model, c).parameters()
    elif case == "full_model_mid_round":
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        with rm.ResIST(model, c, optimizer=opt, local_steps=STEPS) as job:
            step(model, opt, c, 0)
            with job.full_model():
                pass
    elif case == "state_dict_in_rounds_body":
        job = rm.ResIST(model, c)
        for _ in job.rounds(1):
            job.state_dict()
    elif case == "factory":
        rm.ResIST(model, c, optimizer=lambda groups: torch.optim.SGD(groups, lr=LR))
    elif case == "half":  # (a flat buffer of float32 refused it deep inside, naming no tensor)
        model.bn.half()
        rm.LocalSGD(model, c)


# -- policies -------------------------------------------------------------------------------------------------
def policy_states(c, model, policy):
    """Per round boundary: which parameters have optimizer state right after the round began, and
    whether the shared layers' momentum survived it unchanged."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    job = rm.ResIST(model, c, optimizer=opt, optimizer_state=policy, seed=7)
    shared = set(job.shared_parameters())
    out = []
    momentum = None
    for r in job.rounds(ROUNDS):
        stated = {p for p in opt.state if opt.state[p]}
        kept = momentum is not None and all(torch.equal(opt.state[p]["momentum_buffer"], m)
                                            for p, m in momentum.items() if p in opt.state)
        moved = set(job._moved_parameters())
        mine = {p for b in job.mine() for p in job.blocks[b].parameters()}
        out.append({"round": r, "stated_shared": stated & shared == shared if r else None,
                    "stated_blocks": stated & mine, "moved": moved, "mine": mine, "kept": kept,
                    "stated_outside": stated - shared - mine})
        for k in range(STEPS):
            step(model, opt, c, 10 * r + k)
        momentum = {p: opt.state[p]["momentum_buffer"].clone() for p in shared}
    return out


# -- leaving a loop ------------------------------------------------------------------------------------------
def leave_early(c, model, how, wire="int8"):
    """Leave the rounds in the middle (break, or an exception every rank raises); returns the
    shared layers' values and the next round, to be compared across ranks."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    if how == "break":
        job = rm.ResIST(model, c, optimizer=opt, wire_dtype=wire, seed=7)
        for r in job.rounds(ROUNDS):
            step(model, opt, c, r)
            if r == 1:
                break
    else:
        job = rm.ResIST(model, c, optimizer=opt, local_steps=STEPS, wire_dtype=wire, seed=7)
        try:
            with job:
                for k in itertools.count():
                    step(model, opt, c, k)
                    if k == STEPS + 1:  # the middle of round 1
                        raise KeyError("every rank stops here")
        except KeyError:
            pass
    return torch.cat([t.detach().reshape(-1) for t in job.shared_tensors()]), job.round


# -- mixed precision: a loss scaler ------------------------------------------------------------------------------
SCALE = 2.0 ** 8


def overflows(rank, k):
    """Whether iteration k's loss overflows on this rank: rank 0 at iterations 1 and 4, rank 1 at 4."""
    return (rank == 0 and k in (1, 4)) or (rank == 1 and k == 4)


def step_peers(rank, size, strategy, group_size=1):
    """The ranks whose gradients this rank's step averages: every rank under data-parallel, its
    group's with groups, itself alone otherwise."""
    if strategy == "data_parallel":
        return range(size)
    first = rank // group_size * group_size
    return range(first, first + group_size)


def train_with_scaler(c, model, strategy, form, **kw):
    """Mixed precision's loop shape: scaler.scale(loss).backward(); scaler.step(opt);
    scaler.update(), with losses that overflow on some ranks at some iterations (their steps are the
    scaler's to skip). form: "hooks" (`with job:`), "rounds" (job.rounds(n), STEPS iterations each)
    or "reference" (no scaler, the explicit form: an iteration that overflows takes no step, on the
    ranks it overflows on, or on every rank of a per-step average it is in). Returns (the
    full state, the round after training, this rank's state_dict(), its scale)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    scaler = None if form == "reference" else torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    extra = {"scaler": scaler} if scaler is not None else {}
    if form == "hooks":
        extra["local_steps"] = STEPS
    job = _strategy(strategy, model, c, optimizer=opt, **extra, **kw)
    peers = step_peers(c.rank, c.size, strategy, kw.get("group_size", 1))

    def iteration(k):
        opt.zero_grad()
        x, y = batch(c.rank, k)
        loss = F.cross_entropy(model(x), y)  # (the forward updates BN's statistics, skipped step or not)
        if scaler is None:
            loss.backward()
            if not any(overflows(r, k) for r in peers):
                opt.step()
            return
        scaler.scale(loss * (float("inf") if overflows(c.rank, k) else 1.0)).backward()
        scaler.step(opt)
        scaler.update()

    if form == "hooks":
        with job:
            for k in range(ROUNDS * STEPS):
                iteration(k)
    else:
        k = 0
        for _ in job.rounds(ROUNDS):
            for _ in range(STEPS):
                iteration(k)
                k += 1
    state = full_state(job)
    return state, job.round, job.state_dict(), None if scaler is None else scaler.get_scale()


def scaler_reload(c, model, strategy, state, other_world=False):
    """A new job over model with a new loss scaler, loaded from a rank's state_dict() of
    train_with_scaler (other_world: as if saved on another world size). Returns the scale."""
    if other_world:
        state = {**state, "world_size": state["world_size"] + 1}
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    _strategy(strategy, model, c, optimizer=opt, scaler=scaler).load_state_dict(state)
    return scaler.get_scale()


def warmup_hooks_looks(c, model):
    """A Warmup (local SGD for round 0, then ResIST) in the `with job:` form, the full model looked at
    after every round-ending step. Returns, per look, the job's name and the full state or the error."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    job = rm.Warmup(rm.LocalSGD(model, c, optimizer=opt, local_steps=STEPS),
                    lambda: rm.ResIST(model, c, seed=7, optimizer=opt, local_steps=STEPS), 1)
    looks = []
    with job:
        for k in range(ROUNDS * STEPS):
            step(model, opt, c, k)
            if k % STEPS == STEPS - 1:
                try:
                    looks.append((job.name, full_state(job)))
                except rm.UsageError as e:
                    looks.append((job.name, e))
    return looks


def warmup_rounds_looks(c, model):
    """warmup_hooks_looks in the explicit form (the full model looked at between rounds)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    job = rm.Warmup(rm.LocalSGD(model, c, optimizer=opt), lambda: rm.ResIST(model, c, seed=7, optimizer=opt), 1)
    looks, k = [], 0
    for _ in range(ROUNDS):
        job.begin_round()
        for _ in range(STEPS):
            step(model, opt, c, k)
            k += 1
        job.end_round()
        job.prepare_round()  # (the hook form's next round has begun when it looks)
        looks.append((job.name, full_state(job)))
    return looks


def train_in_with_blocks(c, model, strategy, blocks):
    """The hook form with `with job:` entered `blocks` times, each for a whole number of rounds (a
    loop over epochs that enters it per epoch). Returns the full state."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    job = _strategy(strategy, model, c, optimizer=opt, local_steps=STEPS)
    steps = ROUNDS * STEPS // blocks
    for b in range(blocks):
        with job:
            for k in range(b * steps, (b + 1) * steps):
                step(model, opt, c, k)
    return full_state(job)
