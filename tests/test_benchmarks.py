"""The benchmark scripts run end to end on a tiny budget (their timings are not checked here)."""

import re
import subprocess
import sys


def test_overhead_quick_prints_a_ratio_per_model(repo):
    out = subprocess.run([sys.executable, "benchmarks/overhead.py", "--quick", "--models", "mnist1d_cnn",
                          "--device", "cpu"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("mnist1d_cnn (cpu")]
    assert len(lines) == 1, out.stdout
    for variant in ("dean[higher]", "dean[func]"):
        assert re.search(rf"{re.escape(variant)} [\d.]+ ms/iter \(x\d+\.\d\d\)", lines[0]), lines[0]
    assert out.stdout.splitlines()[-1].startswith("target:")
