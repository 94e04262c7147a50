"""Datasets: ``digits`` (default: sklearn's embedded 8x8 digits, upscaled to 32x32, no download),
``synthetic`` (learnable, seeded, for tests), ``cifar10`` / ``cifar100``, ``imagefolder`` and
``hdf5`` (one file made by ``python -m resist_mpi.data pack``).

Every dataset answers ``get_batch(indices, generator)``: one vectorised call per mini-batch, so
4 ranks sharing 2 cores spend their time in the model, not in Python loops over samples."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagefolder", "hdf5")

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Stream tags: keep the permutation, augmentation and synthetic-data streams independent.
_PERM, _AUG, _SYNTH = 0x5045524D, 0x41554700, 0x53594E54


class DataError(ValueError):
    """A data problem the user can fix; the message is always one line."""

    def __init__(self, msg: object):
        super().__init__(" ".join(str(msg).split("\n")).strip())


@dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int
    image_size: int
    channels: int
    num_train: int
    num_test: int
    class_names: tuple
    mean: tuple
    std: tuple


def _generator(*parts: int) -> torch.Generator:
    """A fresh generator whose seed depends only on the integers given (hashed, order-sensitive)."""
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) >> 1)


# ----------------------------------------------------------------------------- augmentation

@dataclass(frozen=True)
class Augment:
    """Batched CIFAR-style augmentation on float images in [0, 1]: zero-pad + random crop, flip."""
    pad: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.pad > 0:
            # Pad once, then gather every sample's crop with its own offsets (no per-sample loop).
            xp = F.pad(x, (self.pad,) * 4)
            oy = torch.randint(0, 2 * self.pad + 1, (b,), generator=gen)
            ox = torch.randint(0, 2 * self.pad + 1, (b,), generator=gen)
            rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
            x = xp[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
        if self.flip:
            flip = torch.rand(b, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x


# ----------------------------------------------------------------------------- datasets

class ImageDataset(torch.utils.data.Dataset):
    """Base class: labels in memory, images produced a whole batch at a time.

    Subclasses implement ``raw_batch(indices) -> uint8 [B, C, H, W]`` (used by pack) and may
    override ``_float_batch`` when they hold floats.
    """

    def __init__(self, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 augment: Optional[Augment]):
        self.labels = labels.to(torch.int64)
        self.augment = augment
        self._mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([i]))
        return x[0], y[0]

    def raw_batch(self, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _float_batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.raw_batch(idx).float().div_(255)

    def get_batch(self, indices, generator: Optional[torch.Generator] = None):
        """(normalised float32 [B,C,H,W], int64 [B]); augmented iff a generator is given."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self._float_batch(idx)
        if generator is not None and self.augment is not None:
            x = self.augment(x, generator)
        return (x - self._mean) / self._std, self.labels[idx]


class TensorImageDataset(ImageDataset):
    """Images held in memory as uint8 or float32-in-[0,1] tensors [N, C, H, W]."""

    def __init__(self, images: torch.Tensor, labels, mean, std, augment=None):
        super().__init__(torch.as_tensor(labels), mean, std, augment)
        if images.ndim != 4 or len(images) != len(self.labels):
            raise DataError(f"images {tuple(images.shape)} do not match {len(self.labels)} labels")
        self.images = images

    def _float_batch(self, idx):
        x = self.images[idx]
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()

    def raw_batch(self, idx):
        x = self.images[torch.as_tensor(idx)]
        return x if x.dtype == torch.uint8 else (x * 255).round_().clamp_(0, 255).to(torch.uint8)


