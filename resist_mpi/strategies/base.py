"""The protocol every strategy follows, around the user's own local steps.

    job = rm.ResIST(model, c)                 # or rm.LocalSGD(model, c), rm.DataParallel(model, c)
    for r in job.rounds(num_rounds):          # begin_round() before the body, end_round() after it
        opt = torch.optim.SGD(job.parameters(), lr=0.1, momentum=0.9)
        for x, y in itertools.islice(batches, local_steps):
            ...                               # forward, loss.backward(), opt.step()
    with job.full_model() as full:            # the whole model, synchronised, for evaluation
        evaluate(full)
    state = job.state_dict()                  # collective; job.load_state_dict(state) resumes

A strategy may also own the optimizer (optimizer=factory): it then builds one per round (a fresh
one, as the paper does, or one for the run) and keeps what must survive in its state_dict, so a
training loop holds no strategy-specific state. Each distributed step is inside a method here.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Iterator, List, Optional

import torch

from ..averaging import broadcast_tensors_
from ..blocks import module_tensors

OptimizerFactory = Callable[[List[Dict]], torch.optim.Optimizer]


class Strategy:
    """Base class. Subclasses implement _begin(), _end() and what differs of the rest.

    Args:
        model: the user's nn.Module (the strategy binds storage to it; it stays the same object).
        comm: the Comm (resist_mpi.init()).
        optimizer: optional factory, param groups -> optimizer (see the module docstring).
        keep_momentum: with a fresh optimizer per round, carry the momentum of the "shared" group.
    Attributes:
        round: index of the next round (rounds() and begin_round() start there; restored on resume).
        comm_time: seconds spent communicating, cumulative (for metrics).
        optimizer: the current round's optimizer when a factory was given.
    """

    name = "base"
    fresh_optimizer = True  # a new optimizer every round (the paper's reference code) or one per run

    def __init__(self, model: torch.nn.Module, comm, *, optimizer: Optional[OptimizerFactory] = None,
                 keep_momentum: bool = False):
        self.model, self.comm = model, comm
        self.round = 0
        self._timed = 0.0
        self._gradient_averagers: List = []  # per-step averages (GradientAverager), timed by themselves
        self._model_averagers: List = []  # Averagers of the round's end (their error feedback is per-rank state)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._factory, self._keep_momentum = optimizer, keep_momentum
        self._resumed_optimizer: Optional[Dict] = None
        self._resumed_momentum: Optional[List] = None

    @classmethod
    def check(cls, cfg, probe: torch.nn.Module, workers: int) -> None:
        """What this strategy needs of the model for `workers` ranks (or groups of ranks), checked on
        a meta-device copy before anything runs (one-line ValueError). Nothing for strategies that
        train the whole model."""

    # -- the round protocol --------------------------------------------------------------------------
    def rounds(self, num_rounds: int) -> Iterator[int]:
        """Yield round indices from self.round to num_rounds - 1: begin_round() before each body,
        end_round() once the body returns (not when the loop is left with break or an error)."""
        while self.round < num_rounds:
            r = self.round
            self.begin_round()
            yield r
            self.end_round()

    def begin_round(self) -> None:
        """Everything before round self.round's local steps (its communication is timed)."""
        t0 = time.perf_counter()
        self._begin()
        self._timed += time.perf_counter() - t0
        for averager in self._model_averagers:  # a compressed wire sends updates from here on
            averager.mark()
        if self._factory is not None and (self.optimizer is None or self.fresh_optimizer):
            self.optimizer = self._new_optimizer()

    def end_round(self) -> None:
        """Everything after the round's local steps; the next round is self.round + 1."""
        t0 = time.perf_counter()
        self._end()
        self._timed += time.perf_counter() - t0
        self.round += 1

    @property
    def comm_time(self) -> float:
        """Seconds spent communicating so far: round starts and ends, and per-step averages."""
        return self._timed + sum(g.comm_time for g in self._gradient_averagers)

    def _begin(self) -> None:
        pass

    def _end(self) -> None:
        pass

    # -- what this rank trains ----------------------------------------------------------------------
    def param_groups(self) -> List[Dict]:
        """This round's parameters as optimizer groups [{'params': [...], 'name': ...}]."""
        return [{"params": list(self.model.parameters()), "name": "shared"}]

    def parameters(self) -> List[torch.nn.Parameter]:
        """The parameters this rank trains this round (build the round's optimizer on these)."""
        return [p for g in self.param_groups() for p in g["params"]]

    def _new_optimizer(self) -> torch.optim.Optimizer:
        groups = [g for g in self.param_groups() if g["params"]]
        opt = self._factory(groups)
        shared = [p for g in opt.param_groups if g.get("name") == "shared" for p in g["params"]]
        if self._resumed_optimizer is not None:  # one optimizer for the run, from a checkpoint
            opt.load_state_dict(self._resumed_optimizer)
        elif self._keep_momentum and self._resumed_momentum is not None:
            for p, m in zip(shared, self._resumed_momentum):
                if m is not None:
                    opt.state[p] = {"momentum_buffer": m.to(p.device).clone()}
        elif self._keep_momentum and self.optimizer is not None:
            for p in shared:  # the shared layers are the same Parameter objects round after round
                if p in self.optimizer.state:
                    opt.state[p] = self.optimizer.state[p]
        self._resumed_optimizer = self._resumed_momentum = None
        return opt

    # -- the whole model -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def full_model(self):
        """The full, synchronised model (every rank: the same), for evaluation and checkpoints.
        Collective: every rank enters it. The base strategies hold the full model already."""
        yield self.model

    def state_dict(self) -> Dict:
        """Everything a resume needs that is the same on every rank. Collective (ResIST gathers)."""
        with self.full_model() as full:
            model = {k: v.detach().cpu().clone() for k, v in full.state_dict().items()}
        state = {"strategy": self.name, "round": self.round, "model": model}
        if self.optimizer is not None and not self.fresh_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def rank_state_dict(self) -> Optional[Dict]:
        """What differs between ranks and a resume on the same world size needs (kept momentum of
        the shared layers, a compressed wire's error feedback), or None."""
        state = {}
        if self._keep_momentum and self.fresh_optimizer and self.optimizer is not None:
            shared = [p for g in self.optimizer.param_groups if g.get("name") == "shared" for p in g["params"]]
            state["shared_momentum"] = [None if self.optimizer.state.get(p, {}).get("momentum_buffer") is None
                                        else self.optimizer.state[p]["momentum_buffer"].detach().cpu()
                                        for p in shared]
        residuals = [a.feedback.residual for a in self._model_averagers if a.feedback is not None]
        if residuals:
            state["wire_residual"] = [None if r is None else r.detach().cpu().clone() for r in residuals]
        return state or None

    def load_state_dict(self, state: Dict, rank_state: Optional[Dict] = None) -> None:
        """Continue from a state_dict() (on every rank, the same state); rank_state: this rank's
        rank_state_dict() of that checkpoint, when the world size is the same."""
        self._load_model(state["model"])
        self.round = int(state.get("round", 0))
        self._resumed_optimizer = state.get("optimizer")
        self._resumed_momentum = (rank_state or {}).get("shared_momentum")
        self.optimizer = None
        residuals = (rank_state or {}).get("wire_residual")
        feedbacks = [a.feedback for a in self._model_averagers if a.feedback is not None]
        if residuals is not None and len(residuals) == len(feedbacks):
            for fb, r in zip(feedbacks, residuals):
                fb.residual = None if r is None else r.clone()

    def _load_model(self, weights: Dict) -> None:
        self.model.load_state_dict(weights)


class Replicated(Strategy):
    """Every rank holds the full model (local SGD, data-parallel): rank 0's weights are given to all
    at construction, on ranks whose model was built on the meta device too."""

    def __init__(self, model, comm, *, device=None, synchronized: bool = False, **kw):
        super().__init__(model, comm, **kw)
        if any(t.is_meta for t in model.state_dict().values()):
            if comm.rank == 0:
                raise ValueError("rank 0's model is on the meta device: it must hold the initial weights")
            model.to_empty(device=device or "cpu")
            for m in model.modules():  # BN counters come back as garbage from to_empty
                for n, b in m._buffers.items():
                    if b is not None and not b.is_floating_point():
                        b.zero_()
        if not synchronized:
            # ---- distributed step: one fused broadcast of rank 0's initial model ----
            broadcast_tensors_(comm, module_tensors(model))
