"""Baselines that do not run the KDP phase (docs/design.md section 5), at the same budget and total epochs.

The KDP-based baselines are policies (``lis.policy``: ``fixed``,
``prune_only``, ``kd_only``) and run the same loop as the dean. The ones here
get their pruned student another way and then spend the KDP epochs plus the
fine-tuning epochs on fine-tuning, so every method trains as long:

- ``l1_prune``: one-shot L1-norm filter pruning of the teacher (Li et al.,
  "Pruning Filters for Efficient ConvNets", 2017) to the budget, with the
  same global ranking of normalised norms and floor as the ADMM plan, then
  fine-tuning with distillation;
- ``scratch``: the architecture ``l1_prune`` finds, re-initialised at random
  and trained with cross-entropy only (no teacher);
- ``tp_group_norm``: Torch-Pruning's own group-norm sparse training
  (``GroupNormPruner.regularize`` in an ordinary training loop), pruned with
  its own global group ranking at the smallest pruning ratio (bisected) whose
  measured MACs/params meet the budget, then the same distillation fine-tuning.
  Where the global ranking cannot meet the budget (it keeps whole layers whose
  norms rank high while the others reach the per-layer cap), Torch-Pruning's
  local mode, the same ratio in every layer, is bisected instead.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader

from lis import dist
from lis.admm import ADMMState, plan_keep
from lis.errors import LISError
from lis.groups import ChannelGroup, group_tensors
from lis.measure import count_macs, count_params
from lis.run import progress
from lis.train import Precision

ONE_SHOT = ("l1_prune", "scratch")
MAX_RATIO = 0.95  #: tp_group_norm's largest pruning ratio (Torch-Pruning's max_pruning_ratio)
LADDER = 19  #: tp_group_norm tries the ratios MAX_RATIO * k / LADDER, k = 1.., before bisecting below the first that fits
EXTERNAL = ("tp_group_norm",)


@torch.no_grad()
def l1_norms(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Sum of absolute values of each channel's out-slices (the filter L1 norm of Li et al.)."""
    return sum(t.detach().abs().movedim(d, 0).reshape(group.num_channels, -1).sum(1)
               for t, d in group_tensors(model, group))


def l1_masks(model: nn.Module, groups: Sequence[ChannelGroup], admm: ADMMState) -> dict[str, torch.Tensor]:
    """Keep masks of the largest-L1 channels, at the budget and floor of ``admm``."""
    norms = {g.name: l1_norms(model, g) for g in groups}
    keep = plan_keep(norms, admm.budgets, admm.min_keep_ratio)
    masks = {}
    for g in groups:
        mask = torch.zeros(g.num_channels, dtype=torch.bool)
        mask[torch.argsort(-norms[g.name], stable=True)[: keep[g.name]]] = True
        masks[g.name] = mask
    return masks


def reinit_(model: nn.Module) -> None:
    """Random initialisation of every layer that has one (BatchNorm included)."""
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def tp_group_norm(model: nn.Module, example: torch.Tensor, budgets: dict[str, float], train: DataLoader,
                  device: torch.device, *, epochs: int, lr: float, momentum: float, weight_decay: float,
                  reg: float = 5e-4, steps: int = 30, precision: Optional[Precision] = None) -> nn.Module:
    """Torch-Pruning's group-norm sparse training, then its global pruning at the budget.

    ``model`` is trained (its forward passes in ``precision``), and a pruned copy returned. The pruner ranks
    channels globally and removes a fraction (its pruning ratio) of them; the
    smallest ratio whose measured MACs and params meet every budget is found
    by ``steps`` bisection steps, so the cut is as close to the budget as the
    other methods'. Global ranking first; where no ratio meets a budget (whole layers kept while the rest
    reach ``MAX_RATIO``), the same ratio in every layer (Torch-Pruning's local mode). ``LISError`` when
    both miss it.
    """

    def pruner(m: nn.Module, ratio: float, global_pruning: bool = True) -> tp.pruner.GroupNormPruner:
        classifier = [c for c in m.modules() if isinstance(c, nn.Linear)][-1:]
        return tp.pruner.GroupNormPruner(
            m, example, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=reg,
            global_pruning=global_pruning, pruning_ratio=ratio, max_pruning_ratio=MAX_RATIO, iterative_steps=1,
            ignored_layers=classifier)

    precision = precision or Precision()
    precision.prepare(model)
    sparse = pruner(model, 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * len(train), 1))
    for _ in progress(range(epochs), desc="tp_group_norm"):
        model.train()
        for x, y in train:
            x, y = precision.inputs(x, device), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with precision.autocast(device):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            dist.average_([p.grad for p in model.parameters() if p.grad is not None])  # one model under torchrun
            sparse.regularize(model)
            opt.step()
            sched.step()
    shape = tuple(example.shape[1:])
    measure = {"macs": lambda m: count_macs(m, shape), "params": count_params}
    full = {k: measure[k](model) for k in budgets}
    model.eval()

    def pruned(ratio: float, global_pruning: bool) -> tuple[nn.Module, bool]:
        small = copy.deepcopy(model)
        pruner(small, ratio, global_pruning).step()
        return small, all(measure[k](small) <= (1 - t) * full[k] for k, t in budgets.items())

    # the smallest ratio on a ladder that fits, then bisection below it. A ladder, not the largest ratio alone:
    # the cut is not monotone near the per-layer cap (bench, 95% of MACs: ratio 0.8 cut 96%, 0.95 only 91%)
    ladder = [MAX_RATIO * k / LADDER for k in range(1, LADDER + 1)]
    found = next(((mode, i) for mode in (True, False) for i, r in enumerate(ladder)
                  if pruned(r, mode)[1]), None)
    if found is None:
        raise LISError(f"tp_group_norm cannot reach the pruning budget: at no pruning ratio up to {MAX_RATIO}, "
                       f"ranked globally or per layer, is it met; lower prune.target_*_reduction")
    global_pruning, i = found
    best = pruned(ladder[i], global_pruning)[0]
    lo, hi = (ladder[i - 1] if i else 0.0), ladder[i]  # invariant: ratio hi fits (best), lo does not or is 0
    for _ in range(steps):
        mid = (lo + hi) / 2
        small, fits = pruned(mid, global_pruning)
        if fits:
            hi, best = mid, small
        else:
            lo = mid
    return best

