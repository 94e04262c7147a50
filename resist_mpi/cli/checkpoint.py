"""Sharded checkpoints: every rank writes what it holds, in the background; a manifest makes them exist.

    OUT/checkpoints/ckpt-000123/      the state at the start of round 123 (after round 122)
        shared.pt          rank 0: what every rank holds alike (the shared layers; local SGD and
                           data-parallel: the whole model), the averagers' agreed values and outer
                           step, the assignment and who holds which block; with plain averages
                           only its part of the shared layers' tensors, the rest named by "dealt"
        shared-00002.pt    rank 2: its part of the shared layers' tensors (plain averages: every
                           rank holds them alike, so they are dealt out by bytes, blocks counted)
        blocks-00002.pt    rank 2: the blocks it is the writer of (one holder of identical copies,
                           the lowest; every trainer of a block several ranks trained this round)
        rank-00002.pt      rank 2: its own state (optimizer state under a keep policy, error
                           feedback, the round update whose overlapped average is in flight)
        sums-00002.json    rank 2: the CRC-32 of each file it wrote (taken as it wrote them)
        manifest.json      rank 0, last, atomically: the checkpoint exists iff it is there; it
                           lists every file with its size and CRC-32 (from the ranks' sums)

Nothing is gathered: a rank writes only what it holds, so a checkpoint every round costs a copy of
a rank's own tensors at the round boundary (the rest is a background thread's disk time:
benchmarks/checkpoint_bench.py). Each file is written to a temporary name, fsynced and renamed,
and the directory fsynced. Rank 0 learns that every rank finished its files in the per-round
reduction the trainer makes anyway, and only then writes the manifest; a rank killed mid-write
leaves an incomplete directory that no manifest names. `--resume auto` takes the newest
checkpoint whose manifest lists files that are all present, of their size and checksum, and
readable, and says which newer ones it skipped and why (a file damaged in place, its size the
same, is told by its checksum, which no load of torch's checks).

The format is the package's own, not torch.distributed.checkpoint: DCP plans its writes and reads
with collectives of a torch process group (the mpi and horovod backends have none), and what it
adds is resharding tensors, while ResIST's unit is a whole block whose holders are known without
asking anyone. Loading works with any world size and group size: each rank reads the blocks it
holds in its first round from the files that hold them (copies several ranks trained averaged in
rank order, as the exchange would), and an overlapped average in flight is applied from every old
rank's update. `python -m resist_mpi.checkpoint export CKPT model.pt` writes the full model as one
plain state_dict that torch loads without the package.

Resuming with the same number of ranks and groups continues the run bit for bit on CPU: all
randomness after the checkpoint (data order, augmentation, partitions) is a function of (seed,
epoch, rank, batch, round), not of an RNG state.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import queue
import re
import shutil
import socket
import sys
import threading
import time
import zlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..averaging.tensors import all_finite
from ..errors import NonFiniteError
from ..strategies.shard import Shard, average_copies, dealt_ranks, flushed_values, merge_dealt  # noqa: F401 (part of this module's API)

FORMAT = "resist_mpi-sharded-2"  # 2: the shared entries dealt out over the ranks (shared-RRRRR.pt)
READABLE = (FORMAT, "resist_mpi-sharded-1")
_DIR = re.compile(r"ckpt-(\d{6})$")
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A missing, corrupt or mismatching checkpoint (one-line message)."""


class PeerWriteFailed(OSError):
    """Another rank could not write its checkpoint files (that rank reports why)."""


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def round_dir(out: str, round_index: int) -> str:
    return os.path.join(checkpoint_dir(out), f"ckpt-{round_index:06d}")


def shard_name(kind: str, rank: int) -> str:
    return f"{kind}-{rank:05d}.pt"


# -- files ------------------------------------------------------------------------------------------------
def atomic_save(obj, path: str, crc32: bool = True) -> int:
    """Write obj to path so that path is either absent (or the old file) or the complete new one: a
    temporary file, fsync, rename, fsync of the directory (the rename itself survives a crash). A
    failure (a full disk) removes the temporary file and raises OSError with one line. Returns the
    CRC-32 of the file's bytes (zlib's, of what was written, in order: file_crc32 of the file).

    crc32=False leaves the zip records' checksums out (0): torch.load never checks them, so they buy
    a shard nothing, and computing them is most of torch.save's CPU time (benchmarks/checkpoint_bench.py
    has the per-round cost). Files meant for other tools (export) keep them."""
    tmp = path + ".tmp"
    out = None
    try:
        with open(tmp, "wb") as fh, _crc32(crc32):  # a Python file: a full disk is an OSError with its errno
            out = _WriteErrors(fh)
            torch.save(obj, out)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
        return out.crc
    except Exception as e:  # torch.save reports a short write as a RuntimeError; a bad object as a pickling error
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = out.error if out is not None and out.error is not None else e
        raise OSError(f"cannot write checkpoint {path}: {_first_line(cause)}") from None


