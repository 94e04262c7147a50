"""Atomic checkpoints and resume.

A checkpoint is the strategy's state_dict() (collective: the full model, every block averaged over
its owners; the next round; the optimizer state when it persists across rounds) written by rank 0
at a round boundary with the epoch, the world size and the config; state that differs between
ranks (rank_state_dict(): kept momentum) goes to per-rank companion files written first. Each file
goes to a temporary file that is renamed into place, so a crash never leaves a half-written
checkpoint under a final name; the last --keep-checkpoints are kept.

Resuming with the same number of ranks continues the run bit for bit on CPU: all randomness after
the checkpoint (data order, augmentation, partitions) is a function of (seed, epoch, rank, batch,
round), not of an RNG state. With another number of ranks the run trains on from the same weights
(a new partition is drawn for the new world).
"""
from __future__ import annotations

import fcntl
import glob
import os
import re
import socket
import time
from typing import Any, Dict, Optional

import torch

from .errors import NonFiniteError

FORMAT = "resist_mpi-checkpoint-3"
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
    """Write obj to path so that path is either the old file or the complete new one: a temporary
    file, fsync, rename, fsync of the directory (the rename itself survives a crash). A failure
    (a full disk) removes the temporary file and raises OSError with one line."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"cannot write checkpoint {path}: {_first_line(e)}") from None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_finite(state: Dict[str, Any]) -> None:
    """NonFiniteError unless every floating tensor of state["model"] is finite: a checkpoint is
    never written from a diverged model (so rotation never deletes the newest good one)."""
    for k, v in state["model"].items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise NonFiniteError(f"the model is not finite ({k}): checkpoint not written")


def save(cfg, c, job, log, epoch: float) -> Optional[str]:
    """Write a checkpoint of job (a Strategy) after its last round; returns the path on rank 0.

    Every rank calls this (state_dict() is collective). Per-rank state, when there is any, is
    written by every rank first; the main file, written by rank 0 after all of them, is what makes
    the checkpoint exist.
    """
    state = job.state_dict()
    state.pop("rank_states", None)  # per-rank parts go to companion files, written by each rank
    check_finite(state)
    rank_state = job.rank_state_dict()
    os.makedirs(checkpoint_dir(cfg.out), exist_ok=True)
    path = os.path.join(checkpoint_dir(cfg.out), f"ckpt-{job.round:06d}.pt")
    if rank_state is not None:
        _atomic_save({**rank_state, "rank": c.rank}, rank_path(path, c.rank))
        c.barrier()  # every companion is in place before the main file commits the checkpoint
    if c.rank != 0:
        return None
    _atomic_save({**state, "format": FORMAT, "model_name": cfg.model, "epoch": epoch, "world_size": c.size,
                  "per_rank": rank_state is not None, "config": cfg.to_dict()}, path)
    for old in list_checkpoints(cfg.out)[:-cfg.keep_checkpoints]:
        os.remove(old)
        for companion in glob.glob(old[:-len(".pt")] + ".rank*.pt"):
            os.remove(companion)
    log.record("checkpoint", round=job.round - 1, path=path)
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
        if not isinstance(state, dict) or "rank" not in state:
            raise CheckpointError(f"{path} is not a resist_mpi checkpoint companion")
        return state
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a resist_mpi checkpoint (of this version)")
    return state


def resolve_and_load(cfg, probe, rank: int = 0, world_size: int = 1) -> Optional[Dict[str, Any]]:
    """The checkpoint cfg.resume names ('auto': newest in cfg.out, None when there is none),
    checked against the model about to be trained (probe: the model built on the meta device);
    with the same world size, this rank's companion is in state["rank_state"]."""
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
    expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state["model"].items()}
    if state["model_name"] != cfg.model or expected != got:
        raise CheckpointError(f"checkpoint {path} holds {state['model_name']} (width "
                              f"{state['config'].get('width')}), not the requested {cfg.model} (width {cfg.width})")
    allowed = {cfg.strategy} | ({"local_sgd"} if cfg.warmup_epochs else set())
    if state.get("strategy") not in allowed:
        raise CheckpointError(f"checkpoint {path} was written by --strategy {state.get('strategy')}, not "
                              f"{cfg.strategy}: resume it with that strategy, or start afresh with --overwrite")
    state["path"] = path
    state["rank_state"] = None
    if state.get("per_rank"):
        written = (int(state["world_size"]), str(state["config"].get("group_size", "1")))
        if written == (world_size, str(cfg.group_size)):
            state["rank_state"] = load(rank_path(path, rank), companion=True)
        else:
            state["rank_state_dropped"] = (f"the checkpoint was written by {written[0]} ranks in groups of "
                                           f"{written[1]}, this run has {world_size} in groups of {cfg.group_size}")
    return state


class OutLock:
    """The run's hold on its --out directory (rank 0, for the whole run): a second job started into
    the same directory is refused with one line instead of interleaving its records with this one's.

    An flock on OUT/.lock, which the kernel releases however the process ends (a lock left by a
    dead job is simply free again); the file names the holder (host, pid, start time) for the
    message. On a file system without locks the run goes on unlocked.
    """

    def __init__(self, out: str):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, ".lock")
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            raise CheckpointError(f"--out {out} is in use by another run ({holder}); wait for it to end or "
                                  f"choose another --out") from None
        except OSError:  # no locking here (some network file systems): carry on without it
            pass
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._fh.flush()

    def release(self) -> None:
        if not self._fh.closed:
            self._fh.close()
