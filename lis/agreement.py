"""Does a meta objective point the right way? Its per-layer hypergradients against paired interventions.

A dean follows the hypergradients dL_meta/da_l of its meta objective, so the objective is only worth
following where lowering it raises accuracy. This module checks that on interventions a fixed policy can
make (docs/design.md section 4):

- the **prediction**: with the base policy frozen and its hypergradients measured (``meta.measure=true``,
  training bit-identical to the plain run), each run's dL_meta/da_l averaged over its meta steps, and the
  first-order change of L_meta for an intervention that moves the per-layer weights by ``delta``:
  ``<mean dL_meta/da, delta>``, mean ± standard error over the seeds. Accuracy should move the other way;
- the **observation**: the paired difference of the val accuracy, intervention minus base, over the seeds
  both ran (``lis.compare.paired_difference``), with its 95% CI.

An objective agrees with an intervention when the predicted and the observed direction match; only
interventions whose observed CI excludes 0 count (the others say nothing about the sign).

    python -m lis.agreement --measured ce=runs/hg-ce --measured pruned_ce=runs/hg-pce --runs runs/iv

``--dean DIR``: also say, for each dean run, whether its final a_l are lower where its own hypergradients
consistently ask for less distillation (``follows``). ``--measured NAME=DIR``: a comparison directory of fixed-policy runs with ``meta.measure=true`` (one setting:
the base); ``--runs DIR``: directories holding the intervention runs (fixed policies that differ from the base
in ``policy.alpha`` only), searched one level deep. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import yaml

from lis.compare import paired_difference
from lis.errors import LISError
from lis.plots import mean_and_se, read_run


@dataclass(frozen=True)
class Setting:
    """A fixed policy's weights, one per layer: what an intervention changes."""

    alpha: tuple[float, ...]
    alpha_out: float
    rho: tuple[float, ...]

    def describe(self, base: "Setting") -> str:
        """The layers whose a_l differ from ``base``'s, e.g. ``a_0..3: 1 -> 0``."""
        changed = [i for i, (a, b) in enumerate(zip(self.alpha, base.alpha)) if a != b]
        parts = []
        for values in sorted({self.alpha[i] for i in changed}):
            idx = [i for i in changed if self.alpha[i] == values]
            span = f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1 else \
                ",".join(map(str, idx))
            parts.append(f"a_{span}: {base.alpha[idx[0]]:g} -> {values:g}")
        if self.alpha_out != base.alpha_out:
            parts.append(f"a_out: {base.alpha_out:g} -> {self.alpha_out:g}")
        return "; ".join(parts) or "base"


def per_layer(value, n: int) -> tuple[float, ...]:
    """A config's scalar or per-layer list as ``n`` floats."""
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * n
    if len(values) != n:
        raise LISError(f"a per-layer list of {len(values)} values for a model with {n} channel groups")
    return tuple(values)


def setting_of(config: Mapping, n_layers: int) -> Setting:
    policy = config.get("policy") or {}
    return Setting(per_layer(policy.get("alpha", 1.0), n_layers), float(policy.get("alpha_out", 1.0)),
                   per_layer(policy.get("rho", 0.1), n_layers))


def finished_runs(dirs: Sequence[str | Path]) -> list[Path]:
    """Run directories with a ``summary.json``: each of ``dirs`` itself or its subdirectories."""
    found = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise LISError(f"{d} is not a directory: give run or comparison directories")
        found += [d] if (d / "summary.json").is_file() else sorted(p.parent for p in d.glob("*/summary.json"))
    return found


def fixed_runs(dirs: Sequence[str | Path]) -> dict[Setting, dict[int, dict]]:
    """The fixed-policy runs under ``dirs`` by setting and seed (summary.json); a run of one setting and seed
    found twice (a measured run and its plain twin train alike) counts once."""
    out: dict[Setting, dict[int, dict]] = {}
    for run in finished_runs(dirs):
        summary = json.loads((run / "summary.json").read_text())
        if summary.get("policy") != "fixed":
            continue
        config = yaml.safe_load((run / "config.yaml").read_text())
        out.setdefault(setting_of(config, len(summary["layer_names"])), {})[int(summary["seed"])] = summary
    return out


def predicted_change(hypergradients: np.ndarray, delta: np.ndarray) -> tuple[float, float, int]:
    """``(mean, standard error, runs)`` over runs of ``<mean over meta steps of dL/da, delta>``.

    ``hypergradients``: (runs, layers), each run's mean dL_meta/da_l; ``delta``: (layers,)."""
    values = hypergradients @ delta
    mean, se = mean_and_se(values[:, None])
    return float(mean[0]), float(se[0]), len(values)


