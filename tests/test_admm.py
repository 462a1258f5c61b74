"""lis/admm.py: the Z-step projection, the dual update, the penalty and its gradient, the keep budget.

Every number is checked against an independent computation: a projection
written out by hand or found by brute force over supports, the penalty built
from the parameters by hand, its gradient from autograd, and the keep plan
from a linear greedy scan (``plan_keep`` bisects).
"""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lis.models
from archs import ARCHS
from lis.admm import ADMMState, group_rows, plan_keep, project_rows, rows
from lis.errors import LISError
from lis.groups import CostModel, find_groups
from lis.measure import count_macs, count_params
from lis.prune import hard_prune


class TwoConv(nn.Module):
    """conv1(2->4, bias)-BN-ReLU, conv2(4->3)-BN-ReLU, global pool, Linear(3, 5)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class LinearCost:
    """A stand-in for ``CostModel``: cost = number of kept channels."""

    def macs(self, keep):
        return sum(keep.values())

    params = macs


def tiny():
    """TwoConv with random BN affine parameters (so every out-slice matters), its input and groups."""
    torch.manual_seed(0)
    model = TwoConv()
    for bn in (model.bn1, model.bn2):
        nn.init.normal_(bn.weight), nn.init.normal_(bn.bias)
    x = torch.randn(2, 2, 6, 6)
    return model, x, find_groups(model, x)


def w_by_hand(model):
    """W_l of both groups built from the parameters directly (one row per channel), detached."""
    m = model
    with torch.no_grad():
        return {
            "conv1": torch.cat([m.conv1.weight.reshape(4, 18), m.conv1.bias[:, None],
                                m.bn1.weight[:, None], m.bn1.bias[:, None]], 1),
            "conv2": torch.cat([m.conv2.weight.reshape(3, 36), m.bn2.weight[:, None], m.bn2.bias[:, None]], 1),
        }


def proj_by_hand(x, k):
    """Keep the k rows of largest norm (ties: lower index), zero the rest; plain Python sorting."""
    norms = [float(r.norm()) for r in x]
    kept = sorted(range(len(norms)), key=lambda i: (-norms[i], i))[:k]
    mask = torch.tensor([i in kept for i in range(len(norms))])
    return torch.where(mask[:, None], x, torch.zeros_like(x)), mask


# ---------------------------------------------------------------- projection


def test_project_rows_on_a_hand_made_matrix():
    x = torch.tensor([[3.0, 0.0, 0.0],   # norm 3
                      [0.0, 1.0, 0.0],   # norm 1
                      [1.0, 2.0, 2.0],   # norm 3: ties with row 0, which wins (lower index)
                      [0.0, 0.0, 4.0]])  # norm 4
    z, keep = project_rows(x, 2)
    assert torch.equal(z, torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 4.0]]))
    assert keep.tolist() == [True, False, False, True]
    z3, keep3 = project_rows(x, 3)
    assert torch.equal(z3, torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [0.0, 0.0, 4.0]]))
    assert keep3.tolist() == [True, False, True, True]
    assert torch.equal(project_rows(x, 4)[0], x)
    assert torch.equal(project_rows(x, 0)[0], torch.zeros(4, 3)) and not project_rows(x, 0)[1].any()


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_project_rows_is_the_euclidean_projection(k):
    # the nearest point with a given support S is x restricted to S, so the projection onto
    # "at most k non-zero rows" is the best of all supports of size k: find it by brute force
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    z, keep = project_rows(x, k)
    assert int(keep.sum()) == k == int((z.abs().sum(1) > 0).sum())
    assert torch.equal(z[keep], x[keep]) and torch.equal(z[~keep], torch.zeros_like(x[~keep]))
    best = min(float(x[[i for i in range(5) if i not in s]].pow(2).sum())
               for s in itertools.combinations(range(5), k))
    assert float((x - z).pow(2).sum()) == pytest.approx(best, rel=1e-12, abs=1e-12)
    # the kept rows are the k of largest L2 norm
    norms = x.norm(dim=1)
    if 0 < k < 5:
        assert norms[keep].min() > norms[~keep].max()


def test_rows_and_group_rows_by_hand():
    model, _, groups = tiny()
    t = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(rows(t, 1), torch.stack([t[:, c, :].flatten() for c in range(3)]))
    params = dict(model.named_parameters())
    assert [g.name for g in groups] == ["conv1", "conv2"]
    for g in groups:
        assert torch.equal(group_rows(params, g), w_by_hand(model)[g.name])
    assert group_rows(params, groups[0]).requires_grad  # differentiable: the meta step needs it


# ---------------------------------------------------------------- Z and U


def test_z_and_u_follow_the_admm_updates_by_hand():
    model, _, groups = tiny()
    state = ADMMState(model, groups, LinearCost(), budgets={"macs": 0.4}, min_keep_ratio=0.25)
    # 7 channels, budget 0.6 * 7 = 4.2: keep 4 in all
    assert sum(state.keep.values()) == 4
    assert all(state.keep[g.name] >= math.ceil(0.25 * g.num_channels) for g in groups)
    w0 = w_by_hand(model)
    for name, w in w0.items():
        z, mask = proj_by_hand(w, state.keep[name])
        assert torch.equal(state.Z[name], z) and torch.equal(state.masks[name], mask)
        assert torch.equal(state.U[name], torch.zeros_like(w))

    # move W by hand, then the U-step: U = 0 + W - Z
    with torch.no_grad():
        model.conv1.weight.add_(0.3)
        model.bn1.bias.mul_(-2.0)
        model.conv2.weight[1].mul_(0.01)
    w1 = w_by_hand(model)
    state.update_duals(model)
    for name in w1:
        assert torch.equal(state.U[name], w1[name] - state.Z[name])

    # the Z-step re-plans k from the norms of W + U and projects W + U
    z_old = {n: z.clone() for n, z in state.Z.items()}
    state.project(model)
    assert sum(state.keep.values()) == 4
    for name in w1:
        v = w1[name] + (w1[name] - z_old[name])
        z, mask = proj_by_hand(v, state.keep[name])
        torch.testing.assert_close(state.Z[name], z, rtol=0, atol=1e-6)
        assert torch.equal(state.masks[name], mask)
        assert int(state.masks[name].sum()) == state.keep[name]
        assert int((state.Z[name].abs().sum(1) > 0).sum()) == state.keep[name]

    # a second U-step accumulates: U = U + W - Z
    u_old = {n: u.clone() for n, u in state.U.items()}
    state.update_duals(model)
    for name in w1:
        torch.testing.assert_close(state.U[name], u_old[name] + w1[name] - state.Z[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(state.keep_ratio(),
                               torch.tensor([state.keep["conv1"] / 4, state.keep["conv2"] / 3]))


def moved_state(rho_dtype=torch.float32):
    """A state whose W, Z and U all differ (so the penalty and its gradient are non-trivial)."""
    model, _, groups = tiny()
    state = ADMMState(model, groups, LinearCost(), budgets={"macs": 0.4}, min_keep_ratio=0.25)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state.update_duals(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, groups, state


def test_penalty_by_hand():
    model, _, state = moved_state()
    rho = torch.tensor([0.3, 2.0])
    w = w_by_hand(model)
    expected = sum(r / 2 * float((w[n] - state.Z[n] + state.U[n]).pow(2).sum())
                   for r, n in zip(rho.tolist(), ["conv1", "conv2"]))
    got = state.penalty(dict(model.named_parameters()), rho)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-5) and expected > 0
    # it reads whatever weights it is given (the fast weights of a meta step)
    fast = {n: 2 * p for n, p in model.named_parameters()}
    expected_fast = sum(r / 2 * float((2 * w[n] - state.Z[n] + state.U[n]).pow(2).sum())
                        for r, n in zip(rho.tolist(), ["conv1", "conv2"]))
    assert float(state.penalty(fast, rho).detach()) == pytest.approx(expected_fast, rel=1e-5)
    # and is differentiable in rho: d/d rho_l = ||W_l - Z_l + U_l||^2 / 2
    rho_var = rho.clone().requires_grad_(True)
    (g_rho,) = torch.autograd.grad(state.penalty(dict(model.named_parameters()), rho_var), rho_var)
    torch.testing.assert_close(g_rho, torch.tensor(
        [float((w[n] - state.Z[n] + state.U[n]).pow(2).sum()) / 2 for n in ["conv1", "conv2"]]).float())


@pytest.mark.parametrize("existing_grad", [False, True])
def test_penalty_grad_equals_autograd_of_penalty(existing_grad):
    model, groups, state = moved_state()
    rho = torch.tensor([0.7, 1.5])
    tensors = {n: p for n, p in model.named_parameters() if any(n == s for g in groups for s, _ in g.out_slices)}
    assert set(tensors) == {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "conv2.weight",
                            "bn2.weight", "bn2.bias"}
    names = list(tensors)
    auto = torch.autograd.grad(state.penalty(dict(model.named_parameters()), rho), [tensors[n] for n in names])
    before = {}
    for n, p in model.named_parameters():
        p.grad = torch.randn_like(p) if existing_grad else None
        before[n] = None if p.grad is None else p.grad.clone()
    state.penalty_grad_(model, rho)
    for n, a in zip(names, auto):
        expected = a if before[n] is None else before[n] + a
        torch.testing.assert_close(tensors[n].grad, expected, rtol=1e-5, atol=1e-6)
    # parameters outside every group are left alone
    for n in ("fc.weight", "fc.bias"):
        p = dict(model.named_parameters())[n]
        assert (p.grad is None) if before[n] is None else torch.equal(p.grad, before[n])


def test_gap_by_hand():
    model, _, state = moved_state()
    w = w_by_hand(model)
    expected = [float((w[n] - state.Z[n]).norm() / w[n].norm()) for n in ["conv1", "conv2"]]
    torch.testing.assert_close(state.gap(model), torch.tensor(expected), rtol=1e-5, atol=0)
    # W equal to Z (the sparse structure reached): gap 0
    with torch.no_grad():
        params = dict(model.named_parameters())
        for g in state.groups:
            z, offset = state.Z[g.name], 0
            for name, dim in g.out_slices:
                t = params[name]
                width = rows(t, dim).shape[1]
                t.copy_(z[:, offset:offset + width].reshape(t.movedim(dim, 0).shape).movedim(0, dim))
                offset += width
    assert torch.equal(state.gap(model), torch.zeros(2))


def test_state_dict_round_trip():
    model, groups, state = moved_state()
    other = ADMMState(model, groups, LinearCost(), budgets={"macs": 0.1}, min_keep_ratio=0.25)
    other.load_state_dict(state.state_dict())
    assert other.keep == state.keep
    rho = torch.tensor([1.0, 3.0])
    params = dict(model.named_parameters())
    for n in state.Z:
        assert torch.equal(other.Z[n], state.Z[n]) and torch.equal(other.U[n], state.U[n])
        assert torch.equal(other.masks[n], state.masks[n])
    assert torch.equal(other.penalty(params, rho), state.penalty(params, rho))


# ---------------------------------------------------------------- plan_keep


def greedy_keep(norms, cost, target, min_keep_ratio):
    """Reference plan: give up channels one at a time, lowest norm / group max first, until the budget holds.

    Returns None where even every group at its floor misses the budget.
    """
    full = {g: len(n) for g, n in norms.items()}
    floor = {g: max(1, math.ceil(min_keep_ratio * n)) for g, n in full.items()}
    budget = (1.0 - target) * cost(full)
    candidates = []
    for g, n in norms.items():
        scaled = sorted(float(v) / max(float(n.max()), 1e-12) for v in n)
        candidates += [(s, i, g) for i, s in enumerate(scaled[: full[g] - floor[g]])]
    candidates.sort(key=lambda c: c[0])  # stable: equal values keep the order of the groups
    keep = dict(full)
    for _, _, g in candidates:
        if cost(keep) <= budget:
            return keep
        keep[g] -= 1
    return keep if cost(keep) <= budget else None


def linear(keep):
    return sum(keep.values())


def chain(keep):
    """MACs-like cost of a chain a -> b -> c of convs (in 3, per-channel positions 10): quadratic in keep."""
    a, b, c = keep["a"], keep["b"], keep["c"]
    return 10 * (3 * a + a * b + b * c) + 7 * c


def test_plan_keep_gives_up_the_smallest_normalised_norms_first():
    norms = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]),  # scaled .25 .5 .75 1
             "b": torch.tensor([10.0, 1.0, 6.0])}       # scaled 1 .1 .6
    # 7 channels, budget 3.5: give up 4, in the order b(.1), a(.25), a(.5), b(.6)
    assert plan_keep(norms, [("macs", linear, 0.5)], 0.0) == {"a": 2, "b": 1}
    # budget 0.9 * 7 = 6.3: one channel, the weakest overall (b's .1)
    assert plan_keep(norms, [("macs", linear, 0.1)], 0.0) == {"a": 4, "b": 2}
    assert plan_keep(norms, [("macs", linear, 0.0)], 0.0) == {"a": 4, "b": 3}
    # the ranking uses norm / group max: scaling a whole group changes nothing
    assert plan_keep({"a": norms["a"] * 100, "b": norms["b"]}, [("macs", linear, 0.5)], 0.0) == {"a": 2, "b": 1}
    # a group whose channels shrank (high sparsability) gives up more
    shrunk = {"a": torch.ones(4), "b": torch.tensor([1.0, 0.01, 0.02, 0.9])}
    assert plan_keep(shrunk, [("macs", linear, 0.25)], 0.0) == {"a": 4, "b": 2}


def test_plan_keep_respects_the_floor_and_says_when_the_target_is_impossible():
    norms = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 1.0, 6.0])}
    # floors ceil(0.5 * 4) = 2 and ceil(0.5 * 3) = 2: b may give up only its .1 channel
    assert plan_keep(norms, [("macs", linear, 0.4)], 0.5) == {"a": 2, "b": 2}
    with pytest.raises(LISError, match=r"prune\.min_keep_ratio"):
        plan_keep(norms, [("macs", linear, 0.5)], 0.5)
    # every group keeps at least one channel even with a zero floor ratio
    with pytest.raises(LISError, match=r"prune\.min_keep_ratio"):
        plan_keep(norms, [("macs", linear, 0.8)], 0.0)
    assert plan_keep(norms, [("macs", linear, 5 / 7 - 1e-9)], 0.0) == {"a": 1, "b": 1}


@pytest.mark.parametrize("target", [0.2, 0.5, 0.75, 0.9])
def test_plan_keep_is_the_least_removal_that_meets_the_budget(target):
    gen = torch.Generator().manual_seed(int(target * 100))
    norms = {g: torch.rand(n, generator=gen) + 0.01 for g, n in [("a", 8), ("b", 16), ("c", 12)]}
    keep = plan_keep(norms, [("macs", chain, target)], 0.1)
    full = {"a": 8, "b": 16, "c": 12}
    budget = (1 - target) * chain(full)
    assert chain(keep) <= budget
    assert all(math.ceil(0.1 * full[g]) <= keep[g] <= full[g] for g in full)
    assert keep == greedy_keep(norms, chain, target, 0.1)
    # minimal: putting back the last channel given up (the largest scaled norm among them) misses the budget
    given_up = [(float(v / norms[g].max()), g) for g in full
                for v in sorted(norms[g].tolist())[: full[g] - keep[g]]]
    last = max(given_up)[1]
    assert chain({**keep, last: keep[last] + 1}) > budget


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 10), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
    target=st.floats(0.0, 0.95),
    min_keep_ratio=st.floats(0.0, 1.0),
    quadratic=st.booleans(),
)
def test_plan_keep_property_budget_and_floors(sizes, seed, target, min_keep_ratio, quadratic):
    gen = torch.Generator().manual_seed(seed)
    norms = {g: torch.rand(n, generator=gen) for g, n in zip("abc", sizes)}
    cost = chain if quadratic else linear
    full = dict(zip("abc", sizes))
    floor = {g: max(1, math.ceil(min_keep_ratio * n)) for g, n in full.items()}
    budget = (1 - target) * cost(full)
    reference = greedy_keep(norms, cost, target, min_keep_ratio)
    if cost(floor) > budget:
        assert reference is None
        with pytest.raises(LISError, match=r"prune\.min_keep_ratio"):
            plan_keep(norms, [("macs", cost, target)], min_keep_ratio)
        return
    keep = plan_keep(norms, [("macs", cost, target)], min_keep_ratio)
    assert set(keep) == set(full)
    assert cost(keep) <= budget
    assert all(floor[g] <= keep[g] <= full[g] for g in full)
    assert keep == reference


# ---------------------------------------------------------------- the real cost model


def test_real_budget_on_mnist1d_cnn_is_met_by_the_physically_pruned_model():
    torch.manual_seed(0)
    model = lis.models.create("mnist1d_cnn", 10)
    x = torch.randn(2, 1, 40)
    groups = find_groups(model, x)
    cost = CostModel(model, groups, x)
    state = ADMMState(model, groups, cost, budgets={"macs": 0.75}, min_keep_ratio=0.1)
    assert all(int(state.masks[g.name].sum()) == state.keep[g.name] for g in groups)
    pruned = hard_prune(model, groups, state.masks, x)
    before, after = count_macs(model, (1, 40)), count_macs(pruned, (1, 40))
    assert after == cost.macs(state.keep)
    assert 0.75 <= 1 - after / before < 0.77
    # the pruned convs have exactly the planned widths
    assert [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv1d)] == [
        state.keep[g.name] for g in groups]

    # the parameter budget counts parameters instead
    by_params = ADMMState(model, groups, cost, budgets={"params": 0.5}, min_keep_ratio=0.1)
    small = hard_prune(model, groups, by_params.masks, x)
    assert 0.5 <= 1 - count_params(small) / count_params(model) < 0.52


def test_plan_keep_meets_every_budget_at_once():
    """Two budgets: the plan is the least removal that meets both (each alone would stop earlier)."""
    norms = {"a": torch.tensor([1.0, 0.9, 0.8, 0.7]), "b": torch.tensor([1.0, 0.1, 0.05])}
    a_only = lambda keep: keep["a"]  # noqa: E731
    b_only = lambda keep: keep["b"]  # noqa: E731
    keep_b = plan_keep(norms, [("params", b_only, 0.3)], 0.0)
    both = plan_keep(norms, [("params", b_only, 0.3), ("macs", a_only, 0.5)], 0.0)
    assert b_only(both) <= 0.7 * 3 and a_only(both) <= 0.5 * 4
    assert keep_b == {"a": 4, "b": 2}
    # b's weak channels go first, then a's: a must lose 2 channels, which the ranking reaches after b's two
    assert both == {"a": 2, "b": 1}


@pytest.mark.parametrize("name, shape", [a for a in ARCHS if a[0] != "resnet20"],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_planned_budget_holds_on_the_physically_pruned_model(name, shape):
    """The ADMM keep plan meets the MACs target on the real pruned model, within 2 points, for every arch."""
    from lis.measure import count_macs
    from lis.prune import hard_prune

    torch.manual_seed(0)
    model = lis.models.create(name, 10).eval()
    example = torch.zeros(2, *shape)
    groups = find_groups(model, example)
    state = ADMMState(model, groups, CostModel(model, groups, example), {"macs": 0.5}, 0.1)
    pruned = hard_prune(model, groups, state.masks, example)
    reduction = 1 - count_macs(pruned, shape) / count_macs(model, shape)
    assert 0.5 <= reduction <= 0.52, reduction


def test_a_state_restored_from_a_cpu_checkpoint_lives_on_its_models_device():
    """A GPU run resumes from a checkpoint loaded on the CPU: Z, U, the masks and the keep ratios must go back to
    the device the state was built on. The ``meta`` device stands in for the GPU (mixing it with the CPU raises,
    as CUDA does)."""
    model, _, groups = tiny()
    state = ADMMState(model, groups, LinearCost(), budgets={"macs": 0.4}, min_keep_ratio=0.25)
    saved = state.state_dict()  # on the CPU, as checkpoint.load gives it
    state.U = {n: u.to("meta") for n, u in state.U.items()}  # the state as a run on another device built it
    state.load_state_dict(saved)
    for part in (state.Z, state.U, state.masks):
        assert {t.device.type for t in part.values()} == {"meta"}
    assert state.keep_ratio().device.type == "meta" and state.keep == saved["keep"]


def test_penalty_grad_follows_z_and_u_when_they_change():
    """The pull is laid out once per Z/U step: after a Z-step, a U-step, or U changed in place, it must be that
    of the new Z and U (autograd of the penalty)."""
    model, groups, state = moved_state()
    rho = torch.tensor([0.7, 1.5])
    for change in (lambda: state.project(model), lambda: state.update_duals(model),
                   lambda: state.U["conv1"].mul_(0.5)):
        for p in model.parameters():
            p.grad = None
        state.penalty_grad_(model, rho)
        change()
        params = dict(model.named_parameters())
        auto = torch.autograd.grad(state.penalty(params, rho), list(params.values()), allow_unused=True)
        for p in model.parameters():
            p.grad = None
        state.penalty_grad_(model, rho)
        for (n, p), a in zip(params.items(), auto):
            if a is not None:
                torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6, msg=n)
