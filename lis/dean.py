"""The dean: a small meta-network that sets per-layer distillation and sparsity weights.

It reads the signals of every layer (``lis.signals.FEATURES``: distillability,
sparsity, ADMM gap, keep ratio, depth, progress, log CE, log KD) and outputs,
with one MLP shared across layers (so a dean trained on one model can be
loaded into another with a different number of layers):

    a_l   in [0, a_max]           feature-distillation weight, a_max * sigmoid
    r_l   in [r_min, r_max]       ADMM penalty weight, on a log scale
    a_out in [0, a_max]           logit-distillation weight, from the mean over layers

Bounded by construction; inputs are clamped to [-10, 10] so finite extremes
cannot overflow into NaN. The output heads start at zero weight with biases
chosen so that a fresh dean gives exactly the fixed-weight policy's constants
(``init_alpha``, ``init_alpha_out``, ``init_rho``): the dean starts as the
baseline it is compared against, and meta-learning moves it away from there.
Starting values must lie inside the open ranges (0, a_max) and (r_min, r_max),
where the sigmoid can reach them; ``ValueError`` otherwise (the config refuses
them first: ``policy.a_max``, ``policy.r_min``, ``policy.r_max``).

With ``learn_rho=False`` r_l stays at ``init_rho`` (the tuned constant of the
fixed baselines) and the dean only sets the distillation weights: a one-step
meta objective always asks for a stronger ADMM pull (it moves W' towards Z at
once) and drives a learned r_l to r_max.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lis.errors import LISError
from lis.policy import Policy, Weights
from lis.signals import FEATURES, Signals


def _logit(p: float) -> float:
    if not 0.0 < p < 1.0:
        # the sigmoid reaches only (0, 1): clamping would start the dean at another constant, saturated
        raise ValueError(f"a fresh dean's starting value must lie inside its range, got {p:g} of it")
    return math.log(p / (1 - p))


class Dean(Policy):
    """Per-layer MLP over the signals; see the module docstring for the outputs and bounds."""

    def __init__(self, hidden: int = 32, a_max: float = 2.0, r_min: float = 1e-4, r_max: float = 1.0,
                 init_alpha: float = 1.0, init_alpha_out: float = 1.0, init_rho: float = 1e-3,
                 learn_rho: bool = True):
        super().__init__()
        self.learn_rho, self.init_rho = learn_rho, init_rho
        self.a_max, self.log_r_min, self.log_r_max = a_max, math.log(r_min), math.log(r_max)
        self.body = nn.Sequential(nn.Linear(len(FEATURES), hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.layer_head = nn.Linear(hidden, 2)  # (a_l, r_l) before squashing
        self.out_head = nn.Linear(hidden, 1)  # a_out before squashing
        with torch.no_grad():
            for head in (self.layer_head, self.out_head):
                head.weight.zero_()
            # with learn_rho=False the r head is unused and r_l = init_rho as given
            r_start = (math.log(init_rho) - self.log_r_min) / (self.log_r_max - self.log_r_min) if learn_rho else 0.5
            self.layer_head.bias.copy_(torch.tensor([_logit(init_alpha / a_max), _logit(r_start)]))
            self.out_head.bias.fill_(_logit(init_alpha_out / a_max))

    def forward(self, signals: Signals) -> Weights:
        p = next(self.parameters())
        h = self.body(signals.features().to(device=p.device, dtype=p.dtype).clamp(-10.0, 10.0))
        a, r = torch.sigmoid(self.layer_head(h)).unbind(1)
        alpha_out = self.a_max * torch.sigmoid(self.out_head(h.mean(0))).squeeze(0)
        rho = torch.exp(self.log_r_min + r * (self.log_r_max - self.log_r_min)) if self.learn_rho else \
            torch.full_like(r, self.init_rho)
        return Weights(alpha_out, self.a_max * a, rho)


def create_dean(checkpoint: Optional[str] = None, **kw) -> Dean:
    """A fresh dean (``kw``: see ``Dean``), or one loaded from a run's ``dean.pt``."""
    dean = Dean(**kw)
    if checkpoint is not None:
        path = Path(checkpoint)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            dean.load_state_dict(state)
        except FileNotFoundError:
            raise LISError(f"dean checkpoint {path} does not exist: fix policy.dean_checkpoint") from None
        except Exception as e:
            raise LISError(f"dean checkpoint {path} is not a LIS dean ({type(e).__name__}): point "
                           f"policy.dean_checkpoint at the dean.pt of a dean run") from None
    return dean
