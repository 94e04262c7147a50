"""Residual blocks of any model: finding them, switching them off, scaling their branch, storing them.

ResIST partitions a model's *residual blocks*, out = x + f(x) (up to what the block does after the
addition). This module is everything ResIST needs to know about them, for any model:

- find_blocks(model, "auto" | [modules or names], stages=...): which blocks are partitioned.
  "auto" recognises the package's pre-activation ResNets, torchvision ResNets (BasicBlock,
  Bottleneck: resnet*, wide_resnet*, resnext*) and nn.TransformerEncoder layers. For ResNets the
  non-downsampling blocks of the chosen 1-based stages are taken (default: stage 3, as in the paper).
- make_switchable(block): the block gets an `active` switch (off: the identity, no compute) and a
  residual `scale` (evaluation: the branch times 1/S before the addition, whatever comes after it,
  e.g. the ReLU after the addition in torchvision's blocks). The model's code is not changed: the
  block instance's forward is replaced, its class, parameters and state_dict keys stay as they were.
- BlockStore: where a rank's blocks live. A held block's tensors are views of one flat slab (sent,
  received and averaged as one piece); a released block's tensors are empty placeholders (the same
  Parameter objects, numel 0, no gradient), so a rank only ever keeps storage for the blocks it holds
  and an optimizer built once over model.parameters() stays valid.

A block of another kind can be registered with register_block(cls, scaled_forward); an unregistered
module passed explicitly is treated as out = x + f(x) (its scaled form is x + s * (block(x) - x)).
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .comm.fusion import empty_flat


class BlockError(ValueError):
    """A block that cannot be partitioned, or blocks that cannot be found (one-line message)."""


# -- the kinds of residual block ------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockKind:
    """How one class of residual block computes with its branch scaled.

    Attributes:
        name: for messages.
        scaled_forward(block, scale, *args, **kwargs): the block's output with its residual branch
            multiplied by scale before the addition (called only when scale != 1).
        not_residual(block): why this instance cannot be switched off (a downsampling block: its
            output has another shape), or None.
    """

    name: str
    scaled_forward: Callable
    not_residual: Callable[[nn.Module], Optional[str]] = lambda block: None


def _preact_scaled(block, s, x):
    return x + s * block.residual(F.relu(block.bn1(x)))


def _tv_basic_scaled(block, s, x):
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    return block.relu(s * out + x)


def _tv_bottleneck_scaled(block, s, x):
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    out = block.bn3(block.conv3(out))
    return block.relu(s * out + x)


def _transformer_scaled(layer, s, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    x = src
    if layer.norm_first:
        x = x + s * layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + s * layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + s * layer._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return layer.norm2(x + s * layer._ff_block(x))


def _generic_scaled(block, s, x, *args, **kwargs):
    return x + s * (type(block).forward(block, x, *args, **kwargs) - x)


def _downsamples(attr: str):
    def check(block):
        return f"it has a {attr} (a downsampling block changes the shape)" if getattr(block, attr, None) is not None \
            else None
    return check


_KINDS: Dict[type, BlockKind] = {}


def register_block(cls: type, scaled_forward: Callable, not_residual: Optional[Callable] = None,
                   name: Optional[str] = None) -> None:
    """Teach ResIST a residual block class.

    Args:
        cls: the block's class (subclasses match too).
        scaled_forward: f(block, scale, *forward_args, **forward_kwargs) -> the block's output with
            its residual branch multiplied by scale before the addition.
        not_residual: f(block) -> a reason this instance cannot be partitioned, or None.
    """
    _KINDS[cls] = BlockKind(name or cls.__name__, scaled_forward, not_residual or (lambda block: None))


def _register_builtin() -> None:
    from .models.preact_resnet import PreActBlock
    register_block(PreActBlock, _preact_scaled, _downsamples("shortcut"))  # PreActBottleneck inherits
    register_block(nn.TransformerEncoderLayer, _transformer_scaled)
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # torchvision is optional for the library
        return
    register_block(BasicBlock, _tv_basic_scaled, _downsamples("downsample"), "torchvision BasicBlock")
    register_block(Bottleneck, _tv_bottleneck_scaled, _downsamples("downsample"), "torchvision Bottleneck")


def block_kind(block: nn.Module) -> Optional[BlockKind]:
    """The registered kind of block (by class, subclasses included), or None."""
    if not _KINDS:
        _register_builtin()
    for cls in type(block).__mro__:
        if cls in _KINDS:
            return _KINDS[cls]
    return None


# -- switching blocks ----------------------------------------------------------------------------------------
@dataclass
class Switch:
    active: bool = True
    scale: float = 1.0
    kind: Optional[BlockKind] = None
    name: str = "block"


def _switched_forward(self, *args, **kwargs):
    sw = self._resist_switch
    if not sw.active:  # skipped, not zeroed: no compute at all
        return args[0] if args else next(iter(kwargs.values()))
    if sw.scale == 1.0:  # the block's own code, bit for bit
        return type(self).forward(self, *args, **kwargs)
    if sw.kind is not None:
        return sw.kind.scaled_forward(self, sw.scale, *args, **kwargs)
    out = type(self).forward(self, *args, **kwargs)
    x = args[0] if args else next(iter(kwargs.values()))
    if out.shape != x.shape:
        raise BlockError(f"block {sw.name} is not residual: its input {tuple(x.shape)} and output "
                         f"{tuple(out.shape)} differ")
    return x + sw.scale * (out - x)


def make_switchable(block: nn.Module, name: str = "block") -> Switch:
    """Give block an on/off switch and a residual scale (see the module docstring); returns its Switch.

    The instance's forward becomes a bound method (so copy.deepcopy of the model rebinds it to the
    copy) that calls the class's own forward while active at scale 1.
    """
    if not hasattr(block, "_resist_switch"):
        block._resist_switch = Switch(kind=block_kind(block), name=name)
        block.forward = types.MethodType(_switched_forward, block)
    return block._resist_switch


def activate(blocks: Sequence[nn.Module], ids) -> None:
    """Exactly the blocks whose index is in ids are active."""
    wanted = set(ids)
    for i, b in enumerate(blocks):
        b._resist_switch.active = i in wanted


def set_scale(blocks: Sequence[nn.Module], scale: float) -> None:
    for b in blocks:
        b._resist_switch.scale = float(scale)


# -- finding blocks ------------------------------------------------------------------------------------------
def _resnet_stages(model: nn.Module) -> Optional[List[Sequence[nn.Module]]]:
    """The stages (lists of blocks) of a ResNet the package recognises, or None."""
    from .models.preact_resnet import PreActResNet
    for m in model.modules():
        if isinstance(m, PreActResNet):
            return [list(stage) for stage in m.stages]
        layers = [getattr(m, f"layer{k}", None) for k in range(1, 5)]
        if all(isinstance(layer, nn.Sequential) for layer in layers) and \
                all(block_kind(b) is not None for layer in layers for b in layer):
            return [list(layer) for layer in layers]  # torchvision's ResNet (and look-alikes)
    return None


def find_blocks(model: nn.Module, blocks: Union[str, Sequence] = "auto",
                stages: Optional[Sequence[int]] = None) -> List[Tuple[str, nn.Module]]:
    """The partitionable blocks of model, in model order, as (name, module).

    Args:
        blocks: "auto" (see the module docstring), or a list of modules or their names in model.
        stages: with "auto" on a ResNet, the 1-based stages whose non-downsampling blocks are
            partitioned (default (3,)).
    Raises:
        BlockError (one line, naming the block) for a block that is not residual, a name that is
        not in the model, or a model where "auto" finds nothing.
    """
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(blocks, str) and blocks != "auto":
        raise BlockError(f"blocks={blocks!r}: pass 'auto' or a list of modules or module names")
    if blocks == "auto":
        found = _auto_blocks(model, tuple(stages or (3,)))
    else:
        by_name = dict(model.named_modules())
        found = []
        for item in blocks:
            if isinstance(item, str):
                if item not in by_name:
                    raise BlockError(f"no module named {item!r} in {type(model).__name__}")
                item = by_name[item]
            if id(item) not in names:
                raise BlockError(f"block {type(item).__name__} is not a module of {type(model).__name__}")
            kind = block_kind(item)
            why = kind.not_residual(item) if kind else None
            if why:
                raise BlockError(f"block {names[id(item)]} ({type(item).__name__}) is not residual: {why}")
            found.append(item)
        order = {id(m): k for k, m in enumerate(model.modules())}
        found.sort(key=lambda m: order[id(m)])
    if len({id(m) for m in found}) != len(found):
        raise BlockError("a block is listed twice")
    return [(names[id(m)], m) for m in found]


def _auto_blocks(model: nn.Module, stages: Tuple[int, ...]) -> List[nn.Module]:
    resnet = _resnet_stages(model)
    if resnet is not None:
        bad = [s for s in stages if not 1 <= s <= len(resnet)]
        if bad:
            raise BlockError(f"stages {list(stages)}: the model has stages 1..{len(resnet)}")
        return [b for s, stage in enumerate(resnet, 1) if s in stages for b in stage
                if block_kind(b).not_residual(b) is None]
    encoders = [m for m in model.modules() if isinstance(m, nn.TransformerEncoder)]
    if encoders:
        for enc in encoders:
            # its nested-tensor fast path (eval with a padding mask) bypasses the layers' forward
            enc.use_nested_tensor = False
        return [layer for enc in encoders for layer in enc.layers]
    raise BlockError(f"blocks='auto' found no residual stack in {type(model).__name__} (pre-activation or "
                     f"torchvision ResNet, nn.TransformerEncoder): pass blocks=[modules or module names]")


# -- where blocks live ----------------------------------------------------------------------------------------
def module_tensors(module: nn.Module) -> List[torch.Tensor]:
    """Parameters then floating-point buffers (BN running stats) of module, in definition order.

    BN's integer num_batches_tracked is left out: keeping every exchanged tensor float32 lets one
    flat buffer carry a whole phase.
    """
    return list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]


def tensor_slots(module: nn.Module, recurse: bool = True) -> List[tuple]:
    """(dict, name) of each of module_tensors(module), in the same order: d[name] is the tensor.

    Reading tensors through slots sees tensors replaced later (.to(), to_empty(), rebinding)."""
    mods = list(module.modules()) if recurse else [module]
    return [(m._parameters, n) for m in mods for n, p in m._parameters.items() if p is not None] + \
           [(m._buffers, n) for m in mods for n, b in m._buffers.items() if b is not None and b.is_floating_point()]


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

    def __init__(self, block: nn.Module):
        slots = tensor_slots(block)  # parameters first, then float buffers
        self.first, self.last = slots[0], slots[-1]
        self.params = [(d[n], d[n].shape) for d, n in slots if isinstance(d[n], nn.Parameter)]
        self.floats = [(d, n, d[n].shape) for d, n in slots if not isinstance(d[n], nn.Parameter)]
        # BN's num_batches_tracked: not exchanged (module_tensors leaves it out), restarts at 0
        self.counters = [(m._buffers, n, b.shape, b.dtype) for m in block.modules() for n, b in m._buffers.items()
                         if b is not None and not b.is_floating_point()]
        self.numels = [math.prod(d[n].shape) for d, n in slots]
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
        unless the store itself is on meta: counting bytes without data, resist_mpi.traffic)."""
        t = self.tensor(self.first)
        return (on_meta or not t.is_meta) and t.numel() == self.numels[0]


