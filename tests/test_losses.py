"""lis/losses.py: logit and feature distillation, feature hooks, layer pairing, adapters.

Numbers are checked against the formulas written out with explicit softmax,
norms and pooling, and gradients against finite differences.
"""

import math

import pytest
import torch
from torch import nn

from lis.losses import Adapters, FeatureHooks, kd_attention, kd_feat, kd_logit, pair_layers


def softmax_by_hand(z):
    e = [[math.exp(v) for v in row] for row in z]
    return [[v / sum(row) for v in row] for row in e]


# ---------------------------------------------------------------- kd_logit


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_logit_by_hand(temperature):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=gen) * 3, torch.randn(4, 5, generator=gen) * 3
    p_s = softmax_by_hand((s / temperature).tolist())
    p_t = softmax_by_hand((t / temperature).tolist())
    kl = sum(pt * (math.log(pt) - math.log(ps)) for rs, rt in zip(p_s, p_t) for ps, pt in zip(rs, rt)) / 4
    assert float(kd_logit(s, t, temperature)) == pytest.approx(temperature ** 2 * kl, rel=1e-5)


def test_kd_logit_is_zero_for_identical_logits_and_positive_otherwise():
    s = torch.randn(3, 7)
    assert abs(float(kd_logit(s, s.clone(), 4.0))) < 1e-6
    # a logit shift common to all classes changes no probability
    assert abs(float(kd_logit(s, s + 5.0, 2.0))) < 1e-5
    assert float(kd_logit(s, torch.randn(3, 7), 4.0)) > 0


def test_kd_logit_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    tau = 3.0
    (grad,) = torch.autograd.grad(kd_logit(s, t, tau), s)
    h, numeric = 1e-6, torch.zeros_like(s)
    with torch.no_grad():
        for i in range(3):
            for j in range(4):
                e = torch.zeros_like(s)
                e[i, j] = h
                numeric[i, j] = (kd_logit(s + e, t, tau) - kd_logit(s - e, t, tau)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-9)
    # and the closed form: tau * (p_s - p_t) / N, so the scale does not grow with tau
    closed = tau * (torch.softmax(s.detach() / tau, 1) - torch.softmax(t / tau, 1)) / 3
    torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- kd_feat


def kd_feat_by_hand(s, t):
    total = 0.0
    for a, b in zip(s.double().flatten(1).tolist(), t.double().flatten(1).tolist()):
        na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
        total += sum((x / na - y / nb) ** 2 for x, y in zip(a, b))
    return total / len(s)


def test_kd_feat_by_hand():
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    assert float(kd_feat(s, t)) == pytest.approx(kd_feat_by_hand(s, t), rel=1e-5)
    assert abs(float(kd_feat(s, s.clone()))) < 1e-6
    assert float(kd_feat(s, -s)) == pytest.approx(4.0, rel=1e-6)  # the largest value: opposite maps
    # hidden Linear units: (N, C) maps
    a, b = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    assert float(kd_feat(a, b)) == pytest.approx(kd_feat_by_hand(a, b), rel=1e-5)


def test_kd_feat_is_invariant_to_positive_per_sample_scaling():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 3, 6, generator=gen), torch.randn(4, 3, 6, generator=gen)
    scale = torch.tensor([0.01, 1.0, 7.0, 300.0]).view(4, 1, 1)
    ref = float(kd_feat(s, t))
    assert float(kd_feat(s * scale, t)) == pytest.approx(ref, rel=1e-5)
    assert float(kd_feat(s, t * scale.flip(0))) == pytest.approx(ref, rel=1e-5)


def test_kd_feat_pools_maps_of_different_spatial_size():
    gen = torch.Generator().manual_seed(4)
    # 2-D: an 8x8 student map against a 4x4 teacher map -> 2x2 block means
    s, t = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    pooled = s.reshape(2, 3, 4, 2, 4, 2).mean((3, 5))
    assert float(kd_feat(s, t)) == pytest.approx(kd_feat_by_hand(pooled, t), rel=1e-5)
    assert float(kd_feat(t, s)) == pytest.approx(kd_feat_by_hand(t, pooled), rel=1e-5)
    # 1-D: length 10 against 5
    s1, t1 = torch.randn(2, 3, 10, generator=gen), torch.randn(2, 3, 5, generator=gen)
    pooled1 = s1.reshape(2, 3, 5, 2).mean(3)
    assert float(kd_feat(s1, t1)) == pytest.approx(kd_feat_by_hand(pooled1, t1), rel=1e-5)


