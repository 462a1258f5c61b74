"""Models and datasets from the user's own package: ``model.name=pkg.module:build_fn`` and
``data.name=pkg.module:build_fn`` on the command line or in a config.

The module is imported as Python would import it (installed, on ``PYTHONPATH``,
or in the working directory, as with ``python -m``) and the function is
called where LIS builds a zoo model or a named dataset: a model builder is
``build_fn(num_classes) -> nn.Module``, a data builder is ``build_fn(root) ->
(train, test)``, two datasets of ``(input tensor, int label)`` samples.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from lis.errors import LISError


def is_builder(name: str) -> bool:
    """Whether a model or data name is ``pkg.module:build_fn`` rather than a name LIS knows."""
    return ":" in name and not name.startswith("torchvision:")


def import_builder(spec: str, key: str) -> Callable:
    """The function ``spec`` (``pkg.module:build_fn``) names; ``key`` is the config key, for the message."""
    module, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # as under 'python -m': a module in the working directory is found
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise LISError(f"{key}={spec} cannot be imported ({type(e).__name__}: {e}): give pkg.module:function of a "
                       f"module that is installed, on PYTHONPATH or in the working directory") from None
    if not callable(fn):
        raise LISError(f"{key}={spec} is a {type(fn).__name__}, not a function: give pkg.module:function")
    return fn
