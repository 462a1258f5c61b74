"""A meta objective that reaches the hard prune: BN recalibration, truncated unrolls, accumulated
hypergradients, differentiable fine-tuning steps (issue 16 item 4), each against an independent computation."""

import copy

import pytest
import torch
from torch import nn

import test_meta as tm
from test_dean import central_difference
from lis.meta import MetaLearner, advance, mirror
from lis.prune import hard_prune


def _flat(grads):
    return torch.cat([g.flatten() for g in grads])


def _momentum_opt(student, room, admm, dean, signals):
    """A real optimizer with momentum buffers from two real steps, as the KDP loop's is at a meta step."""
    w = dean(signals).detached()
    opt = torch.optim.SGD(student.parameters(), lr=0.3, momentum=0.9, weight_decay=5e-4)
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(8, 1, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        lesson = room.lesson(student, x, y)
        (lesson.ce + lesson.distillation(w)).backward()
        admm.penalty_grad_(student, w.rho)
        opt.step()
    return opt


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_a_truncated_unroll_is_the_short_unroll_after_plain_steps(backend):
    """unroll=3, truncate=1: the same L_meta as the full unroll (the forward is the same), and the gradient of
    a one-step unroll started where two plain steps of the real optimizer (dean's weights held, momentum
    carried) leave a copy of the student, computed here by hand with torch.optim.SGD. Bugs caught: truncation
    that drops the first steps instead of taking them without a graph, or that loses their momentum."""
    student, room, admm, dean, signals, batch, meta_batch = tm.setup()
    opt = _momentum_opt(student, room, admm, dean, signals)
    params = list(dean.parameters())
    # beta 0: the closeness term divides by ||W_l||^2 at the meta step's start, which the copy below moves
    full = MetaLearner(dean, lr=1e-3, unroll=3, beta=0.0, backend=backend)
    cut = MetaLearner(dean, lr=1e-3, unroll=3, truncate=1, beta=0.0, backend=backend)
    loss_full, _ = full.objective(student, room, admm, signals, batch, meta_batch, 0.3, opt)
    loss_cut, _ = cut.objective(student, room, admm, signals, batch, meta_batch, 0.3, opt)
    torch.testing.assert_close(loss_cut, loss_full, rtol=1e-12, atol=0)

    # by hand: two real KDP updates of a copy on the batch, from copies of the momentum buffers
    w = dean(signals).detached()
    ahead = copy.deepcopy(student)
    real = torch.optim.SGD(ahead.parameters(), lr=0.3, momentum=0.9, weight_decay=5e-4)
    for p, q in zip(student.parameters(), ahead.parameters()):
        real.state[q]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()
    for _ in range(2):
        real.zero_grad()
        lesson = room.lesson(ahead, *batch)
        (lesson.ce + lesson.distillation(w) + admm.penalty(dict(ahead.named_parameters()), w.rho)).backward()
        real.step()
    one = MetaLearner(dean, lr=1e-3, unroll=1, beta=0.0, backend=backend)
    loss_one, _ = one.objective(ahead, room, admm, signals, batch, meta_batch, 0.3, real)
    g_cut = _flat(torch.autograd.grad(loss_cut, params))
    torch.testing.assert_close(loss_one, loss_cut, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_cut, _flat(torch.autograd.grad(loss_one, params)), rtol=1e-8, atol=1e-12)
    g_full = _flat(torch.autograd.grad(full.objective(student, room, admm, signals, batch, meta_batch, 0.3,
                                                      opt)[0], params))
    assert not torch.allclose(g_full, g_cut, rtol=1e-3)  # the truncation did drop something


def test_advance_writes_nothing_of_the_student_or_its_optimizer():
    student, room, admm, dean, signals, batch, _ = tm.setup()
    opt = _momentum_opt(student, room, admm, dean, signals)
    before = copy.deepcopy(student.state_dict()), copy.deepcopy(opt.state_dict())
    w = dean(signals).detached()

    def step_loss(module, p, forward):
        lesson = room.lesson(module, *batch, forward)
        return lesson.ce + lesson.distillation(w) + admm.penalty(p, w.rho)

    ahead, _ = advance(student, mirror(student, opt, 0.3), 2, step_loss)
    assert not torch.equal(next(ahead.parameters()), next(student.parameters()))
    for k, v in before[0].items():
        assert torch.equal(v, student.state_dict()[k]), k
    for k, s in before[1]["state"].items():
        assert torch.equal(s["momentum_buffer"], opt.state_dict()["state"][k]["momentum_buffer"])


@pytest.mark.parametrize("estimator", ["hypergradient", "es"])
def test_accumulated_meta_steps_make_one_update_from_the_mean_and_resume_exactly(estimator):
    """accumulate=2: the first meta step leaves the dean as it is; the second makes one Adam step on the mean of
    the two hypergradients (computed here with ``objective`` on each step's batches). A learner rebuilt from
    ``state_dict()`` between the two (a resume) ends on the same dean. Bugs caught: a step on the sum, a step
    every meta step, or accumulated hypergradients lost by a checkpoint."""
    student, room, admm, dean, signals, batch, meta_batch = tm.setup()
    opt = torch.optim.SGD(student.parameters(), lr=0.3)
    other = (torch.randn_like(batch[0]), batch[1].flip(0))
    kw = dict(lr=1e-2, unroll=1, beta=0.7, accumulate=2, estimator=estimator, es_population=4)
    reference = copy.deepcopy(dean)
    start = [p.detach().clone() for p in dean.parameters()]

    learner = MetaLearner(dean, **kw)
    torch.manual_seed(5)  # the ES perturbations
    learner(student, opt, room, admm, signals, batch, meta_batch)
    assert all(torch.equal(a, b) for a, b in zip(start, dean.parameters()))
    state = copy.deepcopy(learner.state_dict())
    rng = torch.get_rng_state()
    learner(student, opt, room, admm, signals, other, meta_batch)
    after = [p.detach().clone() for p in dean.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(start, after))

    resumed = MetaLearner(reference, **kw)  # a resume: the dean's weights and the learner's state
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    resumed(student, opt, room, admm, signals, other, meta_batch)
    for a, b in zip(after, reference.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0)

    if estimator == "hypergradient":  # by hand: Adam's first step on the mean hypergradient
        by_hand = copy.deepcopy(reference)
        with torch.no_grad():
            for p, s in zip(by_hand.parameters(), start):
                p.copy_(s)
        one = MetaLearner(by_hand, lr=1e-2, unroll=1, beta=0.7)
        params = list(by_hand.parameters())
        grads = [torch.autograd.grad(one.objective(student, room, admm, signals, b, meta_batch, 0.3, opt)[0],
                                     params) for b in (batch, other)]
        adam = torch.optim.Adam(params, lr=1e-2)
        for p, g1, g2 in zip(params, *grads):
            p.grad = (g1 + g2) / 2
        adam.step()
        for a, b in zip(after, params):
            torch.testing.assert_close(b.detach(), a, rtol=1e-12, atol=1e-15)


def _recalibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` in eval mode with every BatchNorm's running statistics recomputed from one forward of ``x``,
    the variance made biased (as train-mode BN normalises with it)."""
    model = copy.deepcopy(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.no_grad():
        model(x)
    for bn in bns:
        n = x.shape[0] * x[0, 0].numel()  # values per channel (1-D maps keep their length here)
        bn.running_var.mul_((n - 1) / n)
    return model.eval()


def test_pruned_ce_is_the_hard_pruned_student_with_bn_recalibrated_on_the_meta_batch():
    """The meta CE of ``pruned_ce`` is that of the physically smaller student the hard prune makes, with its
    BatchNorm statistics recalibrated on the meta batch, evaluated in eval mode: train-mode BN on the meta
    batch *is* that recalibration, differentiably, so no separate option is needed. Bugs caught: a meta CE
    with the stale running statistics (eval mode), or with the unmasked student's statistics."""
    student, room, admm, dean, signals, batch, meta_batch = tm.setup()
    with torch.no_grad():  # trained-looking statistics, which the masking makes stale
        for m in student.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    learner = MetaLearner(dean, lr=1e-3, beta=0.0, objective="pruned_ce")
    _, ce = learner.objective(student, room, admm, signals, batch, meta_batch, lr=0.0)  # no step: W' = W
    small = hard_prune(tm.zeroed_by_hand(student, admm).eval(), admm.groups, admm.masks, meta_batch[0][:2])
    with torch.no_grad():
        expected = nn.functional.cross_entropy(_recalibrated(small, meta_batch[0])(meta_batch[0]), meta_batch[1])
        stale = nn.functional.cross_entropy(small.eval()(meta_batch[0]), meta_batch[1])
    torch.testing.assert_close(ce, expected, rtol=1e-10, atol=0)
    assert abs(stale - expected) > 1e-3  # the recalibration matters here


def test_finetune_steps_are_sgd_steps_of_the_masked_student_by_hand():
    """meta.finetune_steps=2 with no unroll step (lr 0: W' = W): the meta CE is that of the masked student
    after two torch.optim.SGD steps (fresh momentum, the real weight decay, finetune_lr) on CE + distillation
    at the dean's weights, re-masked after each step. Bugs caught: channels outside Z revived by the steps,
    the ADMM penalty in fine-tuning, the wrong learning rate."""
    student, room, admm, dean, signals, batch, meta_batch = tm.setup()
    opt = torch.optim.SGD(student.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    learner = MetaLearner(dean, lr=1e-3, beta=0.0, objective="pruned_ce", finetune_steps=2, finetune_lr=0.2)
    _, ce = learner.objective(student, room, admm, signals, batch, meta_batch, 0.0, opt)

    w = dean(signals).detached()
    tuned = copy.deepcopy(student)
    params = dict(tuned.named_parameters())

    def mask_():
        with torch.no_grad():
            for g in admm.groups:
                for name, dim in g.out_slices:
                    params[name].index_fill_(dim, (~admm.masks[g.name]).nonzero().flatten(), 0.0)

    mask_()
    sgd = torch.optim.SGD(tuned.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        sgd.zero_grad()
        lesson = room.lesson(tuned, *batch)
        (lesson.ce + lesson.distillation(w)).backward()
        sgd.step()
        mask_()
    with torch.no_grad():
        expected = nn.functional.cross_entropy(tuned(meta_batch[0]), meta_batch[1])
    torch.testing.assert_close(ce, expected, rtol=1e-10, atol=0)
    _, untuned = MetaLearner(dean, lr=1e-3, beta=0.0, objective="pruned_ce").objective(
        student, room, admm, signals, batch, meta_batch, 0.0, opt)
    assert abs(untuned - ce) > 1e-3


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_the_horizon_options_meta_gradient_matches_finite_differences(backend):
    """unroll 2 through momentum, the masked student fine-tuned 2 steps: the gradient through all of it,
    against central differences; and the two backends agree."""
    grads = {}
    for b in ("higher", "func"):
        student, room, admm, dean, signals, batch, meta_batch = tm.setup()
        opt = _momentum_opt(student, room, admm, dean, signals)
        learner = MetaLearner(dean, lr=1e-3, unroll=2, beta=0.7, backend=b, objective="pruned_ce",
                              finetune_steps=2, finetune_lr=0.2)
        params = list(dean.parameters())

        def objective():
            return learner.objective(student, room, admm, signals, batch, meta_batch, 0.3, opt)[0]

        grads[b] = torch.autograd.grad(objective(), params)
        if b != backend:
            continue
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
            numeric = central_difference(objective, params, direction)
            projected = sum((g * d).sum() for g, d in zip(grads[b], direction))
            assert abs(numeric - projected) <= 1e-4 * abs(numeric) + 1e-9, (numeric, projected)
    torch.testing.assert_close(_flat(grads["higher"]), _flat(grads["func"]), rtol=1e-8, atol=1e-12)
