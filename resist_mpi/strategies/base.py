"""What a training strategy decides: how the model is held, and what is synchronised when.

The trainer runs rounds of local SGD steps and calls these hooks; it never branches on a
strategy's name. Each distributed step is inside a hook.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List

import torch

from ..comm import Comm, pack, unpack_
from ..comm.fusion import flatten_, is_view_of
from ..models import module_tensors


def allreduce_tensors_(c: Comm, tensors: List[torch.Tensor]) -> None:
    """Average tensors over ranks with one fused allreduce (pack, reduce, unpack)."""
    if tensors:
        flat = pack(tensors)
        c.allreduce_mean_(flat)
        unpack_(flat, tensors)


def bcast_tensors_(c: Comm, tensors: List[torch.Tensor], root: int = 0) -> None:
    """Broadcast tensors from root with one fused broadcast."""
    if tensors:
        flat = pack(tensors)
        c.bcast_(flat, root)
        unpack_(flat, tensors)


class Strategy:
    """Base class: every rank holds the full model (the baselines' situation).

    Attributes:
        name: the --strategy value.
        fresh_optimizer: build a new optimizer (fresh momentum) at the start of every round.
    """

    name = "base"
    fresh_optimizer = False
    resume_optimizer = None  # optimizer state a checkpoint handed over, loaded at the next round
    resume_momentum = None   # this rank's shared-layer momentum from a checkpoint (--keep-shared-momentum)

    def __init__(self, comm: Comm, cfg, device):
        self.comm, self.cfg, self.device = comm, cfg, device
        self.model = None
        self._flats: Dict[str, torch.Tensor] = {}

    def build_model(self, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """Create the model on every rank and give all ranks rank 0's initial weights."""
        self.model = factory().to(self.device)
        # ---- distributed step: one fused broadcast of rank 0's initial model ----
        bcast_tensors_(self.comm, module_tensors(self.model))
        return self.model

    def adopt(self, model) -> None:
        """Continue with an already synchronised full model (e.g. after a warm-up strategy)."""
        self.model = model

    def average_(self, key: str, tensors: List[torch.Tensor]) -> None:
        """Average tensors over ranks in place with one allreduce and no copies.

        The first call moves the tensors into one flat buffer and makes them views of it, so later
        rounds reduce that buffer directly (packing 60 MB of ResNet-101 shared layers into a fresh
        buffer and back made the average 1.5-3x slower than raw MPI). If something replaced the
        tensors since, the buffer is rebuilt.
        """
        flat = self._flats.get(key)
        if flat is None or not is_view_of(tensors, flat):
            flat = flatten_(tensors)
            self._flats[key] = flat
        self.comm.allreduce_mean_(flat)

    def begin_round(self, round_index: int) -> None:
        """Called before the round's local steps."""

    def param_groups(self) -> List[Dict]:
        """Optimizer parameter groups for this round: [{'params': [...], 'name': 'shared'|'blocks'}]."""
        return [{"params": [p for p in self.model.parameters()], "name": "shared"}]

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Hook for backends that wrap the optimizer (Horovod's DistributedOptimizer)."""
        return optimizer

    def after_backward(self) -> None:
        """Called after loss.backward(), before optimizer.step()."""

    def end_round(self) -> None:
        """Called after the round's local steps."""

    @contextlib.contextmanager
    def full_model(self):
        """The full, synchronised model, for evaluation and checkpoints."""
        yield self.model

    def state_dict(self) -> Dict:
        """Strategy state a checkpoint needs besides the weights."""
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass
