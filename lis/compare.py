"""``lis compare``: does the dean beat fixed weights, by how much, at what cost?

Runs every (policy, seed) pair of one config through ``lis.pipeline.compress``
into one comparison directory ``<run.dir>/<name>/<label>-s<seed>/`` and
writes there

- ``comparison.csv`` — one row per run (accuracies are fractions; params,
  MACs and latency are the pruned student's; MACs are per sample);
- ``comparison.md`` — per label mean ± sample std over seeds, and the paired
  difference "dean minus the best baseline" with a 95% t interval;
- ``plots/acc_vs_macs.png`` — accuracy against MACs, one point per run.

All runs keep ``run.dir``, so they share the teacher cache ``<run.dir>/teachers/``;
the teacher is seeded by ``teacher.seed``, not ``run.seed``, so every run of a
comparison distils from the same teacher (docs/design.md section 5). A pair whose
``summary.json`` exists is skipped and an unfinished one resumes from its
checkpoint, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import statistics
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from lis import dist, jobs as jobs_, pipeline
from lis.config import Config, load_config, to_yaml
from lis.errors import LISError
from lis.plots import draw_acc_vs_macs

#: policies that ``--sweep`` varies: the fixed-weight baseline, whose constants are the sweep's subject
SWEPT = ("fixed",)
#: keys the comparison sets itself, and the option that sets them
SET_BY_COMPARE = {"policy.name": "--policies", "run.seed": "--seeds", "run.name": "--name"}
#: per-run numbers of ``comparison.csv``, after label, policy and seed
COLUMNS = ("student_acc", "val_acc", "teacher_acc", "params", "macs", "params_reduction", "macs_reduction",
           "latency_ms", "wall_time_s", "layer_spread_alpha", "layer_spread_log_rho")
#: what ``aggregate`` averages over seeds
METRICS = ("student_acc", "val_acc", "params", "macs", "params_reduction", "macs_reduction", "latency_ms",
           "wall_time_s", "layer_spread_alpha", "layer_spread_log_rho")
DEAN = "dean"


# --- numbers (pure) ----------------------------------------------------------------------------------


def aggregate(rows: Sequence[Mapping]) -> list[dict]:
    """Per label, in order of first appearance: ``label``, ``policy``, ``n`` (seeds), ``teacher_acc_mean``
    and ``<metric>_mean`` / ``<metric>_std`` for each of ``METRICS``.

    The std is the sample std (n - 1); with one seed it is 0; both are NaN where a run's value is (a run without
    a val split, or without a KDP phase for the layer spread). Units are those of the rows (accuracies as
    fractions).
    """
    groups: dict[str, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(row["label"], []).append(row)
    out = []
    for label, group in groups.items():
        agg = {"label": label, "policy": group[0]["policy"], "n": len(group),
               "teacher_acc_mean": statistics.fmean(float(r["teacher_acc"]) for r in group)}
        for m in METRICS:
            values = [float(r[m]) for r in group]
            agg[f"{m}_mean"] = statistics.fmean(values)
            if any(math.isnan(v) for v in values):  # a value a run does not have (no val split, no KDP phase)
                agg[f"{m}_std"] = math.nan
            else:
                agg[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(agg)
    return out


def paired_difference(rows: Sequence[Mapping], a_label: str, b_label: str, metric: str = "student_acc") -> dict:
    """The ``metric`` column (test accuracy by default; ``val_acc`` for choices) of ``a_label`` minus
    ``b_label``, paired by seed over the seeds both have.

    Returns ``mean``, ``lo``, ``hi`` (the 95% confidence interval of the mean difference from the t
    distribution with n - 1 degrees of freedom) and ``n``; fractions, like the accuracies. With one
    common seed the interval is undefined (``lo`` = ``hi`` = nan); with none, the mean is nan too.
    """
    a = {int(r["seed"]): float(r[metric]) for r in rows if r["label"] == a_label}
    b = {int(r["seed"]): float(r[metric]) for r in rows if r["label"] == b_label}
    diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    n = len(diffs)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = statistics.fmean(diffs)
    if n == 1:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": 1}
    from scipy import stats  # scipy comes with scikit-learn; imported here so `lis --help` stays fast

    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def best_baseline(aggregated: Sequence[Mapping]) -> str | None:
    """The non-dean label with the highest mean student accuracy (None if there is none)."""
    baselines = [a for a in aggregated if a["label"] != DEAN]
    return max(baselines, key=lambda a: a["student_acc_mean"])["label"] if baselines else None


def _count(mean: float, std: float) -> str:
    """A count (params, MACs) as ``mean ± std`` in one unit: 1.23 M, 45.6 k or plain."""
    scale, unit = next(((s, u) for s, u in ((1e9, " G"), (1e6, " M"), (1e3, " k")) if mean >= s), (1, ""))
    digits = 0 if scale == 1 else 2
    return f"{_pm(mean / scale, std / scale, digits)}{unit}"


def _pm(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f} ±0"


def format_table(aggregated: Sequence[Mapping]) -> str:
    """The aggregated comparison as a markdown table: mean ± std over seeds, accuracy in percent."""
    lines = ["| label | seeds | student accuracy (%) | val accuracy (%) | params | MACs | MACs reduction (%) "
             "| latency (ms) | wall time (s) | layer spread a_l | layer spread log r_l |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for a in aggregated:
        lines.append(
            f"| `{a['label']}` | {a['n']} | {_pm(100 * a['student_acc_mean'], 100 * a['student_acc_std'], 2)} "
            f"| {_pm(100 * a['val_acc_mean'], 100 * a['val_acc_std'], 2)} "
            f"| {_count(a['params_mean'], a['params_std'])} | {_count(a['macs_mean'], a['macs_std'])} "
            f"| {_pm(100 * a['macs_reduction_mean'], 100 * a['macs_reduction_std'], 1)} "
            f"| {_pm(a['latency_ms_mean'], a['latency_ms_std'], 2)} "
            f"| {_pm(a['wall_time_s_mean'], a['wall_time_s_std'], 1)} "
            f"| {_pm(a['layer_spread_alpha_mean'], a['layer_spread_alpha_std'], 3)} "
            f"| {_pm(a['layer_spread_log_rho_mean'], a['layer_spread_log_rho_std'], 3)} |")
    return "\n".join(lines)


def format_difference(diff: Mapping, a_label: str, b_label: str) -> str:
    """One sentence for ``paired_difference``, in percentage points."""
    head = f"`{a_label}` minus the best baseline `{b_label}`, paired by seed"
    if diff["n"] == 0:
        return f"{head}: no seed in common, no paired difference."
    mean = f"{100 * diff['mean']:+.2f} percentage points"
    if diff["n"] == 1:
        return f"{head}: {mean} (one seed: the confidence interval is undefined; run more seeds)."
    return (f"{head}: {mean}, 95% CI [{100 * diff['lo']:+.2f}, {100 * diff['hi']:+.2f}] "
            f"(t distribution, {diff['n']} paired seeds).")


# --- planning: labels, sweeps, validation ------------------------------------------------------------


def split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets, parts stripped, empty ones dropped:
    ``"[0,1],[1,1],2"`` -> ``["[0,1]", "[1,1]", "2"]``."""
    parts = re.split(r",(?![^\[]*\])", text)
    return [p.strip() for p in parts if p.strip()]


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """``"policy.alpha=0.5,1,2"`` -> ``("policy.alpha", ["0.5", "1", "2"])``; a list (one value per layer) is one
    value: ``"policy.alpha=[0,1,1,1],[1,1,1,1]"`` -> two values. The key is checked by the caller."""
    key, sep, raw = text.partition("=")
    values = [v.replace(" ", "") for v in split_top(raw)]
    if not sep or not key.strip() or not values:
        raise LISError(f"--sweep '{text}' is not of the form section.key=v1,v2,... (e.g. policy.alpha=0.5,1,2 or, "
                       f"per layer, policy.alpha=[0,1,1,1],[1,1,1,1])")
    return key.strip(), values


def _safe(text: str) -> str:
    """Text as part of a folder name: anything but letters, digits and ._=+- becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def _plan(config_path: str | Path, policies: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
          sweeps: Sequence[str], name: str) -> list[tuple[str, str, int, Config, list[str]]]:
    """Every run of the comparison as ``(label, policy, seed, cfg, args)``, ``args`` the overrides that make
    ``cfg`` from ``config_path`` (``lis compress CONFIG *args`` runs it); every user mistake raises here,
    before anything runs."""
    overrides = list(overrides)
    # a run's numbers depend on its CPU threads: one each unless the config says, whatever --jobs is
    if load_config(config_path, overrides).run.threads is None:  # (the config and the overrides on their own)
        overrides.append("run.threads=1")
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key in SET_BY_COMPARE:
            raise LISError(f"override '{text}': a comparison sets {key} itself, use {SET_BY_COMPARE[key]}")
    if not policies:
        raise LISError("no policies to compare: give e.g. --policies fixed,prune_only,dean")
    if not seeds:
        raise LISError("no seeds: give e.g. --seeds 0,1,2")
    if name in ("", ".", "..") or "/" in name or name == "teachers":
        raise LISError(f"comparison name {name!r} must be a plain folder name, without '/', and not 'teachers'")

    grid: list[tuple[str, list[str]]] = []
    for text in sweeps:
        key, values = parse_sweep(text)
        if key in SET_BY_COMPARE or key == "run.dir":
            raise LISError(f"--sweep '{text}': {key} cannot be swept; the comparison sets it")
        if key in (k for k, _ in grid):
            raise LISError(f"--sweep '{text}': {key} is swept twice, give all its values in one --sweep")
        for v in values:
            load_config(config_path, overrides + [f"{key}={v}"])
        grid.append((key, values))
    if grid and not any(p in SWEPT for p in policies):
        raise LISError(f"--sweep varies the {', '.join(SWEPT)} policy but --policies has none: add it")

    # every policy must be one compress accepts; build each, so a wrong name fails now, not after hours
    for p in policies:
        pipeline.build_policy(load_config(config_path, overrides + [f"policy.name={p}"]))

    runs = []
    for p in policies:
        variants = [[]]
        if p in SWEPT and grid:
            variants = [[f"{k}={v}" for k, v in zip((k for k, _ in grid), combo)]
                        for combo in itertools.product(*(values for _, values in grid))]
        for extra in variants:
            label = f"{p}[{','.join(extra)}]" if extra else p
            for seed in seeds:
                # this run lives inside the comparison directory, while run.dir (and with it the teacher cache)
                # stays the same for every run
                args = overrides + extra + [f"policy.name={p}", f"run.seed={seed}",
                                            f"run.name={name}/{_safe(p + ''.join('__' + e for e in extra))}-s{seed}"]
                runs.append((label, p, seed, load_config(config_path, args), args))
    return runs


def _check_same_config(run_dir: Path, cfg: Config) -> None:
    """A finished (or resumed) run counts for this comparison only if it ran this config (tracking and run.dir
    aside)."""
    path = run_dir / "config.yaml"
    stored = yaml.safe_load(path.read_text()) if path.is_file() else {}
    expected = yaml.safe_load(to_yaml(cfg))
    for section, values in expected.items():
        for key, value in values.items():
            if section == "tracking" or (section == "run" and key == "dir"):
                continue
            old = (stored.get(section) or {}).get(key)
            if old != value:
                raise LISError(f"{run_dir} was run with {section}.{key}={old!r}, this comparison has {value!r}: "
                               f"use --name for a new comparison or delete {run_dir}")


# --- running and writing ----------------------------------------------------------------------------


def row_from_summary(label: str, summary: Mapping) -> dict:
    """One ``comparison.csv`` row from a run's ``summary.json`` (params, MACs, latency: the student's)."""
    return {"label": label, "policy": summary["policy"], "seed": summary["seed"],
            "student_acc": summary["student_acc"], "val_acc": _or_nan(summary.get("val_acc")),
            "teacher_acc": summary["teacher_acc"],
            "params": summary["params"]["student"], "macs": summary["macs"]["student"],
            "params_reduction": summary["params_reduction"], "macs_reduction": summary["macs_reduction"],
            "latency_ms": summary["latency_ms"]["student"], "wall_time_s": summary["wall_time_s"],
            # runs written before the layer spread existed have none
            **{f"layer_spread_{k}": _or_nan((summary.get("layer_spread") or {}).get(k))
               for k in ("alpha", "log_rho")}}


def _or_nan(value) -> float:
    """A summary's ``val_acc`` or layer spread: null (a run without a val split, without KDP) is NaN in the tables."""
    return math.nan if value is None else value