def test_kd_attention_by_hand():
    gen = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 5, 4, generator=gen)

    def attention(m):  # per sample and position: the mean over channels of the squares, then L2-normalised
        out = []
        for sample in m.tolist():
            a = [sum(c[i] ** 2 for c in sample) / len(sample) for i in range(len(sample[0]))]
            out.append([v / math.sqrt(sum(u * u for u in a)) for v in a])
        return out

    a_s, a_t = attention(s), attention(t)
    by_hand = sum(sum((u - v) ** 2 for u, v in zip(p, q)) for p, q in zip(a_s, a_t)) / 2
    assert float(kd_attention(s, t)) == pytest.approx(by_hand, rel=1e-5)  # 3 student channels, 5 teacher ones


def test_kd_attention_ignores_channel_order_and_count_but_not_where_the_energy_is():
    gen = torch.Generator().manual_seed(6)
    t = torch.randn(2, 4, 6, 6, generator=gen)
    # a student with half the channels, each carrying two teacher channels' energy, has the same attention
    s = (t[:, 0::2].pow(2) + t[:, 1::2].pow(2)).sqrt()
    assert abs(float(kd_attention(s.flip(1), t))) < 1e-6
    assert float(kd_attention(s.roll(1, dims=3), t)) > 1e-3
    # a hidden Linear layer has no positions: compared as kd_feat does
    a, b = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    assert float(kd_attention(a, b)) == float(kd_feat(a, b))


# ---------------------------------------------------------------- hooks, pairing, adapters


def test_feature_hooks_capture_outputs_in_the_graph_and_remove_themselves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU()).eval()
    x = torch.randn(2, 2, 7)
    with FeatureHooks(model, ["0", "2"]) as feats:
        out = model(x)
    assert set(feats.maps) == {"0", "2"}
    conv = nn.functional.conv1d(x, model[0].weight, model[0].bias)
    torch.testing.assert_close(feats.maps["0"], conv)
    assert torch.equal(feats.maps["2"], out)
    assert feats.maps["0"].requires_grad  # kept in the autograd graph for the feature loss
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    feats.maps.clear()
    model(x)
    assert feats.maps == {}


def test_pair_layers():
    names = ["a", "b", "c"]
    assert pair_layers(names, ["x", "y", "z"]) == [("a", "x"), ("b", "y"), ("c", "z")]
    teacher = [f"t{i}" for i in range(9)]
    assert pair_layers(names, teacher) == [("a", "t0"), ("b", "t4"), ("c", "t8")]  # relative depth 0, 1/2, 1
    assert pair_layers(teacher, names) == [(t, names[round(i * 2 / 8)]) for i, t in enumerate(teacher)]
    assert pair_layers([], teacher) == [] and pair_layers(names, []) == []


def test_adapters_identity_when_widths_are_equal():
    adapters = Adapters({"l1": 4}, {"l1": 4}, {"l1": 4})
    x = torch.randn(2, 4, 3, 3)
    assert adapters("l1", x) is x and len(list(adapters.parameters())) == 0


def test_adapters_are_1x1_convs_when_widths_differ():
    adapters = Adapters({"a.0": 3, "b": 5}, {"a.0": 6, "b": 2}, {"a.0": 4, "b": 3})
    x2, x1 = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 7)
    y2, y1 = adapters("a.0", x2), adapters("b", x1)
    assert y2.shape == (2, 6, 4, 4) and y1.shape == (2, 2, 7)
    convs = [m for m in adapters.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert len(convs) == 2 and all(m.kernel_size in ((1,), (1, 1)) and m.bias is None for m in convs)
    w2 = next(m for m in convs if isinstance(m, nn.Conv2d)).weight[:, :, 0, 0]
    torch.testing.assert_close(y2, torch.einsum("oi,nihw->nohw", w2, x2))
    w1 = next(m for m in convs if isinstance(m, nn.Conv1d)).weight[:, :, 0]
    torch.testing.assert_close(y1, torch.einsum("oi,nil->nol", w1, x1))


@pytest.mark.parametrize("shape, dims", [((2, 3, 4, 4), 4), ((2, 3, 6), 3), ((2, 3), 2)])
def test_adapters_init_index_places_the_kept_channels(shape, dims):
    index = torch.tensor([4, 0, 2])  # student channel j was teacher channel index[j]
    adapters = Adapters({"l": 3}, {"l": 5}, {"l": dims}, init_index={"l": index})
    x = torch.randn(*shape)
    y = adapters("l", x)
    expected = torch.zeros(shape[0], 5, *shape[2:])
    for j, c in enumerate(index.tolist()):
        expected[:, c] = x[:, j]
    assert torch.equal(y, expected)
