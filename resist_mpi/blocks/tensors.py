"""A module's tensors in the order they are exchanged, and the model's shared (non-block) part.

Parameters then floating-point buffers; slots ((dict, name) pairs) see tensors replaced later;
materialize_ gives a model built on the meta device real storage except for the blocks skipped."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn


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
    mods = list(module.named_modules()) if recurse else [("", module)]
    return [(d, n) for d, n, _ in _slots(mods)]


def _slots(mods: Sequence[tuple]) -> List[tuple]:
    """(dict, name, state_dict key) of the parameters, then the float buffers, of the (prefix,
    module) pairs mods, module by module. A tensor reachable under several names (tied weights: an
    embedding that is also the output layer's weight) comes once, under its first name, as in
    module.parameters(): listed twice, it would be averaged twice and no flat buffer could hold it."""
    seen, out = set(), []
    for kind in ("_parameters", "_buffers"):
        for prefix, m in mods:
            tensors = getattr(m, kind)
            for n, t in tensors.items():
                if t is None or id(t) in seen or (kind == "_buffers" and not t.is_floating_point()):
                    continue
                seen.add(id(t))
                out.append((tensors, n, f"{prefix}.{n}" if prefix else n))
    return out


def set_storage_(p: torch.Tensor, value: torch.Tensor) -> None:
    """Point p (a Parameter or tensor) at value's storage, keeping the object p: .data for real
    tensors, a one-time swap for a tensor on the meta device (its type cannot change otherwise)."""
    if p.is_meta and not value.is_meta:
        holder = nn.Parameter(value, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else value
        torch.utils.swap_tensors(p, holder)
    else:
        p.data = value


# -- what is not a block ---------------------------------------------------------------------------------------
def shared_slots(model: nn.Module, blocks: Sequence[nn.Module]) -> List[tuple]:
    """tensor_slots of every module of model outside the blocks (the shared layers every rank trains),
    in model order: parameters then float buffers, module by module (tied ones once)."""
    return [(d, n) for d, n, _ in _slots(_outside(model, blocks))]


def shared_keys(model: nn.Module, blocks: Sequence[nn.Module]) -> List[str]:
    """The state_dict keys of shared_slots(model, blocks), in the same order (a tied tensor's first
    name; its other names are in state_dict() too, with the same values)."""
    return [key for _, _, key in _slots(_outside(model, blocks))]


def _outside(model: nn.Module, blocks: Sequence[nn.Module]) -> List[tuple]:
    """(name, module) of every module of model outside the blocks, in model order."""
    inside = {id(m) for b in blocks for m in b.modules()}
    return [(name, m) for name, m in model.named_modules() if id(m) not in inside]


def check_block_tensors(model: nn.Module, names: Sequence[str], blocks: Sequence[nn.Module]) -> None:
    """ValueError (one line) unless every tensor of each block is its own: a block moves between
    ranks as its parameters and float buffers, apart from the shared layers and the other blocks.
    So a tensor of a block may not also belong to another block or to the shared layers (tied
    weights: released with its block, the other place would lose it too), and a block may hold no
    integer or bool buffer but BN's step counter (it would arrive as zeros)."""
    owner: Dict[int, str] = {}
    for name, block in zip(names, blocks):
        tensors = list(block.named_parameters(remove_duplicate=False)) + list(block.named_buffers(remove_duplicate=False))
        if not any(t.is_floating_point() for _, t in tensors):
            raise ValueError(f"block {name} holds no parameter or float buffer: there is nothing of it to move or "
                             f"train; leave it out of the partitioned blocks")
        for n, t in tensors:
            if owner.get(id(t), name) != name:
                raise _tied(f"{name}.{n}", owner[id(t)])
            owner[id(t)] = name
            if not t.is_floating_point() and not n.endswith("num_batches_tracked"):
                raise ValueError(f"block {name} holds the {t.dtype} buffer {n}: a block moves as its parameters and "
                                 f"float buffers, so it would arrive as zeros; make it a float buffer, or keep it "
                                 f"outside the partitioned blocks")
        for mname, m in block.named_modules(prefix=name, remove_duplicate=False):
            for n in sorted(m._non_persistent_buffers_set):
                if m._buffers.get(n) is not None:
                    raise ValueError(f"block {name} holds the non-persistent buffer {mname}.{n}: a state_dict() leaves it "
                                     f"out, so a resume would leave it unset on the ranks that did not hold the block; "
                                     f"register it with persistent=True, or keep it outside the partitioned blocks")
    for mname, m in _outside(model, blocks):
        for n, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None and id(t) in owner:
                raise _tied(f"{mname}.{n}" if mname else n, owner[id(t)])
    # a module of a block that the model also holds outside it (self.final = self.blocks[0].norm):
    # model.named_modules() lists it once, inside the block, so the loop above never sees it
    for mname, m in model.named_modules(remove_duplicate=False):
        if any(mname == b or mname.startswith(b + ".") for b in names):
            continue
        for n, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if id(t) in owner:
                raise _tied(f"{mname}.{n}" if mname else n, owner[id(t)])


def _tied(where: str, block: str) -> ValueError:
    return ValueError(f"{where} is also a tensor of {block} (tied): a block moves between ranks alone, so its "
                      f"tensors must be its own; untie them, or leave those modules unpartitioned")


def shared_counters(model: nn.Module, blocks: Sequence[nn.Module]) -> List[tuple]:
    """(dict, name) of the integer and bool buffers of the shared layers other than BN's step counters
    (an index, a mask): the float broadcast of the initial model does not carry them."""
    return [(m._buffers, n) for _, m in _outside(model, blocks) for n, t in m._buffers.items()
            if t is not None and not t.is_floating_point() and n != "num_batches_tracked"]


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
