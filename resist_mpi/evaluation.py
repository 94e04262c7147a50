"""Evaluating a (full) model across ranks: BN statistics re-estimated for it, accuracy on disjoint shards."""
from __future__ import annotations

import itertools
from typing import Iterable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .averaging import average_tensors_


@torch.no_grad()
def recalibrate_bn(model: nn.Module, c, batches: Iterable, num_batches: int = 20, device=None) -> None:
    """Re-estimate every BatchNorm's running statistics for model as it is now, from num_batches of
    this rank's batches, averaged over ranks (collective).

    Why: inside a ResIST sub-network each block's BN saw the activations of a shallower network than
    the full model produces at test time (all blocks, branches scaled), so its running statistics
    describe other inputs. Re-estimating them for the full model is what evaluates well.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
    was_training = model.training
    model.train()
    for x, _ in itertools.islice(batches, num_batches):
        model(x.to(device) if device is not None else x)
    # ---- distributed step: average the re-estimated statistics ----
    average_tensors_(c, [t for m in bns for t in (m.running_mean, m.running_var)])
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, c, batches: Iterable, device=None, batch_stats: bool = False) -> Tuple[float, float]:
    """(mean loss, accuracy) of model over every rank's batches (each rank: a disjoint shard);
    one reduction of [loss sum, correct, count] (collective). batch_stats: BN normalises with each
    test batch's own statistics (train mode) instead of its running ones."""
    was_training = model.training
    model.train(batch_stats)
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in batches:
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
    loss_sum, correct, count = c.reduce_stats([loss_sum, correct, count], "sum")
    model.train(was_training)
    return loss_sum / max(count, 1), correct / max(count, 1)