def agreement(measured: Mapping[str, Sequence[str | Path]], runs: Sequence[str | Path],
              metric: str = "val_acc") -> dict:
    """The check of each measured objective against every intervention found in ``runs``.

    Returns ``{"base": Setting, "objectives": [...], "rows": [...]}``; a row has ``setting``, ``change``
    (its description), ``observed`` (``paired_difference`` of ``metric``, intervention minus base) and, per
    objective, ``predicted`` (``predicted_change``: of L_meta) and ``agrees`` (None unless the observed CI
    excludes 0 and the prediction is non-zero).
    """
    hgs, base = {}, None
    for name, dirs in measured.items():
        loaded = [read_run(d) for d in finished_runs(dirs)]
        loaded = [r for r in loaded if r.hypergradients]
        if not loaded:
            raise LISError(f"{name}: no finished run with hypergradients under {', '.join(map(str, dirs))}: "
                           f"run the base policy with meta.measure=true")
        settings = {setting_of(r.config, len(r.layer_names)) for r in loaded} | ({base} if base else set())
        if len(settings) > 1:
            raise LISError(f"{name}: the measured runs must all be at one setting, the base; these differ in "
                           f"policy.alpha, alpha_out or rho from each other or from the other objectives'")
        base = settings.pop()
        hgs[name] = np.array([r.hypergradients["hg_alpha"].mean(axis=0) for r in loaded])
    by_setting = fixed_runs([*runs, *(d for dirs in measured.values() for d in dirs)])
    if base not in by_setting:
        raise LISError("no finished base run: the measured runs did not finish")

    def rows_of(setting: Setting, label: str) -> list[dict]:
        return [{"label": label, "seed": seed, metric: s[metric]} for seed, s in by_setting[setting].items()
                if s.get(metric) is not None]

    out = []
    for setting in by_setting:
        if setting == base or setting.rho != base.rho or setting.alpha_out != base.alpha_out:
            continue  # only a_l interventions: the hypergradients measured are dL/da_l
        observed = paired_difference(rows_of(setting, "x") + rows_of(base, "base"), "x", "base", metric)
        delta = np.array(setting.alpha) - np.array(base.alpha)
        row = {"setting": setting, "change": setting.describe(base), "observed": observed}
        for name, hg in hgs.items():
            mean, se, n = predicted_change(hg, delta)
            decided = observed["n"] > 1 and (observed["lo"] > 0 or observed["hi"] < 0) and mean != 0
            # lower L_meta predicts higher accuracy: agreement when the two signs are opposite
            row[name] = {"predicted": (mean, se, n), "agrees": (mean * observed["mean"] < 0) if decided else None}
        out.append(row)
    out.sort(key=lambda r: r["change"])
    return {"base": base, "objectives": list(hgs), "rows": out, "metric": metric}


def follows(run, threshold: float = 2.0) -> dict:
    """Does a dean's run end with lower a_l on the layers its hypergradients consistently ask to distil less?

    Per layer, the t statistic of dL_meta/da_l over the run's meta steps (mean / standard error); layers with
    t > ``threshold`` ask for less distillation, the others do not. Returns ``less`` and ``rest`` (layer
    indices), ``a_less`` and ``a_rest`` (their mean final a_l), ``follows`` (``a_less < a_rest``; None when
    either set is empty) and ``spearman`` (of the layers' mean hypergradient with their final a_l: negative
    when the dean follows).
    """
    from scipy import stats  # with scikit-learn; imported here like lis.compare's

    hg = run.hypergradients["hg_alpha"]
    mean, se = mean_and_se(hg)
    t = mean / se
    final = run.series["alpha"][-1]
    less = [i for i in range(len(t)) if t[i] > threshold]
    rest = [i for i in range(len(t)) if i not in less]
    a_less = float(final[less].mean()) if less else float("nan")
    a_rest = float(final[rest].mean()) if rest else float("nan")
    return {"less": less, "rest": rest, "a_less": a_less, "a_rest": a_rest,
            "follows": (a_less < a_rest) if less and rest else None,
            "spearman": float(stats.spearmanr(mean, final).statistic)}


def format_agreement(result: dict) -> str:
    """``agreement``'s result as a markdown table and one line per objective."""
    names, metric = result["objectives"], result["metric"]
    head = ["intervention", f"observed {metric} change (points) [95% CI], seeds"]
    head += [f"{n}: predicted dL_meta (mean ± s.e.)" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in result["rows"]:
        o = row["observed"]
        ci = f"[{100 * o['lo']:+.2f}, {100 * o['hi']:+.2f}]" if not math.isnan(o["lo"]) else "[n/a]"
        cells = [row["change"], f"{100 * o['mean']:+.2f} {ci}, {o['n']}"]
        for n in names:
            mean, se, _ = row[n]["predicted"]
            mark = {True: "agrees", False: "disagrees", None: "-"}[row[n]["agrees"]]
            cells.append(f"{mean:+.2e} ± {se:.1e} ({mark})")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        decided = [r[n]["agrees"] for r in result["rows"] if r[n]["agrees"] is not None]
        lines.append(f"- {n}: agrees with {sum(decided)} of the {len(decided)} interventions whose observed "
                     f"CI excludes 0 ({len(result['rows'])} interventions in all)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lis.agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured", action="append", required=True, metavar="NAME=DIR",
                        help="an objective's measured runs (meta.measure=true at the base setting); repeat")
    parser.add_argument("--runs", nargs="+", required=True, metavar="DIR", help="directories of intervention runs")
    parser.add_argument("--metric", default="val_acc", choices=("val_acc", "student_acc"))
    parser.add_argument("--dean", nargs="*", default=[], metavar="DIR",
                        help="dean runs (or directories of them): does each follow its own hypergradients?")
    args = parser.parse_args(argv)
    measured: dict[str, list[str]] = {}
    try:
        for item in args.measured:
            name, sep, d = item.partition("=")
            if not sep or not name or not d:
                raise LISError(f"--measured {item!r}: give NAME=DIR, e.g. --measured ce=runs/hg-ce")
            measured.setdefault(name, []).append(d)
        print(format_agreement(agreement(measured, args.runs, args.metric)))
        deans = [r for r in map(read_run, finished_runs(args.dean)) if r.policy == "dean" and r.hypergradients]
        for r in deans:
            f = follows(r)
            print(f"- {r.dir}: layers asking to distil less (t > 2): {f['less']}; final a_l there "
                  f"{f['a_less']:.2f} vs {f['a_rest']:.2f} elsewhere: "
                  f"{ {True: 'follows', False: 'does not follow', None: 'undecided'}[f['follows']]}; "
                  f"Spearman(mean dL/da_l, final a_l) {f['spearman']:+.2f}")
    except LISError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
