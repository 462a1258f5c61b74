"""Datasets and the four splits a run uses: train, meta, val and test.

- **train**: the training set minus the meta and val splits, with augmentation
  (random crop and flip for images). The teacher and the student learn on it.
- **meta**: a held-out slice of the *training* set, ``round(meta_fraction *
  len(train set))`` samples chosen with a fixed seed, disjoint from train and
  seen through the evaluation transform (no augmentation). The dean's meta
  step measures the student on it, so it never trains on these samples.
- **val**: another held-out slice of the training set, ``round(val_fraction *
  len(train set))`` samples drawn with the same seed, disjoint from train and
  meta, with the evaluation transform. Nothing trains on it (not the teacher,
  not the student, not the dean): settings are chosen on its accuracy.
- **test**: the official test (or ``val``) set with the evaluation transform;
  only reported, never used for a decision.

Dataset names (docs/design.md section 6): ``cifar10`` and ``cifar100``
(torchvision, files under ``root``), ``imagenet`` and ``folder`` (ImageFolder
trees ``root/train`` and ``root/val``), ``digits`` (scikit-learn's 8x8 digits,
offline), ``mnist1d`` and its harder variant ``mnist1d_hard`` (generated
offline and cached under ``root``, see ``MNIST1D_VARIANTS``), ``fake``
(random images, for smoke tests) and ``pkg.module:build_fn``, the user's
``build_fn(root) -> (train, test)`` (``lis.builders``). Nothing here downloads unless
``download=True`` is asked for a CIFAR set.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset
from torchvision import datasets, transforms as T
from torchvision.datasets.vision import StandardTransform

from lis.builders import import_builder, is_builder
from lis.errors import LISError

NAMES = ("cifar10", "cifar100", "imagenet", "folder", "digits", "mnist1d", "mnist1d_hard", "fake")

#: each MNIST-1D variant's options: the sizes of its train and test sets and the arguments of the generator
#: ``mnist1d.data.make_dataset`` it sets (the others keep the package's defaults)
MNIST1D_VARIANTS = {
    # the package's default dataset (Greydanus 2020), sample for sample
    "mnist1d": {"train_size": 4000, "test_size": 1000, "corr_noise_scale": 0.25, "iid_noise_scale": 0.02,
                "max_translation": 48, "shear_scale": 0.75, "scale_coeff": 0.4, "seed": 42},
    # the bench's dataset: twice the noise and shear, so that a deep teacher leads a 90%-pruned student by points;
    # 10,000 test samples, so that one sample is 0.01 points and the test noise of a mean accuracy ~0.2 points
    "mnist1d_hard": {"train_size": 8000, "test_size": 10000, "corr_noise_scale": 0.5, "iid_noise_scale": 0.04,
                     "max_translation": 48, "shear_scale": 1.5, "scale_coeff": 0.4, "seed": 42},
}

# Per-channel mean and std of the training images, in [0, 1] pixel units.
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class Splits:
    """The four datasets of a run; every sample is ``(input, label)``."""

    train: Dataset
    meta: Dataset
    val: Dataset  #: empty when val_fraction is 0
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]  #: per-sample input shape, e.g. (1, 40) or (3, 32, 32)


@dataclass
class Loaders:
    train: DataLoader  #: shuffled, seeded
    meta: DataLoader  #: shuffled, seeded
    test: DataLoader  #: fixed order
    #: the train split in an order of its own (seeded apart from ``train``): the fresh batches of the meta
    #: step's look-ahead, so the unroll does not step on the batch the student was just trained on
    ahead: Optional[DataLoader] = None


def build_splits(name: str, root: str, *, download: bool = False, meta_fraction: float = 0.1,
                 val_fraction: float = 0.0, seed: int = 0, image_size: int = 32, num_classes: int = 10,
                 fake_size: int = 512, mnist1d: Optional[dict] = None) -> Splits:
    """Build the train / meta / val / test splits of dataset ``name`` stored under ``root``.

    ``meta_fraction`` and ``val_fraction`` are fractions (not percent) of the
    training set, carved out with ``seed``. ``image_size`` (pixels) applies to ``imagenet``,
    ``folder`` and ``fake``; ``num_classes`` to ``fake`` and a builder's data;
    ``fake_size`` (training samples; the test set has a quarter) only to ``fake``; ``mnist1d``
    (options of ``MNIST1D_VARIANTS``, None values ignored) to the MNIST-1D variants.
    """
    if name in _CIFAR_STATS:
        train_aug, train_eval, test, n_classes = _cifar(name, root, download)
    elif name in ("imagenet", "folder"):
        train_aug, train_eval, test, n_classes = _image_folder(name, root, image_size)
    elif name == "digits":
        train_aug, test = _digits()
        train_eval, n_classes = train_aug, 10
    elif name in MNIST1D_VARIANTS:
        train_aug, test = _mnist1d(root, mnist1d_options(name, mnist1d or {}))
        train_eval, n_classes = train_aug, 10
    elif name == "fake":
        train_aug, test = _fake(image_size, num_classes, fake_size)
        train_eval, n_classes = train_aug, num_classes
    elif is_builder(name):
        train_aug, test = _own(name, root)
        train_eval, n_classes = train_aug, num_classes
    else:
        raise LISError(f"unknown dataset {name!r}: set data.name to one of {', '.join(NAMES)}")

    train_idx, meta_idx, val_idx = meta_split(len(train_aug), meta_fraction, seed, val_fraction)
    return Splits(train=Subset(train_aug, train_idx), meta=Subset(train_eval, meta_idx),
                  val=Subset(train_eval, val_idx), test=test, num_classes=n_classes,
                  input_shape=tuple(test[0][0].shape))


def meta_split(n: int, meta_fraction: float, seed: int,
               val_fraction: float = 0.0) -> tuple[list[int], list[int], list[int]]:
    """Split indices ``0..n-1`` into (train, meta, val): ``round(meta_fraction * n)`` meta indices and then
    ``round(val_fraction * n)`` val indices drawn with ``seed``.

    The lists are sorted and together cover every index exactly once. The meta
    indices do not depend on ``val_fraction`` (the val split comes out of train).
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_meta, n_val = round(meta_fraction * n), round(val_fraction * n)
    return sorted(perm[n_meta + n_val:]), sorted(perm[:n_meta]), sorted(perm[n_meta:n_meta + n_val])


