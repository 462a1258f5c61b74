"""The dean's meta step (docs/design.md section 4), with a swappable differentiable-unroll backend.

Every ``meta.interval`` iterations:

1. weights = dean(signals), differentiable in the dean's parameters phi;
2. ``unroll`` differentiable steps of the student on the KDP loss of fresh
   training batches (one per step, drawn by the KDP loop from the train split
   in an order of its own), through the real optimizer's update: SGD at the
   student's current learning rate with its momentum (starting from copies of
   the real momentum buffers) and weight decay, giving W'(phi). With the
   dean's weights held, one unrolled step is the real next step on its batch. The adapters
   are held fixed in the unroll (they reach W' only from a second step on);
3. L_meta = CE(W'; meta batch) + beta * sum_l ||W'_l - Z_l||^2 / ||W_l||^2
   on a batch of the held-out meta split (never the test split). With
   ``objective="pruned_ce"`` the CE is that of W' masked to Z's support, i.e.
   of the student as the hard prune would leave it now: distillation that
   keeps the channels to be removed alive no longer looks free to the dean.
   Its BatchNorm runs in train mode (as in KDP), i.e. with the masked
   student's statistics on the meta batch: recalibrated, differentiably.
   ``finetune_steps`` differentiable fine-tuning steps of the masked W' may
   come before that CE;
4. an Adam step on phi, every ``accumulate`` meta steps on their mean
   hypergradient.

``truncate`` backpropagates through only the last steps of the unroll (the
first are plain steps, ``advance``); ``estimator="es"`` estimates the
gradient by evolution strategies (``lis.es``) instead of backpropagation.

The hypergradients dL_meta/da_out, dL_meta/da_l and dL_meta/dr_l, the signal
the dean learns from, are taken at the dean's output (the weights as leaves
of the unroll) and passed on through the dean by the chain rule, so they cost
no second backward; every meta step returns them for the log. With
``measure=True`` the learner only measures them, for any policy (a fixed one
included), and updates nothing.

The real student's weights, optimizer state and BatchNorm statistics are not
touched: the unroll works on copies of the weights, and BatchNorm buffers are
restored after it.

Backends (``meta.backend``):

- ``higher`` (default): ``higher.innerloop_ctx`` around the student.
- ``func``: ``torch.func.functional_call`` with hand-written SGD steps; no
  dependency on ``higher``, which has not been released since 2021.

Both compute the same meta-gradient (tested).
"""

from __future__ import annotations

import copy
import itertools
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lis import dist
from lis.admm import ADMMState, group_rows
from lis.es import antithetic_gradient
from lis.policy import Policy, Weights
from lis.school import Classroom
from lis.signals import Signals

