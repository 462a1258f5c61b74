"""Per-layer fixed weights: ``policy.alpha`` / ``policy.rho`` as one value per channel group, in the loss terms,
in a run, and swept by ``lis compare --sweep``."""

import json
from pathlib import Path

import pytest
import torch

from lis.bench import chosen_sweeps
from lis.compare import _plan, parse_sweep
from lis.config import load_config
from lis.pipeline import build_policy, compress
from lis.policy import FixedPolicy
from lis.school import Lesson
from lis.signals import SignalTracker

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "experiments" / "digits.yaml"
TINY = ["tracking.wandb=disabled", "run.threads=1", "teacher.epochs=1", "kdp.epochs=1", "finetune.epochs=1",
        "admm.interval=4", "signals.interval=3", "policy.name=fixed"]


def test_per_layer_weights_weigh_each_layers_loss_terms_by_hand():
    """Bug caught: the per-layer list applied in the wrong order, broadcast from its first value, or reaching
    only one of the terms. 0.5 * 2 + (0 * 1 + 1 * 3 + 2 * 5 + 0.25 * 7) = 15.75; the ADMM weights reach the
    penalty per layer as given."""
    cfg = load_config(DIGITS, ["policy.name=fixed", "policy.alpha_out=0.5", "policy.alpha=[0,1,2,0.25]",
                               "policy.rho=[0.1,0.2,0.3,1e-3]"])
    w = build_policy(cfg)(SignalTracker(4).state())
    lesson = Lesson(torch.zeros(1, 2), torch.tensor(0.0), torch.tensor(2.0), torch.tensor([1.0, 3.0, 5.0, 7.0]))
    assert float(lesson.distillation(w)) == 15.75
    assert w.rho.tolist() == pytest.approx([0.1, 0.2, 0.3, 1e-3])


def test_a_list_needs_one_value_per_layer():
    with pytest.raises(ValueError, match="3 per-layer weights for 4 layers"):
        FixedPolicy(1.0, [1.0, 1.0, 1.0], 0.1)(SignalTracker(4).state())


@pytest.fixture(scope="module")
def scalar_and_list(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("per_layer")
    return tuple(compress(load_config(DIGITS, [*TINY, f"run.dir={root}", f"run.name={name}", f"policy.alpha={a}",
                                               f"policy.rho={r}"]))
                 for name, a, r in (("scalar", "0.5", "0.1"), ("list", "[0.5,0.5,0.5,0.5]", "[0.1,0.1,0.1,0.1]")))


def test_a_scalar_is_the_constant_list(scalar_and_list):
    """Bug caught: a per-layer list that takes another path than the scalar (another dtype, device or a
    different broadcast), so the 'same' setting trains differently. Every KDP and fine-tuning record is equal."""
    def records(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if "time" not in k} for r in rows if r["phase"] in ("kdp", "finetune")]

    scalar, per_layer = scalar_and_list
    assert records(scalar) == records(per_layer)
    assert all(r["alpha"] == [0.5] * 4 for r in records(per_layer) if "alpha" in r)


def test_a_sweep_over_lists_makes_one_run_per_list():
    """Bug caught: the commas inside a list taken as separators of the sweep's values (eight runs of
    'policy.alpha=[0' ...), or a list value lost on its way into the run's config."""
    assert parse_sweep("policy.alpha=[0, 1,1,1],[1,1,1,1],2") == ("policy.alpha", ["[0,1,1,1]", "[1,1,1,1]", "2"])
    runs = _plan(DIGITS, ["fixed", "prune_only"], [0], [],
                 ["policy.alpha=[0,1,1,1],[2,1,1,1]", "policy.rho=0.1,[0.1,0.1,0.1,1]"], "cmp")
    fixed = [(label, cfg.policy.alpha, cfg.policy.rho) for label, p, _, cfg, _ in runs if p == "fixed"]
    assert fixed == [
        ("fixed[policy.alpha=[0,1,1,1],policy.rho=0.1]", [0.0, 1.0, 1.0, 1.0], 0.1),
        ("fixed[policy.alpha=[0,1,1,1],policy.rho=[0.1,0.1,0.1,1]]", [0.0, 1.0, 1.0, 1.0], [0.1, 0.1, 0.1, 1.0]),
        ("fixed[policy.alpha=[2,1,1,1],policy.rho=0.1]", [2.0, 1.0, 1.0, 1.0], 0.1),
        ("fixed[policy.alpha=[2,1,1,1],policy.rho=[0.1,0.1,0.1,1]]", [2.0, 1.0, 1.0, 1.0], [0.1, 0.1, 0.1, 1.0]),
    ]
    assert [label for label, p, *_ in runs if p == "prune_only"] == ["prune_only"]
    assert len({cfg.run.name for *_, cfg, _ in runs}) == len(runs)
    # the bench turns the chosen label back into its overrides
    assert chosen_sweeps(fixed[1][0]) == ["policy.alpha=[0,1,1,1]", "policy.rho=[0.1,0.1,0.1,1]"]


def test_a_runs_summary_has_the_layer_spread_of_its_logged_weights(scalar_and_list):
    from lis.report import layer_spread

    _, per_layer = scalar_and_list
    summary = json.loads((per_layer / "summary.json").read_text())
    records = [json.loads(line) for line in (per_layer / "metrics.jsonl").read_text().splitlines()]
    assert summary["layer_spread"] == layer_spread(records) == {"alpha": 0.0, "log_rho": 0.0}
