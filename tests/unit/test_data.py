"""Unit tests for resist_mpi.data: datasets, shards, the randomness contract, pack/HDF5, bad inputs.

No MPI: ranks are simulated in one process. Every on-disk dataset is written by the test itself.
"""
import os
import pickle

import h5py
import numpy as np
import pytest
import torch

from resist_mpi.data import datasets as D
from resist_mpi.data import loader as L
from resist_mpi.data import packing as P
from resist_mpi.data.datasets import DataError, check_compatible, load_dataset
from resist_mpi.data.loader import ShardLoader


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic", seed=3)


def unnormalise(x, info):
    mean = torch.tensor(info.mean)[:, None, None]
    std = torch.tensor(info.std)[:, None, None]
    return x * std + mean


def all_batches(ds, batch_size=10_000):
    """The whole set, in order, unaugmented."""
    return next(ShardLoader(ds, 0, 1, batch_size, train=False).epoch(0))


def assert_one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    for w in words:
        assert w in msg, msg


# ----------------------------------------------------------------------------- digits / synthetic

def test_digits_shapes_split_and_normalisation(digits):
    train, test, info = digits
    assert (info.name, info.num_classes, info.image_size, info.channels) == ("digits", 10, 32, 3)
    assert (len(train), len(test), info.num_train, info.num_test) == (1437, 360, 1437, 360)
    assert info.class_names == tuple(str(i) for i in range(10))
    x, y = all_batches(train)
    assert x.shape == (1437, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert torch.equal(x[:, 0], x[:, 2])                       # grey replicated to 3 channels
    raw = unnormalise(x, info)
    assert float(raw.min()) > -1e-5 and float(raw.max()) < 1 + 1e-5
    # stratified: every class in both splits, in about the same proportion
    counts_tr = torch.bincount(y, minlength=10).float() / len(y)
    counts_te = torch.bincount(test.labels, minlength=10).float() / len(test)
    assert float((counts_tr - counts_te).abs().max()) < 0.01
    assert set(y.tolist()) == set(range(10))


def test_digits_split_is_fixed(digits):
    train2, test2, _ = load_dataset("digits", seed=99)
    assert torch.equal(digits[0].labels, train2.labels) and torch.equal(digits[1].images, test2.images)


def test_digits_are_scikit_learns_digits_and_split_without_importing_it(digits, monkeypatch):
    """The digits read from scikit-learn's file and the split written in digits_split.txt are, to the
    value, load_digits() and train_test_split(..., stratify, random_state=0); and the fallback (no file
    where scikit-learn 1.x keeps it) gives the same."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from resist_mpi.data import datasets
    d = load_digits()
    images, target = datasets._digits_arrays()
    assert np.array_equal(images, d.images) and np.array_equal(target, d.target)
    tr, te = train_test_split(np.arange(len(d.target)), test_size=360, random_state=0, stratify=d.target)
    split = datasets._digits_split()
    assert np.array_equal(split[0], tr) and np.array_equal(split[1], te)
    monkeypatch.setattr(datasets.os.path, "isfile", lambda path: False)
    images2, target2 = datasets._digits_arrays()
    assert np.array_equal(images2, d.images) and np.array_equal(target2, d.target)


def test_synthetic_deterministic_from_seed(synthetic):
    train, test, info = synthetic
    assert (len(train), len(test), info.num_classes, info.image_size) == (1024, 256, 10, 32)
    again, _, _ = load_dataset("synthetic", seed=3)
    other, _, _ = load_dataset("synthetic", seed=4)
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.images, other.images)
    # learnable: nearest class mean on train classifies test far above chance
    means = torch.stack([train.images[train.labels == c].mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(test.images.flatten(1), means).argmin(1)
    assert float((pred == test.labels).float().mean()) > 0.9


# ----------------------------------------------------------------------------- shards

@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 3, 10, 37])
def test_test_shards_disjoint_and_exact(size, n):
    ds = D.TensorImageDataset(torch.rand(n, 3, 4, 4), torch.arange(n) % 10, (0.5,) * 3, (0.25,) * 3)
    seen = []
    steps = {ShardLoader(ds, r, size, 4, train=False).steps_per_epoch for r in range(size)}
    assert len(steps) == 1
    for r in range(size):
        loader = ShardLoader(ds, r, size, 4, train=False)
        batches = list(loader.epoch(0))
        assert len(batches) == len(loader) <= loader.steps_per_epoch
        ys = torch.cat([y for _, y in batches]) if batches else torch.empty(0, dtype=torch.int64)
        assert loader.indices(0).tolist() == list(range(r, n, size))
        assert torch.equal(ys, ds.labels[r::size])
        seen += loader.indices(0).tolist()
    assert sorted(seen) == list(range(n))                       # each test sample exactly once


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("n,batch", [(1437, 32), (10, 3), (3, 2)])
def test_train_shards_cover_and_balance(size, n, batch):
    ds = D.TensorImageDataset(torch.zeros(n, 1, 2, 2), torch.zeros(n, dtype=torch.int64), (0.,), (1.,))
    per_rank = -(-n // size)
    if per_rank == 1:  # one image a rank: every step a batch of one, which BatchNorm cannot train on
        with pytest.raises(DataError) as e:
            ShardLoader(ds, 0, size, batch, seed=5)
        assert_one_line_error(e, f"the training set's {n} images give each of the {size} ranks one")
        return
    loaders = [ShardLoader(ds, r, size, batch, seed=5) for r in range(size)]
    lone = per_rank % batch == 1 and per_rank > 1  # a last batch of one sample is dropped
    per_rank -= lone
    assert {ld.steps_per_epoch for ld in loaders} == {-(-per_rank // batch)}
    for e in (0, 1):
        shards = [ld.indices(e) for ld in loaders]
        assert all(len(s) == per_rank for s in shards)
        union = torch.cat(shards)
        if not lone:
            assert sorted(set(union.tolist())) == list(range(n))    # every sample at least once
            assert len(union) - len(set(union.tolist())) == per_rank * size - n   # only the padding repeats
        else:  # at most one sample per rank is left out of the epoch
            assert len(set(union.tolist())) >= n - size and len(union) == per_rank * size
        for ld in loaders:
            sizes = [len(y) for _, y in ld.epoch(e)]
            assert len(sizes) == ld.steps_per_epoch == len(ld) and sum(sizes) == per_rank
            assert all(s == batch for s in sizes[:-1])


def test_train_permutation_is_global_and_epoch_dependent(digits):
    train = digits[0]
    one = ShardLoader(train, 0, 1, 32, seed=1)
    two = [ShardLoader(train, r, 2, 32, seed=1) for r in range(2)]
    # the same permutation is dealt, whatever the world size (DistributedSampler layout)
    assert torch.equal(one.indices(0)[0::2], two[0].indices(0)[: len(one.indices(0)[0::2])])
    assert not torch.equal(one.indices(0), one.indices(1))
    assert not torch.equal(one.indices(0), ShardLoader(train, 0, 1, 32, seed=2).indices(0))


def test_randomness_contract(digits):
    train = digits[0]
    a = ShardLoader(train, 1, 3, 32, seed=7)
    b = ShardLoader(train, 1, 3, 32, seed=7)
    full = list(a.epoch(2))
    torch.manual_seed(123)                                      # global RNG must not matter
    torch.rand(10)
    again = list(b.epoch(2))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(full, again))
    for k in (0, 1, 7, len(full) - 1, len(full)):
        resumed = list(b.epoch(2, start_batch=k))
        assert len(resumed) == len(full) - k
        assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(full[k:], resumed))
    # augmentation is active and depends on the epoch and on the rank
    x0, _ = next(a.epoch(3))
    assert not torch.equal(full[0][0], x0)
    plain = train.get_batch(a.batch_indices(2)[0])[0]
    assert not torch.equal(full[0][0], plain)
    other_rank = ShardLoader(train, 2, 3, 32, seed=7)
    idx = a.batch_indices(2)[0]
    aug_r1 = L._BatchView(train, 7, 1, True)[(2, 0, idx)][0]
    aug_r2 = L._BatchView(train, 7, 2, True)[(2, 0, idx)][0]
    assert torch.equal(aug_r1, full[0][0]) and not torch.equal(aug_r1, aug_r2)
    assert other_rank.steps_per_epoch == a.steps_per_epoch
    with pytest.raises(DataError):
        list(a.epoch(0, start_batch=-1))


def test_no_augmentation_when_disabled_or_eval(digits):
    plain_train, _, _ = load_dataset("digits", augment=False)
    x1, y1 = next(ShardLoader(plain_train, 0, 2, 16, seed=0).epoch(0))
    idx = ShardLoader(plain_train, 0, 2, 16, seed=0).batch_indices(0)[0]
    assert torch.equal(x1, plain_train.get_batch(idx)[0])
    x2, _ = next(ShardLoader(digits[0], 0, 1, 16, train=False).epoch(5))
    assert torch.equal(x2, digits[0].get_batch(torch.arange(16))[0])


def test_augmentation_is_a_crop_of_the_padded_image():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)
    out = D.Augment(pad=2, flip=False)(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r:r + 5, c:c + 5] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_workers_give_identical_batches(synthetic):
    train = synthetic[0]
    inline = list(ShardLoader(train, 1, 2, 64, seed=4).epoch(1, start_batch=2))
    loader = ShardLoader(train, 1, 2, 64, seed=4, workers=1)
    pooled = list(loader.epoch(1, start_batch=2))
    assert len(inline) == len(pooled) == loader.steps_per_epoch - 2
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(inline, pooled))
    assert len(list(loader.epoch(2))) == loader.steps_per_epoch      # the next epoch


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_interleaved_iterations_each_get_their_own_batches(synthetic, workers):
    """Evaluation reads epoch 0 (BN recalibration) while training is inside another epoch: two
    batches of epoch 1, three of epoch 0, then epoch 1 must go on with its third batch."""
    train = synthetic[0]
    want = list(ShardLoader(train, 0, 2, 32, seed=5).epoch(1))
    want0 = list(ShardLoader(train, 0, 2, 32, seed=5).epoch(0))
    loader = ShardLoader(train, 0, 2, 32, seed=5, workers=workers)
    training = loader.epoch(1)
    got = [next(training), next(training)]
    recalibration = loader.epoch(0)
    got0 = [next(recalibration) for _ in range(3)]
    got.append(next(training))
    del recalibration  # abandoned mid-epoch, as evaluation does after --bn-batches
    got += list(training)
    assert len(got) == len(want) and len(want) > 3
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(got, want))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(got0, want0[:3]))


def test_bad_shard_arguments(digits):
    with pytest.raises(DataError):
        ShardLoader(digits[0], 4, 4, 32)
    with pytest.raises(DataError):
        ShardLoader(digits[0], 0, 1, 0)


# ----------------------------------------------------------------------------- CIFAR on-disk format

def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_images(n, offset):
    rng = np.random.default_rng(offset)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def test_cifar10_tiny_on_disk(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = _cifar_images(4, i), [(i + j) % 10 for j in range(4)]
        _write_pickle(folder / f"data_batch_{i}", {"batch_label": f"b{i}", "labels": y, "data": x})
        train_x.append(x)
        train_y += y
    test_x = _cifar_images(6, 9)
    _write_pickle(folder / "test_batch", {"labels": list(range(6)), "data": test_x})
    _write_pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    train, test, info = load_dataset("cifar10", str(tmp_path))
    assert (info.num_classes, info.image_size, info.num_train, info.num_test) == (10, 32, 20, 6)
    assert info.class_names == tuple(names) and info.mean == D.CIFAR10_MEAN
    assert torch.equal(train.labels, torch.tensor(train_y)) and test.labels.tolist() == list(range(6))
    # CIFAR rows are channel-major 3x32x32: raw uint8 must come back exactly
    assert torch.equal(train.raw_batch(torch.arange(20)),
                       torch.from_numpy(np.concatenate(train_x).reshape(20, 3, 32, 32)))
    x, y = next(ShardLoader(train, 0, 2, 8, seed=1).epoch(0))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xt, _ = all_batches(test)
    expect = torch.from_numpy(test_x.reshape(6, 3, 32, 32)).float() / 255
    assert torch.allclose(unnormalise(xt, info), expect, atol=1e-5)


def test_cifar100_tiny_on_disk(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine = [f"c{i}" for i in range(100)]
    _write_pickle(folder / "train", {"data": _cifar_images(12, 1), "fine_labels": list(range(0, 96, 8)),
                                     "coarse_labels": [0] * 12})
    _write_pickle(folder / "test", {"data": _cifar_images(5, 2), "fine_labels": [99, 1, 2, 3, 4],
                                    "coarse_labels": [0] * 5})
    _write_pickle(folder / "meta", {"fine_label_names": fine, "coarse_label_names": [str(i) for i in range(20)]})
    train, test, info = load_dataset("cifar100", str(tmp_path), augment=False)
    assert (info.num_classes, info.num_train, info.num_test, info.channels) == (100, 12, 5, 3)
    assert train.labels.tolist() == list(range(0, 96, 8)) and test.labels.tolist() == [99, 1, 2, 3, 4]
    x, y = all_batches(train)
    assert x.shape == (12, 3, 32, 32)


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path / "nowhere"))
    assert_one_line_error(e, "--download", "cifar-10-batches-py")
    with pytest.raises(DataError) as e:
        load_dataset("cifar100")
    assert_one_line_error(e, "--data-dir")
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"not a pickle\n at all")
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", str(tmp_path))
    assert_one_line_error(e, "cifar100")


# ----------------------------------------------------------------------------- pack / HDF5

def test_pack_digits_roundtrip(tmp_path, digits, capsys):
    out = str(tmp_path / "digits.h5")
    assert P.main(["pack", "digits", out]) == 0
    assert "1437 train + 360 test" in capsys.readouterr().out
    train_h, test_h, info_h = load_dataset("hdf5", out)
    train, test, info = digits
    assert (info_h.num_classes, info_h.image_size, info_h.num_train, info_h.num_test) == (10, 32, 1437, 360)
    assert info_h.class_names == info.class_names and info_h.name == "hdf5:digits"
    assert np.allclose(info_h.mean, info.mean) and np.allclose(info_h.std, info.std)
    for ds_h, ds, in ((train_h, train), (test_h, test)):
        assert torch.equal(ds_h.labels, ds.labels)
        xh, yh = all_batches(ds_h)
        x, y = all_batches(ds)
        assert torch.equal(yh, y)
        diff = (unnormalise(xh, info_h) - unnormalise(x, info)).abs().max()
        assert float(diff) <= 0.5 / 255 + 1e-5                       # uint8 quantisation only
    with h5py.File(out, "r", locking=False) as f:   # the datasets above hold it open unlocked
        assert f["train/images"].dtype == np.uint8 and f["train/images"].shape == (1437, 32, 32, 3)
        assert f["train/images"].chunks[0] == 64 and f["train/labels"].dtype == np.int64
    # shards read through h5py, duplicates and unsorted indices included, match the in-memory set
    idx = torch.tensor([5, 3, 5, 300, 0])
    assert torch.equal(test_h.get_batch(idx)[1], test.labels[idx])
    assert float((unnormalise(train_h.get_batch(idx)[0], info_h)
                  - unnormalise(train.get_batch(idx)[0], info)).abs().max()) <= 0.5 / 255 + 1e-5
    la = list(ShardLoader(train_h, 1, 4, 32, seed=3).epoch(1, start_batch=3))
    lb = list(ShardLoader(train_h, 1, 4, 32, seed=3).epoch(1))[3:]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(la, lb))
    lc = list(ShardLoader(train_h, 1, 4, 32, seed=3, workers=1).epoch(1, start_batch=3))   # own handle per worker
    assert len(lc) == len(la) and all(torch.equal(a[0], c[0]) for a, c in zip(la, lc))
    # packed again (to compress it): the file kept its name and the digits' augmentation; it was
    # "hdf5:hdf5:digits" with flips, which digits must never get
    again = str(tmp_path / "digits-gz.h5")
    assert P.main(["pack", out, again, "--dataset", "hdf5", "--compress"]) == 0
    train_a, _, info_a = load_dataset("hdf5", again)
    assert info_a.name == "hdf5:digits" and train_a.augment == train_h.augment == D.Augment(pad=2, flip=False)
    xa, xh = train_a.get_batch(idx, D._generator(0, 1))[0], train_h.get_batch(idx, D._generator(0, 1))[0]
    assert torch.equal(xa, xh)


def test_pack_refuses_overwrite_and_cleans_up(tmp_path, capsys, monkeypatch):
    out = tmp_path / "syn.h5"
    out.write_bytes(b"precious")
    assert P.main(["pack", "synthetic", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and err.count("\n") == 1
    assert out.read_bytes() == b"precious"
    assert P.main(["pack", "synthetic", str(out), "--force", "--seed", "1"]) == 0
    assert load_dataset("hdf5", str(out))[2].num_train == 1024

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(P, "_write_split", boom)
    fresh = tmp_path / "fresh.h5"
    assert P.main(["pack", "digits", str(fresh)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert not fresh.exists() and not (tmp_path / "fresh.h5.tmp").exists()
    assert P.main(["pack", "no-such-thing", str(fresh)]) == 2
    assert os.listdir(tmp_path) == ["syn.h5"]


def test_hdf5_bad_files(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("hdf5", str(tmp_path / "missing.h5"))
    assert_one_line_error(e, "missing.h5")
    with pytest.raises(DataError) as e:
        load_dataset("hdf5")
    assert_one_line_error(e, "pack")
    good = str(tmp_path / "good.h5")
    P.pack("synthetic", good)
    truncated = tmp_path / "truncated.h5"
    blob = open(good, "rb").read()
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as e:
        load_dataset("hdf5", str(truncated))
    assert_one_line_error(e, "truncated.h5")
    lacking = str(tmp_path / "lacking.h5")
    with h5py.File(lacking, "w") as f:
        f["train/images"] = np.zeros((4, 8, 8, 3), np.uint8)
        f["train/labels"] = np.zeros(4, np.int64)
        f["test/images"] = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(DataError) as e:
        load_dataset("hdf5", lacking)
    assert_one_line_error(e, "test/labels")
    mismatched = str(tmp_path / "mismatched.h5")
    with h5py.File(mismatched, "w") as f:
        f["train/images"] = np.zeros((4, 8, 8, 3), np.uint8)
        f["train/labels"] = np.zeros(3, np.int64)
        f["test/images"] = np.zeros((2, 8, 8, 3), np.uint8)
        f["test/labels"] = np.zeros(2, np.int64)
    with pytest.raises(DataError) as e:
        load_dataset("hdf5", mismatched)
    assert_one_line_error(e, "labels")


@pytest.mark.parametrize("case, message", [
    ("images_group", "train/images and train/labels must be datasets, not groups"),
    ("aug_pad_text", "an attribute cannot be read (ValueError: invalid literal for int()"),
    ("mean_text", "an attribute cannot be read (ValueError: could not convert string to float"),
])
def test_hdf5_hand_made_attributes_of_another_type_are_one_line(tmp_path, case, message):
    """A group where a dataset belongs, aug_pad "four", mean "abc": tracebacks (AttributeError,
    ValueError) on every rank, and from pack."""
    path = str(tmp_path / f"{case}.h5")
    with h5py.File(path, "w") as f:
        for split in ("train", "test"):
            f[split + "/images"] = np.zeros((4, 8, 8, 3), np.uint8)
            f[split + "/labels"] = np.arange(4) % 2
        if case == "images_group":
            del f["train/images"]
            f.create_group("train/images")
        elif case == "aug_pad_text":
            f.attrs["aug_pad"] = "four"
        else:
            f.attrs["mean"], f.attrs["std"] = "abc", "abc"
    with pytest.raises(DataError) as e:
        load_dataset("hdf5", path)
    assert_one_line_error(e, message)


def test_hdf5_class_names_set_the_classes_where_num_classes_is_not_given(tmp_path):
    """Three class names and labels 0-1 (no image of the third class yet): refused, as the labels
    counted 2 classes against 3 names."""
    path = str(tmp_path / "names.h5")
    with h5py.File(path, "w") as f:
        for split in ("train", "test"):
            f[split + "/images"] = np.zeros((4, 8, 8, 3), np.uint8)
            f[split + "/labels"] = np.arange(4) % 2
        f.attrs["class_names"] = ["a", "b", "c"]
    assert load_dataset("hdf5", path)[2].num_classes == 3


def test_hdf5_hand_made_file_without_attrs(tmp_path):
    path = str(tmp_path / "plain.h5")
    with h5py.File(path, "w") as f:
        f["train/images"] = np.full((6, 8, 8, 1), 51, np.uint8)
        f["train/labels"] = np.array([0, 1, 2, 0, 1, 2])
        f["test/images"] = np.zeros((2, 8, 8, 1), np.uint8)
        f["test/labels"] = np.array([2, 1])
    train, test, info = load_dataset("hdf5", path)
    assert (info.num_classes, info.channels, info.image_size) == (3, 1, 8)
    assert np.allclose(info.mean, [0.2]) and info.std == (1.0,)     # constant images: std falls back to 1
    assert info.class_names == ("0", "1", "2")
    x, y = next(ShardLoader(train, 0, 1, 4).epoch(0))
    assert x.shape == (4, 1, 8, 8) and bool(torch.isfinite(x).all())


def test_hdf5_class_names_as_h5py_stores_a_list_and_labels_that_are_not_integers(tmp_path):
    """`attrs["class_names"] = [...]` (h5py stores an array of strings) raised TypeError from
    json.loads; a string that is not JSON said only "Expecting value"; float labels were cut to
    classes unsaid."""
    def make(name, names=None, labels=np.array([0, 1, 2, 0])):
        path = str(tmp_path / name)
        with h5py.File(path, "w") as f:
            for split in ("train", "test"):
                f[f"{split}/images"] = np.zeros((4, 8, 8, 3), np.uint8)
                f[f"{split}/labels"] = labels
            if names is not None:
                f.attrs["class_names"] = names
        return path
    assert load_dataset("hdf5", make("list.h5", ["cat", "dog", "eel"]))[2].class_names == ("cat", "dog", "eel")
    assert load_dataset("hdf5", make("json.h5", '["a", "b", "c"]'))[2].class_names == ("a", "b", "c")
    with pytest.raises(DataError) as e:
        load_dataset("hdf5", make("words.h5", "cat dog eel"))
    assert_one_line_error(e, "words.h5", "class_names", "cat dog eel")
    with pytest.raises(DataError) as e:
        load_dataset("hdf5", make("floats.h5", labels=np.array([0.0, 1.5, 2.0, 0.0])))
    assert_one_line_error(e, "floats.h5", "integers", "float64")


def test_a_model_for_rgb_refuses_grayscale_data_with_one_line(tmp_path, capsys):
    """A 1-channel file loaded, and every rank failed at the first forward (a traceback, exit 1)."""
    from resist_mpi.cli.config import Config, validate
    from resist_mpi.cli.trainer import Trainer
    from resist_mpi.comm import init
    path = str(tmp_path / "gray.h5")
    with h5py.File(path, "w") as f:
        for split in ("train", "test"):
            f[f"{split}/images"] = np.zeros((8, 32, 32, 1), np.uint8)
            f[f"{split}/labels"] = np.arange(8) % 2
    with pytest.raises(DataError) as e:
        check_compatible(load_dataset("hdf5", path)[2], 32, 2, channels=3)
    assert_one_line_error(e, "1-channel", "3 channels")
    cfg = validate(Config(dataset="hdf5", data_dir=path, model="preact_resnet34", width=2, epochs=1,
                          out=str(tmp_path / "run"), progress="off"))
    with pytest.raises(SystemExit) as stop:
        Trainer(cfg, init("self", fail_fast=False))
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "resist_mpi: error: dataset hdf5:custom has 1-channel images but the model takes 3 channels (pack the "
        "images as RGB)"]


def test_ranks_that_loaded_different_data_stop_together_with_one_line(tmp_path, monkeypatch, capsys):
    """A node whose copy of the dataset lacks some files gave its ranks other steps per epoch and
    rounds: the ranks met in different collectives, and the watchdog (every peer still answering)
    never ended the job. Rank 1 here loads 10 training images fewer."""
    import itertools
    import threading

    from resist_mpi.cli import trainer
    from resist_mpi.cli.config import Config, validate
    from resist_mpi.comm.thread import run_ranks
    load, calls, lock = trainer.load_dataset, itertools.count(), threading.Lock()

    def load_one_short(*args, **kw):
        train, test, info = load(*args, **kw)
        with lock:
            short = next(calls) == 1
        return (torch.utils.data.Subset(train, range(len(train) - 10)) if short else train), test, info
    monkeypatch.setattr(trainer, "load_dataset", load_one_short)
    cfg = validate(Config(dataset="synthetic", model="preact_resnet34", width=2, epochs=1, out=str(tmp_path / "run"),
                          progress="off"))

    def body(c):
        try:
            trainer.Trainer(cfg, c)
        except SystemExit as e:
            return e.code
    capsys.readouterr()
    assert run_ranks(2, body) == [2, 2]
    assert capsys.readouterr().err.splitlines() == [
        "resist_mpi: error: the ranks loaded different data (training images 1014..1024): every node must see "
        "the same dataset"]


# ----------------------------------------------------------------------------- ImageFolder

def _image_tree(root):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for c, cls in enumerate(("cat", "dog")):
            os.makedirs(root / split / cls)
            for i in range(n):
                arr = rng.integers(0, 256, size=(10 + 3 * i, 12 + c, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i}.png")


def test_imagefolder_loads_and_packs(tmp_path):
    _image_tree(tmp_path / "tree")
    train, test, info = load_dataset("imagefolder", str(tmp_path / "tree"), image_size=16)
    assert (info.num_train, info.num_test, info.num_classes, info.image_size) == (6, 4, 2, 16)
    assert info.class_names == ("cat", "dog") and info.mean == D.IMAGENET_MEAN
    a = list(ShardLoader(train, 0, 1, 4, seed=1).epoch(0))
    b = list(ShardLoader(train, 0, 1, 4, seed=1).epoch(0, start_batch=1))
    assert [x.shape for x, _ in a] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert torch.equal(a[1][0], b[0][0])
    xt, yt = all_batches(test)
    assert xt.shape == (4, 3, 16, 16) and yt.tolist() == [0, 0, 1, 1]
    out = str(tmp_path / "tree8.h5")
    assert P.main(["pack", str(tmp_path / "tree"), out, "--image-size", "8"]) == 0
    train_h, test_h, info_h = load_dataset("hdf5", out)
    assert (info_h.image_size, info_h.num_train, info_h.class_names) == (8, 6, ("cat", "dog"))
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", str(tmp_path / "tree" / "train"))
    assert_one_line_error(e, "val/")


def test_imagefolder_augmentation_is_the_generators_alone_also_beside_another_thread(tmp_path):
    """Its random crops and flips drew from the global RNG (seeded per sample inside fork_rng): a
    background evaluation's batches, read by another thread at the same time, changed the training
    batches (38 of 40 differed in an audit) and left the global RNG moved. Now each sample draws
    from a generator of its own: the same batches in any thread, the global RNG untouched."""
    import threading
    _image_tree(tmp_path / "tree")
    train, _, _ = load_dataset("imagefolder", str(tmp_path / "tree"), image_size=8)
    idx = torch.arange(6)
    ref = [train.get_batch(idx, D._generator(0, k))[0] for k in range(2)]
    assert not torch.equal(ref[0], ref[1]) and ref[0].shape == (6, 3, 8, 8)
    assert torch.equal(train.get_batch(idx, D._generator(0, 0))[0], ref[0])  # the generator decides
    torch.manual_seed(123)
    before = torch.get_rng_state().clone()
    out = [[], []]

    def read(k):
        out[k] = [train.get_batch(idx, D._generator(0, k))[0] for _ in range(20)]
    threads = [threading.Thread(target=read, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(x, ref[k]) for k in range(2) for x in out[k])
    assert torch.equal(torch.get_rng_state(), before)
    # every draw a crop inside the image and a flip or not: over many seeds, both flips, many boxes
    crops = {tuple(train.get_batch(idx[:1], D._generator(s, 0))[0].flatten()[:4].tolist()) for s in range(30)}
    assert len(crops) > 20


def test_imagefolder_broken_image(tmp_path):
    _image_tree(tmp_path / "tree")
    (tmp_path / "tree" / "val" / "cat" / "0.png").write_bytes(b"\x89PNG garbage")
    _, test, _ = load_dataset("imagefolder", str(tmp_path / "tree"), image_size=8)
    with pytest.raises(DataError) as e:
        all_batches(test)
    assert_one_line_error(e, "0.png")
    alone = str(e.value)
    with pytest.raises(DataError) as e:  # read by a worker: the same line (it came with the worker's traceback)
        list(ShardLoader(test, 0, 1, 4, train=False, workers=1).epoch(0))
    assert str(e.value) == alone


# ----------------------------------------------------------------------------- misc errors

def test_unknown_name_and_fixed_size_and_compat(digits):
    with pytest.raises(DataError) as e:
        load_dataset("mnist")
    assert_one_line_error(e, "mnist", "digits")
    assert isinstance(e.value, ValueError)
    with pytest.raises(DataError) as e:
        load_dataset("digits", image_size=64)
    assert_one_line_error(e, "32")
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", "/definitely/not/here")
    assert_one_line_error(e, "/definitely/not/here")
    info = digits[2]
    check_compatible(info, 32, 10)
    check_compatible(info, None, 10)
    with pytest.raises(DataError) as e:
        check_compatible(info, None, 100)
    assert_one_line_error(e, "10 classes")
    with pytest.raises(DataError) as e:
        check_compatible(info, 224, 10)
    assert_one_line_error(e, "224")
    assert "\n" not in str(DataError("two\nlines"))
