"""Round averages to the bit: plain, overlapped (--overlap) and with an outer step (--outer-optimizer),
on every wire dtype, with and without groups, against a single-process computation of the same rounds.

Every rank runs `run(c, ...)`; `reference(S, ...)` computes what every rank must hold, in one
process, from the formulas (resist_mpi.averaging.Averager's docstring). "Training" adds known
updates to every tensor a rank trains; the model starts from values with few significant bits and
the updates are multiples of 2^-10, so every sum of float32 values in these rounds is exact, in
whatever order a backend's allreduce adds (Open MPI's ring, gloo's, Horovod's); the outer step
uses lr 0.5 and momentum 0.5 for the same reason. A compressed mean adds its decoded chunks in rank
order itself, so it is exact everywhere too. tests/unit/test_averaging_modes.py runs the bodies on
thread ranks (also with DiLoCo's 0.7 / 0.9, which only in-order sums can match), and
tests/mpi/test_averaging_modes.py on real ranks for every backend.
"""
import torch

import resist_mpi as rm
from resist_mpi.blocks.tensors import module_tensors
from resist_mpi.averaging.compression import Codec
from resist_mpi.plan.groups import slice_counts
from resist_mpi.models import create_model

ROUNDS, STEPS = 4, 2


def make_model():
    torch.manual_seed(0)
    model = create_model("preact_resnet34", 10, width=4)
    with torch.no_grad():  # values with few significant bits: sums of them are exact
        for k, t in enumerate(module_tensors(model)):
            t.copy_((((torch.arange(t.numel()) * 7 + k) % 13) - 6).reshape(t.shape) / 16)
    return model


def delta(rank, r, s, numel, salt=0):
    """The update rank makes to a tensor in step s of round r (a multiple of 2^-10)."""
    return ((((torch.arange(numel) + 2 * rank + 5 * r + s + salt) % 9) - 4) / 1024).to(torch.float32)


def outer_factory(lr, momentum):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)


def build(c, model, strategy, overlap, outer, wire, group_size, settle=None):
    """settle=k: overlap_steps=k, counted on an optimizer that steps nothing (lr 0, no gradients)."""
    kw = dict(overlap=overlap, outer_optimizer=outer_factory(*outer) if outer else None, wire_dtype=wire,
              group_size=group_size)
    if settle is not None:
        kw.update(optimizer=torch.optim.SGD(model.parameters(), lr=0.0), overlap_steps=settle)
    if strategy == "resist":
        return rm.ResIST(model, c, seed=3, **kw)
    return rm.LocalSGD(model, c, **kw)


def trained_tensors(job):
    if isinstance(job, rm.ResIST):
        return list(job.shared_tensors()) + [t for b in job.mine() for t in job.store.tensors(b)]
    return module_tensors(job.model)


def local_steps(c, job, r, flush_before=None, seen=None):
    """Round r's steps; flush_before=s: job.flush() before step s (what an evaluation or a checkpoint
    in the `with job:` form does once the next round has begun, at s=0); seen: a list that gets the
    shared values after each step."""
    with torch.no_grad():
        for s in range(STEPS):
            if s == flush_before:
                job.flush()
            for k, t in enumerate(trained_tensors(job)):
                t.add_(delta(c.rank, r, s, t.numel(), k).view(t.shape))
            if job.optimizer is not None:
                job.optimizer.step()  # its step hook counts the step (overlap_steps)
            if seen is not None:
                seen.append(shared_flat(job))


