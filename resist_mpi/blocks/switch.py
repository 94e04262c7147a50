"""Switching blocks off and scaling their branch, without changing the model's code.

make_switchable(block): the block gets an `active` switch (off: the identity, no compute) and a
residual `scale` (evaluation: the branch times 1/S before the addition, whatever comes after it,
e.g. the ReLU after the addition in torchvision's blocks). The block instance's forward is
replaced; its class, parameters and state_dict keys stay as they were."""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Optional, Sequence

import torch.nn as nn

from .kinds import BlockError, BlockKind, block_kind


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
