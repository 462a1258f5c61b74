"""The benchmark scripts run end to end on a tiny budget (their timings are not checked here)."""

import os
import re
import subprocess
import sys

import pytest


def test_overhead_quick_prints_a_ratio_per_model(repo):
    out = subprocess.run([sys.executable, "benchmarks/overhead.py", "--quick", "--models", "mnist1d_cnn",
                          "--device", "cpu"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("mnist1d_cnn (cpu")]
    assert len(lines) == 1, out.stdout
    for variant in ("dean[higher]", "dean[func]"):
        assert re.search(rf"{re.escape(variant)} [\d.]+ ms/iter \(x\d+\.\d\d\)", lines[0]), lines[0]
    assert out.stdout.splitlines()[-1].startswith("target:")


def test_throughput_tiny_cpu_run_prints_the_ratios(repo):
    # two timed iterations: fewer than meta.interval, so no meta step is timed and the target is not judged
    out = subprocess.run([sys.executable, "benchmarks/throughput.py", "--models", "resnet56", "--device", "cpu",
                          "--batch", "4", "--iters", "2", "--warmup", "1"],
                         cwd=repo, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("training throughput on CPU (1 threads)"), lines[0]
    assert lines[1] == "each timed window holds 0 meta steps, 0 signal measurements, 0 ADMM steps", lines[1]
    assert lines[2].startswith("warning: no meta step in the timed window"), lines[2]
    for loop in ("plain", "fixed", "dean"):
        assert any(re.fullmatch(rf"resnet56\s+4\s+{loop}\s+[\d.]+\s+[\d.]+", line) for line in lines), out.stdout
    assert re.fullmatch(r"resnet56: dean/fixed x\d+\.\d\d, fixed/plain x\d+\.\d\d", lines[-2]), lines[-2]
    assert re.fullmatch(r"target: dean >= 0\.6x .*: not judged, no meta step was timed \(worst x\d+\.\d\d, "
                        r"resnet56\)", lines[-1]), lines[-1]


@pytest.mark.slow
def test_gpu_check_dry_run_goes_through_every_step_on_the_cpu(repo, tmp_path):
    """benchmarks/gpu_check.sh with GPU_CHECK_DRY_RUN=1: its compress runs (fixed, dean, bf16), resume and
    benchmarks run on the CPU at a tiny budget and their numbers reach the report."""
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=repo, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
                              "OMP_NUM_THREADS": "1", "CI": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    report = (tmp_path / "gpu_check.txt").read_text()
    for name in ("fixed-fp32", "fixed-bf16", "dean-fp32", "dean-bf16"):
        assert re.search(rf"compress {name}: \d+ s, .*'student_acc'", report), report
    assert re.search(r"resume: .*resumed from kdp iteration \d+.*'student_acc'", report), report
    assert "target fixed: ordinary iteration" in report and "fixed/plain x" in report
    assert report.rstrip().endswith("gpu_check done")