class _WriteErrors:
    """A file for torch.save that remembers the first OSError of a write: torch reports a full
    disk in the middle of a record as "unexpected pos", and the user should read "No space left"."""

    def __init__(self, fh):
        self.fh, self.error, self.crc = fh, None, 0

    def write(self, data) -> int:
        try:
            written = self.fh.write(data)
            self.crc = zlib.crc32(data, self.crc)  # (torch writes its stream in order, never seeking back)
            return written
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.fh.flush()


_atomic_save = atomic_save


def file_crc32(path: str, chunk: int = 16 << 20) -> int:
    """The CRC-32 (zlib's) of a file's bytes, read in chunks."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def sums_name(rank: int) -> str:
    return f"sums-{rank:05d}.json"


@contextlib.contextmanager
def _crc32(enabled: bool):
    """torch.save's checksum setting for one save. It is process-wide: only the CLI's checkpoint
    writer thread turns it off, in a process where nothing else saves at the same time."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(enabled)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def atomic_write_text(text: str, path: str) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"cannot write {path}: {_first_line(e)}") from None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_finite(tensors: Dict[str, Any], what: str = "the model") -> None:
    """NonFiniteError unless every floating tensor in the (nested) dict is finite: a checkpoint is
    never written from a diverged model (so rotation never deletes the newest good one)."""
    for k, v in _tensors(tensors):
        if not all_finite(v):
            raise NonFiniteError(f"{what} is not finite ({k}): checkpoint not written")


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


# -- writing: every rank its shards, in the background ------------------------------------------------------
class ShardWriter:
    """This rank's background writer: shards handed over at a round boundary (CPU copies, so
    training goes on) are written in order by one thread.

    Attributes:
        done: the newest round whose files are all on disk (-1: none yet).
        error: the first OSError met (a full disk); nothing after it is written.
    """

    def __init__(self):
        self._queue: "queue.Queue" = queue.Queue()
        self._writes = 0  # snapshots handed over and not yet written (or failed)
        self._room = threading.Condition()
        self.done = -1
        self.error: Optional[BaseException] = None
        self.t_written = 0.0  # seconds the thread spent writing (the cost hidden from training)
        self.t_round: Dict[int, float] = {}  # round -> seconds its files took
        threading.Thread(target=self._run, name="resist-checkpoint", daemon=True).start()

    def submit(self, round_index: int, directory: str, files: Dict[str, Any]) -> None:
        with self._room:
            self._writes += 1
        self._queue.put(lambda: self._write(round_index, directory, files))

    def wait_for_room(self, backlog: int = 1) -> None:
        """Block while more than backlog snapshots wait to be written. A disk slower than the rounds
        would otherwise queue a CPU copy of the state every round (memory without bound), and a
        kill or a failed write would lose every round queued."""
        with self._room:
            self._room.wait_for(lambda: self._writes <= backlog)

    def submit_task(self, task) -> None:
        """Run task() on the writer thread after what was submitted before, its errors ignored
        (removing old checkpoints: file system work that training need not wait for)."""
        self._queue.put(lambda: _quietly(task))

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            finally:
                self._queue.task_done()

    def _write(self, round_index: int, directory: str, files: Dict[str, Any]) -> None:
        try:
            self._write_files(round_index, directory, files)
        finally:
            with self._room:
                self._writes -= 1
                self._room.notify_all()

    def _write_files(self, round_index: int, directory: str, files: Dict[str, Any]) -> None:
        if self.error is not None:
            return
        try:
            t0 = time.perf_counter()
            os.makedirs(directory, exist_ok=True)
            invalidate(directory)  # a folder written over: incomplete until its new manifest lands
            sums = {}
            for name, obj in files.items():
                if name.endswith(".pt"):
                    sums[name] = atomic_save(obj, os.path.join(directory, name), crc32=False)
                else:  # this rank's sums, last
                    atomic_write_text(json.dumps(sums, sort_keys=True), os.path.join(directory, name))
            self.t_round[round_index] = time.perf_counter() - t0
            self.t_written += self.t_round[round_index]
            self.done = round_index
        except OSError as e:
            self.error = e
        except Exception as e:  # anything else must not end the thread (wait() would never return)
            self.error = OSError(f"cannot write checkpoint files in {directory}: {_first_line(e)}")

    def wait(self) -> None:
        """Block until everything submitted is written (or failed)."""
        self._queue.join()


