"""Tests for lis/plots.py: the data functions against a metrics.jsonl written by hand, then against two real
tiny digits runs (dean and fixed), whose figures must all be written."""

import json

import numpy as np
import pytest

from lis import plots
from lis.config import load_config
from lis.errors import LISError
from lis.pipeline import compress

PNG = b"\x89PNG\r\n\x1a\n"
NAMES = ["conv1", "block.conv2", "fc1"]


def step(it, epoch, d, s=0.0, gap=0.5, keep=0.5, alpha=1.0, rho=1e-3, alpha_out=1.0, **extra):
    return {"phase": "kdp", "iter": it, "epoch": epoch, "lr": 0.1, "ce": 1.0, "kd": 0.5, "alpha_out": alpha_out,
            "distillability": d, "sparsity": [s] * 3, "admm_gap": [gap] * 3, "keep_ratio": [keep] * 3,
            "alpha": [alpha] * 3, "rho": [rho] * 3, **extra}


RECORDS = [
    {"phase": "teacher", "epoch": 1, "train_loss": 2.0, "test_loss": 1.0, "test_acc": 0.5},
    {"phase": "teacher", "epoch": 2, "train_loss": 1.0, "test_loss": 0.5, "test_acc": 0.9},
    {"phase": "kdp", "iter": 0, "layer_names": NAMES},
    step(1, 0, [0.1, 0.2, 0.3]),
    step(6, 0, [0.0, -0.2, 0.4], s=0.25, alpha_out=0.9, meta_loss=1.5),
    {"phase": "kdp", "iter": 10, "epoch": 1, "test_acc": 0.8, "test_loss": 0.6},
    step(11, 1, [-0.3, 0.5, 0.7], gap=0.25, keep=0.25, alpha=2.0, rho=1e-2, alpha_out=0.8),
    {"phase": "kdp", "iter": 20, "epoch": 2, "test_acc": 0.85, "test_loss": 0.5},
    {"phase": "finetune", "epoch": 1, "test_acc": 0.87, "test_loss": 0.4},
    {"phase": "summary", "policy": "dean", "student_acc": 0.87},
]
SUMMARY = {"policy": "dean", "seed": 0, "teacher_acc": 0.9, "student_acc": 0.87, "macs": {"teacher": 4000,
           "student": 1000}, "params": {"teacher": 400, "student": 100}, "macs_reduction": 0.75,
           "layer_names": NAMES, "channels": {"before": [8, 16, 32], "after": [4, 4, 20]}}


def write_run(path, records=RECORDS, summary=SUMMARY, kdp_epochs=4, torn=False):
    path.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (path / "metrics.jsonl").write_text(text + ('{"phase": "kdp", "it' if torn else ""))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    (path / "config.yaml").write_text(f"policy:\n  name: dean\nkdp:\n  epochs: {kdp_epochs}\n")
    return path


# --- data functions on a hand-written run --------------------------------------------------------------


def test_read_run_gives_the_logged_arrays(tmp_path):
    run = plots.read_run(write_run(tmp_path / "r", torn=True))  # a live run's half-written last line is skipped
    assert run.name == "r" and run.layer_names == NAMES and run.policy == "dean"
    np.testing.assert_array_equal(run.steps, [1, 6, 11])
    np.testing.assert_array_equal(run.epoch, [0, 0, 1])
    assert set(run.series) == set(plots.SERIES)
    iters, d = plots.layer_series(run, "distillability")
    np.testing.assert_array_equal(iters, [1, 6, 11])
    np.testing.assert_allclose(d, [[0.1, 0.2, 0.3], [0.0, -0.2, 0.4], [-0.3, 0.5, 0.7]])
    np.testing.assert_allclose(plots.layer_series(run, "sparsity")[1][:, 0], [0, 0.25, 0])
    np.testing.assert_allclose(plots.layer_series(run, "rho")[1], [[1e-3] * 3, [1e-3] * 3, [1e-2] * 3])
    np.testing.assert_allclose(run.alpha_out, [1.0, 0.9, 0.8])
    for phase, epochs, acc in [("teacher", [1, 2], [0.5, 0.9]), ("kdp", [1, 2], [0.8, 0.85]),
                               ("finetune", [1], [0.87])]:
        np.testing.assert_array_equal(run.test_acc[phase][0], epochs)
        np.testing.assert_allclose(run.test_acc[phase][1], acc)
    # 10 iterations per epoch (first KDP epoch record) x kdp.epochs=4 planned, though only 2 were logged
    assert run.total_iters == 40
    np.testing.assert_allclose(plots.progress(run), [1 / 40, 6 / 40, 11 / 40])


