"""Which blocks of a model ResIST partitions.

find_blocks(model, "auto" | [modules or names], stages=...): "auto" recognises the package's
pre-activation ResNets, torchvision ResNets (BasicBlock, Bottleneck: resnet*, wide_resnet*,
resnext*) and nn.TransformerEncoder layers. For ResNets the non-downsampling blocks of the chosen
1-based stages are taken (default: stage 3, as in the paper)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from .kinds import BlockError, block_kind, overridden_kind


# -- finding blocks ------------------------------------------------------------------------------------------
def _resnet_stages(model: nn.Module) -> Optional[List[Sequence[nn.Module]]]:
    """The stages (lists of blocks) of a ResNet the package recognises, or None."""
    from ..models.preact_resnet import PreActResNet
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
    for name, m in model.named_modules():
        base = overridden_kind(m)
        if base is not None:
            raise BlockError(f"blocks='auto': {name} ({type(m).__name__}) derives from {base} but has a forward "
                             f"of its own, whose scaled form the package does not know: register it with "
                             f"resist_mpi.register_block({type(m).__name__}, scaled_forward), or pass "
                             f"blocks=[modules or module names] (then each is taken as out = x + f(x))")
    raise BlockError(f"blocks='auto' found no residual stack in {type(model).__name__} (pre-activation or "
                     f"torchvision ResNet, nn.TransformerEncoder): pass blocks=[modules or module names]")
