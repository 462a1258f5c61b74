"""The dean's meta step: gradient correctness (finite differences), backend agreement, no side effects."""

import copy

import pytest
import torch
from torch import nn

from lis.admm import ADMMState
from lis.dean import create_dean
from lis.groups import CostModel, find_groups
from lis.meta import MetaLearner
from lis.school import Classroom
from lis.signals import Signals


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 4, 3, padding=1, bias=False), nn.BatchNorm1d(4), nn.ReLU(),
        nn.Conv1d(4, 6, 3, padding=1, bias=False), nn.BatchNorm1d(6), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def setup(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    teacher, student = tiny_net().to(dtype).eval(), tiny_net().to(dtype).train()
    example = torch.randn(2, 1, 8, dtype=dtype)
    groups = find_groups(student, example)
    admm = ADMMState(student, groups, CostModel(student, groups, example), {"params": 0.5}, 0.2)
    # a non-trivial dual so every term of the penalty matters
    for name in admm.U:
        admm.U[name] = 0.1 * torch.randn_like(admm.U[name])
    names = [g.name for g in groups]
    room = Classroom(teacher, student, names, names, example, temperature=2.0)
    dean = create_dean().to(dtype)
    with torch.no_grad():  # move off the zero-initialised heads so every parameter gets a gradient
        for p in dean.parameters():
            p.add_(0.3 * torch.randn_like(p))
    n = len(groups)
    signals = Signals(torch.rand(n) * 2 - 1, torch.rand(n), torch.rand(n), torch.rand(n), 0.3, 0.9, 0.2)
    batch = (torch.randn(8, 1, 8, dtype=dtype), torch.randint(0, 3, (8,)))
    meta_batch = (torch.randn(8, 1, 8, dtype=dtype), torch.randint(0, 3, (8,)))
    return student, room, admm, dean, signals, batch, meta_batch


def meta_grad(backend, unroll=1, seed=0):
    student, room, admm, dean, signals, batch, meta_batch = setup(seed=seed)
    learner = MetaLearner(dean, lr=1e-3, unroll=unroll, beta=0.7, backend=backend)
    loss, _ = learner.objective(student, room, admm, signals, batch, meta_batch, lr=0.5)
    grads = torch.autograd.grad(loss, list(dean.parameters()))
    return loss.detach(), torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("backend", ["higher", "func"])
@pytest.mark.parametrize("unroll", [1, 2])
def test_meta_gradient_matches_finite_differences(backend, unroll):
    student, room, admm, dean, signals, batch, meta_batch = setup()
    learner = MetaLearner(dean, lr=1e-3, unroll=unroll, beta=0.7, backend=backend)
    params = list(dean.parameters())

    def objective() -> torch.Tensor:
        return learner.objective(student, room, admm, signals, batch, meta_batch, lr=0.5)[0]

    grads = torch.autograd.grad(objective(), params)
    analytic = torch.cat([g.flatten() for g in grads])
    assert analytic.abs().max() > 1e-6  # the test can fail: the gradient is not trivially zero

    # central differences along a few random directions in parameter space
    gen = torch.Generator().manual_seed(1)
    eps = 1e-6
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        def shift(scale):
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(scale * eps * d)

        shift(1)
        plus = objective().detach()
        shift(-2)
        minus = objective().detach()
        shift(1)
        numeric = (plus - minus) / (2 * eps)
        projected = sum((g * d).sum() for g, d in zip(grads, direction))
        assert abs(numeric - projected) <= 1e-3 * abs(numeric) + 1e-9, (numeric, projected)


@pytest.mark.parametrize("unroll", [1, 3])
def test_backends_give_the_same_meta_gradient(unroll):
    loss_h, grad_h = meta_grad("higher", unroll)
    loss_f, grad_f = meta_grad("func", unroll)
    torch.testing.assert_close(loss_h, loss_f, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_h, grad_f, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_meta_steps_lower_the_meta_objective(backend):
    """Bug caught: a meta step that moves the dean the wrong way (a sign, a gradient taken of the wrong
    loss): changing the dean is not enough, a few steps on fixed batches must lower L_meta. Each call returns
    L_meta at the dean's weights before its step, so the last of six is L_meta after five steps."""
    student, room, admm, dean, signals, batch, meta_batch = setup()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    # the perturbed (layerwise) dean starts with a_l near 0, where the sigmoid is flat: a larger step than 1e-2
    learner = MetaLearner(dean, lr=3e-2, unroll=1, beta=0.7, backend=backend)
    losses = [learner(student, opt, room, admm, signals, batch, meta_batch)["meta_loss"] for _ in range(6)]
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_meta_step_leaves_the_student_untouched(backend):
    student, room, admm, dean, signals, batch, meta_batch = setup(dtype=torch.float32)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    # one real step so the optimizer has momentum buffers and the parameters have .grad
    nn.functional.cross_entropy(student(batch[0]), batch[1]).backward()
    opt.step()
    before_state = copy.deepcopy(student.state_dict())  # parameters and BatchNorm buffers
    before_grads = [p.grad.clone() for p in student.parameters()]
    before_opt = copy.deepcopy(opt.state_dict())
    before_dean = [p.detach().clone() for p in dean.parameters()]

    learner = MetaLearner(dean, lr=1e-2, unroll=2, beta=1.0, backend=backend)
    out = learner(student, opt, room, admm, signals, batch, meta_batch)

    assert set(out) == {"meta_loss", "meta_ce", "hg_alpha_out", "hg_alpha", "hg_rho"}
    after = student.state_dict()
    for key, value in before_state.items():
        assert torch.equal(value, after[key]), key
    for g, p in zip(before_grads, student.parameters()):
        assert torch.equal(g, p.grad)
    after_opt = opt.state_dict()
    assert before_opt["param_groups"] == after_opt["param_groups"]
    for key, state in before_opt["state"].items():
        assert torch.equal(state["momentum_buffer"], after_opt["state"][key]["momentum_buffer"])
    # ... while the dean did learn
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before_dean, dean.parameters()))


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_pruned_ce_objective_agrees_across_backends_and_sees_the_mask(backend):
    student, room, admm, dean, signals, batch, meta_batch = setup()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    losses = {}
    for objective in ("ce", "pruned_ce"):
        learner = MetaLearner(dean, lr=1e-3, beta=0.7, backend=backend, objective=objective)
        loss, ce = learner.objective(student, room, admm, signals, batch, meta_batch, lr=0.5)
        grads = torch.autograd.grad(loss, list(dean.parameters()), allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        losses[objective] = ce.item()
    assert losses["ce"] != pytest.approx(losses["pruned_ce"])  # half the parameters' channels are masked
    other = MetaLearner(dean, lr=1e-3, beta=0.7, backend="func" if backend == "higher" else "higher",
                        objective="pruned_ce")
    torch.testing.assert_close(other.objective(student, room, admm, signals, batch, meta_batch, lr=0.5)[1],
                               torch.tensor(losses["pruned_ce"], dtype=torch.float64))
    for n, p in student.named_parameters():
        torch.testing.assert_close(p, before[n])


def zeroed_by_hand(student: nn.Module, admm) -> nn.Module:
    """A copy of ``student`` with every channel outside Z's support zeroed in all its out-slices."""
    masked = copy.deepcopy(student)
    params = dict(masked.named_parameters())
    with torch.no_grad():
        for g in admm.groups:
            dropped = (~admm.masks[g.name]).nonzero().flatten()
            assert 0 < len(dropped) < g.num_channels
            for name, dim in g.out_slices:
                params[name].index_fill_(dim, dropped, 0.0)
    return masked


def test_pruned_ce_is_the_ce_of_the_student_with_the_dropped_channels_zeroed_by_hand():
    student, room, admm, dean, signals, batch, meta_batch = setup()
    learner = MetaLearner(dean, lr=1e-3, beta=0.0, objective="pruned_ce")
    _, ce = learner.objective(student, room, admm, signals, batch, meta_batch, lr=0.0)  # no step: W' = W
    with torch.no_grad():
        expected = nn.functional.cross_entropy(zeroed_by_hand(student, admm)(meta_batch[0]), meta_batch[1])
    torch.testing.assert_close(ce, expected)


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_the_meta_step_runs_under_bf16_autocast_close_to_float32(backend):
    """run.amp=bf16 runs the meta step's unroll under the real step's autocast: the unroll (``higher``'s
    included) must differentiate through bfloat16 operators, and the meta-gradient stay close to float32's."""
    grads = {}
    for amp in (False, True):
        student, room, admm, dean, signals, batch, meta_batch = setup(dtype=torch.float32)
        learner = MetaLearner(dean, lr=1e-3, beta=0.7, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _ = learner.objective(student, room, admm, signals, batch, meta_batch, lr=0.5)
            g = torch.autograd.grad(loss, list(dean.parameters()))
        grads[amp] = (loss.detach(), torch.cat([t.flatten().float() for t in g]))
    (l32, g32), (l16, g16) = grads[False], grads[True]
    assert torch.isfinite(g16).all() and not torch.equal(l16, l32)  # bf16 operators ran
    assert float(l16) == pytest.approx(float(l32), rel=0.05)
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.9


def test_a_non_finite_meta_gradient_skips_the_dean_update(monkeypatch):
    """Bug (bench, meta.finetune_steps=2): one NaN hypergradient stepped Adam, the dean's parameters became
    NaN before the iteration's checkpoint, and the run stopped with a 'last good' checkpoint holding the NaN
    dean, so resuming failed again. Now the update is skipped (dean and Adam state unchanged) and logged;
    the next finite meta step updates as usual."""
    student, room, admm, dean, signals, batch, meta_batch = setup(dtype=torch.float32)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    learner = MetaLearner(dean, lr=1e-2, unroll=1, beta=1.0)
    learner(student, opt, room, admm, signals, batch, meta_batch)  # Adam has state now
    before = [p.detach().clone() for p in dean.parameters()]
    before_opt = copy.deepcopy(learner.opt.state_dict())
    objective = MetaLearner.objective

    def poisoned(self, *args, **kwargs):
        loss, ce = objective(self, *args, **kwargs)
        return loss * float("nan"), ce

    monkeypatch.setattr(MetaLearner, "objective", poisoned)
    out = learner(student, opt, room, admm, signals, batch, meta_batch)
    assert out["meta_skipped"] is True
    assert all(torch.equal(a, b) for a, b in zip(before, dean.parameters()))
    after_opt = learner.opt.state_dict()
    for key, state in before_opt["state"].items():
        assert all(torch.equal(v, after_opt["state"][key][k]) for k, v in state.items())
    assert all(p.grad is None for p in dean.parameters())  # nothing carried into the next update
    monkeypatch.setattr(MetaLearner, "objective", objective)
    assert "meta_skipped" not in learner(student, opt, room, admm, signals, batch, meta_batch)
    assert not all(torch.equal(a, b) for a, b in zip(before, dean.parameters()))
