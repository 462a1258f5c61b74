"""Hypergradients dL_meta/da_out, dL_meta/da_l, dL_meta/dr_l: what every meta step logs, and what
``meta.measure=true`` measures for a frozen policy."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lis import plots
from lis.config import load_config
from lis.meta import MetaLearner
from lis.pipeline import compress
from lis.policy import FixedPolicy, Weights
from tests.test_meta import setup

REPO = Path(__file__).resolve().parents[1]


def weights_of(policy, signals, dtype=torch.float64) -> Weights:
    w = policy(signals)
    return Weights(w.alpha_out.to(dtype), w.alpha.to(dtype), w.rho.to(dtype))


@pytest.mark.parametrize("backend", ["higher", "func"])
@pytest.mark.parametrize("unroll", [1, 2])
def test_measured_hypergradients_match_central_differences_per_layer(backend, unroll):
    """Bug caught: a hypergradient taken of the wrong tensor, summed over layers, assigned to the wrong
    layer, or lost (zero) for r_l. Each entry is checked against a central difference of the meta objective
    in that one weight, on the same batches and unroll, in float64."""
    student, room, admm, _, signals, batch, meta_batch = setup()
    policy = FixedPolicy(0.8, [0.6, 1.4], [0.05, 0.3]).to(torch.float64)
    learner = MetaLearner(policy, lr=1e-3, unroll=unroll, beta=0.7, backend=backend, measure=True)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    out = learner(student, opt, room, admm, signals, batch, meta_batch)
    base = weights_of(policy, signals)

    def objective(w: Weights) -> float:
        return float(learner.objective(student, room, admm, signals, batch, meta_batch, 0.5, opt, w)[0].detach())

    eps = 1e-6
    checked = []
    for name, index, logged in [("alpha_out", None, out["hg_alpha_out"])] + \
            [("alpha", l, out["hg_alpha"][l]) for l in range(2)] + [("rho", l, out["hg_rho"][l]) for l in range(2)]:
        def shifted(sign: float) -> Weights:
            w = copy.deepcopy(base)
            t = getattr(w, name)
            if index is None:
                setattr(w, name, t + sign * eps)
            else:
                t[index] += sign * eps
            return w

        numeric = (objective(shifted(1)) - objective(shifted(-1))) / (2 * eps)
        assert logged == pytest.approx(numeric, rel=1e-4, abs=1e-9), (name, index, logged, numeric)
        checked.append(abs(numeric))
    assert min(checked) > 1e-6  # every weight moves the objective: no check passes on a zero
    assert out["hg_alpha"][0] != pytest.approx(out["hg_alpha"][1], rel=1e-3)  # the layers differ


def test_a_measurement_updates_nothing():
    """Bug caught: a measuring learner that steps the policy or leaves gradients on the student."""
    student, room, admm, _, signals, batch, meta_batch = setup()
    policy = FixedPolicy(1.0, 1.0, 0.1)
    before = copy.deepcopy(student.state_dict())
    learner = MetaLearner(policy, lr=1e-3, measure=True)
    learner(student, torch.optim.SGD(student.parameters(), lr=0.5), room, admm, signals, batch, meta_batch)
    assert all(p.grad is None for p in student.parameters())
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    assert learner.state_dict() == {"opt": None, "pending": 0, "grads": []}


@pytest.mark.parametrize("learn_rho", [True, False])
def test_the_dean_update_is_unchanged_by_taking_the_hypergradients(learn_rho):
    """Bug caught: passing the hypergradients through the dean by hand (the chain rule at its outputs) gives
    another update than backpropagating L_meta into the dean directly, or drops dL/dr_l's path."""
    student, room, admm, dean, signals, batch, meta_batch = setup()
    dean.learn_rho = learn_rho
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    learner = MetaLearner(dean, lr=1e-2, beta=0.7)
    loss, _ = learner.objective(student, room, admm, signals, batch, meta_batch, 0.5, opt)
    expected = torch.autograd.grad(loss, list(dean.parameters()), allow_unused=True)
    learner.opt.step = learner.opt.zero_grad = lambda *args, **kw: None  # keep the gradients to compare
    out = learner(student, opt, room, admm, signals, batch, meta_batch)
    for p, g in zip(dean.parameters(), expected):
        torch.testing.assert_close(p.grad, g if g is not None else torch.zeros_like(p), rtol=1e-10, atol=1e-14)
    assert out["meta_loss"] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert len(out["hg_alpha"]) == len(out["hg_rho"]) == 2 and all(g != 0 for g in out["hg_rho"])


