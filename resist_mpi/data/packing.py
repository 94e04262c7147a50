"""Pack any supported dataset into one HDF5 file, read lazily by every rank::

    python -m resist_mpi.data pack digits digits.h5
    python -m resist_mpi.data pack cifar10 cifar10.h5 --data-dir ~/data
    python -m resist_mpi.data pack /data/imagenet imagenet64.h5 --image-size 64"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from .datasets import DATASETS, DataError, DataInfo, ImageDataset, load_dataset

# ----------------------------------------------------------------------------- pack

def _write_split(f, split: str, ds: ImageDataset, compress: bool, block: int = 256) -> None:
    first = ds.raw_batch(torch.tensor([0]))
    _, c, h, w = first.shape
    chunk = max(1, min(64, len(ds), (1 << 20) // (h * w * c)))   # ~64 small images, <= 1 MiB per chunk
    images = f.create_dataset(f"{split}/images", shape=(len(ds), h, w, c), dtype=np.uint8,
                              chunks=(chunk, h, w, c), compression="gzip" if compress else None)
    for lo in range(0, len(ds), block):
        idx = torch.arange(lo, min(lo + block, len(ds)))
        images[lo: lo + len(idx)] = ds.raw_batch(idx).permute(0, 2, 3, 1).numpy()
    f.create_dataset(f"{split}/labels", data=ds.labels.numpy().astype(np.int64))


def pack(name: str, out: str, data_dir: Optional[str] = None, image_size: Optional[int] = None,
         seed: int = 0, download: bool = False, force: bool = False, compress: bool = False) -> DataInfo:
    """Write dataset ``name`` to one HDF5 file at ``out``, atomically (out.tmp, then rename)."""
    import h5py
    if os.path.exists(out) and not force:
        raise DataError(f"{out} exists; pass --force to overwrite it")
    if name == "imagefolder":
        image_size = image_size or 224
    # (augment=True: the dataset's own augmentation, which the file keeps: digits are never flipped,
    # and a packed file packed again keeps its own; the images written are never augmented)
    train, test, info = load_dataset(name, data_dir, download=download, seed=seed, augment=True,
                                     image_size=image_size)
    aug = train.augment
    pad, flip = (aug.pad, aug.flip) if aug is not None else (info.image_size // 8, True)
    tmp = out + ".tmp"
    try:
        with h5py.File(tmp, "w") as f:
            _write_split(f, "train", train, compress)
            _write_split(f, "test", test, compress)
            f.attrs.update(name=info.name.removeprefix("hdf5:"), num_classes=info.num_classes, image_size=info.image_size,
                           class_names=json.dumps(list(info.class_names)), mean=np.array(info.mean),
                           std=np.array(info.std), aug_pad=pad, aug_flip=flip)
        os.replace(tmp, out)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise DataError(f"cannot write {out}: {e}") from None
        raise
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resist_mpi.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="convert a dataset into one HDF5 file")
    p.add_argument("src", help="a dataset name (digits, synthetic, cifar10, cifar100) or an image folder")
    p.add_argument("out", help="output .h5 path")
    p.add_argument("--dataset", choices=DATASETS, help="dataset kind of SRC (default: inferred)")
    p.add_argument("--data-dir", help="where cifar10/100 files are (default: SRC when it is a folder)")
    p.add_argument("--image-size", type=int, help="imagefolder: resize + centre-crop to this size (default 224)")
    p.add_argument("--seed", type=int, default=0, help="synthetic: data seed")
    p.add_argument("--download", action="store_true", help="cifar: download when absent")
    p.add_argument("--compress", action="store_true", help="gzip the images (smaller, slower to read)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = parser.parse_args(argv)
    try:
        name, data_dir = args.dataset, args.data_dir
        if name is None and args.src in DATASETS:
            name = args.src
        elif name is None and os.path.isdir(args.src):
            name = "imagefolder"
        elif name is None:
            raise DataError(f"{args.src!r} is neither a dataset name ({', '.join(DATASETS)}) nor a directory")
        if data_dir is None and args.src != name:
            data_dir = args.src
        info = pack(name, args.out, data_dir, args.image_size, args.seed, args.download, args.force, args.compress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"packed {info.name}: {info.num_train} train + {info.num_test} test images, "
          f"{info.image_size}x{info.image_size}x{info.channels}, {info.num_classes} classes -> {args.out}")
    return 0