def test_mean_distillability_kept_channels_and_acc_vs_macs_by_hand(tmp_path):
    run = plots.read_run(write_run(tmp_path / "r"))
    t, mean = plots.mean_distillability(run)
    np.testing.assert_allclose(t, [1 / 40, 6 / 40, 11 / 40])
    np.testing.assert_allclose(mean, [0.2, 0.2 / 3, 0.3])
    t, a_out, alpha, rho = plots.mean_weights(run)
    np.testing.assert_allclose(t, [1 / 40, 6 / 40, 11 / 40])
    np.testing.assert_allclose(a_out, [1.0, 0.9, 0.8])
    np.testing.assert_allclose(alpha, [1.0, 1.0, 2.0])
    np.testing.assert_allclose(rho, [1e-3, 1e-3, 1e-2])
    uneven = {**step(11, 1, [0.0] * 3), "alpha": [0.5, 1.0, 3.0], "rho": [1e-3, 1e-2, 1e-1]}
    _, _, alpha, rho = plots.mean_weights(plots.parse_records(RECORDS[:3] + [uneven], config={"kdp": {"epochs": 4}}))
    np.testing.assert_allclose([alpha[0], rho[0]], [1.5, 0.037])
    names, before, after = plots.kept_channels(run)
    assert names == NAMES
    np.testing.assert_array_equal(before, [8, 16, 32])
    np.testing.assert_array_equal(after, [4, 4, 20])
    other = plots.read_run(write_run(tmp_path / "o", summary={**SUMMARY, "policy": "fixed", "student_acc": 0.8,
                                                              "macs": {"teacher": 4000, "student": 1200}}))
    unfinished = plots.read_run(write_run(tmp_path / "u", summary=None))
    assert plots.acc_vs_macs([run, other, unfinished]) == [("dean", 1000, 0.87), ("fixed", 1200, 0.8)]
    with pytest.raises(KeyError, match="summary"):
        plots.kept_channels(unfinished)


def test_missing_series_records_and_directories(tmp_path):
    # a record without some per-layer list gets NaN there; a key never logged is absent
    records = [RECORDS[2], {k: v for k, v in step(1, 0, [0.1, 0.2, 0.3]).items() if k != "sparsity"},
               step(2, 0, [0.1, 0.2, 0.3], s=0.5)]
    run = plots.parse_records(records)
    assert np.isnan(run.series["sparsity"][0]).all() and (run.series["sparsity"][1] == 0.5).all()
    run = plots.parse_records([RECORDS[2], {"phase": "kdp", "iter": 1, "epoch": 0, "distillability": [0, 0, 0]}])
    assert set(run.series) == {"distillability"}
    with pytest.raises(KeyError, match="admm_gap"):
        plots.layer_series(run, "admm_gap")
    with pytest.raises(LISError, match="no metrics.jsonl"):
        plots.read_run(tmp_path / "nothing")
    bad = write_run(tmp_path / "bad")
    (bad / "metrics.jsonl").write_text('{"phase": "kdp"\n{"phase": "kdp", "iter": 0}\n')
    with pytest.raises(LISError, match="line 1 is not JSON"):
        plots.read_run(bad)


