"""Policies: where the per-layer distillation and sparsity weights come from.

Every policy answers the same question, state -> weights:

    a_out  weight of the logit distillation KD_logit
    a_l    weight of layer l's feature distillation KD_feat_l
    r_l    ADMM penalty weight of layer l

The KDP loop calls ``policy(signals)`` and never asks which policy it runs;
the dean (``lis.dean``) is one more policy whose weights are meta-learned.
A new fixed-weight baseline is a few lines here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from lis.errors import LISError
from lis.signals import Signals


@dataclass
class Weights:
    alpha_out: torch.Tensor  #: scalar a_out
    alpha: torch.Tensor  #: (L,) a_l
    rho: torch.Tensor  #: (L,) r_l
    #: whether they distil, when the policy knows without looking at the tensors (no host sync); None: look
    known_distils: Optional[bool] = None

    def detached(self) -> "Weights":
        return Weights(self.alpha_out.detach(), self.alpha.detach(), self.rho.detach(), self.known_distils)

    def to(self, device: torch.device) -> "Weights":
        return Weights(self.alpha_out.to(device), self.alpha.to(device), self.rho.to(device), self.known_distils)

    def distils(self) -> bool:
        """Whether any distillation weight is non-zero (a teacher is used at all)."""
        if self.known_distils is not None:
            return self.known_distils
        return bool(torch.cat([self.alpha_out.detach().reshape(1), self.alpha.detach()]).gt(0).any())


class Policy(nn.Module):
    """Maps the signals of L layers to ``Weights``; subclasses implement ``forward``."""

    def forward(self, signals: Signals) -> Weights:  # pragma: no cover - interface
        raise NotImplementedError


class FixedPolicy(Policy):
    """Constant weights: the paper's fixed-weight setting (and, with zeros, its ablations). ``alpha`` and ``rho``
    are one number for every layer or a sequence of one number per layer (channel group), in depth order."""

    def __init__(self, alpha_out: float, alpha: float | Sequence[float], rho: float | Sequence[float]):
        super().__init__()
        self.alpha_out = float(alpha_out)
        per_layer = [alpha] if isinstance(alpha, (int, float)) else alpha
        self.teaches = self.alpha_out > 0 or any(v > 0 for v in per_layer)  # known here: no sync per iteration
        for name, value in (("alpha", alpha), ("rho", rho)):
            if isinstance(value, (int, float)):
                setattr(self, name, float(value))
            else:  # a buffer: it moves with the policy to the run's device, so forward copies nothing
                self.register_buffer(name, torch.tensor([float(v) for v in value]), persistent=False)

    def forward(self, signals: Signals) -> Weights:
        n, device = len(signals.distillability), signals.distillability.device
        return Weights(torch.tensor(self.alpha_out, device=device), _per_layer(self.alpha, n, device),
                       _per_layer(self.rho, n, device), self.teaches)


def _per_layer(value: float | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """(n,) weights on ``device`` from one number for all layers or a tensor of one per layer."""
    if isinstance(value, float):
        return torch.full((n,), value, device=device)
    if len(value) != n:
        raise ValueError(f"{len(value)} per-layer weights for {n} layers")
    return value.to(device)


def fixed(alpha_out: float, alpha: float | Sequence[float], rho: float | Sequence[float]) -> FixedPolicy:
    return FixedPolicy(alpha_out, alpha, rho)


def prune_only(alpha_out: float, alpha: float | Sequence[float], rho: float | Sequence[float]) -> FixedPolicy:
    """ADMM pruning with no teacher: every distillation weight is 0."""
    return FixedPolicy(0.0, 0.0, rho)


def kd_only(alpha_out: float, alpha: float | Sequence[float], rho: float | Sequence[float]) -> FixedPolicy:
    """Distillation with no ADMM pull (r = 0); the student is magnitude-pruned after KDP."""
    return FixedPolicy(alpha_out, alpha, 0.0)


def scratch(alpha_out: float, alpha: float | Sequence[float], rho: float | Sequence[float]) -> FixedPolicy:
    """No teacher at all: the pruned architecture is trained from random init with cross-entropy."""
    return FixedPolicy(0.0, 0.0, 0.0)


# l1_prune and tp_group_norm (lis.baselines) prune without KDP, then fine-tune with these weights
PRESETS = {"fixed": fixed, "prune_only": prune_only, "kd_only": kd_only, "l1_prune": kd_only,
           "scratch": scratch, "tp_group_norm": kd_only}


def create_policy(name: str, *, alpha_out: float, alpha: float | Sequence[float],
                  rho: float | Sequence[float]) -> Policy:
    """A fixed-weight policy by name (the dean is built by ``lis.dean``); see ``PRESETS``. ``alpha`` and ``rho``:
    one number for every layer, or one per layer."""
    if name not in PRESETS:
        raise LISError(f"policy.name={name!r} is not a fixed-weight policy: use one of {', '.join(PRESETS)} or dean")
    return PRESETS[name](alpha_out, alpha, rho)
