"""ResIST: each rank trains a shallow sub-network; blocks move sparsely, shared layers are averaged.

    job = ResIST(model, c, blocks="auto", min_depth=0, seed=0)
    begin_round: the round's assignment (rank 0 draws and broadcasts those of 32 rounds at a time);
                 one all-to-all brings every rank the blocks it will train (averaging blocks that
                 several ranks trained) and releases the others; only its own blocks are active
    local steps: the user's, no communication at all (inactive blocks are skipped)
    end_round:   one fused allreduce averages the shared layers (parameters and BN buffers)

A rank only ever holds the shared layers plus its own blocks: released blocks keep their
Parameter objects but no storage (BlockStore), so an optimizer built once over model.parameters()
trains exactly what this rank holds each round. A model whose blocks other ranks built on the meta
device (the CLI does, to spare their memory) is fine: rank 0's weights are the initial ones, its
blocks go out in round 0.

With group_size G > 1 (resist_mpi.plan.groups) the blocks are dealt to the S/G groups instead of the
ranks; the members of a group train the group's sub-network data-parallel (gradients averaged
every step inside the group), blocks move between groups in G slices that the receiving group
puts back together, and the shared layers are averaged hierarchically. G = 1 is the paper's ResIST.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Optional, Sequence, Union

import torch

from ..plan import partition
from ..averaging.rounds import Averager
from ..averaging.gradients import GradientAverager
from ..averaging.tensors import all_finite, average_tensors_, broadcast_tensors_
from .store import BlockStore
from ..blocks.switch import activate, make_switchable, set_scale
from ..blocks.find import find_blocks
from ..blocks.tensors import check_block_tensors, materialize_, module_tensors, shared_counters, shared_slots
from ..errors import UsageError
from .exchange import run_exchange
from ..plan.groups import Groups, slice_counts
from ..plan.routing import Holdings, everyone, needers_from_assignment
from .base import Strategy, _bn_restored, _same_modules

ASSIGNMENTS_PER_BROADCAST = 32  # rounds whose assignments rank 0 broadcasts together


class ResIST(Strategy):
    """ResIST over all ranks of comm.

    Args:
        model: any model with residual blocks (see resist_mpi.blocks.find_blocks).
        comm: the Comm.
        blocks: "auto" or the blocks to partition (modules or their names).
        stages: with blocks="auto" on a ResNet, the 1-based stages to partition (default (3,)).
        min_depth: minimum blocks per sub-network; blocks are shared by several ranks only when needed.
        seed: the assignments are drawn from (seed, round) by rank 0.
        device: where this rank's blocks and (if built on meta) shared layers live (default: the
            device of the model's first real tensor, else the CPU).
        synchronized: every rank already holds the identical full model (after a warm-up): nothing
            is broadcast and every rank starts holding every block.
        group_size: ranks per group (an int, or "node"), see the module docstring.
        wire_dtype: float32, or float16 / bfloat16 / int8: the shared layers' average moves each
            round's update compressed, with error feedback (resist_mpi.averaging.compression); blocks stay float32.
        overlap: the shared layers' average of a round runs while the next round trains (one round
            late); blocks still move at the round boundary. See resist_mpi.averaging.Averager.
        overlap_steps: with overlap and optimizer=, the average lands after this many of the next
            round's steps instead of at its end (a shorter delay; Strategy).
        outer_optimizer: a factory params -> torch optimizer for an outer step (DiLoCo) on the shared
            layers' averaged update; blocks are averaged as without it (docs/method.md, "Overlap and the outer optimizer": why).
        optimizer, scheduler, local_steps, optimizer_state: see Strategy ("shared" = the shared
            layers' parameters; the paper's reference code starts every round with a fresh optimizer).
    """

    name = "resist"

    def __init__(self, model, comm, *, blocks: Union[str, Sequence] = "auto", stages: Optional[Sequence[int]] = None,
                 min_depth: int = 0, seed: int = 0, device=None, synchronized: bool = False,
                 group_size: Union[int, str] = 1, wire_dtype: str = "float32", overlap: bool = False,
                 overlap_steps: Optional[int] = None, outer_optimizer=None, **kw):
        super().__init__(model, comm, **kw)
        self._set_overlap_steps(overlap, overlap_steps)
        named = find_blocks(model, blocks, stages)
        self.block_names = [n for n, _ in named]
        self.blocks = [m for _, m in named]
        try:
            check_block_tensors(model, self.block_names, self.blocks)
        except ValueError as e:
            raise UsageError(f"ResIST: {e}") from None
        for name, block in named:
            make_switchable(block, name)
        self.groups = Groups(comm, group_size)
        partition.check_partition(len(self.blocks), self.groups.count, min_depth)
        self.min_depth, self.seed = min_depth, seed
        self.device = torch.device(device) if device is not None else _device_of(model)
        self.store = BlockStore(self.blocks, self.device)
        self._run_order = _RunOrder(model, self.blocks)  # what the model's first forward runs, in order
        self._block_ids = {id(b) for b in self.blocks}
        self._shared = shared_slots(model, self.blocks)
        self._average = Averager(comm, self.shared_tensors, self.groups, wire_dtype, overlap=overlap,
                                 outer=outer_optimizer)
        self._model_averagers.append(self._average)
        if self.groups.inner is not None:  # data-parallel inside the group, every step (the fast link)
            self._gradient_averagers.append(GradientAverager(self.groups.inner, check_finite=self.scaler is None))
        self._workspace: Dict = {}  # the exchange's averaging buffer, reused round after round
        self._drawn: Dict[int, partition.Assignment] = {}  # round -> assignment, from rank 0's last broadcast
        self._full_depth = 0
        self._next: Optional[tuple] = None  # (round, assignment) drawn by prepare_round()
        self._prepared: Optional[tuple] = None  # (round, plan that brought its blocks) once they are in place early
        self.assignment: Optional[partition.Assignment] = None
        self.last_plan = None
        P, count = len(self.blocks), self.groups.count
        if synchronized:
            self.holdings = Holdings(P, count, everyone(P, count))
            for b in range(P):  # own storage per block: none may stay a view of another strategy's buffer
                self.store.slab(b)
            return
        if comm.rank == 0 and self.device.type != "meta" and any(t.is_meta for t in self.shared_tensors()):
            raise ValueError("rank 0's model is on the meta device: it must hold the initial weights")
        materialize_(model, self.device, skip=self.blocks)
        # ---- distributed step: shared layers from rank 0 (its blocks follow in the first exchange) ----
        broadcast_tensors_(comm, self.shared_tensors())
        counters = shared_counters(model, self.blocks)
        if counters:  # (a model built on the meta device has zeros there)
            with comm.as_control():
                # ---- distributed step: the shared layers' integer buffers from rank 0 ----
                values = comm.bcast_object([d[n].cpu() for d, n in counters] if comm.rank == 0 else None)
            for (d, n), v in zip(counters, values):
                d[n].copy_(v)
        if self.groups.index == 0 and self.groups.inner is not None:
            # ---- distributed step: group 0 holds rank 0's blocks, every member the same copy ----
            for b in range(P):
                if comm.rank != 0 and not self.store.holds(b):
                    self.store.materialize(b, self.device)
                self.groups.inner.bcast_(self.store.slab(b), root=0)
        elif comm.rank != 0:
            for b in range(P):
                self.store.release(b)
        self.holdings = Holdings(P, count)  # group 0 (rank 0 alone, without groups) holds every block

    def shared_tensors(self) -> List[torch.Tensor]:
        """Parameters and float buffers of the shared layers, in a fixed order."""
        return [d[n] for d, n in self._shared]

    # -- a round ----------------------------------------------------------------------------------------
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
            c, P, count = self.comm, len(self.blocks), self.groups.count
            batch = None
            if c.rank == 0:
                batch = [partition.draw_assignment(P, count, self.min_depth, partition.round_rng(self.seed, round_index + k))
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
        g = self.groups
        plan = self.holdings.plan(needers, self.store.sizes())
        self._carry_out(plan, self.store, g.across, g.inner, self._workspace if keep_workspace else {})
        self.last_plan = plan
        self.holdings.exchanged(plan)

    def _carry_out(self, plan, store: BlockStore, across, inner, workspace: Dict) -> None:
        """The exchange of plan on store over the communicators across groups and inside this one."""
        g = self.groups
        view = store if inner is None else SlicedStore(store, g)
        # ---- distributed step: the block exchange (between groups: member j moves slice j) ----
        run_exchange(across, view, plan, self.device, workspace)
        if inner is not None:
            # ---- distributed step: the group puts the slices of what arrived back together ----
            for b in plan.needed(g.index):
                if plan.sources[(g.index, b)] != (g.index,):
                    inner.allgather_(store.slab(b), slice_counts(store.numel(b), g.size))

    def _deal(self) -> None:
        """This round's assignment, and the exchange that brings every rank its blocks."""
        self.assignment = self.draw(self.round)
        self.exchange_to(needers_from_assignment(self.assignment, len(self.blocks)))

    def prepare_round(self) -> None:
        """Ready the next round before an evaluation (see Strategy.prepare_round): its assignment is
        drawn now and the gather that follows leaves every rank with that round's blocks, so
        begin_round() moves nothing. Of the two ways to get there, the one whose busiest rank moves
        fewer bytes is taken (every rank computes the same, from the pure plans):

        - the gather alone, from where the blocks are now (copies several ranks trained sent to
          every rank): always the cheaper when no block has divergent copies, as after the default
          partition, since it delivers the next round's blocks too;
        - the next round's exchange now (averaging divergent copies where they are needed next),
          then a gather of one synchronised copy of what each rank lacks.

        The optimizer state of the blocks that arrive is dropped as soon as they have (under the
        policies that keep state), as the round's start would, so a checkpoint written in between
        holds what the resumed run needs. A prepared round that no full_model() follows begins as
        usual."""
        super().prepare_round()
        if self._open or (self._next is not None and self._next[0] == self.round):
            return  # the open round's exchange ran at its start (`with job:`), or this one is ready
        assignment = self.draw(self.round)
        P, count = len(self.blocks), self.groups.count
        numel = self.store.sizes()
        needers = needers_from_assignment(assignment, P)
        early = self.holdings.plan(needers, numel)
        then = Holdings(P, count, early.holders_after).plan(everyone(P, count), numel)
        alone = self.holdings.plan(everyone(P, count), numel)
        self._next = (self.round, assignment)
        if early.busiest_bytes(numel) + then.busiest_bytes(numel) < alone.busiest_bytes(numel):
            t0 = time.perf_counter()
            self._deal()
            self._timed += time.perf_counter() - t0
            self._prepared = (self.round, self.last_plan)
            activate(self.blocks, self.mine())
            self._forget_state(self._moved_parameters())

    def _begin(self) -> None:
        if self._prepared is not None and self._prepared[0] == self.round:
            self.last_plan = self._prepared[1]  # its blocks arrived early; what arrived then counts as moved
        else:
            self._deal()
        self._prepared = self._next = None
        activate(self.blocks, self.mine())
        for averager in self._gradient_averagers:  # this round's parameters, data-parallel in the group
            averager.attach(self.parameters())

    def mine(self) -> Sequence[int]:
        """The blocks this rank (its group) trains this round."""
        return self.assignment[self.groups.index]

    def param_groups(self) -> List[Dict]:
        if self.assignment is None:
            raise UsageError("job.parameters() before the first round: the blocks are not dealt yet. Build the "
                             "optimizer once over model.parameters() (before the loop is fine), or call "
                             "job.parameters() inside the rounds")
        blocks = [p for b in self.mine() for p in self.blocks[b].parameters()]
        return [{"params": self.shared_parameters(), "name": "shared"}, {"params": blocks, "name": "blocks"}]

    def shared_parameters(self) -> List[torch.nn.Parameter]:
        return [d[n] for d, n in self._shared if isinstance(d[n], torch.nn.Parameter)]

    def _moved_parameters(self) -> List[torch.nn.Parameter]:
        """This round's blocks that arrived (from other ranks, or averaged with their copies)."""
        g, plan = self.groups.index, self.last_plan
        return [p for b in self.mine() if plan is None or plan.sources.get((g, b)) != (g,)
                for p in self.blocks[b].parameters()]

    def _end(self) -> None:
        if self.groups.inner is not None:
            # ---- distributed step: the group's copies of its blocks made identical (BN statistics) ----
            average_tensors_(self.groups.inner, [self.store.slab(b) for b in self.mine()])
        if not all(all_finite(t) for b in self.mine() for t in module_tensors(self.blocks[b])):
            # a block that a round's last steps made non-finite is averaged with no other rank's here,
            # and would reach the next rounds (and a state_dict() taken now) unnoticed: the shared
            # layers carry it into the average, which then raises NonFiniteError on every rank
            with torch.no_grad():
                for p in self.shared_parameters():
                    p.fill_(float("nan"))
        # ---- distributed step: one fused allreduce of the shared layers (hierarchical with groups) ----
        self._average.average()
        self.holdings.trained()  # blocks several ranks trained now differ: averaged in the next exchange

    # -- evaluation / checkpoints ----------------------------------------------------------------------
    def bn_to_recalibrate(self) -> List[torch.nn.Module]:
        """The BN layers from the first partitioned block on, in the order the model's forward runs
        them (before the first forward: the order the model registers them): before that block, the
        full model computes what every sub-network computes, so those layers' averaged running
        statistics hold. (A model that registers a BN after the blocks before them, a final BN
        defined first in __init__, had that BN left out by the registration order.)"""
        bn = torch.nn.modules.batchnorm._BatchNorm
        order = self._run_order.order or []
        if not any(id(m) in self._block_ids for m in order):  # no forward yet (or none ran a block)
            order = list(self.model.modules())
        ids = [id(m) for m in order]
        first = min(ids.index(id(b)) for b in self.blocks if id(b) in ids)
        after = {id(m) for m in order[first:]}
        inside = {id(m) for b in self.blocks for m in b.modules()}
        return [m for m in self.model.modules() if isinstance(m, bn) and (id(m) in after or id(m) in inside)]

    def eval_scale(self) -> float:
        return partition.eval_residual_scale(len(self.blocks), self.groups.count, self.min_depth)

    @contextlib.contextmanager
    def full_model(self):
        """Gather the blocks this rank lacks (averaging divergent ones), run all blocks at 1/S scale.

        Afterwards every rank goes back to its own sub-network: it keeps the blocks of the round just
        trained (now identical copies wherever several ranks trained one), or after prepare_round()
        those of the next round, and releases the rest, so the memory a rank needs stays that of one
        sub-network. Re-entrant: an inner full_model() (e.g.
        state_dict() inside an evaluation) reuses the outer gather.
        """
        if self._full_depth:
            yield self.model
            return
        self._check_boundary("full_model()")
        self.flush()
        self._full_depth += 1
        try:
            self.exchange_to(everyone(len(self.blocks), self.groups.count), keep_workspace=False)
            activate(self.blocks, range(len(self.blocks)))
            set_scale(self.blocks, self.eval_scale())
            with _bn_restored(self.model):
                yield self.model
        finally:
            self._full_depth -= 1
            set_scale(self.blocks, 1.0)
            ready = self._next is not None and self._next[0] == self.round and self._prepared is None
            if ready:  # prepare_round() left the delivery of the next round's blocks to this gather
                self.assignment = self._next[1]
            self._back_to_own_blocks()
            if ready:
                self._prepared = (self.round, self.last_plan)  # the gather's plan: what arrived for the next round
            # the blocks the gather brought (the next round's) or averaged with their copies (several
            # ranks trained them) lose their optimizer state as the next round's exchange would have
            # made them lose it: that exchange now finds them synchronised and moves nothing
            if self.assignment is not None:  # (before the first round nothing is dealt, nothing trained)
                self._forget_state(self._moved_parameters())

    def _completion(self, model):
        """The copy gathers the blocks this rank lacks (the plan full_model() would carry out, divergent
        copies averaged alike) on background communicators and runs all blocks at the evaluation's
        scale. This rank's own blocks, its holdings and the next round's exchange stay as they were."""
        blocks = _same_modules(self.model, model, self.blocks)
        store = BlockStore(blocks, self.device, like=self.store)
        P, g = len(self.blocks), self.groups
        plan = self.holdings.plan(everyone(P, g.count), self.store.sizes())
        if g.inner is not None and not self.comm.dups_subcommunicators:
            if "_background_groups" not in self.__dict__:
                # ---- distributed step (once): the groups again, split from a background world ----
                self._background_groups = Groups(self._background("world", self.comm), g.size)
            across, inner = self._background_groups.across, self._background_groups.inner
        else:
            across = self._background("across", g.across)
            inner = self._background("inner", g.inner) if g.inner is not None else None
        scale = self.eval_scale()

        def complete():
            # ---- distributed step (background): the evaluation's gather into the copy ----
            self._carry_out(plan, store, across, inner, {})
            activate(blocks, range(P))
            set_scale(blocks, scale)

        return complete, [across] + ([inner] if inner is not None else [])

    def _back_to_own_blocks(self) -> None:
        """From holding every (synchronised) block to holding only the last round's own ones."""
        if self.assignment is None:
            return
        mine = self.mine()
        for b in range(len(self.blocks)):
            if b not in mine and self.store.holds(b):
                self.store.release(b)
        self.store.trim_spares(len(mine))
        activate(self.blocks, mine)
        self.holdings.synchronized(needers_from_assignment(self.assignment, len(self.blocks)))

    def state_dict(self) -> Dict:
        state = super().state_dict()
        state["assignment"] = self.assignment
        return state

    def load_state_dict(self, state: Dict, rank_state: Optional[Dict] = None) -> None:
        """Every rank loads the full model; with the checkpoint's world size each then goes back to
        the sub-network it trained then, as the uninterrupted run did after saving."""
        super().load_state_dict(state, rank_state)
        self._prepared = self._next = None
        assignment = state.get("assignment")
        self.assignment = None
        if assignment is not None and len(assignment) == self.groups.count:
            self.assignment = tuple(tuple(a) for a in assignment)
            self._back_to_own_blocks()

    def _load_model(self, weights: Dict) -> None:
        for b in range(len(self.blocks)):
            if not self.store.holds(b):
                self.store.materialize(b, self.device)
        self.model.load_state_dict(weights)
        activate(self.blocks, range(len(self.blocks)))
        self.holdings.synchronized(everyone(len(self.blocks), self.groups.count))


    # -- sharded checkpoints ----------------------------------------------------------------------------
    def block_writers(self) -> Dict[int, List[int]]:
        """block -> the ranks that write it to a sharded checkpoint: member 0 of its lowest holding
        group (copies are identical), or of every holding group when several trained it this round."""
        G, h = self.groups.size, self.holdings
        return {b: [g * G for g in (holders if b in h.divergent else holders[:1])]
                for b, holders in enumerate(h.holders)}

    def shard(self):
        from ..averaging.tensors import _cpu_copy
        from ..blocks.tensors import shared_keys
        from .shard import Shard
        shard = Shard(rank=self._rank_shard(), writers=self.block_writers())
        loads = [0] * self.comm.size
        for b, writers in shard.writers.items():
            for r in writers:  # a block's bytes as every rank knows them (float32: BlockStore)
                loads[r] += 4 * self.store.numel(b)
            if self.comm.rank in writers:
                shard.blocks[b] = _cpu_copy(self.blocks[b].state_dict(prefix=self.block_names[b] + "."))
        prefixes = tuple(n + "." for n in self.block_names)
        own = {k: v for k, v in self.model.state_dict().items() if not k.startswith(prefixes)}
        self._shared_part(shard, own, shared_keys(self.model, self.blocks), loads)
        if self.comm.rank == 0:
            shard.shared.update(assignment=self.assignment, holders=[list(h) for h in self.holdings.holders],
                                divergent=sorted(self.holdings.divergent))
        return shard

    def load_shards(self, reader, round_index: int, same_layout: bool) -> None:
        """Each rank reads only the blocks it holds: with the checkpoint's layout, those of the round
        it was written after (copies several ranks trained stay apart, to be averaged by the next
        exchange as in the uninterrupted run); otherwise those of the first round's new assignment
        (drawn now: collective), copies averaged in rank order, as the exchange would have."""
        if self._open:
            raise UsageError("load_shards() in the middle of a round: load before the first round")
        shared = reader.shared
        self._prepared = self._next = None
        self.model.load_state_dict(shared["model"], strict=False)  # the shared layers (blocks: below)
        self.round = round_index
        P, count, g = len(self.blocks), self.groups.count, self.groups.index
        if same_layout:
            self.assignment = tuple(tuple(a) for a in shared["assignment"])
            holders = [tuple(h) for h in shared["holders"]]
            divergent = set(shared["divergent"])
            for b in range(P):
                if g in holders[b]:
                    copies = dict(reader.block_copies(b))
                    self._put_block(b, copies[g * self.groups.size] if b in divergent else next(iter(copies.values())))
                else:
                    self.store.release(b)
            self.holdings = Holdings(P, count, holders)
            self.holdings.divergent = divergent
            activate(self.blocks, self.mine())
        else:
            self.assignment = None
            needers = needers_from_assignment(self.draw(round_index), P)
            from .shard import average_copies
            for b in range(P):
                if g in needers[b]:
                    self._put_block(b, average_copies([copy for _, copy in reader.block_copies(b)]))
                else:
                    self.store.release(b)
            self.holdings = Holdings(P, count, needers)
        self.store.trim_spares(0)
        self._load_shared_parts(reader, same_layout)

    def _put_block(self, b: int, entries: Dict[str, torch.Tensor]) -> None:
        if not self.store.holds(b):
            self.store.materialize(b, self.device)
        self.store.slab(b)
        prefix = self.block_names[b] + "."
        self.blocks[b].load_state_dict({k[len(prefix):]: v for k, v in entries.items()})