def test_pick_layers(tmp_path):
    run = plots.read_run(write_run(tmp_path / "r"))
    assert plots.pick_layers(run) == [0, 1, 2]
    assert plots.pick_layers(run, ["fc1", 0, -2]) == [2, 0, 1]
    with pytest.raises(LISError, match="no layer 'conv9'.*conv1, block.conv2, fc1"):
        plots.pick_layers(run, ["conv9"])
    with pytest.raises(LISError, match="out of range"):
        plots.pick_layers(run, [3])
    one = plots.parse_records([{"phase": "kdp", "iter": 0, "layer_names": ["a"]}])
    assert plots.pick_layers(one) == [0]


def test_a_run_without_kdp_draws_only_its_channels(tmp_path):
    # one-shot baselines (l1_prune, scratch) log no KDP phase; the summary still names the layers
    run_dir = write_run(tmp_path / "l1", records=[{"phase": "finetune", "epoch": 1, "test_acc": 0.8}])
    run = plots.read_run(run_dir)
    assert run.layer_names == NAMES and run.series == {} and len(run.steps) == 0
    assert [p.name for p in plots.plot_run(run_dir)] == ["kept_channels.png"]
    empty = write_run(tmp_path / "empty", records=[], summary=None)
    with pytest.raises(LISError, match="nothing to plot"):
        plots.plot_run(empty)


# --- two real tiny runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("runs")
    repo = request.config.rootpath
    tiny = ["teacher.epochs=2", "kdp.epochs=2", "finetune.epochs=1", "tracking.wandb=disabled", f"run.dir={root}"]
    return [compress(load_config(repo / "experiments" / "digits.yaml", tiny + [f"policy.name={p}", f"run.name={p}"]))
            for p in ("dean", "fixed")]