class EpochSampler(Sampler[int]):
    """Shuffles anew each epoch, the order of epoch ``e`` rebuilt from ``(seed, e)`` alone.

    Each pass over the sampler is the next epoch. A resumed run calls
    ``set_epoch(e, start)`` and its next pass is epoch ``e`` from sample
    ``start`` on: exactly the samples the interrupted run had not seen yet,
    without loading the ones it had. Without ``shuffle`` the order is ``0..n-1``.

    With ``world`` processes, each global batch of ``batch`` samples is cut
    into ``world`` consecutive slices and process ``rank`` gets its slice, so
    the processes together see the batches one process would (a last partial
    global batch is dropped, so every process takes the same number of steps).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1, batch: int = 1,
                 stream: int = 0):
        self.n, self.seed, self.shuffle, self.stream = n, seed, shuffle, stream
        self.rank, self.world, self.batch = rank, world, batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Make the next pass epoch ``epoch``, from its ``start``-th sample (of this process) on."""
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> list[int]:
        """This process's samples of epoch ``epoch``, in order."""
        if not self.shuffle:
            order = list(range(self.n))
        else:
            # (seed, epoch) -> a generator seed through SeedSequence, so seed 1 epoch 0 is not seed 0 epoch 1;
            # another stream of the same seed is another order
            key = [self.seed, epoch] + ([self.stream] if self.stream else [])
            seed = int(np.random.SeedSequence(key).generate_state(1)[0])
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
        if self.world == 1:
            return order
        part = self.batch // self.world
        return [i for k in range(self.n // self.batch)
                for i in order[k * self.batch + self.rank * part:k * self.batch + (self.rank + 1) * part]]

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)[self.start:]
        self.epoch, self.start = self.epoch + 1, 0
        return iter(order)

    def __len__(self) -> int:
        return (self.n if self.world == 1 else self.n // self.batch * (self.batch // self.world)) - self.start


def make_loaders(splits: Splits, batch_size: int, num_workers: int = 0, seed: int = 0, rank: int = 0,
                 world: int = 1, meta_batch_size: Optional[int] = None, pin_memory: bool = False) -> Loaders:
    """DataLoaders over ``splits``; the same ``seed`` gives the same train, meta and look-ahead order (an
    ``EpochSampler`` each: every pass over a loader is its next epoch). ``batch_size`` is the global
    batch: with ``world`` processes each loads ``batch_size / world`` of it (the test set is not split).
    The meta loader's batch is ``meta_batch_size`` (default ``batch_size``). ``pin_memory`` (for a CUDA
    run) puts batches in page-locked memory, from which the copies to the GPU do not block."""
    meta_batch_size = meta_batch_size or batch_size
    for key, size in (("data.batch_size", batch_size), ("meta.batch_size", meta_batch_size)):
        if size % world:
            raise LISError(f"{key}={size} is a global batch and must divide evenly among the "
                           f"{world} processes: make it a multiple of {world}")

    def loader(ds: Dataset, shuffle: bool, split: bool, batch_size: int = batch_size,
               key: str = "data.batch_size", stream: int = 0) -> DataLoader:
        parts = world if split else 1
        sampler = EpochSampler(len(ds), seed, shuffle, rank if split else 0, parts, batch_size, stream)
        if split and len(ds) and not len(sampler):
            raise LISError(f"a split of {len(ds)} samples is smaller than one global batch ({key}="
                           f"{batch_size}) and {world} processes drop partial batches: lower {key}")
        return DataLoader(ds, batch_size=batch_size // parts, sampler=sampler, num_workers=num_workers,
                          pin_memory=pin_memory)

    return Loaders(train=loader(splits.train, True, True),
                   meta=loader(splits.meta, True, True, meta_batch_size, "meta.batch_size"),
                   test=loader(splits.test, False, False), ahead=loader(splits.train, True, True, stream=1))


def seek(loader: Iterable, epoch: int, batch: int = 0) -> None:
    """Make the next pass over ``loader`` epoch ``epoch`` from its ``batch``-th batch on (a resumed run).
    Any other iterable (a list of batches in a test) is left alone and must start at batch 0."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, EpochSampler):
        sampler.set_epoch(epoch, batch * loader.batch_size)
    elif batch:
        raise ValueError(f"cannot start a pass over {type(loader).__name__} at batch {batch}")


def batches_from(loader: Iterable, start: int = 0) -> Iterator:
    """The batches of ``loader`` epoch after epoch, without end, from the ``start``-th batch of that
    sequence on (a resumed run draws the meta batch the interrupted run would have drawn next)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, EpochSampler):
        seek(loader, *divmod(start, max(-(-len(sampler) // loader.batch_size), 1)))
        while True:
            yield from loader
    yield from itertools.islice(itertools.cycle(loader), start, None)


def _with_transform(ds: datasets.VisionDataset, transform) -> datasets.VisionDataset:
    """The same dataset seen through another transform (shares the loaded data / file list)."""
    ds = copy.copy(ds)
    ds.transform = transform
    ds.transforms = StandardTransform(transform, ds.target_transform)
    return ds


def _cifar(name: str, root: str, download: bool):
    mean, std = _CIFAR_STATS[name]
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    eval_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = os.path.join(root, cls.base_folder)
    how = (f"extract {cls.filename} (the python version) into {root} so that {folder}/ holds "
           f"{', '.join(f for f, _ in cls.train_list + cls.test_list)}, {cls.meta['filename']}")
    try:
        train = cls(root, train=True, transform=train_tf, download=download)
        test = cls(root, train=False, transform=eval_tf)
    except RuntimeError as e:
        if "not found or corrupted" not in str(e):
            raise
        hint = how if download else f"{how}, or set data.download=true"
        raise LISError(f"{name} not found or corrupted in {folder}: {hint}") from None
    except OSError as e:  # no network: urllib's URLError is an OSError
        raise LISError(f"downloading {name} failed ({e}): fetch the archive elsewhere and {how}") from None
    return train, _with_transform(train, eval_tf), test, len(train.classes)


def _image_folder(name: str, root: str, image_size: int):
    mean, std = _IMAGENET_STATS
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(mean, std)])
    eval_tf = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(),
                         T.Normalize(mean, std)])
    layout = f"{root}/train/<class>/<image> and {root}/val/<class>/<image>"
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise LISError(f"{name} dataset: folder {os.path.join(root, split)} is missing; "
                           f"expected the layout {layout} (set data.root)")
    try:
        train = datasets.ImageFolder(os.path.join(root, "train"), transform=train_tf)
        test = datasets.ImageFolder(os.path.join(root, "val"), transform=eval_tf)
    except FileNotFoundError as e:  # no class folders, or no images in them
        raise LISError(f"{name} dataset: {str(e).rstrip('.')}; expected the layout {layout}") from None
    if test.classes != train.classes:
        # ImageFolder numbers classes by sorted folder name, so labels would silently disagree.
        raise LISError(f"{name} dataset: {root}/val has classes {test.classes[:5]}... but {root}/train has "
                       f"{train.classes[:5]}...; give both the same class folders")
    return train, _with_transform(train, eval_tf), test, len(train.classes)