class _RunOrder:
    """The order model's first forward runs its blocks and the BN layers outside them (order: None
    until a forward of the whole model ended; the hooks then go). A copy of the model made before
    the first forward (an evaluation's) carries copies of them, which note into the copy's own."""

    def __init__(self, model: torch.nn.Module, blocks: Sequence[torch.nn.Module]):
        bn = torch.nn.modules.batchnorm._BatchNorm
        inside = {id(m) for b in blocks for m in b.modules()}
        block_ids = {id(b) for b in blocks}
        watched = [m for m in model.modules()
                   if id(m) in block_ids or (isinstance(m, bn) and id(m) not in inside)]
        self.model, self.ids, self.ran = model, {id(m) for m in watched}, []
        self.order: Optional[List[torch.nn.Module]] = None
        self.handles = [m.register_forward_pre_hook(_RunOrderBefore(self)) for m in watched]
        self.handles.append(model.register_forward_hook(_RunOrderAfter(self)))


class _RunOrderBefore:
    def __init__(self, watch: _RunOrder):
        self.watch = watch

    def __call__(self, module, args):
        w = self.watch
        if w.order is None and id(module) in w.ids and all(module is not m for m in w.ran):
            w.ran.append(module)


class _RunOrderAfter:
    def __init__(self, watch: _RunOrder):
        self.watch = watch

    def __call__(self, module, args, output):
        w = self.watch
        if module is not w.model or w.order is not None:
            return
        for h in w.handles:
            h.remove()
        w.order, w.ran = list(w.ran), []


def _device_of(model) -> torch.device:
    for t in model.state_dict().values():
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


class SlicedStore:
    """A BlockStore seen by one member of a group: every block is this member's slice of its slab,
    so the exchange between groups moves slices (run_exchange needs nothing else)."""

    def __init__(self, store: BlockStore, groups: Groups):
        self.store, self.groups = store, groups

    def __len__(self) -> int:
        return len(self.store)

    def _cut(self, b: int, slab: torch.Tensor) -> torch.Tensor:
        start, stop = self.groups.my_slice(self.store.numel(b))
        return slab[start:stop]

    def sizes(self) -> List[int]:
        return [self.groups.my_slice(n)[1] - self.groups.my_slice(n)[0] for n in self.store.sizes()]

    def holds(self, b: int) -> bool:
        return self.store.holds(b)

    def slab(self, b: int) -> torch.Tensor:
        return self._cut(b, self.store.slab(b))

    def materialize(self, b: int, device) -> torch.Tensor:
        return self._cut(b, self.store.materialize(b, device))

    def release(self, b: int) -> None:
        self.store.release(b)

    def trim_spares(self, keep: int) -> None:
        self.store.trim_spares(keep)
