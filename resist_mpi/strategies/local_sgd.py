"""Local SGD: every rank trains the full model for l steps, then all parameters and BN buffers are averaged."""
from __future__ import annotations

from ..averaging import Averager
from ..blocks import module_tensors
from .base import Replicated


class LocalSGD(Replicated):
    """Local SGD (the paper's baseline): the full model trained on every rank, averaged every round.

    Args:
        model, comm: as for every strategy; the model's initial weights come from rank 0.
        device: where ranks whose model was built on the meta device put it.
        optimizer, keep_momentum: see Strategy (a fresh optimizer every round, as in the paper).
    """

    name = "local_sgd"
    fresh_optimizer = True

    def __init__(self, model, comm, **kw):
        super().__init__(model, comm, **kw)
        self._average = Averager(comm, lambda: module_tensors(self.model))

    @classmethod
    def from_config(cls, model, comm, cfg, **kw):
        return cls(model, comm, keep_momentum=cfg.keep_shared_momentum, **kw)

    def _end(self) -> None:
        # ---- distributed step: one fused allreduce of the whole model ----
        self._average.average()
