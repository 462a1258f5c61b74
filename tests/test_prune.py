import copy

import pytest
import torch
from torch import nn

import lis.models
from lis.groups import channel_norms, find_groups
from lis.prune import hard_prune, keep_masks_from_norms, mask_

from archs import ARCHS  # noqa: E402


def randomize(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so that a zero channel is not zero by accident."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
    return model


def random_masks(groups, gen) -> dict[str, torch.Tensor]:
    masks = {}
    for g in groups:
        k = int(torch.randint(1, g.num_channels + 1, (), generator=gen))
        masks[g.name] = torch.randperm(g.num_channels, generator=gen) < k
    return masks


@pytest.mark.parametrize("name, shape", ARCHS, ids=[a[0] for a in ARCHS])
def test_hard_prune_equals_the_masked_model_and_is_smaller(name, shape):
    torch.manual_seed(0)
    model = randomize(lis.models.create(name, num_classes=10)).eval()
    x = torch.randn(4, *shape)
    groups = find_groups(model, x[:1])
    masks = random_masks(groups, torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    pruned = hard_prune(model, groups, masks, x[:1]).eval()

    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the original is untouched
    masked = copy.deepcopy(model)
    mask_(masked, groups, masks)
    with torch.no_grad():
        original, expected, actual = model(x), masked(x), pruned(x)
    assert not torch.allclose(original, expected, atol=1e-3)  # masking matters, so the check below can fail
    assert (actual - expected).abs().max() <= 1e-4
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    modules = dict(pruned.named_modules())
    for g in groups:
        assert modules[g.name].weight.shape[0] == int(masks[g.name].sum())


def test_mask_zeros_exactly_the_dropped_channels():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(),
                                    nn.Conv2d(5, 4, 3), nn.Flatten(), nn.LazyLinear(2)))
    x = torch.randn(1, 3, 8, 8)
    model(x)  # materialise the lazy Linear
    (group, _) = find_groups(model, x)
    before = copy.deepcopy(model)
    keep = torch.tensor([True, False, True, False, True])
    mask_(model, [group], {group.name: keep})
    for name in ["0.weight", "0.bias", "1.weight", "1.bias"]:
        new, old = model.get_parameter(name), before.get_parameter(name)
        assert torch.equal(new[keep], old[keep]) and not new[~keep].any()
    assert torch.equal(model[3].weight, before[3].weight)  # consumers' in-channel weights are left alone
    with torch.no_grad():
        assert not model.eval()[:3](x)[:, ~keep].any()  # the dropped channels are zero after BN and ReLU


def test_hard_prune_keeps_groups_without_a_mask_and_refuses_to_empty_one():
    model = lis.models.create("resnet20", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    groups = find_groups(model, x)
    g = groups[1]
    keep = torch.arange(g.num_channels) < 3
    pruned = hard_prune(model, groups, {g.name: keep}, x)
    modules = dict(pruned.named_modules())
    assert [modules[h.name].weight.shape[0] for h in groups] == [3 if h is g else h.num_channels for h in groups]
    with pytest.raises(ValueError):
        hard_prune(model, groups, {g.name: torch.zeros(g.num_channels, dtype=torch.bool)}, x)


def test_keep_masks_from_norms_keeps_the_k_largest():
    torch.manual_seed(0)
    model = lis.models.create("resnet20", num_classes=10)
    groups = find_groups(model, torch.randn(1, 3, 32, 32))
    gen = torch.Generator().manual_seed(0)
    keep = {g.name: int(torch.randint(1, g.num_channels + 1, (), generator=gen)) for g in groups[::2]}
    masks = keep_masks_from_norms(model, groups, keep)
    assert set(masks) == set(keep)
    for g in groups[::2]:
        mask, norms = masks[g.name], channel_norms(model, g)
        assert mask.dtype == torch.bool and int(mask.sum()) == keep[g.name]
        if not mask.all():
            assert norms[mask].min() >= norms[~mask].max()


def test_keep_masks_from_norms_breaks_ties_by_index():
    model = nn.Sequential(nn.Conv2d(1, 6, 1), nn.ReLU(), nn.Flatten(), nn.Linear(6, 2))
    nn.init.ones_(model[0].weight), nn.init.zeros_(model[0].bias)
    (group,) = find_groups(model, torch.randn(1, 1, 1, 1))
    assert keep_masks_from_norms(model, [group], {group.name: 4})[group.name].tolist() == [True] * 4 + [False] * 2