def logged(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_arrays_equal_the_metrics_of_a_real_run(runs):
    for run_dir in runs:
        records = logged(run_dir)
        steps = [r for r in records if r.get("phase") == "kdp" and "distillability" in r]
        run = plots.read_run(run_dir)
        assert run.layer_names == next(r for r in records if "layer_names" in r)["layer_names"]
        assert len(run.layer_names) == 4 and len(steps) >= 4
        np.testing.assert_array_equal(run.steps, [r["iter"] for r in steps])
        for key in plots.SERIES:
            iters, values = plots.layer_series(run, key)
            assert values.shape == (len(steps), 4)
            np.testing.assert_array_equal(values, [r[key] for r in steps])
        np.testing.assert_array_equal(run.alpha_out, [r["alpha_out"] for r in steps])
        np.testing.assert_array_equal(run.test_acc["kdp"][1], [r["test_acc"] for r in records
                                                               if r.get("phase") == "kdp" and "test_acc" in r])
        # the KDP phase ends at its planned length: progress of the last measurement is just below 1
        ends = [r["iter"] for r in records if r.get("phase") == "kdp" and "test_acc" in r]
        assert run.total_iters == ends[-1]
        assert 0 < plots.progress(run)[-1] < 1
        summary = json.loads((run_dir / "summary.json").read_text())
        names, before, after = plots.kept_channels(run)
        assert names == summary["layer_names"] and before.tolist() == summary["channels"]["before"]
        assert after.tolist() == summary["channels"]["after"] and (after < before).any()
    points = plots.acc_vs_macs([plots.read_run(d) for d in runs])
    assert [p for p, _, _ in points] == ["dean", "fixed"]
    assert points[0][1:] == (json.loads((runs[0] / "summary.json").read_text())["macs"]["student"],
                             json.loads((runs[0] / "summary.json").read_text())["student_acc"])


def test_plot_writes_every_figure(runs, tmp_path, monkeypatch):
    drawn, real_save = {}, plots._save

    def save(fig, path):
        drawn[path] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    written = plots.plot(runs)
    per_run = ["distillability_heatmap.png", "distillability_lines.png", "sparsity.png", "admm_gap.png",
               "weights.png", "kept_channels.png"]
    hypergradients = ["hypergradients.png", "hypergradients_per_layer.png"]  # the dean's meta steps logged them
    dean = per_run[:5] + hypergradients + per_run[5:]
    overlay = ["distillability_mean.png", "distillability_per_layer.png", "weights_mean.png",
               "hypergradients_per_layer.png", "acc_vs_macs.png"]
    expected = [runs[0] / "plots" / f for f in dean] + [runs[1] / "plots" / f for f in per_run] + \
        [runs[0].parent / "plots" / f for f in overlay]
    assert written == expected
    for path in written:
        assert path.read_bytes()[:8] == PNG
    check_drawn_content(runs, {p: drawn[p] for p in written})
    # one run with --out: its own figures there; layers chosen by name
    assert [p.name for p in plots.plot([runs[0]], tmp_path / "one")] == dean
    assert plots.plot_run(runs[1], tmp_path / "two", layers=["features.1.0"])[1].name == "distillability_lines.png"


def named_lines(ax):
    """The lines of ``ax`` that carry a legend label (per-layer or per-run series, not marks or guides)."""
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def check_drawn_content(run_dirs, figures):
    """Bug caught: a figure that is written but shows the wrong series (another layer, key or run, a
    column left out). What each figure drew, read back from its matplotlib objects, equals the logged data."""
    parent = run_dirs[0].parent / "plots"
    for run_dir in run_dirs:
        run = plots.read_run(run_dir)
        L, out = len(run.layer_names), run_dir / "plots"
        (ax, _) = figures[out / "distillability_heatmap.png"].axes  # the map and its colorbar
        np.testing.assert_allclose(ax.collections[0].get_array().reshape(L, -1), run.series["distillability"].T)
        (ax,) = figures[out / "distillability_lines.png"].axes
        picked = plots.pick_layers(run)
        assert [line.get_label() for line in named_lines(ax)] == [run.layer_names[i] for i in picked]
        for line, i in zip(named_lines(ax), picked):
            np.testing.assert_allclose(line.get_ydata(), run.series["distillability"][:, i])
        for name, key in (("sparsity.png", "sparsity"), ("admm_gap.png", "admm_gap")):
            (ax,) = figures[out / name].axes
            lines = named_lines(ax)
            assert [line.get_label() for line in lines] == run.layer_names
            for i, line in enumerate(lines):
                np.testing.assert_allclose(line.get_ydata(), run.series[key][:, i])
        dashed = [line for line in figures[out / "sparsity.png"].axes[0].get_lines() if line.get_linestyle() == "--"]
        np.testing.assert_allclose(np.array([d.get_ydata() for d in dashed]).T, 1 - run.series["keep_ratio"])
        axes = figures[out / "weights.png"].axes
        for ax, key in zip(axes, ("alpha", "rho")):
            np.testing.assert_allclose(np.array([line.get_ydata() for line in named_lines(ax)]).T, run.series[key])
        np.testing.assert_allclose(axes[2].get_lines()[0].get_ydata(), run.alpha_out)
        (ax,) = figures[out / "kept_channels.png"].axes
        _, before, after = plots.kept_channels(run)
        np.testing.assert_array_equal([b.get_height() for b in ax.patches], np.concatenate([before, after]))
    # overlays: one line per run
    reads = [plots.read_run(d) for d in run_dirs]
    (ax,) = figures[parent / "distillability_mean.png"].axes
    assert [line.get_label() for line in named_lines(ax)] == [r.label for r in reads]
    for line, r in zip(named_lines(ax), reads):
        np.testing.assert_allclose(line.get_ydata(), plots.mean_distillability(r)[1])
    a_axis, r_axis = figures[parent / "weights_mean.png"].axes
    assert len(a_axis.get_lines()) == 2 * len(reads) and len(r_axis.get_lines()) == len(reads)
    for line, r in zip(r_axis.get_lines(), reads):
        np.testing.assert_allclose(line.get_ydata(), plots.mean_weights(r)[3])
