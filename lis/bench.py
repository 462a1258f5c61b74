"""``lis bench``: the protocol behind every method claim, as one command.

1. **Selection.** The fixed-weight policy runs every setting of a grid
   (``--sweep``, as in ``lis compare``) on the selection seeds (default 0-4);
   the setting with the highest mean validation accuracy (``val_acc`` of each
   run's ``summary.json``) is chosen. Nothing else is tuned: the dean and the
   other baselines run as their config says.
2. **Report.** Every policy, with the chosen fixed setting, runs on the report
   seeds (default 5-9), which no choice looked at; the test split is read
   only for this report.

Both stages are ``lis compare`` comparisons under ``run.dir`` sharing one
teacher: ``<name>-select/`` and ``<name>/``. Finished runs are skipped and
unfinished ones resume, so an interrupted bench continues where it stopped.
``<name>/bench.md`` and ``bench.csv`` hold the report: per policy the test
accuracy mean ± std over the report seeds, params, MACs and wall time, the
dean minus each baseline paired by seed with a 95% t interval, and which
setting was chosen on what.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Mapping, Sequence

from lis import dist
from lis.compare import (DEAN, SWEPT, _plan, aggregate, compare, format_table, paired_difference, parse_sweep,
                         split_top)
from lis.errors import LISError

#: every policy the bench compares: the dean and every baseline that exists
POLICIES = ("dean", "fixed", "prune_only", "kd_only", "l1_prune", "scratch", "tp_group_norm")
#: the fixed-weight grid the selection stage tries (one value of policy.rho: the config's, see the bench YAMLs);
#: on the main budget a narrower grid (alpha 0.3-3, alpha_out 0.5-2) chose its corner, so it reaches past it
GRID = ("policy.alpha=0.1,0.3,1,3", "policy.alpha_out=0.5,2,4")
SELECT_SEEDS, REPORT_SEEDS = tuple(range(5)), tuple(range(5, 10))
#: per-policy numbers of ``bench.csv``, after label and policy
CSV_COLUMNS = ("seeds", "student_acc_mean", "student_acc_std", "params_mean", "macs_mean", "macs_reduction_mean",
               "wall_time_s_mean", "dean_minus_mean", "dean_minus_lo", "dean_minus_hi")


def choose(rows: Sequence[Mapping]) -> dict:
    """The fixed-weight label with the highest mean ``val_acc`` over its seeds (ties: the first in order), as the
    ``aggregate`` entry of that label; ``rows`` are the selection stage's ``comparison.csv`` rows."""
    fixed = [a for a in aggregate(rows) if a["policy"] in SWEPT]
    if any(math.isnan(a["val_acc_mean"]) for a in fixed):
        raise LISError("the selection runs have no val_acc in their summary.json (data.meta_fraction=0?): the "
                       "bench chooses on the validation split, give it one")
    return max(fixed, key=lambda a: a["val_acc_mean"])


def chosen_sweeps(label: str) -> list[str]:
    """``fixed[policy.alpha=1,policy.rho=0.1]`` -> ``["policy.alpha=1", "policy.rho=0.1"]``: the chosen setting as
    one-value sweeps, so that in the report stage it applies to the fixed policy only."""
    inner = label[label.index("[") + 1:-1] if "[" in label else ""
    return split_top(inner)


