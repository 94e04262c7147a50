"""Residual blocks of any model: what kinds there are (`kinds`: registering, scaled forwards),
finding them (`find`), switching them off and scaling their branch (`switch`), and the tensors
of a module in exchange order (`tensors`). Nothing here communicates; where a rank's blocks are
stored between rounds is the ResIST strategy's (`resist_mpi.strategies.store`)."""
from .find import find_blocks
from .kinds import BlockError, BlockKind, block_kind, register_block
from .switch import Switch, activate, make_switchable, set_scale
from .tensors import materialize_, module_keys, module_tensors, shared_keys, shared_slots, tensor_slots

__all__ = ["find_blocks", "BlockError", "BlockKind", "block_kind", "register_block", "Switch", "activate",
           "make_switchable", "set_scale", "materialize_", "module_keys", "module_tensors", "shared_keys",
           "shared_slots", "tensor_slots"]
