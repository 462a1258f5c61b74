"""A CUDA run's loaders pin their batches (page-locked memory, so that ``Precision.inputs``' non-blocking copies
to the GPU overlap the host's work); a CPU run's do not (pinning would only cost). Checked on the DataLoaders
themselves, without a GPU: CUDA is only reported present."""

import pytest
import torch
from torch.utils.data import TensorDataset

from lis import pipeline
from lis.config import load_config
from lis.data import Splits, make_loaders


def _splits() -> Splits:
    ds = TensorDataset(torch.arange(20.0), torch.arange(20) % 2)
    return Splits(train=ds, meta=ds, val=ds, test=ds, num_classes=2, input_shape=())


def _pinned(loaders) -> list[bool]:
    return [loaders.train.pin_memory, loaders.meta.pin_memory, loaders.test.pin_memory]


def test_make_loaders_pins_only_when_asked():
    assert _pinned(make_loaders(_splits(), batch_size=4)) == [False] * 3
    assert _pinned(make_loaders(_splits(), batch_size=4, pin_memory=True)) == [True] * 3


@pytest.mark.parametrize("device, cuda, pinned", [("cpu", False, False), ("cpu", True, False),
                                                  ("auto", False, False), ("auto", True, True),
                                                  ("cuda", True, True)])
def test_a_runs_loaders_are_pinned_exactly_when_it_runs_on_cuda(monkeypatch, device, cuda, pinned):
    """Bug caught: pinning a CPU run's batches (run.device=cpu on a GPU host included), or a CUDA run's not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = load_config(None, [f"run.device={device}", "data.batch_size=4"])
    assert _pinned(pipeline.run_loaders(cfg, _splits())) == [pinned] * 3