def invalidate(directory: str) -> None:
    """Remove directory's manifest (if any) before any new file goes in, so that a checkpoint folder
    written over in place (a resumed run writing a round again) is incomplete until rank 0 writes
    its new manifest, last, as always: a write that fails half-way leaves no manifest naming a mix
    of old and new files (their sizes are the same, so verify could not tell). Every rank does this
    before its own files; rank 0 writes the new manifest only after every rank's files are done."""
    path = os.path.join(directory, MANIFEST)
    try:
        os.remove(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OSError(f"cannot remove the old {path}: {_first_line(e)}") from None
    fsync_dir(directory)


def _quietly(task) -> None:
    with contextlib.suppress(Exception):
        task()


class Checkpointer:
    """The trainer's sharded checkpoints: snapshot at a round boundary, files in the background,
    the manifest once every rank reported its files done (rank 0), rotation.

    Args:
        cfg: the run's Config (out, keep_checkpoints).
        c: the Comm (rank, size, hosts).
        meta: what the manifest records besides the files (model name, strategy, config, ...).
    """

    def __init__(self, cfg, c, meta: Dict):
        self.cfg, self.c, self.meta = cfg, c, meta
        self.writer = ShardWriter()
        self.t_snapshot = 0.0  # seconds the training thread spent taking snapshots
        self._snap: Dict[int, float] = {}
        self._pending: List[Tuple[int, Dict]] = []  # rank 0: rounds waiting for their manifest
        self.written: List[int] = []  # rank 0: rounds whose manifest exists (this run)

    def snapshot(self, job, epoch: float) -> None:
        """Hand this rank's shard of the state at round job.round to the writer (no communication;
        the copy is synchronous, the disk is not)."""
        t0 = time.perf_counter()
        self.writer.wait_for_room()  # at most one snapshot waits behind the one being written (in t_snapshot)
        shard = job.shard()
        check_finite({"shared": shard.shared or {}, "dealt": shard.dealt, "blocks": shard.blocks},
                     f"rank {self.c.rank}'s model")
        files = {shard_name("rank", self.c.rank): {"rank": self.c.rank, **shard.rank}}
        if shard.blocks:
            files[shard_name("blocks", self.c.rank)] = {"rank": self.c.rank, "blocks": shard.blocks}
        if shard.dealt:
            files[shard_name("shared", self.c.rank)] = {"rank": self.c.rank, "model": shard.dealt}
        if self.c.rank == 0:
            files["shared.pt"] = shard.shared
        files[sums_name(self.c.rank)] = None  # the CRC-32 of the files above, written after them
        if self.c.rank == 0:
            expected = ["shared.pt"] + [shard_name("rank", r) for r in range(self.c.size)]
            expected += [shard_name("shared", r) for r in dealt_ranks(shard.shared)]
            expected += sorted({shard_name("blocks", r) for ws in shard.writers.values() for r in ws})
            manifest = {**self.meta, "format": FORMAT, "round": job.round, "epoch": epoch, "world_size": self.c.size,
                        "strategy": job.name, "hosts": list(self.c.hosts), "files": expected,
                        "blocks": {str(b): ws for b, ws in sorted(shard.writers.items())}}
            self._pending.append((job.round, manifest))
        self.writer.submit(job.round, round_dir(self.cfg.out, job.round), files)
        self._snap[job.round] = time.perf_counter() - t0
        self.t_snapshot += self._snap[job.round]

    @property
    def done(self) -> int:
        return self.writer.done

    def failed(self) -> Optional[BaseException]:
        return self.writer.error

    def commit(self, done_everywhere: int, log=None) -> None:
        """Rank 0: write the manifest of every snapshot whose files all ranks have written (the
        newest round done on every rank, from the round's reduction), then rotate (on the writer
        thread: deleting an old checkpoint's files took rank 0's training thread tens of ms)."""
        if self.c.rank != 0:
            return
        ready = [(r, m) for r, m in self._pending if r <= done_everywhere]
        self._pending = [(r, m) for r, m in self._pending if r > done_everywhere]
        for r, manifest in ready:
            t0 = time.perf_counter()
            directory = round_dir(self.cfg.out, r)
            manifest["bytes"] = {name: os.path.getsize(os.path.join(directory, name)) for name in manifest["files"]}
            sums = gather_sums(directory, manifest["world_size"])
            if sums is not None and all(name in sums for name in manifest["files"]):
                manifest["crc32"] = {name: sums[name] for name in manifest["files"]}
            manifest["time"] = time.time()
            atomic_write_text(json.dumps(manifest, indent=1, sort_keys=True), os.path.join(directory, MANIFEST))
            self.written.append(r)
            if log is not None:  # rank 0's seconds: the snapshot and the manifest (training waits), the write (not)
                log.record("checkpoint", round=r - 1, epoch=manifest["epoch"], path=directory,
                           t_snapshot=self._snap.pop(r, None),
                           t_commit=time.perf_counter() - t0, t_write=self.writer.t_round.pop(r, None))
        if ready:  # deleting old checkpoints' files is file system work (tens of ms for 160 MB): in the background
            last = self.written[-1]
            self.writer.submit_task(lambda: rotate(self.cfg.out, self.cfg.keep_checkpoints, last))

    def finish(self, log=None) -> None:
        """Every rank: wait for this rank's files; then agree and commit (collective). Raises the
        writer's OSError on every rank that had one."""
        self.writer.wait()
        error = self.writer.error
        failed, done_neg = self.c.reduce_stats([1.0 if error else 0.0, -float(self.writer.done)], "max")
        # the rounds every rank wrote whole get their manifest also when a later one failed
        self.commit(int(-done_neg), log)
        self.writer.wait()  # the rotation it started
        if error is not None:
            raise error
        if failed:
            raise PeerWriteFailed("another rank could not write its checkpoint files")


def gather_sums(directory: str, world_size: int) -> Optional[Dict[str, int]]:
    """Every rank's CRC-32 of its files (sums-RRRRR.json), merged; None when one cannot be read
    (the manifest then lists sizes only, as checkpoints of earlier versions did)."""
    sums: Dict[str, int] = {}
    try:
        for r in range(world_size):
            with open(os.path.join(directory, sums_name(r))) as fh:
                sums.update(json.load(fh))
    except (OSError, ValueError):
        return None
    return sums


def rotate(out: str, keep: int, newest: Optional[int] = None) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and incomplete ones older
    than the newest complete one (a run killed mid-write left them).

    newest: the newest round this run wrote a manifest for. Folders newer than it are not this
    run's (the trainer set aside those of an abandoned line when it started) and are neither
    counted nor touched, so they can never make the run's own checkpoints look old."""
    found = sorted((r, d) for r, d in _round_dirs(out) if newest is None or r <= newest)
    complete = [r for r, d in found if os.path.isfile(os.path.join(d, MANIFEST))]
    if not complete:
        return
    kept = set(complete[-keep:])
    newest = complete[-1]
    for r, d in found:
        if r not in kept and r < newest:
            shutil.rmtree(d, ignore_errors=True)


def _round_dirs(out: str) -> List[Tuple[int, str]]:
    base = checkpoint_dir(out)
    if not os.path.isdir(base):
        return []
    return [(int(m.group(1)), os.path.join(base, name)) for name in os.listdir(base)
            if (m := _DIR.fullmatch(name)) and os.path.isdir(os.path.join(base, name))]


# -- reading ----------------------------------------------------------------------------------------------
def verify(directory: str) -> Tuple[Optional[Dict], Optional[str]]:
    """(manifest, None) when the checkpoint in directory is complete and readable, else (None, why)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        return None, "no such directory"
    if not os.path.isfile(path):
        return None, "no manifest (it was still being written)"
    try:
        manifest = json.load(open(path))
    except (OSError, ValueError) as e:
        return None, f"its manifest is unreadable ({_first_line(e)[:80]})"
    if not isinstance(manifest, dict):
        return None, "its manifest is unreadable (not a JSON object)"
    if manifest.get("format") not in READABLE:
        return None, f"it is not a checkpoint of this version ({manifest.get('format')})"
    files, sizes = manifest.get("files"), manifest.get("bytes")
    if not isinstance(files, list) or not isinstance(sizes, dict) or any(name not in sizes for name in files):
        return None, "its manifest is unreadable (no list of files with their sizes)"
    sums = manifest.get("crc32") or {}
    for name in files:
        f = os.path.join(directory, name)
        if not os.path.isfile(f):
            return None, f"{name} is missing"
        size = os.path.getsize(f)
        if size != sizes[name]:
            return None, f"{name} has {size} bytes, not {sizes[name]} (truncated?)"
        if name in sums:  # (older checkpoints list sizes only)
            try:
                crc = file_crc32(f)
            except OSError as e:
                return None, f"{name} is unreadable ({_first_line(e)[:80]})"
            if crc != sums[name]:
                return None, f"{name} is damaged (its CRC-32 is {crc:08x}, the manifest's {sums[name]:08x})"
        try:
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a damaged zip, a bad pickle
            return None, f"{name} is unreadable ({_first_line(e)[:80]})"
    return manifest, None


def load_manifest(directory: str) -> Dict:
    try:
        return json.load(open(os.path.join(directory, MANIFEST)))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {directory}: cannot read its manifest ({_first_line(e)[:80]})")


def list_checkpoints(out: str) -> List[str]:
    """Complete checkpoints (directories with a manifest) in out, oldest first."""
    return [d for _, d in sorted(_round_dirs(out)) if os.path.isfile(os.path.join(d, MANIFEST))]


def newest_verified(out: str) -> Tuple[Optional[str], List[str]]:
    """(the newest checkpoint directory that verifies or None, one line per newer one skipped)."""
    skipped = []
    for r, d in sorted(_round_dirs(out), reverse=True):
        manifest, why = verify(d)
        if manifest is not None:
            return d, skipped
        skipped.append(f"skipped {os.path.basename(d)}: {why}")
    return None, skipped


class Reader:
    """The files of one verified checkpoint, loaded on demand (each at most once)."""

    def __init__(self, directory: str, manifest: Dict):
        self.directory, self.manifest = directory, manifest
        self._cache: Dict[str, Any] = {}

    def load(self, name: str) -> Any:
        if name not in self._cache:
            try:
                self._cache[name] = torch.load(os.path.join(self.directory, name), map_location="cpu",
                                               weights_only=True)
            except Exception as e:
                raise CheckpointError(f"checkpoint {self.directory}: cannot read {name} ({_first_line(e)[:100]})")
        return self._cache[name]

    @property
    def shared(self) -> Dict:
        """shared.pt with the shared entries other ranks wrote (shared-RRRRR.pt) put back in place."""
        if "shared" not in self._cache:
            shared = self.load("shared.pt")
            parts = {r: self.load(shard_name("shared", r))["model"] for r in dealt_ranks(shared)}
            try:
                self._cache["shared"] = merge_dealt(shared, parts)
            except KeyError as e:
                raise CheckpointError(f"checkpoint {self.directory}: shared entry {e} is in none of its files")
        return self._cache["shared"]

    def rank_state(self, rank: int) -> Dict:
        return self.load(shard_name("rank", rank))

    def block_copies(self, b: int) -> List[Tuple[int, Dict[str, torch.Tensor]]]:
        """[(writer rank, the block's state_dict entries)] of block b, by ascending writer."""
        return [(r, self.load(shard_name("blocks", r))["blocks"][b]) for r in self.manifest["blocks"][str(b)]]

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])


def resolve_and_load(cfg, probe, rank: int = 0, world_size: int = 1,
                     group_size: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """The checkpoint cfg.resume names ('auto': the newest that verifies in cfg.out; None when there
    is none), checked against the model about to be trained (probe: built on the meta device).
    group_size: this run's ranks per group, resolved (--group-size node: the ranks of a node).

    Returns {"path", "reader", "round", "epoch", "world_size", "skipped": [lines], "rank_state_dropped"}.
    """
    if not cfg.resume:
        return None
    skipped: List[str] = []
    if cfg.resume == "auto":
        path, skipped = newest_verified(cfg.out)
        if path is None:
            return {"path": None, "skipped": skipped} if skipped else None
    else:
        path = cfg.resume.rstrip("/")
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint {path} not found (a checkpoint is a directory "
                                  f"OUT/checkpoints/ckpt-NNNNNN)")
    manifest, why = verify(path)
    if manifest is None:
        raise CheckpointError(f"checkpoint {path} cannot be used: {why}")
    reader = Reader(path, manifest)
    if manifest["model_name"] != cfg.model or manifest["config"].get("width") != cfg.width:
        raise CheckpointError(f"checkpoint {path} holds {manifest['model_name']} (width "
                              f"{manifest['config'].get('width')}), not the requested {cfg.model} (width {cfg.width})")
    expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in full_state_dict(reader, with_pending=False).items()}
    if expected != got:
        raise CheckpointError(f"checkpoint {path} holds another {cfg.model} (its tensors differ from this one's)")
    allowed = {cfg.strategy} | ({"local_sgd"} if cfg.warmup_epochs else set())
    if manifest["strategy"] not in allowed:
        raise CheckpointError(f"checkpoint {path} was written by --strategy {manifest['strategy']}, not "
                              f"{cfg.strategy}: resume it with that strategy, or start afresh with --overwrite")
    check_resume_settings(path, manifest, cfg, world_size)
    state = {"path": path, "reader": reader, "round": int(manifest["round"]), "epoch": float(manifest["epoch"]),
             "world_size": int(manifest["world_size"]), "skipped": skipped, "hosts": manifest.get("hosts", []),
             "time": manifest.get("time")}
    # the ranks per group as resolved when it was written (--group-size node: a number since the
    # manifest records it; an older one's "node" matches no number here, and its per-rank state goes)
    written = (int(manifest["world_size"]), str(manifest.get("group_size", manifest["config"].get("group_size", "1"))))
    ours = str(group_size if group_size is not None else cfg.group_size)
    state["same_layout"] = written == (world_size, ours)
    if not state["same_layout"]:
        state["rank_state_dropped"] = (f"the checkpoint was written by {written[0]} ranks in groups of "
                                       f"{written[1]}, this run has {world_size} in groups of {ours}")
    return state


def _flag_value(key: str, value) -> str:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def check_resume_settings(path: str, manifest: Dict, cfg, world_size: int) -> None:
    """CheckpointError (one line: the setting, the checkpoint's value, this run's) when this run's
    settings cannot continue the checkpoint's run correctly:

    - --local-steps or --batch-size with the same number of ranks: the run continues at the
      checkpoint's round number, which with another round length (in steps, or steps per epoch)
      is another point of training: steps would be skipped or trained twice. (With another
      number of ranks the start is derived from the checkpoint's epoch, as for any world-size
      change, and another per-rank batch is what keeps the global batch.)
    - --overlap, --outer-optimizer, --wire-dtype: what is in flight at a round boundary (the
      overlapped average, the outer optimizer's state, error-feedback residuals) is another thing,
      and would be dropped or misread; with --outer-optimizer nesterov also --outer-lr and
      --outer-momentum, which the outer optimizer's loaded state would override unsaid. (The inner
      --lr, --momentum and --weight-decay are this run's: a lower --lr after a diverged run is the
      way to go on.)
    - --partition-stages (ResIST): other blocks are partitioned, the checkpoint's block files do
      not match them.
    - --seed and --dataset: the data order and the partitions after the checkpoint are functions
      of the seed, and another dataset is another run, not a continuation.

    Settings a checkpoint's config does not record (older checkpoints) are not checked."""
    config = manifest.get("config") or {}
    keys = ["overlap", "outer_optimizer", "wire_dtype", "seed", "dataset"]
    if cfg.outer_optimizer != "average":
        keys += ["outer_lr", "outer_momentum"]
    if int(manifest.get("world_size", world_size)) == world_size:
        keys = ["local_steps", "batch_size"] + keys
    if cfg.strategy == "resist" and manifest.get("strategy") == "resist":
        keys.append("partition_stages")
    for key in keys:
        if key not in config:
            continue
        old, new = config[key], getattr(cfg, key)
        if key == "partition_stages":  # the stage numbers, as Config.stages() reads them ("2,3" and "2, 3" alike)
            same = dataclasses.replace(cfg, partition_stages=str(old)).stages() == cfg.stages()
        else:
            same = old == new
        if not same:
            raise CheckpointError(f"checkpoint {path} was written with {_flag_value(key, old)}, this run has "
                                  f"{_flag_value(key, new)}: resume it with the checkpoint's setting, or start "
                                  f"afresh with --overwrite")


def full_state_dict(reader: Reader, with_pending: bool = True) -> Dict[str, torch.Tensor]:
    """The full model of a checkpoint as one state_dict: the shared part, every block (copies
    several ranks trained averaged in rank order), and (with_pending) an overlapped average in
    flight applied, as an evaluation would find the model."""
    shared = reader.shared
    state = dict(shared["model"])
    for b in sorted(int(k) for k in reader.manifest["blocks"]):
        state.update(average_copies([copy for _, copy in reader.block_copies(b)]))
    if with_pending and shared.get("averaged_keys"):
        flushed = flushed_values(reader, 0)
        if flushed is not None:
            flat = flushed[0]
            offset = 0
            for key in shared["averaged_keys"]:
                n = state[key].numel()
                state[key] = flat[offset:offset + n].view_as(state[key]).clone()
                offset += n
    return state


# -- the out directory ------------------------------------------------------------------------------------
def check_out_dir(cfg) -> None:
    """Refuse to start a new run over the records of another one (CheckpointError, one line).

    An --out that holds metrics.jsonl or checkpoints is continued only when --resume says so (auto,
    or one of its own checkpoints: a checkpoint of another run would continue that run on top of
    this one's records), and started afresh only with --overwrite; nothing a user had is replaced
    or mixed without being asked.
    """
    if cfg.overwrite or cfg.resume == "auto":
        return
    if not (os.path.isfile(os.path.join(cfg.out, "metrics.jsonl")) or _round_dirs(cfg.out)):
        return
    if not cfg.resume:
        raise CheckpointError(f"--out {cfg.out} holds a run; pass --resume auto to continue it, or --overwrite")
    own = os.path.realpath(checkpoint_dir(cfg.out)) + os.sep
    if not os.path.realpath(cfg.resume).startswith(own):
        raise CheckpointError(f"--out {cfg.out} holds a run, and --resume {cfg.resume} is not one of its checkpoints: "
                              f"resume it into another --out, or pass --overwrite")


def clear_out_dir(cfg) -> None:
    """--overwrite: delete the old run's checkpoints and records, so --resume auto and rotation
    never mistake them for the new run's."""
    for _, d in _round_dirs(cfg.out):
        shutil.rmtree(d, ignore_errors=True)
    base = checkpoint_dir(cfg.out)
    for name in (os.listdir(base) if os.path.isdir(base) else []):
        if name.startswith(ABANDONED):  # lines an earlier resume set aside: --overwrite starts afresh
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    for name in ("metrics.jsonl", "config.json"):
        if os.path.isfile(os.path.join(cfg.out, name)):
            os.remove(os.path.join(cfg.out, name))
    shutil.rmtree(os.path.join(cfg.out, "tb"), ignore_errors=True)  # the old run's TensorBoard events


ABANDONED = "abandoned-"  # OUT/checkpoints/abandoned-*/: checkpoints of a line a resumed run left


def set_aside_after(out: str, round_index: int, keep: Optional[str] = None,
                    reason: Optional[str] = None) -> Optional[str]:
    """Move the checkpoint folders of out newer than round_index that have a manifest (complete or
    not: those failing verification too) into OUT/checkpoints/abandoned-YYYYmmdd-HHMMSS/, where
    neither --resume auto nor rotation looks; folders without one are removed (a killed write's
    half, trained again). round_index -1: all of them (a run starting afresh after --resume auto
    found none usable). keep: a directory never moved (the checkpoint being resumed from).

    A resumed run continues the line of the checkpoint it resumed from; newer folders belong to
    another line (--resume PATH to an older one, or ones --resume auto skipped as unusable) and
    would otherwise stay "the newest": rotation would prune the run's own checkpoints in their
    favour, and a later --resume auto continue that other line. Nothing with a manifest is deleted.
    Returns one line saying what was moved where (why: reason, else "not of this run's line"), or
    None when nothing was."""
    keep_real = os.path.realpath(keep) if keep else None
    newer = sorted((r, d) for r, d in _round_dirs(out) if r > round_index and os.path.realpath(d) != keep_real)
    moved = []
    for r, d in newer:
        if not os.path.isfile(os.path.join(d, MANIFEST)):
            shutil.rmtree(d, ignore_errors=True)
            continue
        if not moved:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = os.path.join(checkpoint_dir(out), ABANDONED + stamp)
            n = 1
            while os.path.exists(aside):
                n += 1
                aside = os.path.join(checkpoint_dir(out), f"{ABANDONED}{stamp}-{n}")
            os.makedirs(aside)
        os.replace(d, os.path.join(aside, os.path.basename(d)))
        moved.append(os.path.basename(d))
    if not moved:
        return None
    fsync_dir(checkpoint_dir(out))
    since = "all" if round_index < 0 else f"newer than round {round_index}, the one resumed from"
    reason = reason or f"not of this run's line ({since}"
    return (f"moved {len(moved)} checkpoint(s) {reason}: {', '.join(moved)}) to {aside}; "
            f"--resume auto and --keep-checkpoints ignore them there")


def take_back_line(out: str, path: str) -> Optional[Tuple[str, str]]:
    """When path is a checkpoint of a line set aside in out (OUT/checkpoints/abandoned-*/ckpt-N,
    resumed with --resume PATH), that line is this run's now: every folder in OUT/checkpoints goes
    aside (the line this resume leaves, older folders too, which would sit among this line's and
    be taken by --resume auto), and path moves back in as OUT/checkpoints/ckpt-N. Returns (a line
    saying so, the new path), or None for any other path. Rank 0, once every rank has read it."""
    real, base = os.path.realpath(path), os.path.realpath(checkpoint_dir(out))
    parent = os.path.dirname(real)
    m = _DIR.fullmatch(os.path.basename(real))
    if not m or os.path.dirname(parent) != base or not os.path.basename(parent).startswith(ABANDONED):
        return None
    moved = set_aside_after(out, -1, reason="of the line this resume leaves (all")
    target = os.path.join(base, os.path.basename(real))
    os.replace(real, target)
    fsync_dir(base)
    line = f"took {os.path.basename(real)} back from {os.path.basename(parent)}: its line goes on here"
    return (f"{line}; {moved}" if moved else line), target


def folder_round(out: str, path: str) -> Optional[int]:
    """The number of checkpoint folder path when it is one of out's (OUT/checkpoints/ckpt-NNNNNN),
    else None. It orders out's checkpoints; after a resume on another world size it can differ
    from the round in the folder's manifest (renumber_resumed)."""
    real = os.path.realpath(path)
    m = _DIR.fullmatch(os.path.basename(real))
    return int(m.group(1)) if m and os.path.dirname(real) == os.path.realpath(checkpoint_dir(out)) else None


def renumber_resumed(out: str, path: str, start: int, old_size: int) -> Optional[str]:
    """After a resume on more ranks than the checkpoint's (fewer rounds to an epoch), number the
    checkpoints by the new world's rounds again: the run continues at round `start`, lower than
    the checkpoint's folder number, and writes ckpt-(start+1) next, so the old world's folders
    numbered above it (older training, numbered higher) would be taken by --resume auto for the
    newest and kept by rotation in favour of the run's own. The checkpoint resumed from (when it is
    one of out's) becomes ckpt-<start> (its manifest unchanged: it still says which round of its
    own world it holds), and the old world's folders from `start` on are moved aside, never deleted.
    Call it on rank 0 once every rank has read the checkpoint. One line saying what changed, or None."""
    real = os.path.realpath(path)
    number = folder_round(out, real)
    reason = f"of the {old_size}-rank world from this world's round {start} on (older training"
    if number is None or number <= start:  # another directory's checkpoint, or fewer ranks: numbers only grow
        return set_aside_after(out, start, keep=real, reason=reason)
    moved = set_aside_after(out, start - 1, keep=real, reason=reason)
    target = round_dir(out, start)
    os.replace(real, target)
    fsync_dir(checkpoint_dir(out))
    line = (f"renamed {os.path.basename(real)} to {os.path.basename(target)}: this world of more ranks numbers "
            f"the same epoch as round {start}")
    return f"{line}; {moved}" if moved else line


class OutLock:
    """The run's hold on its --out directory (rank 0, for the whole run): a second job started into
    the same directory is refused with one line instead of interleaving its records with this one's.

    An flock on OUT/.lock, which the kernel releases however the process ends (a lock left by a
    dead job is simply free again); the file names the holder (host, pid, start time) for the
    message. On a file system without locks the run goes on unlocked, and says so.

    wait (--lock-wait, seconds): how long a lock held elsewhere is waited for before the refusal.
    The job scripts pass it to a relaunch after a lost node: where --out is on NFS, the lost node's
    lock stays with the server until its lease ends (about 90 s with NFSv4), and the relaunch would
    be refused as "in use by another run" by the run it replaces.
    """

    def __init__(self, out: str, wait: float = 0.0):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, ".lock")
        self._fh = open(self.path, "a+")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                self._fh.seek(0)
                holder = self._fh.read().strip() or "another process"
                self._fh.close()
                waited = f" (waited {wait:g} s for it)" if wait > 0 else ""
                raise CheckpointError(f"--out {out} is in use by another run ({holder}){waited}; wait for it to end "
                                      f"or choose another --out") from None
            except OSError as e:  # no locking here (some network file systems): carry on without it
                sys.stderr.write(f"resist_mpi: note: --out {out} cannot be locked ({e.strerror or e}): nothing "
                                 f"stops a second run from writing into it at the same time\n")
                break
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._fh.flush()

    def release(self) -> None:
        if not self._fh.closed:
            self._fh.close()


