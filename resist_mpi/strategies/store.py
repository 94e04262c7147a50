"""Where a rank's blocks live between rounds (ResIST's block store).

A held block's tensors are views of one flat slab (sent, received and averaged as one piece); a
released block's tensors are empty placeholders (the same Parameter objects, numel 0, no gradient),
so a rank only ever keeps storage for the blocks it holds and an optimizer built once over
model.parameters() stays valid."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..blocks.kinds import BlockError
from ..blocks.tensors import module_tensors, set_storage_, tensor_slots
from ..comm.fusion import empty_flat


class _BlockSlots:
    """Where a block's tensors sit in its modules (fixed at construction), for fast rebinding.

    A round materialises and releases several blocks on every rank, so the slots are found once.
    The block's nn.Parameter objects are the same objects for the whole run: binding points their
    .data at views of a slab, releasing points it at an empty placeholder (and drops the gradient),
    so an optimizer built once over model.parameters() keeps holding exactly this block's
    parameters. A Parameter still on the meta device (a model built on meta) gets real storage
    once, by swapping its contents in place (torch.utils.swap_tensors: the Python object stays).
    Buffers (BN statistics) are plain tensors nobody else holds; they are rebound.
    """

    def __init__(self, block: nn.Module, like: Optional["_BlockSlots"] = None):
        """like: the slots of a block of the same structure, whose shapes these take (a copy of a
        model, where released blocks are placeholders and their shapes cannot be read)."""
        slots = tensor_slots(block)  # parameters first, then float buffers
        self.first, self.last = slots[0], slots[-1]
        counters = [(m._buffers, n, b) for m in block.modules() for n, b in m._buffers.items()
                    if b is not None and not b.is_floating_point()]
        if like is None:
            shapes = [d[n].shape for d, n in slots]
            counter_shapes = [b.shape for _, _, b in counters]
        else:
            shapes = [p[1] for p in like.params] + [f[2] for f in like.floats]
            counter_shapes = [c[2] for c in like.counters]
            if len(shapes) != len(slots) or len(counter_shapes) != len(counters):
                raise ValueError("_BlockSlots(like=...): the blocks differ in structure")
        self.params = [(d[n], shape) for (d, n), shape in zip(slots, shapes) if isinstance(d[n], nn.Parameter)]
        self.floats = [(d, n, shape) for (d, n), shape in zip(slots, shapes) if not isinstance(d[n], nn.Parameter)]
        # BN's num_batches_tracked: not exchanged (module_tensors leaves it out), restarts at 0
        self.counters = [(d, n, shape, b.dtype) for (d, n, b), shape in zip(counters, counter_shapes)]
        self.numels = [math.prod(shape) for shape in shapes]
        self.numel = sum(self.numels)

    def tensor(self, slot) -> torch.Tensor:
        d, n = slot
        return d[n]

    def bind(self, slab: torch.Tensor, keep_counters: bool) -> None:
        """Make the block's tensors consecutive views of slab (module_tensors order).

        keep_counters: a held block moving into a slab keeps its BN counters; a released one
        coming back gets zeros.
        """
        views = slab.split(self.numels)
        for (p, shape), v in zip(self.params, views):
            set_storage_(p, v.view(shape))
        for (d, name, shape), v in zip(self.floats, views[len(self.params):]):
            d[name] = v.view(shape)
        for d, name, shape, dtype in self.counters:
            if not keep_counters or d[name].is_meta or d[name].shape != shape:
                d[name] = torch.zeros(shape, dtype=dtype, device=slab.device)

    def unbind(self, device) -> None:
        """Give the block's tensors no storage: empty placeholders on device (same Parameter objects,
        gradients dropped, so an optimizer skips them)."""
        for p, _ in self.params:
            set_storage_(p, torch.empty(0, dtype=torch.float32, device=device))
            p.grad = None
        for d, name, _ in self.floats:
            d[name] = torch.empty(0, dtype=torch.float32, device=device)
        for d, name, _, dtype in self.counters:
            d[name] = torch.empty(0, dtype=dtype, device=device)

    def held(self, on_meta: bool = False) -> bool:
        """Whether the block has storage (its tensors have their real shapes, off the meta device
        unless the store itself is on meta: counting bytes without data, resist_mpi.tools.traffic)."""
        t = self.tensor(self.first)
        return (on_meta or not t.is_meta) and t.numel() == self.numels[0]


class BlockStore:
    """The storage of a list of blocks on this rank: which are held, each held one as one flat slab.

    holds(b) / slab(b) / release(b) / materialize(b, device) are all a strategy needs. Released
    blocks keep their modules and their Parameter objects (empty placeholders, no storage), so the
    model's structure never changes and an optimizer built once keeps holding every parameter.
    Slabs of released blocks go to a small spare pool, reused by the next round's new blocks
    instead of faulting in fresh pages; a reused slab is only ever bound to one block at a time,
    so no live block's storage is shared with another's.

    Args:
        blocks: the partitioned blocks.
        device: where released blocks' placeholders live (the blocks' device).
    """

    def __init__(self, blocks: Sequence[nn.Module], device="cpu", like: Optional["BlockStore"] = None):
        """like: a store over blocks of the same structure (the blocks of a copy of its model):
        shapes come from it, so a copied placeholder is known for the block it stands for."""
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self._slots = [_BlockSlots(b, like._slots[i] if like is not None else None) for i, b in enumerate(self.blocks)]
        self._slabs: List[Optional[torch.Tensor]] = [None] * len(self.blocks)
        self._spares: Dict[tuple, List[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def numel(self, b: int) -> int:
        """Elements of block b (parameters + float buffers), known for released blocks too."""
        return self._slots[b].numel

    def sizes(self) -> List[int]:
        return [s.numel for s in self._slots]

    def holds(self, b: int) -> bool:
        return self._slots[b].held(self.device.type == "meta")

    def tensors(self, b: int) -> List[torch.Tensor]:
        return module_tensors(self.blocks[b])

    def _current_slab(self, b: int) -> Optional[torch.Tensor]:
        """Block b's slab if its tensors are still views of it (checked at both ends: tensors are
        only ever replaced all together, by .to(), to_empty() or the store itself)."""
        slab, slots = self._slabs[b], self._slots[b]
        if slab is None:
            return None
        first, last = slots.tensor(slots.first), slots.tensor(slots.last)
        if not slots.held(self.device.type == "meta") or first.data_ptr() != slab.data_ptr() or \
                last.data_ptr() + 4 * last.numel() != slab.data_ptr() + 4 * slab.numel():
            return None
        return slab

    def slab(self, b: int) -> torch.Tensor:
        """Block b's slab; a held block without one (freshly built, or moved) is copied into one first."""
        slab = self._current_slab(b)
        if slab is None:
            if not self.holds(b):
                raise RuntimeError(f"block {b} is not held on this rank")
            tensors = self.tensors(b)
            bad = [t.dtype for t in tensors if t.dtype != torch.float32]
            if bad:
                raise BlockError(f"block {b}: tensors must be float32 to be exchanged, got {bad[0]}")
            slab = empty_flat(self.numel(b), tensors[0].device)
            torch.cat([t.detach().reshape(-1) for t in tensors], out=slab)
            self._slots[b].bind(slab, keep_counters=True)
            self._slabs[b] = slab
        return slab

    def release(self, b: int) -> None:
        """Free block b (its tensors become empty placeholders); its slab is kept as a spare."""
        slab = self._current_slab(b)
        self._slots[b].unbind(self.device)  # the views would keep the slab's memory alive
        self._slabs[b] = None
        if slab is not None:
            self._spares.setdefault((slab.numel(), slab.device), []).append(slab)

    def materialize(self, b: int, device) -> torch.Tensor:
        """Give released block b storage on device (a spare slab when one fits; contents
        uninitialised: the caller fills them) and return its slab."""
        n = self.numel(b)
        spares = self._spares.get((n, torch.device(device)), [])
        slab = spares.pop() if spares else empty_flat(n, device)
        self._slots[b].bind(slab, keep_counters=False)
        self._slabs[b] = slab
        return slab

    def trim_spares(self, keep: int) -> None:
        """Drop spare slabs beyond keep per size (memory goes back after an evaluation's gather)."""
        for spares in self._spares.values():
            del spares[keep:]
