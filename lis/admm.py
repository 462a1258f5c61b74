"""ADMM state of the KDP step: the sparse copy Z, the scaled dual U, and the keep budget.

For every channel group l (see ``lis.groups``) with weights W_l (the group's
out-channel slices, one row per channel):

    Z-step:  Z_l = Proj_{S_l}(W_l + U_l)   keep the k_l rows of largest L2 norm, zero the rest
    U-step:  U_l = U_l + W_l - Z_l
    penalty: sum_l (r_l / 2) * ||W_l - Z_l + U_l||^2

U is the scaled dual y_l / r_l: when the policy changes r_l, ``rescale_duals()``
sets U_l <- U_l * r_old / r_new, so the dual force y_l stays what it was.

``ADMMState.project()`` and ``update_duals()`` are called by the loop every
``admm.interval`` iterations; ``penalty_grad_()`` adds the penalty's gradient
to ``.grad`` (it is analytic, so the loop needs no extra backward for it) and
``penalty()`` gives the differentiable penalty for the meta step.

The k_l come from one global budget (``plan_keep``): all channels are ranked
by their norm divided by the largest norm of their group, and the lowest are
given up until the cost model says the target reductions of MACs and/or
parameters are met, never going below ``min_keep_ratio`` of a group.
Groups whose channels shrink fastest (high sparsability) thus give up more.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from lis.errors import LISError
from lis.groups import ChannelGroup, CostModel, group_tensors


def rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """View ``t`` as (channels, rest) with the channel dimension first."""
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)


def group_rows(params: Mapping[str, torch.Tensor], group: ChannelGroup) -> torch.Tensor:
    """W_l as one (channels, D) matrix: every out-slice of channel c in row c (differentiable).

    ``params`` maps parameter names to tensors: ``dict(model.named_parameters())``
    or the fast weights of a meta step.
    """
    return torch.cat([rows(params[name], dim) for name, dim in group.out_slices], dim=1)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def project_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean projection onto 'at most k non-zero rows': (projected x, kept-row mask).

    Ties are broken by the lower row index so the result is deterministic.
    """
    norms = x.norm(dim=1)
    order = torch.argsort(-norms, stable=True)
    keep = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    keep[order[:k]] = True
    return x * keep.unsqueeze(1), keep


Budget = tuple[str, Callable[[dict[str, int]], int], float]  # (name, cost of a keep plan, target reduction)


def plan_keep(norms: dict[str, torch.Tensor], budgets: Sequence[Budget], min_keep_ratio: float) -> dict[str, int]:
    """Channels to keep per group so that every budget holds: ``cost(keep) <= (1 - target) * cost(all)``.

    ``norms[g]`` are group g's channel norms; channels are given up in the
    global order of norm / max norm of their group, lowest first, skipping
    groups at their floor ceil(min_keep_ratio * n_g) (at least 1). Each cost
    must not increase when channels are removed; the least removal that meets
    all budgets is found by bisection. Raises ``LISError`` when even every
    group at its floor misses a budget.
    """
    full = {g: len(n) for g, n in norms.items()}
    floor = {g: max(1, math.ceil(min_keep_ratio * n)) for g, n in full.items()}
    limits = [(name, cost, (1.0 - target) * cost(full), target) for name, cost, target in budgets]
    entries = []
    for g, n in norms.items():
        scaled = (n / n.max().clamp_min(1e-12)).tolist()
        # a group gives up its weakest channels first: only those above its floor are candidates
        entries += [(s, g) for s in sorted(scaled)[: full[g] - floor[g]]]
    entries.sort(key=lambda e: e[0])

    def keep_after(m: int) -> dict[str, int]:
        keep = dict(full)
        for _, g in entries[:m]:
            keep[g] -= 1
        return keep

    def fits(keep: dict[str, int]) -> bool:
        return all(cost(keep) <= limit for _, cost, limit, _ in limits)

    smallest = keep_after(len(entries))
    for name, cost, limit, target in limits:
        if cost(smallest) > limit:
            raise LISError(
                f"the pruning budget cannot be met: with prune.min_keep_ratio={min_keep_ratio} at most "
                f"{1 - cost(smallest) / cost(full):.1%} of the {name} can be removed, not the target "
                f"{target:.1%}; lower prune.min_keep_ratio or prune.target_{name}_reduction"
            )
    lo, hi = 0, len(entries)  # invariant: keep_after(hi) fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(keep_after(mid)):
            hi = mid
        else:
            lo = mid + 1
    return keep_after(hi)


