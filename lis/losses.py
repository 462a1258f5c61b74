"""The losses of the KDP objective: cross-entropy, logit and feature distillation.

    CE(W) + a_out * KD_logit(W) + sum_l a_l * KD_feat_l(W)

- ``kd_logit``: Hinton's KL(teacher || student) at temperature tau, times
  tau^2 so its gradient scale does not depend on tau; mean over the batch.
- ``kd_feat``: per-sample L2-normalised feature maps, squared distance summed
  over features and averaged over the batch (so each term lies in [0, 4]).
  Maps of different spatial size are average-pooled to the smaller one.
- ``kd_attention`` (the default KD_feat, ``kdp.feature_loss=attention``):
  ``kd_feat`` of the attention maps mean_c F_c^2. During KDP the student
  still has the teacher's width, and ``kd_feat`` asks every channel, the ones
  ADMM is removing included, to match its teacher channel: the two terms
  fight. Attention transfer asks only where the energy is.
- Feature maps are captured with forward hooks (``FeatureHooks``) on the
  root module of each channel group (its first conv/linear, before BN), and a
  student map whose width differs from the teacher's goes through a 1x1
  ``Adapters`` convolution first.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def kd_logit(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 * KL(softmax(t / tau) || softmax(s / tau)), averaged over the batch."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


def _match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape[2:] == b.shape[2:]:
        return a, b
    size = [min(x, y) for x, y in zip(a.shape[2:], b.shape[2:])]
    pool = F.adaptive_avg_pool1d if a.dim() == 3 else F.adaptive_avg_pool2d
    return pool(a, size), pool(b, size)


def _distances(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per sample, ||s/||s|| - t/||t||||^2, each map flattened."""
    s, t = s.flatten(1), t.flatten(1)
    return (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum(1)


def kd_features(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], feature_loss: str) -> torch.Tensor:
    """KD_feat of every (student map, teacher map) pair, shape (P,) in their order: ``kd_attention``
    (``feature_loss="attention"``) or ``kd_feat`` (``"maps"``) of each pair.

    The pairs whose maps have the same shapes are computed together, on their maps concatenated along the
    batch axis: a few operators (what a GPU launches) per shape instead of per pair (ResNet-56: 30 pairs, 3
    shapes). The squares of the attention maps are one multi-tensor product, whose backward keeps nothing but
    the maps themselves (a concatenation of the maps before it would keep a copy of them all).
    """
    attention = {"attention": True, "maps": False}[feature_loss]
    matched = [_match_spatial(s, t) for s, t in pairs]
    by_shape: dict[tuple[torch.Size, torch.Size], list[int]] = {}
    for i, (s, t) in enumerate(matched):
        by_shape.setdefault((s.shape, t.shape), []).append(i)
    losses: list[Optional[torch.Tensor]] = [None] * len(pairs)
    for index in by_shape.values():
        s, t = [matched[i][0] for i in index], [matched[i][1] for i in index]
        if attention and s[0].dim() > 2:  # attention maps mean_c F_c^2; a hidden Linear layer's has no spatial axis
            s, t = torch.cat(torch._foreach_mul(s, s)).mean(1), torch.cat(torch._foreach_mul(t, t)).mean(1)
        else:
            s, t = torch.cat(s), torch.cat(t)
        for i, loss in zip(index, _distances(s, t).view(len(index), -1).mean(1).unbind()):
            losses[i] = loss
    return torch.stack(losses)


def kd_feat(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ||s/||s|| - t/||t||||^2, each map flattened per sample."""
    return kd_features([(student_map, teacher_map)], "maps")[0]


def kd_attention(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, 2017): ``kd_feat`` of the spatial attention maps
    mean_c F_c^2, which do not depend on the number or order of channels. A map with no spatial axis (a
    hidden Linear layer) has no attention map and is compared as ``kd_feat`` does."""
    return kd_features([(student_map, teacher_map)], "attention")[0]


class FeatureHooks:
    """Context manager recording the outputs of named modules on every forward.

    ``with FeatureHooks(model, names) as feats: model(x)`` leaves the maps in
    ``feats.maps[name]`` (kept in the autograd graph).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        self.maps: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._saver(n)) for n in names]

    def _saver(self, name: str):
        def hook(_module, _inputs, output):
            self.maps[name] = output
        return hook

    def __enter__(self) -> "FeatureHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def pair_layers(student_names: Sequence[str], teacher_names: Sequence[str]) -> list[tuple[str, str]]:
    """Pair each student group with the teacher group at the same relative depth.

    With identical architectures (the LIS setting) this is the identity pairing.
    """
    ns, nt = len(student_names), len(teacher_names)
    if ns == 0 or nt == 0:
        return []
    return [(s, teacher_names[round(i * (nt - 1) / max(ns - 1, 1))]) for i, s in enumerate(student_names)]


class Adapters(nn.Module):
    """1x1 convolutions mapping student feature widths to the teacher's, one per layer pair.

    ``init_index[name]``, when given, initialises the adapter of a pruned
    student as the selection of the teacher channels it kept (student
    channel j -> teacher channel index[j]); otherwise adapters start random.
    Pairs of equal width with no index get no adapter (identity).
    """

    def __init__(self, student_widths: dict[str, int], teacher_widths: dict[str, int], dims: dict[str, int],
                 init_index: Optional[dict[str, torch.Tensor]] = None):
        super().__init__()
        init_index = init_index or {}
        self.maps = nn.ModuleDict()
        for name, ws in student_widths.items():
            wt = teacher_widths[name]
            if ws == wt and name not in init_index:
                continue
            conv = (nn.Conv2d if dims[name] == 4 else nn.Conv1d)(ws, wt, kernel_size=1, bias=False)
            if name in init_index:
                with torch.no_grad():
                    conv.weight.zero_()
                    idx = init_index[name]
                    conv.weight[idx, torch.arange(ws)] = 1.0
            self.maps[self._key(name)] = conv

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        key = self._key(name)
        if key not in self.maps:
            return x
        if x.dim() == 2:  # a hidden Linear layer: treat its units as a 1x1 map
            return self.maps[key](x.unsqueeze(-1)).squeeze(-1)
        return self.maps[key](x)
