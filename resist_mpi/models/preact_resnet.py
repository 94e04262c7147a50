"""Pre-activation ResNets with switchable, scalable residual blocks (the ResIST model family).

He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016: BN -> ReLU -> conv
inside each block, identity shortcut added after the last conv. Pre-activation keeps the input
distribution of a block stable when blocks before it are dropped, which is what ResIST relies on.

Every block knows whether it is *active* (inactive blocks are skipped: identity, no compute) and
its *residual scale* (1 while training; 1/S at test time, when all blocks run). The network lists
its blocks flat and says which are partitionable: by default the non-strided blocks of stage 3.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..comm.fusion import empty_flat


class PreActBlock(nn.Module):
    """Basic pre-activation block: two 3x3 convs."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)
        self.active = True
        self.res_scale = 1.0

    def residual(self, out: torch.Tensor) -> torch.Tensor:
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        branch = self.residual(out)
        return shortcut + (branch if self.res_scale == 1.0 else branch * self.res_scale)


class PreActBottleneck(PreActBlock):
    """Bottleneck pre-activation block: 1x1 -> 3x3 -> 1x1 convs, 4x expansion."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        nn.Module.__init__(self)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)
        self.active = True
        self.res_scale = 1.0

    def residual(self, out: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return self.conv3(F.relu(self.bn3(out)))


def _shortcut(in_planes: int, out_planes: int, stride: int):
    if stride == 1 and in_planes == out_planes:
        return None  # identity
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False))


class PreActResNet(nn.Module):
    """A pre-activation ResNet whose blocks can be switched off and rescaled.

    Args:
        block: PreActBlock or PreActBottleneck.
        num_blocks: blocks per stage, e.g. [3, 4, 23, 3] for ResNet-101 (basic, CIFAR-style).
        num_classes: outputs of the linear head.
        width: channels of stage 1 (64 in the paper; stages double it).
        stem: "cifar" (3x3 conv, for 32x32 inputs) or "imagenet" (7x7/2 conv + 3x3/2 max-pool).
        partition_stages: 0-based stages whose non-first (non-strided) blocks are partitionable.
    """

    def __init__(self, block, num_blocks: Sequence[int], num_classes: int = 10, width: int = 64,
                 stem: str = "cifar", partition_stages: Sequence[int] = (2,)):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', not {stem!r}")
        bad = [s for s in partition_stages if not 0 <= s < len(num_blocks)]
        if bad:
            raise ValueError(f"partition_stages {list(partition_stages)}: the model has stages 0..{len(num_blocks) - 1}")
        self.arch = dict(block=block.__name__, num_blocks=list(num_blocks), num_classes=num_classes,
                         width=width, stem=stem, partition_stages=list(partition_stages))
        if stem == "cifar":
            self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        self.in_planes = width
        self.stages = nn.ModuleList(
            self._make_stage(block, width * 2 ** i, n, 1 if i == 0 else 2) for i, n in enumerate(num_blocks))
        final = self.in_planes
        self.bn = nn.BatchNorm2d(final)
        self.linear = nn.Linear(final, num_classes)
        # Flat views: every block in order, and the partitionable ones (ids 0..P-1 in that order).
        self.blocks: List[PreActBlock] = [b for stage in self.stages for b in stage]
        self.partitionable: List[PreActBlock] = [
            b for s, stage in enumerate(self.stages) if s in partition_stages for b in list(stage)[1:]]
        del self.in_planes
        self._spares = {}
        self._block_numel = None
        self._block_slots: List[Optional[_BlockSlots]] = [None] * len(self.partitionable)
        self._shared_slots = None

    def _make_stage(self, block, planes: int, n: int, stride: int) -> nn.ModuleList:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            for blk in stage:
                if blk.active:  # inactive blocks are skipped, not zeroed: they cost nothing
                    x = blk(x)
        x = F.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)

    # -- what ResIST needs to know ----------------------------------------------------------------
    @property
    def num_partitionable(self) -> int:
        return len(self.partitionable)

    def activate(self, block_ids: Sequence[int]) -> None:
        """Make exactly the partitionable blocks block_ids active (shared blocks stay active)."""
        wanted = set(block_ids)
        for i, blk in enumerate(self.partitionable):
            blk.active = i in wanted

    def activate_all(self) -> None:
        for blk in self.partitionable:
            blk.active = True

    def set_residual_scale(self, scale: float) -> None:
        """Scale the residual branch of every partitionable block (1 for training)."""
        for blk in self.partitionable:
            blk.res_scale = float(scale)

    # -- holding only a sub-ResNet ------------------------------------------------------------------
    # A held block's float tensors are views of one flat *slab* (parameters, then float buffers, in
    # block_tensors order): it is sent, received and averaged as one piece. A released block's
    # tensors live on the meta device (shapes, no storage); its slab goes to a small spare pool so
    # the next round's new blocks reuse memory instead of faulting in fresh pages.
    def holds_block(self, i: int) -> bool:
        return not self.partitionable[i].bn1.weight.is_meta

    def block_slab(self, i: int) -> Optional[torch.Tensor]:
        """The flat tensor block i's tensors are views of, or None (e.g. a freshly built block).

        Checked cheaply (first and last tensor still at the slab's two ends): tensors are only
        ever replaced all together (to_empty, .to(), _BlockSlots), never one by one.
        """
        blk = self.partitionable[i]
        slab = getattr(blk, "_slab", None)
        if slab is None:
            return None
        first, last = blk._ends
        if first.is_meta or first.data_ptr() != slab.data_ptr() or \
                last.data_ptr() + 4 * last.numel() != slab.data_ptr() + 4 * slab.numel():
            return None
        return slab

    def slab_of(self, i: int) -> torch.Tensor:
        """Block i's slab; a held block that has none (freshly built) is moved into one first."""
        slab = self.block_slab(i)
        if slab is None:
            blk = self.partitionable[i]
            slab = empty_flat(self.block_numel(i), blk.bn1.weight.device)
            torch.cat([t.detach().reshape(-1) for t in module_tensors(blk)], out=slab)
            self._slots(i).bind(slab, keep_counters=True)
        return slab

    def release_block(self, i: int) -> None:
        """Free block i (its tensors move to the meta device); its slab is kept as a spare."""
        blk = self.partitionable[i]
        slab = self.block_slab(i)
        blk.active = False
        self._slots(i).unbind()  # the views would keep the slab's memory alive
        if slab is not None:
            self._spares.setdefault((slab.numel(), slab.device), []).append(slab)

    def materialize_block(self, i: int, device) -> torch.Tensor:
        """Give released block i storage on device (a spare slab when one fits; contents
        uninitialised: the caller fills them) and return its slab."""
        n = self.block_numel(i)
        spares = self._spares.get((n, torch.device(device)), [])
        slab = spares.pop() if spares else empty_flat(n, device)
        self._slots(i).bind(slab, keep_counters=False)
        return slab

    def _slots(self, i: int) -> "_BlockSlots":
        if self._block_slots[i] is None:
            self._block_slots[i] = _BlockSlots(self.partitionable[i])
        return self._block_slots[i]

    def trim_spares(self, keep: int) -> None:
        """Drop spare slabs beyond keep (memory goes back once evaluation's extra blocks are released)."""
        for key, spares in self._spares.items():
            del spares[keep:]

    def shared_modules(self) -> List[nn.Module]:
        """The modules every rank holds and trains: all but the partitionable blocks."""
        part = set(map(id, self.partitionable))
        return [self.stem] + [b for b in self.blocks if id(b) not in part] + [self.bn, self.linear]

    def shared_tensors(self) -> List[torch.Tensor]:
        """Parameters and floating-point buffers of the shared layers, in a fixed order.

        Read through slots found once (module dicts and names), since ResIST averages these every
        round: walking the modules took 0.4 ms on ResNet-101. The dicts are the modules' own, so
        tensors replaced later (.to(), to_empty(), load_state_dict(assign=True)) are seen.
        """
        if self._shared_slots is None:
            self._shared_slots = [slot for m in self.shared_modules() for slot in tensor_slots(m)]
        return [d[name] for d, name in self._shared_slots]

    def block_tensors(self, i: int) -> List[torch.Tensor]:
        """Parameters and floating-point buffers of partitionable block i, in a fixed order."""
        return module_tensors(self.partitionable[i])

    def block_numel(self, i: int) -> int:
        if self._block_numel is None:  # shapes never change: count once
            self._block_numel = [sum(t.numel() for t in module_tensors(b)) for b in self.partitionable]
        return self._block_numel[i]

    def shared_numel(self) -> int:
        return sum(t.numel() for t in self.shared_tensors())


def module_tensors(module: nn.Module) -> List[torch.Tensor]:
    """Parameters then floating-point buffers (BN running stats) of module, in definition order.

    BN's integer num_batches_tracked is left out: it is only read when momentum is None, and
    keeping every exchanged tensor float32 lets one flat buffer carry a whole phase.
    """
    return list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]


