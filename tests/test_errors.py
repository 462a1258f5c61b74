"""Every bad input of docs/errors.md through the real CLI: one line on stderr, exit code 2, nothing written.

The table in docs/errors.md is the specification. Each row's example command runs here as written (plus
``tracking.wandb=disabled``) from a workspace that holds the row's bad files next to an earlier run and a
teacher cache entry; its message must start (and end) as the table shows and name the fix in ``FIXES``, and
the workspace must be byte for byte what it was. ``FIXES`` and the table name the same rows.
"""

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lis import models
from lis.cli import main
from lis.config import load_config, to_yaml
from lis.dean import create_dean
from lis.teacher import save_teacher, teacher_key

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "docs" / "errors.md"

#: per row of the table: a fragment of the fix its message must name
FIXES = {
    "malformed-yaml": "fix the syntax",
    "repeated-key": "give each key once",
    "unknown-key": "did you mean 'kdp.epochs'?",
    "unknown-key-in-file": "did you mean 'kdp.temperature'?",
    "bad-override": "e.g. kdp.epochs=5",
    "wrong-type": "it must be an integer",
    "negative-epochs": "it must be an integer >= 0",
    "negative-lr": "it must be a positive number",
    "infinite-value": "it must be a finite number",
    "target-zero": "it must be a fraction in (0, 1) or null",
    "target-above-one": "it must be a fraction in (0, 1) or null",
    "no-budget": "set prune.target_macs_reduction and/or prune.target_params_reduction",
    "min-keep-above-one": "it must be a fraction in (0, 1]",
    "admm-interval-zero": "it must be an integer >= 1",
    "signals-interval-zero": "it must be an integer >= 1",
    "meta-interval-zero": "it must be an integer >= 1",
    "meta-batch-size-zero": "it must be an integer >= 1 or null",
    "meta-truncate-above-unroll": "lower it or raise meta.unroll",
    "meta-truncate-with-es": "set meta.truncate=null",
    "meta-finetune-without-pruned-ce": "set meta.objective=pruned_ce or meta.finetune_steps=0",
    "meta-es-population-odd": "it must be an even integer >= 2",
    "missing-config": "give the path of a YAML file",
    "cifar-root-missing": "set data.download=true",
    "folder-root-missing": "set data.root",
    "unknown-model": "did you mean 'resnet56'?",
    "model-builder-missing": "give pkg.module:function",
    "model-builder-wrong": "build_fn(num_classes) -> nn.Module",
    "data-builder-missing": "give pkg.module:function",
    "data-builder-wrong": "build_fn(root) -> (train, test)",
    "unknown-policy": "use one of fixed",
    "dean-without-meta-split": "set it to e.g. 0.1",
    "dean-start-outside-range": "pick a value inside or raise policy.a_max",
    "dean-rho-outside-range": "pick a value inside or widen the range",
    "per-layer-length": "give one number, or one per group in this order",
    "per-layer-negative": "a list of them, one per layer",
    "dean-per-layer-start": "give one number",
    "measure-without-kdp": "use it with dean, fixed, prune_only or kd_only",
    "no-training-set": "their sum must be below 1",
    "budget-unreachable": "lower prune.min_keep_ratio or prune.target_macs_reduction",
    "teacher-missing": "fix teacher.checkpoint or set it to null",
    "teacher-other-arch": "fix model.name or teacher.checkpoint",
    "teacher-other-classes": "fix model.name or teacher.checkpoint",
    "teacher-corrupt": "retrain it with 'lis train-teacher'",
    "teacher-weights-mismatch": "retrain it with 'lis train-teacher'",
    "dean-missing": "fix policy.dean_checkpoint",
    "dean-corrupt": "point policy.dean_checkpoint at the dean.pt of a dean run",
    "cuda-unavailable": "use run.device=cpu or auto",
    "sync-bn-on-cpu": "set run.sync_bn=false",
    "sync-bn-with-dean": "set run.sync_bn=false",
    "run-exists": "continue it with 'lis compress --resume runs/earlier'",
    "resume-not-a-run": "give the directory of a 'lis compress' run",
    "resume-finished": "start a new run instead",
    "resume-corrupt": "start the run again with --overwrite",
    "resume-changes-run": "a resume may change only kdp.lr",
    "bench-seeds-overlap": "the report seeds must be ones no choice looked at",
    "bench-without-fixed": "keep fixed in --policies",
}
#: rows whose command --overwrite changes (it replaces the existing run, or contradicts --resume, or the command
#: has no --overwrite: lis bench skips finished runs)
NOT_OVERWRITTEN = {"run-exists", "resume-not-a-run", "resume-finished", "resume-corrupt", "resume-changes-run",
                   "bench-seeds-overlap", "bench-without-fixed"}

QUIET = ["tracking.wandb=disabled"]


def read_table() -> dict[str, tuple[str, str, str | None]]:
    """docs/errors.md as ``{id: (command, message start, message end or None)}``."""
    rows = {}
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) != 4:
            continue
        row_id, _, command, message = cells
        spans = re.findall(r"`([^`]*)`", message)
        assert row_id.strip("`") not in rows, f"row {row_id} appears twice in {TABLE}"
        assert command.startswith("`lis ") and command.endswith("`"), command
        assert len(spans) in (1, 2) and message.replace("`", "").replace(" … ", "") == "".join(spans), message
        rows[row_id.strip("`")] = (command.strip("`"), spans[0], spans[1] if len(spans) == 2 else None)
    return rows


