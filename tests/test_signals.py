"""lis/signals.py: distillability (gradient cosine), sparsity, the dean's feature matrix and its EMA."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from lis.groups import channel_norms, find_groups
from lis.prune import mask_
from lis.signals import FEATURES, Signals, SignalTracker, cosine, distillability, sparsity


def test_cosine_against_numpy():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=gen), torch.randn(12, generator=gen)
    na, nb = a.numpy().ravel().astype(np.float64), b.numpy().astype(np.float64)
    assert cosine(a, b) == pytest.approx(float(na @ nb / np.linalg.norm(na) / np.linalg.norm(nb)), rel=1e-12)
    assert cosine(a, 3 * a) == pytest.approx(1.0) and cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(a, b).dtype == torch.float64 and cosine(a, b).dim() == 0  # a tensor: no host sync


def test_cosine_of_a_zero_vector_is_zero():
    a = torch.randn(5)
    assert cosine(torch.zeros(5), a) == 0.0 and cosine(a, torch.zeros(5)) == 0.0
    assert cosine(torch.zeros(5), torch.zeros(5)) == 0.0


def test_distillability_of_two_lists():
    gen = torch.Generator().manual_seed(1)
    kd = [torch.randn(4, 6, generator=gen), torch.randn(3, 2, generator=gen), torch.randn(2, generator=gen)]
    ce = [torch.randn(4, 6, generator=gen), -2 * kd[1], torch.zeros(2)]
    d = distillability(kd, ce)
    first = kd[0].numpy().ravel().astype(np.float64), ce[0].numpy().ravel().astype(np.float64)
    expected = [first[0] @ first[1] / np.linalg.norm(first[0]) / np.linalg.norm(first[1]), -1.0, 0.0]
    assert d.shape == (3,) and d.dtype == torch.float32
    torch.testing.assert_close(d, torch.tensor(expected, dtype=torch.float32))


class ConvBN(nn.Module):
    """conv(3->4)-BN-ReLU, conv(4->5)-BN-ReLU, pool, Linear(5, 2)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        return self.fc(torch.relu(self.b2(self.c2(x))).mean((2, 3)))


def test_sparsity_counts_zeroed_channels():
    torch.manual_seed(0)
    model = ConvBN()
    x = torch.randn(1, 3, 6, 6)
    groups = find_groups(model, x)
    assert [g.name for g in groups] == ["c1", "c2"]
    torch.testing.assert_close(sparsity(model, groups), torch.zeros(2))
    mask_(model, groups, {"c1": torch.tensor([True, False, True, False]),
                          "c2": torch.tensor([True, True, True, True, False])})
    torch.testing.assert_close(sparsity(model, groups), torch.tensor([0.5, 0.2]))
    # "below eps * the largest norm": a channel shrunk to 1e-5 of the rest counts, one at 1e-2 does not
    with torch.no_grad():
        for p in (model.c2.weight, model.c2.bias, model.b2.weight, model.b2.bias):
            p[0] *= 1e-5
            p[1] *= 1e-2
    norms = channel_norms(model, groups[1])
    assert norms[0] < 1e-3 * norms.max() <= norms[1]
    torch.testing.assert_close(sparsity(model, groups, eps=1e-3), torch.tensor([0.5, 0.4]))
    # a group zeroed entirely is fully sparse
    mask_(model, groups, {"c1": torch.zeros(4, dtype=torch.bool)})
    assert float(sparsity(model, groups)[0]) == 1.0


def make(d, s, g, k, progress, ce, kd):
    return Signals(torch.tensor(d), torch.tensor(s), torch.tensor(g), torch.tensor(k), progress, ce, kd)


def test_signal_tracker_ema_by_hand():
    tracker = SignalTracker(num_layers=2, ema=0.8)
    before = tracker.state()
    assert before.distillability.tolist() == [0.0, 0.0] and before.keep_ratio.tolist() == [1.0, 1.0]
    updates = [make([0.5, -0.2], [0.0, 0.1], [1.0, 0.9], [0.5, 0.4], 0.1, 2.0, 1.0),
               make([0.1, 0.4], [0.2, 0.3], [0.5, 0.4], [0.6, 0.3], 0.2, 1.0, 0.5),
               make([-0.3, 1.0], [0.6, 0.5], [0.1, 0.2], [0.7, 0.2], 0.3, 0.4, 0.25)]
    d = [[0.5, -0.2], [0.1, 0.4], [-0.3, 1.0]]
    s = [[0.0, 0.1], [0.2, 0.3], [0.6, 0.5]]
    g = [[1.0, 0.9], [0.5, 0.4], [0.1, 0.2]]
    ce, kd = [2.0, 1.0, 0.4], [1.0, 0.5, 0.25]

    def ema(xs):
        out = xs[0]
        for x in xs[1:]:
            out = [0.8 * o + 0.2 * v for o, v in zip(out, x)] if isinstance(out, list) else 0.8 * out + 0.2 * x
        return out

    for i, u in enumerate(updates, start=1):
        cur = tracker.update(u)
        assert cur is tracker.state()
        torch.testing.assert_close(cur.distillability, torch.tensor(ema(d[:i])))
        torch.testing.assert_close(cur.sparsity, torch.tensor(ema(s[:i])))
        torch.testing.assert_close(cur.admm_gap, torch.tensor(ema(g[:i])))
        assert cur.ce == pytest.approx(ema(ce[:i])) and cur.kd == pytest.approx(ema(kd[:i]))
        # the keep ratio and the progress are set, not measured: they are taken as they are
        assert cur.keep_ratio.tolist() == updates[i - 1].keep_ratio.tolist()
        assert cur.progress == updates[i - 1].progress
    # after 3 updates, by hand: 0.8 * (0.8 * 0.5 + 0.2 * 0.1) + 0.2 * (-0.3)
    assert float(tracker.state().distillability[0]) == pytest.approx(0.8 * 0.42 - 0.06)