def compare(config_path: str | Path, policies: Sequence[str], seeds: Sequence[int], overrides: Sequence[str] = (),
            sweeps: Sequence[str] = (), name: str | None = None, jobs: int = 1, plan: bool = False) -> Path:
    """Run every (policy[, sweep value], seed) of ``config_path`` and write the comparison; returns its directory.

    ``sweeps`` are ``"section.key=v1,v2,..."`` strings; several make a grid, and each combination is its own
    label ``fixed[policy.alpha=0.5]`` for the ``fixed`` policy (the other policies run once per seed).
    ``jobs``: run the unfinished pairs in that many processes side by side (``lis.jobs``); ``plan``: only print
    the ``lis compress`` command of each unfinished pair, for a scheduler, and run nothing.
    """
    dist.init()
    policies, seeds = list(dict.fromkeys(policies)), list(dict.fromkeys(seeds))
    name = name or f"compare-{Path(config_path).stem}"
    runs = _plan(config_path, policies, seeds, overrides, sweeps, name)
    cmp_dir = Path(runs[0][3].run.dir) / name
    if plan or jobs > 1:
        if dist.world() > 1:
            raise LISError("--jobs and --plan start runs of their own: run 'lis compare' itself without torchrun")
        commands = jobs_.commands(config_path, runs)
        if plan:
            jobs_.print_plan(commands, cmp_dir)
            return cmp_dir
        jobs_.run_all(commands, jobs, cmp_dir / "logs")

    rows = []
    for i, (label, policy, seed, cfg, _) in enumerate(runs, 1):
        dist.barrier()  # under torchrun: every process looks at the run directory before process 0 writes it
        run_dir = Path(cfg.run.dir) / cfg.run.name
        done, started = (run_dir / "summary.json").is_file(), (run_dir / "config.yaml").is_file()
        status = "skip (done)" if done else "resume ..." if started else "..."
        if dist.is_main():
            print(f"[{i}/{len(runs)}] {label} seed {seed} {status}", flush=True)
        if started:
            _check_same_config(run_dir, cfg)
        if not done:
            # an unfinished run (interrupted before its summary) continues from its last checkpoint
            run_dir = pipeline.compress(cfg, overwrite=not started, resume=started)
        if not dist.is_main():
            continue  # process 0 writes the summaries and the comparison
        rows.append(row_from_summary(label, json.loads((run_dir / "summary.json").read_text())))

    if not dist.is_main():
        return cmp_dir
    aggregated = aggregate(rows)
    write_csv(cmp_dir / "comparison.csv", rows)
    write_markdown(cmp_dir / "comparison.md", name, config_path, overrides, seeds, rows, aggregated)
    draw_acc_vs_macs(cmp_dir / "plots" / "acc_vs_macs.png", rows)
    log_table(runs[0][3], name, cmp_dir, rows)
    print(format_table(aggregated))
    print(f"comparison: {cmp_dir / 'comparison.md'}")
    return cmp_dir