def bench(config_path: str | Path, policies: Sequence[str] = POLICIES, select_seeds: Sequence[int] = SELECT_SEEDS,
          report_seeds: Sequence[int] = REPORT_SEEDS, overrides: Sequence[str] = (), sweeps: Sequence[str] = GRID,
          name: str | None = None, jobs: int = 1) -> Path:
    """Run the selection and report stages of ``config_path`` and write ``bench.md`` and ``bench.csv``; returns the
    report stage's directory ``<run.dir>/<name>/`` (default name: ``bench-<config stem>``). ``jobs``: runs side
    by side (``lis compare --jobs``; the results do not depend on it)."""
    policies, sweeps = list(dict.fromkeys(policies)), list(sweeps)
    name = name or f"bench-{Path(config_path).stem}"
    if "fixed" not in policies:
        raise LISError("the bench tunes the fixed policy on the selection seeds: keep fixed in --policies")
    if set(select_seeds) & set(report_seeds):
        raise LISError(f"seeds {sorted(set(select_seeds) & set(report_seeds))} are both selection and report "
                       f"seeds: the report seeds must be ones no choice looked at")
    # every user mistake of either stage fails now, not after the selection stage has run for hours
    first = [f"{key}={values[0]}" for key, values in map(parse_sweep, sweeps)]
    _plan(config_path, ["fixed"], select_seeds, overrides, sweeps, f"{name}-select")
    _plan(config_path, policies, report_seeds, overrides, first, name)

    select_dir = compare(config_path, ["fixed"], select_seeds, overrides, sweeps, f"{name}-select", jobs=jobs)
    dist.barrier()  # under torchrun: process 0 has written the selection before any process reads it
    selection = _read_csv(select_dir / "comparison.csv")
    chosen = choose(selection)
    report_dir = compare(config_path, policies, report_seeds, overrides, chosen_sweeps(chosen["label"]), name,
                         jobs=jobs)
    if not dist.is_main():
        return report_dir
    rows = _read_csv(report_dir / "comparison.csv")
    aggregated = aggregate(rows)
    diffs = {a["label"]: paired_difference(rows, DEAN, a["label"]) for a in aggregated if a["label"] != DEAN}
    _write_csv(report_dir / "bench.csv", aggregated, diffs)
    md = format_report(name, config_path, overrides, sweeps, select_seeds, report_seeds, aggregate(selection), chosen,
                       rows, aggregated, diffs)
    (report_dir / "bench.md").write_text(md)
    print(md)
    print(f"bench: {report_dir / 'bench.md'}")
    return report_dir


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, aggregated: Sequence[Mapping], diffs: Mapping[str, Mapping]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "policy", *CSV_COLUMNS])
        for a in aggregated:
            d = diffs.get(a["label"], {"mean": "", "lo": "", "hi": ""})
            writer.writerow([a["label"], a["policy"], a["n"], a["student_acc_mean"], a["student_acc_std"],
                             a["params_mean"], a["macs_mean"], a["macs_reduction_mean"], a["wall_time_s_mean"],
                             d["mean"], d["lo"], d["hi"]])


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def _seeds(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds))


def format_report(name: str, config_path: str | Path, overrides: Sequence[str], sweeps: Sequence[str],
                  select_seeds: Sequence[int], report_seeds: Sequence[int], selection: Sequence[Mapping],
                  chosen: Mapping, rows: Sequence[Mapping], aggregated: Sequence[Mapping],
                  diffs: Mapping[str, Mapping]) -> str:
    """The bench report as markdown: protocol and choice, the report table, the paired differences."""
    teacher = statistics.fmean(float(r["teacher_acc"]) for r in rows)
    best = max(aggregated, key=lambda a: a["student_acc_mean"])
    lines = [
        f"# LIS bench `{name}`",
        "",
        f"Config `{config_path}`" + (f" with `{' '.join(overrides)}`" if overrides else "") + ".",
        "",
        "## Protocol",
        "",
        f"The fixed-weight grid `{' '.join(sweeps)}` ran on the selection seeds {_seeds(select_seeds)}; the setting "
        f"with the highest mean validation accuracy (`val_acc`) was chosen, no test accuracy was looked at. "
        f"Every policy then ran on the report seeds {_seeds(report_seeds)}, which no choice looked at; the test "
        f"split is read only for the report below. The dean and the other baselines run as the config sets "
        f"them (nothing else is tuned).",
        "",
        "| fixed setting | selection seeds | validation accuracy (%) |",
        "| --- | ---: | ---: |",
        *(f"| `{a['label']}`{' (chosen)' if a['label'] == chosen['label'] else ''} | {a['n']} "
          f"| {100 * a['val_acc_mean']:.2f} ± {100 * a['val_acc_std']:.2f} |" for a in selection),
        "",
        f"## Report (seeds {_seeds(report_seeds)}, test split)",
        "",
        format_table(aggregated),
        "",
        f"Teacher test accuracy {100 * teacher:.2f}%; teacher minus the best student (`{best['label']}`): "
        f"{100 * (teacher - best['student_acc_mean']):.2f} points. Cells are mean ± sample std over the report "
        f"seeds; params and MACs (per sample) are the pruned student's; wall time is one run's.",
        "",
        "| `dean` minus | mean (points) | 95% CI (points) | paired seeds |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, d in diffs.items():
        ci = "undefined" if math.isnan(d["lo"]) else f"[{_pp(d['lo'])}, {_pp(d['hi'])}]"
        lines.append(f"| `{label}` | {_pp(d['mean'])} | {ci} | {d['n']} |")
    lines += ["", "Differences are paired by seed, with a t interval (n - 1 degrees of freedom). Per run: "
              "`comparison.csv` here and in the selection stage's folder."]
    return "\n".join(lines) + "\n"
