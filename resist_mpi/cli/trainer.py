"""The CLI's training loop, on the public strategy API:

    opt = SGD(model.parameters(), ...)          # one optimizer for the run, one LR scheduler
    job = build_strategy(cfg, model, c, ...)    # ResIST, LocalSGD, DataParallel, or a warm-up of two
    for each round:
        job.begin_round()      # ResIST: the round's assignment from rank 0, one block all-to-all
        l local SGD steps      # on this rank's shard; no communication (but data-parallel's
                               # gradient average at the end of each backward)
        job.end_round()        # averages (shared layers / whole model / BN buffers)
        one reduction of the round's numbers (metrics, a stop signal, non-finite values on any rank)
        evaluate at epoch boundaries, checkpoint when due (one job.full_model() for both)
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks.find import find_blocks
from ..comm import Comm, select_device
from ..data.datasets import DataError, check_compatible, load_dataset
from ..data.loader import ShardLoader
from ..errors import NONFINITE_EXIT, NonFiniteError, PeerLost, say_last_line
from ..evaluation import evaluate, recalibrate_bn
from ..models import create_model
from ..plan import partition
from ..plan.groups import resolve_group_size
from ..strategies import DataParallel, LocalSGD, ResIST, Strategy, Warmup
from . import checkpoint as ckpt
from .config import Config, ConfigError
from .metrics import RunLog, mark_done
from .preempt import REQUEUE_EXIT, StopRequest
from .watchdog import LOST_PEER_EXIT, Watchdog

FAILURE_EXIT = 2  # bad input, unreadable data, a full disk: one line, every rank


def lr_factor(cfg: Config, epoch: float) -> float:
    """The learning rate at a (fractional) epoch, as a factor of --lr: step decay /10 at 50% and
    75% of the epochs, or cosine."""
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch / cfg.epochs, 1.0)))
    return 0.1 ** sum(epoch >= f * cfg.epochs for f in (0.5, 0.75))


def lr_at(cfg: Config, epoch: float) -> float:
    return cfg.lr * lr_factor(cfg, epoch)


def batch_stream(loader: ShardLoader, start_step: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches from global step start_step on, across epoch boundaries."""
    epoch, batch = divmod(start_step, loader.steps_per_epoch)
    while True:
        yield from loader.epoch(epoch, start_batch=batch)
        epoch, batch = epoch + 1, 0


def outer_optimizer(cfg: Config):
    """The outer optimizer factory --outer-optimizer asks for (None: the plain average)."""
    if cfg.outer_optimizer == "average":
        return None
    lr, momentum = cfg.outer_lr, cfg.outer_momentum
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)


