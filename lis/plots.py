"""Plots of a run: distillability curves, sparsity, ADMM gap, the policy's weights, channels kept.

Two layers, as everywhere in LIS (pure functions for numbers, thin shells for I/O):

- **data** — ``read_run`` parses a run directory (``metrics.jsonl``,
  ``summary.json``, ``config.yaml``) into a ``Run`` of numpy arrays, and
  ``layer_series``, ``progress``, ``mean_distillability``, ``kept_channels``
  and ``acc_vs_macs`` return the numbers each figure shows (tests and the
  notebook ``notebooks/distillability_curves.ipynb`` call these);
- **drawing** — ``plot_run`` (one run, into ``<run>/plots/``), ``plot_runs``
  (several runs overlaid: does the dean slow the fall of distillability?),
  ``plot_probe`` (the figures of ``lis probe``) and ``plot`` (what ``lis plot``
  does) write PNGs.

The per-layer series are those the KDP loop logs at its measurement (and meta)
iterations: the *smoothed* signals the policy reads (an exponential moving
average, ``signals.ema``), and the weights it gave. Distillability is
cos(grad KD, grad CE) in [-1, 1]; sparsity is the fraction of a group's
channels whose norm is below ``eps`` times its largest; the ADMM gap is
||W_l - Z_l|| / ||W_l||; keep ratio is the target k_l / n_l. Accuracies are
fractions in ``Run`` and in the data functions and percent on the figures;
MACs are multiply-accumulates per sample.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg
canvas, never through ``pyplot``: nothing here needs a display, and importing
this module does not switch the backend of a notebook that uses ``pyplot``
inline.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from lis.errors import LISError

#: per-layer series of the KDP step records, each (T, L) in a ``Run``
SERIES = ("distillability", "sparsity", "admm_gap", "keep_ratio", "alpha", "rho")
#: per-layer hypergradients of the meta step records, each (M, L) in a ``Run``: dL_meta/da_l, dL_meta/dr_l
HYPERGRADIENTS = ("hg_alpha", "hg_rho")
HG_LABELS = {"hg_alpha": "dL_meta/da_l", "hg_rho": "dL_meta/dr_l"}
DISTILLABILITY_LABEL = "cos(grad KD, grad CE)"
#: lines get a legend up to this many layers; beyond it, a colorbar of depth
MAX_LEGEND = 10


# --- data (pure) --------------------------------------------------------------------------------------


@dataclass
class Run:
    """The logged history of one run, as arrays.

    ``steps`` (T,) are the KDP iterations of the step records (iteration
    counted after the step, so the first measurement is iteration 1),
    ``epoch`` (T,) their 0-based KDP epochs, ``series[key]`` (T, L) the
    per-layer values (NaN where a record lacks them) for the keys of
    ``SERIES`` that were logged, ``alpha_out`` (T,) the logit-distillation
    weight. ``test_acc[phase]`` is ``(epochs, accuracies)`` of the epoch records
    of ``teacher`` / ``kdp`` / ``finetune`` (1-based epochs, fractions).
    ``total_iters`` is the KDP phase's planned length in iterations (the
    x-axis of training progress). ``summary`` and ``config`` are the run's
    ``summary.json`` and ``config.yaml``, or None when absent. ``meta_steps``
    (M,) are the iterations of the meta step records, ``hypergradients[key]``
    (M, L) their per-layer hypergradients (keys of ``HYPERGRADIENTS``, when
    logged) and ``hg_alpha_out`` (M,) dL_meta/da_out.
    """

    name: str
    layer_names: list[str]
    steps: np.ndarray
    epoch: np.ndarray
    series: dict[str, np.ndarray]
    alpha_out: np.ndarray
    test_acc: dict[str, tuple[np.ndarray, np.ndarray]]
    total_iters: int
    summary: Optional[dict] = None
    config: Optional[dict] = None
    dir: Optional[Path] = None
    meta_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    hypergradients: dict[str, np.ndarray] = field(default_factory=dict)
    hg_alpha_out: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def policy(self) -> str:
        """The policy name (from the summary, else the config), or ``"?"``."""
        if self.summary and "policy" in self.summary:
            return self.summary["policy"]
        return ((self.config or {}).get("policy") or {}).get("name", "?")

    @property
    def label(self) -> str:
        return f"{self.name} ({self.policy})" if self.policy not in ("?", self.name) else self.name


def parse_records(records: Sequence[dict], name: str = "", summary: Optional[dict] = None,
                  config: Optional[dict] = None, run_dir: Optional[Path] = None) -> Run:
    """A ``Run`` from the records of a ``metrics.jsonl`` (dicts, in logged order)."""
    kdp = [r for r in records if r.get("phase") == "kdp"]
    header = next((r for r in kdp if "layer_names" in r), None)
    if header is not None:
        layer_names = list(header["layer_names"])
    else:  # one-shot baselines have no KDP phase; the summary still names the layers
        layer_names = list((summary or {}).get("layer_names", []))
    steps = [r for r in kdp if "distillability" in r or "alpha" in r]
    n_layers = len(layer_names)
    series = {}
    for key in SERIES:
        if any(key in r for r in steps):
            series[key] = np.array([r.get(key, [math.nan] * n_layers) for r in steps], dtype=float).reshape(
                len(steps), n_layers)
    meta = [r for r in kdp if "hg_alpha" in r]
    hypergradients = {key: np.array([r[key] for r in meta], dtype=float).reshape(len(meta), n_layers)
                      for key in HYPERGRADIENTS if meta}
    test_acc = {}
    for phase in ("teacher", "kdp", "finetune"):
        ends = [r for r in records if r.get("phase") == phase and "test_acc" in r]
        test_acc[phase] = (np.array([r["epoch"] for r in ends], dtype=int),
                           np.array([r["test_acc"] for r in ends], dtype=float))
    return Run(
        name=name,
        layer_names=layer_names,
        steps=np.array([r["iter"] for r in steps], dtype=int),
        epoch=np.array([r.get("epoch", 0) for r in steps], dtype=int),
        series=series,
        alpha_out=np.array([r.get("alpha_out", math.nan) for r in steps], dtype=float),
        test_acc=test_acc,
        total_iters=_total_iters(kdp, steps, config),
        summary=summary, config=config, dir=run_dir,
        meta_steps=np.array([r["iter"] for r in meta], dtype=int), hypergradients=hypergradients,
        hg_alpha_out=np.array([r["hg_alpha_out"] for r in meta], dtype=float))


def _total_iters(kdp: Sequence[dict], steps: Sequence[dict], config: Optional[dict]) -> int:
    """Iterations per epoch (the first KDP epoch record's ``iter``) times ``kdp.epochs`` of the config, so an
    unfinished run is drawn at its true progress; without those, the last iteration logged."""
    ends = [r for r in kdp if "test_acc" in r]
    planned = ((config or {}).get("kdp") or {}).get("epochs")
    if ends and planned:
        return int(ends[0]["iter"]) * int(planned)
    last = [int(r["iter"]) for r in list(steps) + ends]
    return max(last, default=0) or 1


def read_run(run_dir: str | os.PathLike) -> Run:
    """Read a run directory written by ``lis compress`` (or one still running: a torn last line is skipped)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise LISError(f"{run_dir} is not a run directory (no metrics.jsonl): give a directory "
                       f"written by 'lis compress'")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # only the last line may be half-written by a live run
                raise LISError(f"{path} line {i + 1} is not JSON: the file is damaged") from None
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else None
    return parse_records(records, run_dir.name, summary, config, run_dir)


def layer_series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(iterations (T,), values (T, L))`` of a per-layer series (one of ``SERIES``)."""
    if key not in run.series:
        raise KeyError(f"run {run.name!r} logged no {key!r} series (logged: {', '.join(run.series) or 'none'})")
    return run.steps, run.series[key]


def progress(run: Run) -> np.ndarray:
    """Training progress t / T of each step record, (T,), in [0, 1] (T: the KDP phase's planned iterations)."""
    return run.steps / max(run.total_iters, 1)


def mean_distillability(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """``(progress (T,), distillability averaged over layers (T,))``."""
    _, d = layer_series(run, "distillability")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a record without the series is NaN, not an error
        return progress(run), np.nanmean(d, axis=1)


def mean_weights(run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(progress (T,), a_out (T,), a_l averaged over layers (T,), r_l averaged over layers (T,))``."""
    return (progress(run), run.alpha_out, np.nanmean(run.series["alpha"], axis=1),
            np.nanmean(run.series["rho"], axis=1))


def mean_and_se(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error (sample std / sqrt(n)) over the first axis; the error is NaN for n < 2."""
    n = len(values)
    mean = values.mean(axis=0)
    return mean, values.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full_like(mean, math.nan)


def hypergradient_summary(runs: Sequence[Run], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per layer, of the hypergradient ``key`` (one of ``HYPERGRADIENTS``): ``(means (R, L), errors (R, L))``,
    each run's mean and standard error over its meta steps, and ``(mean (L,), error (L,))`` over the runs of
    their means (the error NaN for one run). The runs must share their layers."""
    per_run = [mean_and_se(r.hypergradients[key]) for r in runs]
    means, errors = np.array([m for m, _ in per_run]), np.array([e for _, e in per_run])
    return (means, errors, *mean_and_se(means))


def kept_channels(run: Run) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(layer names, channels before (L,), channels after (L,))`` of the hard-pruned student (summary)."""
    if run.summary is None or "channels" not in run.summary:
        raise KeyError(f"run {run.name!r} has no summary.json with channels (unfinished, or not a compress run)")
    ch = run.summary["channels"]
    return (list(run.summary.get("layer_names", run.layer_names)), np.array(ch["before"], dtype=int),
            np.array(ch["after"], dtype=int))


def acc_vs_macs(runs: Sequence[Run]) -> list[tuple[str, int, float]]:
    """``(policy, student MACs per sample, student accuracy as a fraction)`` of every run with a summary."""
    return [(r.policy, int(r.summary["macs"]["student"]), float(r.summary["student_acc"]))
            for r in runs if r.summary is not None]


def pick_layers(run: Run, layers: Optional[Sequence[str | int]] = None) -> list[int]:
    """Indices of ``layers`` (names or indices); by default the first, middle and last layer."""
    n = len(run.layer_names)
    if layers is None:
        return sorted({0, n // 2, n - 1}) if n else []
    out = []
    for layer in layers:
        if isinstance(layer, (int, np.integer)):
            if not -n <= layer < n:
                raise LISError(f"layer index {layer} is out of range: run {run.name!r} has {n} layers")
            out.append(int(layer) % n)
        elif layer in run.layer_names:
            out.append(run.layer_names.index(layer))
        else:
            raise LISError(f"run {run.name!r} has no layer {layer!r}: its layers are {', '.join(run.layer_names)}")
    return out


# --- drawing ------------------------------------------------------------------------------------------


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(rows, cols, squeeze=False, **kw).ravel())


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _depth_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1) * 0.9) for i in range(n)]


def _lines(fig: Figure, ax, x: np.ndarray, values: np.ndarray, names: Sequence[str],
           index: Optional[Sequence[int]] = None, **kw) -> None:
    """One line per layer, coloured by depth (viridis, input side dark); a legend for a few layers, a colorbar
    of depth for many."""
    index = list(range(values.shape[1])) if index is None else list(index)
    colors = _depth_colors(len(names))
    for i in index:
        ax.plot(x, values[:, i], color=colors[i], label=names[i], **kw)
    if len(index) <= MAX_LEGEND:
        ax.legend(fontsize="x-small", title="layer", title_fontsize="x-small")
    else:
        from matplotlib import colormaps

        sm = ScalarMappable(Normalize(0, len(names) - 1), colormaps["viridis"])
        fig.colorbar(sm, ax=ax, label="layer index (0 = input side)")


def draw_distillability_heatmap(fig: Figure, ax, run: Run) -> None:
    """Layers (rows, input side on top) x iteration, diverging colours centred at 0 on [-1, 1]."""
    iters, d = layer_series(run, "distillability")
    draw_layer_heatmap(fig, ax, run, iters, d, DISTILLABILITY_LABEL, bound=1.0)
    ax.set_ylabel("layer (channel group)")


def draw_layer_heatmap(fig: Figure, ax, run: Run, iters: np.ndarray, values: np.ndarray, label: str,
                       bound: Optional[float] = None) -> None:
    """Layers (rows, input side on top) x iteration of a signed per-layer series (T, L), diverging colours
    centred at 0 on [-bound, bound] (None: the largest magnitude)."""
    x = iters if len(iters) > 1 else np.array([iters[0] - 0.5, iters[0] + 0.5])
    z = values.T if len(iters) > 1 else np.repeat(values.T, 2, axis=1)
    if bound is None:
        bound = float(np.nanmax(np.abs(values))) or 1.0
    mesh = ax.pcolormesh(x, np.arange(len(run.layer_names)), np.ma.masked_invalid(z), cmap="RdBu_r",
                         vmin=-bound, vmax=bound, shading="nearest")
    ax.set_yticks(np.arange(len(run.layer_names)), run.layer_names, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("KDP iteration")
    fig.colorbar(mesh, ax=ax, label=label)


def _label_series(ax, run: Run, ylabel: str, title: str) -> None:
    """Epoch marks, axis labels, the run's title and a grid on a per-layer series against KDP iterations."""
    _epoch_marks(ax, run)
    ax.set_xlabel("KDP iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{run.label}: {title}", fontsize="medium")
    ax.grid(alpha=0.3)


def _epoch_marks(ax, run: Run) -> None:
    """Faint vertical lines at the KDP epoch boundaries (when the config says how many epochs, up to 50)."""
    epochs = int(((run.config or {}).get("kdp") or {}).get("epochs") or 0)
    if 1 < epochs <= 50:
        for e in range(1, epochs):
            ax.axvline(e * run.total_iters / epochs, color="gray", alpha=0.25, linewidth=0.8)


def plot_run(run_dir: str | os.PathLike, out_dir: Optional[str | os.PathLike] = None,
             layers: Optional[Sequence[str | int]] = None) -> list[Path]:
    """Draw the figures of one run into ``out_dir`` (default ``<run>/plots/``); returns the PNGs written.

    ``distillability_heatmap.png``, ``distillability_lines.png`` (``layers``, by
    default first, middle and last), ``sparsity.png``, ``admm_gap.png``,
    ``weights.png`` (a_l, r_l on a log axis, a_out), ``kept_channels.png``,
    ``hypergradients.png`` (dL_meta/da_l and dL_meta/dr_l, layers x meta steps)
    and ``hypergradients_per_layer.png`` (their mean ± standard error over the meta steps);
    a figure whose data the run lacks (no KDP phase, no summary yet) is left out.
    """
    run = read_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    names, written = run.layer_names, []
    L = len(names)

    if "distillability" in run.series and len(run.steps):
        fig, (ax,) = _figure(6.4, 1.6 + 0.28 * L)
        draw_distillability_heatmap(fig, ax, run)
        ax.set_title(f"{run.label}: distillability per layer over KDP", fontsize="medium")
        written.append(_save(fig, out / "distillability_heatmap.png"))

        fig, (ax,) = _figure(6.4, 4.0)
        iters, d = layer_series(run, "distillability")
        _lines(fig, ax, iters, d, names, pick_layers(run, layers), marker=".", markersize=3)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_ylim(-1.05, 1.05)
        _label_series(ax, run, f"distillability {DISTILLABILITY_LABEL}", "distillability of chosen layers")
        written.append(_save(fig, out / "distillability_lines.png"))

    if "sparsity" in run.series and len(run.steps):
        fig, (ax,) = _figure(6.4, 4.0)
        iters, s = layer_series(run, "sparsity")
        _lines(fig, ax, iters, s, names)
        if "keep_ratio" in run.series:
            colors = _depth_colors(L)
            for i in range(L):  # the sparse target's share of removed channels, 1 - k_l / n_l
                ax.plot(iters, 1.0 - run.series["keep_ratio"][:, i], color=colors[i], linestyle="--", linewidth=0.9)
        ax.set_ylim(-0.02, 1.02)
        _label_series(ax, run, "sparsity (fraction of channels ~ 0)", "sparsity per layer (dashed: target 1 - k_l/n_l)")
        written.append(_save(fig, out / "sparsity.png"))

    if "admm_gap" in run.series and len(run.steps):
        fig, (ax,) = _figure(6.4, 4.0)
        iters, g = layer_series(run, "admm_gap")
        _lines(fig, ax, iters, g, names)
        ax.set_ylim(bottom=0.0)
        _label_series(ax, run, "ADMM gap ||W_l - Z_l|| / ||W_l||", "distance to the sparse target per layer")
        written.append(_save(fig, out / "admm_gap.png"))

    if {"alpha", "rho"} <= set(run.series) and len(run.steps):
        fig, axes = _figure(6.4, 7.5, 3, 1, sharex=True)
        iters = run.steps
        _lines(fig, axes[0], iters, run.series["alpha"], names)
        axes[0].set_ylabel("a_l (feature KD weight)")
        rho = run.series["rho"]
        _lines(fig, axes[1], iters, rho, names)
        if np.nanmin(rho) > 0:  # a baseline without ADMM pull (r = 0) stays on a linear axis
            axes[1].set_yscale("log")
        axes[1].set_ylabel("r_l (ADMM penalty weight)")
        axes[2].plot(iters, run.alpha_out, color="black")
        axes[2].set_ylabel("a_out (logit KD weight)")
        axes[2].set_xlabel("KDP iteration")
        for ax in axes:
            _epoch_marks(ax, run)
            ax.grid(alpha=0.3)
        axes[0].set_title(f"{run.label}: the policy's weights", fontsize="medium")
        written.append(_save(fig, out / "weights.png"))

    if run.hypergradients and len(run.meta_steps):
        fig, axes = _figure(6.4, 2.4 + 0.56 * L, len(HYPERGRADIENTS), 1, sharex=True)
        for ax, key in zip(axes, HYPERGRADIENTS):
            draw_layer_heatmap(fig, ax, run, run.meta_steps, run.hypergradients[key], HG_LABELS[key])
        axes[0].set_title(f"{run.label}: hypergradients per layer at each meta step (red: the meta objective "
                          f"asks for less)", fontsize="small")
        axes[0].set_xlabel("")
        written.append(_save(fig, out / "hypergradients.png"))

        fig, axes = _figure(6.4, 5.6, len(HYPERGRADIENTS), 1, sharex=True)
        for ax, key in zip(axes, HYPERGRADIENTS):
            mean, se = mean_and_se(run.hypergradients[key])
            ax.bar(np.arange(L), mean, yerr=np.nan_to_num(se), color="C0", capsize=3)
            ax.axhline(0.0, color="black", linewidth=0.6)
            ax.set_ylabel(f"{HG_LABELS[key]}\nmean ± s.e.")
            ax.grid(alpha=0.3, axis="y")
        axes[-1].set_xticks(np.arange(L), names, rotation=45 if L > 6 else 0, ha="right" if L > 6 else "center",
                            fontsize="small")
        axes[-1].set_xlabel("layer (channel group)")
        axes[0].set_title(f"{run.label}: hypergradients over {len(run.meta_steps)} meta steps "
                          f"(dL_meta/da_out: {np.mean(run.hg_alpha_out):+.3g})", fontsize="small")
        written.append(_save(fig, out / "hypergradients_per_layer.png"))

    if run.summary is not None and "channels" in run.summary:
        names_k, before, after = kept_channels(run)
        x = np.arange(len(names_k))
        fig, (ax,) = _figure(max(6.4, 0.5 * len(x) + 2), 4.2)
        ax.bar(x - 0.2, before, 0.4, label="before (teacher)", color="lightgray", edgecolor="gray")
        ax.bar(x + 0.2, after, 0.4, label="after (pruned student)", color="C0")
        for xi, b, a in zip(x, before, after):
            ax.annotate(f"{a / b:.0%}", (xi + 0.2, a), ha="center", va="bottom", fontsize="x-small")
        ax.set_xticks(x, names_k, rotation=45 if len(x) > 6 else 0, ha="right" if len(x) > 6 else "center",
                      fontsize="small")
        ax.set_xlabel("layer (channel group)")
        ax.set_ylabel("output channels")
        ax.set_title(f"{run.label}: channels kept per layer (MACs -{run.summary['macs_reduction']:.1%})",
                     fontsize="medium")
        ax.legend(fontsize="small")
        written.append(_save(fig, out / "kept_channels.png"))

    if not written:
        raise LISError(f"run {run.name!r} has nothing to plot yet: no KDP series in metrics.jsonl and no summary.json")
    return written


def plot_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Overlay several runs in ``out_dir``; returns the PNGs written.

    ``distillability_mean.png``: distillability averaged over layers against
    training progress t / T, one line per run (dean vs fixed: does the dean
    slow its fall?); ``distillability_per_layer.png``: the same per layer,
    small multiples; ``weights_mean.png``: the policy's a_out, mean a_l and
    mean r_l against training progress, one colour per run (what did each
    seed's dean learn?); ``acc_vs_macs.png``: student accuracy (%) against MACs,
    one point per run coloured by policy, a policy's mean ± std where it has
    several runs, and the teacher(s) as grey stars; ``hypergradients_per_layer.png``:
    dL_meta/da_l and dL_meta/dr_l per layer, each run's mean ± standard error over its meta steps and the
    mean ± standard error over the runs of those means (runs with the same layers).
    """
    runs = [read_run(d) for d in run_dirs]
    out, written = Path(out_dir), []
    curves = [r for r in runs if "distillability" in r.series and len(r.steps)]

    if curves:
        fig, (ax,) = _figure(6.4, 4.2)
        for i, r in enumerate(curves):
            t, m = mean_distillability(r)
            ax.plot(t, m, color=f"C{i % 10}", label=r.label)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xlim(0, 1)
        ax.set_xlabel("KDP progress t / T")
        ax.set_ylabel(f"mean distillability over layers\n{DISTILLABILITY_LABEL}")
        ax.set_title("distillability over training, per run", fontsize="medium")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / "distillability_mean.png"))

        layer_names = list(dict.fromkeys(n for r in curves for n in r.layer_names))
        cols = min(4, len(layer_names))
        rows = math.ceil(len(layer_names) / cols)
        fig, axes = _figure(3.0 * cols + 0.6, 2.4 * rows + 0.8, rows, cols, sharex=True, sharey=True)
        for ax, name in zip(axes, layer_names):
            for i, r in enumerate(curves):
                if name in r.layer_names:
                    ax.plot(progress(r), r.series["distillability"][:, r.layer_names.index(name)],
                            color=f"C{i % 10}", label=r.label)
            ax.axhline(0.0, color="black", linewidth=0.5)
            ax.set_title(name, fontsize="small")
            ax.grid(alpha=0.3)
        for ax in axes[len(layer_names):]:
            ax.set_visible(False)
        for ax in axes[(rows - 1) * cols:]:
            ax.set_xlabel("KDP progress t / T")
        for ax in axes[::cols]:
            ax.set_ylabel("distillability")
        axes[0].legend(fontsize="x-small")
        fig.suptitle(f"distillability per layer, {DISTILLABILITY_LABEL}", fontsize="medium")
        written.append(_save(fig, out / "distillability_per_layer.png"))

    weighted = [r for r in runs if {"alpha", "rho"} <= set(r.series) and len(r.steps)]
    if weighted:
        fig, axes = _figure(10.0, 3.8, 1, 2, sharex=True)
        for i, r in enumerate(weighted):
            t, a_out, alpha, rho = mean_weights(r)
            axes[0].plot(t, a_out, color=f"C{i % 10}", label=r.label)
            axes[0].plot(t, alpha, color=f"C{i % 10}", linestyle="--")
            axes[1].plot(t, rho, color=f"C{i % 10}", label=r.label)
        axes[0].set_ylabel("distillation weight\n(solid: a_out, dashed: mean a_l)")
        axes[1].set_ylabel("mean ADMM weight r_l")
        if all(np.nanmin(r.series["rho"]) > 0 for r in weighted):  # r = 0 (no ADMM pull) needs a linear axis
            axes[1].set_yscale("log")
        for ax in axes:
            ax.set_xlim(0, 1)
            ax.set_xlabel("KDP progress t / T")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize="x-small")
        fig.suptitle("the policy's weights over training, per run", fontsize="medium")
        written.append(_save(fig, out / "weights_mean.png"))

    measured = [r for r in runs if r.hypergradients and len(r.meta_steps)]
    if measured and all(r.layer_names == measured[0].layer_names for r in measured):
        names, n = measured[0].layer_names, len(measured)
        fig, axes = _figure(max(6.4, 0.9 * len(names) + 2), 6.0, len(HYPERGRADIENTS), 1, sharex=True)
        width = 0.8 / (n + 1)
        for ax, key in zip(axes, HYPERGRADIENTS):
            means, errors, mean, se = hypergradient_summary(measured, key)
            for i, r in enumerate(measured):
                ax.errorbar(np.arange(len(names)) + (i - n / 2) * width, means[i], yerr=np.nan_to_num(errors[i]),
                            fmt="o", markersize=3, color=f"C{i % 10}", label=r.label, capsize=2)
            ax.errorbar(np.arange(len(names)) + n / 2 * width, mean, yerr=np.nan_to_num(se), fmt="s", color="black",
                        label=f"over {n} runs", capsize=3)
            ax.axhline(0.0, color="black", linewidth=0.6)
            ax.set_ylabel(f"{HG_LABELS[key]}\nmean ± s.e.")
            ax.grid(alpha=0.3, axis="y")
        axes[-1].set_xticks(np.arange(len(names)), names, rotation=45 if len(names) > 6 else 0, fontsize="small")
        axes[-1].set_xlabel("layer (channel group)")
        axes[0].legend(fontsize="x-small")
        fig.suptitle("hypergradients per layer: each run over its meta steps, and over the runs", fontsize="medium")
        written.append(_save(fig, out / "hypergradients_per_layer.png"))

    rows = [{"label": r.label, "macs": r.summary["macs"]["student"], "student_acc": r.summary["student_acc"],
             "teacher_acc": r.summary["teacher_acc"]} for r in runs if r.summary is not None]
    if rows:
        written.append(draw_acc_vs_macs(out / "acc_vs_macs.png", rows))
    return written


def draw_acc_vs_macs(path: Path, rows: Sequence[dict]) -> Path:
    """Accuracy (%) against the student's MACs (millions) from rows with ``label``, ``macs``, ``student_acc``
    and ``teacher_acc`` (fractions): every run a point, each label's mean ± sample std with error bars, the
    teacher as a dashed line. Used by ``lis plot`` and ``lis compare``."""
    fig, (ax,) = _figure(6.4, 4.8)
    markers = "osD^v<>pP*hX"
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for i, label in enumerate(labels):
        style = {"color": f"C{i % 10}", "marker": markers[i % len(markers)]}
        macs = np.array([r["macs"] for r in rows if r["label"] == label], dtype=float) / 1e6
        acc = 100 * np.array([r["student_acc"] for r in rows if r["label"] == label], dtype=float)
        ax.scatter(macs, acc, alpha=0.35, edgecolors="none", **style)
        spread = (macs.std(ddof=1), acc.std(ddof=1)) if len(acc) > 1 else (0.0, 0.0)
        ax.errorbar(macs.mean(), acc.mean(), xerr=spread[0], yerr=spread[1], capsize=3, markersize=8,
                    linestyle="none", label=f"{label} (n={len(acc)})", **style)
    teacher = 100 * float(np.mean([r["teacher_acc"] for r in rows]))
    ax.axhline(teacher, color="gray", linestyle="--", label=f"teacher ({teacher:.2f}%)")
    macs = [r["macs"] for r in rows]
    if min(macs) > 0 and max(macs) / min(macs) > 10:
        ax.set_xscale("log")
    ax.set_xlabel("student MACs per sample (millions)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title("accuracy vs MACs (points: runs; markers with bars: mean ± std)", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_probe(probe_dir: str | os.PathLike) -> list[Path]:
    """Draw ``probe_distillability.png`` and ``probe_sparsability.png`` from ``<probe_dir>/probe.json``.

    Distillability: layers x iteration (as in a run), and by depth, one line
    per epoch (the epoch's mean). Sparsability: the accuracy drop of each
    layer against its prune ratio with the ``max_drop`` line, and the
    resulting sparsability per layer as bars.
    """
    probe_dir = Path(probe_dir)
    p = json.loads((probe_dir / "probe.json").read_text())
    names, L, written = p["layer_names"], len(p["layer_names"]), []

    d = p["distillability"]
    iters, values, epochs = np.array(d["iters"], dtype=int), np.array(d["values"], dtype=float), np.array(d["epoch"])
    if len(iters):
        run = Run("probe", names, iters, epochs, {"distillability": values.reshape(len(iters), L)},
                  np.ones(len(iters)), {}, int(iters.max()))
        fig, axes = _figure(12.0, 1.8 + 0.28 * max(L, 8), 1, 2)
        draw_distillability_heatmap(fig, axes[0], run)
        axes[0].set_title("distillability over plain distillation", fontsize="medium")
        epoch_ids = sorted(set(epochs.tolist()))
        from matplotlib import colormaps

        cmap = colormaps["plasma"]
        for k, e in enumerate(epoch_ids):
            mean = values[epochs == e].mean(axis=0)
            axes[1].plot(np.arange(L), mean, marker="o", color=cmap(k / max(len(epoch_ids) - 1, 1) * 0.85),
                         label=f"epoch {e + 1}")
        axes[1].axhline(0.0, color="black", linewidth=0.6)
        axes[1].set_xticks(np.arange(L), names, rotation=45 if L > 6 else 0, ha="right" if L > 6 else "center",
                           fontsize="small")
        axes[1].set_xlabel("layer (input side left)")
        axes[1].set_ylabel(f"distillability {DISTILLABILITY_LABEL}\n(mean over the epoch's measurements)")
        axes[1].set_title("by depth, one line per epoch", fontsize="medium")
        axes[1].legend(fontsize="small")
        axes[1].grid(alpha=0.3)
        written.append(_save(fig, probe_dir / "probe_distillability.png"))

    ratios, drops = np.array(p["ratios"], dtype=float), np.array(p["drops"], dtype=float)
    fig, axes = _figure(12.0, 4.4, 1, 2)
    colors = _depth_colors(L)
    for i in range(L):
        axes[0].plot(100 * ratios, 100 * drops[i], marker=".", color=colors[i], label=names[i])
    axes[0].axhline(100 * p["max_drop"], color="red", linestyle="--", linewidth=0.9,
                    label=f"max drop {100 * p['max_drop']:g} pt")
    axes[0].set_xlabel("channels removed from this layer only (%)")
    axes[0].set_ylabel(f"{p.get('split', 'test')} accuracy drop vs teacher (points)")
    axes[0].set_title(f"sensitivity (teacher {100 * p['teacher_acc']:.2f}%)", fontsize="medium")
    axes[0].legend(fontsize="x-small", ncol=2 if L > MAX_LEGEND else 1)
    axes[0].grid(alpha=0.3)
    x = np.arange(L)
    axes[1].bar(x, 100 * np.array(p["sparsability"]), color=colors)
    axes[1].set_xticks(x, names, rotation=45 if L > 6 else 0, ha="right" if L > 6 else "center", fontsize="small")
    axes[1].set_ylim(0, 100)
    axes[1].set_xlabel("layer (channel group)")
    axes[1].set_ylabel("sparsability (% of channels removable)")
    axes[1].set_title(f"sparsability: largest ratio with drop <= {100 * p['max_drop']:g} pt", fontsize="medium")
    axes[1].grid(alpha=0.3, axis="y")
    written.append(_save(fig, probe_dir / "probe_sparsability.png"))
    return written


def plot(run_dirs: Sequence[str | os.PathLike], out_dir: Optional[str | os.PathLike] = None) -> list[Path]:
    """``lis plot``: one run's figures into ``out_dir`` (default ``<run>/plots/``); with several runs, each
    run's figures into its own ``plots/`` and the overlays of ``plot_runs`` into ``out_dir`` (default
    ``<the runs' common parent>/plots``). Prints and returns the PNGs written."""
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) == 1:
        written = plot_run(dirs[0], out_dir)
    else:
        written = [p for d in dirs for p in plot_run(d)]
        out = Path(out_dir) if out_dir is not None else Path(os.path.commonpath([d.resolve() for d in dirs])) / "plots"
        written += plot_runs(dirs, out)
    for p in written:
        print(p)
    return written
