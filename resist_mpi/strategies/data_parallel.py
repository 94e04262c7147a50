"""Data-parallel SGD: gradients averaged every step, like Horovod's DistributedOptimizer.

With the mpi backend the strategy does it itself: one fused gradient allreduce per step, in
after_backward. With the horovod backend it is Horovod's own ``hvd.DistributedOptimizer``
(wrap_optimizer): its hooks start each gradient's allreduce during backward, as soon as the
gradient is ready, and Horovod fuses them. after_backward then only waits for them (so t_comm
is the communication backward did not hide) and counts their bytes.

Byte accounting is the same on both backends: per step, the ring-allreduce volume of all the
gradients as one buffer, ``ring_allreduce_bytes(4 * number of gradient elements, size)`` sent and
the same received (see resist_mpi.comm.base). Horovod moves the same elements through its fusion
buffer; how it splits them into fused allreduces (HOROVOD_FUSION_THRESHOLD, cycle time) changes
only the rounding of that formula, which is why the total is counted once rather than per tensor.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..comm import ELEMENT_BYTES, ring_allreduce_bytes
from .base import Strategy, allreduce_tensors_


class DataParallel(Strategy):
    name = "data_parallel"
    fresh_optimizer = False  # one optimizer for the run: the replicas never diverge

    def __init__(self, comm, cfg, device):
        super().__init__(comm, cfg, device)
        self.distributed_optimizer: Optional[torch.optim.Optimizer] = None
        self._hvd_params: List[torch.nn.Parameter] = []

    # -- Horovod: DistributedOptimizer -------------------------------------------------------------
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self.comm.name != "horovod":
            return optimizer
        if self.distributed_optimizer is not None:
            # Its hooks sit on the parameters' gradient accumulators for good: a second wrapper
            # would allreduce every gradient twice. The trainer builds one optimizer per run.
            raise RuntimeError("data_parallel: the Horovod DistributedOptimizer was already created")
        hvd = self.comm.hvd
        # Names from the full model, identical on every rank: Horovod matches the ranks'
        # allreduces by name ("allreduce.<parameter name>").
        named = [(f"allreduce.{n}", p) for n, p in self.model.named_parameters()]
        dist = hvd.DistributedOptimizer(optimizer, named_parameters=named, op=hvd.Average,
                                        backward_passes_per_step=1)
        # DistributedOptimizer builds a new optimizer from the param groups: carry the state over
        # (momentum buffers of a resumed data-parallel run).
        if optimizer.state:
            dist.load_state_dict(optimizer.state_dict())
        _accept_zero_grad_set_to_none(dist)
        _skip_second_synchronize(dist)
        self._hvd_params = [p for g in dist.param_groups for p in g["params"] if p.requires_grad]
        self.distributed_optimizer = dist
        return dist

    def after_backward(self) -> None:
        c = self.comm
        if self.distributed_optimizer is not None:
            # ---- distributed step: Horovod's gradient allreduces (started during backward) ----
            self.distributed_optimizer.synchronize()
            n = ring_allreduce_bytes(ELEMENT_BYTES * sum(p.numel() for p in self._hvd_params), c.size)
            c.bytes_sent += n
            c.bytes_recv += n
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # ---- distributed step: one fused gradient allreduce per step ----
        allreduce_tensors_(c, grads)

    def end_round(self) -> None:
        # Parameters stay identical; BN running statistics are per-rank, so average them for eval.
        self.average_("bn", [b for b in self.model.buffers() if b.is_floating_point()])


def _accept_zero_grad_set_to_none(dist) -> None:
    """Horovod's zero_grad() takes no argument; the trainer calls zero_grad(set_to_none=True).

    Keep Horovod's check (no allreduce may be in flight) and pass set_to_none on. Patched on the
    instance: Horovod's class calls super(self.__class__, self), so it cannot be subclassed.
    """
    def zero_grad(set_to_none: bool = True):
        if dist._handles:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize()")
        torch.optim.Optimizer.zero_grad(dist, set_to_none=set_to_none)

    dist.zero_grad = zero_grad


def _skip_second_synchronize(dist) -> None:
    """step() after an explicit synchronize() (after_backward's) must not synchronize again.

    Horovod's own step() would warn and allreduce every gradient a second time; this is its
    documented ``synchronize(); with skip_synchronize(): step()`` pattern, behind step().
    """
    step = dist.step

    def synchronized_step(closure=None):
        if dist._synchronized:
            with dist.skip_synchronize():
                return step(closure)
        return step(closure)

    dist.step = synchronized_step