def write_csv(path: Path, rows: Sequence[Mapping]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["label", "policy", "seed", *COLUMNS])
        writer.writeheader()
        writer.writerows(rows)


def log_table(cfg: Config, name: str, cmp_dir: Path, rows: Sequence[Mapping]) -> None:
    """With wandb on, the per-run table as one wandb run of the comparison's group (its runs' group too)."""
    if cfg.tracking.wandb == "disabled":
        return
    import wandb

    run = wandb.init(project=cfg.tracking.project, name=name, group=name, job_type="comparison", dir=str(cmp_dir),
                     mode=cfg.tracking.wandb, reinit="finish_previous")
    columns = ["label", "policy", "seed", *COLUMNS]
    run.log({"comparison": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})
    run.finish()


def write_markdown(path: Path, name: str, config_path: str | Path, overrides: Sequence[str], seeds: Sequence[int],
                   rows: Sequence[Mapping], aggregated: Sequence[Mapping]) -> None:
    teacher = statistics.fmean(float(r["teacher_acc"]) for r in rows)
    lines = [
        f"# LIS comparison `{name}`",
        "",
        f"Config `{config_path}`" + (f" with `{' '.join(overrides)}`" if overrides else "")
        + f"; seeds {', '.join(map(str, seeds))}; teacher test accuracy {100 * teacher:.2f}%.",
        "",
        format_table(aggregated),
        "",
        "Student accuracy is the pruned student's accuracy on the test split after the last epoch, in percent; "
        "nothing was selected on the test split (no epoch, checkpoint or run). Each cell is the mean ± sample "
        "std (n - 1) over seeds. Params, MACs (multiply-accumulates per sample) and CPU latency (median, per "
        "batch) are the pruned student's; MACs reduction is 1 - student/teacher. A run's wall time includes "
        "training the teacher if that run was the first to need it (later runs load it from the cache).",
    ]
    best = best_baseline(aggregated)
    if any(a["label"] == DEAN for a in aggregated) and best is not None:
        diff = paired_difference(rows, DEAN, best)
        lines += ["", format_difference(diff, DEAN, best),
                  "", "The best baseline is the one with the highest mean test accuracy; choosing it on the test "
                  "split favours the baseline, so this difference, if anything, understates the dean."]
    lines += ["", "Per run: `comparison.csv`; plot: `plots/acc_vs_macs.png`."]
    path.write_text("\n".join(lines) + "\n")
