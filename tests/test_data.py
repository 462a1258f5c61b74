"""Tests for lis/data.py: every dataset builds offline from files the tests write or packages ship."""

import hashlib
import itertools
import pickle
import random
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision import datasets

from lis.data import (MNIST1D_VARIANTS, NAMES, EpochSampler, Splits, batches_from, build_splits, make_loaders,
                      meta_split, mnist1d_cache_key, seek)
from lis.errors import LISError


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_pickle(path, obj):
    # The real archives are Python 2 pickles whose str keys load as str under encoding="latin1";
    # torchvision looks keys up as str ("data", "labels"), so bytes keys would not load.
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _write_cifar(root, monkeypatch, cls, n_train=20, n_test=6, n_classes=10):
    """Write a tiny CIFAR-format copy of ``cls`` under ``root`` and point ``cls``'s md5 table at it.

    Returns (train pixels, train labels, test pixels, test labels); pixels are uint8 (N, 3072).
    """
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key = "labels" if cls is datasets.CIFAR10 else "fine_labels"

    def batch(name, n):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, n_classes, size=n)]
        _write_pickle(folder / name, {"batch_label": name, label_key: labels, "data": data,
                                      "filenames": [f"{name}_{i}.png" for i in range(n)]})
        return data, labels

    train_names = [f for f, _ in cls.train_list]
    train = [batch(name, n_train // len(train_names)) for name in train_names]
    test_name = cls.test_list[0][0]
    test = batch(test_name, n_test)
    _write_pickle(folder / cls.meta["filename"], {cls.meta["key"]: [f"class{i}" for i in range(n_classes)]})

    # torchvision checks each file's md5 against its class table: make the table describe our files.
    monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f in train_names])
    monkeypatch.setattr(cls, "test_list", [[test_name, _md5(folder / test_name)]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})
    train_x = np.concatenate([d for d, _ in train])
    train_y = [y for _, ys in train for y in ys]
    return train_x, train_y, test[0], test[1]


def _unnormalize(x, dataset):
    t = dataset.transform.transforms[-1]  # the Normalize
    return x * torch.tensor(t.std).view(3, 1, 1) + torch.tensor(t.mean).view(3, 1, 1)


def _pixels(row):
    """A CIFAR row (3072 uint8, channel-major) as a (3, 32, 32) float image in [0, 1]."""
    return torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32) / 255)


def _assert_partition(splits, n):
    train, meta = set(splits.train.indices), set(splits.meta.indices)
    assert not train & meta
    assert train | meta == set(range(n))


@pytest.mark.parametrize("name, cls, n_classes", [("cifar10", datasets.CIFAR10, 10),
                                                  ("cifar100", datasets.CIFAR100, 100)])
def test_cifar_real_loader_on_written_files(tmp_path, monkeypatch, name, cls, n_classes):
    train_x, train_y, test_x, test_y = _write_cifar(tmp_path, monkeypatch, cls, n_classes=n_classes)
    n_train = len(train_y)
    assert n_train == 20
    splits = build_splits(name, str(tmp_path), meta_fraction=0.25, seed=0)

    assert (len(splits.train), len(splits.meta), len(splits.test)) == (n_train - 5, 5, len(test_y))
    assert splits.num_classes == n_classes
    assert splits.input_shape == (3, 32, 32)
    _assert_partition(splits, n_train)

    x, y = splits.test[2]
    assert y == test_y[2]
    torch.testing.assert_close(_unnormalize(x, splits.test), _pixels(test_x[2]), atol=1e-5, rtol=0)
    # The meta split shows training images through the eval transform: exactly the stored pixels.
    for i, j in enumerate(splits.meta.indices):
        x, y = splits.meta[i]
        assert y == train_y[j]
        torch.testing.assert_close(_unnormalize(x, splits.meta.dataset), _pixels(train_x[j]), atol=1e-5, rtol=0)
    # The train split augments (4-px padded crop + flip) the same stored images.
    tf_names = [type(t).__name__ for t in splits.train.dataset.transform.transforms]
    assert tf_names[:2] == ["RandomCrop", "RandomHorizontalFlip"]
    assert splits.train[0][0].shape == (3, 32, 32)
    assert splits.train.dataset.data is splits.meta.dataset.data  # loaded once, seen twice


def test_cifar_missing_names_the_folder(tmp_path):
    with pytest.raises(LISError, match="cifar-10-batches-py") as e:
        build_splits("cifar10", str(tmp_path))
    assert "data.download=true" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(LISError, match="cifar-100-python"):
        build_splits("cifar100", str(tmp_path / "nowhere"))


