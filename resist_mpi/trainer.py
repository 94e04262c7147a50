"""The training loop: rounds of local SGD steps around a strategy's synchronisation hooks.

    for each round:
        strategy.begin_round(r)        # ResIST: the round's assignment from rank 0, one block all-to-all
        l local SGD steps              # on this rank's shard; no communication (but data-parallel's)
        strategy.end_round()           # averages (shared layers / whole model / BN buffers)
        evaluate at epoch boundaries, checkpoint when due
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
from .metrics import RunLog, Timer
from .models import create_model
from .partition import check_partition
from .preempt import REQUEUE_EXIT, StopRequest
from .watchdog import Watchdog
from .strategies import LocalSGD, Strategy, allreduce_tensors_, create_strategy


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


def make_optimizer(cfg: Config, groups: List[Dict], previous: Optional[torch.optim.Optimizer],
                   resumed_momentum: Optional[List] = None) -> torch.optim.SGD:
    """SGD over this round's parameters; carries the shared layers' momentum over when asked
    (from the previous round's optimizer, or from a checkpoint's per-rank momentum)."""
    opt = torch.optim.SGD([{"params": g["params"], "name": g["name"]} for g in groups if g["params"]],
                          lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.keep_shared_momentum:
        shared = [p for g in opt.param_groups if g["name"] == "shared" for p in g["params"]]
        if previous is not None:
            for p in shared:
                if p in previous.state:
                    opt.state[p] = previous.state[p]
        elif resumed_momentum is not None and len(resumed_momentum) == len(shared):
            for p, m in zip(shared, resumed_momentum):
                if m is not None:
                    opt.state[p] = {"momentum_buffer": m.to(p.device).clone()}
    return opt


@torch.no_grad()
def evaluate(model: nn.Module, c: Comm, cfg: Config, test_loader: ShardLoader, train_loader: ShardLoader,
             device) -> Tuple[float, float]:
    """Test loss and accuracy of the full model, each rank on its disjoint shard of the test set.

    BN statistics (cfg.eval_bn):
      recalibrate: running statistics re-estimated for the *full* model (all blocks, residuals
                   scaled) from bn_batches training batches per rank, averaged over ranks. The
                   statistics each block collected inside a shallow sub-ResNet describe other
                   activations than the full model produces, so re-estimating is what evaluates well.
      running:     the running statistics averaged during training, as they are.
      batch:       batch statistics of each test batch (what the reference code did).
    The model's BN buffers are restored afterwards: evaluation has no side effect on training.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in bns]
    try:
        if cfg.eval_bn == "recalibrate":
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
            model.train()
            for i, (x, _y) in enumerate(train_loader.epoch(0)):
                if i >= cfg.bn_batches:
                    break
                model(x.to(device, non_blocking=True))
            # ---- distributed step: average the re-estimated statistics ----
            allreduce_tensors_(c, [t for m in bns for t in (m.running_mean, m.running_var)])
        model.train(cfg.eval_bn == "batch")
        loss_sum, correct, count = 0.0, 0, 0
        for x, y in test_loader.epoch(0):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            count += y.numel()
        loss_sum, correct, count = c.reduce_stats([loss_sum, correct, count], "sum")
    finally:
        for m, (mean, var, n, momentum) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
            m.momentum = momentum
        model.train()
    return loss_sum / max(count, 1), correct / max(count, 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Trainer:
    """Holds a run's pieces; `run()` trains and returns the final test metrics.

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
            check_compatible(self.info, None if probe.arch["stem"] == "imagenet" else 32, self.info.num_classes)
            if cfg.strategy == "resist":
                check_partition(probe.num_partitionable, c.size, cfg.min_depth)
            self.resume_state = ckpt.resolve_and_load(cfg, probe, c.rank, c.size)
        except (ValueError, OSError) as e:  # DataError, PartitionError, CheckpointError are ValueErrors
            error = e
        if cfg.download and c.rank == 0:
            c.barrier()
        agree(c, error)
        if cfg.overwrite and c.rank == 0:  # only once every rank is ready to start
            ckpt.clear_out_dir(cfg)

    def build_net(self) -> nn.Module:
        return create_model(self.cfg.model, self.info.num_classes, self.cfg.width,
                            partition_stages=self.cfg.stages())

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
        warmup_steps = cfg.warmup_epochs * spe

        main = create_strategy(cfg.strategy, c, cfg, self.device)
        warm = LocalSGD(c, cfg, self.device) if warmup_steps else None
        model = (warm or main).build_model(self.build_net)
        start_round = 0
        if self.resume_state is not None:
            start_round = ckpt.restore(self.resume_state, model, warm or main, main, warmup_steps, cfg, c.size, spe)
        log = RunLog(cfg.out, c.rank == 0, cfg.progress, num_rounds - start_round, cfg.tensorboard,
                     resume_round=start_round)
        log.write_config({"config": cfg.to_dict(), "world_size": c.size, "backend": c.name,
                          "device": str(self.device), "steps_per_epoch": spe, "num_rounds": num_rounds,
                          "dataset": self.info.name, "num_classes": self.info.num_classes,
                          "parameters": sum(t.numel() for t in model.state_dict().values())})
        if self.resume_state is not None:
            log.record("resume", round=start_round, epoch=start_round * cfg.local_steps / spe,
                       path=self.resume_state["path"], world_size=c.size)
            log.info(f"resumed from {self.resume_state['path']} at round {start_round}")
        log.info(f"resist_mpi: {cfg.strategy} | {cfg.model} width {cfg.width} | {self.info.name} "
                 f"({self.info.num_train} train / {self.info.num_test} test) | {c.size} ranks, {c.name} backend, "
                 f"{self.device} | {cfg.epochs} epochs = {num_rounds} rounds of {cfg.local_steps} steps")

        batches = batch_stream(train_loader, start_round * cfg.local_steps)
        strategy: Strategy = main if (warm is None or start_round * cfg.local_steps >= warmup_steps) else warm
        opt = None
        result: Dict[str, float] = {}
        last_ckpt_time = time.perf_counter()
        for r in range(start_round, num_rounds):
            step0 = r * cfg.local_steps
            steps = min(cfg.local_steps, total_steps - step0)
            if warm is not None and strategy is warm and step0 >= warmup_steps:
                # switch: every rank holds the identical averaged model, ResIST takes it over
                main.adopt(model)
                strategy, opt, warm = main, None, None  # drop local SGD's flat buffer with it
                log.record("switch", round=r, epoch=step0 / spe, to=main.name)
                log.info(f"round {r}: warm-up done, switching to {main.name}")
            comm_t, round_t = Timer(), Timer()
            sent0, recv0 = c.counters()
            with round_t:
                self.watchdog.beat(f"round {r}: the exchange")
                with comm_t:
                    strategy.begin_round(r)
                if opt is None or strategy.fresh_optimizer:
                    opt = self.optimizer_for_round(strategy, opt)
                loss_sum, correct, seen, lr = self.local_steps(model, strategy, opt, batches, step0, steps, spe, comm_t)
                self.watchdog.beat(f"round {r}: the round's averages")
                with comm_t:
                    strategy.end_round()
            sent, recv = c.bytes_sent - sent0, c.bytes_recv - recv0
            # ---- distributed step: the round's metrics (control traffic) ----
            loss_sum, correct, seen, sent, recv = c.reduce_stats([loss_sum, correct, seen, sent, recv], "sum")
            # the stop flag rides along: every rank learns whether any rank got a stop signal
            t_comm, t_compute, stop = c.reduce_stats([comm_t.total, round_t.total - comm_t.total,
                                                      float(stop_request.requested)], "max")
            epoch = (step0 + steps) / spe
            log.record("round", round=r, epoch=epoch, step=step0 + steps, strategy=strategy.name, world_size=c.size,
                       train_loss=loss_sum / seen, train_acc=correct / seen, lr=lr, bytes_sent=int(sent),
                       bytes_recv=int(recv), t_compute=t_compute, t_comm=t_comm, wallclock=log.wallclock())
            done = (step0 + steps) // spe
            last = r == num_rounds - 1
            eval_due = last or (cfg.eval_every and done // cfg.eval_every > step0 // spe // cfg.eval_every)
            ckpt_due = bool(cfg.checkpoint_every) and done // cfg.checkpoint_every > step0 // spe // cfg.checkpoint_every
            if cfg.checkpoint_minutes:  # clocks differ across ranks: rank 0 decides for all
                with c.as_control():
                    ckpt_due = c.bcast_object(ckpt_due or time.perf_counter() - last_ckpt_time >= 60 * cfg.checkpoint_minutes)
            stop = bool(stop) and not last
            ckpt_due = ckpt_due or stop or (last and bool(cfg.checkpoint_every or cfg.checkpoint_minutes))
            if eval_due or ckpt_due:
                self.watchdog.beat(f"round {r}: evaluation/checkpoint")
                # One full model for both: ResIST gathers it (counted in the eval record) and
                # afterwards every rank goes back to its own sub-ResNet.
                before = (*c.counters(), time.perf_counter())
                with strategy.full_model() as full:
                    if eval_due:
                        result = self.eval_and_log(strategy, full, test_loader, train_loader, log, r, epoch,
                                                   loss_sum / seen, before)
                    if ckpt_due:
                        ckpt.save(cfg, c, full, strategy, r + 1, opt, log, epoch)
                        last_ckpt_time = time.perf_counter()
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

    def optimizer_for_round(self, strategy: Strategy, previous: Optional[torch.optim.Optimizer]):
        """A new optimizer over the round's parameters, with whatever state a checkpoint handed over."""
        opt = make_optimizer(self.cfg, strategy.param_groups(), previous, strategy.resume_momentum)
        if strategy.resume_optimizer is not None and not strategy.fresh_optimizer:
            opt.load_state_dict(strategy.resume_optimizer)  # data-parallel resume
        strategy.resume_momentum = strategy.resume_optimizer = None
        return strategy.wrap_optimizer(opt)

    def local_steps(self, model, strategy: Strategy, opt, batches, step0: int, steps: int, spe: int,
                    comm_t: Timer) -> Tuple[float, int, int, float]:
        """The round's SGD steps on this rank; returns (loss sum, correct, samples, last lr)."""
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
            loss.backward()
            with comm_t:
                strategy.after_backward()  # data-parallel's gradient average; nothing for the others
            opt.step()
            loss_sum += loss.item() * y.numel()
            correct += (out.argmax(1) == y).sum().item()
            seen += y.numel()
        return loss_sum, correct, seen, lr

    def eval_and_log(self, strategy, full, test_loader, train_loader, log, r, epoch, train_loss, before):
        """Evaluate the full model and write the eval record; its bytes and time count from
        `before` = (bytes_sent, bytes_recv, perf_counter) taken before the full model was gathered."""
        c = self.c
        sent0, recv0, t0 = before
        test_loss, test_acc = evaluate(full, c, self.cfg, test_loader, train_loader, self.device)
        sent, recv = c.reduce_stats([c.bytes_sent - sent0, c.bytes_recv - recv0], "sum")
        log.record("eval", round=r, epoch=epoch, strategy=strategy.name, world_size=c.size, test_loss=test_loss,
                   test_acc=test_acc, bytes_sent=int(sent), bytes_recv=int(recv),
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
