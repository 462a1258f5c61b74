"""An installed (not editable) lis: the wheel holds the demo's config, and 'lis demo --quick' runs from it
without the source tree and without downloading anything."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_wheel_runs_the_quick_demo(tmp_path):
    """A bug that left demo.yaml out of the package, or read it from the source tree, fails here."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), REPO], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("lis-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    assert (site / "lis" / "demo.yaml").is_file()
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "CI": "1", "WANDB_MODE": "offline"}
    where = subprocess.run([sys.executable, "-c", "import lis; print(lis.__file__)"], cwd=cwd, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(site / "lis" / "__init__.py")
    r = subprocess.run([sys.executable, "-m", "lis", "demo", "--quick", "kdp.epochs=1", "finetune.epochs=1",
                        "teacher.epochs=1"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (cwd / "runs" / "demo-quick" / "comparison.md").is_file()
    assert "| `dean` | 1 |" in r.stdout and "| `l1_prune` | 1 |" in r.stdout
