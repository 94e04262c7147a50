"""Kinds of residual block: how each computes out = x + s * f(x) with its branch scaled by s.

ResIST partitions a model's *residual blocks*, out = x + f(x) (up to what the block does after the
addition). The package's pre-activation blocks, torchvision's BasicBlock and Bottleneck and
nn.TransformerEncoderLayer are known; a block of another kind can be registered with
register_block(cls, scaled_forward). An unregistered module passed explicitly is treated as
out = x + f(x) (its scaled form is x + s * (block(x) - x))."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch.nn as nn
import torch.nn.functional as F


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


_BUILTIN = {"resist_mpi": False, "torchvision": False}


def _register_builtin() -> None:
    """The package's kinds, without replacing a user's register_block of the same class."""
    def builtin(cls, *args):
        if cls not in _KINDS:
            register_block(cls, *args)
    if not _BUILTIN["resist_mpi"]:
        _BUILTIN["resist_mpi"] = True
        from ..models.preact_resnet import PreActBlock
        builtin(PreActBlock, _preact_scaled, _downsamples("shortcut"))  # PreActBottleneck inherits
        builtin(nn.TransformerEncoderLayer, _transformer_scaled)
    # torchvision's blocks only once something has imported their module: no instance can exist before,
    # and importing torchvision costs every rank about a second of start-up
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None and not _BUILTIN["torchvision"]:
        _BUILTIN["torchvision"] = True
        builtin(tv.BasicBlock, _tv_basic_scaled, _downsamples("downsample"), "torchvision BasicBlock")
        builtin(tv.Bottleneck, _tv_bottleneck_scaled, _downsamples("downsample"), "torchvision Bottleneck")


def block_kind(block: nn.Module) -> Optional[BlockKind]:
    """The registered kind of block (by class, subclasses included unless they override forward),
    or None."""
    cls = _registered_ancestor(block)
    # a subclass with a forward of its own (a squeeze-excitation gate, dropout, stochastic depth)
    # computes otherwise: the ancestor's scaled form would leave that out of the evaluated model
    return _KINDS[cls] if cls is not None and type(block).forward is cls.forward else None


def _registered_ancestor(block: nn.Module) -> Optional[type]:
    _register_builtin()
    return next((cls for cls in type(block).__mro__ if cls in _KINDS), None)


def overridden_kind(block: nn.Module) -> Optional[str]:
    """The name of the registered kind block's class derives from but whose forward it overrides
    (so it is not of that kind: block_kind is None), or None."""
    cls = _registered_ancestor(block)
    return _KINDS[cls].name if cls is not None and type(block).forward is not cls.forward else None


