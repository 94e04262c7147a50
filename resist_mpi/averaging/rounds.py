"""A round's average of model tensors (Averager): plain, hierarchical over groups, compressed,
overlapped with the next round, with an outer optimizer step; and replaying an outer step on load."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import torch

from ..comm import Comm
from ..comm.fusion import flatten_, is_view_of, unpack_
from ..errors import NonFiniteError
from ..plan.groups import Groups, slice_counts
from .compression import ErrorFeedback
from .tensors import _check_finite, _cpu_copy

OuterFactory = Callable[[List[torch.nn.Parameter]], torch.optim.Optimizer]


class Averager:
    """Averages a fixed list of tensors over ranks in place at every round's end.

    The tensors are moved into one flat buffer and become views of it (the "flat parameter"
    technique), so each average is one prepared collective of that buffer with no copies
    (benchmarks/sync_bench.py measures it against raw MPI). Parameter objects stay the same (their
    .data moves), so optimizers built before keep working. If something replaced the tensors since
    (module.to(), load_state_dict(assign=True)), the buffer is rebuilt. The parameters must come
    first in tensors(), the float buffers (BN statistics) after them.

    Three independent choices (the defaults are the paper's plain average, bit for bit):

    - groups: the average is hierarchical: inside the group (the fast link), then each member its
      slice across the groups, then the group puts the slices back together.
    - wire_dtype float16 / bfloat16 / int8: what crosses the groups is each round's update,
      compressed, with error feedback (resist_mpi.averaging.compression).
    - outer: a factory params -> torch optimizer (DiLoCo: SGD(lr=0.7, momentum=0.9,
      nesterov=True)). The averaged update of a round is the pseudo-gradient (its negative) of an
      outer step on the round's starting values of the parameters; BN statistics are averaged.
    - overlap: the average of round r's update (across the groups) runs in the background while
      round r+1 trains (started by mark(), when round r+1 starts, so that what its start moves,
      ResIST's blocks, has the link to itself); at round r+1's end each rank replaces its own
      round-r update by the average one and keeps its round-r+1 progress: x <- x - own_r +
      mean_r, computed as agreed + own_{r+1} where agreed (the same on every rank) has taken
      mean_r (or the outer step), so no rounding accumulates in x and a flush leaves every rank
      the same bits. settle() applies it after some of round r+1's steps instead (the strategies'
      overlap_steps: a shorter delay, less time to hide the average in), keeping those steps;
      flush() waits and applies at once, between rounds (full_model(), the end of training);
      deliver_to() gives another copy of the tensors (an evaluation's) the values a flush would,
      when the average lands in its own time, and changes nothing in training.

    Args:
        comm: the Comm to average over.
        tensors: a function returning the tensors, in a fixed order (called on every average, so
            tensors replaced since are seen).
        groups: a Groups of comm's ranks, or None (one flat allreduce).
        wire_dtype, outer, overlap: see above.
    Attributes:
        exposed, hidden: seconds spent waiting for background averages, and seconds they ran while
            the training thread computed (the part of their time that cost nothing).
    """

    def __init__(self, comm: Comm, tensors: Callable[[], List[torch.Tensor]], groups: Optional[Groups] = None,
                 wire_dtype: str = "float32", overlap: bool = False, outer: Optional[OuterFactory] = None):
        self.comm, self._tensors = comm, tensors
        self.groups = groups if groups is not None and groups.inner is not None else None
        across = self.groups.across if self.groups is not None else comm
        # compressed: each round's update, with error feedback (resist_mpi.averaging.compression)
        self.feedback = ErrorFeedback(across, wire_dtype) if wire_dtype != "float32" else None
        self.overlap, self._outer_factory = bool(overlap), outer
        self.outer: Optional[torch.optim.Optimizer] = None
        self.anchor: Optional[torch.nn.Parameter] = None  # the outer step's parameter: agreed[:params]
        self.flat: Optional[torch.Tensor] = None
        self.agreed: Optional[torch.Tensor] = None  # what every rank holds alike (outer step, overlap)
        self.start: Optional[torch.Tensor] = None  # the round's starting values (overlap)
        self._steps: List[Callable] = []
        self._params = 0  # elements of the parameters' part of the buffer (a prefix)
        self._pending = None  # (Work, own update, mean buffer, residual before it) of the last round
        self._deferred: Optional[torch.Tensor] = None  # the update of the round just ended, not yet started
        self._deliveries: List[tuple] = []  # (tensors, callback): copies waiting for the pending average (deliver_to)
        self.exposed = self.hidden = 0.0
        self._bg_world = self._bg = None
        if self.overlap:
            # ---- distributed step (once): background communicators (a copy of the world, its groups) ----
            self._bg_world = comm.dup()
            self._bg = Groups(self._bg_world, self.groups.size) if self.groups is not None else None

    # -- the buffer ------------------------------------------------------------------------------------
    def _buffer(self) -> torch.Tensor:
        tensors = self._tensors()
        if self.flat is None or not is_view_of(tensors, self.flat):
            if self.pending:
                raise RuntimeError("the averaged tensors were replaced while a background average was in flight")
            is_param = [isinstance(t, torch.nn.Parameter) for t in tensors]
            if is_param != sorted(is_param, reverse=True):
                raise ValueError("Averager: the parameters must come before the buffers in tensors()")
            self._params = sum(t.numel() for t, p in zip(tensors, is_param) if p)
            self.flat = flatten_(tensors)
            self._steps = self._prepare(self.flat)
        return self.flat

    def _part(self, flat: torch.Tensor) -> torch.Tensor:
        """What this rank averages across: the whole buffer, or its slice of it with groups."""
        if self.groups is None:
            return flat
        start, stop = self.groups.my_slice(flat.numel())
        return flat[start:stop]

    def _prepare(self, flat: torch.Tensor) -> List[Callable]:
        g = self.groups
        if g is None:
            return [self.comm.prepare_allreduce(flat)]
        start, stop = g.my_slice(flat.numel())
        return [g.inner.prepare_allreduce(flat), g.across.prepare_allreduce(flat[start:stop]),
                g.inner.prepare_allgather(flat, slice_counts(flat.numel(), g.size))]

    @property
    def plain(self) -> bool:
        """Today's average (values, or start + compressed update), without outer step or overlap."""
        return self._outer_factory is None and not self.overlap

    # -- a round -----------------------------------------------------------------------------------------
    def mark(self) -> None:
        """The round starts: remember the values its update starts from (when anything needs them)."""
        flat = self._buffer()
        if self.plain:
            if self.feedback is not None:
                self.feedback.mark(self._part(flat))
            return
        if self.agreed is None or self.agreed.numel() != flat.numel():
            self._allocate(flat)
        self._launch_deferred()  # after the round's start, e.g. ResIST's block exchange: alone on the link
        if self._pending is None:  # every rank holds the agreed values now
            self.agreed.copy_(flat)
        if self.overlap:
            self.start.copy_(flat)

    def _allocate(self, flat: torch.Tensor) -> None:
        self.agreed = torch.empty_like(flat)
        self.start = torch.empty_like(flat) if self.overlap else None
        if self._outer_factory is not None:  # its parameter is the agreed parameters' part, in place
            self.anchor = torch.nn.Parameter(self.agreed[:self._params])
            self.outer = self._outer_factory([self.anchor])

    def average(self) -> None:
        """The round ends: average (or, with overlap, apply last round's average and start this one's).
        Raises NonFiniteError on every rank when the average is not finite."""
        flat = self._buffer()
        if self.plain:
            self._plain_average(flat)
            _check_finite(flat, "the round's average")
            return
        if self.groups is not None:
            self._steps[0]()  # ---- distributed step: the group's average (full precision, the fast link) ----
        if not self.overlap:
            update = flat - self.agreed
            self._reduce(update, self.comm if self.groups is None else self.groups.across,
                         None if self.groups is None else self.groups.inner)
            _check_finite(update, "the round's average update")
            self._advance(update)
            flat.copy_(self.agreed)
            return
        update = flat - self.start
        self._apply_pending()
        torch.add(self.agreed, update, out=flat)  # the agreed values plus this rank's round, one round late
        # started when the next round starts (mark()), after what its start moves (ResIST's blocks),
        # which would otherwise share the link with it; nothing changes these tensors in between
        self._deferred = update
    def _plain_average(self, flat: torch.Tensor) -> None:
        if self.feedback is None:
            # ---- distributed step: one allreduce of the flat buffer (three, hierarchical, with groups) ----
            for step in self._steps:
                step()
            return
        inner, _, gather = self._steps if self.groups is not None else (None, None, None)
        if inner is not None:
            inner()  # ---- distributed step: the group's average (full precision, the fast link) ----
        # ---- distributed step: the compressed average of the round's update across ranks (or groups) ----
        # (with groups, a member whose slice is not finite goes on to the gather, and every rank
        # finds the NaN in the whole buffer after it: raising here would leave the others waiting)
        self.feedback.average(self._part(flat), check=inner is None)
        if gather is not None:
            gather()  # ---- distributed step: the group puts the slices together ----

    def _reduce(self, update: torch.Tensor, across: Comm, inner: Optional[Comm]) -> None:
        """update <- its mean over every rank: this member's slice across the groups (compressed
        with a wire dtype), then gathered in the group (inner), on the communicators given."""
        part = self._part(update)
        if self.feedback is None:
            # ---- distributed step: the update's average across ranks (or groups) ----
            across.allreduce_mean_(part)
        else:
            # ---- distributed step: the compressed average of the update across ranks (or groups) ----
            part.copy_(self.feedback.reduce(part, across, check=inner is None))  # (see _plain_average)
        if inner is not None:
            # ---- distributed step: the group puts the slices together ----
            inner.allgather_(update, slice_counts(update.numel(), self.groups.size))

    def _advance(self, mean: torch.Tensor) -> None:
        """The agreed values take a round's averaged update: added (the plain mean), or, on the
        parameters, an outer step with the update as the negative pseudo-gradient (BN statistics
        are added)."""
        with torch.no_grad():
            if self.outer is None:
                self.agreed.add_(mean)
                return
            P = self._params
            self.anchor.grad = mean[:P].neg()  # the pseudo-gradient: start minus the average of the trained values
            self.outer.step()
            self.anchor.grad = None
            self.agreed[P:].add_(mean[P:])

    # -- overlap -----------------------------------------------------------------------------------------
    def _launch_deferred(self) -> None:
        if self._deferred is not None:
            update, self._deferred = self._deferred, None
            self._launch(update)

    def _launch(self, update: torch.Tensor) -> None:
        """Start the mean of this round's update in the background (the training thread goes on)."""
        buf = update.clone()
        residual = None if self.feedback is None or self.feedback.residual is None else self.feedback.residual.clone()
        if self.feedback is None and self.groups is None:
            # ---- distributed step (background): the update's allreduce, a nonblocking collective ----
            work = self._bg_world.start_allreduce_mean_(buf)
        else:
            bg = self._bg
            across, inner = (bg.across, bg.inner) if bg is not None else (self._bg_world, None)
            # ---- distributed step (background): the update's (compressed, hierarchical) average ----
            work = self._bg_world.submit(lambda: self._reduce(buf, across, inner))
        self._pending = (work, update, buf, residual)

    def _apply_pending(self) -> None:
        """Wait for last round's background mean and advance the agreed values by it."""
        if self._pending is None:
            return
        work, _, mean, _ = self._pending
        self._pending = None
        deliveries, self._deliveries = self._deliveries, []  # (also when the wait raises)
        t0 = time.perf_counter()
        try:
            work.wait()
        finally:
            self.comm.absorb(self._bg_world)  # its bytes count now, on this thread (also when it failed)
        waited = time.perf_counter() - t0
        self.exposed += waited
        self.hidden += max(0.0, work.duration - waited)
        _check_finite(mean, "the overlapped average of a round's update")  # (raises: no copy gets it)
        self._advance(mean)
        for targets, landed in deliveries:
            unpack_(self.agreed, targets)
            landed()

    def settle(self) -> None:
        """Apply last round's background mean now, inside the round (--overlap-steps: after some of
        its steps): x <- x - own_r + mean_r keeping the steps taken, computed as the agreed values
        (which take mean_r) plus this round's progress so far; the round's update counts from the
        agreed values from here on. The steps after see the average: the delay is the steps before.
        Nothing pending: nothing to do."""
        if self._pending is None:
            return
        flat = self._buffer()
        progress = flat - self.start
        self._apply_pending()
        torch.add(self.agreed, progress, out=flat)
        self.start.copy_(self.agreed)

    def poll(self) -> None:
        """Let a background average progress (MPI's poll mode needs the calls)."""
        if self._pending is not None:
            self._pending[0].done()

    def flush(self) -> None:
        """Wait for the background average and apply it: every rank holds the same values after.

        Inside a round (after mark(): in the `with job:` form an evaluation or a checkpoint between
        rounds comes after the next round began) the round's update counts from these values, not
        from the round's start: it would hold mean_r - own_r, and undo the average on every rank
        for a round."""
        self._launch_deferred()
        if self._pending is not None:
            flat = self._buffer()
            self._apply_pending()
            flat.copy_(self.agreed)
            self.start.copy_(flat)  # a pending average exists only with overlap, which allocated start

    def deliver_to(self, copy_of: Callable[[torch.Tensor], torch.Tensor], landed: Callable[[], None]) -> None:
        """Give another copy of the averaged tensors (an evaluation's; copy_of maps each tensor to
        its copy) the values flush() would leave now, when the pending average is applied in its
        own time (the next round's end, a settle() inside it, or a flush), without applying it early;
        then call landed().
        With nothing pending every rank holds those values already: landed() at once, the copy
        untouched. An average that is not finite delivers nothing."""
        if not self.pending:
            landed()
            return
        self._deliveries.append(([copy_of(t) for t in self._tensors()], landed))

    @property
    def pending(self) -> bool:
        """An average not yet applied: in flight, or to start with the next round."""
        return self._pending is not None or self._deferred is not None

    # -- consistency -------------------------------------------------------------------------------------
    def checksum(self) -> Optional[int]:
        """With a compressed wire: a checksum of the values every rank must share now (the round's
        result; with overlap, the values minus this rank's update in flight), exact in a float64
        reduction; None on a float32 wire (an allreduce leaves every rank the same values)."""
        if self.feedback is None or self.flat is None or self.flat.device.type == "meta":
            return None
        shared = self.flat if self.plain else self.agreed
        return int(shared.view(torch.int32).sum(dtype=torch.int64)) % (1 << 50)

    def resync(self) -> None:
        """Give every rank rank 0's values (after ranks were found to differ): collective."""
        self.flush()
        # ---- distributed step: rank 0's values to every rank ----
        self.comm.bcast_(self._buffer(), root=0)

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> Optional[Dict]:
        """What every rank holds alike: the agreed values and the outer step's state (None in the
        plain mode, where the model itself is what every rank holds alike)."""
        if self.plain or self.agreed is None:
            return None
        return {"agreed": self.agreed.detach().cpu().clone(), "params": self._params,
                "outer": None if self.outer is None else _cpu_copy(self.outer.state_dict()),
                "outer_class": None if self.outer is None else type(self.outer).__name__}

    def rank_state_dict(self) -> Optional[Dict]:
        """This rank's own: the error-feedback residual, the round update whose average is in flight."""
        state = {}
        if self._deferred is not None:  # not started yet: its residual is the current one
            state["pending_update"] = self._deferred.detach().cpu().clone()
            if self.feedback is not None and self.feedback.residual is not None:
                state["residual"] = self.feedback.residual.detach().cpu().clone()
        elif self._pending is not None:
            _, own, _, residual = self._pending
            state["pending_update"] = own.detach().cpu().clone()
            if residual is not None:
                state["residual"] = residual.detach().cpu().clone()  # as it was when the average started
        elif self.feedback is not None and self.feedback.residual is not None:
            state["residual"] = self.feedback.residual.detach().cpu().clone()
        return state or None

    def load_state_dict(self, state: Optional[Dict], rank_state: Optional[Dict]) -> None:
        """Continue from state_dict() / rank_state_dict(): a pending average is started again from
        the saved update (and residual), so it gives the same mean as the uninterrupted run.
        An average not yet applied (a roll-back after a round was abandoned) is dropped first."""
        self.discard()
        flat = self._buffer()
        if state is not None and not self.plain:
            self._allocate(flat)
            self.agreed.copy_(state["agreed"])
            if self.outer is not None and state.get("outer") is not None:
                self.outer.load_state_dict(state["outer"])
        rank_state = rank_state or {}
        if self.feedback is not None and rank_state.get("residual") is not None:
            self.feedback.residual = rank_state["residual"].to(flat.device).clone()
        if rank_state.get("pending_update") is not None and self.overlap:
            update = rank_state["pending_update"].to(flat.device).clone()
            torch.add(self.agreed, update, out=flat)  # this rank's values, as average() left them
            self._deferred = update  # started with the next round, as average() leaves it

    def discard(self) -> None:
        """Forget an average not yet applied (what it averaged is being replaced): one in flight is
        waited for first (every rank started it, and it writes this rank's residual), and a
        non-finite result it raises is dropped with it."""
        self._deferred, self._deliveries = None, []
        if self._pending is None:
            return
        work, self._pending = self._pending[0], None
        try:
            work.wait()
        except NonFiniteError:
            pass
        self.comm.absorb(self._bg_world)

    def set_values(self, values: torch.Tensor) -> None:
        """Every rank's values (after an in-flight average was applied outside the run)."""
        self._buffer().copy_(values)


def replay_outer_step(values: torch.Tensor, mean: torch.Tensor, saved: Dict) -> tuple:
    """An Averager's outer step taken again outside a run (a checkpoint's average in flight, applied
    when the world changed): (the advanced values, the outer optimizer's state after the step).

    Args:
        values: the agreed values (its parameters' part is the outer optimizer's parameter).
        mean: the round's mean update; saved: Averager.state_dict() of the run.
    """
    P = saved["params"]
    anchor = torch.nn.Parameter(values[:P].clone())
    groups = saved["outer"]["param_groups"][0]
    hyper = {k: v for k, v in groups.items() if k not in ("params", "initial_lr")}
    opt = getattr(torch.optim, saved["outer_class"])([anchor], **hyper)
    opt.load_state_dict(saved["outer"])
    anchor.grad = mean[:P].neg()
    opt.step()
    out = values.clone()
    with torch.no_grad():
        out[:P].copy_(anchor)
        out[P:].add_(mean[P:])
    return out, _cpu_copy(opt.state_dict())
