"""lis/policy.py: the fixed-weight policies and the policy registry."""

import pytest
import torch

from lis.errors import LISError
from lis.policy import FixedPolicy, Policy, Weights, create_policy
from lis.signals import Signals


def signals(n):
    z = torch.zeros(n)
    return Signals(z, z.clone(), z.clone(), torch.ones(n))


def test_fixed_policy_shapes_and_values():
    policy = FixedPolicy(alpha_out=0.5, alpha=0.25, rho=1e-3)
    w = policy(signals(3))
    assert isinstance(policy, Policy) and isinstance(w, Weights)
    assert w.alpha_out.shape == () and float(w.alpha_out) == 0.5
    assert w.alpha.shape == (3,) and w.alpha.tolist() == [0.25] * 3
    assert w.rho.shape == (3,) and torch.allclose(w.rho, torch.full((3,), 1e-3))
    assert policy(signals(5)).alpha.shape == (5,)  # one weight per layer of whatever model it sees


def test_create_policy_presets():
    fixed = create_policy("fixed", alpha_out=1.0, alpha=2.0, rho=0.01)(signals(4))
    assert float(fixed.alpha_out) == 1.0 and fixed.alpha.tolist() == [2.0] * 4
    assert torch.allclose(fixed.rho, torch.full((4,), 0.01)) and fixed.distils()
    prune_only = create_policy("prune_only", alpha_out=1.0, alpha=2.0, rho=0.01)(signals(4))
    assert float(prune_only.alpha_out) == 0.0 and prune_only.alpha.tolist() == [0.0] * 4
    assert torch.allclose(prune_only.rho, torch.full((4,), 0.01))
    assert not prune_only.distils()


def test_weights_distils():
    zeros = torch.zeros(3)
    assert not Weights(torch.tensor(0.0), zeros, torch.ones(3)).distils()
    assert Weights(torch.tensor(0.5), zeros, zeros).distils()
    assert Weights(torch.tensor(0.0), torch.tensor([0.0, 0.1, 0.0]), zeros).distils()
    # works on weights that carry gradients (the dean's output)
    a = torch.tensor([0.0, 0.2, 0.0], requires_grad=True)
    w = Weights(torch.tensor(0.0, requires_grad=True), a * 2, zeros)
    assert w.distils()
    d = w.detached()
    assert not d.alpha.requires_grad and not d.alpha_out.requires_grad and d.alpha.tolist() == w.alpha.tolist()


@pytest.mark.parametrize("name", ["nope", "Fixed", ""])
def test_unknown_policy_is_a_user_error(name):
    with pytest.raises(LISError, match="policy.name"):
        create_policy(name, alpha_out=1.0, alpha=1.0, rho=1e-3)


def test_whether_weights_distil_is_known_without_reading_them():
    """A fixed policy knows from its constants whether it distils, and the dean always does, so the KDP loop
    asks without a host sync; weights of unknown origin are read (one sync)."""
    from lis.dean import create_dean
    from lis.signals import SignalTracker

    state = SignalTracker(3).state()
    assert FixedPolicy(0.0, [0.0, 0.5, 0.0], 0.1)(state).known_distils is True
    assert FixedPolicy(0.0, 0.0, 0.1)(state).known_distils is False
    assert FixedPolicy(1.0, 0.0, 0.1)(state).detached().known_distils is True
    assert create_dean()(state).known_distils is True
    zero, one = torch.zeros(3), torch.tensor([0.0, 0.0, 2.0])
    assert Weights(torch.tensor(0.0), one, zero).distils() and not Weights(torch.tensor(0.0), zero, zero).distils()