TINY = ["tracking.wandb=disabled", "run.threads=1", "teacher.epochs=1", "kdp.epochs=1", "finetune.epochs=1",
        "admm.interval=4", "signals.interval=1", "meta.interval=5", "policy.name=fixed"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def measured_and_plain(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("measure")
    dirs = []
    for name, extra in (("plain", []), ("measured", ["meta.measure=true"])):
        cfg = load_config(REPO / "experiments" / "digits.yaml", [*TINY, f"run.dir={root}", f"run.name={name}", *extra])
        dirs.append(compress(cfg))
    return dirs[0], dirs[1]


def test_a_measurement_run_trains_the_student_exactly_as_a_plain_fixed_run(measured_and_plain):
    """Bug caught: measuring the hypergradients changes training: BatchNorm statistics, optimizer state, the
    student's gradients or the random stream touched by the meta step. Every logged number of the plain run
    and the final pruned student must be identical, and the measurement must have logged per-layer values."""
    plain, measured = measured_and_plain
    meta_keys = {"meta_loss", "meta_ce", "hg_alpha_out", "hg_alpha", "hg_rho"}
    hg = [r for r in records(measured) if "hg_alpha" in r]
    assert len(hg) >= 3 and all(len(r["hg_alpha"]) == len(r["hg_rho"]) == 4 for r in hg)
    assert len({r["hg_alpha"][0] for r in hg}) == len(hg)  # measured anew at every meta step
    timing = ("wall_time_s", "time", "throughput")

    def comparable(rs):  # the student's phases (the first run trained the teacher), every record logged
        return [{k: v for k, v in r.items() if k not in meta_keys and not any(w in k for w in timing)}
                for r in rs if r["phase"] in ("kdp", "finetune", "summary")]

    assert comparable(records(measured)) == comparable(records(plain))
    a, b = torch.load(plain / "student.pt", weights_only=False), torch.load(measured / "student.pt",
                                                                          weights_only=False)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def meta_record(it: int, hg_alpha: list, hg_rho: list, hg_alpha_out: float) -> dict:
    return {"phase": "kdp", "iter": it, "epoch": 0, "alpha": [1.0, 1.0], "rho": [0.1, 0.1], "alpha_out": 1.0,
            "meta_loss": 1.0, "hg_alpha": hg_alpha, "hg_rho": hg_rho, "hg_alpha_out": hg_alpha_out}


def test_hypergradient_summary_by_hand():
    """Bug caught: the standard error taken with the population std or without the sqrt(n), layers mixed up, or
    the over-runs error taken over all meta steps pooled instead of over the runs' means."""
    header = {"phase": "kdp", "iter": 0, "layer_names": ["a", "b"]}
    one = plots.parse_records([header, meta_record(5, [1.0, -2.0], [0.0, 1.0], 0.5),
                               {"phase": "kdp", "iter": 7, "epoch": 0, "alpha": [1.0, 1.0]},  # no meta step
                               meta_record(10, [3.0, -4.0], [2.0, 1.0], 1.5)], "one")
    two = plots.parse_records([header, meta_record(5, [5.0, 0.0], [1.0, 1.0], 0.0)], "two")
    assert one.meta_steps.tolist() == [5, 10] and one.hg_alpha_out.tolist() == [0.5, 1.5]
    means, errors, mean, se = plots.hypergradient_summary([one, two], "hg_alpha")
    np.testing.assert_allclose(means, [[2.0, -3.0], [5.0, 0.0]])
    np.testing.assert_allclose(errors[0], [1.0, 1.0])  # std (ddof 1) sqrt(2) over sqrt(2) meta steps
    assert np.isnan(errors[1]).all()  # one meta step: no error
    np.testing.assert_allclose(mean, [3.5, -1.5])
    np.testing.assert_allclose(se, [1.5, 1.5])  # |2 - 5| / sqrt(2) / sqrt(2)


def test_lis_plot_draws_the_hypergradients(measured_and_plain, tmp_path):
    plain, measured = measured_and_plain
    written = {p.name for p in plots.plot([measured, plain], tmp_path / "overlay")}
    assert {"hypergradients.png", "hypergradients_per_layer.png"} <= written
    assert (measured / "plots" / "hypergradients.png").is_file()
    assert not (plain / "plots" / "hypergradients.png").exists()  # a plain run has none to draw
    assert (tmp_path / "overlay" / "hypergradients_per_layer.png").is_file()