def _open_h5(path: str):
    import h5py
    try:
        # locking=False: many ranks read one file, and parallel file systems often lack flock.
        return h5py.File(path, "r", locking=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot open HDF5 file {path}: {e}") from None


class HDF5Dataset(ImageDataset):
    """One split of a packed file; labels in memory, images read per batch by the reading process."""

    def __init__(self, path: str, split: str, labels, mean, std, augment=None):
        super().__init__(torch.as_tensor(labels), mean, std, augment)
        self.path, self.split = path, split
        self._file, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}

    def _images(self):
        if self._file is None or self._pid != os.getpid():   # lazily, and again after a fork
            self._file, self._pid = _open_h5(self.path), os.getpid()
        return self._file[self.split + "/images"]

    def raw_batch(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.int64)
        # Sort and deduplicate, read, restore the order. h5py's point-list indexing costs ~0.7 ms per
        # index; slices are ~30x cheaper, so read a dense batch as one slice and a sparse one as
        # one slice per run of consecutive indices.
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        u = uniq.numpy()
        try:
            ds = self._images()
            lo, hi = int(u[0]), int(u[-1]) + 1
            if hi - lo <= 4 * len(u):
                arr = ds[lo:hi][u - lo]
            else:
                runs = np.split(u, np.flatnonzero(np.diff(u) != 1) + 1)
                arr = np.concatenate([ds[int(r[0]): int(r[-1]) + 1] for r in runs])
        except (OSError, KeyError, IndexError) as e:
            raise DataError(f"cannot read images from {self.path}: {e}") from None
        return torch.from_numpy(arr)[inverse].permute(0, 3, 1, 2)