# -- export -----------------------------------------------------------------------------------------------
def export(directory: str, out_path: str) -> Dict[str, torch.Tensor]:
    """Write the full model of a sharded checkpoint as one plain state_dict (torch.load reads it
    without the package; load_state_dict puts it into a freshly built model)."""
    manifest, why = verify(directory)
    if manifest is None:
        raise CheckpointError(f"checkpoint {directory} cannot be exported: {why}")
    state = full_state_dict(Reader(directory, manifest))
    atomic_save(state, out_path)
    return state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resist_mpi.checkpoint",
                                description="Sharded checkpoints: verify one, or export it as one plain state_dict.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write the full model as a plain state_dict file")
    e.add_argument("checkpoint", help="a checkpoint directory (OUT/checkpoints/ckpt-NNNNNN) or a run's --out")
    e.add_argument("output", help="the .pt file to write")
    v = sub.add_parser("verify", help="check that a checkpoint is complete and readable")
    v.add_argument("checkpoint")
    args = p.parse_args(argv)
    path = args.checkpoint
    if os.path.isdir(checkpoint_dir(path)):  # a run directory: its newest checkpoint that verifies
        found, skipped = newest_verified(path)
        for line in skipped:
            print(line, file=sys.stderr)
        if found is None:
            print(f"error: no complete checkpoint in {path}", file=sys.stderr)
            return 2
        path = found
    try:
        if args.cmd == "export":
            state = export(path, args.output)
            print(f"exported {path}: {len(state)} tensors, {sum(t.numel() for t in state.values())} elements "
                  f"-> {args.output}")
        else:
            manifest, why = verify(path)
            if manifest is None:
                print(f"{path}: incomplete: {why}")
                return 1
            print(f"{path}: complete (round {manifest['round']}, {manifest['world_size']} ranks, "
                  f"{len(manifest['files'])} files)")
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
