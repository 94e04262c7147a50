"""Local SGD: every rank trains the full model for l steps, then all parameters and BN buffers are averaged.

With group_size G > 1 it is hierarchical local SGD (Lin et al., "Don't Use Large Mini-Batches, Use
Local SGD", ICLR 2020): data-parallel inside each group of G ranks at every step, and the whole model
averaged across the groups every l steps (hierarchically: resist_mpi.plan.groups)."""
from __future__ import annotations

from typing import Optional, Union

from ..averaging.rounds import Averager
from ..averaging.gradients import GradientAverager
from ..plan.groups import Groups
from ..blocks.tensors import module_tensors
from .base import Replicated


class LocalSGD(Replicated):
    """Local SGD (the paper's baseline): the full model trained on every rank, averaged every round.

    Args:
        model, comm: as for every strategy; the model's initial weights come from rank 0.
        device: where ranks whose model was built on the meta device put it.
        group_size: ranks per group (an int, or "node"): hierarchical local SGD when > 1.
        wire_dtype: float32, or float16 / bfloat16 / int8: each round's update moves compressed, with
            error feedback (resist_mpi.averaging.compression).
        overlap: the model's average of a round runs while the next round trains (one round late).
        overlap_steps: with overlap and optimizer=, the average lands after this many of the next
            round's steps instead of at its end (a shorter delay; Strategy).
        outer_optimizer: a factory params -> torch optimizer for an outer step on each round's
            averaged update (DiLoCo with SGD(lr=0.7, momentum=0.9, nesterov=True)); None: the average.
            See resist_mpi.averaging.Averager.
        optimizer, scheduler, local_steps, optimizer_state: see Strategy (default: the optimizer's
            state is reset every round, as the paper's fresh optimizer).
    """

    name = "local_sgd"

    def __init__(self, model, comm, group_size: Union[int, str] = 1, wire_dtype: str = "float32",
                 overlap: bool = False, overlap_steps: Optional[int] = None, outer_optimizer=None, **kw):
        super().__init__(model, comm, **kw)
        self._set_overlap_steps(overlap, overlap_steps)
        self.groups = Groups(comm, group_size)
        self._average = Averager(comm, lambda: module_tensors(self.model), self.groups, wire_dtype,
                                 overlap=overlap, outer=outer_optimizer)
        self._model_averagers.append(self._average)
        if self.groups.inner is not None:  # data-parallel inside the group, every step
            self._gradient_averagers.append(GradientAverager(self.groups.inner, list(model.parameters()),
                                                             check_finite=self.scaler is None))

    def _end(self) -> None:
        # ---- distributed step: one fused allreduce of the whole model ----
        self._average.average()
