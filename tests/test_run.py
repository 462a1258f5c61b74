import json

import pytest

from lis.config import load_config
from lis.errors import LISError
from lis.run import MetricsLog, create_run_dir, new_run_dir, wandb_scalars


def test_wandb_gets_one_key_per_layer():
    record = {"phase": "kdp", "iter": 5, "ce": 0.5, "distillability": [0.1, -0.2], "rho": [1e-3, 2e-3],
              "flag": True}
    out = wandb_scalars(record, ["conv1", "layer1.0.conv1"])
    assert out == {"iter": 5, "ce": 0.5, "distillability/conv1": 0.1, "distillability/layer1.0.conv1": -0.2,
                   "rho/conv1": 1e-3, "rho/layer1.0.conv1": 2e-3}


def test_metrics_log_writes_jsonl_and_offline_wandb(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "run.name=w", "tracking.wandb=offline"])
    run_dir = create_run_dir(cfg)
    with MetricsLog(run_dir, cfg) as log:
        log.log({"phase": "kdp", "iter": 0, "layer_names": ["a", "b"]})
        log.log({"phase": "kdp", "iter": 1, "distillability": [0.5, 0.25]})
        assert log.layer_names == ["a", "b"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["distillability"] == [0.5, 0.25]
    assert any((run_dir / "wandb").glob("offline-run-*")), "wandb wrote no offline run"


def test_new_run_dir_removes_what_a_user_error_left(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "run.name=x"])
    with pytest.raises(LISError):
        with new_run_dir(cfg) as path:
            raise LISError("bad input")
    assert not path.exists()
    with pytest.raises(RuntimeError):  # a bug keeps what was written, for the traceback's reader
        with new_run_dir(cfg) as path:
            raise RuntimeError("bug")
    assert path.exists()