def set_storage_(p: torch.Tensor, value: torch.Tensor) -> None:
    """Point p (a Parameter or tensor) at value's storage, keeping the object p: .data for real
    tensors, a one-time swap for a tensor on the meta device (its type cannot change otherwise)."""
    if p.is_meta and not value.is_meta:
        holder = nn.Parameter(value, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else value
        torch.utils.swap_tensors(p, holder)
    else:
        p.data = value


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

    def __init__(self, blocks: Sequence[nn.Module], device="cpu"):
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self._slots = [_BlockSlots(b) for b in self.blocks]
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


# -- what is not a block ---------------------------------------------------------------------------------------
def shared_slots(model: nn.Module, blocks: Sequence[nn.Module]) -> List[tuple]:
    """tensor_slots of every module of model outside the blocks (the shared layers every rank trains),
    in model order: parameters then float buffers, module by module."""
    inside = {id(m) for b in blocks for m in b.modules()}
    mods = [m for m in model.modules() if id(m) not in inside]
    return [(m._parameters, n) for m in mods for n, p in m._parameters.items() if p is not None] + \
           [(m._buffers, n) for m in mods for n, t in m._buffers.items() if t is not None and t.is_floating_point()]


def shared_keys(model: nn.Module, blocks: Sequence[nn.Module]) -> List[str]:
    """The state_dict keys of shared_slots(model, blocks), in the same order."""
    inside = {id(m) for b in blocks for m in b.modules()}
    mods = [(name, m) for name, m in model.named_modules() if id(m) not in inside]
    join = lambda a, b: f"{a}.{b}" if a else b  # noqa: E731
    return [join(mn, n) for mn, m in mods for n, p in m._parameters.items() if p is not None] + \
           [join(mn, n) for mn, m in mods for n, t in m._buffers.items() if t is not None and t.is_floating_point()]


def module_keys(model: nn.Module) -> List[str]:
    """The state_dict keys of module_tensors(model), in the same order."""
    return shared_keys(model, [])


def materialize_(model: nn.Module, device, skip: Sequence[nn.Module] = ()) -> None:
    """Give every tensor of model still on the meta device real (uninitialised) storage on device,
    outside the modules in skip (e.g. the blocks: they get storage when they arrive). Parameters
    keep their identity (an optimizer built before still holds them); BN counters start at zero."""
    inside = {id(m) for b in skip for m in b.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        for p in m._parameters.values():
            if p is not None and p.is_meta:
                set_storage_(p, torch.empty(p.shape, dtype=p.dtype, device=device))
        for n, t in m._buffers.items():
            if t is not None and t.is_meta:
                m._buffers[n] = torch.empty_like(t, device=device) if t.is_floating_point() else \
                    torch.zeros_like(t, device=device)
