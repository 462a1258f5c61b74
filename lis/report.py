"""What a finished run reports: ``summary.json``, ``report.md`` and the closing lines on the terminal.

Accuracies are fractions in [0, 1] on the test split, taken after the last
epoch (nothing is selected on the test split). MACs are multiply-accumulates
per sample (what papers call FLOPs); reductions are 1 - student/teacher, so
0.75 means 4x smaller. Latency is the median CPU forward time of one batch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from torch import nn

from lis.config import Config
from lis.measure import count_macs, count_params, latency_ms


def summarize(cfg: Config, teacher: nn.Module, student: nn.Module, input_shape: tuple[int, ...],
              teacher_acc: float, student_acc: float, wall_time_s: float, layer_names: Sequence[str],
              channels: Sequence[int], kept: Sequence[int], *, val_acc: Optional[float],
              spread: Optional[dict] = None) -> dict:
    """The ``summary.json`` of a compress run (docs/design.md section 8), plus ``val_acc``: the pruned student's
    accuracy on the val split, which nothing trains on (not the teacher, the student or the dean), for
    choosing settings without the test split; None (null) when ``data.val_fraction`` is 0. Runs written
    before the val split existed measured ``val_acc`` on the meta split, which the dean reads. ``spread`` is
    ``layer_spread`` of the run's records (None: not known on this process)."""
    t_cpu, s_cpu = copy.deepcopy(teacher).cpu(), copy.deepcopy(student).cpu()
    params = {"teacher": count_params(t_cpu), "student": count_params(s_cpu)}
    macs = {"teacher": count_macs(t_cpu, input_shape), "student": count_macs(s_cpu, input_shape)}
    batch = min(cfg.data.batch_size, 64)
    latency = {"teacher": latency_ms(t_cpu, input_shape, batch), "student": latency_ms(s_cpu, input_shape, batch)}
    return {
        "policy": cfg.policy.name,
        "seed": cfg.run.seed,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "teacher_acc": teacher_acc,
        "student_acc": student_acc,
        "val_acc": val_acc,
        "params": params,
        "macs": macs,
        "params_reduction": 1 - params["student"] / params["teacher"],
        "macs_reduction": 1 - macs["student"] / macs["teacher"],
        "latency_ms": latency,
        "latency_batch_size": batch,
        "wall_time_s": wall_time_s,
        "layer_names": list(layer_names),
        "channels": {"before": list(channels), "after": list(kept)},
        "layer_spread": spread,
    }


def layer_spread(records: Sequence[dict]) -> dict:
    """How much the policy's per-layer weights differ: over the KDP step records of a run (those with the
    weights a_l, r_l), the mean of the std across layers (population std) of a_l, ``alpha``, and of log r_l,
    ``log_rho``. 0 for a policy that gives every layer the same weights; None without KDP records, and
    ``log_rho`` None where some r_l is 0 (no ADMM pull)."""
    steps = [r for r in records if r.get("phase") == "kdp" and "alpha" in r]
    if not steps:
        return {"alpha": None, "log_rho": None}
    alpha, rho = np.array([r["alpha"] for r in steps]), np.array([r["rho"] for r in steps])
    return {"alpha": float(alpha.std(axis=1).mean()),
            "log_rho": float(np.log(rho).std(axis=1).mean()) if (rho > 0).all() else None}


def format_summary(summary: dict, run_dir: Path) -> str:
    s = summary
    return (f"{s['policy']} seed {s['seed']}: student accuracy {s['student_acc']:.4f} "
            f"(teacher {s['teacher_acc']:.4f}), MACs -{s['macs_reduction']:.1%}, params -{s['params_reduction']:.1%} "
            f"({s['params']['teacher']:,} -> {s['params']['student']:,})\n"
            f"report: {run_dir / 'report.md'}")


def _or_dash(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def write_report(run_dir: Path, summary: dict) -> None:
    s = summary
    lines = [
        f"# LIS run `{Path(run_dir).name}`",
        "",
        f"Policy **{s['policy']}**, seed {s['seed']}, teacher `{s['model']}` on `{s['data']}`.",
        "",
        "| | teacher | pruned student |",
        "| --- | ---: | ---: |",
        f"| test accuracy | {s['teacher_acc']:.4f} | {s['student_acc']:.4f} |",
        f"| val-split accuracy (for choosing settings) | | "
        f"{'no val split' if s['val_acc'] is None else format(s['val_acc'], '.4f')} |",
        f"| parameters | {s['params']['teacher']:,} | {s['params']['student']:,} |",
        f"| MACs per sample | {s['macs']['teacher']:,} | {s['macs']['student']:,} |",
        f"| CPU latency, batch {s['latency_batch_size']} (ms, median) | {s['latency_ms']['teacher']:.2f} | "
        f"{s['latency_ms']['student']:.2f} |",
        "",
        f"Reduction: MACs {s['macs_reduction']:.1%}, parameters {s['params_reduction']:.1%}. "
        f"Wall time {s['wall_time_s']:.0f} s. Layer spread of the policy's weights (mean over KDP of their std "
        f"across layers): a_l {_or_dash(s['layer_spread']['alpha'])}, log r_l {_or_dash(s['layer_spread']['log_rho'])}.",
        "",
        "Accuracies are on the test split after the last epoch; nothing was selected on the test split. Choose "
        "settings on the val-split accuracy.",
        "",
        "Figures: `plots/` (distillability, sparsity, ADMM gap, the policy's weights, channels kept).",
        "",
        "## Channels kept per layer",
        "",
        "| layer | before | after |",
        "| --- | ---: | ---: |",
    ]
    for name, n, k in zip(s["layer_names"], s["channels"]["before"], s["channels"]["after"]):
        lines.append(f"| `{name}` | {n} | {k} |")
    (Path(run_dir) / "report.md").write_text("\n".join(lines) + "\n")
