"""The method paper's two observations checked on the bench; prints the numbers README's Benchmark section quotes.

Fig. 1a: does distillability rise with depth and fall over training? Fig. 1b: do layers differ in sparsability?

    python experiments/bench/findings.py runs/bench95-probe runs/bench-mnist1d_hard_95 --policy fixed

The first argument is a ``lis probe`` directory (plain distillation of the teacher's copy, raw measurements,
and the per-layer sensitivity sweep on the val split); the second a bench or comparison directory whose runs
of ``--policy`` are read (their logged, smoothed distillability during KDP, with the ADMM pull).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

from lis.agreement import finished_runs
from lis.plots import mean_and_se, read_run


def by_epoch(values: np.ndarray, epoch: np.ndarray) -> np.ndarray:
    """(epochs, layers): the mean of each epoch's measurements."""
    return np.array([values[epoch == e].mean(axis=0) for e in sorted(set(epoch.tolist()))])


def depth_trend(profile: np.ndarray) -> float:
    """Spearman correlation of a per-layer profile with depth (layer index)."""
    return float(stats.spearmanr(np.arange(len(profile)), profile).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probe", type=Path)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--policy", default="fixed")
    args = parser.parse_args()

    p = json.loads((args.probe / "probe.json").read_text())
    names = p["layer_names"]
    d = p["distillability"]
    epochs = by_epoch(np.array(d["values"]), np.array(d["epoch"]))
    print(f"## probe ({args.probe}): plain distillation of the teacher's copy, {len(epochs)} epochs, raw cosines")
    print("| layer | " + " | ".join(f"epoch {e + 1}" for e in range(len(epochs))) + " | sparsability |")
    print("|---|" + "---:|" * (len(epochs) + 1))
    for i, n in enumerate(names):
        print(f"| {n} | " + " | ".join(f"{v:+.3f}" for v in epochs[:, i]) + f" | {p['sparsability'][i]:.1f} |")
    for e, profile in enumerate(epochs):
        print(f"- epoch {e + 1}: Spearman(depth, distillability) {depth_trend(profile):+.2f}, mean {profile.mean():+.3f}")
    falls = int((epochs[-1] < epochs[0]).sum())
    print(f"- first -> last epoch: distillability falls on {falls} of {len(names)} layers")
    s = np.array(p["sparsability"])
    print(f"- sparsability ({p.get('split', 'test')} split, max drop {100 * p['max_drop']:g} pt): "
          f"{s.min():.1f} to {s.max():.1f}, Spearman with depth {depth_trend(s):+.2f}")

    runs = [r for r in map(read_run, finished_runs([args.runs])) if r.policy == args.policy]
    first, last = [], []
    for r in runs:
        profile = by_epoch(r.series["distillability"], r.epoch)
        first.append(profile[0])
        last.append(profile[-1])
    first, last = np.array(first), np.array(last)
    print(f"\n## {len(runs)} `{args.policy}` runs ({args.runs}): logged distillability during KDP, first vs last "
          f"epoch, mean ± s.e. over runs")
    m0, e0 = mean_and_se(first)
    m1, e1 = mean_and_se(last)
    print("| layer | first epoch | last epoch |\n|---|---:|---:|")
    for i, n in enumerate(names):
        print(f"| {n} | {m0[i]:+.3f} ± {e0[i]:.3f} | {m1[i]:+.3f} ± {e1[i]:.3f} |")
    trends = [depth_trend(f) for f in first]
    print(f"- Spearman(depth, first-epoch distillability) per run: {', '.join(f'{t:+.2f}' for t in trends)}")
    print(f"- layers whose distillability falls from the first to the last epoch, per run: "
          f"{', '.join(str(int((b < a).sum())) for a, b in zip(first, last))} of {len(names)}")


if __name__ == "__main__":
    main()
