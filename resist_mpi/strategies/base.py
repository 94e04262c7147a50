"""The protocol every strategy follows, around the user's own optimizer and local steps.

The primary form wraps the user's optimizer (built once over model.parameters(), as with Horovod
or torchft) and counts its steps:

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1000)
    with rm.ResIST(model, c, optimizer=opt, local_steps=50) as job:   # round 0 begins here
        for x, y in batches:                                          # the plain batch loop
            opt.zero_grad(); F.cross_entropy(model(x), y).backward()
            opt.step()                # every 50th step ends the round and begins the next one
            sched.step()
    # leaving the block ends a round in progress (every rank consistent, also after an exception)

The explicit form gives the rounds by hand (the optimizer may be built once or per round):

    for r in job.rounds(num_rounds):          # begin_round() before the body, end_round() after it
        for x, y in itertools.islice(batches, local_steps):
            ...                               # forward, loss.backward(), opt.step()
    with job.full_model() as full:            # the whole model, synchronised, for evaluation
        evaluate(full)
    state = job.state_dict()                  # collective; job.load_state_dict(state) resumes

What happens to the optimizer's state at a round boundary is a policy (optimizer_state):
"reset" (the paper's fresh optimizer every round), "keep_shared" (the shared layers' state
survives, the blocks' is reset) or "keep" (all state survives, except for a block that arrived
from another rank or left this one). Each distributed step is inside a method here.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import pickle
import time
import weakref
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from ..averaging.tensors import _cpu_copy, all_finite, broadcast_tensors_
from ..blocks.tensors import materialize_, module_tensors
from ..errors import NonFiniteError, UsageError

POLICIES = ("reset", "keep_shared", "keep")


class Strategy:
    """Base class. Subclasses implement _begin(), _end() and what differs of the rest.

    Args:
        model: the user's nn.Module (the strategy binds storage to it; it stays the same object,
            and so do its Parameter objects).
        comm: the Comm (resist_mpi.init()).
        optimizer: the user's torch optimizer over model.parameters() (frozen ones may be left
            out), or None (then build one per round over job.parameters(), as the paper's
            reference code did).
        scheduler: the user's LR scheduler, only so that state_dict() carries its state.
        scaler: the user's torch.amp.GradScaler, for mixed precision (with optimizer=): the steps
            of `with job:` are then counted at scaler.update(), once per iteration, since
            scaler.step(opt) skips opt.step() when this rank's gradients overflowed; state_dict()
            carries its state (each rank's own: ranks overflow on their own data).
        local_steps: with an optimizer, `with job:` ends and begins rounds every local_steps
            optimizer steps (from its step hooks; with a scaler, every local_steps iterations).
        optimizer_state: "reset", "keep_shared" or "keep" (see the module docstring); default:
            the strategy's (reset for ResIST and local SGD, keep for data-parallel).
    Attributes:
        round: index of the next round (or of the open one); restored on resume.
        comm_time: seconds spent communicating, cumulative (for metrics).
        overlap_steps: (LocalSGD, ResIST with overlap=True) the step of each round after which the
            last round's background average lands (settles); None: at the round's end.
    """

    name = "base"
    default_optimizer_state = "reset"
    # the optimizer's state is the same on every rank (data-parallel): saved once, any world size
    replicated_optimizer_state = False

    def __init__(self, model: torch.nn.Module, comm, *, optimizer: Optional[torch.optim.Optimizer] = None,
                 scheduler=None, scaler=None, local_steps: Optional[int] = None,
                 optimizer_state: Optional[str] = None):
        _check_float32(model)
        self.model, self.comm = model, comm
        self.round = 0
        self._timed = 0.0
        self._gradient_averagers: List = []  # per-step averages (GradientAverager), timed by themselves
        self._model_averagers: List = []  # Averagers of the round's end (their error feedback is per-rank state)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer= takes a torch.optim.Optimizer built over model.parameters(), "
                            f"got {type(optimizer).__name__}")
        if local_steps is not None and (optimizer is None or int(local_steps) < 1):
            raise ValueError("local_steps= needs optimizer= (the steps counted are its steps) and is at least 1")
        if scaler is not None and (optimizer is None or not callable(getattr(scaler, "update", None))
                                   or not callable(getattr(scaler, "state_dict", None))):
            raise TypeError("scaler= takes a torch.amp.GradScaler, with optimizer= (the optimizer it steps)")
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.local_steps = None if local_steps is None else int(local_steps)
        self.optimizer_state = optimizer_state or self.default_optimizer_state
        if self.optimizer_state not in POLICIES:
            raise ValueError(f"optimizer_state={self.optimizer_state!r}: choose one of {', '.join(POLICIES)}")
        self.overlap_steps: Optional[int] = None  # (--overlap) the step of a round after which last round's average lands
        self._open = False  # between begin_round() and end_round()
        self._steps = 0  # optimizer steps taken in the open round
        self._hooks: List = []
        self._round_hook = None
        self._names = {p: n for n, p in model.named_parameters()}
        self._resumed_optimizer: Optional[Dict] = None
        if optimizer is not None:
            self._check_foreign(optimizer)
            self._hooks.append(self._on_step(self._count_step))

    # -- the round protocol --------------------------------------------------------------------------
    def rounds(self, num_rounds: int) -> Iterator[int]:
        """Yield round indices from self.round to num_rounds - 1: begin_round() before each body,
        end_round() after it, also when the loop is left with break (every rank breaking at the
        same round) or the generator is closed by an exception, so the ranks stay consistent."""
        while self.round < num_rounds:
            r = self.round
            self.begin_round()
            try:
                yield r
            except GeneratorExit:
                if self._group_gradient_failed():  # (the loop was left by its NonFiniteError)
                    self._fail_round_everywhere()
                    raise
                if self._close_round():
                    self._verify()
                raise
            self.end_round()
            self._verify()

    def begin_round(self) -> None:
        """Everything before round self.round's local steps (its communication is timed)."""
        if self._open:
            raise UsageError(f"begin_round(): round {self.round} is already open; call end_round() first")
        t0 = time.perf_counter()
        self._begin()
        self._timed += time.perf_counter() - t0
        for averager in self._model_averagers:  # updates (compressed wire, overlap, outer step) count from here
            averager.mark()
        for averager in self._gradient_averagers:
            averager.failed = False
        self._open, self._steps = True, 0
        if self.optimizer is not None:
            self._prepare_optimizer()

    def end_round(self) -> None:
        """Everything after the round's local steps; the next round is self.round + 1.

        Raises NonFiniteError on every rank when an average is not finite (every rank sees the
        same average, so they agree without another collective)."""
        if not self._open:
            raise UsageError("end_round() without begin_round()")
        t0 = time.perf_counter()
        try:
            self._end()
        finally:
            self._timed += time.perf_counter() - t0
            self._open = False
            self.round += 1

    def _close_round(self) -> bool:
        """Leave an open round: end it when anything was trained in it, else just close it (its
        exchange already put every block where the round needs it; beginning it again moves nothing).
        Whether it ended a round."""
        if not self._open:
            return False
        if self._steps > 0 or self.optimizer is None:
            self.end_round()
            return True
        self._abandon_round()  # (nothing trained: closing it without an average loses nothing)
        return False

    def _abandon_round(self) -> None:
        """Close an open round without ending it: nothing is averaged, the round stays self.round."""
        self._open = False

    def _group_gradient_failed(self) -> bool:
        """Whether a per-step gradient average inside a group (fewer ranks than the world) was not
        finite in the open round: it raised in this group only."""
        return self._open and any(g.failed and g.comm.size < self.comm.size for g in self._gradient_averagers)

    def _average_pending(self) -> bool:
        return any(a.pending for a in self._model_averagers)

    def _fail_round_everywhere(self) -> None:
        """Close the open round after a gradient average inside this rank's group was not finite.

        That raised in this group only; the other groups train on to the round's average across the
        groups. This rank enters it as the training loop would (the same collectives: the round's
        end, and with an overlapped average the next round's start and the wait for it), with a
        model made not finite, so that the average raises NonFiniteError on every rank and every
        rank leaves the same round: load_state_dict() then takes the last good state everywhere.
        (Without this the group left and the others waited in their average, or met the group's
        next collectives in it.)"""
        with torch.no_grad():
            for t in module_tensors(self.model):
                if t.is_floating_point():
                    t.fill_(float("nan"))
        try:
            self.end_round()
            self._verify()
            if self._average_pending():  # overlapped: it lands in the next round
                self.begin_round()
                self.flush()
        except NonFiniteError:
            pass
        if self._open:
            self._abandon_round()

    @property
    def comm_time(self) -> float:
        """Seconds spent communicating so far: round starts and ends (waits for background
        averages included), and per-step averages."""
        return self._timed + sum(g.comm_time for g in self._gradient_averagers)

    @property
    def hidden_time(self) -> float:
        """Seconds background averages (--overlap) ran while training computed, so far."""
        return sum(a.hidden for a in self._model_averagers)

    def bn_to_recalibrate(self) -> Optional[List[torch.nn.Module]]:
        """The BN modules whose statistics an evaluation of the full model must re-estimate
        (None: all of them)."""
        return None

    def finite(self) -> bool:
        """Whether every tensor this rank holds is finite (a local check, no communication)."""
        return all(all_finite(t) for t in module_tensors(self.model))

    def prepare_round(self) -> None:
        """Ready the next round before a full_model() that it follows (collective, between rounds),
        so that begin_round() finds nothing left to move: ResIST draws the next assignment and
        every rank keeps that round's blocks after the gather. The trainer calls it before every
        evaluation but the last. The base strategies move nothing at a round's start: nothing to do."""
        self._check_boundary("prepare_round()")

    def evaluation_copy(self, flush: bool = True) -> "ModelCopy":
        """A copy of the synchronised model, to evaluate in the background while training goes on
        (collective, between rounds).

        copy.model is this rank's own copy: training never touches it, and evaluating it changes
        nothing in training. copy.complete(), run on the background thread (Comm.submit), makes it
        the full model full_model() would give, to the bit, with collectives on background
        communicators only (ResIST: gathers the blocks this rank lacks; the base strategies hold the
        full model already). copy.comm is a background communicator of every rank for the
        evaluation's own collectives (BN statistics, counts); copy.bn the copy's modules of
        bn_to_recalibrate().

        flush: apply a pending overlapped average first (--overlap; the next round then starts from
        the averaged values, as after full_model()). With flush=False the average stays in flight
        and training goes on exactly as without the copy: the copy takes the averaged values when
        the average lands (in the next round: at its end, or after its overlap_steps-th step; or at a
        flush()), and copy.ready says when;
        complete() before that raises UsageError. (Without a pending average both are the same.)"""
        self._check_boundary("evaluation_copy()")
        if flush:
            self.flush()
        memo: Dict = {}
        model = copy.deepcopy(self.model, memo)  # memo: each of this model's tensors -> its copy
        complete, comms = self._completion(model)
        out = ModelCopy(model, self._background("world", self.comm), _same_modules(self.model, model, self.bn_to_recalibrate()),
                        complete, comms)
        for averager in self._model_averagers:
            out.wait_for(averager, lambda t: memo[id(t)])
        return out

    def _completion(self, model: torch.nn.Module):
        """(what makes the copy model the full model, the background communicators it uses); the
        base strategies hold the full model already."""
        return None, ()

    def _background(self, key: str, c):
        """The background communicator (a dup) of c kept under key: made once, collective then."""
        comms = self.__dict__.setdefault("_background_comms", {})
        if key not in comms:
            comms[key] = c.dup()
        return comms[key]

    def _forget_state(self, params) -> None:
        """Drop the optimizer state of params (their values came from another copy) under the
        policies that keep state; what _prepare_optimizer would drop at the round's start."""
        if self.optimizer is None or self.optimizer_state == "reset":
            return
        for p in params:
            self.optimizer.state.pop(p, None)

    def _begin(self) -> None:
        pass

    def _end(self) -> None:
        pass

    def checksum(self) -> Optional[float]:
        """With a compressed wire, a checksum of what every rank must hold alike after end_round()
        (None otherwise): reduce [c, -c] with max; unequal ranks give max != -max(-c)."""
        sums = [a.checksum() for a in self._model_averagers]
        sums = [x for x in sums if x is not None]
        return float(sum(sums) % (1 << 50)) if sums else None

    def verify_consistent(self, high: float, low_negated: float) -> bool:
        """After the reduction of [checksum, -checksum] with max: when ranks differ (a round ended
        on some ranks only), give every rank rank 0's values and say so once; collective."""
        if high == -low_negated:
            return True
        if self.comm.rank == 0:
            import sys
            sys.stderr.write(f"resist_mpi: warning: round {self.round - 1}: ranks ended the round with different "
                             f"averaged values (a round left on some ranks only?); rank 0's values given to all\n")
        for averager in self._model_averagers:
            if averager.feedback is not None:
                averager.resync()
        return False

    def _verify(self) -> None:
        """The library's loops: one small reduction per round, only with a compressed wire."""
        chk = self.checksum()
        if chk is not None and self.comm.size > 1:
            with self.comm.as_control():
                high, low = self.comm.reduce_stats([chk, -chk], "max")
            self.verify_consistent(high, low)

    def poll(self) -> None:
        """Let background averages progress (--overlap); called after every optimizer step."""
        for averager in self._model_averagers:
            averager.poll()

    def flush(self) -> None:
        """Wait for background averages and apply them (--overlap), so every rank holds the same
        model; full_model(), evaluation_copy() (unless told not to) and the end of training call it."""
        for averager in self._model_averagers:
            averager.flush()

    # -- the hook form: `with job:` ----------------------------------------------------------------------
    def __enter__(self) -> "Strategy":
        if self.optimizer is None or self.local_steps is None:
            raise UsageError("`with job:` ends rounds from the optimizer's steps: pass optimizer=opt and "
                             "local_steps=l when building the strategy (or use `for r in job.rounds(n)`)")
        self._round_hook = self._on_step(self._after_step)
        if not self._open:
            self.begin_round()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._round_hook.remove()
        self._round_hook = None
        if exc_type is not None and issubclass(exc_type, NonFiniteError) and self._group_gradient_failed():
            self._fail_round_everywhere()  # only this group raised: the others learn of it in the round's average
        elif exc_type is not None and issubclass(exc_type, NonFiniteError):
            # a broken model is not averaged again: every rank of the average that raised did raise
            # (they saw the same values), and each closes the round where it stands, so that
            # load_state_dict() takes the last good state (a round's average closed its round already)
            self._abandon_round()
        elif exc_type is None or issubclass(exc_type, (Exception, KeyboardInterrupt)):
            # any other exception (raised on every rank, or the others meet this one in the round's
            # average) still leaves the ranks consistent
            if self._close_round():
                self._verify()  # (a round closed before any step ends nothing: the last end verified)
            self.flush()
        return False

    def _on_step(self, hook):
        """Call hook(optimizer, args, kwargs) after every step of the training loop: the optimizer's
        step, or with a scaler its update(), which every iteration reaches (a removable handle)."""
        if self.scaler is None:
            return self.optimizer.register_step_post_hook(hook)
        return _scaler_update_hook(self.scaler, lambda: hook(self.optimizer, (), {}))

    def _count_step(self, optimizer, args, kwargs) -> None:
        if self._open:
            self._steps += 1
            self._stepped()

    def _stepped(self) -> None:
        """After each counted step of the open round: background averages progress, and with
        overlap_steps=k the one in flight lands after the round's k-th step (its wait is timed)."""
        self.poll()
        if self._steps == self.overlap_steps:
            t0 = time.perf_counter()
            for averager in self._model_averagers:
                averager.settle()
            self._timed += time.perf_counter() - t0

    def _set_overlap_steps(self, overlap: bool, overlap_steps: Optional[int]) -> None:
        """overlap_steps=k (with overlap=True): last round's average lands after k steps of the
        next round instead of at its end (the optimizer's steps, counted by its hooks)."""
        if overlap_steps is None:
            return
        k = int(overlap_steps)
        if not overlap or self.optimizer is None or k < 1 or (self.local_steps is not None and k >= self.local_steps):
            raise ValueError(f"overlap_steps={overlap_steps}: needs overlap=True and optimizer= (its steps are "
                             f"counted), at least 1 and below local_steps (local_steps itself is the default: "
                             f"overlap_steps=None)")
        self.overlap_steps = k

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._steps >= self.local_steps:
            self.end_round()
            self._verify()
            self.begin_round()

    def close(self) -> None:
        """Take every hook this strategy put on the optimizer and the model's parameters off."""
        self._drop_step_hooks()
        for averager in self._gradient_averagers:
            averager.remove()

    def _drop_step_hooks(self) -> None:
        """Stop counting the training loop's steps (the hooks on the optimizer's step or scaler's update)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- what this rank trains ----------------------------------------------------------------------
    def param_groups(self) -> List[Dict]:
        """This round's parameters as optimizer groups [{'params': [...], 'name': ...}]."""
        return [{"params": list(self.model.parameters()), "name": "shared"}]

    def parameters(self) -> List[torch.nn.Parameter]:
        """The parameters this rank trains this round (a per-round optimizer is built on these)."""
        return [p for g in self.param_groups() for p in g["params"]]

    def shared_parameters(self) -> List[torch.nn.Parameter]:
        """Parameters every rank trains every round (their state survives "keep_shared")."""
        return [p for g in self.param_groups() if g.get("name") == "shared" for p in g["params"]]

    def _moved_parameters(self) -> List[torch.nn.Parameter]:
        """Parameters whose values came from (or went to) another rank at this round's start: their
        optimizer state belongs to another copy and is reset under "keep"."""
        return []

    def _check_foreign(self, optimizer: torch.optim.Optimizer) -> None:
        mine = set(self.model.parameters())
        held = [p for g in optimizer.param_groups for p in g["params"]]
        foreign = [p for p in held if p not in mine]
        if foreign:
            raise UsageError(f"the optimizer holds {len(foreign)} tensor(s) that are not parameters of the model "
                             f"given to the strategy (the first has shape {tuple(foreign[0].shape)}): build it "
                             f"over that model's parameters(), e.g. SGD(model.parameters(), ...)")
        # every rank, now: a round's check below finds it only where a block left out first arrives
        held = set(held)
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and p not in held]
        if missing:
            raise UsageError(f"the optimizer does not hold {len(missing)} trainable parameter(s) of the model (the "
                             f"first: {missing[0]}): build it over model.parameters() (frozen ones, "
                             f"requires_grad=False, may be left out)")

    def _prepare_optimizer(self) -> None:
        """At a round's start: check the optimizer covers this round's trainable parameters (frozen
        ones, requires_grad=False, may be left out: nothing steps them), apply the state policy."""
        opt = self.optimizer
        held = {p for g in opt.param_groups for p in g["params"]}
        missing = [p for p in self.parameters() if p.requires_grad and p not in held]
        if missing:
            raise UsageError(f"round {self.round}: the optimizer does not hold {len(missing)} parameter(s) this rank "
                             f"trains (the first: {self._names.get(missing[0], '?')}): build it over "
                             f"model.parameters() so that every block it may receive is in it")
        if self._resumed_optimizer is not None:  # from a checkpoint: the state as the run left it
            # its hyper-parameters as they are now: load_state_dict() set the saved ones already, and
            # the loop may have changed them since (a lower lr after a roll-back), which torch's
            # load_state_dict() would undo with the saved copy's
            hyper = _hyper_parameters(opt)
            opt.load_state_dict(self._resumed_optimizer)
            _load_hyper_parameters(opt, hyper)
            self._resumed_optimizer = None
        if self.optimizer_state == "reset":
            opt.state.clear()
            return
        keep = set(self.shared_parameters()) if self.optimizer_state == "keep_shared" else None
        moved = set(self._moved_parameters())
        for p in list(opt.state):
            if (keep is not None and p not in keep) or p in moved or p.numel() == 0:
                del opt.state[p]

    def _check_boundary(self, what: str) -> None:
        if self._open and (self._steps > 0 or self.optimizer is None):
            raise UsageError(f"{what} in the middle of round {self.round}: every rank holds a different model "
                             f"then; call it between rounds (after end_round(), outside the rounds() body, or "
                             f"right after the optimizer step that ended a round)")

    # -- the whole model -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def full_model(self):
        """The full, synchronised model (every rank: the same), for evaluation and checkpoints.
        Collective: every rank enters it. The base strategies hold the full model already."""
        self._check_boundary("full_model()")
        self.flush()
        with _bn_restored(self.model):
            yield self.model

    def state_dict(self) -> Dict:
        """Everything a resume needs, collective (ResIST gathers the model): the full model, the
        round, the optimizer's hyper-parameters (its param_groups: lr, momentum, ...; the same on
        every rank), its state where the policy keeps it, the scheduler's state, and every rank's
        own state (rank 0 receives them all; the others keep their own), so one file written by
        rank 0 resumes every rank."""
        self._check_boundary("state_dict()")
        with self.full_model() as full:
            model = {k: v.detach().cpu().clone() for k, v in full.state_dict().items()}
        state = {"strategy": self.name, "round": self.round, "model": model, "world_size": self.comm.size,
                 "group_size": self._group_size()}
        if self.optimizer is not None:
            # whatever the state policy: a chainable scheduler (StepLR, MultiStepLR) goes on from the
            # lr the groups hold, which loading its own state does not set
            state["param_groups"] = _hyper_parameters(self.optimizer)
        if self.optimizer is not None and self.replicated_optimizer_state:
            # a snapshot: torch's optimizer.state_dict() holds the live state tensors (momentum, exp_avg),
            # which the next steps change in place, so a state kept in memory to roll back to did not stay
            state["optimizer"] = _cpu_copy(self.optimizer.state_dict())
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:  # (this rank's; a resume on another world size gives it every rank)
            state["scaler"] = self.scaler.state_dict()
        shared = [a.state_dict() for a in self._model_averagers]
        if any(x is not None for x in shared):
            state["averagers"] = shared  # the outer optimizer's parameter and state: the same everywhere
        own = self.rank_state_dict()
        gathered = gather_object(self.comm, own, root=0)
        state["rank_states"] = gathered if gathered is not None else \
            [own if r == self.comm.rank else None for r in range(self.comm.size)]
        return state

    def rank_state_dict(self) -> Optional[Dict]:
        """What differs between ranks and a resume on the same world size needs (the optimizer's
        state under a keep policy, a compressed wire's error feedback, an overlapped average in
        flight), or None."""
        state = {}
        if self.optimizer is not None and not self.replicated_optimizer_state and self.optimizer_state != "reset":
            state["optimizer"] = _cpu_copy(self.optimizer.state_dict())  # a snapshot (state_dict() says why)
        if self.scaler is not None and not self.replicated_optimizer_state:
            state["scaler"] = self.scaler.state_dict()
        own = [a.rank_state_dict() for a in self._model_averagers]
        if any(x is not None for x in own):
            state["averagers"] = own
        return state or None

    def _group_size(self) -> int:
        groups = getattr(self, "groups", None)
        return groups.size if groups is not None else 1

    def load_state_dict(self, state: Dict, rank_state: Optional[Dict] = None) -> None:
        """Continue from a state_dict() (every rank the same state). rank_state: this rank's own
        part, when not in state["rank_states"]; it is used only on the world and group sizes it was
        written on (another layout pairs a rank with other peers: the keep policies' optimizer
        state and a compressed wire's error feedback would belong to another average)."""
        if self._open:
            raise UsageError("load_state_dict() in the middle of a round: load before the first round")
        self._load_model(state["model"])
        self.round = int(state.get("round", 0))
        same_layout = (int(state.get("world_size", self.comm.size)) == self.comm.size
                       and int(state.get("group_size", self._group_size())) == self._group_size())
        if not same_layout:
            rank_state = None
        elif rank_state is None and state.get("rank_states"):
            rank_state = state["rank_states"][self.comm.rank]
        self._resumed_optimizer = state.get("optimizer") or (rank_state or {}).get("optimizer")
        if self.optimizer is not None and state.get("param_groups") is not None:  # (older states have none)
            _load_hyper_parameters(self.optimizer, state["param_groups"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._load_scaler((rank_state or {}).get("scaler") or state.get("scaler"))
        shared = state.get("averagers") or [None] * len(self._model_averagers)
        own = (rank_state or {}).get("averagers") or [None] * len(self._model_averagers)
        for averager, s, r in zip(self._model_averagers, shared, own):
            averager.load_state_dict(s, r)

    def _load_scaler(self, state: Optional[Dict]) -> None:
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)

    def _load_model(self, weights: Dict) -> None:
        self.model.load_state_dict(weights)

    # -- sharded checkpoints (resist_mpi.cli.checkpoint): each rank its own part, no communication -----------
    def shard(self):
        """This rank's part of a sharded checkpoint at a round boundary (CPU copies; no communication)."""
        raise NotImplementedError(f"{type(self).__name__} has no sharded checkpoints")

    def load_shards(self, reader, round_index: int, same_layout: bool) -> None:
        """Continue from a sharded checkpoint at round round_index (collective for ResIST: the first
        round's assignment). same_layout: the checkpoint's world and group sizes are this run's, so
        per-rank state is used; otherwise it starts afresh and an average in flight is applied."""
        raise NotImplementedError(f"{type(self).__name__} has no sharded checkpoints")

    def _shared_part(self, shard, model_state: Dict, keys, loads: Sequence[int]) -> None:
        """The shared part of shard: what every rank holds alike, written once. keys: the averaged
        entries of model_state. loads: the bytes each rank writes anyway (its blocks).

        With plain averages every rank holds those entries alike, to the bit, at a round boundary
        (the round's average just gave them the same values), so they are dealt out over the ranks
        (shard.deal) and each writes its part; rank 0 writes the rest (counters, the averagers'
        and the optimizer's state) in shared.pt. With an overlapped average or an outer step the
        ranks' values differ until it is applied, and rank 0 writes everything."""
        from .shard import deal
        owner: Dict[str, int] = {}
        if self.comm.size > 1 and all(a.plain for a in self._model_averagers):
            owner = deal({k: model_state[k].numel() * model_state[k].element_size() for k in keys}, loads)
        if self.comm.rank != 0:
            shard.dealt = _cpu_copy({k: model_state[k] for k, r in owner.items() if r == self.comm.rank})
            return
        model = {k: (None if owner.get(k, 0) else v) for k, v in model_state.items()}
        state = {"strategy": self.name, "round": self.round, "model": _cpu_copy(model),
                 "dealt": {k: r for k, r in owner.items() if r}, "averaged_keys": keys,
                 "averagers": [a.state_dict() for a in self._model_averagers]}
        if self.optimizer is not None and self.replicated_optimizer_state:
            state["optimizer"] = _cpu_copy(self.optimizer.state_dict())
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        shard.shared = state

    def _rank_shard(self) -> Dict:
        return _cpu_copy(self.rank_state_dict() or {})

    def _load_shared_parts(self, reader, same_layout: bool) -> None:
        """Optimizer and averagers from a sharded checkpoint (after the model's tensors)."""
        shared = reader.shared
        own = reader.rank_state(self.comm.rank) if same_layout else {}
        self._resumed_optimizer = shared.get("optimizer") or own.get("optimizer")
        self._load_scaler(own.get("scaler") or shared.get("scaler"))
        globals_ = shared.get("averagers") or [None] * len(self._model_averagers)
        ranks = own.get("averagers") or [None] * len(self._model_averagers)
        for i, (averager, g, r) in enumerate(zip(self._model_averagers, globals_, ranks)):
            if same_layout:
                averager.load_state_dict(g, r)
                continue
            from .shard import flushed_values
            flushed = flushed_values(reader, i)
            if flushed is None:
                averager.load_state_dict(g, None)
            else:  # the old world's average in flight, applied here: every rank starts from it
                values, outer = flushed
                averager.load_state_dict({**g, "agreed": values, "outer": outer}, None)
                averager.set_values(values)


class Replicated(Strategy):
    """Every rank holds the full model (local SGD, data-parallel): rank 0's weights are given to all
    at construction, on ranks whose model was built on the meta device too."""

    def __init__(self, model, comm, *, device=None, synchronized: bool = False, **kw):
        if any(t.is_meta for t in model.state_dict().values()):
            # device="meta": shapes only, to count what rounds move (resist_mpi.tools.traffic)
            if comm.rank == 0 and str(device) != "meta":
                raise ValueError("rank 0's model is on the meta device: it must hold the initial weights")
            materialize_(model, device or "cpu")  # the same Parameter objects, given storage
        super().__init__(model, comm, **kw)
        if not synchronized:
            # ---- distributed step: one fused broadcast of rank 0's initial model ----
            broadcast_tensors_(comm, module_tensors(model))

    def shared_parameters(self) -> List[torch.nn.Parameter]:
        return list(self.model.parameters())

    def shard(self):
        from ..blocks.tensors import module_keys
        from .shard import Shard
        shard = Shard(rank=self._rank_shard())
        self._shared_part(shard, self.model.state_dict(), module_keys(self.model), [0] * self.comm.size)
        return shard

    def load_shards(self, reader, round_index: int, same_layout: bool) -> None:
        if self._open:
            raise UsageError("load_shards() in the middle of a round: load before the first round")
        self.model.load_state_dict(reader.shared["model"])
        self.round = round_index
        self._load_shared_parts(reader, same_layout)


class ModelCopy:
    """A rank's own copy of the model, evaluated in the background (Strategy.evaluation_copy)."""

    def __init__(self, model: torch.nn.Module, comm, bn: Optional[List[torch.nn.Module]], complete=None,
                 comms: Sequence = ()):
        self.model, self.comm, self.bn = model, comm, bn
        self._complete = complete
        self.comms = [comm, *comms]  # every background communicator it uses
        self._awaiting = 0  # overlapped averages still to land in it (evaluation_copy(flush=False))

    @property
    def ready(self) -> bool:
        """Whether the copy holds the synchronised values (every overlapped average it waits for landed)."""
        return self._awaiting == 0

    def wait_for(self, averager, copy_of) -> None:
        """Take averager's pending average when it lands (Averager.deliver_to; copy_of maps each
        averaged tensor to the copy's)."""
        self._awaiting += 1
        averager.deliver_to(copy_of, self._landed)

    def _landed(self) -> None:
        self._awaiting -= 1

    def complete(self) -> None:
        """Make the copy the full model (on the background thread: background communicators only)."""
        if not self.ready:
            raise UsageError("ModelCopy.complete(): an overlapped average this copy waits for has not landed "
                             "yet (it lands in the next round, at its end or after its overlap_steps-th step, or at the "
                             "strategy's flush())")
        if self._complete is not None:
            self._complete()

    def count_into(self, c) -> None:
        """Add what the copy's communicators moved since the last time to c's counters (Comm.absorb)."""
        for comm in self.comms:
            c.absorb(comm)


def _same_modules(model: torch.nn.Module, copied: torch.nn.Module, modules: Optional[Sequence[torch.nn.Module]]):
    """copied's counterparts of model's modules (None stays None)."""
    if modules is None:
        return None
    index = {id(m): i for i, m in enumerate(model.modules())}
    mine = list(copied.modules())
    return [mine[index[id(m)]] for m in modules]


@contextlib.contextmanager
def _bn_restored(model: torch.nn.Module):
    """BN running statistics (and counters) as they were, after the block: an evaluation
    (recalibration, batch statistics) changes nothing in training."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.running_mean is not None]
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, n in saved:
                if m.running_mean.shape == mean.shape:  # a block released meanwhile has no storage
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(n)


def _check_float32(model: torch.nn.Module) -> None:
    """Every averaged or exchanged tensor moves in float32 buffers: a model in another precision is
    refused with what to do instead."""
    names = [(n, t.dtype) for n, t in [*model.named_parameters(), *model.named_buffers()]
             if t.is_floating_point() and t.dtype != torch.float32]
    if names:
        raise UsageError(f"resist_mpi trains float32 models; {names[0][0]} is {names[0][1]} ({len(names)} such "
                         f"tensor(s)): keep the weights float32 and compute in lower precision with "
                         f"torch.autocast (and a torch.amp.GradScaler: scaler=)")


# hooks called after a GradScaler's update(), per scaler (a GradScaler has none of its own); kept
# outside the scaler, so that it still pickles (its __getstate__ copies its __dict__)
_SCALER_HOOKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _update_then_hooks(scaler, *args, **kwargs):
    out = type(scaler).update(scaler, *args, **kwargs)
    for hook in list(_SCALER_HOOKS.get(scaler, {}).values()):  # (a hook may register another)
        hook()
    return out


def _scaler_update_hook(scaler, hook):
    """Call hook() after every scaler.update(): the instance's update becomes the class's followed
    by the hooks registered here, in order; returns a removable handle."""
    hooks = _SCALER_HOOKS.get(scaler)
    if hooks is None:
        hooks = _SCALER_HOOKS[scaler] = collections.OrderedDict()  # (a handle holds a weak reference)
        scaler.update = functools.partial(_update_then_hooks, scaler)  # (a partial of a module function pickles)
    handle = torch.utils.hooks.RemovableHandle(hooks)
    hooks[handle.id] = hook
    return handle


def _hyper_parameters(optimizer: torch.optim.Optimizer) -> List[Dict]:
    """A copy of the optimizer's param_groups without their parameters: lr, momentum,
    weight_decay, ..., and a scheduler's initial_lr."""
    return [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups]


def _load_hyper_parameters(optimizer: torch.optim.Optimizer, groups: List[Dict]) -> None:
    """Give the optimizer's param_groups the hyper-parameters of _hyper_parameters() (copies: a
    scheduler may change a tensor lr in place, and the same state may be loaded again)."""
    if len(groups) != len(optimizer.param_groups):
        raise UsageError(f"load_state_dict(): the state holds {len(groups)} optimizer parameter group(s), the "
                         f"optimizer {len(optimizer.param_groups)}: build it as the run that saved the state did")
    for group, saved in zip(optimizer.param_groups, groups):
        group.update(copy.deepcopy(saved))


def gather_object(c, obj, root: int = 0):
    """Every rank's picklable object, in rank order, on root (None elsewhere); collective.

    One all-to-all of the pickled bytes (in float32 containers, as every backend moves float32),
    each rank sending only to root; counted as payload bytes.
    """
    if c.size == 1:
        return [obj]
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    n = len(payload)
    raw = bytearray(8 + n + (-(8 + n) % 4))
    raw[:8] = n.to_bytes(8, "little")
    raw[8:8 + n] = payload
    send = torch.frombuffer(raw, dtype=torch.float32).clone()
    counts = [0] * c.size
    counts[root] = send.numel()
    recv, got = c.alltoallv(send, counts)
    if c.rank != root:
        return None
    recv = recv.cpu()
    out, offset = [], 0
    for k in got:
        chunk = recv[offset:offset + k].numpy().tobytes()
        offset += k
        out.append(pickle.loads(chunk[8:8 + int.from_bytes(chunk[:8], "little")]))
    return out