def test_features_matrix():
    sig = make([0.1, 0.2, 0.3, 0.4], [0.0, 0.5, 0.25, 1.0], [0.9, 0.8, 0.7, 0.6], [1.0, 0.5, 0.5, 0.25],
               0.3, 2.0, 0.5)
    f = sig.features()
    assert f.shape == (4, len(FEATURES)) == (4, 8) and f.dtype == torch.float32
    assert FEATURES == ("distillability", "sparsity", "admm_gap", "keep_ratio", "depth", "progress",
                        "log_ce", "log_kd")
    torch.testing.assert_close(f[:, 0], sig.distillability)
    torch.testing.assert_close(f[:, 1], sig.sparsity)
    torch.testing.assert_close(f[:, 2], sig.admm_gap)
    torch.testing.assert_close(f[:, 3], sig.keep_ratio)
    torch.testing.assert_close(f[:, 4], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    torch.testing.assert_close(f[:, 5], torch.full((4,), 0.3))
    torch.testing.assert_close(f[:, 6], torch.full((4,), math.log(2.0)))
    torch.testing.assert_close(f[:, 7], torch.full((4,), math.log(0.5)))
    one = make([0.1], [0.0], [0.5], [1.0], 0.0, 1.0, 1.0).features()
    assert one.shape == (1, 8) and float(one[0, 4]) == 0.0
    lists = {k: v.tolist() for k, v in sig.per_layer().items()}
    assert lists == {"distillability": sig.distillability.tolist(), "sparsity": [0.0, 0.5, 0.25, 1.0],
                     "admm_gap": sig.admm_gap.tolist(), "keep_ratio": [1.0, 0.5, 0.5, 0.25]}


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_signals_policies_and_the_deans_inputs_stay_on_the_models_device(device):
    """What the KDP loop builds at a measurement iteration, with the model on another device than the CPU (the
    ``meta`` device stands in for a GPU: mixing it with CPU tensors raises, as CUDA does). Every signal, the
    dean's features and every policy's weights must live on the model's device."""
    from lis.admm import ADMMState
    from lis.dean import create_dean
    from lis.policy import fixed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3))
    groups = find_groups(model, torch.randn(1, 2, 8, 8))
    admm = ADMMState(model, groups, type("Cost", (), {"macs": lambda self, keep: sum(keep.values())})(),
                     {"macs": 0.3})
    model.to(device)
    admm.U = {n: u.to(device) for n, u in admm.U.items()}
    admm.load_state_dict(admm.state_dict())
    grads = [torch.randn(g.num_channels, 5, device=device) for g in groups]
    tracker = SignalTracker(len(groups), device=device)
    before = tracker.state()
    for _ in range(2):  # the first measurement is taken as is, the second is mixed in
        tracker.update(Signals(distillability(grads, grads), sparsity(model, groups), admm.gap(model),
                               admm.keep_ratio(), 0.5, torch.tensor(2.0, device=device),
                               torch.tensor(1.0, device=device)))
    for signals in (before, tracker.state()):
        assert signals.features().device.type == torch.device(device).type
        for policy in (fixed(1.0, 1.0, 1e-3), create_dean(kind="layerwise").to(device),
                       create_dean(kind="mlp").to(device)):
            w = policy(signals)
            assert {t.device.type for t in (w.alpha_out, w.alpha, w.rho)} == {torch.device(device).type}
    # a checkpoint's signals (loaded on the CPU) go back to the model's device
    z = torch.zeros(2)
    resumed = Signals(z, z, z, z, 0.5, torch.tensor(2.0), 1.0).to(device)
    assert {t.device.type for t in (resumed.distillability, resumed.keep_ratio, resumed.ce)} == {
        torch.device(device).type}
    assert (resumed.progress, resumed.kd) == (0.5, 1.0)
