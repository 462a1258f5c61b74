"""The 1-D CIFAR ResNets (lis/models/resnet_cifar.py with dim=1): sizes against a hand count, the residual
streams as channel groups, and distillation between a teacher and its hard-pruned student.

Groups, hard prune and the cost model are also checked for resnet20_1d and resnet56_1d with every other
architecture of tests/archs.py (tests/test_groups.py, tests/test_prune.py)."""


import pytest
import torch
from torch import nn

import lis.models
from lis.groups import find_groups
from lis.measure import count_macs, count_params
from lis.prune import hard_prune, mask_
from lis.school import Classroom

from test_groups import by_param
from test_prune import random_masks, randomize


def hand_count(depth: int, length: int = 40, num_classes: int = 10) -> tuple[int, int]:
    """(params, MACs per sample) of a 1-D CIFAR ResNet, layer by layer: a conv of c_in -> c_out with kernel k
    owns c_in * c_out * k weights and costs that many MACs at each of its output positions; BatchNorm owns 2
    per channel and costs nothing; stride 2 halves the length."""
    n = (depth - 2) // 6
    params, macs = 0, 0

    def conv(c_in, c_out, k, positions):
        nonlocal params, macs
        params += c_in * c_out * k + 2 * c_out  # the conv and its BatchNorm
        macs += c_in * c_out * k * positions

    conv(1, 16, 3, length)
    for c_in, c, stride in ((16, 16, 1), (16, 32, 2), (32, 64, 2)):
        length //= stride
        for i in range(n):
            conv(c_in if i == 0 else c, c, 3, length)
            conv(c, c, 3, length)
            if i == 0 and stride == 2:
                conv(c_in, c, 1, length)  # the 1x1 downsampling shortcut
    params += 64 * num_classes + num_classes
    macs += 64 * num_classes
    return params, macs


@pytest.mark.parametrize("depth", [20, 32, 56])
def test_params_and_macs_match_a_hand_count(depth):
    """Bug caught: a 2-D layer left in the 1-D net, a missing stride or shortcut, a stage of the wrong width."""
    model = lis.models.create(f"resnet{depth}_1d", num_classes=10)
    params, macs = hand_count(depth)
    assert count_params(model) == params and count_macs(model, (1, 40)) == macs
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules())
    assert sum(isinstance(m, nn.Conv1d) for m in model.modules()) == depth - 1 + 2  # + 2 shortcuts


def test_resnet56_1d_residual_streams_couple_stem_shortcut_and_every_conv2():
    """As for the 2-D ResNet-56: one group per stage's stream, one per block's inner conv."""
    model = lis.models.create("resnet56_1d", num_classes=10)
    groups = find_groups(model, torch.randn(1, 1, 40))
    owner = by_param(groups)
    stage1 = owner["conv1.weight"]
    assert stage1.name == "conv1" and stage1.num_channels == 16
    assert {f"layer1.{i}.conv2.weight" for i in range(9)} | {"bn1.weight"} <= {n for n, _ in stage1.out_slices}
    stage3 = owner["layer3.0.shortcut.0.weight"]
    assert stage3.name == "layer3.0.conv2" and stage3.num_channels == 64
    assert all(owner[f"layer3.{i}.conv2.weight"] is stage3 for i in range(9))
    assert all(owner[f"layer{s}.{i}.conv1.weight"].name == f"layer{s}.{i}.conv1" for s in (1, 2, 3) for i in range(9))
    assert len(groups) == 27 + 3


def test_a_hard_pruned_student_of_a_masked_teacher_distils_to_zero_through_its_adapters():
    """The distillation pairs of a 1-D ResNet: the student is the hard-pruned teacher, its adapters start as the
    kept channels (what fine-tuning does), so against the teacher with the same channels zeroed every layer's
    KD_feat and KD_logit are zero. Bugs caught: a 2-D adapter on 1-D maps, pairs at the wrong depth, kept
    channels mapped to the wrong teacher channels."""
    torch.manual_seed(0)
    teacher = randomize(lis.models.create("resnet20_1d", 10)).eval()
    example = torch.zeros(2, 1, 40)
    groups = find_groups(teacher, example)
    masks = random_masks(groups, torch.Generator().manual_seed(0))
    student = hard_prune(teacher, groups, masks, example).eval()
    mask_(teacher, groups, masks)
    names = [g.name for g in groups]
    keep_index = {g.name: masks[g.name].nonzero().flatten() for g in groups}
    x, y = torch.randn(8, 1, 40), torch.randint(0, 10, (8,))
    for feature_loss in ("maps", "attention"):
        room = Classroom(teacher, student, names, names, example, 4.0, init_index=keep_index,
                         feature_loss=feature_loss)
        assert room.pairs == list(zip(names, names))
        assert all(isinstance(m, nn.Conv1d) for m in room.adapters.maps.values()) and len(room.adapters.maps) == 12
        lesson = room.lesson(student, x, y)
        assert lesson.kd_feat.shape == (12,) and lesson.kd_feat.abs().max() < 1e-5
        assert lesson.kd_logit.abs() < 1e-5
        # where a layer lost channels, adapters that start at random are far from the teacher: the check can fail
        random_room = Classroom(teacher, student, names, names, example, 4.0, feature_loss=feature_loss)
        lost = torch.tensor([not masks[n].all() for n in names])
        assert lost.any() and (random_room.lesson(student, x, y).kd_feat[lost] > 1e-4).all()