class ImageFolderDataset(ImageDataset):
    """torchvision ImageFolder, decoded per sample; per-sample randomness seeded from the batch."""

    def __init__(self, root: str, image_size: int, train: bool, augment: bool):
        from torchvision import datasets
        from torchvision import transforms as T
        try:
            self.folder = datasets.ImageFolder(root)
        except (OSError, RuntimeError) as e:
            raise DataError(f"cannot read image folder {root}: {e}") from None
        super().__init__(torch.tensor(self.folder.targets), IMAGENET_MEAN, IMAGENET_STD, None)
        self.image_size, self.randomised = image_size, train and augment
        if self.randomised:
            self.transform = None  # _augmented: drawn from a generator of the sample's own
        else:
            self.transform = T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size),
                                        T.ToTensor()])
        self._pack_transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])

    def _load(self, i: int):
        path = self.folder.samples[i][0]
        try:
            return self.folder.loader(path)
        except Exception as e:  # PIL raises many types for a broken file
            raise DataError(f"cannot read image {path}: {e}") from None

    def raw_batch(self, idx):
        return torch.stack([self._pack_transform(self._load(i)) for i in torch.as_tensor(idx).tolist()])

    def get_batch(self, indices, generator=None):
        idx = torch.as_tensor(indices, dtype=torch.int64)
        xs = []
        if self.randomised:
            # per sample, a generator of its own seeded from the batch's: never the global RNG,
            # which torchvision's random transforms draw from and which a background evaluation's
            # batches (another thread) would draw from at the same time
            seeds = torch.randint(0, 2**62, (len(idx),), generator=generator).tolist()
            xs = [self._augmented(self._load(i), torch.Generator().manual_seed(s)) for i, s in zip(idx.tolist(), seeds)]
        else:
            xs = [self.transform(self._load(i)) for i in idx.tolist()]
        return (torch.stack(xs) - self._mean) / self._std, self.labels[idx]

    def _augmented(self, image, g: torch.Generator) -> torch.Tensor:
        """A random crop of 8-100% of the image's area, aspect ratio 3/4 to 4/3 (log-uniform), resized
        to image_size, flipped with probability 1/2 (the usual ImageNet augmentation), from g alone;
        after 10 draws that do not fit, the centre crop of the largest such box."""
        from torchvision.transforms import functional as TF
        width, height = image.size
        area, box = width * height, None
        for _ in range(10):
            target = area * (0.08 + 0.92 * torch.rand((), generator=g).item())
            aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand((), generator=g).item())
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=g))
                left = int(torch.randint(0, width - w + 1, (), generator=g))
                box = (top, left, h, w)
                break
        if box is None:
            ratio = width / height  # the box's aspect ratio brought into [3/4, 4/3]
            w, h = (round(height * 4 / 3), height) if ratio > 4 / 3 else \
                ((width, round(width * 4 / 3)) if ratio < 3 / 4 else (width, height))
            box = ((height - h) // 2, (width - w) // 2, h, w)
        image = TF.resized_crop(image, *box, [self.image_size, self.image_size], antialias=True)
        if torch.rand((), generator=g).item() < 0.5:
            image = TF.hflip(image)
        return TF.to_tensor(image)


# ----------------------------------------------------------------------------- loaders per dataset

def _stats(images: torch.Tensor) -> Tuple[tuple, tuple]:
    """Per-channel mean/std of float images in [0, 1] [N, C, H, W]."""
    x = images.transpose(0, 1).reshape(images.shape[1], -1).double()
    std = x.std(1)
    return tuple(x.mean(1).tolist()), tuple(torch.where(std > 0, std, 1.0).tolist())  # constant channel: no scaling


def _info(name, train: ImageDataset, test: ImageDataset, image_size, channels, class_names, mean, std):
    return DataInfo(name=name, num_classes=len(class_names), image_size=int(image_size), channels=int(channels),
                    num_train=len(train), num_test=len(test), class_names=tuple(class_names),
                    mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits ([N, 8, 8] float in 0..16, [N] int) read from the file it ships,
    without importing scikit-learn (about 0.7 s of every rank's start-up); its loader where the file
    is not where scikit-learn 1.x keeps it."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec and spec.origin \
        else ""
    if not os.path.isfile(path):
        from sklearn.datasets import load_digits
        d = load_digits()
        return d.images, d.target
    import gzip
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _digits_split() -> Tuple[np.ndarray, np.ndarray]:
    """The fixed split (train, test indices, in order) written in digits_split.txt."""
    with open(os.path.join(os.path.dirname(__file__), "digits_split.txt")) as f:
        rows = [line for line in f if not line.startswith("#")]
    return tuple(np.array(row.split(), dtype=np.int64) for row in rows)


def _digits(augment: bool):
    images, target = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp_(0, 1).repeat(1, 3, 1, 1)
    y = torch.tensor(target, dtype=torch.int64)
    tr, te = (torch.from_numpy(i) for i in _digits_split())
    mean, std = _stats(x[tr])
    aug = Augment(pad=2, flip=False) if augment else None   # digits are not mirror-symmetric
    train = TensorImageDataset(x[tr].contiguous(), y[tr], mean, std, aug)
    test = TensorImageDataset(x[te].contiguous(), y[te], mean, std)
    return train, test, _info("digits", train, test, 32, 3, [str(i) for i in range(10)], mean, std)


def _synthetic(seed: int, augment: bool, num_train: int = 1024, num_test: int = 256):
    g = _generator(seed, _SYNTH)
    templates = F.interpolate(torch.rand(10, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    n = num_train + num_test
    y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    x = (0.2 + 0.6 * templates[y] + 0.15 * torch.randn(n, 3, 32, 32, generator=g)).clamp_(0, 1)
    mean, std = _stats(x[:num_train])
    aug = Augment(pad=2, flip=False) if augment else None
    train = TensorImageDataset(x[:num_train].contiguous(), y[:num_train], mean, std, aug)
    test = TensorImageDataset(x[num_train:].contiguous(), y[num_train:], mean, std)
    return train, test, _info("synthetic", train, test, 32, 3, [f"class{i}" for i in range(10)], mean, std)


def _cifar_files_present(base, root: str) -> bool:
    files = [f for f, _ in base.train_list + base.test_list] + [base.meta["filename"]]
    return all(os.path.isfile(os.path.join(root, base.base_folder, f)) for f in files)


def _local_cifar(base):
    """A CIFAR class that trusts files already on disk instead of re-hashing them.

    torchvision checks the md5 of every file at every construction: that re-reads ~180 MB on every
    rank at every start, and it rejects any other file with the right layout (e.g. test fixtures).
    Without --download we only check the files exist; a damaged file still fails loudly when it is
    unpickled or reshaped, and that error becomes a DataError. With --download the stock class
    (full md5 verification) is used.
    """
    class LocalCIFAR(base):
        def _check_integrity(self):
            return _cifar_files_present(base, self.root)

        def _load_meta(self):
            import pickle
            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
    return LocalCIFAR


def _cifar(name: str, data_dir: Optional[str], download: bool, augment: bool):
    from torchvision import datasets
    base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    if not data_dir:
        raise DataError(f"{name} needs --data-dir: the folder that holds (or will receive) {base.base_folder}/")
    folder = os.path.join(data_dir, base.base_folder)
    cls = base if download else _local_cifar(base)
    if not download and not _cifar_files_present(base, data_dir):
        raise DataError(f"{name} files not found in {folder}; pass --download to fetch them, or extract "
                        f"{base.filename} into {data_dir}")
    try:
        sets = [cls(data_dir, train=t, download=download) for t in (True, False)]
        for s in sets:
            if len(s.targets) != len(s.data) or len(s.data) == 0:
                raise ValueError(f"{len(s.data)} images but {len(s.targets)} labels")
    except DataError:
        raise
    except Exception as e:  # unpickling, reshape, network: one line, not a traceback
        raise DataError(f"cannot load {name} from {folder}: {type(e).__name__}: {e}") from None
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    aug = Augment(pad=4, flip=True) if augment else None
    train, test = (TensorImageDataset(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
                                      torch.tensor(s.targets), mean, std, a) for s, a in zip(sets, (aug, None)))
    if int(torch.cat([train.labels, test.labels]).max()) >= len(sets[0].classes):
        raise DataError(f"{folder}: labels exceed the {len(sets[0].classes)} class names")
    return train, test, _info(name, train, test, 32, 3, sets[0].classes, mean, std)


def _imagefolder(data_dir: Optional[str], image_size: Optional[int], augment: bool):
    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(f"imagefolder needs --data-dir with train/ and val/ (or test/) subfolders; got {data_dir!r}")
    test_dir = next((os.path.join(data_dir, d) for d in ("val", "test") if os.path.isdir(os.path.join(data_dir, d))),
                    None)
    if not os.path.isdir(os.path.join(data_dir, "train")) or test_dir is None:
        raise DataError(f"{data_dir} must contain train/ and val/ (or test/) subfolders, one folder per class")
    size = image_size or 224
    train = ImageFolderDataset(os.path.join(data_dir, "train"), size, train=True, augment=augment)
    test = ImageFolderDataset(test_dir, size, train=False, augment=False)
    if test.folder.classes != train.folder.classes:
        raise DataError(f"class folders differ between {data_dir}/train and {test_dir}")
    return train, test, _info("imagefolder", train, test, size, 3, train.folder.classes, IMAGENET_MEAN, IMAGENET_STD)


def _class_names(path: str, raw) -> List[str]:
    """An HDF5 file's class_names attribute: a JSON list (what pack writes) or an array of strings
    (what h5py stores for `attrs["class_names"] = [...]`)."""
    if isinstance(raw, bytes):
        raw = raw.decode()
    if isinstance(raw, str):
        try:
            names = json.loads(raw)
        except ValueError:
            names = None
        if not isinstance(names, list):
            raise DataError(f"{path}: attribute class_names must be a JSON list of names or an array of strings, "
                            f"got {raw[:60]!r}")
        return [str(n) for n in names]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in np.asarray(raw).ravel().tolist()]


def _hdf5(path: Optional[str], augment: bool):
    if not path:
        raise DataError("hdf5 needs --data-dir pointing to a .h5 file made by `python -m resist_mpi.data pack`")
    if not os.path.isfile(path):
        raise DataError(f"HDF5 file not found: {path}")
    f = _open_h5(path)
    try:
        shapes, labels = {}, {}
        for split in ("train", "test"):
            for key in ("images", "labels"):
                if f"{split}/{key}" not in f:
                    raise DataError(f"{path} lacks the dataset '{split}/{key}' (make it with `python -m resist_mpi.data pack`)")
            images = f[split + "/images"]
            if not all(hasattr(f[f"{split}/{key}"], "dtype") for key in ("images", "labels")):
                raise DataError(f"{path}: {split}/images and {split}/labels must be datasets, not groups")
            if f[split + "/labels"].dtype.kind not in "iu":  # (floats would be truncated to classes unsaid)
                raise DataError(f"{path}: {split}/labels must be integers, got {f[split + '/labels'].dtype}")
            labels[split] = torch.from_numpy(np.asarray(f[split + "/labels"][:], dtype=np.int64))
            shapes[split] = images.shape
            if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] != images.shape[2]:
                raise DataError(f"{path}: {split}/images must be uint8 N x H x W x C with H == W, "
                                f"got {images.dtype} {images.shape}")
            if labels[split].ndim != 1 or len(labels[split]) != images.shape[0] or images.shape[0] == 0:
                raise DataError(f"{path}: {split} has {images.shape[0]} images but {len(labels[split])} labels")
        if shapes["train"][1:] != shapes["test"][1:]:
            raise DataError(f"{path}: train images {shapes['train'][1:]} and test images {shapes['test'][1:]} differ")
        a = f.attrs
        names = _class_names(path, a["class_names"]) if "class_names" in a else None
        n_cls = int(a.get("num_classes", len(names) if names is not None else
                          int(torch.cat(list(labels.values())).max()) + 1))
        names = names if names is not None else [str(i) for i in range(n_cls)]
        _, size, _, channels = shapes["train"]
        if "mean" in a and "std" in a:
            mean, std = (tuple(np.asarray(a[k], dtype=np.float64).reshape(-1).tolist()) for k in ("mean", "std"))
        else:  # a hand-made file: estimate from an evenly spaced sample of the training images
            sample = f["train/images"][:: max(1, shapes["train"][0] // 4096)]
            mean, std = _stats(torch.from_numpy(sample).permute(0, 3, 1, 2).float() / 255)
        pad, flip = int(a.get("aug_pad", size // 8)), bool(a.get("aug_flip", True))
        source = a.get("name", "custom")
    except DataError:
        raise
    except OSError as e:  # truncated or corrupt file: h5py raises OSError on the first read
        raise DataError(f"cannot read HDF5 file {path}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:  # a hand-made file's attributes of another type
        why = (str(e).splitlines() or [""])[0]
        raise DataError(f"{path}: an attribute cannot be read ({type(e).__name__}: {why}); "
                        f"see `python -m resist_mpi.data pack` for the layout") from None
    finally:
        f.close()   # each reading process opens its own handle lazily
    if len(mean) != channels or len(std) != channels or len(names) != n_cls:
        raise DataError(f"{path}: attrs mean/std/class_names do not match {channels} channels and {n_cls} classes")
    for split, y in labels.items():
        if int(y.min()) < 0 or int(y.max()) >= n_cls:
            raise DataError(f"{path}: {split}/labels fall outside [0, {n_cls})")
    aug = Augment(pad=pad, flip=flip) if augment else None
    train = HDF5Dataset(path, "train", labels["train"], mean, std, aug)
    test = HDF5Dataset(path, "test", labels["test"], mean, std)
    return train, test, _info(f"hdf5:{source}", train, test, size, channels, names, mean, std)


def load_dataset(name: str, data_dir: Optional[str] = None, download: bool = False, seed: int = 0,
                 augment: bool = True, image_size: Optional[int] = None
                 ) -> Tuple[ImageDataset, ImageDataset, DataInfo]:
    """Build (train set, test set, info). The train set augments when ``augment`` is true.

    Args:
        name: one of DATASETS.
        data_dir: root for cifar10/100 and imagefolder; the .h5 file for hdf5; unused otherwise.
        download: let torchvision fetch CIFAR when absent (call it on one rank first).
        seed: seeds the synthetic data (the digits split is fixed).
        image_size: imagefolder output size (default 224); other datasets have a fixed size and
            accept only None or that size.
    Raises:
        DataError with one line for every problem the user can fix.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
    if name == "digits":
        out = _digits(augment)
    elif name == "synthetic":
        out = _synthetic(seed, augment)
    elif name in ("cifar10", "cifar100"):
        out = _cifar(name, data_dir, download, augment)
    elif name == "imagefolder":
        return _imagefolder(data_dir, image_size, augment)
    else:
        out = _hdf5(data_dir, augment)
    if image_size is not None and image_size != out[2].image_size:
        raise DataError(f"{name} images are {out[2].image_size}x{out[2].image_size}; image size {image_size} "
                        f"only applies to imagefolder (pack a file at that size instead)")
    return out


def check_compatible(info: DataInfo, image_size_expected: Optional[int], num_classes: int,
                     channels: Optional[int] = None) -> None:
    """Raise DataError when a model built for (image size, classes, input channels) cannot consume
    this data (None: any size, or channels not known)."""
    if channels is not None and info.channels != channels:
        raise DataError(f"dataset {info.name} has {info.channels}-channel images but the model takes {channels} "
                        f"channels (pack the images as RGB)")
    if info.num_classes != num_classes:
        raise DataError(f"dataset {info.name} has {info.num_classes} classes but the model has {num_classes} "
                        f"outputs; set num_classes to {info.num_classes}")
    if image_size_expected is not None and info.image_size != image_size_expected:
        raise DataError(f"dataset {info.name} has {info.image_size}x{info.image_size} images but the model "
                        f"expects {image_size_expected}x{image_size_expected}")
