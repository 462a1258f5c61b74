"""LIS (Learning-in-School): joint distillation and ADMM filter pruning steered by a meta-learned dean.

The public surface:

- ``lis.models.create(name, num_classes)`` — the model zoo;
- ``lis.load_config(path, overrides)`` and ``lis.compress(cfg)`` — a whole run;
- ``lis.compress(teacher=net, train=..., meta=..., test=..., policy="dean", budget=0.75)`` — the same run on
  your own model and data (``lis/api.py``);
- ``lis.load_student(path)`` — a pruned student saved by a run, without its config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lis import models
from lis.config import Config, load_config
from lis.errors import LISError

__all__ = ["Config", "LISError", "compress", "load_config", "load_student", "models"]
__version__ = "0.1.0"


def compress(cfg: Config | None = None, **kw) -> Path:
    """Teacher -> KDP -> hard prune -> fine-tune -> evaluate, for a config or your own model and data
    (``teacher=``, ``train=``, ``meta=``, ``test=``, ...): see ``lis.api.compress``. Returns the run directory."""
    from lis.api import compress as _compress  # the training stack loads only when a run starts

    return _compress(cfg, **kw)


def load_student(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """Load ``student.pt`` of a run: the physically pruned ``nn.Module``, in eval mode.

    The file is a pickled module, so it needs only ``lis`` (and torchvision,
    for ``torchvision:*`` models) importable, not the run's config. Only load
    files you trust: unpickling runs code.
    """
    return torch.load(path, map_location=map_location, weights_only=False).eval()
