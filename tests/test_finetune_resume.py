"""Bug 1 of issue 13: resuming a run stopped during fine-tuning when some layer kept all its channels."""

import json

import torch

import lis
from lis import pipeline
from lis.config import load_config


def test_a_run_resumed_in_fine_tuning_rebuilds_the_adapters_of_full_width_layers(tmp_path):
    """Bug: a fresh run builds an adapter for every layer (initialised as the kept channels), a resumed one
    (masks unknown) only for layers whose width changed, so loading the adapters failed with 'Unexpected
    key(s) in state_dict: "maps.features__0__0.weight"'. The resumed run must rebuild what the fresh one had."""
    cfg = load_config("experiments/digits.yaml", [
        f"run.dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "run.name=r", "tracking.wandb=disabled",
        "teacher.epochs=1", "kdp.epochs=1", "finetune.epochs=1", "policy.name=fixed",
        "prune.target_macs_reduction=0.05"])
    run_dir = lis.compress(cfg)
    first = json.loads((run_dir / "summary.json").read_text())
    before, after = first["channels"]["before"], first["channels"]["after"]
    assert any(b == a for b, a in zip(before, after)) and before != after  # a full-width layer and a pruned one
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert state["phase"] == "finetune" and len(state["adapters"]) == len(before)  # one adapter per layer

    (run_dir / "summary.json").unlink()  # as if stopped after its last fine-tuning checkpoint
    pipeline.compress(pipeline.resume_config(run_dir), resume=True)
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["student_acc"] == first["student_acc"] and again["channels"] == first["channels"]
