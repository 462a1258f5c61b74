"""The school: the KDP loop in which the teacher teaches a student that is made sparse.

This file reads like ``shared/DESIGN.md`` section 2. Per iteration:

1. the policy reads the smoothed signals and gives the weights a_out, a_l, r_l;
2. teacher forward (no grad) and student forward, both with feature hooks;
3. loss = CE + a_out * KD_logit + sum_l a_l * KD_feat_l; backward. Every
   ``signals_interval`` iterations the CE and KD gradients are taken
   separately to measure distillability, and their sum is the update;
4. the ADMM pull sum_l (r_l / 2) ||W_l - Z_l + U_l||^2 adds its (analytic)
   gradient; SGD step;
5. every ``admm_interval`` iterations: Z-step (re-plan k_l, project), U-step;
6. every ``meta_interval`` iterations: the dean's meta step (if the policy
   learns);
7. log the per-layer series.

After KDP the student is hard-pruned (``lis.prune``) and ``finetune`` teaches
the small student with the same losses (adapters bridge the width change).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import cycle
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lis.admm import ADMMState, rows
from lis.groups import ChannelGroup
from lis.losses import Adapters, FeatureHooks, kd_feat, kd_logit, pair_layers
from lis.policy import Policy, Weights
from lis.run import progress
from lis.signals import SignalTracker, Signals, distillability, sparsity
from lis.train import evaluate

Log = Callable[[dict], None]


@dataclass
class Lesson:
    """The loss terms of one batch: logits, CE, KD_logit and the per-layer KD_feat (L,)."""

    logits: torch.Tensor
    ce: torch.Tensor
    kd_logit: torch.Tensor
    kd_feat: torch.Tensor

    def distillation(self, w: Weights) -> torch.Tensor:
        # a fixed policy's weights live on the CPU; the loss terms live where the model does
        device = self.kd_feat.device
        return w.alpha_out.to(device) * self.kd_logit + (w.alpha.to(device) * self.kd_feat).sum()


class Classroom(nn.Module):
    """The teacher, the layer pairs between student and teacher, and the adapters between them.

    ``layers`` are the student's channel-group root modules (the dean's L
    layers, in depth order); each is paired with the teacher group at the
    same relative depth. With ``features=False`` only the logits are distilled
    (KD_feat is all zeros).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: Sequence[str], teacher_layers: Sequence[str],
                 example: torch.Tensor, temperature: float, features: bool = True,
                 init_index: Optional[dict[str, torch.Tensor]] = None):
        super().__init__()
        self.teacher = [teacher]  # a list, so the teacher is not a submodule (its weights stay out of optimizers)
        self.layers = list(layers)
        self.pairs = pair_layers(self.layers, teacher_layers) if features else []
        self.temperature = temperature
        s_maps = _probe(student, [s for s, _ in self.pairs], example)
        t_maps = _probe(teacher, [t for _, t in self.pairs], example)
        self.adapters = Adapters(
            {s: s_maps[s].shape[1] for s, _ in self.pairs}, {s: t_maps[t].shape[1] for s, t in self.pairs},
            {s: s_maps[s].dim() for s, _ in self.pairs}, init_index)

    def lesson(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor,
               forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Lesson:
        """The loss terms of a batch; ``forward`` replaces ``student(x)`` (a meta step's functional
        call), the feature hooks stay on ``student``'s modules."""
        teacher = self.teacher[0]
        with torch.no_grad(), FeatureHooks(teacher, [t for _, t in self.pairs]) as t_feats:
            t_logits = teacher(x)
        with FeatureHooks(student, [s for s, _ in self.pairs]) as s_feats:
            logits = (forward or student)(x)
        feat = [logits.new_zeros(())] * len(self.layers)
        for s, t in self.pairs:
            feat[self.layers.index(s)] = kd_feat(self.adapters(s, s_feats.maps[s]), t_feats.maps[t])
        return Lesson(logits, F.cross_entropy(logits, y), kd_logit(logits, t_logits, self.temperature),
                      torch.stack(feat))


@torch.no_grad()
def _probe(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> dict[str, torch.Tensor]:
    was_training = model.training
    model.eval()
    with FeatureHooks(model, names) as feats:
        model(example)
    model.train(was_training)
    return feats.maps


@dataclass
class KDPSettings:
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    admm_interval: int
    signals_interval: int
    ema: float
    meta_interval: int


def _grad_rows(grads: dict[str, torch.Tensor], group: ChannelGroup) -> torch.Tensor:
    return torch.cat([rows(grads[name], dim) for name, dim in group.out_slices], dim=1)


def kdp(
    student: nn.Module,
    room: Classroom,
    groups: Sequence[ChannelGroup],
    admm: ADMMState,
    policy: Policy,
    train: DataLoader,
    test: DataLoader,
    device: torch.device,
    s: KDPSettings,
    log: Log,
    meta_step: Optional[Callable[..., dict]] = None,
    meta_batches: Optional[DataLoader] = None,
) -> tuple[dict, Weights]:
    """Train ``student`` by ADMM prune-plus-distill.

    Returns the last epoch's test metrics and the policy's last weights (the
    fine-tuning phase keeps them).

    ``meta_step(student, opt, room, admm, signals, batch, meta_batch, device)``
    is called every ``s.meta_interval`` iterations when given (the dean's
    ``lis.meta.MetaLearner``); it must not change the student.
    """
    named = list(student.named_parameters()) + [(f"adapters.{n}", p) for n, p in room.adapters.named_parameters()]
    names, params = [n for n, _ in named], [p for _, p in named]
    opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    total = max(s.epochs * len(train), 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    tracker = SignalTracker(len(groups), s.ema)
    meta_iter = cycle(meta_batches) if meta_step is not None else None
    log({"phase": "kdp", "iter": 0, "layer_names": [g.name for g in groups]})
    metrics, it = {}, 0
    for epoch in progress(range(s.epochs), desc="kdp"):
        student.train()
        for x, y in train:
            x, y = x.to(device), y.to(device)
            # 1. the policy reads the smoothed state
            w = policy(tracker.state()).detached()
            # 2. teacher and student forward
            lesson = room.lesson(student, x, y)
            kd = lesson.distillation(w)
            # 3. backward; on measurement iterations CE and KD separately (distillability)
            opt.zero_grad(set_to_none=True)
            measure = it % s.signals_interval == 0
            if measure:
                # a policy that does not distil still gets a distillability curve, with unit weights
                kd_signal = kd if w.distils() else lesson.kd_logit + lesson.kd_feat.sum()
                g_ce = dict(zip(names, torch.autograd.grad(lesson.ce, params, retain_graph=True,
                                                           materialize_grads=True)))
                g_kd = dict(zip(names, torch.autograd.grad(kd_signal, params, materialize_grads=True)))
                tracker.update(Signals(
                    distillability=distillability([_grad_rows(g_kd, g) for g in groups],
                                                  [_grad_rows(g_ce, g) for g in groups]),
                    sparsity=sparsity(student, groups), admm_gap=admm.gap(student),
                    keep_ratio=admm.keep_ratio(), progress=it / total,
                    ce=lesson.ce.item(), kd=kd_signal.item()))
                for n, p in zip(names, params):
                    p.grad = g_ce[n] + g_kd[n] if w.distils() else g_ce[n]
            else:
                (lesson.ce + kd).backward()
            # 4. the ADMM pull towards the sparse copy Z, then the SGD step
            admm.penalty_grad_(student, w.rho)
            opt.step()
            sched.step()
            it += 1
            # 5. Z-step and U-step
            if it % s.admm_interval == 0:
                admm.project(student)
                admm.update_duals(student)
            # 6. the dean's meta step
            meta = {}
            if meta_step is not None and it % s.meta_interval == 0:
                meta = meta_step(student, opt, room, admm, tracker.state(), (x, y), next(meta_iter), device)
            # 7. the per-layer series
            if measure or meta:
                state = tracker.state()
                log({"phase": "kdp", "iter": it, "epoch": epoch, "lr": sched.get_last_lr()[0],
                     "ce": lesson.ce.item(), "kd": kd.item(), "alpha_out": w.alpha_out.item(),
                     **state.as_lists(), "alpha": w.alpha.tolist(), "rho": w.rho.tolist(), **meta})
        metrics = evaluate(student, test, device)
        log({"phase": "kdp", "iter": it, "epoch": epoch + 1, "test_acc": metrics["acc"],
             "test_loss": metrics["loss"]})
    return metrics, policy(tracker.state()).detached()


def finetune(student: nn.Module, room: Classroom, weights: Weights, train: DataLoader, test: DataLoader,
             device: torch.device, *, epochs: int, lr: float, momentum: float, weight_decay: float,
             log: Log) -> dict:
    """Teach the pruned student with fixed weights (CE + distillation, no ADMM); last epoch's test metrics."""
    params = list(student.parameters()) + list(room.adapters.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * len(train), 1))
    metrics = evaluate(student, test, device)
    for epoch in progress(range(epochs), desc="finetune"):
        student.train()
        for x, y in train:
            x, y = x.to(device), y.to(device)
            lesson = room.lesson(student, x, y)
            loss = lesson.ce + lesson.distillation(weights) if weights.distils() else lesson.ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        metrics = evaluate(student, test, device)
        log({"phase": "finetune", "epoch": epoch + 1, "test_acc": metrics["acc"], "test_loss": metrics["loss"]})
    return metrics