class ADMMState:
    """Z and U of every channel group, and the current keep counts k_l."""

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], cost: CostModel,
                 budgets: dict[str, float], min_keep_ratio: float = 0.1):
        """``budgets`` maps ``"macs"`` and/or ``"params"`` to a target reduction in (0, 1)."""
        self.groups = list(groups)
        if not budgets or set(budgets) - {"macs", "params"}:
            raise ValueError(f"budgets must map 'macs' and/or 'params' to a reduction, got {budgets}")
        self.budgets = [(name, getattr(cost, name), target) for name, target in budgets.items()]
        self.min_keep_ratio = min_keep_ratio
        with torch.no_grad():
            w = {g.name: group_rows(_params(model), g) for g in self.groups}
        self.U = {name: torch.zeros_like(x) for name, x in w.items()}
        self.Z: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.keep: dict[str, int] = {}
        self.rho: Optional[torch.Tensor] = None  #: the r_l that U is scaled by (None: not set yet)
        self._pull: tuple = (None, None)  # (Z and U it was laid out from, the layout): see _pull_layout
        self.project(model)

    @torch.no_grad()
    def project(self, model: nn.Module) -> None:
        """Z-step: re-plan k_l from the current norms of W + U, then Z = Proj(W + U)."""
        params = _params(model)
        v = {g.name: group_rows(params, g) + self.U[g.name] for g in self.groups}
        self.keep = plan_keep({n: x.norm(dim=1) for n, x in v.items()}, self.budgets, self.min_keep_ratio)
        for name, x in v.items():
            self.Z[name], self.masks[name] = project_rows(x, self.keep[name])

    @torch.no_grad()
    def update_duals(self, model: nn.Module) -> None:
        """U-step: U = U + W - Z."""
        params = _params(model)
        for g in self.groups:
            self.U[g.name] += group_rows(params, g) - self.Z[g.name]

    @torch.no_grad()
    def rescale_duals(self, rho: torch.Tensor) -> None:
        """Scale U to the policy's new r_l: U_l <- U_l * r_old / r_new, keeping y_l = r_l U_l. The first call
        only records r; a layer whose old or new r_l is 0 (no ADMM pull, y_l = 0) keeps its U. On the device,
        without a host sync."""
        rho = rho.detach().to(self._device(), torch.float64)
        if self.rho is not None:
            old, laid_out = self.rho, self._pull[0] == self._version()
            factor = torch.where((old > 0) & (rho > 0), old / rho.where(rho > 0, 1.0), 1.0)
            factor = factor.to(next(iter(self.U.values())).dtype)
            torch._foreach_mul_([self.U[g.name] for g in self.groups], list(factor.unbind()))
            if laid_out:  # the pull's copy of U alike, rather than laid out again at every change of r
                _, (_, _, u, group_of) = self._pull
                torch._foreach_mul_(u, list(factor[group_of].unbind()))
                self._pull = (self._version(), self._pull[1])
        self.rho = rho

    def penalty(self, params: Mapping[str, torch.Tensor], rho: torch.Tensor) -> torch.Tensor:
        """sum_l (rho_l / 2) ||W_l - Z_l + U_l||^2, differentiable in W and rho (``params``: name -> tensor)."""
        terms = [(group_rows(params, g) - self.Z[g.name] + self.U[g.name]).pow(2).sum() for g in self.groups]
        return (rho * torch.stack(terms)).sum() / 2

    @torch.no_grad()
    def penalty_grad_(self, model: nn.Module, rho: torch.Tensor) -> None:
        """Add d penalty / dW = rho_l (W_l - Z_l + U_l) to the ``.grad`` of every group tensor.

        A few multi-tensor (``torch._foreach_*``) operations for all tensors, no host sync: Z and U are laid
        out in the tensors' own shapes once per Z- or U-step."""
        tensors, z, u, group_of = self._pull_layout(model)
        steps = torch._foreach_sub(tensors, z)
        torch._foreach_add_(steps, u)
        torch._foreach_mul_(steps, list(rho[group_of].unbind()))
        for t in tensors:
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        torch._foreach_add_([t.grad for t in tensors], steps)

    def _version(self) -> tuple:
        """Which Z and U tensors there are and how often each was modified in place."""
        return tuple((id(t), t._version) for part in (self.Z, self.U) for t in part.values())

    def _pull_layout(self, model: nn.Module) -> tuple[list, list, list, torch.Tensor]:
        """(every group tensor of ``model``, Z_l and U_l sliced and shaped like it, its group's index), laid
        out again when Z or U has changed (replaced or modified in place) other than by ``rescale_duals``."""
        if self._pull[0] != self._version():
            tensors, z, u, group_of = [], [], [], []
            for i, g in enumerate(self.groups):
                offset = 0
                for t, d in group_tensors(model, g):
                    width = rows(t, d).shape[1]
                    for laid_out, rows_of in ((z, self.Z[g.name]), (u, self.U[g.name])):
                        part = rows_of[:, offset:offset + width].reshape(t.movedim(d, 0).shape).movedim(0, d)
                        laid_out.append(torch.empty_like(t).copy_(part))  # in t's memory layout
                    tensors.append(t)
                    group_of.append(i)
                    offset += width
            self._pull = (self._version(), (tensors, z, u, torch.tensor(group_of, device=self._device())))
        return self._pull[1]

    @torch.no_grad()
    def gap(self, model: nn.Module) -> torch.Tensor:
        """Per-group ADMM gap ||W_l - Z_l|| / ||W_l|| (0: W already has the sparse structure)."""
        out, params = [], _params(model)
        for g in self.groups:
            w = group_rows(params, g)
            out.append((w - self.Z[g.name]).norm() / w.norm().clamp_min(1e-12))
        return torch.stack(out)

    def keep_ratio(self) -> torch.Tensor:
        """Per-group target keep ratio k_l / n_l, on the device of Z."""
        return torch.tensor([self.keep[g.name] / g.num_channels for g in self.groups], device=self._device())

    def _device(self) -> torch.device:
        return next(iter(self.U.values())).device

    def state_dict(self) -> dict:
        """A snapshot (copies) of Z, U, the masks and the keep counts."""
        clone = lambda d: {k: v.clone() for k, v in d.items()}  # noqa: E731
        return {"Z": clone(self.Z), "U": clone(self.U), "masks": clone(self.masks), "keep": dict(self.keep),
                "rho": self.rho}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``, onto this state's device (a checkpoint is loaded on the CPU)."""
        move = lambda d: {k: v.to(self._device()) for k, v in d.items()}  # noqa: E731
        self.Z, self.U, self.masks = move(state["Z"]), move(state["U"]), move(state["masks"])
        self.keep = dict(state["keep"])
        rho = state.get("rho")
        self.rho = None if rho is None else rho.to(self._device())