def _digits():
    """scikit-learn's 8x8 digits: a fixed stratified 80/20 split, standardised with the train mean/std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.reshape(-1, 1, 8, 8) / 16.0
    # The split is part of the dataset's definition, so it ignores the run seed.
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.2, random_state=0,
                                                        stratify=digits.target)
    mean, std = x_train.mean(), x_train.std()
    return _tensor_dataset((x_train - mean) / std, y_train), _tensor_dataset((x_test - mean) / std, y_test)


def mnist1d_options(name: str, overrides: dict) -> dict:
    """The options of MNIST-1D variant ``name`` with those of ``overrides`` that are not None."""
    return {**MNIST1D_VARIANTS[name], **{k: v for k, v in overrides.items() if v is not None}}


def mnist1d_cache_key(options: dict) -> str:
    """The cache file name of the MNIST-1D dataset ``options`` make: ``mnist1d-<hash of the options>``."""
    blob = json.dumps(options, sort_keys=True)
    return f"mnist1d-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _mnist1d(root: str, options: dict):
    """MNIST-1D made with ``options``, cached in root/mnist1d/<mnist1d_cache_key>.npz."""
    path = os.path.join(root, "mnist1d", f"{mnist1d_cache_key(options)}.npz")
    if not os.path.exists(path):
        _generate_mnist1d(path, options)
    with np.load(path) as f:
        return _tensor_dataset(f["x"][:, None, :], f["y"]), _tensor_dataset(f["x_test"][:, None, :], f["y_test"])


def _generate_mnist1d(path: str, options: dict) -> None:
    import mnist1d.data  # imports matplotlib: only pay for it when generating

    args = mnist1d.data.get_dataset_args()
    n_train, n_test = options["train_size"], options["test_size"]
    for key, value in options.items():
        if key not in ("train_size", "test_size"):
            setattr(args, key, value)
    # make_dataset draws num_samples // 10 of each class, shuffles them and puts the first train_split of them
    # in its train set: ask for all of them there and cut the sizes here (the default cut is 4000 of 5000)
    args.num_samples, args.train_split = 10 * math.ceil((n_train + n_test) / 10), 1.0
    # make_dataset reseeds python's and numpy's global RNGs; the caller's streams must not change.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = mnist1d.data.make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Write then rename, so an interrupted run never leaves a half-written cache behind.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            x, y = d["x"], d["y"]
            np.savez(f, x=x[:n_train], y=y[:n_train], x_test=x[n_train:n_train + n_test],
                     y_test=y[n_train:n_train + n_test])
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _fake(image_size: int, num_classes: int, fake_size: int):
    tf = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    shape = (3, image_size, image_size)
    train = datasets.FakeData(size=fake_size, image_size=shape, num_classes=num_classes, transform=tf)
    # FakeData seeds image i with i + random_offset: this offset keeps test images apart from train ones.
    test = datasets.FakeData(size=max(fake_size // 4, 1), image_size=shape, num_classes=num_classes, transform=tf,
                             random_offset=fake_size)
    return train, test


def _own(spec: str, root: str):
    """The user's ``build_fn(root) -> (train, test)``: two datasets of (input, label) samples."""
    out = import_builder(spec, "data.name")(root)
    if not (isinstance(out, tuple) and len(out) == 2
            and all(hasattr(d, "__getitem__") and hasattr(d, "__len__") for d in out)):
        raise LISError(f"data.name={spec} returned a {type(out).__name__}, not (train, test) datasets: its function "
                       f"must be build_fn(root) -> (train, test), with data.num_classes set to their classes")
    return out


def _tensor_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))
