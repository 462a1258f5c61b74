"""Tests for lis/bench.py: the choice on the validation split against a hand computation, then one real tiny
bench on digits (grid of two fixed settings x selection seeds 0, 1; fixed, prune_only, dean x report seeds 2, 3)
that the report and resume tests read."""

import csv
import math
import statistics
from pathlib import Path

import pytest

import lis.pipeline
from lis import cli
from lis.baselines import EXTERNAL, ONE_SHOT
from lis.bench import POLICIES, choose, chosen_sweeps
from lis.config import load_config
from lis.errors import LISError
from lis.policy import PRESETS

TINY = ["tracking.wandb=disabled", "teacher.epochs=1", "kdp.epochs=1", "finetune.epochs=1", "admm.interval=5",
        "signals.interval=5", "meta.interval=5"]
GRID = ["policy.alpha=0.5,2"]
POLICY_SUBSET, SELECT, REPORT = ["fixed", "prune_only", "dean"], [0, 1], [2, 3]
BENCHES = sorted((Path(__file__).resolve().parents[1] / "experiments" / "bench").glob("*.yaml"))


def row(label, seed, val, test=0.5):
    return {"label": label, "policy": label.split("[")[0], "seed": seed, "student_acc": test, "val_acc": val,
            "teacher_acc": 0.9, "params": 1, "macs": 1, "params_reduction": 0.5, "macs_reduction": 0.5,
            "latency_ms": 1.0, "wall_time_s": 1.0, "layer_spread_alpha": 0.0, "layer_spread_log_rho": 0.0}


def test_choose_takes_the_best_mean_validation_accuracy_never_the_test_accuracy():
    rows = [row("fixed[policy.alpha=1]", 0, 0.80, test=0.99), row("fixed[policy.alpha=1]", 1, 0.84, test=0.99),
            row("fixed[policy.alpha=2]", 0, 0.83, test=0.10), row("fixed[policy.alpha=2]", 1, 0.82, test=0.10)]
    assert choose(rows)["label"] == "fixed[policy.alpha=2]"  # 0.825 > 0.82, though its test accuracy is lower
    assert choose(rows[:2] + [row("fixed[policy.alpha=2]", 0, 0.82)])["label"] == "fixed[policy.alpha=1]"  # ties: first
    with pytest.raises(LISError, match="val_acc"):
        choose([row("fixed", 0, math.nan)])


def test_chosen_sweeps_apply_the_label_to_the_fixed_policy_only():
    assert chosen_sweeps("fixed[policy.alpha=1,policy.rho=0.1]") == ["policy.alpha=1", "policy.rho=0.1"]
    assert chosen_sweeps("fixed") == []


@pytest.mark.parametrize("path", BENCHES, ids=lambda p: p.stem)
def test_bench_configs_load_on_the_hard_variant_with_a_deep_resnet(path):
    cfg = load_config(path)
    assert cfg.data.name == "mnist1d_hard" and cfg.model.name.startswith("resnet") and cfg.model.name.endswith("_1d")
    # the file names its budget (mnist1d_hard_95: 95% of the MACs cut)
    assert cfg.prune.target_macs_reduction == int(path.stem.rsplit("_", 1)[1]) / 100


def test_the_default_bench_runs_every_policy():
    assert set(POLICIES) == {"dean", *ONE_SHOT, *EXTERNAL, *PRESETS}