def shared_flat(job):
    tensors = job.shared_tensors() if isinstance(job, rm.ResIST) else module_tensors(job.model)
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def run(c, model, strategy="local_sgd", overlap=False, outer=None, wire="float32", group_size=1,
        checkpoint_at=None, resume=False, flush_at=None, settle=None, seen=None):
    """Per round, this rank's shared values after the round's end (and after the final flush), and
    the full model at the end. checkpoint_at=k: state_dict() after round k (collective: it flushes
    an overlapped average); with resume, a fresh job loaded from it goes on instead of this one.
    flush_at=(r, s): job.flush() in round r before its step s (local_steps). settle=k: the average
    in flight lands after k steps of each round (overlap_steps); seen: a list that gets this rank's
    shared values after each step."""
    job = build(c, model, strategy, overlap, outer, wire, group_size, settle)
    after = []
    for r in range(ROUNDS):
        job.begin_round()
        local_steps(c, job, r, flush_at[1] if flush_at and flush_at[0] == r else None, seen)
        job.end_round()
        after.append(shared_flat(job))
        if checkpoint_at == r:
            state = job.state_dict()
            if resume:
                job = build(c, make_model(), strategy, overlap, outer, wire, group_size, settle)
                job.load_state_dict(state)
    job.flush()
    after.append(shared_flat(job))
    with job.full_model() as full:
        return after, {k: v.clone() for k, v in full.state_dict().items() if v.is_floating_point()}


# -- the single-process computation ---------------------------------------------------------------------------
def _mean(ts):
    acc = ts[0].clone()
    for t in ts[1:]:
        acc.add_(t)
    return acc.div_(len(ts))


class _EF:
    """One compressed-mean participant's residual (the reference of compression.ErrorFeedback)."""

    def __init__(self):
        self.residual = None


def _ef_mean(parts, efs, codec):
    """The compressed mean of parts (one per participant, each with its error feedback) in one
    process, as compression.compressed_mean's chunk owners compute it."""
    S, n = len(parts), parts[0].numel()
    for ef, p in zip(efs, parts):
        if ef.residual is None:
            ef.residual = torch.zeros(n)
    u = [parts[i] + efs[i].residual for i in range(S)]
    counts = slice_counts(n, S)
    starts = [sum(counts[:d]) for d in range(S)]
    dec = [[codec.decode(codec.encode(u[i][starts[d]:starts[d] + counts[d]]), counts[d]) for d in range(S)]
           for i in range(S)]
    err = [torch.cat([u[i][starts[d]:starts[d] + counts[d]] - dec[i][d] for d in range(S)]) for i in range(S)]
    own = []
    for d in range(S):
        total = torch.zeros(counts[d])
        for i in range(S):
            total.add_(dec[i][d])
        own.append(total.div_(S))
    mean = torch.cat([codec.decode(codec.encode(own[d]), counts[d]) for d in range(S)])
    for d in range(S):
        err[d][starts[d]:starts[d] + counts[d]] += S * (own[d] - mean[starts[d]:starts[d] + counts[d]])
    for ef, e in zip(efs, err):
        ef.residual = e
    return mean


