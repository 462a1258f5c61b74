"""The val split (issue 13): carved from train with a fixed seed, disjoint from train, meta and test, seen by
nothing that trains, and the only source of ``val_acc``."""

import json
import math

import pytest
import torch

import lis
from lis.compare import row_from_summary
from lis.config import load_config
from lis.data import build_splits, meta_split
from lis.pipeline import load_data


@pytest.mark.parametrize("n, meta, val", [(100, 0.1, 0.1), (1437, 0.1, 0.2), (7, 0.3, 0.3), (10, 0.0, 0.5)])
def test_train_meta_and_val_partition_the_training_set(n, meta, val):
    """Bug it catches: a val split that overlaps meta (the dean would have read it) or train."""
    t, m, v = meta_split(n, meta, seed=0, val_fraction=val)
    assert (len(m), len(v)) == (round(meta * n), round(val * n))
    assert not set(t) & set(m) and not set(t) & set(v) and not set(m) & set(v)
    assert sorted(t + m + v) == list(range(n))
    assert meta_split(n, meta, seed=0, val_fraction=val) == (t, m, v)  # a fixed seed: the same every run
    assert meta_split(n, meta, seed=0)[1] == m  # the meta split does not move when a val split is added


def test_val_split_is_disjoint_from_every_other_split_by_content():
    """On digits, no val sample equals a train, meta or test sample (index disjointness alone would miss a
    val split taken from the wrong dataset)."""
    splits = build_splits("digits", "unused", meta_fraction=0.1, val_fraction=0.1, seed=0)
    assert len(splits.val) == round(0.1 * 1437) and len(splits.train) == 1437 - 2 * round(0.1 * 1437)
    rows = lambda ds: {tuple(x.flatten().tolist()) for x, _ in ds}  # noqa: E731
    val = rows(splits.val)
    for other in (splits.train, splits.meta, splits.test):
        assert not val & rows(other)
    assert splits.val.dataset is splits.meta.dataset  # the evaluation view of the training set


def test_config_carves_the_val_split_with_a_fixed_seed():
    """run.seed orders batches only: two seeds see the same val split, so their val_acc compare."""
    cfg = load_config("experiments/digits.yaml", ["run.seed=3"])
    a, _ = load_data(load_config("experiments/digits.yaml", ["run.seed=0"]))
    b, _ = load_data(cfg)
    # both are the split of the fixed split seed 0, whatever run.seed, at the configured fractions
    n, d = len(b.val.dataset), cfg.data
    expected = meta_split(n, d.meta_fraction, 0, d.val_fraction)
    assert b.val.indices == a.val.indices == expected[2] and len(expected[2]) == round(d.val_fraction * n)
    assert b.meta.indices == expected[1] and b.train.indices == expected[0]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    return [f"run.dir={root / 'runs'}", f"data.root={root / 'data'}", "tracking.wandb=disabled",
            "teacher.epochs=1", "kdp.epochs=1", "finetune.epochs=1", "policy.name=fixed"]


def test_val_acc_is_the_students_accuracy_on_the_val_split(dirs):
    """Bug: val_acc was measured on the meta split, on which the dean learns (in-sample for the dean)."""
    cfg = load_config("experiments/digits.yaml", dirs + ["run.name=val"])
    run_dir = lis.compress(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    student = lis.load_student(run_dir / "student.pt").eval()
    splits, _ = load_data(cfg)
    with torch.no_grad():
        x = torch.stack([x for x, _ in splits.val])
        y = torch.tensor([int(y) for _, y in splits.val])
        x_meta = torch.stack([x for x, _ in splits.meta])
        y_meta = torch.tensor([int(y) for _, y in splits.meta])
        val, meta = (student(x).argmax(1) == y).float().mean().item(), \
            (student(x_meta).argmax(1) == y_meta).float().mean().item()
    assert summary["val_acc"] == pytest.approx(val)
    assert val != meta  # the two splits tell apart here, so the check above can fail
    assert "val-split accuracy" in (run_dir / "report.md").read_text()


def test_no_val_split_gives_a_null_val_acc(dirs):
    cfg = load_config("experiments/digits.yaml", dirs + ["run.name=noval", "data.val_fraction=0"])
    summary = json.loads((lis.compress(cfg) / "summary.json").read_text())
    assert summary["val_acc"] is None
    assert math.isnan(row_from_summary("fixed", summary)["val_acc"])
