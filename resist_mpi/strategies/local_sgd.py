"""Local SGD: every rank trains the full model for l steps, then all parameters and BN buffers are averaged."""
from __future__ import annotations

from ..models import module_tensors
from .base import Strategy


class LocalSGD(Strategy):
    name = "local_sgd"
    fresh_optimizer = True  # as in the paper's comparison: each round starts a fresh optimizer

    def end_round(self) -> None:
        # ---- distributed step: one fused allreduce of the whole model ----
        self.average_("model", module_tensors(self.model))
