"""The school: the KDP loop in which the teacher teaches a student that is made sparse.

This file reads like ``docs/design.md`` section 2. Per iteration:

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

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lis import dist
from lis.admm import ADMMState, rows
from lis.checkpoint import Checkpointer, set_rng_state
from lis.data import batches_from, seek
from lis.errors import NumericalFault
from lis.groups import ChannelGroup
from lis.losses import Adapters, FeatureHooks, kd_features, kd_logit, pair_layers
from lis.policy import Policy, Weights
from lis.run import progress
from lis.signals import SignalTracker, Signals, distillability, sparsity
from lis.train import Precision, evaluate

Log = Callable[[dict], None]


class MetaStep(Protocol):
    """What the KDP loop needs of a meta learner (``lis.meta.MetaLearner``)."""

    fresh_batches: int  #: training batches each call looks ahead on

    def __call__(self, student: nn.Module, opt: torch.optim.Optimizer, room: "Classroom", admm: ADMMState,
                 signals: Signals, batches, meta_batch, device: torch.device) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Lesson:
    """The loss terms of one batch: logits, CE, KD_logit and the per-layer KD_feat (L,)."""

    logits: torch.Tensor
    ce: torch.Tensor
    kd_logit: torch.Tensor
    kd_feat: torch.Tensor

    def distillation(self, w: Weights) -> torch.Tensor:
        return w.alpha_out * self.kd_logit + (w.alpha * self.kd_feat).sum()


class Classroom(nn.Module):
    """The teacher, the layer pairs between student and teacher, and the adapters between them.

    ``layers`` are the student's channel-group root modules (the dean's L
    layers, in depth order); each is paired with the teacher group at the
    same relative depth. With ``features=False`` only the logits are distilled
    (KD_feat is all zeros). ``feature_loss`` names KD_feat (``lis.losses.kd_features``).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: Sequence[str], teacher_layers: Sequence[str],
                 example: torch.Tensor, temperature: float, features: bool = True,
                 init_index: Optional[dict[str, torch.Tensor]] = None, feature_loss: str = "attention"):
        super().__init__()
        self.feature_loss = feature_loss
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
               forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, distil: bool = True) -> Lesson:
        """The loss terms of a batch; ``forward`` replaces ``student(x)`` (a meta step's functional
        call), the feature hooks stay on ``student``'s modules. With ``distil=False`` (no weight distils)
        the teacher is not run and KD_logit, KD_feat are zeros: no time spent, and no 0 * NaN."""
        if not distil:
            logits = (forward or student)(x)
            return Lesson(logits, F.cross_entropy(logits, y), logits.new_zeros(()),
                          logits.new_zeros(len(self.layers)))
        teacher = self.teacher[0]
        with torch.no_grad(), FeatureHooks(teacher, [t for _, t in self.pairs]) as t_feats:
            t_logits = teacher(x)
        with FeatureHooks(student, [s for s, _ in self.pairs]) as s_feats:
            logits = (forward or student)(x)
        # pair_layers pairs every layer, in order
        feat = kd_features([(self.adapters(s, s_feats.maps[s]), t_feats.maps[t]) for s, t in self.pairs],
                           self.feature_loss) if self.pairs else logits.new_zeros(len(self.layers))
        return Lesson(logits, F.cross_entropy(logits, y), kd_logit(logits, t_logits, self.temperature), feat)


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
    precision: Precision = field(default_factory=Precision)


def _grad_rows(grads: dict[str, torch.Tensor], group: ChannelGroup) -> torch.Tensor:
    return torch.cat([rows(grads[name], dim) for name, dim in group.out_slices], dim=1)


Checks = dict[str, tuple[torch.Tensor, Optional[Sequence[str]]]]


def guard(where: str, checks: Checks) -> None:
    """Stop with ``NumericalFault`` if a checked value holds a NaN or Inf, naming the quantity, ``where``
    (the iteration) and the layer. ``checks`` maps a quantity to its value and the names of its entries
    (None: a single value). One device sync for all of them; the search for the culprit only on a fault."""
    flat = torch.cat([v.detach().reshape(-1).float() for v, _ in checks.values()])
    if not dist.any_(not bool(torch.isfinite(flat).all())):  # processes of one run stop together
        return
    for quantity, (value, names) in checks.items():
        bad = (~torch.isfinite(value.detach().reshape(-1))).nonzero().flatten().tolist()
        if bad:
            kind = "NaN" if value.detach().reshape(-1)[bad[0]].isnan() else "Inf"
            at = "" if names is None else f" of {names[bad[0]]}"
            raise NumericalFault(f"{quantity}{at} is {kind} at {where}")
    raise NumericalFault(f"a NaN or Inf in another process at {where}")


