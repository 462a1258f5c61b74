"""The model zoo: the networks LIS compresses, built by name.

Our own models are the ones the pruning literature reports on, at the input
sizes it uses: the CIFAR ResNets (``resnet20|32|56|110``) and ``vgg16``
(3x32x32), their 1-D versions ``resnet20_1d|32_1d|56_1d`` for MNIST-1D (1x40),
plus two small CNNs for the embedded CPU datasets, ``digits_cnn``
(scikit-learn digits, 1x8x8) and ``mnist1d_cnn`` (MNIST-1D, 1x40). Any
torchvision classifier is available as ``torchvision:<name>``, randomly
initialised, and ``pkg.module:build_fn`` calls a builder of your own
(``build_fn(num_classes) -> nn.Module``, see ``lis.builders``). Every model ends in a Linear classifier (attribute ``fc`` or
``classifier``), the one layer whose outputs are never pruned.

    model = lis.models.create("resnet56", num_classes=10)

A new family registers its builders with ``@register_model(input_shape)``
(timm style) and is imported at the bottom of this file.
"""

from __future__ import annotations

import difflib
from typing import Callable

import torchvision
from torch import nn

from lis.builders import import_builder, is_builder
from lis.errors import LISError

TORCHVISION_PREFIX = "torchvision:"
TORCHVISION_INPUT_SHAPE = (3, 224, 224)

_builders: dict[str, Callable[..., nn.Module]] = {}
_input_shapes: dict[str, tuple[int, ...]] = {}


def register_model(input_shape: tuple[int, ...]) -> Callable:
    """Register ``fn(num_classes, **kw) -> nn.Module`` under ``fn.__name__``.

    ``input_shape`` is the model's natural per-sample input (no batch
    dimension), e.g. ``(3, 32, 32)``; measurements and tests use it.
    """
    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _builders:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        _builders[fn.__name__] = fn
        _input_shapes[fn.__name__] = tuple(input_shape)
        return fn
    return decorator


def names() -> list[str]:
    """The registered model names, sorted (``torchvision:<name>`` are not listed)."""
    return sorted(_builders)


def create(name: str, num_classes: int, **kw) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way classifier, randomly initialised.

    ``torchvision:<name>`` builds ``torchvision.models.get_model(name,
    weights=None, num_classes=num_classes, **kw)``; other names come from the
    registry; ``pkg.module:build_fn`` imports and calls that function. ``kw`` goes to the builder unchanged.
    """
    if is_builder(name):
        model = import_builder(name, "model.name")(num_classes, **kw)
        if not isinstance(model, nn.Module):
            raise LISError(f"model.name={name} returned a {type(model).__name__}, not an nn.Module: its function "
                           f"must be build_fn(num_classes) -> nn.Module")
        return model
    if name.startswith(TORCHVISION_PREFIX):
        tv_name = name[len(TORCHVISION_PREFIX):]
        _check_known(tv_name, torchvision.models.list_models(), "torchvision.models.list_models()",
                     prefix=TORCHVISION_PREFIX)
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kw)
    _check_known(name, _builders, "lis.models.names()")
    return _builders[name](num_classes, **kw)


def input_shape(name: str) -> tuple[int, ...]:
    """The per-sample input shape of model ``name`` (no batch dimension); (3, 224, 224) for torchvision's."""
    if name.startswith(TORCHVISION_PREFIX):
        return TORCHVISION_INPUT_SHAPE
    _check_known(name, _input_shapes, "lis.models.names()")
    return _input_shapes[name]


def kaiming_init(model: nn.Module) -> None:
    """He et al. 2015 init for convs (fan_out, ReLU) and BatchNorm as identity; Linear keeps torch's default."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_known(name: str, known, where: str, prefix: str = "") -> None:
    if name in known:
        return
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.0)
    hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
    raise LISError(f"unknown model '{prefix}{name}': {hint}The known names are in {where}")


# Imported last: each family registers its builders with the decorator above.
from lis.models import resnet_cifar, small, vgg  # noqa: E402,F401
