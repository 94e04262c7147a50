"""Atomic checkpoints and resume.

A checkpoint is written by rank 0 at a round boundary, from the full model (every block averaged
over its owners: the strategy's full_model()), with the round counter, the strategy state, the
optimizer state when it persists across rounds, and the config. It goes to a temporary file that is
renamed into place, so a crash never leaves a half-written checkpoint under a final name; the last
--keep-checkpoints are kept.

Resuming with the same number of ranks continues the run bit for bit on CPU: all randomness after
the checkpoint (data order, augmentation, partitions) is a function of (seed, epoch, rank, batch,
round), not of an RNG state. With another number of ranks the run trains on from the same weights
(a new partition is drawn for the new world).
"""
from __future__ import annotations

import glob
import os
import re
from typing import Any, Dict, Optional

import torch

FORMAT = "resist_mpi-checkpoint-1"
_NAME = re.compile(r"ckpt-(\d{6})\.pt$")


class CheckpointError(ValueError):
    """A missing, corrupt or mismatching checkpoint (one-line message)."""


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def list_checkpoints(out: str):
    """Complete checkpoints in out, oldest first (temporary files are ignored)."""
    paths = [p for p in glob.glob(os.path.join(checkpoint_dir(out), "ckpt-*.pt")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)))


def save(cfg, c, model, strategy, next_round: int, optimizer, log, epoch: float) -> Optional[str]:
    """Write a checkpoint of model (the full, synchronised model) on rank 0; returns its path there."""
    if c.rank != 0:
        return None
    state = {
        "format": FORMAT,
        "arch": model.arch,
        "model": cfg.model,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "round": next_round,
        "epoch": epoch,  # progress in epochs: what a resume on another number of ranks continues from
        "world_size": c.size,
        "strategy": strategy.name,
        "strategy_state": strategy.state_dict(),
        # data-parallel keeps one optimizer for the run, identical on every rank
        "optimizer": optimizer.state_dict() if (optimizer is not None and not strategy.fresh_optimizer) else None,
        "config": cfg.to_dict(),
    }
    os.makedirs(checkpoint_dir(cfg.out), exist_ok=True)
    path = os.path.join(checkpoint_dir(cfg.out), f"ckpt-{next_round:06d}.pt")
    tmp = path + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(cfg.out)[:-cfg.keep_checkpoints]:
        os.remove(old)
    log.record("checkpoint", round=next_round - 1, path=path)
    return path


def load(path: str) -> Dict[str, Any]:
    """Read and sanity-check a checkpoint file; CheckpointError with one line when unusable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, bad pickle, not a torch file...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({first[:120]})")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a resist_mpi checkpoint")
    return state


def resolve_and_load(cfg, probe) -> Optional[Dict[str, Any]]:
    """The checkpoint cfg.resume names ('auto': newest in cfg.out, None when there is none),
    checked against the model about to be trained (probe: the model built on the meta device)."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = list_checkpoints(cfg.out)
        if not found:
            return None
        path = found[-1]
    else:
        path = cfg.resume
    state = load(path)
    if state["arch"] != probe.arch:
        raise CheckpointError(f"checkpoint {path} holds {state['model']} {state['arch']}, not the requested "
                              f"{cfg.model} {probe.arch}")
    expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state["state_dict"].items()}
    if expected != got:
        raise CheckpointError(f"checkpoint {path} does not match the model's tensors")
    state["path"] = path
    return state


def restore(state: Dict[str, Any], model, strategy, main, warmup_steps: int, cfg, world_size: int,
            steps_per_epoch: int) -> int:
    """Load state into model on every rank and hand it to the strategy that resumes; returns the round.

    With the checkpoint's world size the run continues at its round; with another one a round has
    another length in epochs, so the run continues at the round that starts at the same epoch."""
    for b in range(getattr(model, "num_partitionable", 0)):
        if not model.holds_block(b):
            model.materialize_block(b, next(model.parameters()).device)
    model.load_state_dict(state["state_dict"])
    start_round = int(state["round"])
    if int(state["world_size"]) != world_size:
        start_round = int(float(state["epoch"]) * steps_per_epoch) // cfg.local_steps
    if start_round * cfg.local_steps >= warmup_steps:
        main.adopt(model)  # every rank holds the identical full model
        main.load_state_dict(state.get("strategy_state", {}))
    else:
        strategy.adopt(model)
    main.resume_optimizer = state.get("optimizer")
    return start_round
