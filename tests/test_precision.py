"""``run.amp`` and ``run.channels_last`` reach every loop, not only KDP and fine-tuning: teacher training,
evaluation and ``tp_group_norm`` (``lis.train.Precision``). A stand-in network records, inside its own forward,
whether bf16 autocast was on and whether its input was in the channels_last layout."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lis
from lis import pipeline
from lis.baselines import tp_group_norm
from lis.config import load_config
from lis.models import register_model
from lis.train import Precision, evaluate

CPU = torch.device("cpu")
FAST = Precision(amp=True, channels_last=True)
BATCH = 6  # the loaders' batch; Torch-Pruning's and the groups' traces use a batch of 2

#: ``(batch size, autocast on, input channels_last, training mode)`` of every forward of a ``Recorder``
FORWARDS: list[tuple[int, bool, bool, bool]] = []


class Recorder(nn.Sequential):
    """A small prunable CNN that appends to ``FORWARDS`` what each forward saw."""

    def __init__(self, num_classes: int = 3):
        super().__init__(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        FORWARDS.append((x.shape[0], torch.is_autocast_enabled("cpu"), layout, self.training))
        return super().forward(x)


@register_model(input_shape=(3, 8, 8))
def precision_recorder(num_classes: int) -> Recorder:
    return Recorder(num_classes)


def _loader(n: int = 12) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3), batch_size=BATCH)


def _loop_forwards() -> list[tuple[bool, bool, bool]]:
    """The recorded forwards on the loaders' batches (not the traces on an example input)."""
    return [f[1:] for f in FORWARDS if f[0] == BATCH]


@pytest.fixture(autouse=True)
def _fresh():
    FORWARDS.clear()


@pytest.mark.parametrize("precision", [Precision(), FAST])
def test_evaluate_runs_its_forwards_in_the_given_precision(precision):
    """Bug caught: evaluation in float32 and the default layout while the run trains in bf16 channels_last (the
    accuracy reported would not be the trained model's at the precision it runs in)."""
    out = evaluate(Recorder(), _loader(), CPU, precision)
    assert _loop_forwards() == [(precision.amp, precision.channels_last, False)] * 2
    assert set(out) == {"acc", "loss"} and out["loss"] == out["loss"]  # a float32 loss from bf16 logits, no NaN


def test_tp_group_norm_trains_in_the_given_precision():
    """Bug caught: Torch-Pruning's sparse training loop ignoring run.amp and run.channels_last."""
    tp_group_norm(Recorder(), torch.zeros(2, 3, 8, 8), {"macs": 0.3}, _loader(), CPU, epochs=1, lr=0.01,
                  momentum=0.9, weight_decay=0.0, steps=2, precision=FAST)
    assert _loop_forwards() == [(True, True, True)] * 2


def test_compress_trains_the_teacher_and_tp_group_norm_in_run_amp_and_channels_last(tmp_path, monkeypatch):
    """Bug caught: the run's precision not handed on by the pipeline: the teacher trained and evaluated in
    float32 and the default layout, and tp_group_norm given the default precision. The run stops (on purpose)
    where tp_group_norm would start."""
    given = {}

    class Stop(Exception):
        pass

    def fake_tp_group_norm(*args, **kw):
        given.update(kw)
        raise Stop

    monkeypatch.setattr(pipeline, "tp_group_norm", fake_tp_group_norm)
    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "digits.yaml", [
        f"run.dir={tmp_path}", "run.name=amp", "tracking.wandb=disabled", "run.device=cpu",
        "model.name=precision_recorder", "data.name=fake", "data.image_size=8", "data.num_classes=3",
        "data.fake_size=24", f"data.batch_size={BATCH}", "data.meta_fraction=0", "data.val_fraction=0",
        "teacher.epochs=1", "policy.name=tp_group_norm", "run.amp=bf16", "run.channels_last=true"])
    with pytest.raises(Stop):
        lis.compress(cfg)
    teacher = _loop_forwards()
    assert (True, True, True) in teacher and (True, True, False) in teacher  # trained, then evaluated
    assert set(teacher) == {(True, True, True), (True, True, False)}
    assert given["precision"] == FAST
