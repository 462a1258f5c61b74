"""The MNIST-1D variants of lis/data.py: the generator's options reach the data, each option set is cached
under its own key, and the default variant is the package's own dataset sample for sample."""

import numpy as np
import pytest
import torch

from lis.config import load_config
from lis.data import MNIST1D_VARIANTS, build_splits, mnist1d_cache_key, mnist1d_options
from lis.pipeline import load_data

SMALL = {"train_size": 300, "test_size": 200}


def arrays(splits):
    return splits.train.dataset.tensors + splits.test.tensors


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def test_the_default_variant_is_the_packages_default_dataset(root):
    """Bug caught: cutting train/test differently from make_dataset's own 4000/1000 split (or passing an
    option under the wrong name) would silently change the demo's data."""
    import mnist1d.data

    d = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    x, y, x_test, y_test = arrays(build_splits("mnist1d", str(root)))
    assert np.array_equal(x[:, 0].numpy(), d["x"].astype(np.float32)) and np.array_equal(y.numpy(), d["y"])
    assert np.array_equal(x_test[:, 0].numpy(), d["x_test"].astype(np.float32))
    assert np.array_equal(y_test.numpy(), d["y_test"])


@pytest.mark.parametrize("option, value", [("corr_noise_scale", 1.0), ("iid_noise_scale", 0.3),
                                           ("max_translation", 5), ("shear_scale", 3.0), ("scale_coeff", 1.5),
                                           ("seed", 7)])
def test_every_option_changes_the_data_and_its_cache_file(root, option, value):
    base = build_splits("mnist1d", str(root), mnist1d=SMALL)
    other = build_splits("mnist1d", str(root), mnist1d={**SMALL, option: value})
    assert not torch.equal(other.train.dataset.tensors[0], base.train.dataset.tensors[0])
    assert mnist1d_cache_key(mnist1d_options("mnist1d", {**SMALL, option: value})) != \
        mnist1d_cache_key(mnist1d_options("mnist1d", SMALL))


def test_same_options_give_identical_arrays_from_one_cache_file_per_option_set(root, monkeypatch):
    first = build_splits("mnist1d_hard", str(root), mnist1d=SMALL)
    files = sorted(p.name for p in (root / "mnist1d").iterdir())
    assert f"{mnist1d_cache_key(mnist1d_options('mnist1d_hard', SMALL))}.npz" in files
    import mnist1d.data

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated despite the cache")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    again = build_splits("mnist1d_hard", str(root), mnist1d={**SMALL, "seed": None})  # None: the variant's value
    assert all(torch.equal(a, b) for a, b in zip(arrays(first), arrays(again)))
    assert sorted(p.name for p in (root / "mnist1d").iterdir()) == files  # no second file, no temp file


def test_sizes_and_the_hard_variant(root):
    splits = build_splits("mnist1d", str(root), meta_fraction=0.1, mnist1d={"train_size": 503, "test_size": 97})
    assert (len(splits.train), len(splits.meta), len(splits.test)) == (453, 50, 97)
    assert splits.input_shape == (1, 40) and splits.num_classes == 10
    hard = MNIST1D_VARIANTS["mnist1d_hard"]
    assert hard["test_size"] >= 10_000
    easy = MNIST1D_VARIANTS["mnist1d"]
    assert hard["corr_noise_scale"] > easy["corr_noise_scale"] and hard["shear_scale"] > easy["shear_scale"]


def test_config_keys_reach_the_generator(root):
    cfg = load_config(None, ["data.name=mnist1d_hard", f"data.root={root}", "data.mnist1d_train_size=300",
                             "data.mnist1d_test_size=200", "data.mnist1d_shear_scale=2.0"])
    splits, _ = load_data(cfg)
    expected = build_splits("mnist1d", str(root), mnist1d={**MNIST1D_VARIANTS["mnist1d_hard"], **SMALL,
                                                           "shear_scale": 2.0})
    assert len(splits.test) == 200
    assert all(torch.equal(a, b) for a, b in zip(arrays(splits), arrays(expected)))