def tensor_slots(module: nn.Module) -> List[tuple]:
    """(dict, name) of each of module_tensors(module), in the same order: d[name] is the tensor."""
    mods = list(module.modules())
    return [(m._parameters, n) for m in mods for n, p in m._parameters.items() if p is not None] + \
           [(m._buffers, n) for m in mods for n, b in m._buffers.items() if b is not None and b.is_floating_point()]


class _BlockSlots:
    """Where a block's tensors sit in its modules (fixed at construction), for fast rebinding.

    A round materialises and releases several blocks on every rank; walking the modules and making
    meta tensors each time cost ~75 us per block. The slots are found once: binding is then one
    split of the slab plus a Parameter per weight, and releasing puts back meta tensors made once.
    New Parameter objects are made on binding (a meta tensor cannot become a CPU/GPU one in place);
    the optimizer is rebuilt each round, so nothing holds the old ones.
    """

    def __init__(self, block: nn.Module):
        self.block = block
        slots = tensor_slots(block)  # parameters first, then float buffers
        self.ends = (slots[0], slots[-1])
        self.params = [(d, n, d[n].shape, d[n].requires_grad) for d, n in slots if isinstance(d[n], nn.Parameter)]
        self.floats = [(d, n, d[n].shape) for d, n in slots if not isinstance(d[n], nn.Parameter)]
        # BN's num_batches_tracked: not exchanged (module_tensors leaves it out), restarts at 0
        self.counters = [(m._buffers, n, b.shape, b.dtype) for m in block.modules() for n, b in m._buffers.items()
                         if b is not None and not b.is_floating_point()]
        self.numels = [math.prod(d[n].shape) for d, n in slots]
        self.meta_params = [nn.Parameter(torch.empty(shape, dtype=torch.float32, device="meta"), requires_grad=rg)
                            for _, _, shape, rg in self.params]
        self.meta_floats = [torch.empty(shape, dtype=torch.float32, device="meta") for _, _, shape in self.floats]
        self.meta_counters = [torch.zeros(shape, dtype=dt, device="meta") for _, _, shape, dt in self.counters]

    def bind(self, slab: torch.Tensor, keep_counters: bool) -> None:
        """Make the block's tensors consecutive views of slab (module_tensors order).

        keep_counters: a held block moving into a slab keeps its BN counters; a released one
        coming back gets zeros.
        """
        views = slab.split(self.numels)
        for (d, name, shape, rg), v in zip(self.params, views):
            d[name] = nn.Parameter(v.view(shape), requires_grad=rg)
        for (d, name, shape), v in zip(self.floats, views[len(self.params):]):
            d[name] = v.view(shape)
        if not keep_counters:
            for d, name, shape, dtype in self.counters:
                d[name] = torch.zeros(shape, dtype=dtype, device=slab.device)
        (d0, n0), (d1, n1) = self.ends
        self.block._slab = slab
        self.block._ends = (d0[n0], d1[n1])  # what PreActResNet.block_slab checks

    def unbind(self) -> None:
        """Point the block's tensors at meta tensors (shapes, no storage)."""
        self.block._slab = self.block._ends = None
        for (d, name, _, _), p in zip(self.params, self.meta_params):
            d[name] = p
        for (d, name, _), t in zip(self.floats, self.meta_floats):
            d[name] = t
        for (d, name, _, _), t in zip(self.counters, self.meta_counters):
            d[name] = t
