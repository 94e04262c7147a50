"""Local SGD: every rank trains the full model for l steps, then all parameters and BN buffers are averaged."""
from __future__ import annotations

from ..models import module_tensors
from .base import Strategy, allreduce_tensors_


class LocalSGD(Strategy):
    name = "local_sgd"
    fresh_optimizer = True  # as in the paper's comparison: each round starts a fresh optimizer

    def end_round(self) -> None:
        # ---- distributed step: one fused allreduce of the whole model ----
        allreduce_tensors_(self.comm, module_tensors(self.model), self.buffers)