def overlap_steps(cfg: Config) -> Optional[int]:
    """The strategies' overlap_steps under --overlap: --overlap-steps, by default half of --local-steps
    (docs/benchmarks.md, "The average half a round late": half the delay took back most of the
    accuracy a whole round cost and reached more accuracy targets, ResIST each sooner, at 22.7 and
    5.68 Mbit/s); None: at the round's end."""
    if not cfg.overlap:
        return None
    return (cfg.local_steps // 2 if cfg.overlap_steps is None else cfg.overlap_steps) or None


def build_strategy(cfg: Config, model: nn.Module, c: Comm, steps_per_epoch: int, **kw) -> Strategy:
    """The strategy a Config asks for, on model (kw: device, optimizer, ...): turning the CLI's
    settings into the strategies' keyword arguments is the CLI's job.

    With --warmup-epochs K: local SGD for the rounds of the first K epochs, then cfg.strategy
    taking over the synchronised model.
    """
    common = dict(kw, optimizer_state=None if cfg.optimizer_state == "auto" else cfg.optimizer_state)
    averaged = dict(group_size=cfg.group_size, wire_dtype=cfg.wire_dtype, overlap=cfg.overlap,
                    overlap_steps=overlap_steps(cfg), outer_optimizer=outer_optimizer(cfg))
    if cfg.strategy == "data_parallel":
        return DataParallel(model, c, wire_dtype=cfg.wire_dtype, **common)
    if cfg.strategy == "local_sgd":
        return LocalSGD(model, c, **averaged, **common)
    resist = dict(averaged, stages=cfg.stages(), min_depth=cfg.min_depth, seed=cfg.seed)
    if not cfg.warmup_epochs:
        return ResIST(model, c, **resist, **common)
    return Warmup(LocalSGD(model, c, **averaged, **common),
                  lambda: ResIST(model, c, synchronized=True, **resist, **common), switch_round(cfg, steps_per_epoch))


def switch_round(cfg: Config, steps_per_epoch: int) -> int:
    """The round --warmup-epochs K hands over at: the first round at or after K epochs."""
    return -(-cfg.warmup_epochs * steps_per_epoch // cfg.local_steps)


@torch.no_grad()
def evaluate_full(model: nn.Module, c: Comm, cfg: Config, test_loader: ShardLoader, train_loader: ShardLoader,
                  device, only=None) -> Tuple[float, float, float, float]:
    """(test loss, accuracy, seconds recalibrating, seconds testing) of the full model, each rank
    on its disjoint shard of the test set.

    BN statistics (cfg.eval_bn):
      recalibrate:     re-estimated for the *full* model (evaluation.recalibrate_bn says why) from
                       calibration_batches() training batches per rank, averaged over ranks, in the
                       BN layers `only` names (ResIST: from its first partitioned block on);
      recalibrate_all: the same in every BN layer;
      running:         the running statistics averaged during training, as they are;
      batch:           batch statistics of each test batch (what the reference code did).
    The model's BN buffers are restored afterwards: evaluation has no side effect on training.
    """
    t0 = time.perf_counter()
    recalibrate = cfg.eval_bn in ("recalibrate", "recalibrate_all")
    only = only if cfg.eval_bn == "recalibrate" else None
    with recalibrate_bn(model, c, train_loader.epoch(0), calibration_batches(cfg, train_loader, c.size, only is not None),
                        device, enabled=recalibrate, only=only):
        t1 = time.perf_counter()
        loss, acc = evaluate(model, c, test_loader.epoch(0), device, batch_stats=cfg.eval_bn == "batch")
    return loss, acc, t1 - t0, time.perf_counter() - t1


def copy_of_loader(loader: ShardLoader) -> ShardLoader:
    """A loader of the same batches that reads them in the calling thread (no worker processes)."""
    if loader.workers == 0:
        return loader
    return ShardLoader(loader.dataset, loader.rank, loader.size, loader.batch_size, loader.seed, loader.train, 0)


# Calibration images (all ranks together) when --bn-images is 0: the fewest that kept the final test
# accuracy within 0.3 points of 20 batches per rank, over 3 seeds, on the demo config and at width 16
# (benchmarks/eval_bench.py); re-estimating only the layers from the first partitioned block on needs fewer.
BN_IMAGES = {"partial": 128, "all": 256}


def calibration_batches(cfg: Config, loader: ShardLoader, size: int, partial: bool = False) -> int:
    """Training batches per rank for the BN re-estimate: --bn-batches, else --bn-images (or the
    default for what is re-estimated) over all ranks, never more than one pass of the training set."""
    if cfg.bn_batches:
        return cfg.bn_batches
    images = cfg.bn_images or BN_IMAGES["partial" if partial else "all"]
    return max(1, min(loader.steps_per_epoch, math.ceil(images / (size * loader.batch_size))))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@dataclass
class RoundMeter:
    """One round's numbers on this rank, then (reduce()) over every rank: metrics, the stop flag,
    and which ranks met non-finite values, in the two reductions a round makes anyway."""

    round: int
    step0: int
    steps: int
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    lr: float = 0.0
    sent: int = 0
    recv: int = 0
    cross: int = 0
    t_comm: float = 0.0
    t_hidden: float = 0.0
    t_round: float = 0.0
    bad_loss: bool = False
    bad_grad: bool = False
    bad_update: bool = False
    stop: bool = False  # after reduce(): a stop signal reached some rank
    last: bool = False  # the run's last round
    checksum: Optional[float] = None  # a compressed wire's checksum of what every rank must share
    ckpt_done: int = -1  # the newest round this rank's checkpoint files are all written for
    ckpt_failed: bool = False  # this rank's background checkpoint writer failed
    ckpt_done_everywhere: int = -1  # after reduce(): the newest round written on every rank
    ckpt_failed_rank: Optional[int] = None  # after reduce(): the lowest rank whose writer failed
    bad_ranks: Tuple[int, int, int] = (0, -1, -1)  # after reduce(): (count, lowest, highest)
    consistent: Tuple[float, float] = (0.0, 0.0)  # after reduce(): (max checksum, max of minus it)

    @property
    def bad(self) -> bool:
        return self.bad_loss or self.bad_grad or self.bad_update or not math.isfinite(self.loss_sum)

    def reduce(self, c: Comm) -> None:
        """Sums and maxima over ranks (collective: control traffic)."""
        bad = self.bad
        # ---- distributed step: the round's metrics, the stop flag and the non-finite flags ----
        (self.loss_sum, self.correct, self.seen, self.sent, self.recv, self.cross, n_bad, n_loss, n_grad,
         n_update) = c.reduce_stats([self.loss_sum, self.correct, self.seen, self.sent, self.recv, self.cross,
                                     bad, self.bad_loss or not math.isfinite(self.loss_sum), self.bad_grad,
                                     self.bad_update], "sum")
        chk = [] if self.checksum is None else [self.checksum, -self.checksum]
        t_comm, t_compute, t_hidden, stop, low, high, done_neg, failed, *chk = c.reduce_stats(
            [self.t_comm, self.t_round - self.t_comm, self.t_hidden, float(self.stop),
             (c.size - c.rank) if bad else 0, (c.rank + 1) if bad else 0, -float(self.ckpt_done),
             (c.size - c.rank) if self.ckpt_failed else 0, *chk], "max")
        self.ckpt_done_everywhere = int(-done_neg)
        self.ckpt_failed_rank = int(c.size - failed) if failed else None
        self.consistent = tuple(chk) if chk else (0.0, 0.0)
        self.t_comm, self.t_compute, self.t_hidden, self.stop = t_comm, t_compute, t_hidden, bool(stop)
        self.bad_loss, self.bad_grad, self.bad_update = n_loss > 0, n_grad > 0, n_update > 0
        self.bad_ranks = (int(n_bad), int(c.size - low) if n_bad else -1, int(high - 1) if n_bad else -1)
        self.n_bad_kinds = (int(n_loss), int(n_grad), int(n_update))

    def divergence(self) -> Optional[str]:
        """The one-line account of non-finite values after reduce(), or None."""
        count, low, high = self.bad_ranks
        if not count:
            return None
        kinds = [k for k, n in zip(("loss", "gradient average", "round update"), self.n_bad_kinds) if n]
        where = f"rank {low}" if count == 1 else f"{count} ranks ({low} to {high})"
        return f"round {self.round}: training diverged: non-finite {' and '.join(kinds)} on {where}"


class Trainer:
    """The CLI's training loop, a client of the public API: a strategy from the Config, rounds of
    local SGD steps, evaluation, logging and checkpoints. `run()` returns the final test metrics;
    `exit_code` is then what the process should exit with.

    Args:
        cfg: the validated Config.
        c: the communication backend (from comm.init).
    """

    def __init__(self, cfg: Config, c: Comm, stop_request: Optional[StopRequest] = None):
        """stop_request: the stop signals' catcher, when it was installed before (the command
        installs it first thing, so that a stop during start-up is a stop after the first round,
        not a rank killed by the signal's default action); otherwise the run installs its own."""
        self.cfg, self.c = cfg, c
        self.stop_request = stop_request
        self.pending_eval = None  # --eval-background: the evaluation running while a round trains
        self.delayed_eval = None  # --overlap: an evaluation's copy waiting for its round's average to land
        # --eval-background's default: on where the ranks span nodes (across slow links the gather of
        # the blocks is most of an evaluation, and it then hides behind training), off on one machine,
        # where an evaluation is CPU work that would only share the training's cores (docs/benchmarks.md)
        self.eval_background = len(set(c.nodes)) > 1 if cfg.eval_background is None else cfg.eval_background
        self.stopped = False  # True when a stop signal ended the run early (checkpoint written)
        self.exit_code = 0
        self.lock = None
        self.group_size = 1  # ranks per group, resolved below
        # Everything below up to `agree` is local (no collective), so a rank that fails here
        # cannot leave the others waiting: agree() makes every rank stop together.
        error = None
        if cfg.download and c.rank != 0:
            c.barrier()  # rank 0 downloads alone first; the others then find the files
        try:
            self.device = torch.device(select_device(c.local_rank, cfg.device))
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if c.rank == 0:
                self.lock = ckpt.OutLock(cfg.out, cfg.lock_wait)  # held until the process ends: one run per --out
            ckpt.check_out_dir(cfg)
            self.train_set, self.test_set, self.info = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.seed,
                                                                    image_size=cfg.image_size)
            with torch.device("meta"):
                probe = self.build_net()
            # CIFAR-style models are built for 32x32; ImageNet-style ones take any size >= 32
            cifar = getattr(probe, "arch", {}).get("stem") == "cifar"
            first_conv = next((m for m in probe.modules() if isinstance(m, nn.Conv2d)), None)
            check_compatible(self.info, 32 if cifar else None, self.info.num_classes,
                             None if first_conv is None else first_conv.in_channels)
            spe = ShardLoader(self.train_set, c.rank, c.size, cfg.batch_size).steps_per_epoch
            self.check_warmup_ends(spe)
            self.group_size = resolve_group_size(cfg.group_size, c)
            groups = c.size // self.group_size  # groups that fit the ranks (and nodes)
            if cfg.strategy == "resist":  # enough blocks for the groups
                partition.check_partition(len(find_blocks(probe, "auto", cfg.stages())), groups, cfg.min_depth)
            # rank 0 picks and checks the checkpoint; the others take its choice (below)
            self.resume_state = (ckpt.resolve_and_load(cfg, probe, c.rank, c.size, self.group_size)
                                if c.rank == 0 else None)
            self.check_same_epochs(spe)
        except (ValueError, OSError) as e:  # DataError, PartitionError, CheckpointError are ValueErrors
            error = e
        if cfg.download and c.rank == 0:
            c.barrier()
        try:
            agree(c, error)
            agree(c, self.same_data_everywhere())
        except SystemExit:
            if self.lock is not None:
                self.lock.release()
            raise
        self.resume_state = self.share_resume_state(self.resume_state)
        if cfg.overwrite and c.rank == 0:  # only once every rank is ready to start
            ckpt.clear_out_dir(cfg)
        self.set_aside = None  # rank 0: the line saying which checkpoints of another line were moved aside

    def check_warmup_ends(self, spe: int) -> None:
        """ConfigError when --warmup-epochs hands over at or after the last round (the warm-up's
        rounds start at round boundaries, so K of N epochs can take them all): a "resist" run that
        would train local SGD only, without a word."""
        cfg = self.cfg
        if cfg.strategy != "resist" or not cfg.warmup_epochs:
            return
        rounds = -(-cfg.epochs * spe // cfg.local_steps)
        if switch_round(cfg, spe) >= rounds:
            raise ConfigError(f"--warmup-epochs {cfg.warmup_epochs} of {cfg.epochs} takes all {rounds} rounds of "
                              f"{cfg.local_steps} steps ({spe} steps an epoch here): ResIST would never run; "
                              f"use fewer warm-up epochs or shorter rounds")

    def check_same_epochs(self, spe: int) -> None:
        """CheckpointError when the checkpoint to resume on the same world size was written with
        another number of steps an epoch: the run continues at the checkpoint's round number, which
        with other training data (another --data-dir, a file packed again, a folder that gained
        images) is another epoch, and the schedule and the data order would jump unsaid."""
        state = self.resume_state
        if not state or state.get("path") is None or int(state["world_size"]) != self.c.size:
            return
        written = state["reader"].manifest.get("steps_per_epoch")  # (older checkpoints: not recorded)
        if written is not None and int(written) != spe:
            raise ckpt.CheckpointError(
                f"checkpoint {state['path']} was written with {written} steps an epoch on {self.c.size} ranks, this "
                f"run has {spe} ({self.info.num_train} training images): its training data changed, so its round "
                f"{state['round']} is another point of training here; resume with the checkpoint's data, or start "
                f"afresh with --overwrite")

    def same_data_everywhere(self) -> Optional[DataError]:
        """A DataError on every rank when the ranks loaded different data (one collective): each
        node reading its own copy of --data-dir, one copy short of some files, would give its ranks
        other steps per epoch and rounds, and the ranks would meet in different collectives."""
        info = self.info
        mine = [len(self.train_set), len(self.test_set), info.num_classes, info.image_size, info.channels]
        both = self.c.reduce_stats([float(v) for v in mine] + [-float(v) for v in mine], "max")
        hi, lo = [int(v) for v in both[:5]], [-int(v) for v in both[5:]]
        if hi == lo:
            return None
        what = ", ".join(f"{name} {a}..{b}" for name, a, b in zip(
            ("training images", "test images", "classes", "image size", "channels"), lo, hi) if a != b)
        where = f" (--data-dir {self.cfg.data_dir})" if self.cfg.data_dir else ""
        return DataError(f"the ranks loaded different data ({what}): every node must see the same dataset{where}")

    def set_aside_other_lines(self) -> None:
        """Rank 0, once every rank has loaded the checkpoint (a rank that could not read its files
        stops the run with the checkpoints where they were): the newer checkpoints are another line
        (or, starting afresh, all are unusable), moved aside, never deleted (half-written ones without
        a manifest are), so that neither rotation nor a later --resume auto takes them for this run's."""
        if self.c.rank != 0 or (self.resume_state is None and not self.skipped):
            return
        state = self.resume_state or {"round": -1, "path": None}
        # the folder's number orders out's checkpoints (renumbered after a world-size change, it
        # can differ from its manifest's round); a checkpoint from elsewhere: its manifest's round
        number = ckpt.folder_round(self.cfg.out, state["path"]) if state["path"] else None
        since = int(state["round"]) if number is None else number
        try:
            back = ckpt.take_back_line(self.cfg.out, state["path"]) if state["path"] else None
            if back is not None:  # a line set aside earlier goes on: the records name where it is now
                self.set_aside, state["path"] = back
            else:
                self.set_aside = ckpt.set_aside_after(self.cfg.out, since, state["path"])
        except OSError as e:  # rank 0 alone here: a line, not a hang of the others
            self.set_aside = f"could not move the checkpoints newer than round {since} aside: {e}"

    def share_resume_state(self, state):
        """Every rank gets rank 0's checkpoint choice (one broadcast of a few fields; each rank then
        reads only the files it needs)."""
        with self.c.as_control():
            info = self.c.bcast_object(None if state is None else {k: v for k, v in state.items() if k != "reader"})
        self.skipped = []
        if info is None or info.get("path") is None:
            self.skipped = (info or {}).get("skipped", [])
            return None
        if state is None:
            info["reader"] = ckpt.Reader(info["path"], ckpt.load_manifest(info["path"]))
            return info
        return state

    def build_net(self) -> nn.Module:
        return create_model(self.cfg.model, self.info.num_classes, self.cfg.width)

    def build_strategy(self, steps_per_epoch: int) -> Strategy:
        """The model (rank 0 builds the weights; other ranks only shapes, on the meta device: the
        strategy gives them what they hold), the run's one optimizer, and the strategy around both."""
        cfg = self.cfg
        if self.c.rank == 0:
            model = self.build_net().to(self.device)
        else:
            with torch.device("meta"):
                model = self.build_net()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        return build_strategy(cfg, model, self.c, steps_per_epoch, device=self.device, optimizer=self.optimizer)

    def start_round(self, steps_per_epoch: int) -> int:
        """The round a resumed run continues at. With another world size a round has another
        length in epochs (the batch per rank stays, the global batch changes): the run continues at
        the same epoch, and the learning-rate schedule with it."""
        state = self.resume_state
        if state is None:
            return 0
        if int(state["world_size"]) != self.c.size:
            return round_at_epoch(float(state["epoch"]), steps_per_epoch, self.cfg.local_steps)
        return int(state["round"])

    def resume(self, job, log: RunLog, start: int) -> None:
        """Load the checkpoint into job on every rank, to continue at round start."""
        state = self.resume_state
        if state.get("rank_state_dropped"):
            log.info(f"resume: {state['rank_state_dropped']}: per-rank state (optimizer momentum, error-feedback "
                     f"residuals) starts afresh; an overlapped average in flight is applied")
        state["reader"].shared  # noqa: B018 - read first, by every rank alike (before load_shards' collectives)
        job.load_shards(state["reader"], start, state["same_layout"])

    def run(self) -> Dict[str, float]:
        try:
            return self._run()
        except ckpt.PeerWriteFailed:  # the rank that failed says why
            time.sleep(1.0)
            self.c.abort(FAILURE_EXIT)
        except PeerLost as e:  # a rank is gone: one line; torchrun or a job script restarts the survivors
            say_last_line(f"resist_mpi: error: rank {self.c.rank}: {one_line(e)}; exit {LOST_PEER_EXIT} "
                          f"(continue with --resume auto)")
            self.c.abort(LOST_PEER_EXIT)
        except (DataError, OSError) as e:  # unreadable data mid-epoch, a full disk: one line, every rank
            sys.stderr.write(f"resist_mpi: error: rank {self.c.rank}: {one_line(e)}\n")
            sys.stderr.flush()
            self.c.abort(FAILURE_EXIT)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> Dict[str, float]:
        cfg, c = self.cfg, self.c
        seed_everything(cfg.seed)
        # SIGTERM/SIGUSR1: stop after this round, save, ask for a requeue
        stop_request = self.stop_request or StopRequest()
        self.watchdog = Watchdog(c, cfg.comm_timeout)  # a lost peer ends the job instead of hanging it
        self.train_loader = train_loader = ShardLoader(self.train_set, c.rank, c.size, cfg.batch_size, cfg.seed, True,
                                                       cfg.workers)
        self.test_loader = ShardLoader(self.test_set, c.rank, c.size, max(cfg.batch_size, 256), cfg.seed, False, cfg.workers)
        self.spe = spe = train_loader.steps_per_epoch
        total_steps = cfg.epochs * spe
        num_rounds = math.ceil(total_steps / cfg.local_steps)

        job = self.build_strategy(spe)
        start_round = self.start_round(spe)
        if self.resume_state is not None and start_round >= num_rounds:  # (a requeued job that had finished)
            self.set_aside_other_lines()
            stop_request.close()
            self.watchdog.close()
            if c.rank == 0:
                mark_done(cfg.out, round=num_rounds - 1, epoch=total_steps / spe)  # (one killed before its record)
                print(f"resist_mpi: {self.resume_state['path']} ends the run's {cfg.epochs} epochs: nothing to "
                      f"train (a larger --epochs trains on; --overwrite starts afresh)", flush=True)
            return {}
        before = self.previous_records() if self.resume_state is not None else []
        log = self.open_log(job, num_rounds, start_round, spe)
        for line in self.skipped + (self.resume_state or {}).get("skipped", []):
            log.info(f"resume: {line}")
        if self.resume_state is not None:
            error = None
            try:
                self.resume(job, log, start_round)
            except ckpt.CheckpointError as e:  # a file only this rank reads is damaged: one line, every rank
                error = e
            try:
                agree(c, error)
            except SystemExit:
                stop_request.close()
                self.watchdog.close()
                log.close()
                raise
        self.set_aside_other_lines()
        if self.set_aside:
            log.info(f"resume: {self.set_aside}")
        if self.resume_state is not None:
            self.renumber_checkpoints(log, start_round)
            self.log_membership(log, before, start_round)
        self.log_start(job, log, num_rounds, start_round, spe)
        self.checkpointer = ckpt.Checkpointer(cfg, c, {"model_name": cfg.model, "config": cfg.to_dict(),
                                                        "group_size": str(self.group_size), "steps_per_epoch": spe})
        first = start_round * cfg.local_steps
        # the learning rate of every step, from a torch scheduler (epochs continue across restarts)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: lr_factor(cfg, (first + k) / spe))
        batches = batch_stream(train_loader, first)
        result: Dict[str, float] = {}
        self.last_ckpt_time = time.perf_counter()
        for r in range(start_round, num_rounds):
            step0 = r * cfg.local_steps
            m = RoundMeter(r, step0, min(cfg.local_steps, total_steps - step0))
            self.train_round(job, batches, m, log)
            m.stop = stop_request.requested
            m.ckpt_done, m.ckpt_failed = self.checkpointer.done, self.checkpointer.failed() is not None
            m.reduce(c)
            job.verify_consistent(*m.consistent)  # a compressed wire: every rank the same values
            self.checkpointer.commit(m.ckpt_done_everywhere, log)  # rank 0: manifests of finished rounds
            if m.ckpt_failed_rank is not None:  # a rank's background write failed (a full disk)
                self.stop_failed_write(m.ckpt_failed_rank)  # (the rounds every rank wrote whole: committed)
            epoch = (m.step0 + m.steps) / spe
            log.record("round", round=r, epoch=epoch, step=m.step0 + m.steps, strategy=job.name, world_size=c.size,
                       train_loss=m.loss_sum / m.seen, train_acc=m.correct / m.seen, lr=m.lr, bytes_sent=int(m.sent),
                       bytes_recv=int(m.recv), bytes_cross_node=int(m.cross), t_compute=m.t_compute,
                       t_comm=m.t_comm, t_comm_hidden=m.t_hidden, wallclock=log.wallclock())
            diverged = m.divergence()
            if diverged:
                self.checkpointer.finish(log)  # the finite checkpoints still being written
                self.stop_diverged(log, diverged, r, epoch)
                break
            m.last = last = r == num_rounds - 1
            stop = m.stop and not last
            result = self.after_round(job, log, m) or result
            if last or stop:
                self.checkpointer.finish(log)  # every rank's files, and their manifests, before the exit
            if stop:
                log.record("stop", round=r, epoch=epoch, signal=stop_request.signal_name, exit=REQUEUE_EXIT)
                log.info(f"round {r}: stop signal received; checkpoint written, exiting with {REQUEUE_EXIT} "
                         f"to be requeued (continue with --resume auto)")
                self.stopped, self.exit_code = True, REQUEUE_EXIT
                break
        if self.pending_eval is not None:  # a run that stopped on a non-finite round: its last evaluations
            self.finish_background_eval(log)
        if self.take_landed_eval(log):
            self.finish_background_eval(log)
        if not self.exit_code:  # every round trained (not stopped, not diverged): the run is finished
            log.record("done", round=num_rounds - 1, epoch=total_steps / spe)
        log.close()
        stop_request.close()
        self.watchdog.close()
        return result

    def train_round(self, job: Strategy, batches, m: RoundMeter, log: RunLog) -> None:
        """Round m.round on this rank: begin, the local steps, end; m gets this rank's numbers."""
        c = self.c
        name, sent0, recv0, cross0 = job.name, c.bytes_sent, c.bytes_recv, c.bytes_sent_cross
        comm0, hidden0, t0 = job.comm_time, job.hidden_time, time.perf_counter()
        self.watchdog.beat(f"round {m.round}: the exchange")
        job.begin_round()
        self.launch_eval()
        if job.name != name:  # a warm-up handed over: every rank held the identical model
            log.record("switch", round=m.round, epoch=m.step0 / self.train_steps_per_epoch, to=job.name)
            log.info(f"round {m.round}: warm-up done, switching to {job.name}")
        try:
            self.local_steps(job, batches, m)
        except NonFiniteError:  # a gradient average (every rank of the group sees it): on to the round's end
            m.bad_grad = True
        self.watchdog.beat(f"round {m.round}: the round's averages")
        try:
            job.end_round()
            if m.round == self.num_rounds - 1:
                job.flush()  # the last round's overlapped average lands inside its own round
            m.bad_update = not job.finite()
            m.checksum = job.checksum()
        except NonFiniteError:  # an average: every rank sees the same one
            m.bad_update = True
        m.t_comm, m.t_hidden = job.comm_time - comm0, job.hidden_time - hidden0
        m.t_round = time.perf_counter() - t0
        m.sent, m.recv, m.cross = c.bytes_sent - sent0, c.bytes_recv - recv0, c.bytes_sent_cross - cross0

    def local_steps(self, job: Strategy, batches, m: RoundMeter) -> None:
        """The round's SGD steps on this rank: loss sum, correct, samples and the last lr into m."""
        model, opt = job.model, self.optimizer
        for _ in range(m.steps):
            self.watchdog.beat("local steps")
            x, y = next(batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            m.lr = opt.param_groups[0]["lr"]
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # data-parallel's gradient average runs when backward is done
            opt.step()  # the strategy's step hook lets a background average progress
            self.scheduler.step()
            m.loss_sum += loss.item() * y.numel()
            m.correct += (out.argmax(1) == y).sum().item()
            m.seen += y.numel()

    def stop_diverged(self, log: RunLog, message: str, r: int, epoch: float) -> None:
        """Every rank stops after a non-finite round: one line, a record, exit NONFINITE_EXIT; no
        checkpoint is written from this model, so the newest one on disk is the last finite one."""
        newest = ckpt.list_checkpoints(self.cfg.out)
        kept = (f"the newest checkpoint, {newest[-1]}, is from before it (lower --lr, or resume from it with "
                f"--resume auto)" if newest else "no checkpoint was written (lower --lr)")
        log.record("diverged", round=r, epoch=epoch, message=message, exit=NONFINITE_EXIT)
        if self.c.rank == 0:
            sys.stderr.write(f"resist_mpi: error: {message}; {kept}; exit {NONFINITE_EXIT}\n")
            sys.stderr.flush()
        self.exit_code = NONFINITE_EXIT

    def previous_records(self) -> List[Dict]:
        """The records of the run being continued (rank 0), read before the log is reopened."""
        import os

        from .metrics import read_metrics
        path = os.path.join(self.cfg.out, "metrics.jsonl")
        if self.c.rank != 0 or not os.path.isfile(path):
            return []
        return read_metrics(path, until_damaged=True)

    def start_epoch(self, start_round: int) -> float:
        """The epoch at the start of round start_round of this world."""
        return start_round * self.cfg.local_steps / self.spe

    def renumber_checkpoints(self, log: RunLog, start: int) -> None:
        """After a resume on another world size: the checkpoint folders numbered by this world's
        rounds (ckpt.renumber_resumed), by rank 0 once every rank has read its files."""
        state = self.resume_state
        if int(state["world_size"]) == self.c.size:
            return
        self.c.barrier()
        if self.c.rank != 0:
            return
        number = ckpt.folder_round(self.cfg.out, state["path"])
        try:
            line = ckpt.renumber_resumed(self.cfg.out, state["path"], start, int(state["world_size"]))
            if number is not None and number > start:  # renamed: the records name it where it is
                state["path"] = ckpt.round_dir(self.cfg.out, start)
        except OSError as e:  # rank 0 alone here: a line, not a hang of the others
            line = f"could not renumber the checkpoints for this world's rounds: {e}"
        if line:
            log.info(f"resume: {line}")

    def log_membership(self, log: RunLog, before: List[Dict], start: int) -> None:
        """A `membership` record when the world differs from the checkpoint's (a node lost or added):
        who left and who joined, at which round, how many rounds are trained again, and the seconds
        from the last round trained before the change to now (training resumes right after)."""
        old = list(self.resume_state.get("hosts") or [])
        new = list(self.c.hosts)
        if sorted(old) == sorted(new) and int(self.resume_state["world_size"]) == self.c.size:
            return
        left, joined = _difference(old, new), _difference(new, old)
        rounds = [r for r in before if r.get("event") == "round"]
        # the last round trained, in the record's order: round numbers of two worlds do not compare
        last = rounds[-1] if rounds else None
        # rounds of the world before the change that ran after the checkpoint (their work is trained
        # again): counted in that world's rounds, which another world size numbers differently
        repeated = max(0, last["round"] + 1 - int(self.resume_state["round"])) if last else 0
        seconds = time.time() - last["time"] if last and isinstance(last.get("time"), (int, float)) else None
        log.record("membership", round=start, epoch=self.start_epoch(start), world_size=self.c.size,
                   previous_world_size=self.resume_state["world_size"], left=left, joined=joined,
                   rounds_repeated=repeated, t_recovery=seconds)
        log.info(f"membership: {self.resume_state['world_size']} -> {self.c.size} ranks at round {start} "
                 f"(left: {', '.join(left) or '-'}; joined: {', '.join(joined) or '-'}); {repeated} round(s) "
                 f"trained again" + (f", {seconds:.0f} s since the last round before the change" if seconds else ""))

    def stop_failed_write(self, rank: int) -> None:
        """Every rank ends after a rank's checkpoint files could not be written: that rank says why
        (one line), the job exits with FAILURE_EXIT; checkpoints already complete stay as they are."""
        error = self.checkpointer.failed()
        if self.c.rank == rank:
            sys.stderr.write(f"resist_mpi: error: rank {rank}: {one_line(error)}\n")
            sys.stderr.flush()
        else:
            time.sleep(1.0)  # let that line out first
        self.c.abort(FAILURE_EXIT)

    def open_log(self, job, num_rounds: int, start: int, spe: int) -> RunLog:
        cfg, c = self.cfg, self.c
        self.num_rounds, self.train_steps_per_epoch = num_rounds, spe
        state = self.resume_state
        # the record is cut at the checkpoint's epoch: after a world-size change it holds rounds of
        # two numberings, and a cut by round number would drop the other world's
        epoch = float(state["epoch"]) if state is not None else None
        log = RunLog(cfg.out, c.rank == 0, cfg.progress, num_rounds - start, cfg.tensorboard, resume_round=start,
                     resume_epoch=epoch, resumed_as=(self.start_epoch(start), c.size))
        if log.damaged:
            log.info(f"resume: {log.damaged}")
        log.write_config({"config": cfg.to_dict(), "world_size": c.size, "backend": c.name,
                          "device": str(self.device), "steps_per_epoch": spe, "num_rounds": num_rounds,
                          "dataset": self.info.name, "num_classes": self.info.num_classes,
                          "parameters": sum(t.numel() for t in job.model.state_dict().values())})
        return log

    def log_start(self, job, log: RunLog, num_rounds: int, start_round: int, spe: int) -> None:
        cfg, c = self.cfg, self.c
        if self.resume_state is not None:
            log.record("resume", round=start_round, epoch=self.start_epoch(start_round),
                       path=self.resume_state["path"], world_size=c.size)
            log.info(f"resumed from {self.resume_state['path']} at round {start_round}")
        log.info(f"resist_mpi: {job.name} | {cfg.model} width {cfg.width} | {self.info.name} "
                 f"({self.info.num_train} train / {self.info.num_test} test) | {c.size} ranks, {c.name} backend, "
                 f"{self.device} | {cfg.epochs} epochs = {num_rounds} rounds of {cfg.local_steps} steps")
        if self.delays_evaluations and cfg.eval_every:
            k = overlap_steps(cfg)
            lands = f"after {k} of the next round's {cfg.local_steps} steps" if k else "at the next round's end"
            log.info(f"resist_mpi: --overlap: a round's average lands {lands} (--overlap-steps); each evaluation "
                     f"but the last is of its round's model with that average: its record comes at the end of the "
                     f"round it lands in, and training goes on as without it")
        if self.eval_background and cfg.eval_background is None and cfg.eval_every:
            log.info(f"resist_mpi: ranks on {len(set(c.nodes))} nodes: each evaluation but the last runs in the "
                     f"background while the next round trains (--no-eval-background: wait for it)")

    def after_round(self, job, log, m: RoundMeter):
        """Evaluation and checkpoint when due after round m.round; the evaluation's metrics, or None."""
        cfg, c, spe, last = self.cfg, self.c, self.spe, m.last
        stop = m.stop and not last
        if self.pending_eval is not None:  # the evaluation started after the round before this one
            self.finish_background_eval(log)
        if self.take_landed_eval(log) and (last or stop or not self.eval_background):
            self.finish_background_eval(log)  # (run now, beside nothing)
        done = (m.step0 + m.steps) // spe
        epoch = (m.step0 + m.steps) / spe
        eval_due = last or (cfg.eval_every and done // cfg.eval_every > m.step0 // spe // cfg.eval_every)
        ckpt_due = bool(cfg.checkpoint_every) and done // cfg.checkpoint_every > m.step0 // spe // cfg.checkpoint_every
        ckpt_due = ckpt_due or bool(cfg.checkpoint_rounds and (m.round + 1) % cfg.checkpoint_rounds == 0)
        if cfg.checkpoint_minutes:  # clocks differ across ranks: rank 0 decides for all
            with c.as_control():
                ckpt_due = c.bcast_object(ckpt_due or time.perf_counter() - self.last_ckpt_time >= 60 * cfg.checkpoint_minutes)
        ckpt_due = ckpt_due or stop or (last and bool(cfg.checkpoint_every or cfg.checkpoint_minutes or
                                                       cfg.checkpoint_rounds))
        if not (eval_due or ckpt_due):
            return None
        self.watchdog.beat(f"round {m.round}: evaluation/checkpoint")
        result = None
        if ckpt_due and stop:
            # before the evaluation, which applies an overlapped average in flight: the checkpoint
            # holds the run as it would have gone on (the average restarts from it on resume)
            self.snapshot(job, epoch)
        if eval_due and self.delays_evaluations and not (last or stop):
            # the copy takes the round's average when it lands in the next round: evaluated at that round's end
            self.delayed_eval = self.background_eval(job, m, log, flush=False)
            if self.take_landed_eval(log) and not self.eval_background:  # nothing was in flight
                self.finish_background_eval(log)
        elif eval_due and self.eval_background and not (last or stop):
            self.pending_eval = self.background_eval(job, m, log)
        elif eval_due:
            meter = EvalMeter(c)
            if not (last or stop):
                # ready the next round (Strategy.prepare_round): after the gather every rank keeps
                # its next round's blocks, and the round starts with nothing to move. An exchange
                # it runs now is training work done early: recorded apart, not as the evaluation's.
                job.prepare_round()
                meter.mark_next_exchange()
            with job.full_model() as full:
                meter.mark("gather")
                meter.loss, meter.acc, meter.t["calibrate"], meter.t["test"] = evaluate_full(
                    full, c, cfg, self.test_loader, self.train_loader, self.device, job.bn_to_recalibrate())
                meter.mark(None)
            meter.mark("return")
            result = self.log_eval(job, log, m, meter)
        if ckpt_due and not stop:
            self.snapshot(job, epoch)
        return result

    def snapshot(self, job, epoch: float) -> None:
        """A checkpoint of this round: nothing is gathered, each rank hands its own part to its
        background writer."""
        self.checkpointer.snapshot(job, epoch)
        self.last_ckpt_time = time.perf_counter()

    @property
    def delays_evaluations(self) -> bool:
        """--overlap on several ranks: an evaluation waits for its round's average in a copy
        (Strategy.evaluation_copy(flush=False)) instead of applying it early, which would change
        the training (the next round would start from the averaged values)."""
        return self.cfg.overlap and self.c.size > 1

    def background_eval(self, job, m: RoundMeter, log, flush: bool = True) -> "PendingEval":
        """Round m.round's model evaluated on the background thread (Strategy.evaluation_copy: the
        same full model, to the bit): with --eval-background while the next round trains, its
        record written when it is done, at the end of the next round at the latest. With flush=False
        (--overlap) it runs once the round's average has landed in the copy, from the next round's
        end: beside the round after that, or at once without --eval-background."""
        cfg, copy, out = self.cfg, job.evaluation_copy(flush), {}
        # the same batches read on that thread: DataLoader workers are never forked from it
        train, test = (copy_of_loader(loader) for loader in (self.train_loader, self.test_loader))

        def run():
            t0 = time.perf_counter()
            copy.complete()
            t1 = time.perf_counter()
            out["loss"], out["acc"], t_cal, t_test = evaluate_full(
                copy.model, copy.comm, cfg, test, train, self.device, copy.bn)
            out["t"] = {"gather": t1 - t0, "calibrate": t_cal, "test": t_test}

        # started by launch_eval; a delayed one's clock is set when its average lands
        return PendingEval(run, out, copy, m, job, log.wallclock(), delayed=not copy.ready)

    def take_landed_eval(self, log) -> bool:
        """Make the delayed evaluation whose round's average has landed (in the round just ended) the
        pending one, its clock now: the time its model exists on every rank. Whether there was one."""
        delayed = self.delayed_eval
        if delayed is None or not delayed.copy.ready:
            return False
        self.pending_eval, self.delayed_eval = delayed, None
        delayed.wallclock = log.wallclock()
        return True

    def launch_eval(self) -> None:
        """Start the pending background evaluation, once the round's own block exchange is done: its
        gather then shares the links with the local steps' silence, not with that exchange."""
        pending = self.pending_eval
        if pending is not None and pending.work is None:
            pending.work, pending.beside = self.c.submit(pending.run), True

    def finish_background_eval(self, log) -> None:
        """Wait for the background evaluation (collective: every rank at the same point) and log it."""
        pending, self.pending_eval = self.pending_eval, None
        if pending.work is None:  # not started yet (no round began since): now, beside nothing
            pending.work = self.c.submit(pending.run)
        self.watchdog.beat(f"round {pending.m.round}: the background evaluation")
        t0 = time.perf_counter()
        pending.work.wait()
        meter = EvalMeter(self.c)
        pending.copy.count_into(self.c)  # its bytes, counted on its own communicators, are the meter's
        meter.t.update(pending.out["t"])
        meter.wallclock = pending.wallclock
        meter.t_wait = time.perf_counter() - t0 if pending.beside else None
        meter.delayed = pending.delayed
        meter.loss, meter.acc = pending.out["loss"], pending.out["acc"]
        self.log_eval(pending.job, log, pending.m, meter)

    def log_eval(self, job, log, m: RoundMeter, meter: "EvalMeter") -> Dict[str, float]:
        c, epoch, test_loss, test_acc = self.c, (m.step0 + m.steps) / self.spe, meter.loss, meter.acc
        sent, recv, cross, t, total, early_sent, t_early, early_cross = meter.totals()
        wallclock = log.wallclock() if meter.wallclock is None else meter.wallclock
        extra = {} if meter.t_wait is None else {"background": True, "t_eval_wait": c.reduce_stats([meter.t_wait], "max")[0]}
        if meter.delayed:
            extra["delayed"] = True  # (--overlap) after the next round, when the round's average landed
        log.record("eval", round=m.round, epoch=epoch, strategy=job.name, world_size=c.size, test_loss=test_loss,
                   test_acc=test_acc, bytes_sent=int(sent), bytes_recv=int(recv), bytes_cross_node=int(cross),
                   t_eval=total, **{f"t_{k}": v for k, v in t.items()},
                   t_next_exchange=t_early, bytes_next_exchange=int(early_sent),
                   bytes_cross_next_exchange=int(early_cross), **extra, wallclock=wallclock)
        log.info(f"epoch {epoch:6.2f} | round {m.round:5d} | train loss {m.loss_sum / m.seen:.4f} | "
                 f"test loss {test_loss:.4f} | test acc {100 * test_acc:6.2f}% | {wallclock:7.1f}s")
        return {"test_loss": test_loss, "test_acc": test_acc, "epoch": epoch}


@dataclass
class PendingEval:
    """An evaluation on the background thread (--eval-background, or --overlap's delayed ones):
    what runs it, its results once it has, the copy it evaluates, the round and strategy it
    belongs to, the run's clock when its model existed (taken; a delayed one's: landed)."""
    run: object
    out: Dict
    copy: object
    m: RoundMeter
    job: Strategy
    wallclock: float
    delayed: bool = False  # its copy waits for the round's overlapped average (evaluation_copy(flush=False))
    work: Optional[object] = None  # its Work once started
    beside: bool = False  # started at a round's start (launch_eval): it ran beside that round's training


class EvalMeter:
    """An evaluation's bytes and seconds by phase (gather, calibrate, test, return: the maximum over
    ranks), counted from its creation, before the gather; the next round's exchange when it runs
    first (mark_next_exchange()) is counted apart: training work, done early."""

    def __init__(self, c: Comm):
        self.c = c
        self.start = (c.bytes_sent, c.bytes_recv, c.bytes_sent_cross)
        self.t = {"gather": 0.0, "calibrate": 0.0, "test": 0.0, "return": 0.0}
        self.loss, self.acc = float("nan"), float("nan")  # the evaluation's result, once it has one
        self.wallclock: Optional[float] = None  # a background evaluation: the run's clock when it started
        self.t_wait: Optional[float] = None  # a background evaluation: seconds training waited for it
        self.delayed = False  # (--overlap) evaluated when its round's average landed, a round later
        self.early_sent, self.early_cross, self.t_early = 0, 0, 0.0
        self._last = time.perf_counter()

    def mark_next_exchange(self) -> None:
        """What happened since the creation was the next round's exchange: count it apart."""
        c, now = self.c, time.perf_counter()
        self.early_sent, self.t_early = c.bytes_sent - self.start[0], now - self._last
        self.early_cross = c.bytes_sent_cross - self.start[2]
        self.start = (c.bytes_sent, c.bytes_recv, c.bytes_sent_cross)
        self._last = now

    def mark(self, phase: Optional[str]) -> None:
        """The time since the last mark belongs to phase (None: to no phase of the evaluation)."""
        now = time.perf_counter()
        if phase is not None:
            self.t[phase] += now - self._last
        self._last = now

    def totals(self) -> Tuple[float, float, float, Dict[str, float], float, float, float, float]:
        """(bytes sent, received, sent across nodes) summed over ranks, seconds per phase as the
        slowest rank spent them, the slowest rank's whole evaluation (at most the sum of the phases:
        a rank that finished its gather early waits for the others in the calibration's average),
        then the next round's early exchange: bytes sent (summed), seconds (the slowest rank's) and
        bytes sent across nodes (summed). Two reductions: control traffic."""
        c, (s0, r0, x0) = self.c, self.start
        sent, recv, cross, early_sent, early_cross = c.reduce_stats(
            [c.bytes_sent - s0, c.bytes_recv - r0, c.bytes_sent_cross - x0, self.early_sent, self.early_cross], "sum")
        *times, total, t_early = c.reduce_stats([*self.t.values(), sum(self.t.values()), self.t_early], "max")
        return sent, recv, cross, dict(zip(self.t, times)), total, early_sent, t_early, early_cross


def round_at_epoch(epoch: float, steps_per_epoch: int, local_steps: int) -> int:
    """The round whose start is the last at or before epoch (a checkpoint's, written by another
    world: its step over its steps per epoch, in floating point). A step count that is whole but
    came out just below it (15/11 epochs of 22 steps: 29.999999999999996) counts as whole, so the
    run neither trains a round again nor shifts its learning-rate schedule by one."""
    return int(math.floor(epoch * steps_per_epoch + 1e-6)) // local_steps


def agree(c: Comm, error: Optional[BaseException]) -> None:
    """Stop every rank together when any rank hit an error in local set-up.

    The lowest failing rank's message is printed (once); every rank raises SystemExit(2), only once
    that line is out: the first rank to exit makes the launcher end the job, the printing rank too.
    """
    failing = c.reduce_stats([c.rank if error is not None else c.size], "min")[0]
    if failing < c.size:
        if c.rank == failing:
            sys.stderr.write(f"resist_mpi: error: {one_line(error)}\n")
            sys.stderr.flush()
        c.barrier()
        raise SystemExit(FAILURE_EXIT)


def _difference(a: List[str], b: List[str]) -> List[str]:
    """The hosts of a that b lacks, as a multiset (a host with two ranks that lost one counts once)."""
    rest = list(b)
    out = []
    for h in a:
        if h in rest:
            rest.remove(h)
        else:
            out.append(h)
    return out


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
