"""The layer spread: how much the policy's per-layer weights differ, from a run's logged weights."""

import math

import pytest

from lis.compare import aggregate, format_table, row_from_summary
from lis.report import layer_spread


def step(alpha, rho):
    return {"phase": "kdp", "iter": 1, "alpha": alpha, "rho": rho, "alpha_out": 1.0}


def test_layer_spread_by_hand():
    """Bug caught: the std taken over time instead of across layers, the sample std, r_l on a linear scale, or
    records of other phases (fine-tuning, epoch ends) counted. Step 1: a_l = 0, 2 -> std 1; log r_l = log 0.1,
    log 10 -> std log 10. Step 2: every layer equal -> 0. Means: 0.5 and log(10) / 2."""
    records = [{"phase": "kdp", "iter": 0, "layer_names": ["a", "b"]}, step([0.0, 2.0], [0.1, 10.0]),
               {"phase": "kdp", "iter": 2, "epoch": 1, "test_acc": 0.5}, step([1.0, 1.0], [0.1, 0.1]),
               {"phase": "finetune", "epoch": 1, "alpha": [0.0, 9.0]}]
    spread = layer_spread(records)
    assert spread["alpha"] == pytest.approx(0.5)
    assert spread["log_rho"] == pytest.approx(math.log(10) / 2)


def test_no_kdp_or_no_admm_pull_has_no_spread():
    assert layer_spread([{"phase": "finetune", "epoch": 1}]) == {"alpha": None, "log_rho": None}
    assert layer_spread([step([1.0, 1.0], [0.0, 0.0])]) == {"alpha": 0.0, "log_rho": None}  # kd_only: r = 0


def test_the_comparison_tables_show_it():
    summary = {"policy": "fixed", "seed": 0, "student_acc": 0.9, "val_acc": None, "teacher_acc": 0.95,
               "params": {"student": 10}, "macs": {"student": 100}, "params_reduction": 0.5, "macs_reduction": 0.5,
               "latency_ms": {"student": 1.0}, "wall_time_s": 3.0, "layer_spread": {"alpha": 0.25, "log_rho": None}}
    rows = [row_from_summary("fixed", summary), row_from_summary("fixed", {**summary, "seed": 1,
                                                                          "layer_spread": {"alpha": 0.75,
                                                                                           "log_rho": None}})]
    assert rows[0]["layer_spread_alpha"] == 0.25 and math.isnan(rows[0]["layer_spread_log_rho"])
    (agg,) = aggregate(rows)
    assert agg["layer_spread_alpha_mean"] == pytest.approx(0.5)
    assert format_table([agg]).splitlines()[0].endswith("| layer spread a_l | layer spread log r_l |")
    assert "| 0.500 ± 0.354 |" in format_table([agg])
    old = {k: v for k, v in summary.items() if k != "layer_spread"}  # a run written before it existed
    assert math.isnan(row_from_summary("fixed", old)["layer_spread_alpha"])
