"""The dean's meta step (docs/design.md section 4), with a swappable differentiable-unroll backend.

Every ``meta.interval`` iterations:

1. weights = dean(signals), differentiable in the dean's parameters phi;
2. ``unroll`` differentiable steps of the student on the KDP loss of the
   training batch, through the real optimizer's update: SGD at the student's
   current learning rate with its momentum (starting from copies of the real
   momentum buffers) and weight decay, giving W'(phi). With the dean's weights
   held, one unrolled step is the real next step on that batch. The adapters
   are held fixed in the unroll (they reach W' only from a second step on);
3. L_meta = CE(W'; meta batch) + beta * sum_l ||W'_l - Z_l||^2 / ||W_l||^2
   on a batch of the held-out meta split (never the test split). With
   ``objective="pruned_ce"`` the CE is that of W' masked to Z's support, i.e.
   of the student as the hard prune would leave it now: distillation that
   keeps the channels to be removed alive no longer looks free to the dean;
4. an Adam step on phi.

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

from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lis import dist
from lis.admm import ADMMState, group_rows
from lis.policy import Policy, Weights
from lis.school import Classroom
from lis.signals import Signals

Params = Mapping[str, torch.Tensor]
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
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
        for (n, p), g in zip(list(params.items()), grads):
            if g is None:
                continue
            # torch.optim.SGD's update, differentiably
            g = g + h["weight_decay"] * p
            if h["momentum"]:
                buf = momentum[n]
                momentum[n] = g if buf is None else h["momentum"] * buf + (1 - h["dampening"]) * g
                g = g + h["momentum"] * momentum[n] if h["nesterov"] else momentum[n]
            params[n] = p - h["lr"] * g
    return meta_loss(student, params, forward_with(params))


BACKENDS = {"higher": unroll_higher, "func": unroll_func}


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
    """Owns the dean's Adam optimizer and performs meta steps; called by the KDP loop."""

    def __init__(self, dean: Policy, *, lr: float, unroll: int = 1, beta: float = 1.0, backend: str = "higher",
                 objective: str = "ce", measure: bool = False):
        """``measure=True``: ``dean`` may be any policy; its hypergradients are measured, nothing is updated."""
        if objective not in ("ce", "pruned_ce"):
            raise ValueError(f"objective must be 'ce' or 'pruned_ce', got {objective!r}")
        self.dean, self.unroll, self.beta, self.lr, self.meta_objective = dean, unroll, beta, lr, objective
        self.unroll_fn = BACKENDS[backend]
        self.opt = None if measure else torch.optim.Adam(dean.parameters(), lr=lr)

    def state_dict(self) -> dict:
        """The optimizer's state (the dean's weights are the policy's ``state_dict``)."""
        return {"opt": self.opt and self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``, at this learner's own learning rate (a resume may lower it)."""
        if self.opt is None:
            return
        self.opt.load_state_dict(state["opt"])
        for group in self.opt.param_groups:
            group["lr"] = self.lr

    def objective(self, student: nn.Module, room: Classroom, admm: ADMMState, signals: Signals,
                  batch: tuple[torch.Tensor, torch.Tensor], meta_batch: tuple[torch.Tensor, torch.Tensor],
                  lr: float, opt: Optional[torch.optim.Optimizer] = None,
                  weights: Optional[Weights] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_meta, its CE part) as a differentiable function of the dean's parameters, or of ``weights``
        when given (instead of the dean's); the unroll steps at ``lr`` through ``opt``'s update (``mirror``;
        None: plain SGD)."""
        x, y = batch
        xm, ym = meta_batch
        w = self.dean(signals) if weights is None else weights
        with torch.no_grad():
            params = dict(student.named_parameters())
            w_norm2 = {g.name: group_rows(params, g).pow(2).sum().clamp_min(1e-12) for g in admm.groups}
        parts = {}

        def step_loss(module: nn.Module, p: Params, forward) -> torch.Tensor:
            lesson = room.lesson(module, x, y, forward)
            return lesson.ce + lesson.distillation(w) + admm.penalty(p, w.rho)

        def meta_loss(module: nn.Module, p: Params, forward) -> torch.Tensor:
            if self.meta_objective == "pruned_ce":
                # BN statistics move on copies (the unroll's graph holds the real buffers)
                state = {**_masked(p, admm), **{n: b.clone() for n, b in student.named_buffers()}}
                parts["ce"] = F.cross_entropy(torch.func.functional_call(student, state, (xm,)), ym)
            else:
                parts["ce"] = F.cross_entropy(forward(xm), ym)
            close = sum((group_rows(p, g) - admm.Z[g.name]).pow(2).sum() / w_norm2[g.name] for g in admm.groups)
            return parts["ce"] + self.beta * close

        buffers = {n: b.clone() for n, b in student.named_buffers()}
        try:
            loss = self.unroll_fn(student, mirror(student, opt, lr), self.unroll, step_loss, meta_loss)
        finally:
            with torch.no_grad():
                for n, b in student.named_buffers():
                    b.copy_(buffers[n])
        return loss, parts["ce"]

    def __call__(self, student: nn.Module, opt: torch.optim.Optimizer, room: Classroom, admm: ADMMState,
                 signals: Signals, batch, meta_batch, device: Optional[torch.device] = None) -> dict:
        """One meta step; returns what to log: ``meta_loss``, ``meta_ce`` and the hypergradients
        ``hg_alpha_out`` (dL_meta/da_out), ``hg_alpha`` and ``hg_rho`` (per layer, dL_meta/da_l, dL_meta/dr_l)."""
        lr = opt.param_groups[0]["lr"]
        if device is not None:
            meta_batch = tuple(t.to(device) for t in meta_batch)
        w = self.dean(signals)
        outputs = (w.alpha_out, w.alpha, w.rho)
        leaves = [t.detach().requires_grad_() for t in outputs]
        loss, ce = self.objective(student, room, admm, signals, batch, meta_batch, lr, opt, Weights(*leaves))
        hg = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        if self.opt is not None:
            # the chain rule through the dean: dL_meta/dphi = sum over its outputs of dL_meta/dw * dw/dphi
            self.opt.zero_grad(set_to_none=True)
            learned = [(o, g) for o, g in zip(outputs, hg) if o.requires_grad]  # r_l is constant without learn_rho
            torch.autograd.backward([o for o, _ in learned], [g for _, g in learned],
                                    inputs=list(self.dean.parameters()))
            dist.average_([p.grad for p in self.dean.parameters() if p.grad is not None])  # the same dean everywhere
            self.opt.step()
        hg = [g.detach().clone() for g in hg]
        dist.average_(hg)  # what the averaged dean update followed
        # one copy to the host; float64 keeps float32 values exact
        flat = torch.cat([t.detach().double().reshape(-1) for t in (loss, ce, *hg)]).tolist()
        n = len(w.alpha)
        return {"meta_loss": flat[0], "meta_ce": flat[1], "hg_alpha_out": flat[2], "hg_alpha": flat[3:3 + n],
                "hg_rho": flat[3 + n:]}
