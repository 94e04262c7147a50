"""The CLI's training loop, on the public strategy API:

    job = create_strategy(cfg, model, c, ...)   # ResIST, LocalSGD, DataParallel, or a warm-up of two
    for each round:
        job.begin_round()      # ResIST: the round's assignment from rank 0, one block all-to-all
        l local SGD steps      # on this rank's shard with job.optimizer; no communication (but
                               # data-parallel's gradient average at the end of each backward)
        job.end_round()        # averages (shared layers / whole model / BN buffers)
        evaluate at epoch boundaries, checkpoint when due (one job.full_model() for both)
"""
from __future__ import annotations

import math
import random
import time
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from .comm import Comm, select_device
from .config import Config
from .data import ShardLoader, check_compatible, load_dataset
from .metrics import RunLog
from .models import create_model
from .preempt import REQUEUE_EXIT, StopRequest
from .watchdog import Watchdog
from .evaluation import evaluate, recalibrate_bn
from .groups import resolve_group_size
from .strategies import STRATEGIES, create_strategy


def lr_at(cfg: Config, epoch: float) -> float:
    """Learning rate at a (fractional) epoch: step decay /10 at 50% and 75%, or cosine."""
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(epoch / cfg.epochs, 1.0)))
    return cfg.lr * 0.1 ** sum(epoch >= f * cfg.epochs for f in (0.5, 0.75))


