"""Tests for lis/probe.py: sparsability and the channels removed by hand, then one tiny probe of a digits
teacher whose sweep is checked against physically pruned copies."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lis.config import load_config
from lis.errors import LISError
from lis.groups import find_groups
from lis.pipeline import load_data
from lis.probe import RATIOS, probe, removed_channels, sparsability
from lis.prune import hard_prune, keep_masks_from_norms
from lis.teacher import get_teacher
from lis.train import evaluate


def test_sparsability_is_the_largest_ratio_within_the_allowed_drop():
    ratios = [0.1, 0.2, 0.3, 0.4]
    assert sparsability(ratios, [0.0, 0.005, 0.02, 0.3], 0.01) == 0.2
    assert sparsability(ratios, [0.0, 0.0, 0.0, 0.0], 0.01) == 0.4
    assert sparsability(ratios, [0.02, 0.03, 0.5, 0.6], 0.01) == 0.0  # none: nothing is removable
    assert sparsability(ratios, [-0.01, 0.02, 0.0, 0.4], 0.01) == 0.3  # a noisy sweep: 0.3 still meets the cost
    assert sparsability([0.4, 0.1, 0.3, 0.2], [0.3, 0.0, 0.02, 0.005], 0.01) == 0.2  # any order
    assert sparsability(ratios, [0.0, 0.005, 0.02, 0.3], 0.0) == 0.1
    # one point on a 100-sample test split: 0.99 - 0.98 = 0.010000000000000009 is still "at most 1 point"
    assert sparsability([0.5], [0.99 - 0.98], 0.01) == 0.5
    assert sparsability([0.5], [0.0101], 0.01) == 0.0
    with pytest.raises(ValueError):
        sparsability([0.1, 0.2], [0.0], 0.01)


def test_removed_channels_rounds_and_keeps_one():
    assert [removed_channels(10, r) for r in RATIOS] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert removed_channels(10, 0.25) == 3  # halves round up
    assert removed_channels(4, 0.9) == 3 and removed_channels(3, 0.9) == 2  # at least one channel stays
    assert removed_channels(1, 0.5) == 0
    assert removed_channels(32, 0.1) == 3 and removed_channels(64, 0.9) == 58


def test_bad_arguments_fail_before_any_work(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    with pytest.raises(LISError, match="max_drop"):
        probe(cfg, max_drop=1.5)
    with pytest.raises(LISError, match="epochs"):
        probe(cfg, epochs=-1)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("probe")
    cfg = load_config(request.config.rootpath / "experiments" / "digits.yaml",
                      ["teacher.epochs=1", "tracking.wandb=disabled", f"run.dir={root}", "run.name=tiny"])
    out = probe(cfg, epochs=1)
    return cfg, out, json.loads((out / "probe.json").read_text())


def test_probe_writes_json_and_figures(tiny):
    cfg, out, p = tiny
    assert out == Path(cfg.run.dir) / "tiny-probe"  # the default: <run.dir>/<run.name>-probe
    for name in ("probe_distillability.png", "probe_sparsability.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    L, R = len(p["layer_names"]), len(RATIOS)
    assert L == 4 and p["ratios"] == list(RATIOS) and p["max_drop"] == 0.01
    acc, drops = np.array(p["accuracy"]), np.array(p["drops"])
    assert acc.shape == drops.shape == np.array(p["removed_channels"]).shape == (L, R)
    np.testing.assert_allclose(drops, p["teacher_acc"] - acc)
    assert p["removed_channels"] == [[removed_channels(n, r) for r in RATIOS] for n in p["channels"]]
    assert p["sparsability"] == [sparsability(RATIOS, d, 0.01) for d in drops]
    # one epoch of distillation, measured every signals.interval iterations: raw cosines in [-1, 1]
    d = p["distillability"]
    values = np.array(d["values"])
    assert d["epochs"] == 1 and set(d["epoch"]) == {0}
    assert values.shape == (len(d["iters"]), L) and len(d["iters"]) >= 2
    assert np.all(np.abs(values) <= 1) and np.all(np.diff(d["iters"]) == cfg.signals.interval)
    assert d["iters"][0] == 1


def test_sweep_equals_physically_pruned_teachers(tiny):
    cfg, _, p = tiny
    splits, loaders = load_data(cfg)
    device = torch.device("cpu")
    teacher, _, _ = get_teacher(cfg, splits, loaders, device)
    val = DataLoader(splits.val, batch_size=cfg.data.batch_size)  # the protocol: the probe reads val, not test
    assert p["split"] == "val" and p["teacher_acc"] == evaluate(teacher, val, device)["acc"]
    example = torch.zeros(2, *splits.input_shape)
    groups = find_groups(teacher, example)
    assert [g.name for g in groups] == p["layer_names"] and [g.num_channels for g in groups] == p["channels"]
    for i, j in [(0, 0), (2, 4), (3, 8)]:
        g = groups[i]
        masks = keep_masks_from_norms(teacher, [g], {g.name: g.num_channels - p["removed_channels"][i][j]})
        small = hard_prune(teacher, groups, masks, example)
        assert dict(small.named_modules())[g.name].weight.shape[0] == g.num_channels - p["removed_channels"][i][j]
        assert evaluate(small, val, device)["acc"] == pytest.approx(p["accuracy"][i][j], abs=1e-12)


def test_an_existing_probe_is_kept_without_overwrite(tiny):
    cfg, out, _ = tiny
    with pytest.raises(LISError, match="already exists.*--overwrite"):
        probe(cfg, epochs=1)