@pytest.mark.parametrize("argv, message", [
    (["--select-seeds", "0-2", "--report-seeds", "2-3"], "both selection and report seeds"),
    (["--policies", "dean,prune_only"], "keep fixed in --policies"),
    (["--policies", "fixed,dean,nope"], "nope"),
    (["--sweep", "policy.alpha=1", "--report-seeds", "5", "run.seed=3"], "run.seed"),
])
def test_user_mistakes_fail_before_any_run_directory_is_made(repo, tmp_path, capsys, argv, message):
    code = cli.main(["bench", str(repo / "experiments" / "digits.yaml"), f"run.dir={tmp_path}", *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    config = Path(__file__).resolve().parents[1] / "experiments" / "digits.yaml"
    argv = ["bench", str(config), f"run.dir={root / 'runs'}", f"data.root={root / 'data'}", *TINY,
            "--policies", ",".join(POLICY_SUBSET), "--select-seeds", "0,1", "--report-seeds", "2,3",
            "--sweep", GRID[0], "--name", "tiny"]
    assert cli.main(argv) == 0
    return argv, root / "runs"


@pytest.mark.slow
def test_the_setting_chosen_on_val_is_the_one_reported(tiny_bench):
    _, runs = tiny_bench
    selection = read_csv(runs / "tiny-select" / "comparison.csv")
    assert sorted((r["label"], int(r["seed"])) for r in selection) == sorted(
        (f"fixed[policy.alpha={a}]", s) for a in ("0.5", "2") for s in SELECT)
    by_label = {}
    for r in selection:
        by_label.setdefault(r["label"], []).append(float(r["val_acc"]))
    best = max(by_label, key=lambda label: statistics.fmean(by_label[label]))
    report = read_csv(runs / "tiny" / "comparison.csv")
    assert sorted({int(r["seed"]) for r in report}) == REPORT
    assert {r["label"] for r in report} == {best, "prune_only", "dean"}
    md = (runs / "tiny" / "bench.md").read_text()
    assert f"| `{best}` (chosen) | 2 |" in md and "selection seeds 0, 1" in md and "report seeds 2, 3" in md


@pytest.mark.slow
def test_the_report_has_per_policy_means_and_the_dean_paired_against_each_baseline(tiny_bench):
    _, runs = tiny_bench
    report = read_csv(runs / "tiny" / "comparison.csv")
    acc = {(r["label"], int(r["seed"])): float(r["student_acc"]) for r in report}
    rows = {r["label"]: r for r in read_csv(runs / "tiny" / "bench.csv")}
    assert set(rows) == {r["label"] for r in report}
    for label, r in rows.items():
        values = [acc[label, s] for s in REPORT]
        assert float(r["student_acc_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(r["student_acc_std"]) == pytest.approx(statistics.stdev(values))
        if label == "dean":
            assert r["dean_minus_mean"] == ""
            continue
        diffs = [acc["dean", s] - acc[label, s] for s in REPORT]
        half = 12.706204736174707 * statistics.stdev(diffs) / math.sqrt(2)  # t(0.975) with 1 degree of freedom
        assert float(r["dean_minus_mean"]) == pytest.approx(statistics.fmean(diffs))
        assert float(r["dean_minus_lo"]) == pytest.approx(statistics.fmean(diffs) - half)
        assert float(r["dean_minus_hi"]) == pytest.approx(statistics.fmean(diffs) + half)
    md = (runs / "tiny" / "bench.md").read_text()
    assert "| `prune_only` |" in md and "95% CI" in md and "Teacher test accuracy" in md


@pytest.mark.slow
def test_a_second_bench_skips_every_finished_run(tiny_bench, monkeypatch, capsys):
    argv, runs = tiny_bench
    calls = []
    monkeypatch.setattr(lis.pipeline, "compress", lambda *a, **k: calls.append(a))
    before = (runs / "tiny" / "bench.csv").read_text()
    assert cli.main(argv) == 0
    assert calls == [] and capsys.readouterr().out.count("skip (done)") == 4 + 6
    assert (runs / "tiny" / "bench.csv").read_text() == before


@pytest.mark.slow
@pytest.mark.parametrize("path", BENCHES, ids=lambda p: p.stem)
def test_bench_config_runs_end_to_end_on_a_tiny_budget(path, tmp_path):
    """The bench's own data and model through a whole run (what test_experiments does for experiments/*.yaml)."""
    import json

    cfg = load_config(path, [f"run.dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", *TINY,
                             "data.mnist1d_train_size=300", "data.mnist1d_test_size=100", "policy.name=dean"])
    summary = json.loads((lis.pipeline.compress(cfg) / "summary.json").read_text())
    assert summary["model"] == "resnet20_1d"
    assert summary["macs_reduction"] >= cfg.prune.target_macs_reduction - 1e-9
