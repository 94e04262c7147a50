"""Warm-up: one strategy for the first rounds, another from then on (the paper's ImageNet recipe:
a few epochs of local SGD, then ResIST)."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

from ..errors import UsageError
from .base import Strategy


class Warmup(Strategy):
    """first until round switch_round, then the strategy then() builds from the synchronised model.

    Args:
        first: the warm-up strategy (every rank ends its rounds with the identical model: local SGD).
        then: called once, at the switch, to build the strategy that takes over (e.g.
            lambda: ResIST(model, c, optimizer=opt, synchronized=True)); give both the same optimizer
            (and loss scaler).
        switch_round: the first round of `then`.
    The round protocol, parameters, optimizer and state are those of the current strategy; `name`
    says which one it is, so a training loop can log the switch. At the switch the first strategy's
    hooks (its per-step gradient averages, its optimizer step hooks) are taken off. A job that has
    not switched yet loads any state of the run (one the second strategy wrote switches it at once,
    whatever its switch round); one that has (a roll-back in the same run) loads
    only the second strategy's, and refuses the warm-up's with a UsageError.
    """

    def __init__(self, first: Strategy, then: Callable[[], Strategy], switch_round: int):
        super().__init__(first.model, first.comm, optimizer=first.optimizer, scheduler=first.scheduler, scaler=first.scaler,
                         local_steps=first.local_steps, optimizer_state=first.optimizer_state)
        self.first, self._then, self.switch_round = first, then, switch_round
        self.current: Strategy = first
        self._warmup_time = 0.0  # the first strategy's communication time, once it is gone
        first._drop_step_hooks()  # the Warmup counts the steps for the strategy it runs (_count_step)

    @property
    def name(self) -> str:
        return self.current.name

    @property
    def comm_time(self) -> float:
        return self._warmup_time + self.current.comm_time

    @property
    def hidden_time(self) -> float:
        return self.current.hidden_time

    def finite(self) -> bool:
        return self.current.finite()

    def bn_to_recalibrate(self):
        return self.current.bn_to_recalibrate()

    def _due(self, written: Optional[str] = None) -> bool:
        """Whether to switch now: at the switch round, or at once when a state being loaded was
        written by the next strategy (written: its name): the run that wrote it had switched, on a
        schedule that can put its round before this job's switch round (a larger --warmup-epochs, or
        another world size and so other rounds per epoch): the warm-up is over."""
        return self.first is not None and (self.round >= self.switch_round or written not in (None, self.first.name))

    def _switch_if_due(self, written: Optional[str] = None) -> None:
        if self._due(written):
            self.first.flush()  # an overlapped average must land before the model is handed over
            self.first.close()
            self._warmup_time = self.first.comm_time
            self.current = self._then()
            if self.current.optimizer is not self.optimizer or self.current.scaler is not self.scaler:
                raise UsageError("Warmup: the strategy then() built holds another optimizer or loss scaler than the "
                                 "warm-up's: give both the same optimizer= (and scaler=)")
            # its own step hook, registered after the Warmup's round-ending one, would count the step
            # that ended a round into the next: the Warmup counts for it
            self.current._drop_step_hooks()
            self.current.round = self.round
            self.local_steps = self.current.local_steps  # its rounds' length from now on (it was the warm-up's)
            self.first = None  # its flat buffer (a whole model) goes with it

    def begin_round(self) -> None:
        self._switch_if_due()
        self.current.round = self.round
        self.current.begin_round()
        self._open, self._steps = True, 0

    def end_round(self) -> None:
        try:
            self.current.end_round()
        finally:
            self._open = False
            self.round = self.current.round

    def prepare_round(self) -> None:
        self._check_boundary("prepare_round()")
        if self.first is None:  # after the switch (no early work across it: the switch happens at begin_round)
            self.current.round = self.round
            self.current.prepare_round()

    def _stepped(self) -> None:
        self.current._steps = self._steps  # its boundary checks (and overlap_steps) see the steps counted here
        self.current._stepped()

    def _abandon_round(self) -> None:
        self.current._abandon_round()
        self._open = False

    def _group_gradient_failed(self) -> bool:
        return self._open and self.current._group_gradient_failed()

    def _average_pending(self) -> bool:
        return self.current._average_pending()

    def poll(self) -> None:
        self.current.poll()

    def flush(self) -> None:
        self.current.flush()

    def close(self) -> None:
        super().close()
        self.current.close()

    def param_groups(self) -> List[Dict]:
        return self.current.param_groups()

    def shared_parameters(self):
        return self.current.shared_parameters()

    @contextlib.contextmanager
    def full_model(self):
        self._check_boundary("full_model()")
        with self.current.full_model() as full:
            yield full

    def evaluation_copy(self, flush: bool = True):
        self._check_boundary("evaluation_copy()")
        return self.current.evaluation_copy(flush)

    def state_dict(self) -> Dict:
        self._check_boundary("state_dict()")
        return self.current.state_dict()

    def rank_state_dict(self) -> Optional[Dict]:
        return self.current.rank_state_dict()

    def shard(self):
        return self.current.shard()

    def load_shards(self, reader, round_index: int, same_layout: bool) -> None:
        written = reader.manifest["strategy"]
        self._check_loadable("load_shards()", round_index, written)
        self.round = round_index
        if self.first is not None and written == self.first.name:  # written during the warm-up
            self.first.load_shards(reader, round_index, same_layout)
            self._switch_if_due()  # (at the switch round: the next strategy takes over the loaded model)
            return
        self._switch_if_due(written)  # the first strategy's full model is every rank's; the next one takes over
        self.current.load_shards(reader, round_index, same_layout)

    def load_state_dict(self, state: Dict, rank_state: Optional[Dict] = None) -> None:
        if self._open:
            raise UsageError("load_state_dict() in the middle of a round: load before the first round")
        round_index, written = int(state.get("round", 0)), state.get("strategy")
        self._check_loadable("load_state_dict()", round_index, written)
        self.round = round_index
        if self._due(written):
            # the checkpoint's full model goes to the first strategy's model (every rank the
            # same), from which the second one takes over
            self.first._load_model(state["model"])
            self._switch_if_due(written)
            if written != self.current.name:  # the first strategy's, at the end of its last round
                state, rank_state = _as_switched(state), _as_switched(rank_state)
                state["group_size"] = self.current._group_size()  # the switch hands a rank's own state on
        self.current.load_state_dict(state, rank_state)

    def _check_loadable(self, what: str, round_index: int, written: Optional[str]) -> None:
        """After the switch (a roll-back in the same run) only the current strategy's own states
        load: the warm-up's strategy was closed at the switch, and the current one's averagers
        would not start afresh from the warm-up's model as they did at the switch."""
        if self.first is None and (round_index < self.switch_round or written != self.current.name):
            raise UsageError(f"{what}: the state of round {round_index} ({written}'s) is from the warm-up, and "
                             f"this job has switched to {self.current.name} already: load it into a new Warmup "
                             f"job, built as the run that saved it")


def _as_switched(state: Optional[Dict]) -> Optional[Dict]:
    """A state of the warm-up's strategy as the switch leaves it: its averagers' part (agreed values,
    error feedback, outer optimizer, each the size of that strategy's averaged tensors) goes with
    the strategy, and the next one's averagers start afresh; model, optimizer and scheduler stay."""
    if state is None:
        return None
    out = {k: v for k, v in state.items() if k != "averagers"}
    if state.get("rank_states"):
        out["rank_states"] = [_as_switched(r) for r in state["rank_states"]]
    return out
