"""notebooks/distillability_curves.ipynb runs clean top to bottom, headless, on the two tiny runs it makes
itself (RUN_DIRS empty), and draws its figures."""

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "distillability_curves.ipynb"


@pytest.mark.slow
def test_notebook_runs_clean(tmp_path, monkeypatch, repo):
    # the kernel inherits this environment: its temp runs land in tmp_path, one thread, no wandb
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert "RUN_DIRS = []" in nb.cells[1].source
    # jupyter_client starts the "python" of a kernelspec as sys.executable: this venv, not whatever is on PATH
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(repo)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6
    assert sorted(p.name for p in tmp_path.glob("lis-curves-*/*")) == ["digits-dean", "digits-fixed", "teachers"]
    assert nb.cells[-1].outputs[0].text.strip() == sys.executable