def batch_stream(loader: ShardLoader, start_step: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches from global step start_step on, across epoch boundaries."""
    epoch, batch = divmod(start_step, loader.steps_per_epoch)
    while True:
        yield from loader.epoch(epoch, start_batch=batch)
        epoch, batch = epoch + 1, 0


@torch.no_grad()
def evaluate_full(model: nn.Module, c: Comm, cfg: Config, test_loader: ShardLoader, train_loader: ShardLoader,
                  device) -> Tuple[float, float]:
    """Test loss and accuracy of the full model, each rank on its disjoint shard of the test set.

    BN statistics (cfg.eval_bn):
      recalibrate: running statistics re-estimated for the *full* model from bn_batches training
                   batches per rank, averaged over ranks (evaluation.recalibrate_bn says why).
      running:     the running statistics averaged during training, as they are.
      batch:       batch statistics of each test batch (what the reference code did).
    The model's BN buffers are restored afterwards: evaluation has no side effect on training.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        if cfg.eval_bn == "recalibrate":
            recalibrate_bn(model, c, train_loader.epoch(0), cfg.bn_batches, device)
        return evaluate(model, c, test_loader.epoch(0), device, batch_stats=cfg.eval_bn == "batch")
    finally:
        for m, (mean, var, n) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
        model.train()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Trainer:
    """The CLI's training loop, a client of the public API: a strategy from the Config, rounds of
    local SGD steps, evaluation, logging and checkpoints. `run()` returns the final test metrics.

    Args:
        cfg: the validated Config.
        c: the communication backend (from comm.init).
    """

    def __init__(self, cfg: Config, c: Comm):
        self.cfg, self.c = cfg, c
        self.stopped = False  # True when a stop signal ended the run early (checkpoint written)
        # Everything below up to `agree` is local (no collective), so a rank that fails here
        # cannot leave the others waiting: agree() makes every rank stop together.
        error = None
        if cfg.download and c.rank != 0:
            c.barrier()  # rank 0 downloads alone first; the others then find the files
        try:
            self.device = torch.device(select_device(c.local_rank, cfg.device))
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            ckpt.check_out_dir(cfg)
            self.train_set, self.test_set, self.info = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.seed,
                                                                    image_size=cfg.image_size)
            with torch.device("meta"):
                probe = self.build_net()
            # CIFAR-style models are built for 32x32; ImageNet-style ones take any size >= 32
            cifar = getattr(probe, "arch", {}).get("stem") == "cifar"
            check_compatible(self.info, 32 if cifar else None, self.info.num_classes)
            groups = c.size // resolve_group_size(cfg.group_size, c)  # groups that fit the ranks (and nodes)
            STRATEGIES[cfg.strategy].check(cfg, probe, groups)  # e.g. enough blocks for the groups
            self.resume_state = ckpt.resolve_and_load(cfg, probe, c.rank, c.size)
        except (ValueError, OSError) as e:  # DataError, PartitionError, CheckpointError are ValueErrors
            error = e
        if cfg.download and c.rank == 0:
            c.barrier()
        agree(c, error)
        if cfg.overwrite and c.rank == 0:  # only once every rank is ready to start
            ckpt.clear_out_dir(cfg)

    def build_net(self) -> nn.Module:
        return create_model(self.cfg.model, self.info.num_classes, self.cfg.width)

    def make_optimizer(self, groups: List[Dict]) -> torch.optim.Optimizer:
        """The strategy builds the round's optimizer with this (fresh each round, or once)."""
        cfg = self.cfg
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def build_strategy(self, steps_per_epoch: int):
        """The model (rank 0 builds the weights; other ranks only shapes, on the meta device: the
        strategy gives them what they hold) and the strategy around it."""
        if self.c.rank == 0:
            model = self.build_net().to(self.device)
        else:
            with torch.device("meta"):
                model = self.build_net()
        return create_strategy(self.cfg, model, self.c, steps_per_epoch, device=self.device,
                               optimizer=self.make_optimizer)

    def resume(self, job, steps_per_epoch: int) -> int:
        """Load the checkpoint into job on every rank; the round to continue at. With another
        world size a round has another length in epochs: the run continues at the same epoch."""
        state = self.resume_state
        start = int(state["round"])
        if int(state["world_size"]) != self.c.size:
            start = int(float(state["epoch"]) * steps_per_epoch) // self.cfg.local_steps
        job.load_state_dict({**state, "round": start}, state.get("rank_state"))
        return start

    def run(self) -> Dict[str, float]:
        cfg, c = self.cfg, self.c
        seed_everything(cfg.seed)
        stop_request = StopRequest()  # SIGTERM/SIGUSR1: stop after this round, save, ask for a requeue
        self.watchdog = Watchdog(c, cfg.comm_timeout)  # a lost peer ends the job instead of hanging it
        train_loader = ShardLoader(self.train_set, c.rank, c.size, cfg.batch_size, cfg.seed, True, cfg.workers)
        test_loader = ShardLoader(self.test_set, c.rank, c.size, max(cfg.batch_size, 256), cfg.seed, False, cfg.workers)
        spe = train_loader.steps_per_epoch
        total_steps = cfg.epochs * spe
        num_rounds = math.ceil(total_steps / cfg.local_steps)

        job = self.build_strategy(spe)
        start_round = self.resume(job, spe) if self.resume_state is not None else 0
        log = self.open_log(job, num_rounds, start_round, spe)
        batches = batch_stream(train_loader, start_round * cfg.local_steps)
        result: Dict[str, float] = {}
        self.last_ckpt_time = time.perf_counter()
        for r in range(start_round, num_rounds):
            step0 = r * cfg.local_steps
            steps = min(cfg.local_steps, total_steps - step0)
            name, sent0, recv0, comm0, t0 = job.name, *c.counters(), job.comm_time, time.perf_counter()
            cross0 = c.bytes_sent_cross
            self.watchdog.beat(f"round {r}: the exchange")
            job.begin_round()
            if job.name != name:  # a warm-up handed over: every rank held the identical model
                log.record("switch", round=r, epoch=step0 / spe, to=job.name)
                log.info(f"round {r}: warm-up done, switching to {job.name}")
            loss_sum, correct, seen, lr = self.local_steps(job, batches, step0, steps, spe)
            self.watchdog.beat(f"round {r}: the round's averages")
            job.end_round()
            t_comm, t_round = job.comm_time - comm0, time.perf_counter() - t0
            sent, recv, cross = c.bytes_sent - sent0, c.bytes_recv - recv0, c.bytes_sent_cross - cross0
            # ---- distributed step: the round's metrics (control traffic) ----
            loss_sum, correct, seen, sent, recv, cross = c.reduce_stats([loss_sum, correct, seen, sent, recv, cross],
                                                                        "sum")
            # the stop flag rides along: every rank learns whether any rank got a stop signal
            t_comm, t_compute, stop = c.reduce_stats([t_comm, t_round - t_comm, float(stop_request.requested)], "max")
            epoch = (step0 + steps) / spe
            log.record("round", round=r, epoch=epoch, step=step0 + steps, strategy=job.name, world_size=c.size,
                       train_loss=loss_sum / seen, train_acc=correct / seen, lr=lr, bytes_sent=int(sent),
                       bytes_recv=int(recv), bytes_cross_node=int(cross), t_compute=t_compute, t_comm=t_comm,
                       wallclock=log.wallclock())
            last = r == num_rounds - 1
            stop = bool(stop) and not last
            result = self.after_round(job, log, test_loader, train_loader, r, step0, steps, spe, last, stop,
                                      loss_sum / seen) or result
            if stop:
                log.record("stop", round=r, epoch=epoch, signal=stop_request.signal_name, exit=REQUEUE_EXIT)
                log.info(f"round {r}: stop signal received; checkpoint written, exiting with {REQUEUE_EXIT} "
                         f"to be requeued (continue with --resume auto)")
                self.stopped = True
                break
        log.close()
        stop_request.close()
        self.watchdog.close()
        return result

    def open_log(self, job, num_rounds: int, start_round: int, spe: int) -> RunLog:
        cfg, c = self.cfg, self.c
        log = RunLog(cfg.out, c.rank == 0, cfg.progress, num_rounds - start_round, cfg.tensorboard,
                     resume_round=start_round)
        log.write_config({"config": cfg.to_dict(), "world_size": c.size, "backend": c.name,
                          "device": str(self.device), "steps_per_epoch": spe, "num_rounds": num_rounds,
                          "dataset": self.info.name, "num_classes": self.info.num_classes,
                          "parameters": sum(t.numel() for t in job.model.state_dict().values())})
        if self.resume_state is not None:
            log.record("resume", round=start_round, epoch=start_round * cfg.local_steps / spe,
                       path=self.resume_state["path"], world_size=c.size)
            log.info(f"resumed from {self.resume_state['path']} at round {start_round}")
        log.info(f"resist_mpi: {job.name} | {cfg.model} width {cfg.width} | {self.info.name} "
                 f"({self.info.num_train} train / {self.info.num_test} test) | {c.size} ranks, {c.name} backend, "
                 f"{self.device} | {cfg.epochs} epochs = {num_rounds} rounds of {cfg.local_steps} steps")
        return log

    def after_round(self, job, log, test_loader, train_loader, r, step0, steps, spe, last, stop, train_loss):
        """Evaluation and checkpoint when due after round r; the evaluation's metrics, or None."""
        cfg, c = self.cfg, self.c
        done = (step0 + steps) // spe
        epoch = (step0 + steps) / spe
        eval_due = last or (cfg.eval_every and done // cfg.eval_every > step0 // spe // cfg.eval_every)
        ckpt_due = bool(cfg.checkpoint_every) and done // cfg.checkpoint_every > step0 // spe // cfg.checkpoint_every
        if cfg.checkpoint_minutes:  # clocks differ across ranks: rank 0 decides for all
            with c.as_control():
                ckpt_due = c.bcast_object(ckpt_due or time.perf_counter() - self.last_ckpt_time >= 60 * cfg.checkpoint_minutes)
        ckpt_due = ckpt_due or stop or (last and bool(cfg.checkpoint_every or cfg.checkpoint_minutes))
        if not (eval_due or ckpt_due):
            return None
        self.watchdog.beat(f"round {r}: evaluation/checkpoint")
        result = None
        # One full model for both: ResIST gathers it (counted in the eval record) and afterwards
        # every rank goes back to its own sub-network.
        before = (*c.counters(), c.bytes_sent_cross, time.perf_counter())
        with job.full_model() as full:
            if eval_due:
                result = self.eval_and_log(job, full, test_loader, train_loader, log, r, epoch, train_loss, before)
            if ckpt_due:
                ckpt.save(cfg, c, job, log, epoch)
                self.last_ckpt_time = time.perf_counter()
        return result

    def local_steps(self, job, batches, step0: int, steps: int, spe: int) -> Tuple[float, int, int, float]:
        """The round's SGD steps on this rank; returns (loss sum, correct, samples, last lr)."""
        model, opt = job.model, job.optimizer
        loss_sum, correct, seen, lr = 0.0, 0, 0, self.cfg.lr
        for i in range(steps):
            self.watchdog.beat("local steps")
            x, y = next(batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            lr = lr_at(self.cfg, (step0 + i) / spe)
            for g in opt.param_groups:
                g["lr"] = lr
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # data-parallel's gradient average runs when backward is done
            opt.step()
            loss_sum += loss.item() * y.numel()
            correct += (out.argmax(1) == y).sum().item()
            seen += y.numel()
        return loss_sum, correct, seen, lr

    def eval_and_log(self, job, full, test_loader, train_loader, log, r, epoch, train_loss, before):
        """Evaluate the full model and write the eval record; its bytes and time count from
        `before` = (bytes_sent, bytes_recv, bytes_sent_cross, perf_counter) taken before the gather."""
        c = self.c
        sent0, recv0, cross0, t0 = before
        test_loss, test_acc = evaluate_full(full, c, self.cfg, test_loader, train_loader, self.device)
        sent, recv, cross = c.reduce_stats([c.bytes_sent - sent0, c.bytes_recv - recv0, c.bytes_sent_cross - cross0],
                                           "sum")
        log.record("eval", round=r, epoch=epoch, strategy=job.name, world_size=c.size, test_loss=test_loss,
                   test_acc=test_acc, bytes_sent=int(sent), bytes_recv=int(recv), bytes_cross_node=int(cross),
                   t_eval=time.perf_counter() - t0, wallclock=log.wallclock())
        log.info(f"epoch {epoch:6.2f} | round {r:5d} | train loss {train_loss:.4f} | "
                 f"test loss {test_loss:.4f} | test acc {100 * test_acc:6.2f}% | {log.wallclock():7.1f}s")
        return {"test_loss": test_loss, "test_acc": test_acc, "epoch": epoch}


def agree(c: Comm, error: Optional[BaseException]) -> None:
    """Stop every rank together when any rank hit an error in local set-up.

    The lowest failing rank's message is printed (once); every rank raises SystemExit(2).
    """
    failing = c.reduce_stats([c.rank if error is not None else c.size], "min")[0]
    if failing < c.size:
        if c.rank == failing:
            import sys
            sys.stderr.write(f"resist_mpi: error: {one_line(error)}\n")
            sys.stderr.flush()
        raise SystemExit(2)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