Params = Mapping[str, torch.Tensor]
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]  #: the look-ahead's training batches, one per step
# (module to hook features on, its parameters, forward function) -> loss
LossFn = Callable[[nn.Module, Params, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def mirror(student: nn.Module, opt: Optional[torch.optim.Optimizer], lr: float) -> torch.optim.SGD:
    """An SGD optimizer over ``student``'s parameters at ``lr`` with ``opt``'s momentum, dampening, Nesterov
    flag and weight decay and a view of its momentum buffers (the real one also holds the adapters, which
    ``higher`` refuses); plain SGD when ``opt`` is None. The unroll copies the buffers, never writes them."""
    group = opt.param_groups[0] if opt is not None else {}
    inner = torch.optim.SGD(student.parameters(), lr=lr, momentum=group.get("momentum", 0.0),
                            dampening=group.get("dampening", 0.0), weight_decay=group.get("weight_decay", 0.0),
                            nesterov=group.get("nesterov", False))
    for p in student.parameters():
        if opt is not None and opt.state.get(p, {}).get("momentum_buffer") is not None:
            inner.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"]
    return inner


def unroll_higher(student: nn.Module, opt: torch.optim.SGD, unroll: int, step_loss: LossFn,
                  meta_loss: LossFn) -> torch.Tensor:
    import higher

    # copy_initial_weights: the unroll starts from copies, so no gradient reaches the real student; the
    # differentiable optimizer copies opt's momentum buffers
    with higher.innerloop_ctx(student, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for _ in range(unroll):
            diffopt.step(step_loss(fmodel, dict(fmodel.named_parameters()), fmodel))
        return meta_loss(fmodel, dict(fmodel.named_parameters()), fmodel)


def unroll_func(student: nn.Module, opt: torch.optim.SGD, unroll: int, step_loss: LossFn,
                 meta_loss: LossFn) -> torch.Tensor:
    params = {n: p.detach().requires_grad_() for n, p in student.named_parameters()}
    buffers = {n: b.clone() for n, b in student.named_buffers()}  # BN statistics move on copies only
    h = opt.param_groups[0]
    momentum = {n: opt.state[p].get("momentum_buffer") for n, p in student.named_parameters()}

    def forward_with(p: Params) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: torch.func.functional_call(student, (dict(p), buffers), (x,))

    for _ in range(unroll):
        loss = step_loss(student, params, forward_with(params))
        params = sgd_update(params, torch.autograd.grad(loss, list(params.values()), create_graph=True,
                                                        allow_unused=True), momentum, h)
    return meta_loss(student, params, forward_with(params))


def sgd_update(params: Params, grads, momentum: dict, h: Mapping) -> dict[str, torch.Tensor]:
    """``torch.optim.SGD``'s update of ``params`` with ``grads`` (None: no step) and hyperparameters ``h`` (one
    param group's), differentiably; ``momentum`` (name -> buffer or None) is updated in place."""
    out = dict(params)
    for (n, p), g in zip(params.items(), grads):
        if g is None:
            continue
        g = g + h["weight_decay"] * p
        if h["momentum"]:
            buf = momentum.get(n)
            momentum[n] = g if buf is None else h["momentum"] * buf + (1 - h["dampening"]) * g
            g = g + h["momentum"] * momentum[n] if h["nesterov"] else momentum[n]
        out[n] = p - h["lr"] * g
    return out


BACKENDS = {"higher": unroll_higher, "func": unroll_func}


def advance(student: nn.Module, opt: torch.optim.SGD, steps: int, step_loss: LossFn) -> tuple[nn.Module,
                                                                                               torch.optim.SGD]:
    """``steps`` plain (not differentiable) steps of ``opt``'s update on a copy of ``student`` and of ``opt``'s
    momentum buffers: the copy and its optimizer, where the differentiable part of a truncated unroll starts
    (and the horizon an ES fitness looks through). Nothing of ``student`` or ``opt`` is written."""
    ahead = copy.deepcopy(student)
    inner = torch.optim.SGD(ahead.parameters(), **{k: v for k, v in opt.param_groups[0].items() if k != "params"})
    for p, q in zip(student.parameters(), ahead.parameters()):
        if opt.state.get(p, {}).get("momentum_buffer") is not None:
            inner.state[q]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()
    params = list(ahead.parameters())
    for _ in range(steps):
        grads = torch.autograd.grad(step_loss(ahead, dict(ahead.named_parameters()), ahead), params,
                                    allow_unused=True)
        for q, g in zip(params, grads):
            q.grad = None if g is None else g.detach()
        inner.step()
    return ahead, inner


def _masked(params: Params, admm: ADMMState) -> dict[str, torch.Tensor]:
    """``params`` with every channel outside Z's support zeroed (all its out-slices), differentiably."""
    out = dict(params)
    for g in admm.groups:
        keep = admm.masks[g.name]
        for name, dim in g.out_slices:
            shape = [1] * out[name].dim()
            shape[dim] = -1
            out[name] = out[name] * keep.to(out[name].dtype).reshape(shape)
    return out


class MetaLearner:
    """Owns the dean's Adam optimizer and performs meta steps; called by the KDP loop.

    ``truncate``: backpropagate through only the last k of the ``unroll`` steps (None: all), the first
    ``unroll - k`` are plain steps (``advance``). ``accumulate``: the dean's update averages the
    hypergradients of this many meta steps. ``finetune_steps`` (``objective="pruned_ce"`` only): that many
    differentiable SGD steps of the masked W' at ``finetune_lr`` (with the real optimizer's momentum and
    weight decay, from fresh buffers, as fine-tuning starts; channels outside Z stay zero) on the KDP loss
    without the ADMM penalty before the meta CE. ``estimator="es"``: the dean's gradient is estimated by
    antithetic evolution strategies (``lis.es``) on L_meta after ``unroll`` plain steps, ``es_population``
    evaluations at ``es_sigma``, instead of backpropagation."""

    def __init__(self, dean: Policy, *, lr: float, unroll: int = 1, beta: float = 1.0, backend: str = "higher",
                 objective: str = "ce", truncate: Optional[int] = None, accumulate: int = 1,
                 finetune_steps: int = 0, finetune_lr: float = 0.01, estimator: str = "hypergradient",
                 es_sigma: float = 0.01, es_population: int = 8, measure: bool = False):
        """``measure=True``: ``dean`` may be any policy; its hypergradients are measured, nothing is updated."""
        if objective not in ("ce", "pruned_ce"):
            raise ValueError(f"objective must be 'ce' or 'pruned_ce', got {objective!r}")
        if finetune_steps and objective != "pruned_ce":
            raise ValueError("finetune_steps fine-tune the masked student: they need objective='pruned_ce'")
        self.dean, self.unroll, self.beta, self.lr, self.meta_objective = dean, unroll, beta, lr, objective
        self.truncate = unroll if truncate is None else truncate
        self.accumulate, self.finetune_steps, self.finetune_lr = accumulate, finetune_steps, finetune_lr
        self.estimator, self.es_sigma, self.es_population = estimator, es_sigma, es_population
        self.unroll_fn = BACKENDS[backend]
        self.opt = None if measure else torch.optim.Adam(dean.parameters(), lr=lr)
        self.pending = 0  # meta steps whose hypergradients wait in the dean's .grad

    def state_dict(self) -> dict:
        """The optimizer's state and the hypergradients accumulated so far (the dean's weights are the
        policy's ``state_dict``)."""
        return {"opt": self.opt and self.opt.state_dict(), "pending": self.pending,
                "grads": [p.grad for p in self.dean.parameters()]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``, at this learner's own learning rate (a resume may lower it)."""
        if self.opt is None:  # a measurement learns nothing
            return
        self.opt.load_state_dict(state["opt"])
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        self.pending = state["pending"]
        for p, g in zip(self.dean.parameters(), state["grads"]):
            p.grad = g

    @property
    def fresh_batches(self) -> int:
        """Training batches a meta step steps on: one per unroll and per fine-tuning step."""
        return self.unroll + self.finetune_steps

    def _losses(self, student: nn.Module, room: Classroom, admm: ADMMState, w: Weights,
                batches: Batches, meta_batch: tuple[torch.Tensor, torch.Tensor],
                inner: torch.optim.SGD, parts: dict) -> tuple[LossFn, LossFn]:
        """(the KDP loss of an unroll step, L_meta) at the weights ``w``; L_meta's CE goes into ``parts``.
        Each step, of the unroll and then of the fine-tuning, takes the next of ``batches``, cycling (a single
        ``(x, y)`` batch: every step takes it)."""
        batch = itertools.cycle([batches] if isinstance(batches[0], torch.Tensor) else batches).__next__
        xm, ym = meta_batch
        with torch.no_grad():
            params = dict(student.named_parameters())
            w_norm2 = {g.name: group_rows(params, g).pow(2).sum().clamp_min(1e-12) for g in admm.groups}

        def step_loss(module: nn.Module, p: Params, forward) -> torch.Tensor:
            lesson = room.lesson(module, *batch(), forward)
            return lesson.ce + lesson.distillation(w) + admm.penalty(p, w.rho)

        def meta_loss(module: nn.Module, p: Params, forward) -> torch.Tensor:
            if self.meta_objective == "pruned_ce":
                # BN statistics move on copies (the unroll's graph holds the real buffers); in train mode, as
                # in KDP, BN normalises with the masked student's own statistics on each batch
                buffers = {n: b.clone() for n, b in student.named_buffers()}
                q = _masked(p, admm)

                def pruned(x: torch.Tensor) -> torch.Tensor:
                    return torch.func.functional_call(student, (q, buffers), (x,))

                h, momentum = {**inner.param_groups[0], "lr": self.finetune_lr}, {}
                for _ in range(self.finetune_steps):
                    lesson = room.lesson(student, *batch(), pruned)
                    grads = torch.autograd.grad(lesson.ce + lesson.distillation(w), list(q.values()),
                                                create_graph=True, allow_unused=True)
                    q = _masked(sgd_update(q, grads, momentum, h), admm)
                parts["ce"] = F.cross_entropy(pruned(xm), ym)
            else:
                parts["ce"] = F.cross_entropy(forward(xm), ym)
            close = sum((group_rows(p, g) - admm.Z[g.name]).pow(2).sum() / w_norm2[g.name] for g in admm.groups)
            return parts["ce"] + self.beta * close

        return step_loss, meta_loss

    def objective(self, student: nn.Module, room: Classroom, admm: ADMMState, signals: Signals,
                  batches: Batches, meta_batch: tuple[torch.Tensor, torch.Tensor],
                  lr: float, opt: Optional[torch.optim.Optimizer] = None,
                  weights: Optional[Weights] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_meta, its CE part) as a differentiable function of the dean's parameters, or of ``weights``
        when given (instead of the dean's); the unroll steps at ``lr`` through ``opt``'s update (``mirror``;
        None: plain SGD), backpropagated through its last ``truncate`` steps."""
        inner, parts = mirror(student, opt, lr), {}
        w = self.dean(signals) if weights is None else weights
        step_loss, meta_loss = self._losses(student, room, admm, w, batches, meta_batch, inner, parts)
        buffers = {n: b.clone() for n, b in student.named_buffers()}
        try:
            start = student
            if self.truncate < self.unroll:
                start, inner = advance(student, inner, self.unroll - self.truncate, step_loss)
            loss = self.unroll_fn(start, inner, self.truncate, step_loss, meta_loss)
        finally:
            with torch.no_grad():
                for n, b in student.named_buffers():
                    b.copy_(buffers[n])
        return loss, parts["ce"]

    def loss_ahead(self, student: nn.Module, room: Classroom, admm: ADMMState, signals: Signals,
                   batches: Batches, meta_batch: tuple[torch.Tensor, torch.Tensor],
                   lr: float, opt: Optional[torch.optim.Optimizer] = None) -> tuple[float, float]:
        """(L_meta, its CE part) after ``unroll`` plain steps on a copy at the dean's current weights: the
        value ``objective`` differentiates, without a graph (the ES fitness)."""
        inner, parts = mirror(student, opt, lr), {}
        step_loss, meta_loss = self._losses(student, room, admm, self.dean(signals).detached(), batches, meta_batch,
                                            inner, parts)
        ahead, _ = advance(student, inner, self.unroll, step_loss)
        loss = meta_loss(ahead, dict(ahead.named_parameters()), ahead)
        return loss.item(), parts["ce"].item()

    def __call__(self, student: nn.Module, opt: torch.optim.Optimizer, room: Classroom, admm: ADMMState,
                 signals: Signals, batches: Batches, meta_batch, device: Optional[torch.device] = None) -> dict:
        """One meta step (the dean's update every ``accumulate`` of them); returns what to log: ``meta_loss``,
        ``meta_ce`` and, with the hypergradient estimator, the hypergradients ``hg_alpha_out`` (dL_meta/da_out),
        ``hg_alpha`` and ``hg_rho`` (per layer, dL_meta/da_l, dL_meta/dr_l); ``meta_skipped`` when a non-finite
        meta-gradient skipped the dean's update."""
        lr = opt.param_groups[0]["lr"]
        if device is not None:
            meta_batch = tuple(t.to(device) for t in meta_batch)
        params, hg = list(self.dean.parameters()), []
        if self.estimator == "es":
            def fitness() -> float:
                return self.loss_ahead(student, room, admm, signals, batches, meta_batch, lr, opt)[0]

            loss, ce = map(torch.tensor, self.loss_ahead(student, room, admm, signals, batches, meta_batch, lr, opt))
            if self.opt is not None:
                for p, g in zip(params, antithetic_gradient(fitness, params, self.es_sigma, self.es_population)):
                    p.grad = g if p.grad is None else p.grad + g
        else:
            w = self.dean(signals)
            outputs = (w.alpha_out, w.alpha, w.rho)
            leaves = [t.detach().requires_grad_() for t in outputs]
            loss, ce = self.objective(student, room, admm, signals, batches, meta_batch, lr, opt, Weights(*leaves))
            hg = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
            if self.opt is not None:
                # the chain rule through the dean: dL_meta/dphi = sum over its outputs of dL_meta/dw * dw/dphi,
                # added to the hypergradients of earlier meta steps, if any wait
                learned = [(o, g) for o, g in zip(outputs, hg) if o.requires_grad]  # r_l is constant without learn_rho
                torch.autograd.backward([o for o, _ in learned], [g for _, g in learned], inputs=params)
            hg = [g.detach().clone() for g in hg]
            dist.average_(hg)  # what the averaged dean update followed
        skipped = False
        if self.opt is not None:
            self.pending += 1
            if self.pending == self.accumulate:
                grads = [p.grad for p in params if p.grad is not None]
                for g in grads:
                    g.div_(self.accumulate)
                dist.average_(grads)  # the same dean everywhere
                # a non-finite meta-gradient (a NaN through a long unroll) skips the update, as AMP's GradScaler
                # skips a step: the dean and its Adam state stay as they were, the record says so (one host sync
                # per update; the same decision everywhere, the gradients being averaged)
                skipped = not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else False
                if not skipped:
                    self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.pending = 0
        # one copy to the host; float64 keeps float32 values exact
        flat = torch.cat([t.detach().double().reshape(-1) for t in (loss, ce, *hg)]).tolist()
        record = {"meta_loss": flat[0], "meta_ce": flat[1], **({"meta_skipped": True} if skipped else {})}
        if hg:
            n = len(hg[1])
            record.update(hg_alpha_out=flat[2], hg_alpha=flat[3:3 + n], hg_rho=flat[3 + n:])
        return record
