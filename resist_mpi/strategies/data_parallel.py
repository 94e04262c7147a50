"""Data-parallel SGD: gradients averaged every step (one fused allreduce), like Horovod's DistributedOptimizer."""
from __future__ import annotations

from .base import Strategy, allreduce_tensors_


class DataParallel(Strategy):
    name = "data_parallel"
    fresh_optimizer = False  # one optimizer for the whole run: the replicas never diverge

    def after_backward(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # ---- distributed step: one fused gradient allreduce per step ----
        allreduce_tensors_(self.comm, grads)

    def end_round(self) -> None:
        # Parameters stay identical; BN running statistics are per-rank, so average them for eval.
        allreduce_tensors_(self.comm, [b for b in self.model.buffers() if b.is_floating_point()])
