"""experiments/imagenet_resnet50.yaml end to end on a tiny ImageFolder tree, through the real ImageFolder loader.

The tree (root/train/<class>/*.png, root/val/<class>/*.png, three classes) is
written with PIL; everything else is the experiment's own config with the
sizes shrunk: 32x32 images, batch 2, an untrained teacher (a trained one
on a dozen images drifts from its BatchNorm statistics, see
tests/test_experiments.py), one KDP and one fine-tuning epoch.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lis
from lis.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "imagenet_resnet50.yaml"
CLASSES = ("n01440764", "n01443537", "n01484850")  # ImageNet-style synset folder names


def _write_image_tree(root: Path, per_class: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


@pytest.mark.slow
def test_imagenet_resnet50_one_epoch_on_an_image_folder_tree(tmp_path):
    root = tmp_path / "imagenet"
    _write_image_tree(root, {"train": 4, "val": 2})  # 12 train images: 8 train + 4 meta; 6 val
    overrides = [f"data.root={root}", "data.image_size=32", "data.batch_size=2", "data.num_workers=0",
                 "data.meta_fraction=0.33", "teacher.epochs=0", "kdp.epochs=1", "finetune.epochs=1",
                 f"run.dir={tmp_path / 'runs'}", "tracking.wandb=disabled",
                 "admm.interval=2", "signals.interval=2", "meta.interval=2"]
    cfg = load_config(CONFIG, overrides)
    assert (cfg.data.name, cfg.model.name, cfg.policy.name) == ("imagenet", "torchvision:resnet50", "dean")

    run_dir = lis.compress(cfg)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"] == "imagenet" and summary["model"] == "torchvision:resnet50"
    assert summary["macs_reduction"] >= cfg.prune.target_macs_reduction - 1e-9
    # the data came through ImageFolder: as many classes as folders (not the fake set's data.num_classes=10) ...
    student = torch.load(run_dir / "student.pt", weights_only=False)
    assert student.fc.out_features == len(CLASSES)
    # ... and as many KDP iterations as batches of its 8 training images (an even number: at 32 px ResNet-50's
    # last stage is 1x1, and BatchNorm cannot train on a batch of one), with meta steps on its meta split
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kdp = [r for r in records if r.get("phase") == "kdp"]
    assert max(r["iter"] for r in kdp) == 4
    assert any("meta_loss" in r for r in kdp)
