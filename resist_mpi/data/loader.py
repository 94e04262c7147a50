"""Per-rank shard loaders: each rank's share of an epoch, batch by batch.

Randomness contract (bit-for-bit resume): the epoch permutation is a function of (seed, epoch);
every random choice of batch b of epoch e on rank r, augmentation included, is a function of
(seed, e, r, b). Both come from explicit torch.Generator objects, never from the global RNG and
never from a DataLoader worker id, so ``epoch(e, start_batch=k)`` equals skipping k batches."""
from __future__ import annotations

import math
from typing import Iterator, List, Tuple

import torch

from .datasets import _AUG, _PERM, DataError, ImageDataset, _generator

# ----------------------------------------------------------------------------- shards

class _BatchView(torch.utils.data.Dataset):
    """Maps a key (epoch, batch, indices) to a finished batch; runs in the main process or a worker."""

    def __init__(self, dataset: ImageDataset, seed: int, rank: int, train: bool):
        self.dataset, self.seed, self.rank, self.train = dataset, seed, rank, train

    def __getitem__(self, key):
        e, b, idx = key
        gen = _generator(self.seed, e, self.rank, b, _AUG) if self.train else None
        try:
            return self.dataset.get_batch(idx, gen)
        except DataError as e:
            if torch.utils.data.get_worker_info() is None:
                raise
            return _Failed(str(e))  # (raised by the main process: a worker's exception comes with its traceback)


class _Failed:
    """A worker's DataError, carried back as a value so that the main process says its one line."""

    def __init__(self, message: str):
        self.message = message


def _raising(batches):
    for batch in batches:
        if isinstance(batch, _Failed):
            raise DataError(batch.message)
        yield batch


class ShardLoader:
    """This rank's mini-batches, epoch by epoch.

    train=True: the epoch-e permutation of all N samples (seeded by (seed, e)), padded by
    wrap-around to size * ceil(N / size), rank r takes every size-th element from r (as
    torch's DistributedSampler). Every rank has ceil(N / size) samples and steps_per_epoch
    batches; every sample appears once per epoch across ranks, and the padding repeats up to
    size - 1 of them. A last batch of a single sample is dropped, up to size samples an epoch
    (BatchNorm cannot normalise one sample in training; torchvision's models fail on it): the
    drop_last rule applied only where it matters, the same on every rank.

    train=False: no shuffle, no padding, no augmentation: rank r gets r, r + size, ... so the
    shards cover the set exactly once and accuracy summed over ranks is exact. A rank may then
    hold one sample fewer, and so one batch fewer than steps_per_epoch (len(loader) is exact).
    """

    def __init__(self, dataset: ImageDataset, rank: int, size: int, batch_size: int, seed: int = 0,
                 train: bool = True, workers: int = 0):
        if size < 1 or not 0 <= rank < size:
            raise DataError(f"rank {rank} is outside a world of size {size}")
        if batch_size < 1 or workers < 0:
            raise DataError(f"batch_size must be >= 1 and workers >= 0 (got {batch_size}, {workers})")
        n = len(dataset)
        if n == 0:
            raise DataError("cannot shard an empty dataset")
        self.dataset, self.rank, self.size, self.batch_size = dataset, rank, size, batch_size
        self.seed, self.train, self.workers = seed, train, workers
        per_rank = math.ceil(n / size)
        if train and per_rank == 1 and batch_size > 1:
            raise DataError(f"the training set's {n} images give each of the {size} ranks one: every step would be a "
                            f"batch of one (BatchNorm cannot normalise one sample); use fewer ranks or more data")
        if train and per_rank % batch_size == 1 and per_rank > 1:
            per_rank -= 1  # the lone last sample would be a batch of one
        self.num_samples = per_rank if train else len(range(rank, n, size))
        self.steps_per_epoch = math.ceil(per_rank / batch_size)
        self._view = _BatchView(dataset, seed, rank, train)

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self, e: int) -> torch.Tensor:
        """This rank's sample indices for epoch e, in order."""
        n = len(self.dataset)
        if not self.train:
            return torch.arange(n)[self.rank:: self.size]
        perm = torch.randperm(n, generator=_generator(self.seed, e, _PERM))
        total = math.ceil(n / self.size) * self.size
        if total > n:
            perm = torch.cat([perm, perm.repeat(math.ceil((total - n) / n))[: total - n]])
        return perm[self.rank: total: self.size][:self.num_samples]

    def batch_indices(self, e: int) -> List[torch.Tensor]:
        idx = self.indices(e)
        return list(idx.split(self.batch_size)) if len(idx) else []

    def epoch(self, e: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images float32 [B,C,H,W], labels int64 [B]) from batch start_batch of epoch e."""
        batches = self.batch_indices(e)
        if not 0 <= start_batch <= max(len(batches), self.steps_per_epoch):
            raise DataError(f"start_batch {start_batch} is outside epoch of {len(batches)} batches")
        keys = [(e, b, batches[b]) for b in range(start_batch, len(batches))]
        if self.workers == 0:
            return (self._view[k] for k in keys)
        # Every iteration has its own DataLoader and workers, so iterations interleave freely:
        # evaluation reads epoch 0 for BN recalibration while training is inside another epoch.
        # (One persistent loader, re-aimed at each call's keys, handed training the wrong batches
        # after every evaluation.) Workers start once per epoch: a fork, small next to an epoch.
        loader = torch.utils.data.DataLoader(self._view, batch_size=None, sampler=keys, num_workers=self.workers)
        return _raising(loader)
