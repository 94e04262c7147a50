"""Data-parallel SGD: gradients averaged over ranks after every backward pass.

The user's loop stays `loss.backward(); opt.step()`: hooks on the parameters average every gradient
with one fused allreduce once backward is done (averaging.GradientAverager), on every backend alike.
Byte accounting per step: the ring-allreduce volume of all the gradients as one buffer (comm/base.py).
BN running statistics are per rank; they are averaged once per round, for evaluation.
"""
from __future__ import annotations

from ..averaging.rounds import Averager
from ..averaging.gradients import GradientAverager
from .base import Replicated


class DataParallel(Replicated):
    """Data-parallel SGD (the paper's other baseline). Args as for LocalSGD; one optimizer per run."""

    name = "data_parallel"
    # the replicas never diverge: the optimizer's state (momentum) is kept, the same on every rank
    default_optimizer_state = "keep"
    replicated_optimizer_state = True

    def __init__(self, model, comm, wire_dtype: str = "float32", **kw):
        super().__init__(model, comm, **kw)
        # a compressed wire: gradients cast (int8: scaled) for the wire, summed in float32
        # with a loss scaler an overflowing step is the scaler's to skip (every rank sees the same
        # averaged gradients, so every rank skips it and lowers its scale alike): no NonFiniteError
        self._gradient_averagers.append(GradientAverager(comm, list(model.parameters()), wire_dtype,
                                                         check_finite=self.scaler is None))
        self._bn = Averager(comm, lambda: [b for b in self.model.buffers() if b.is_floating_point()])

    def _end(self) -> None:
        # ---- distributed step: the BN statistics (parameters are identical on every rank) ----
        self._bn.average()
