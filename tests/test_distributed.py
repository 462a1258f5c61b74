"""Two processes on CPU (gloo), as torchrun would start them, against one process with the same global batch.

BatchNorm normalises each process's half batch on its own (SyncBatchNorm needs GPUs), which would make the
two runs differ by design; the model here is MNIST-1D's CNN without BatchNorm, so they must agree.
"""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import lis
from lis import dist, pipeline
from lis.config import load_config
from lis.errors import LISError
from lis.models import register_model
from lis.models.small import SmallCNN

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "mnist1d.yaml"


def _conv_relu(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_out, k, stride, padding=k // 2), nn.ReLU())


@register_model(input_shape=(1, 40))
def mnist1d_cnn_nobn(num_classes: int) -> SmallCNN:
    return SmallCNN(nn.Sequential(_conv_relu(1, 16, 5), _conv_relu(16, 16, 5), _conv_relu(16, 32, 5, 2),
                                  _conv_relu(32, 32, 3)), 32, num_classes)


def overrides(root: Path, name: str) -> list[str]:
    # 3600 training and 400 meta samples: 18 and 2 global batches of 200, none partial
    return [f"run.dir={root / 'runs'}", f"data.root={root / 'data'}", f"run.name={name}", "tracking.wandb=disabled",
            "model.name=mnist1d_cnn_nobn", "policy.name=dean", "data.batch_size=200", "teacher.epochs=2",
            "kdp.epochs=2", "finetune.epochs=1", "admm.interval=4", "signals.interval=2", "meta.interval=3",
            "run.device=cpu"]


def compress_and_capture(cfg) -> dict:
    """Run ``lis.compress`` and return the dean after KDP and the pruned student after fine-tuning."""
    captured = {}
    real_kdp, real_finetune = pipeline.kdp, pipeline.finetune

    def kdp(student, room, groups, admm, policy, *args, **kw):
        out = real_kdp(student, room, groups, admm, policy, *args, **kw)
        captured["dean"] = {k: v.clone() for k, v in policy.state_dict().items()}
        return out

    def finetune(student, *args, **kw):
        out = real_finetune(student, *args, **kw)
        captured["student"] = {k: v.clone() for k, v in student.state_dict().items()}
        return out

    pipeline.kdp, pipeline.finetune = kdp, finetune
    try:
        lis.compress(cfg)
    finally:
        pipeline.kdp, pipeline.finetune = real_kdp, real_finetune
    return captured


def _worker(rank: int, world: int, port: int, args: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), CI="1")
    torch.set_num_threads(1)
    captured = compress_and_capture(load_config(CONFIG, args))
    torch.save(captured, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_one_run_that_equals_a_single_process_with_the_same_global_batch(tmp_path):
    single = compress_and_capture(load_config(CONFIG, overrides(tmp_path, "single")))  # also caches the teacher

    mp.spawn(_worker, args=(2, _free_port(), overrides(tmp_path, "ddp"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # every process ends with the same student and the same dean, bit for bit
    for part in ("student", "dean"):
        for key, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][key]), f"{part} {key} differs between the processes"
    # one run directory, written once
    run = tmp_path / "runs" / "ddp"
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == sorted(
        p.name for p in (tmp_path / "runs" / "single").iterdir() if p.is_file())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["iter"] for r in records if r["phase"] == "kdp" and "ce" in r]
    assert steps == sorted(set(steps)) and len(steps) == len(set(steps))  # nobody else appended to it
    # and it is the single-process run, up to float summation order
    # (the dean's meta step looks one SGD step ahead on each process's half batch, and the meta-gradients of
    # the two halves are averaged: close to the whole batch's, not equal; measured up to 3.5e-4 on the student
    # and 6e-4 on the layerwise dean here, whose per-layer split follows per-layer differences of the halves)
    for part, atol in (("student", 1e-3), ("dean", 2e-3)):
        for key, value in single[part].items():
            assert value.shape == ranks[0][part][key].shape, f"{part} {key}: another shape (another pruning plan)"
            torch.testing.assert_close(ranks[0][part][key], value, atol=atol, rtol=1e-3, msg=f"{part} {key}")
    summaries = [json.loads((tmp_path / "runs" / n / "summary.json").read_text()) for n in ("single", "ddp")]
    assert summaries[0]["student_acc"] == pytest.approx(summaries[1]["student_acc"], abs=0.003)
    assert summaries[0]["macs"] == summaries[1]["macs"]


def test_torchrun_on_a_gpu_host_joins_with_a_backend_per_device_and_refuses_a_gpu_index(monkeypatch):
    """On a GPU host, run.device=cpu must still all-reduce its CPU tensors (gloo; nccl takes only GPU ones),
    and run.device=cuda:N would send every process to GPU N while DDP uses each process's own. CUDA and the
    process group are faked: only the calls are recorded."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(("init", backend)))
    dist.init()
    assert calls == [("set_device", 1), ("init", "cpu:gloo,cuda:nccl")]

    monkeypatch.setattr(dist, "world", lambda: 2)
    with pytest.raises(LISError, match=r"run.device=cuda:1 under torchrun: each process uses its own GPU"):
        dist.device("cuda:1")
    assert dist.device("cpu") == "cpu"
