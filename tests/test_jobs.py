"""lis compare --jobs and --plan (lis/jobs.py): pairs in worker processes or as scheduler commands give the
same comparison as one process, and 'lis compare' aggregates what the commands finished."""

import csv
import json
import os
import subprocess
import sys

import pytest

from lis.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["teacher.epochs=1", "kdp.epochs=1", "finetune.epochs=1", "admm.interval=5", "signals.interval=5",
        "meta.interval=5"]
NUMBERS = ("student_acc", "val_acc", "teacher_acc", "params", "macs")


def compare_args(tmp_path, name, *extra):
    return ["compare", os.path.join(REPO, "experiments", "digits.yaml"), "--policies", "fixed,dean", "--seeds", "0,1",
            "--name", name, f"run.dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}",
            "tracking.wandb=disabled", *TINY, *extra]


def table(cmp_dir):
    with open(cmp_dir / "comparison.csv", newline="") as f:
        return [{k: r[k] for k in ("label", "seed", *NUMBERS)} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_jobs_2_gives_the_serial_comparison(tmp_path, capsys):
    """Two worker processes with one thread each give exactly the numbers of one process running the pairs in
    turn (a run whose thread count followed --jobs, or workers that trained their own teachers, would differ),
    and every run records run.threads=1."""
    assert main(compare_args(tmp_path, "serial")) == 0
    assert main(compare_args(tmp_path, "parallel", "--jobs", "2")) == 0
    out = capsys.readouterr().out
    assert out.count("started (log:") == 4 and out.count(" done\n") == 4
    serial, parallel = table(tmp_path / "runs" / "serial"), table(tmp_path / "runs" / "parallel")
    assert len(serial) == 4 and serial == parallel
    assert "threads: 1\n" in (tmp_path / "runs" / "parallel" / "dean-s1" / "config.yaml").read_text()
    assert len(list((tmp_path / "runs" / "teachers").glob("*.pt"))) == 1  # one teacher for both comparisons


@pytest.mark.slow
def test_plan_lines_run_by_bash_then_compare_aggregates(tmp_path, capsys):
    """--plan prints one 'lis compress' line per pending pair and runs nothing; the lines run by bash (as a
    SLURM array would, one per task), then 'lis compare' writes the comparison without running anything."""
    assert main(compare_args(tmp_path, "planned", "--plan")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("lis compress ") for line in lines)
    assert not (tmp_path / "runs").exists()
    shim = tmp_path / "bin" / "lis"  # the lis of this source tree
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m lis \"$@\"\n")
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "PYTHONPATH": REPO}
    for line in lines[:3]:  # one task of the array did not run
        subprocess.run(["bash", "-c", line], check=True, env=env, capture_output=True, timeout=300)
    assert main(compare_args(tmp_path, "planned", "--plan")) == 0
    assert capsys.readouterr().out.splitlines() == lines[3:]
    subprocess.run(["bash", "-c", lines[3]], check=True, env=env, capture_output=True, timeout=300)
    assert main(compare_args(tmp_path, "planned")) == 0
    out = capsys.readouterr().out
    assert out.count("skip (done)") == 4
    rows = table(tmp_path / "runs" / "planned")
    assert [(r["label"], r["seed"]) for r in rows] == [("fixed", "0"), ("fixed", "1"), ("dean", "0"), ("dean", "1")]
    summary = json.loads((tmp_path / "runs" / "planned" / "dean-s0" / "summary.json").read_text())
    assert summary["policy"] == "dean" and summary["seed"] == 0
