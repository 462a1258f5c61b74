import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lis.dean import DEANS, create_dean
from lis.errors import LISError
from lis.signals import Signals


def signals(n, values=None, progress=0.5, ce=1.0, kd=0.5):
    v = torch.zeros(4, n) if values is None else values
    return Signals(v[0], v[1], v[2], v[3], progress, ce, kd)


def central_difference(f, params, direction, eps: float = 1e-6) -> torch.Tensor:
    """(f(p + eps d) - f(p - eps d)) / 2 eps along ``direction``, the parameters restored; f runs with
    autograd on (an unrolled objective needs it), its value detached."""
    values = []
    for step in (eps, -2 * eps):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(step * d)
        values.append(f().detach())
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
    return (values[0] - values[1]) / (2 * eps)


@pytest.mark.parametrize("kind", DEANS)
def test_a_fresh_dean_is_the_fixed_policy(kind):
    dean = DEANS[kind](init_alpha=0.5, init_alpha_out=1.5, init_rho=2e-3)
    w = dean(signals(5, torch.randn(4, 5)))
    torch.testing.assert_close(w.alpha, torch.full((5,), 0.5), rtol=1e-4, atol=0)
    torch.testing.assert_close(w.rho, torch.full((5,), 2e-3), rtol=1e-4, atol=0)
    assert w.alpha_out.item() == pytest.approx(1.5, rel=1e-4)


@pytest.mark.parametrize("kind", DEANS)
def test_outputs_are_per_layer_and_their_gradient_matches_finite_differences(kind):
    """Bug caught: a broken path from the body to the outputs (a detach, a wrong squashing). A fresh dean's
    heads have zero weights, so its body's gradient is exactly zero and "every parameter has a gradient"
    proves nothing: the heads are perturbed first, and the gradient of every parameter is compared with
    central differences in float64."""
    torch.manual_seed(0)
    dean = DEANS[kind]().double()
    with torch.no_grad():
        for p in dean.parameters():
            p.add_(0.5 * torch.randn_like(p))
    s = signals(7, torch.randn(4, 7))
    w = dean(s)
    assert w.alpha.shape == w.rho.shape == (7,) and w.alpha_out.shape == ()
    params = list(dean.parameters())

    def f():
        w = dean(s)
        return (torch.linspace(-1, 1, 7, dtype=torch.float64) * w.alpha).sum() + w.rho.log().sum() + w.alpha_out

    grads = torch.autograd.grad(f(), params)
    assert all(g.abs().max() > 1e-4 for g in grads[:4])  # the body's weights and biases get a real gradient
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        projected = sum((g * d).sum() for g, d in zip(grads, direction))
        assert float(central_difference(f, params, direction)) == pytest.approx(float(projected), rel=1e-5)


finite = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("kind", DEANS)
@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 12),
    values=st.lists(finite, min_size=48, max_size=48),
    progress=finite,
    losses=st.tuples(st.floats(0, 1e30), st.floats(0, 1e30)),
    weight_scale=st.sampled_from([0.0, 1.0, 1e3, 1e6]),
    seed=st.integers(0, 2**16),
)
def test_outputs_stay_in_bounds(kind, n, values, progress, losses, weight_scale, seed):
    """Property: random, huge, zero inputs and huge dean weights never leave the bounds or give NaN."""
    torch.manual_seed(seed)
    dean = DEANS[kind](a_max=2.0, r_min=1e-5, r_max=1e-1)
    with torch.no_grad():
        for p in dean.parameters():
            p.copy_(torch.randn_like(p) * weight_scale)
    v = torch.tensor(values[: 4 * n] + [0.0] * max(0, 4 * n - len(values)), dtype=torch.float32).reshape(4, n)
    w = dean(signals(n, v, progress, *losses))
    for t in (w.alpha, w.rho, w.alpha_out):
        assert torch.isfinite(t).all()
    assert ((w.alpha >= 0) & (w.alpha <= 2.0)).all() and 0 <= w.alpha_out.item() <= 2.0
    assert ((w.rho >= 1e-5 * (1 - 1e-5)) & (w.rho <= 1e-1 * (1 + 1e-5))).all()


@pytest.mark.parametrize("kind", DEANS)
def test_checkpoint_transfers_to_a_model_with_another_depth(kind, tmp_path):
    dean = DEANS[kind]()
    with torch.no_grad():
        for p in dean.parameters():
            p.add_(torch.randn_like(p))
    torch.save(dean.state_dict(), tmp_path / "dean.pt")
    loaded = create_dean(str(tmp_path / "dean.pt"), kind)
    for n in (4, 30):  # trained on one depth, read on another
        s = signals(n, torch.randn(4, n))
        torch.testing.assert_close(loaded(s).rho, dean(s).rho)
        torch.testing.assert_close(loaded(s).alpha, dean(s).alpha)


def test_bad_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(LISError, match="does not exist"):
        create_dean(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LISError, match="not a LIS dean"):
        create_dean(str(tmp_path / "junk.pt"))


@pytest.mark.parametrize("kind", DEANS)
def test_rho_is_log_scaled_between_bounds(kind):
    dean = DEANS[kind](r_min=1e-4, r_max=1e-2)
    with torch.no_grad():  # the r output's bias to 0, sigmoid 0.5: geometric mean of the bounds
        (dean.layer_head if kind == "mlp" else dean.global_head).bias[1] = 0.0
    w = dean(signals(3))
    torch.testing.assert_close(w.rho, torch.full((3,), math.sqrt(1e-4 * 1e-2)))


@pytest.mark.parametrize("kind", DEANS)
def test_a_dean_that_does_not_learn_rho_keeps_the_constant(kind):
    dean = DEANS[kind](init_rho=0.1, learn_rho=False)
    with torch.no_grad():
        for p in dean.parameters():
            p.add_(torch.randn_like(p))
    w = dean(signals(5, torch.randn(4, 5)))
    torch.testing.assert_close(w.rho, torch.full((5,), 0.1))
    assert not torch.allclose(w.alpha, torch.full((5,), 1.0))
