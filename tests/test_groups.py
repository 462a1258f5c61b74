import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lis.models
from lis.groups import ChannelGroup, CostModel, channel_norms, find_groups, group_tensors
from lis.prune import hard_prune

from archs import ARCHS  # noqa: E402
ARCH_IDS = [a[0] for a in ARCHS]


class FlattenHead(nn.Module):
    """conv-BN-ReLU (8 channels at 4x4) -> flatten -> hidden Linear(128, 16) -> ReLU -> Linear(16, 10)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class Concat(nn.Module):
    """Two conv branches concatenated into one conv (the in-channels of ``c`` are shared by two groups)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(6), nn.BatchNorm2d(4)
        self.c = nn.Conv2d(10, 5, 3, padding=1)
        self.fc = nn.Linear(5, 10)

    def forward(self, x):
        x = torch.cat([torch.relu(self.bn_a(self.a(x))), torch.relu(self.bn_b(self.b(x)))], 1)
        return self.fc(self.c(x).mean((2, 3)))


def by_param(groups: list[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {name: g for g in groups for name, _ in g.out_slices}


@pytest.fixture(scope="module", params=ARCHS, ids=ARCH_IDS)
def arch(request):
    name, shape = request.param
    torch.manual_seed(0)
    model = lis.models.create(name, num_classes=10)
    x = torch.randn(1, *shape)
    return name, model, x, find_groups(model, x)


def test_every_conv_and_bn_is_in_exactly_one_group_and_the_classifier_in_none(arch):
    _, model, _, groups = arch
    assert len({g.name for g in groups}) == len(groups)
    params = dict(model.named_parameters())
    owners = [name for g in groups for name, _ in g.out_slices]
    assert len(owners) == len(set(owners))
    expected = {f"{m}.{p}" for m, mod in model.named_modules()
                if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.modules.batchnorm._BatchNorm))
                for p, _ in mod.named_parameters(recurse=False)}
    assert set(owners) == expected  # every conv and BN of these models is prunable, nothing else is
    classifier = [m for m, mod in model.named_modules() if isinstance(mod, nn.Linear)][-1]
    assert f"{classifier}.weight" in {name for g in groups for name, *_ in g.in_dims}
    for g in groups:
        assert isinstance(dict(model.named_modules())[g.name], (nn.Conv1d, nn.Conv2d, nn.Linear))
        assert (f"{g.name}.weight", 0) in g.out_slices
        assert all(params[name].shape[dim] == g.num_channels for name, dim in g.out_slices)
        for name, dim, per_channel in g.in_dims:
            assert params[name].shape[dim] % g.num_channels == 0 and per_channel >= 1