def test_cifar_download_failure_is_a_user_error(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", no_network)
    with pytest.raises(LISError, match="downloading cifar10 failed.*cifar-10-batches-py"):
        build_splits("cifar10", str(tmp_path), download=True)


def _write_image_tree(root, splits=("train", "val"), classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize("name", ["folder", "imagenet"])
def test_image_folder(tmp_path, name):
    _write_image_tree(tmp_path)
    splits = build_splits(name, str(tmp_path), image_size=32, meta_fraction=1 / 3, seed=0)
    assert (len(splits.train), len(splits.meta), len(splits.test)) == (4, 2, 6)
    assert splits.num_classes == 2
    assert splits.input_shape == (3, 32, 32)
    _assert_partition(splits, 6)
    for ds in (splits.train, splits.meta, splits.test):
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and y in (0, 1)
    # Meta and test go through the deterministic eval transform (resize + center crop).
    torch.testing.assert_close(splits.meta[0][0], splits.meta[0][0])
    torch.testing.assert_close(splits.test[0][0], splits.test[0][0])


def test_image_folder_missing_val(tmp_path):
    _write_image_tree(tmp_path, splits=("train",))
    with pytest.raises(LISError, match=r"val is missing.*/train/<class>/<image>"):
        build_splits("folder", str(tmp_path))


def test_image_folder_mismatched_classes(tmp_path):
    _write_image_tree(tmp_path, splits=("train",), classes=("cat", "dog"))
    _write_image_tree(tmp_path, splits=("val",), classes=("dog",))
    with pytest.raises(LISError, match="same class folders"):
        build_splits("folder", str(tmp_path))


def test_digits():
    splits = build_splits("digits", "unused", meta_fraction=0.1, seed=0)
    assert len(splits.train) + len(splits.meta) == 1437
    assert len(splits.meta) == round(0.1 * 1437)
    assert len(splits.test) == 360
    assert splits.num_classes == 10 and splits.input_shape == (1, 8, 8)
    x, y = splits.test[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    # Standardised with the train set's own mean and std.
    train_x = splits.train.dataset.tensors[0]
    assert abs(train_x.mean().item()) < 1e-5 and abs(train_x.std().item() - 1) < 1e-3
    # Stratified: 36 test images per class, give or take one.
    counts = torch.bincount(splits.test.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # The train/test split does not follow the run seed.
    other = build_splits("digits", "unused", meta_fraction=0.1, seed=1)
    assert torch.equal(other.test.tensors[0], splits.test.tensors[0])
    assert torch.equal(other.train.dataset.tensors[1], splits.train.dataset.tensors[1])


@pytest.fixture(scope="module")
def mnist1d_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def test_mnist1d_generates_caches_and_keeps_global_rngs(mnist1d_root, monkeypatch):
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    splits = build_splits("mnist1d", str(mnist1d_root), meta_fraction=0.1, seed=0)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before

    cache = mnist1d_root / "mnist1d" / f"{mnist1d_cache_key(MNIST1D_VARIANTS['mnist1d'])}.npz"
    assert cache.is_file()
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temp file left
    assert (len(splits.train), len(splits.meta), len(splits.test)) == (3600, 400, 1000)
    assert splits.num_classes == 10 and splits.input_shape == (1, 40)
    x, y = splits.train.dataset.tensors
    assert x.shape == (4000, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))

    # The second call reads the cache instead of generating.
    import mnist1d.data

    def no_generation(*args, **kwargs):
        raise AssertionError("mnist1d regenerated despite the cache")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    again = build_splits("mnist1d", str(mnist1d_root), meta_fraction=0.1, seed=0)
    assert torch.equal(again.train.dataset.tensors[0], x) and torch.equal(again.train.dataset.tensors[1], y)
    assert torch.equal(again.test.tensors[0], splits.test.tensors[0])
    assert again.meta.indices == splits.meta.indices


def test_fake():
    splits = build_splits("fake", "unused", image_size=16, num_classes=3, fake_size=20, meta_fraction=0.25)
    assert (len(splits.train), len(splits.meta), len(splits.test)) == (15, 5, 5)
    assert splits.num_classes == 3 and splits.input_shape == (3, 16, 16)
    x, y = splits.train[0]
    assert x.shape == (3, 16, 16) and y in range(3)
    train_images = [splits.train.dataset[i][0] for i in range(20)]
    assert not any(torch.equal(splits.test[0][0], t) for t in train_images)
    assert len(build_splits("fake", "unused", fake_size=3).test) == 1


@pytest.mark.parametrize("n, fraction", [(100, 0.1), (1437, 0.1), (7, 0.5), (10, 0.0)])
def test_meta_split(n, fraction):
    train, meta, val = meta_split(n, fraction, seed=0)
    assert len(meta) == round(fraction * n) and val == []
    assert not set(train) & set(meta) and sorted(train + meta) == list(range(n))
    assert meta_split(n, fraction, seed=0) == (train, meta, val)
    if 0 < len(meta) < n:
        assert meta_split(n, fraction, seed=1)[1] != meta


def test_meta_split_through_build_splits():
    a = build_splits("digits", "unused", meta_fraction=0.2, seed=0)
    b = build_splits("digits", "unused", meta_fraction=0.2, seed=0)
    c = build_splits("digits", "unused", meta_fraction=0.2, seed=1)
    _assert_partition(a, 1437)
    assert len(a.meta) == round(0.2 * 1437)
    assert a.meta.indices == b.meta.indices and a.meta.indices != c.meta.indices

    empty = build_splits("digits", "unused", meta_fraction=0.0)
    assert len(empty.meta) == 0 and len(empty.train) == 1437
    assert list(make_loaders(empty, batch_size=8).meta) == []


def _index_splits(n=100):
    ds = TensorDataset(torch.arange(n))
    return Splits(train=ds, meta=ds, val=ds, test=ds, num_classes=2, input_shape=())


def test_make_loaders_seeded_order():
    splits = _index_splits()

    def first_batches(seed):
        loaders = make_loaders(splits, batch_size=10, seed=seed)
        return next(iter(loaders.train))[0], next(iter(loaders.meta))[0], next(iter(loaders.test))[0]

    train0, meta0, test0 = first_batches(0)
    train0_again, meta0_again, _ = first_batches(0)
    train1, meta1, test1 = first_batches(1)
    assert torch.equal(train0, train0_again) and torch.equal(meta0, meta0_again)
    assert not torch.equal(train0, train1) and not torch.equal(meta0, meta1)
    assert torch.equal(test0, torch.arange(10)) and torch.equal(test1, test0)  # test is not shuffled
    assert not torch.equal(train0, torch.arange(10))  # train is


def test_make_loaders_keeps_last_partial_batch():
    loaders = make_loaders(_index_splits(25), batch_size=10)
    assert [len(b[0]) for b in loaders.train] == [10, 10, 5]


def test_meta_batch_size_sets_the_meta_loader_batch_only():
    loaders = make_loaders(_index_splits(25), batch_size=10, meta_batch_size=20)
    assert [len(b[0]) for b in loaders.meta] == [20, 5]
    assert [len(b[0]) for b in loaders.train] == [10, 10, 5]
    with pytest.raises(LISError, match=r"meta.batch_size=5 is a global batch .* multiple of 2"):
        make_loaders(_index_splits(25), batch_size=10, meta_batch_size=5, world=2)
    with pytest.raises(LISError, match=r"\(meta.batch_size=40\) .* lower meta.batch_size"):
        make_loaders(_index_splits(25), batch_size=10, meta_batch_size=40, world=2)


def test_unknown_dataset_lists_names():
    with pytest.raises(LISError, match="unknown dataset 'mnist'") as e:
        build_splits("mnist", "data")
    assert all(name in str(e.value) for name in NAMES)


def _epoch(loader) -> list[int]:
    return torch.cat([b[0] for b in loader]).tolist()


def test_every_pass_is_a_new_epoch_and_any_epoch_can_be_rebuilt_from_any_batch():
    train = make_loaders(_index_splits(25), batch_size=10, seed=3).train
    epochs = [_epoch(train) for _ in range(3)]
    assert all(sorted(e) == list(range(25)) for e in epochs)  # each pass is a permutation
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    fresh = make_loaders(_index_splits(25), batch_size=10, seed=3).train  # a resumed run: new loader, seek
    seek(fresh, 1, 2)
    assert len(fresh) == 1 and _epoch(fresh) == epochs[1][20:]
    assert _epoch(fresh) == epochs[2]  # and the pass after that is the next epoch
    # seed 1 epoch 0 is not seed 0 epoch 1
    assert EpochSampler(25, seed=1).order(0) != EpochSampler(25, seed=0).order(1)


def test_batches_from_continues_the_endless_sequence_where_it_stopped():
    def stream(start):
        meta = make_loaders(_index_splits(25), batch_size=10, seed=0).meta
        return [b[0].tolist() for b in itertools.islice(batches_from(meta, start), 7 - start)]

    whole = stream(0)
    assert [len(b) for b in whole] == [10, 10, 5, 10, 10, 5, 10]  # epochs run on, last batches partial
    assert all(stream(k) == whole[k:] for k in range(1, 7))
    plain = [[1], [2], [3]]  # any iterable of batches (tests pass lists) cycles
    assert list(itertools.islice(batches_from(plain, 2), 3)) == [[3], [1], [2]]