ROWS = read_table()


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (symlinks not followed), files with their content hash."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), root)] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The bad files of the table's second column, an earlier run and a teacher cache entry."""
    ws = tmp_path_factory.mktemp("workspace")
    (ws / "experiments").symlink_to(REPO / "experiments")
    (ws / "broken.yaml").write_text("kdp: {epochs: [1\n")
    (ws / "twice.yaml").write_text("kdp: {epochs: 5}\nkdp: {lr: 0.1}\n")
    (ws / "typo.yaml").write_text("kdp: {tempreature: 2}\n")
    (ws / "mybuilders.py").write_text("def no_model(num_classes):\n    return 'resnet'\n\n\n"
                                      "def no_data(root):\n    return None\n")
    save_teacher(ws / "mnist1d-teacher.pt", models.create("mnist1d_cnn", 10), "mnist1d_cnn", 10, 0.9)
    save_teacher(ws / "five-class-teacher.pt", models.create("digits_cnn", 5), "digits_cnn", 5, 0.9)
    save_teacher(ws / "stale-teacher.pt", models.create("mnist1d_cnn", 10), "digits_cnn", 10, 0.9)
    # the cache entry a digits run would use (so a row that were not refused would not train one)
    good = ws / "runs" / "teachers" / f"{teacher_key(load_config(REPO / 'experiments' / 'digits.yaml'))}.pt"
    save_teacher(good, models.create("digits_cnn", 10), "digits_cnn", 10, 0.9)
    (ws / "truncated-teacher.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    earlier = ws / "runs" / "earlier"
    earlier.mkdir()
    (earlier / "config.yaml").write_text("run: {name: earlier}\n")
    torch.save(create_dean().state_dict(), earlier / "dean.pt")
    (ws / "truncated-dean.pt").write_bytes((earlier / "dean.pt").read_bytes()[:500])
    for name in ("finished", "interrupted"):
        (ws / "runs" / name).mkdir()
        cfg = load_config(REPO / "experiments" / "digits.yaml", [f"run.name={name}"])
        (ws / "runs" / name / "config.yaml").write_text(to_yaml(cfg))
    (ws / "runs" / "finished" / "summary.json").write_text('{"student_acc": 0.97}')
    (ws / "runs" / "interrupted" / "checkpoint.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return ws


def no_training(*args, **kwargs):
    raise AssertionError("training started: the bad input was not refused before it")


@pytest.fixture
def workspace(template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the template as the working directory, on a machine without CUDA, where every
    training loop (teacher, KDP, fine-tuning: all build an SGD optimizer) fails the test."""
    ws = tmp_path / "ws"
    shutil.copytree(template, ws, symlinks=True)
    monkeypatch.chdir(ws)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.optim.SGD, "__init__", no_training)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # importing mybuilders.py writes no __pycache__
    return ws


def assert_error_line(row_id: str, code: int, err: str) -> None:
    command, start, end = ROWS[row_id]
    assert code == 2, f"{command}: exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"{command}: stderr is not exactly one line:\n{err}"
    line = lines[0]
    assert line.startswith("lis: error: " + start), f"{command}:\n  got  {line}\n  want lis: error: {start}"
    assert end is None or line.endswith(end), f"{command}:\n  got  {line}\n  want ... {end}"
    assert FIXES[row_id] in line, f"{command}: the fix {FIXES[row_id]!r} is not named in {line!r}"


def run_row(row_id: str, capsys, *extra: str) -> tuple[int, str]:
    """``lis.cli.main`` in-process on the row's example command: (exit code, stderr)."""
    assert row_id in ROWS, f"{row_id} has a case in FIXES but no row in {TABLE}"
    code = main(shlex.split(ROWS[row_id][0])[1:] + QUIET + list(extra))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("row_id", FIXES)
def test_bad_input_gives_one_line_and_writes_nothing(row_id, workspace, capsys):
    before = snapshot(workspace)
    code, err = run_row(row_id, capsys)
    assert_error_line(row_id, code, err)
    assert snapshot(workspace) == before


@pytest.mark.parametrize("row_id", sorted(set(FIXES) - NOT_OVERWRITTEN))
def test_overwrite_keeps_the_run_a_refused_command_would_replace(row_id, workspace, capsys):
    for name in ("digits", "cifar10_resnet56", "imagenet_resnet50"):  # the run.name of every config used
        (workspace / "runs" / name).mkdir()
        (workspace / "runs" / name / "summary.json").write_text('{"student_acc": 0.97}')
    before = snapshot(workspace)
    code, err = run_row(row_id, capsys, "--overwrite")
    assert_error_line(row_id, code, err)
    assert snapshot(workspace) == before


def test_the_table_and_the_tests_name_the_same_rows():
    assert ROWS, f"no rows found in {TABLE}"
    assert sorted(set(ROWS) - set(FIXES)) == [], "rows of docs/errors.md without a case in FIXES"
    assert sorted(set(FIXES) - set(ROWS)) == [], "cases in FIXES without a row in docs/errors.md"


def test_a_bad_teacher_through_the_console(workspace):
    """End to end through ``python -m lis``: the exit code and stderr a shell sees."""
    command = ROWS["teacher-other-arch"][0]
    env = {**os.environ, "CI": "1", "CUDA_VISIBLE_DEVICES": ""}
    before = snapshot(workspace)
    r = subprocess.run([sys.executable, "-m", "lis", *shlex.split(command)[1:], *QUIET], capture_output=True,
                       text=True, env=env, cwd=workspace, timeout=300)
    assert_error_line("teacher-other-arch", r.returncode, r.stderr)
    assert r.stdout == ""
    assert snapshot(workspace) == before