def test_groups_come_in_model_order_and_leave_the_model_as_it_was(arch):
    _, model, x, groups = arch
    order = [n for n, _ in model.named_modules()]
    assert [g.name for g in groups] == sorted((g.name for g in groups), key=order.index)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    find_groups(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN stats untouched


def test_resnet56_residual_streams_couple_stem_shortcut_and_every_conv2():
    model = lis.models.create("resnet56", num_classes=10)
    groups = find_groups(model, torch.randn(1, 3, 32, 32))
    owner = by_param(groups)
    stage1 = owner["conv1.weight"]
    assert stage1.name == "conv1" and stage1.num_channels == 16
    assert {f"layer1.{i}.conv2.weight" for i in range(9)} | {"bn1.weight"} <= {n for n, _ in stage1.out_slices}
    assert all(owner[f"layer1.{i}.conv1.weight"] is not stage1 for i in range(9))
    stage2 = owner["layer2.0.shortcut.0.weight"]
    assert stage2.name == "layer2.0.conv2"  # the first of the stream's convs in module order
    assert all(owner[f"layer2.{i}.conv2.weight"] is stage2 for i in range(9))
    assert len(groups) == 27 + 3  # every block's conv1, and one group per stage's stream


def test_torchvision_resnet18_downsample_joins_its_stream():
    model = lis.models.create("torchvision:resnet18", num_classes=10)
    owner = by_param(find_groups(model, torch.randn(1, 3, 64, 64)))
    assert owner["layer2.0.downsample.0.weight"] is owner["layer2.1.conv2.weight"] is owner["layer2.0.conv2.weight"]
    assert owner["layer2.0.downsample.1.weight"] is owner["layer2.0.conv2.weight"]
    assert owner["layer1.0.conv2.weight"] is owner["conv1.weight"]


def test_mobilenet_v2_depthwise_conv_joins_the_pointwise_conv_before_it():
    model = lis.models.create("torchvision:mobilenet_v2", num_classes=10)
    owner = by_param(find_groups(model, torch.randn(1, 3, 64, 64)))
    pairs = [("features.0.0", "features.1.conv.0.0")] + [
        (f"features.{i}.conv.0.0", f"features.{i}.conv.1.0") for i in range(2, 18)]
    for pointwise, depthwise in pairs:
        group = owner[f"{depthwise}.weight"]
        assert owner[f"{pointwise}.weight"] is group and group.name == pointwise
        assert (f"{depthwise}.weight", 0) in group.out_slices
    # the depthwise weight [C, 1, k, k] is indexed by channel along dim 0 only
    assert not any(name.endswith("conv.1.0.weight") for g in owner.values() for name, *_ in g.in_dims)


def test_ignored_modules_and_hidden_linear_units():
    model = FlattenHead()
    groups = find_groups(model, torch.randn(2, 3, 4, 4))
    assert [g.name for g in groups] == ["conv", "fc1"]  # fc2 is the classifier
    conv, fc1 = groups
    assert conv.out_slices == (("conv.weight", 0), ("conv.bias", 0), ("bn.weight", 0), ("bn.bias", 0))
    assert conv.in_dims == (("fc1.weight", 1, 16),)  # each channel owns 4x4 flattened features
    assert fc1.out_slices == (("fc1.weight", 0), ("fc1.bias", 0)) and fc1.in_dims == (("fc2.weight", 1, 1),)
    assert [g.name for g in find_groups(model, torch.randn(2, 3, 4, 4), ignored=["fc1"])] == ["conv"]


def test_group_tensors_are_the_live_parameters(arch):
    _, model, _, groups = arch
    params = dict(model.named_parameters())
    for g in groups:
        assert [(id(t), d) for t, d in group_tensors(model, g)] == [(id(params[n]), d) for n, d in g.out_slices]


def test_channel_norms_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    nn.init.normal_(model[1].weight), nn.init.normal_(model[1].bias), nn.init.normal_(model[0].bias)
    (group,) = find_groups(model, torch.randn(1, 3, 6, 6))
    conv, bn = model[0].weight.tolist(), [model[0].bias.tolist(), model[1].weight.tolist(), model[1].bias.tolist()]
    expected = [sum(v * v for row in conv[c] for col in row for v in col) + sum(p[c] ** 2 for p in bn)
                for c in range(4)]
    norms = channel_norms(model, group)
    assert not norms.requires_grad
    torch.testing.assert_close(norms, torch.tensor(expected).sqrt())


def flop_macs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops() // 2


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_cost_model(model, x, groups, seed):
    cost = CostModel(model, groups, x)
    assert cost.macs({}) == flop_macs(model, x) and cost.params({}) == num_params(model)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        keep = {g.name: int(torch.randint(1, g.num_channels + 1, (), generator=gen)) for g in groups}
        masks = {g.name: torch.randperm(g.num_channels, generator=gen) < keep[g.name] for g in groups}
        pruned = hard_prune(model, groups, masks, x)
        assert cost.macs(keep) == flop_macs(pruned, x)
        assert cost.params(keep) == num_params(pruned)


def test_cost_model_matches_the_hard_pruned_model(arch):
    _, model, x, groups = arch
    check_cost_model(model, x, groups, seed=1)


def test_concatenated_groups_share_the_consumer_in_channels():
    groups = find_groups(Concat(), torch.randn(1, 3, 8, 8))
    assert [(g.name, g.in_dims) for g in groups] == [
        ("a", (("c.weight", 1, 1),)), ("b", (("c.weight", 1, 1),)), ("c", (("fc.weight", 1, 1),))]


@pytest.mark.parametrize("model_cls, shape", [(FlattenHead, (3, 4, 4)), (Concat, (3, 8, 8))])
def test_cost_model_with_flatten_and_concat(model_cls, shape):
    model, x = model_cls(), torch.randn(1, *shape)
    groups = find_groups(model, x)
    check_cost_model(model, x, groups, seed=2)
    assert CostModel(model, groups, x).macs({groups[0].name: 1}) < flop_macs(model, x)


def test_a_frozen_model_has_the_same_groups_and_stays_frozen():
    model = lis.models.create("mnist1d_cnn", 10)
    example = torch.zeros(2, 1, 40)
    live = find_groups(model, example)
    model.requires_grad_(False)
    assert find_groups(model, example) == live
    assert not any(p.requires_grad for p in model.parameters())
