"""Tests for lis/cli.py: help, one-line errors with exit code 2, and run directories.

A few cases go through the real console entry (``python -m lis``, ~3-5 s each for
the imports); the rest call ``lis.cli.main`` in-process, which is what the entry runs.
Every bad input of docs/errors.md has its case in tests/test_errors.py.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from lis.cli import main


def quiet(tmp_path):
    """Overrides that keep a run out of the repository and off wandb."""
    return ["tracking.wandb=disabled", f"run.dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}"]


def lis(tmp_path, *args, columns=None):
    """Run the real console entry ``python -m lis ARGS`` from ``tmp_path``."""
    env = {**os.environ, "CI": "1"}
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "lis", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


def run_main(capsys, *args):
    """``lis.cli.main(ARGS)`` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"stderr is not exactly one line:\n{err}"
    assert lines[0].startswith("lis: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.fixture
def digits(repo):
    return repo / "experiments" / "digits.yaml"


# --- help ----------------------------------------------------------------------------------------


def test_help_lists_the_commands_with_one_line_descriptions(tmp_path):
    # A wide terminal, so that argparse has no reason to wrap a one-line description.
    r = lis(tmp_path, "--help", columns=200)
    assert r.returncode == 0, r.stderr
    for command, description in [
        ("train-teacher", "train (and cache) the teacher of a config"),
        ("compress", "teacher -> KDP (prune + distill) -> hard prune -> fine-tune -> evaluate"),
    ]:
        # argparse puts a description after the name or, for a long name, alone on the next line
        assert re.search(rf"^ +{re.escape(command)}\s+{re.escape(description)}$", r.stdout, re.M), r.stdout


@pytest.mark.parametrize("command", ["train-teacher", "compress"])
def test_command_help_exits_0(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: lis {command}" in out and "--overwrite" in out and "section.key=value" in out


# --- bad input: one line on stderr, exit code 2, nothing overwritten ---------------------------


def test_unknown_key_through_the_console(tmp_path, digits):
    r = lis(tmp_path, "train-teacher", digits, *quiet(tmp_path), "teacher.epoch=3")
    assert_one_line_error(r.returncode, r.stderr, "unknown config key 'teacher.epoch'",
                          "did you mean 'teacher.epochs'?")
    assert not (tmp_path / "runs").exists()


def test_malformed_yaml_through_the_console(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("teacher: {epochs: [1\n")
    r = lis(tmp_path, "train-teacher", config, *quiet(tmp_path))
    assert_one_line_error(r.returncode, r.stderr, str(config), "is not valid YAML")


def test_existing_run_directory_is_kept_through_the_console(tmp_path, digits):
    run_dir = tmp_path / "runs" / "digits"
    run_dir.mkdir(parents=True)
    (run_dir / "precious.txt").write_text("earlier results")
    r = lis(tmp_path, "train-teacher", digits, *quiet(tmp_path), "teacher.epochs=0")
    assert_one_line_error(r.returncode, r.stderr, f"run directory {run_dir} already exists", "--overwrite")
    assert [p.name for p in run_dir.iterdir()] == ["precious.txt"]
    assert (run_dir / "precious.txt").read_text() == "earlier results"


def test_a_refused_model_name_leaves_no_run_directory(tmp_path, capsys, digits):
    code, _, err = run_main(capsys, "train-teacher", digits, *quiet(tmp_path), "teacher.epochs=0",
                            "model.name=resnet57")
    assert_one_line_error(code, err, "unknown model")
    # The user fixes the typo and runs again, without --overwrite: nothing of theirs is there to protect.
    code, _, err = run_main(capsys, "train-teacher", digits, *quiet(tmp_path), "teacher.epochs=0")
    assert code == 0, err


# --- --overwrite -------------------------------------------------------------------------------


def test_overwrite_replaces_an_existing_run_directory(tmp_path, capsys, digits):
    run_dir = tmp_path / "runs" / "digits"
    run_dir.mkdir(parents=True)
    (run_dir / "stale.txt").write_text("from an earlier run")
    code, out, err = run_main(capsys, "train-teacher", digits, *quiet(tmp_path), "teacher.epochs=0", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json",
                                                          "teacher.pt"]
    assert "epochs: 0" in (run_dir / "config.yaml").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    # the reported accuracy is the saved teacher's on the test split, counted here again
    from torch.utils.data import DataLoader

    from lis.data import build_splits
    from lis.teacher import load_teacher
    from lis.train import evaluate

    teacher, _ = load_teacher(run_dir / "teacher.pt", "digits_cnn", 10)
    test = DataLoader(build_splits("digits", str(tmp_path / "data")).test, batch_size=256)
    assert summary["model"] == "digits_cnn"
    assert summary["teacher_acc"] == pytest.approx(evaluate(teacher, test, torch.device("cpu"))["acc"])
    assert "test accuracy" in out


def test_overrides_may_follow_options(monkeypatch):
    import lis.compare
    from lis.cli import main

    seen = {}
    monkeypatch.setattr(lis.compare, "compare", lambda *a, **kw: seen.setdefault("args", (a, kw)))
    assert main(["compare", "c.yaml", "kdp.epochs=2", "--seeds", "0,1", "--policies", "dean,fixed",
                 "data.root=/x", "--sweep", "policy.alpha=1,2", "--jobs", "3"]) == 0
    (config, policies, seeds, overrides, sweeps, name), kw = seen["args"]
    assert kw == {"jobs": 3, "plan": False}
    assert (config, policies, seeds, sweeps, name) == ("c.yaml", ["dean", "fixed"], [0, 1], ["policy.alpha=1,2"], None)
    assert overrides == ["kdp.epochs=2", "data.root=/x"]


@pytest.mark.parametrize("text, seeds", [("0,1,2", [0, 1, 2]), ("0-4", [0, 1, 2, 3, 4]), ("7, 2-3", [7, 2, 3]),
                                         ("0-2,1", [0, 1, 2]), ("5-5", [5])])
def test_seeds_take_lists_and_ranges(monkeypatch, text, seeds):
    import lis.compare
    from lis.cli import main

    seen = {}
    monkeypatch.setattr(lis.compare, "compare", lambda *a, **kw: seen.setdefault("args", a))
    assert main(["compare", "c.yaml", "--seeds", text]) == 0
    assert seen["args"][2] == seeds


@pytest.mark.parametrize("text", ["0-x", "3-1", "a", "1.5"])
def test_bad_seeds_are_one_line_with_an_example(capsys, text):
    from lis.cli import main

    with pytest.raises(SystemExit) as e:
        main(["compare", "c.yaml", "--seeds", text])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not a list of seeds: give integers and ranges, e.g. 0,1,2 or 0-9" in err


def test_demo_runs_the_documented_comparison(monkeypatch):
    import lis.compare
    from lis.cli import DEMO_POLICIES, main

    calls = []
    monkeypatch.setattr(lis.compare, "compare", lambda *a, **kw: calls.append((a, kw)))
    assert main(["demo"]) == 0 and main(["demo", "--quick"]) == 0
    (full, full_kw), (quick, quick_kw) = calls
    assert str(full[0]).endswith("lis/demo.yaml") and full[1] == DEMO_POLICIES and full[2] == [0, 1, 2]
    assert full_kw["jobs"] == quick_kw["jobs"] == len(os.sched_getaffinity(0))  # what the machine has
    assert quick[2] == [0] and quick_kw["name"] == "demo-quick"
