"""Evaluating a (full) model across ranks: BN statistics re-estimated for it, accuracy on disjoint shards."""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .averaging.tensors import average_tensors_


def _bns(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


class recalibrate_bn:
    """Re-estimate every BatchNorm's running statistics for model as it is now, from num_batches of
    this rank's batches, averaged over ranks (collective). Use it as a context manager: the model's
    own statistics come back when the block ends, so an evaluation changes nothing in training.

        with rm.recalibrate_bn(full, c, train_batches):
            loss, acc = rm.evaluate(full, c, test_batches)

    Called without `with`, the recalibrated statistics stay (restore() puts the old ones back).

    Why: inside a ResIST sub-network each block's BN saw the activations of a shallower network than
    the full model produces at test time (all blocks, branches scaled), so its running statistics
    describe other inputs. Re-estimating them for the full model is what evaluates well.

    Args:
        only: the BN modules to re-estimate (default: all). The others keep their statistics and
            normalise with them during the calibration passes, as they will at test time, so the
            modules after them see exactly the activations evaluation gives them. ResIST passes the
            BN layers from its first partitioned block on: those before it see the same inputs in
            the full model as in every sub-network, and their averaged running statistics hold.
        enabled: False does nothing (and restores nothing): one code path for every --eval-bn.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, c, batches: Iterable, num_batches: int = 20, device=None,
                 enabled: bool = True, only: Optional[Sequence[nn.Module]] = None):
        self.saved = []
        if not enabled:
            return
        everything = _bns(model)
        chosen = {id(m) for m in only} if only is not None else {id(m) for m in everything}
        bns = [m for m in everything if id(m) in chosen]
        if not bns:  # nothing to re-estimate (no BN, or none chosen): no batch is read (the same on every rank)
            return
        self.saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
                      for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
        was_training = model.training
        model.train()
        kept = [m for m in everything if id(m) not in chosen]
        for m in kept:
            m.eval()  # normalise with their own statistics, as at test time
        try:
            for x, _ in itertools.islice(batches, num_batches):
                model(x.to(device) if device is not None else x)
        except BaseException:
            self._put_back(was_training, model)
            self.restore()  # a failed calibration (a bad batch, a stop) leaves the model's statistics as they were
            raise
        self._put_back(was_training, model)
        # ---- distributed step: average the re-estimated statistics ----
        average_tensors_(c, [t for m in bns for t in (m.running_mean, m.running_var)])

    def _put_back(self, was_training: bool, model: nn.Module) -> None:
        for m, *_, momentum in self.saved:
            m.momentum = momentum
        model.train(was_training)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the statistics the model had before."""
        for m, mean, var, n, _ in self.saved:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
        self.saved = []

    def __enter__(self) -> "recalibrate_bn":
        return self

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False


@torch.no_grad()
def evaluate(model: nn.Module, c, batches: Iterable, device=None, batch_stats: bool = False) -> Tuple[float, float]:
    """(mean loss, accuracy) of model over every rank's batches (each rank: a disjoint shard);
    one reduction of [loss sum, correct, count] (collective). batch_stats: BN normalises with each
    test batch's own statistics (train mode) instead of its running ones; the running statistics
    that train mode updates are put back afterwards."""
    was_training = model.training
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in _bns(model)] if batch_stats else []
    model.train(batch_stats)
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for x, y in (_no_lone_sample(batches) if batch_stats else batches):
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            count += y.numel()
    finally:
        for m, mean, var, n in saved:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
        model.train(was_training)
    loss_sum, correct, count = c.reduce_stats([loss_sum, correct, count], "sum")
    return loss_sum / max(count, 1), correct / max(count, 1)


def _no_lone_sample(batches: Iterable) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The batches, with a last batch of one sample joined to the one before it: BN normalising with
    a batch's own statistics cannot take one sample (torch refuses it where a map is 1x1, as in
    torchvision's ResNets on 32x32 images, and elsewhere it normalises every value to about 0).
    A rank's shard can end so (e.g. 769 test images in batches of 256)."""
    held = None
    for x, y in batches:
        if held is not None and len(y) == 1:
            held = (torch.cat([held[0], x.to(held[0].device)]), torch.cat([held[1], y.to(held[1].device)]))
            continue
        if held is not None:
            yield held
        held = (x, y)
    if held is not None:
        yield held