def _grad_checks(named: Sequence[tuple[str, nn.Parameter]]) -> Checks:
    with_grad = [(n, p.grad) for n, p in named if p.grad is not None]
    return {"the gradient": (torch.stack(torch._foreach_norm([g for _, g in with_grad])), [n for n, _ in with_grad])}


def _to_host(values: dict[str, torch.Tensor]) -> dict:
    """Tensors as numbers (0-dim) or lists, in one copy to the host (one sync) for a log record."""
    flat = torch.cat([v.detach().reshape(-1).float() for v in values.values()]).tolist()
    out, offset = {}, 0
    for key, v in values.items():
        out[key] = flat[offset] if v.dim() == 0 else flat[offset:offset + v.numel()]
        offset += v.numel()
    return out


def _average_grads(module: nn.Module) -> None:
    """Under torchrun, average ``module``'s gradients over the processes (the adapters are not in DDP)."""
    dist.average_([p.grad for p in module.parameters() if p.grad is not None])


def _snapshot(phase: str, it: int, epoch: int, batch: int, lr: float, metrics: dict, room: Classroom,
              opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """What every training loop's checkpoint holds: where it is, its last metrics, adapters and optimizer."""
    return {"phase": phase, "iter": it, "epoch": epoch, "batch": batch, "lr": lr, "metrics": metrics,
            "adapters": room.adapters.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}


def _restore(state: dict, lr: float, room: Classroom, opt: torch.optim.Optimizer,
             sched: torch.optim.lr_scheduler.LRScheduler) -> tuple[dict, int, int, int]:
    """Load ``_snapshot``'s part of a checkpoint, at learning rate ``lr``, and set the RNGs back; returns
    (metrics, iteration, epoch, batch)."""
    room.adapters.load_state_dict(state["adapters"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    _rescale_lr(opt, sched, lr, state["lr"])
    set_rng_state(state["rng"])
    return state["metrics"], state["iter"], state["epoch"], state["batch"]


def _rescale_lr(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, lr: float,
                old_lr: float) -> None:
    """Change a resumed schedule's peak learning rate from ``old_lr`` to ``lr``: every learning rate it
    gives from now on is scaled by ``lr / old_lr`` (cosine annealing to 0 is linear in its peak)."""
    if lr == old_lr:
        return
    factor = lr / old_lr
    for group in opt.param_groups:
        group["lr"] *= factor
        group["initial_lr"] *= factor
    sched.base_lrs = [b * factor for b in sched.base_lrs]
    sched._last_lr = [g["lr"] for g in opt.param_groups]


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
    meta_step: Optional[MetaStep] = None,
    meta_batches: Optional[DataLoader] = None,
    ahead_batches: Optional[DataLoader] = None,
    ckpt: Optional[Checkpointer] = None,
) -> tuple[dict, Weights]:
    """Train ``student`` by ADMM prune-plus-distill.

    Returns the last epoch's test metrics and the policy's last weights (the
    fine-tuning phase keeps them).

    ``meta_step(student, opt, room, admm, signals, batches, meta_batch, device)``
    is called every ``s.meta_interval`` iterations when given (the dean's
    ``lis.meta.MetaLearner``); it must not change the student. ``batches`` are
    ``meta_step.fresh_batches`` fresh training batches from ``ahead_batches``
    (the train split in an order of its own), or without it the batch just
    trained on. ``ckpt`` saves
    the whole loop state (phase ``kdp``) at epoch ends, every
    ``checkpoint.every_iters`` iterations and on SIGINT/SIGTERM, and
    continues from a resumed one. A NaN or Inf in a loss, a gradient, the
    dean's outputs or the ADMM state stops the loop (``NumericalFault``).
    """
    ckpt = ckpt or Checkpointer.disabled()
    named = list(student.named_parameters()) + [(f"adapters.{n}", p) for n, p in room.adapters.named_parameters()]
    names, params = [n for n, _ in named], [p for _, p in named]
    layers = [g.name for g in groups]
    opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, foreach=True)
    total = max(s.epochs * len(train), 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    tracker = SignalTracker(len(groups), s.ema, device=device)
    metrics, it, n_meta, n_ahead, first_epoch, first_batch = {}, 0, 0, 0, 0, 0

    def state(epoch: int, batch: int) -> dict:
        return {**_snapshot("kdp", it, epoch, batch, s.lr, metrics, room, opt, sched),
                "student": student.state_dict(), "admm": admm.state_dict(), "signals": tracker.current,
                "policy": policy.state_dict(), "meta": meta_step.state_dict() if meta_step else None,
                "meta_batches": n_meta, "ahead_batches": n_ahead}

    resumed = ckpt.restore("kdp")
    if resumed is None:
        log({"phase": "kdp", "iter": 0, "layer_names": layers})
    else:
        student.load_state_dict(resumed["student"])
        admm.load_state_dict(resumed["admm"])
        tracker.current = resumed["signals"] and resumed["signals"].to(device)
        policy.load_state_dict(resumed["policy"])
        if meta_step is not None:
            meta_step.load_state_dict(resumed["meta"])
        n_meta, n_ahead = resumed["meta_batches"], resumed["ahead_batches"]
        metrics, it, first_epoch, first_batch = _restore(resumed, s.lr, room, opt, sched)
    rescale = getattr(policy, "learn_rho", False)  # only a dean that learns r_l changes it
    meta_iter = batches_from(meta_batches, n_meta) if meta_step is not None else None
    ahead_iter = batches_from(ahead_batches, n_ahead) if meta_step is not None and ahead_batches else None
    precision = s.precision
    precision.prepare(student, room.teacher[0])
    replica = dist.wrap(student)

    def ahead() -> list:
        """The meta step's look-ahead batches: ``meta_step.fresh_batches`` fresh ones, or the batch just trained
        on when there is no look-ahead loader."""
        nonlocal n_ahead
        if ahead_iter is None:
            return [(x, y)]
        n_ahead += meta_step.fresh_batches
        with torch.random.fork_rng(devices=[]):  # their augmentation leaves the training stream's RNG as it was
            drawn = [next(ahead_iter) for _ in range(meta_step.fresh_batches)]
        return [(precision.inputs(a, device), b.to(device, non_blocking=True)) for a, b in drawn]

    with ckpt.armed():
        for epoch in progress(range(first_epoch, s.epochs), desc="kdp"):
            student.train()
            batch = first_batch if epoch == first_epoch else 0
            seek(train, epoch, batch)
            for x, y in train:
                where = f"KDP iteration {it + 1} (epoch {epoch})"
                x, y = precision.inputs(x, device), y.to(device, non_blocking=True)
                # 1. the policy reads the smoothed state
                w = policy(tracker.state()).detached()
                # 2. teacher and student forward (under torchrun: the DDP replica's forward)
                measure, distils = it % s.signals_interval == 0, w.distils()  # decided once per iteration
                with dist.no_sync(replica) if measure else nullcontext(), precision.autocast(device):
                    lesson = room.lesson(student, x, y, forward=replica, distil=measure or distils)
                    kd = lesson.distillation(w)
                # 3. backward; on measurement iterations CE and KD separately (distillability)
                opt.zero_grad(set_to_none=True)
                if measure:
                    # a policy that does not distil still gets a distillability curve, with unit weights
                    kd_signal = kd if distils else lesson.kd_logit + lesson.kd_feat.sum()
                    g_ce = dict(zip(names, torch.autograd.grad(lesson.ce, params, retain_graph=True,
                                                               materialize_grads=True)))
                    g_kd = dict(zip(names, torch.autograd.grad(kd_signal, params, materialize_grads=True)))
                    losses = torch.stack([lesson.ce.detach(), kd_signal.detach()]).float()
                    dist.average_([*g_ce.values(), *g_kd.values(), losses])  # every process: the same signals
                    tracker.update(Signals(
                        distillability=distillability([_grad_rows(g_kd, g) for g in groups],
                                                      [_grad_rows(g_ce, g) for g in groups]),
                        sparsity=sparsity(student, groups), admm_gap=admm.gap(student),
                        keep_ratio=admm.keep_ratio(), progress=it / total, ce=losses[0], kd=losses[1]))
                    for n, p in zip(names, params):
                        p.grad = g_ce[n] + g_kd[n] if distils else g_ce[n]
                else:
                    (lesson.ce + kd).backward()  # DDP averages the student's gradients
                    _average_grads(room.adapters)
                # 4. the ADMM pull towards the sparse copy Z (U rescaled to this r), then the SGD step (if all is
                # finite)
                if rescale:  # r_l can change: keep the unscaled dual r_l U_l
                    admm.rescale_duals(w.rho)
                admm.penalty_grad_(student, w.rho)
                guard(where, {"the CE loss": (lesson.ce, None), "the KD_logit loss": (lesson.kd_logit, None),
                              "the KD_feat loss": (lesson.kd_feat, layers),
                              "the dean's alpha_out": (w.alpha_out, None), "the dean's alpha": (w.alpha, layers),
                              "the dean's rho": (w.rho, layers), **_grad_checks(named)})
                opt.step()
                sched.step()
                it += 1
                batch += 1
                # 5. Z-step and U-step
                if it % s.admm_interval == 0:
                    admm.project(student)
                    admm.update_duals(student)
                    guard(where, {"ADMM Z": (torch.stack(torch._foreach_norm(list(admm.Z.values()))), list(admm.Z)),
                                  "ADMM U": (torch.stack(torch._foreach_norm(list(admm.U.values()))), list(admm.U))})
                # 6. the dean's meta step
                meta = {}
                if meta_step is not None and it % s.meta_interval == 0:
                    with precision.autocast(device):  # the unroll in the same precision as the real step
                        meta = meta_step(student, opt, room, admm, tracker.state(), ahead(), next(meta_iter), device)
                    n_meta += 1
                    guard(where, {"the dean's meta loss": (torch.tensor(meta["meta_loss"]), None)})
                # 7. the per-layer series
                if measure or meta:
                    signals = tracker.state()
                    log({"phase": "kdp", "iter": it, "epoch": epoch, "lr": sched.get_last_lr()[0],
                         **_to_host({"ce": lesson.ce, "kd": kd, "alpha_out": w.alpha_out, **signals.per_layer(),
                                     "alpha": w.alpha, "rho": w.rho}), **meta})
                ckpt.step(it, lambda: state(epoch, batch))
            metrics = dist.once(lambda: evaluate(student, test, device, precision))  # the whole test split
            log({"phase": "kdp", "iter": it, "epoch": epoch + 1, "test_acc": metrics["acc"],
                 "test_loss": metrics["loss"]})
            ckpt.save(state(epoch + 1, 0))
    return metrics, policy(tracker.state()).detached()


def finetune(student: nn.Module, room: Classroom, weights: Weights, train: DataLoader, test: DataLoader,
             device: torch.device, *, epochs: int, lr: float, momentum: float, weight_decay: float,
             log: Log, ckpt: Optional[Checkpointer] = None, resumed: Optional[dict] = None,
             precision: Precision = Precision()) -> dict:
    """Teach the pruned student with fixed weights (CE + distillation, no ADMM); last epoch's test metrics.

    ``ckpt`` saves (phase ``finetune``) before the first step, at epoch ends
    and every ``checkpoint.every_iters`` iterations: the pruned ``student``
    module itself and ``weights`` with the loop state; a resumed run gets them back from
    ``Checkpointer.restore("finetune")``, rebuilds ``student`` and ``room``
    from them and passes the state in as ``resumed``.
    """
    ckpt = ckpt or Checkpointer.disabled()
    weights = weights.to(device)  # a resumed checkpoint's are on the CPU
    named = list(student.named_parameters()) + [(f"adapters.{n}", p) for n, p in room.adapters.named_parameters()]
    opt = torch.optim.SGD([p for _, p in named], lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * len(train), 1))
    it, first_epoch, first_batch = 0, 0, 0

    def state(epoch: int, batch: int) -> dict:
        return {**_snapshot("finetune", it, epoch, batch, lr, metrics, room, opt, sched), "student": student,
                "weights": weights}

    distils = weights.distils()  # decided once: the weights are fixed
    if resumed is None:
        metrics = dist.once(lambda: evaluate(student, test, device, precision))
        ckpt.save(state(0, 0))
    else:
        metrics, it, first_epoch, first_batch = _restore(resumed, lr, room, opt, sched)
    precision.prepare(student, room.teacher[0])
    replica = dist.wrap(student)

    with ckpt.armed():
        for epoch in progress(range(first_epoch, epochs), desc="finetune"):
            student.train()
            batch = first_batch if epoch == first_epoch else 0
            seek(train, epoch, batch)
            for x, y in train:
                x, y = precision.inputs(x, device), y.to(device, non_blocking=True)
                with precision.autocast(device):
                    lesson = room.lesson(student, x, y, forward=replica, distil=distils)
                    loss = lesson.ce + lesson.distillation(weights) if distils else lesson.ce
                opt.zero_grad(set_to_none=True)
                loss.backward()  # DDP averages the student's gradients
                _average_grads(room.adapters)
                guard(f"fine-tuning iteration {it + 1} (epoch {epoch})",
                      {"the fine-tuning loss": (loss, None), **_grad_checks(named)})
                opt.step()
                sched.step()
                it += 1
                batch += 1
                ckpt.step(it, lambda: state(epoch, batch))
            metrics = dist.once(lambda: evaluate(student, test, device, precision))
            log({"phase": "finetune", "epoch": epoch + 1, "test_acc": metrics["acc"], "test_loss": metrics["loss"]})
            ckpt.save(state(epoch + 1, 0))
    return metrics
