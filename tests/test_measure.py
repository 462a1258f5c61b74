"""Parameter and MAC counts against hand-computed formulas; latency sanity."""

import math

import torch
from torch import nn

from lis.measure import count_macs, count_params, latency_ms


def _tiny_2d() -> nn.Module:
    # 3x10x10 -> conv 3x3 stride 1 pad 1 -> 8x10x10 -> conv 3x3 stride 2 no pad, groups 2 -> 6x4x4 -> Linear(96, 5)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, stride=2, groups=2, bias=False), nn.Flatten(), nn.Linear(96, 5))


def test_conv2d_linear_counts():
    model = _tiny_2d()
    params = (8 * 3 * 3 * 3 + 8) + 2 * 8 + (6 * 4 * 3 * 3) + (96 * 5 + 5)
    macs = (8 * 3 * 3 * 3) * 10 * 10 + (6 * 4 * 3 * 3) * 4 * 4 + 96 * 5
    assert count_params(model) == params
    assert count_macs(model, (3, 10, 10)) == macs


def test_conv1d_counts():
    # 2x40 -> conv k5 pad 2 -> 4x40 -> conv k3 stride 2 pad 1 -> 4x20
    model = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.Conv1d(4, 4, 3, stride=2, padding=1, bias=False))
    assert count_params(model) == (4 * 2 * 5 + 4) + 4 * 4 * 3
    assert count_macs(model, (2, 40)) == 4 * 2 * 5 * 40 + 4 * 4 * 3 * 20


def test_count_macs_restores_mode():
    model = _tiny_2d().train()
    model[1].eval()  # a mixed state must come back as it was
    count_macs(model, (3, 10, 10))
    assert model.training and model[0].training and not model[1].training
    assert model[1].num_batches_tracked.item() == 0  # counted in eval mode: BN statistics untouched


def test_latency_is_positive_and_restores_mode():
    torch.manual_seed(0)
    model = _tiny_2d().train()
    ms = latency_ms(model, (3, 10, 10), batch_size=4, repeats=3, warmup=1)
    assert ms > 0 and math.isfinite(ms)
    assert all(m.training for m in model.modules())
