"""What the dean reads: per-layer distillability and sparsability signals.

For every channel group l (one "layer" of the dean's view):

- ``distillability`` d_l = cos(grad_{W_l} KD, grad_{W_l} CE): whether the
  teacher currently pulls layer l the same way the labels do. KD is the
  distillation part of the KDP loss with the policy's weights; when a policy
  does not distil at all (``prune_only``) it is measured with unit weights so
  the curve still exists. A zero gradient gives d_l = 0.
- ``sparsity`` s_l: fraction of channels whose group L2 norm is below
  ``eps`` (default 0.05) times the largest channel norm of the group. ADMM
  only drives the channels outside Z towards zero asymptotically, so a
  stricter threshold would read 0 until the hard prune.
- ``admm_gap`` g_l = ||W_l - Z_l|| / ||W_l||: distance to the sparse target.
- ``keep_ratio`` k_l / n_l, ``depth`` l / L, ``progress`` t / T and the
  current loss levels log CE, log KD (shared by all layers).

Distillability costs a second backward pass, so it is measured every
``signals.interval`` iterations and smoothed with an exponential moving
average (``SignalTracker``) in between; the loop uses the two gradients it
took for the measurement (CE and KD) for that iteration's update, so no third
backward is paid.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

import torch
from torch import nn

from lis.groups import ChannelGroup, channel_norms

FEATURES = ("distillability", "sparsity", "admm_gap", "keep_ratio", "depth", "progress", "log_ce", "log_kd")


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """cos(a, b) of two flattened tensors, a float64 scalar on their device (no host sync); 0 when either is
    (numerically) zero."""
    a, b = a.flatten().double(), b.flatten().double()
    na, nb = a.norm(), b.norm()
    return torch.where((na > eps) & (nb > eps), (a @ b) / (na * nb).clamp_min(eps * eps), 0.0)


def distillability(grad_kd: Sequence[torch.Tensor], grad_ce: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-layer cosine of the two gradients, each given as one tensor (e.g. group rows) per layer; float32,
    on the gradients' device."""
    return torch.stack([cosine(k, c) for k, c in zip(grad_kd, grad_ce)]).float()


@torch.no_grad()
def sparsity(model: nn.Module, groups: Sequence[ChannelGroup], eps: float = 0.05) -> torch.Tensor:
    """Per-group fraction of channels whose norm is below ``eps`` * the group's largest channel norm."""
    out = []
    for g in groups:
        n = channel_norms(model, g)
        out.append((n < eps * n.max().clamp_min(1e-30)).float().mean())
    return torch.stack(out)


@dataclass
class Signals:
    """The dean's state: per-layer tensors of shape (L,) and shared scalars, all on the model's device (the
    loss levels ``ce`` and ``kd`` may be 0-dim tensors there, so measuring them needs no host sync)."""

    distillability: torch.Tensor
    sparsity: torch.Tensor
    admm_gap: torch.Tensor
    keep_ratio: torch.Tensor
    progress: float = 0.0
    ce: torch.Tensor | float = 1.0
    kd: torch.Tensor | float = 1.0

    def features(self) -> torch.Tensor:
        """(L, len(FEATURES)) float32 matrix in the order of ``FEATURES``, on the device of the signals."""
        n, device = len(self.distillability), self.distillability.device
        depth = torch.arange(n, dtype=torch.float32, device=device) / max(n - 1, 1)
        losses = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in (self.ce, self.kd)])
        shared = torch.cat([torch.full((1,), float(self.progress), device=device), (losses + 1e-8).log()])
        per_layer = torch.stack([self.distillability, self.sparsity, self.admm_gap, self.keep_ratio, depth], 1)
        return torch.cat([per_layer.float(), shared.expand(n, 3)], 1)

    def to(self, device: torch.device) -> "Signals":
        """The same signals on ``device`` (a checkpoint's are loaded on the CPU)."""
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Signals(*(move(getattr(self, f.name)) for f in fields(self)))

    def per_layer(self) -> dict[str, torch.Tensor]:
        """The (L,) signals by name (what the loop logs)."""
        return {"distillability": self.distillability, "sparsity": self.sparsity, "admm_gap": self.admm_gap,
                "keep_ratio": self.keep_ratio}


@dataclass
class SignalTracker:
    """Exponential moving average of measured signals: ``s = ema * s + (1 - ema) * new``.

    The first measurement is taken as is. ``device``: where the neutral state before it lives (the model's).
    """

    num_layers: int
    ema: float = 0.9
    current: Optional[Signals] = field(default=None)
    device: torch.device | str = "cpu"

    def update(self, new: Signals) -> Signals:
        if self.current is None:
            self.current = new
        else:
            m, old = self.ema, self.current
            mix = lambda a, b: m * a + (1 - m) * b  # noqa: E731
            self.current = Signals(
                distillability=mix(old.distillability, new.distillability),
                sparsity=mix(old.sparsity, new.sparsity),
                admm_gap=mix(old.admm_gap, new.admm_gap),
                keep_ratio=new.keep_ratio,
                progress=new.progress,
                ce=mix(old.ce, new.ce),
                kd=mix(old.kd, new.kd),
            )
        return self.current

    def state(self) -> Signals:
        """The smoothed signals (neutral zeros before the first measurement)."""
        if self.current is None:
            z = torch.zeros(self.num_layers, device=self.device)
            return Signals(z, z.clone(), z.clone(), torch.ones(self.num_layers, device=self.device))
        return self.current
