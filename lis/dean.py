"""The dean: a small meta-network that sets per-layer distillation and sparsity weights.

It reads the signals of every layer (``lis.signals.FEATURES``: distillability,
sparsity, ADMM gap, keep ratio, depth, progress, log CE, log KD) and outputs,
with one network shared across layers (no weight per layer, so a dean trained
on one model loads into another with a different number of layers):

    a_l   in [0, a_max]           feature-distillation weight, a_max * sigmoid
    r_l   in [r_min, r_max]       ADMM penalty weight, on a log scale
    a_out in [0, a_max]           logit-distillation weight, from the mean over layers

Two architectures (``DEANS``, ``meta.dean``): ``LayerwiseDean`` (default), a
global level plus a centred per-layer split that can follow the per-layer
differences of the hypergradients, and ``MLPDean``, one MLP per layer whose
update follows their sum (it moves all layers together).

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
    """The bounds and the start shared by the deans; subclasses give the pre-squash outputs (``logits``)."""

    def __init__(self, a_max: float = 2.0, r_min: float = 1e-4, r_max: float = 1.0, init_alpha: float = 1.0,
                 init_alpha_out: float = 1.0, init_rho: float = 1e-3, learn_rho: bool = True):
        super().__init__()
        self.learn_rho, self.init_rho = learn_rho, init_rho
        self.a_max, self.log_r_min, self.log_r_max = a_max, math.log(r_min), math.log(r_max)
        # with learn_rho=False the r output is unused and r_l = init_rho as given
        r_start = (math.log(init_rho) - self.log_r_min) / (self.log_r_max - self.log_r_min) if learn_rho else 0.5
        self.start = (_logit(init_alpha / a_max), _logit(r_start), _logit(init_alpha_out / a_max))

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((L, 2) pre-squash (a_l, r_l), pre-squash a_out) from the (L, len(FEATURES)) clamped features."""
        raise NotImplementedError  # pragma: no cover - interface

    def forward(self, signals: Signals) -> Weights:
        p = next(self.parameters())
        layer, out = self.logits(signals.features().to(device=p.device, dtype=p.dtype).clamp(-10.0, 10.0))
        a, r = torch.sigmoid(layer).unbind(1)
        alpha_out = self.a_max * torch.sigmoid(out).squeeze(0)
        rho = torch.exp(self.log_r_min + r * (self.log_r_max - self.log_r_min)) if self.learn_rho else \
            torch.full_like(r, self.init_rho)
        return Weights(alpha_out, self.a_max * a, rho, known_distils=True)  # sigmoids: every weight above 0


class MLPDean(Dean):
    """``meta.dean=mlp``: one MLP per layer over the raw features, a_out from the mean hidden state.

    Its zero-initialised heads see hidden states that differ little between layers, so its update follows
    the sum of the per-layer hypergradients (the common mode): in practice one global schedule."""

    def __init__(self, hidden: int = 32, **bounds):
        super().__init__(**bounds)
        self.body = nn.Sequential(nn.Linear(len(FEATURES), hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.layer_head = nn.Linear(hidden, 2)  # (a_l, r_l) before squashing
        self.out_head = nn.Linear(hidden, 1)  # a_out before squashing
        _zero_heads(self.layer_head, self.out_head, self.start)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.layer_head(h), self.out_head(h.mean(0))


class LayerwiseDean(Dean):
    """``meta.dean=layerwise`` (default): a global level plus a per-layer split, both on the logit scale.

    Each layer's own input is its per-layer features z-scored across the layers (what sets a layer apart,
    at unit size however close the layers' raw values are) and a layer embedding that is a function of
    relative depth, so it exists for any L: hat functions on ``KNOTS`` evenly spaced knots over [0, 1]
    (one-hot for a layer on a knot, as every layer is for L = 2, 3, 4, 7; a layer between knots
    interpolates its two neighbours). One shared MLP reads the raw features and the layer's own input; then

        (a_l, r_l) before squashing = global_head(mean_l h_l) + split_l
        split_l = split_head(h_l, own_l) - mean_m split_head(h_m, own_m)     (sums to 0 over layers)
        a_out before squashing      = global_head's third output

    The split is centred, so the global level follows the sum of the per-layer hypergradients and the split
    their differences; neither masks the other. Adam moves every weight by about its learning rate a step
    whatever the gradient's size, so the embedding enters at ``EMBED_SCALE`` for its few weights to move a
    layer's split as fast as the hidden state's many move all layers together. Both heads start at zero
    weight, the global head's bias at the fixed constants."""

    KNOTS = 7
    EMBED_SCALE = 3.0
    PER_LAYER = 4  # the first features are per layer (distillability, sparsity, ADMM gap, keep ratio)

    def __init__(self, hidden: int = 32, **bounds):
        super().__init__(**bounds)
        n_own = self.PER_LAYER + self.KNOTS
        self.body = nn.Sequential(nn.Linear(len(FEATURES) + n_own, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                  nn.Tanh())
        self.global_head = nn.Linear(hidden, 3)  # (a, r, a_out) before squashing, shared by every layer
        self.split_head = nn.Linear(hidden + n_own, 2)  # per-layer (a_l, r_l) offsets
        _zero_heads(self.split_head, self.global_head, (0.0, 0.0) + self.start)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mine = x[:, :self.PER_LAYER]
        # a floor on the spread: differences far below 0.01 (measurement noise) are not blown up to unit size
        z = (mine - mine.mean(0)) / mine.std(0, unbiased=False).clamp_min(1e-2)
        depth = torch.arange(len(x), dtype=x.dtype, device=x.device)[:, None] / max(len(x) - 1, 1)
        knots = torch.linspace(0, 1, self.KNOTS, dtype=x.dtype, device=x.device)
        embed = (1 - (depth - knots).abs() * (self.KNOTS - 1)).clamp_min(0)
        own = torch.cat([z, self.EMBED_SCALE * embed], 1)
        h = self.body(torch.cat([x, own], 1))
        split = self.split_head(torch.cat([h, own], 1))
        level = self.global_head(h.mean(0))
        return level[:2] + split - split.mean(0), level[2:]


def _zero_heads(layer_head: nn.Linear, out_head: nn.Linear, biases: tuple[float, ...]) -> None:
    """Zero both heads' weights and set their biases to ``biases`` (layer head's, then out head's), so a fresh
    dean outputs exactly the fixed-weight constants."""
    with torch.no_grad():
        for head in (layer_head, out_head):
            head.weight.zero_()
        n = layer_head.bias.numel()
        layer_head.bias.copy_(torch.tensor(biases[:n]))
        out_head.bias.copy_(torch.tensor(biases[n:]))


DEANS = {"layerwise": LayerwiseDean, "mlp": MLPDean}


def create_dean(checkpoint: Optional[str] = None, kind: str = "layerwise", **kw) -> Dean:
    """A fresh dean of architecture ``kind`` (``DEANS``; ``kw``: see ``Dean``), or one loaded from a run's
    ``dean.pt``."""
    dean = DEANS[kind](**kw)
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