def reference_plain_average(xs, starts, groups, wire, efs):
    """What Averager.average() leaves on every rank without overlap or outer step."""
    S, G = len(xs), groups
    inner = [_mean([xs[g * G + j] for j in range(G)]) for g in range(S // G)] if G > 1 else list(xs)
    if wire == "float32":
        return _mean(inner)
    codec = Codec(wire)
    start = starts[0]
    n = start.numel()
    counts, out = slice_counts(n, G), start.clone()
    for j in range(G):  # member j averages its slice across the groups, compressed
        a, b = sum(counts[:j]), sum(counts[:j + 1])
        if G == 1:
            parts = [inner[i][a:b] - starts[i][a:b] for i in range(S)]
            out[a:b] = start[a:b].clone().add_(_ef_mean(parts, efs[j], codec))
        else:
            parts = [inner[g][a:b] - start[a:b] for g in range(S // G)]
            out[a:b] = start[a:b].clone().add_(_ef_mean(parts, efs[j], codec))
    return out


def reference_update_mean(ups, G, wire, efs):
    """The mean over ranks of this round's updates (a group's members hold the same update)."""
    S = len(ups)
    reps = [ups[g * G] for g in range(S // G)]
    if wire == "float32":
        return _mean(reps)
    codec = Codec(wire)
    n = reps[0].numel()
    counts, out = slice_counts(n, G), torch.empty(n)
    for j in range(G):
        a, b = sum(counts[:j]), sum(counts[:j + 1])
        out[a:b] = _ef_mean([u[a:b] for u in reps], efs[j], codec)
    return out


def reference(S, strategy="local_sgd", overlap=False, outer=None, wire="float32", group_size=1, flush_at=None,
              settle=None, seen=None):
    """Every rank's shared values after each round (and after the final flush), computed here.
    flush_at=(r, s): the average in flight applied in round r before step s; every rank holds the
    agreed values then (the steps before are dropped) and the round's update counts from them.
    settle=k: in every round the average in flight is applied after k steps, keeping them: each
    rank holds the agreed values plus its progress so far, and the round's update counts from the
    agreed values. seen: a list that gets every rank's values after each step (run's seen)."""
    G = group_size
    groups = S // G
    model = make_model()
    x0 = shared_of(model, strategy, S)
    P = params_prefix(model, strategy)
    xs = [x0.clone() for _ in range(S)]
    efs = [[_EF() for _ in range(groups)] for _ in range(G)]  # per member slice j, per group
    agreed = x0.clone()
    opt = outer_factory(*outer)([torch.nn.Parameter(agreed[:P])]) if outer else None
    pending = None  # the mean of last round's update, in flight
    out = []
    trained = shared_updates(model, strategy, S)
    for r in range(ROUNDS):
        starts = [x.clone() for x in xs]
        if pending is None:
            agreed.copy_(xs[0])
        for s in range(STEPS):
            if (r, s) == flush_at and pending is not None:
                _advance(agreed, opt, P, pending)
                pending = None
                xs = [agreed.clone() for _ in range(S)]
                starts = [x.clone() for x in xs]
            for i in range(S):
                xs[i] = xs[i] + trained(i, r, s)
            if s + 1 == settle and pending is not None:
                _advance(agreed, opt, P, pending)
                pending = None
                xs = [agreed + (x - start) for x, start in zip(xs, starts)]
                starts = [agreed.clone() for _ in range(S)]
            if seen is not None:
                seen.append([x.clone() for x in xs])
        if not overlap and not outer:
            mean = reference_plain_average(xs, starts, G, wire, efs)
            xs = [mean.clone() for _ in range(S)]
        else:
            ms = [_mean([xs[g * G + j] for j in range(G)]) for g in range(groups) for _ in range(G)] \
                if G > 1 else [x.clone() for x in xs]
            if not overlap:
                _advance(agreed, opt, P, reference_update_mean([m - agreed for m in ms], G, wire, efs))
                xs = [agreed.clone() for _ in range(S)]
            else:
                updates = [ms[i] - starts[i] for i in range(S)]
                if pending is not None:
                    _advance(agreed, opt, P, pending)
                xs = [agreed + u for u in updates]
                pending = reference_update_mean(updates, G, wire, efs)
        out.append([x.clone() for x in xs])
    if pending is not None:
        _advance(agreed, opt, P, pending)
        xs = [agreed.clone() for _ in range(S)]
    out.append([x.clone() for x in xs])
    return out


def _advance(agreed, opt, P, mean):
    """The agreed values take the mean update: added, or an outer step on the parameters' part."""
    with torch.no_grad():
        if opt is None:
            agreed.add_(mean)
            return
        anchor = opt.param_groups[0]["params"][0]
        anchor.grad = mean[:P].neg()
        opt.step()
        anchor.grad = None
        agreed[P:].add_(mean[P:])


def shared_of(model, strategy, S):
    return torch.cat([t.detach().reshape(-1) for t in _shared_tensors(model, strategy)])


def _shared_tensors(model, strategy):
    if strategy == "resist":
        from resist_mpi.blocks.find import find_blocks
        from resist_mpi.blocks.tensors import shared_slots
        blocks = [b for _, b in find_blocks(model)]
        return [d[n] for d, n in shared_slots(model, blocks)]
    return module_tensors(model)


def params_prefix(model, strategy):
    return sum(t.numel() for t in _shared_tensors(model, strategy) if isinstance(t, torch.nn.Parameter))


def shared_updates(model, strategy, S):
    """trained(i, r, s): rank i's update of the shared values in step s of round r (as local_steps)."""
    sizes = [t.numel() for t in _shared_tensors(model, strategy)]

    def trained(i, r, s):
        return torch.cat([delta(i, r, s, n, k) for k, n in enumerate(sizes)])
    return trained
