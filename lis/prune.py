"""Hard prune: zero the channels outside the kept masks, then remove them for real.

After the KDP phase the student's weights are close to Z, whose support is a
keep mask per channel group (``lis.groups``). ``hard_prune`` zeros every
channel outside the masks (``mask_``), which makes those channels' activations
exactly zero, then removes them with Torch-Pruning, so the result is a
genuinely smaller ``nn.Module`` whose outputs equal the masked model's
(docs/design.md section 2). ``keep_masks_from_norms`` gives magnitude masks for
baselines that prune without ADMM.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from lis.errors import LISError
from lis.groups import ChannelGroup, channel_norms, dependency_graph, group_tensors


@torch.no_grad()
def mask_(model: nn.Module, groups: Sequence[ChannelGroup], keep_masks: dict[str, torch.Tensor]) -> None:
    """Zero, in place, the out-slices of every channel whose ``keep_masks[group.name]`` entry is False.

    Groups missing from ``keep_masks`` are left as they are.
    """
    for g in groups:
        if g.name in keep_masks:
            drop = ~keep_masks[g.name].bool()
            for t, dim in group_tensors(model, g):
                t.index_fill_(dim, drop.nonzero().flatten().to(t.device), 0.0)


def hard_prune(model: nn.Module, groups: Sequence[ChannelGroup], keep_masks: dict[str, torch.Tensor],
               example_input: torch.Tensor) -> nn.Module:
    """A pruned copy of ``model``: only the channels in ``keep_masks`` remain (``model`` is untouched).

    ``keep_masks[g.name]`` is a bool tensor of shape (g.num_channels,), True
    for the channels to keep; groups missing from it keep everything. The
    copy's eval-mode outputs equal those of ``model`` after ``mask_``: checked on a
    random input of ``example_input``'s shape, ``LISError`` if not (a zeroed channel
    that does not give a zero activation, e.g. ``BatchNorm(affine=False)`` before a conv).
    """
    pruned = copy.deepcopy(model)
    mask_(pruned, groups, keep_masks)
    probe = torch.randn(example_input.shape, generator=torch.Generator().manual_seed(0)).to(example_input)
    expected = _eval_outputs(pruned, probe)
    dg = dependency_graph(pruned, example_input)
    modules = dict(pruned.named_modules())
    for g in groups:
        if g.name not in keep_masks:
            continue
        keep = keep_masks[g.name].bool()
        if keep.shape != (g.num_channels,) or not keep.any():
            raise ValueError(f"keep mask of group {g.name} must have shape ({g.num_channels},) "
                             f"and keep at least one channel, got {keep.tolist()}")
        removed = (~keep).nonzero().flatten().tolist()
        if removed:
            root = modules[g.name]
            dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, removed).prune()
    got = _eval_outputs(pruned, probe)
    # compared where the masked model's outputs are finite (an untrained deep net can give Inf/NaN in eval
    # mode); a non-finite output must stay where it was
    finite = torch.isfinite(expected)
    error = (got - expected).where(finite, 0.0).abs().max().item()
    if not torch.equal(finite, torch.isfinite(got)) or error > 1e-4 * (1.0 + expected.where(finite, 0.0).abs().max()):
        raise LISError(f"the hard prune changed the model's outputs (by up to {error:.3g}): a removed channel does "
                       f"not give a zero activation (e.g. BatchNorm(affine=False) between the layers), so "
                       f"removing it is not the same as zeroing it; give such layers affine BatchNorm")
    return pruned


@torch.no_grad()
def _eval_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(x)
    model.train(was_training)
    return out


def keep_masks_from_norms(model: nn.Module, groups: Sequence[ChannelGroup], keep: dict[str, int]) -> dict[str, torch.Tensor]:
    """Masks that keep the ``keep[g.name]`` channels of largest group L2 norm (ties: lower index first).

    Groups missing from ``keep`` get no mask (they keep everything).
    """
    masks = {}
    for g in groups:
        if g.name in keep:
            order = torch.argsort(-channel_norms(model, g), stable=True)
            mask = torch.zeros(g.num_channels, dtype=torch.bool)
            mask[order[:keep[g.name]]] = True
            masks[g.name] = mask
    return masks
