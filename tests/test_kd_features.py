"""KD_feat of all layer pairs at once (``lis.losses.kd_features``: the pairs of one shape concatenated along the
batch axis, issue 17) against its definition computed one pair at a time, on ResNet-56."""

import pytest
import torch
import torch.nn.functional as F

from lis import models
from lis.groups import find_groups
from lis.losses import FeatureHooks
from lis.school import Classroom


def per_pair(s: torch.Tensor, t: torch.Tensor, feature_loss: str) -> torch.Tensor:
    """docs/design.md section 2: each map (or its attention map mean_c F_c^2) L2-normalised per sample, the
    squared distance averaged over the batch."""
    assert s.shape[2:] == t.shape[2:]  # these pairs need no pooling to a common size
    if feature_loss == "attention":
        s, t = s.pow(2).mean(1), t.pow(2).mean(1)
    return (F.normalize(s.flatten(1), dim=1) - F.normalize(t.flatten(1), dim=1)).pow(2).sum(1).mean()


@pytest.mark.parametrize("student_name", ["resnet56", "resnet20"])
@pytest.mark.parametrize("feature_loss", ["attention", "maps"])
def test_the_batched_kd_feat_equals_the_per_layer_one_in_value_and_gradient(student_name, feature_loss):
    """Bug caught: a pair's loss landing on another layer (grouping by shape reorders the pairs), samples of
    two pairs mixed in one mean, or a gradient that does not reach each layer's own map. ResNet-56 teacher, a
    ResNet-56 (30 pairs, 3 shapes) or ResNet-20 student (pairs across depths, adapters where widths differ)."""
    torch.manual_seed(0)
    teacher, student = models.create("resnet56", 10).eval(), models.create(student_name, 10)
    example = torch.zeros(2, 3, 32, 32)
    room = Classroom(teacher, student, [g.name for g in find_groups(student, example)],
                     [g.name for g in find_groups(teacher, example)], example, temperature=4.0,
                     feature_loss=feature_loss)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    batched = room.lesson(student, x, y).kd_feat
    params = list(student.parameters())
    grads = torch.autograd.grad(batched.sum(), params, materialize_grads=True)  # fc: unused

    with torch.no_grad(), FeatureHooks(teacher, [t for _, t in room.pairs]) as t_feats:
        teacher(x)
    with FeatureHooks(student, [s for s, _ in room.pairs]) as s_feats:
        student(x)
    per_layer = torch.stack([per_pair(room.adapters(s, s_feats.maps[s]), t_feats.maps[t], feature_loss)
                             for s, t in room.pairs])
    assert len(room.pairs) == len(batched) and per_layer.abs().min() > 1e-4  # every layer has a real loss
    torch.testing.assert_close(batched, per_layer, rtol=0, atol=1e-6)
    for p, g, ref in zip(params, grads, torch.autograd.grad(per_layer.sum(), params, materialize_grads=True)):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
