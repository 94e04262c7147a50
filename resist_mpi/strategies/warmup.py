"""Warm-up: one strategy for the first rounds, another from then on (the paper's ImageNet recipe:
a few epochs of local SGD, then ResIST)."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

from .base import Strategy


class Warmup(Strategy):
    """first until round switch_round, then the strategy then() builds from the synchronised model.

    Args:
        first: the warm-up strategy (every rank ends its rounds with the identical model: local SGD).
        then: called once, at the switch, to build the strategy that takes over (e.g.
            lambda: ResIST(model, c, synchronized=True)).
        switch_round: the first round of `then`.
    The round protocol, parameters, optimizer and state are those of the current strategy; `name`
    says which one it is, so a training loop can log the switch.
    """

    def __init__(self, first: Strategy, then: Callable[[], Strategy], switch_round: int):
        super().__init__(first.model, first.comm)
        self.first, self._then, self.switch_round = first, then, switch_round
        self.current: Strategy = first
        self._warmup_time = 0.0  # the first strategy's communication time, once it is gone

    @property
    def name(self) -> str:
        return self.current.name

    @property
    def fresh_optimizer(self) -> bool:
        return self.current.fresh_optimizer

    @property
    def optimizer(self):
        return self.current.optimizer

    @optimizer.setter
    def optimizer(self, value) -> None:  # the base class's __init__ sets it; the strategies own it
        pass

    @property
    def comm_time(self) -> float:
        return self._warmup_time + self.current.comm_time

    def _switch_if_due(self) -> None:
        if self.first is not None and self.round >= self.switch_round:
            self._warmup_time = self.first.comm_time
            self.current = self._then()
            self.current.round = self.round
            self.first = None  # its flat buffer (a whole model) goes with it

    def begin_round(self) -> None:
        self._switch_if_due()
        self.current.round = self.round
        self.current.begin_round()

    def end_round(self) -> None:
        self.current.end_round()
        self.round = self.current.round

    def param_groups(self) -> List[Dict]:
        return self.current.param_groups()

    @contextlib.contextmanager
    def full_model(self):
        with self.current.full_model() as full:
            yield full

    def state_dict(self) -> Dict:
        return self.current.state_dict()

    def rank_state_dict(self) -> Optional[Dict]:
        return self.current.rank_state_dict()

    def load_state_dict(self, state: Dict, rank_state: Optional[Dict] = None) -> None:
        self.round = int(state.get("round", 0))
        if self.round >= self.switch_round:
            # the checkpoint's full model goes to the first strategy's model (every rank the
            # same), from which the second one takes over
            self.first._load_model(state["model"])
            self._switch_if_due()
        self.current.load_state_dict(state, rank_state)
