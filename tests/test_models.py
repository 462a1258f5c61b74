"""The model zoo: every registered model builds and runs (timm style), and the
literature's networks have the literature's size."""

import pytest
import torch
from torch import nn

from lis import models
from lis.errors import LISError
from lis.measure import count_macs, count_params


def _classifier(model: nn.Module) -> nn.Module:
    return getattr(model, "fc", None) or model.classifier


@pytest.mark.parametrize("name", models.names())
def test_registered_model_runs_and_ends_in_linear(name):
    torch.manual_seed(0)
    model = models.create(name, num_classes=7)
    out = model(torch.randn(2, *models.input_shape(name)))
    assert out.shape == (2, 7)
    head = _classifier(model)
    assert isinstance(head, nn.Linear) and head.out_features == 7
    assert head is [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@pytest.mark.parametrize("name, params, macs", [("resnet56", 0.85e6, 125e6), ("vgg16", 14.7e6, 313e6)])
def test_size_matches_literature(name, params, macs):
    model = models.create(name, num_classes=10)
    assert count_params(model) == pytest.approx(params, rel=0.02)
    assert count_macs(model, models.input_shape(name)) == pytest.approx(macs, rel=0.02)


@pytest.mark.parametrize("name, params", [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet110", 1.7e6)])
def test_resnet_params_match_literature(name, params):
    assert count_params(models.create(name, num_classes=10)) == pytest.approx(params, rel=0.03)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_torchvision_model(name):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10).eval()
    assert models.input_shape(name) == (3, 224, 224)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize("name, suggestion", [("resnet57", "'resnet56'"), ("vgg_16", "'vgg16'"),
                                              ("torchvision:resnt18", "'torchvision:resnet18'")])
def test_unknown_name_suggests_closest(name, suggestion):
    with pytest.raises(LISError, match=suggestion) as info:
        models.create(name, num_classes=10)
    assert "names()" in str(info.value) or "list_models()" in str(info.value)
    if not name.startswith("torchvision:"):
        with pytest.raises(LISError, match=suggestion):
            models.input_shape(name)
