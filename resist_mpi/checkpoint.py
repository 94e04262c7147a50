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


def rank_path(path: str, rank: int) -> str:
    """The per-rank companion of checkpoint path (optimizer state that differs between ranks)."""
    return path[:-len(".pt")] + f".rank{rank}.pt"


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def shared_momentum(optimizer) -> list:
    """Momentum buffers of the optimizer's 'shared' group, in parameter order (None where unset)."""
    return [optimizer.state.get(p, {}).get("momentum_buffer") for g in optimizer.param_groups
            if g.get("name") == "shared" for p in g["params"]]


def save(cfg, c, model, strategy, next_round: int, optimizer, log, epoch: float) -> Optional[str]:
    """Write a checkpoint of model (the full, synchronised model); returns its path on rank 0.

    Every rank calls this. With --keep-shared-momentum each rank's momentum of the shared layers
    differs, so every rank first writes its own companion file; the main file, written by rank 0
    after all of them, is what makes the checkpoint exist.
    """
    os.makedirs(checkpoint_dir(cfg.out), exist_ok=True)
    path = os.path.join(checkpoint_dir(cfg.out), f"ckpt-{next_round:06d}.pt")
    per_rank = optimizer is not None and strategy.fresh_optimizer and cfg.keep_shared_momentum
    if per_rank:
        _atomic_save({"shared_momentum": [None if m is None else m.detach().cpu() for m in shared_momentum(optimizer)],
                      "rank": c.rank}, rank_path(path, c.rank))
        c.barrier()  # every companion is in place before the main file commits the checkpoint
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
        "per_rank_optimizer": per_rank,
        "config": cfg.to_dict(),
    }
    _atomic_save(state, path)
    for old in list_checkpoints(cfg.out)[:-cfg.keep_checkpoints]:
        os.remove(old)
        for companion in glob.glob(old[:-len(".pt")] + ".rank*.pt"):
            os.remove(companion)
    log.record("checkpoint", round=next_round - 1, path=path)
    return path


def check_out_dir(cfg) -> None:
    """Refuse to start a new run over the records of another one (CheckpointError, one line).

    An --out that holds metrics.jsonl or checkpoints is continued only when --resume says so, and
    started afresh only with --overwrite; nothing a user had is replaced without being asked.
    """
    if cfg.resume or cfg.overwrite:
        return
    if os.path.isfile(os.path.join(cfg.out, "metrics.jsonl")) or list_checkpoints(cfg.out):
        raise CheckpointError(f"--out {cfg.out} holds a run; pass --resume auto to continue it, or --overwrite")


def clear_out_dir(cfg) -> None:
    """--overwrite: delete the old run's checkpoints (with their per-rank companions) and records,
    so --resume auto and the --keep-checkpoints pruning never mistake them for the new run's."""
    for path in glob.glob(os.path.join(checkpoint_dir(cfg.out), "ckpt-*.pt")):
        os.remove(path)
    for name in ("metrics.jsonl", "config.json"):
        if os.path.isfile(os.path.join(cfg.out, name)):
            os.remove(os.path.join(cfg.out, name))


def load(path: str, companion: bool = False) -> Dict[str, Any]:
    """Read and sanity-check a checkpoint file (or a per-rank companion); CheckpointError with one
    line when unusable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, bad pickle, not a torch file...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({first[:120]})")
    if companion:
        if not isinstance(state, dict) or "shared_momentum" not in state:
            raise CheckpointError(f"{path} is not a resist_mpi checkpoint companion")
        return state
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a resist_mpi checkpoint")
    return state


def resolve_and_load(cfg, probe, rank: int = 0, world_size: int = 1) -> Optional[Dict[str, Any]]:
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
    state["momentum"] = None
    if state.get("per_rank_optimizer") and int(state["world_size"]) == world_size:
        companion = load(rank_path(path, rank), companion=True)
        state["momentum"] = companion["shared_momentum"]
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
    main.resume_momentum = state.get("momentum")  # None with another world size: momentum restarts
    return start_round
