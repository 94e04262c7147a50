"""ResIST: each rank trains a shallow sub-ResNet; blocks move sparsely, shared layers are averaged.

A round, as the trainer sees it:

    begin_round: the round's assignment (rank 0 draws and broadcasts those of 32 rounds at a time);
                 one all-to-all brings every rank the blocks it will train (averaging blocks that
                 several ranks trained last round)
    local steps: no communication at all, inactive blocks skipped
    end_round:   one fused allreduce averages the shared layers (parameters and BN buffers)

A rank only ever holds the shared layers plus its own blocks; released blocks live on the meta
device (shapes only). Ranks other than 0 even build the model on the meta device, so the full
model is never in their memory except during evaluation or a checkpoint (full_model()).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch

from .. import partition
from ..exchange import block_sizes, run_exchange
from ..routing import everyone, needers_from_assignment, plan_exchange
from .base import Strategy, bcast_tensors_


ASSIGNMENTS_PER_BROADCAST = 32  # rounds whose assignments rank 0 broadcasts together


class ResIST(Strategy):
    name = "resist"
    fresh_optimizer = True  # the paper's reference code builds a fresh optimizer every round

    def __init__(self, comm, cfg, device):
        super().__init__(comm, cfg, device)
        self.assignment: Optional[partition.Assignment] = None
        self.holders: List[Tuple[int, ...]] = []
        self.divergent: set = set()
        self.last_plan = None
        self._exchange_buffers: Dict = {}  # the averaging workspace, reused round after round
        self._drawn: Dict[int, partition.Assignment] = {}  # round -> assignment, from rank 0's last broadcast

    # -- model ------------------------------------------------------------------------------------
    def build_model(self, factory):
        c = self.comm
        if c.rank == 0:
            model = factory().to(self.device)
        else:
            with torch.device("meta"):
                model = factory()
            for m in model.shared_modules():
                m.to_empty(device=self.device)
                for bn in m.modules():
                    if isinstance(bn, torch.nn.BatchNorm2d):
                        bn.num_batches_tracked.zero_()
        partition.check_partition(model.num_partitionable, c.size, self.cfg.min_depth)
        # ---- distributed step: shared layers from rank 0 (its blocks follow in the first exchange) ----
        bcast_tensors_(c, model.shared_tensors())
        for b in range(model.num_partitionable):
            if c.rank != 0:
                model.release_block(b)
        self.model = model
        self.holders = [(0,)] * model.num_partitionable
        self.divergent = set()
        return model

    def adopt(self, model) -> None:
        """Take over a full model that every rank holds identically (after local-SGD warm-up)."""
        partition.check_partition(model.num_partitionable, self.comm.size, self.cfg.min_depth)
        self.model = model
        for b in range(model.num_partitionable):
            model.slab_of(b)  # own storage per block: nothing may stay a view of another strategy's buffer
        self.holders = everyone(model.num_partitionable, self.comm.size)
        self.divergent = set()

    # -- a round ------------------------------------------------------------------------------------
    def draw(self, round_index: int) -> partition.Assignment:
        """This round's assignment, drawn by rank 0 and received by every rank.

        Rank 0 draws the assignments of ASSIGNMENTS_PER_BROADCAST consecutive rounds at once and
        broadcasts them together, so only one round in that many has a broadcast (on 4 ranks sharing
        2 cores, the extra synchronisation measured 0.2-1.7 ms a round). Each round's assignment
        depends only on (seed, round), so batching changes no draw, and a round outside the batch
        (after a resume) simply starts a new one.
        """
        drawn = self._drawn.get(round_index)
        if drawn is None:
            c = self.comm
            batch = None
            if c.rank == 0:
                batch = [partition.draw_assignment(self.model.num_partitionable, c.size, self.cfg.min_depth,
                                                   partition.round_rng(self.cfg.seed, round_index + k))
                         for k in range(ASSIGNMENTS_PER_BROADCAST)]
            # ---- distributed step: broadcast of the assignments (metadata: control bytes) ----
            with c.as_control():
                batch = c.bcast_object(batch, root=0)
            self._drawn = {round_index + k: a for k, a in enumerate(batch)}
            drawn = self._drawn[round_index]
        return drawn

    def exchange_to(self, needers, keep_workspace: bool = True) -> None:
        """One all-to-all exchange that leaves needers[b] holding an up-to-date copy of block b.

        keep_workspace: reuse the averaging workspace across rounds; the evaluation gather, which
        can need far more of it, uses a throwaway one instead.
        """
        plan = plan_exchange(self.holders, needers, self.comm.size, self.divergent, block_sizes(self.model))
        run_exchange(self.comm, self.model, plan, self.device, self._exchange_buffers if keep_workspace else {})
        self.last_plan = plan
        self.holders = list(plan.holders_after)
        self.divergent = set()

    def begin_round(self, round_index: int) -> None:
        self.assignment = self.draw(round_index)
        self.exchange_to(needers_from_assignment(self.assignment, self.model.num_partitionable))
        self.model.activate(self.assignment[self.comm.rank])

    def param_groups(self) -> List[Dict]:
        mine = self.assignment[self.comm.rank]
        blocks = [p for b in mine for p in self.model.partitionable[b].parameters()]
        shared = [p for m in self.model.shared_modules() for p in m.parameters()]
        return [{"params": shared, "name": "shared"}, {"params": blocks, "name": "blocks"}]

    def end_round(self) -> None:
        # ---- distributed step: one fused allreduce of the shared layers ----
        self.average_("shared", self.model.shared_tensors())
        # Blocks trained by several ranks now differ; they are averaged in the next exchange.
        self.divergent = {b for b, h in enumerate(self.holders) if len(h) > 1}

    # -- evaluation / checkpoints ----------------------------------------------------------------------
    def eval_scale(self) -> float:
        return partition.eval_residual_scale(self.model.num_partitionable, self.comm.size, self.cfg.min_depth)

    @contextlib.contextmanager
    def full_model(self):
        """Gather the blocks this rank lacks (averaging divergent ones), run all blocks at 1/S scale.

        Afterwards every rank goes back to its own sub-ResNet: it keeps the blocks of the round just
        trained (now identical copies wherever several ranks trained one) and releases the rest, so
        the memory a rank needs stays that of one sub-ResNet, and the next round's exchange moves
        what it would have moved without the evaluation (its record states the round's real traffic).
        """
        self.exchange_to(everyone(self.model.num_partitionable, self.comm.size), keep_workspace=False)
        self.model.activate_all()
        self.model.set_residual_scale(self.eval_scale())
        try:
            yield self.model
        finally:
            self.model.set_residual_scale(1.0)
            self._back_to_own_blocks()

    def _back_to_own_blocks(self) -> None:
        """From holding every (synchronised) block to holding only this round's own ones."""
        if self.assignment is None:
            return
        P, mine = self.model.num_partitionable, self.assignment[self.comm.rank]
        for b in range(P):
            if b not in mine and self.model.holds_block(b):
                self.model.release_block(b)
        self.model.trim_spares(len(mine))
        self.model.activate(mine)
        self.holders = needers_from_assignment(self.assignment, P)  # identical copies: no average due
        self.divergent = set()

    def state_dict(self) -> Dict:
        return {"assignment": self.assignment}

    def load_state_dict(self, state: Dict) -> None:
        """Continue after the checkpointed round: with the same world size, every rank goes back to
        the sub-ResNet it trained then, as the uninterrupted run did after saving."""
        assignment = state.get("assignment")
        if assignment is not None and len(assignment) == self.comm.size:
            self.assignment = tuple(tuple(a) for a in assignment)
            self._back_to_own_blocks()
