"""Under torchrun, process 0 alone evaluates the test split and computes the summary (a CPU latency run at one
thread among it); the other processes get what they need from it. Two processes on CPU (gloo), as in
tests/test_distributed.py, with its BatchNorm-free CNN so that the processes' students must agree bit for bit."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import lis
from lis import pipeline, school
from lis.config import load_config
from test_distributed import CONFIG, _free_port, overrides

#: where the test split, the val split and the summary are computed
COUNTED = ((school, "evaluate"), (pipeline, "evaluate"), (pipeline, "summarize"))


def _args(root: Path, name: str) -> list[str]:
    return overrides(root, name) + ["policy.name=fixed", "kdp.epochs=1", "data.val_fraction=0.05"]


def compress_counting(cfg, patch) -> tuple[Counter, dict]:
    """Run ``lis.compress`` with ``patch(module, name, wrapper)``; returns how often each of ``COUNTED`` was
    called and the pruned student after fine-tuning."""
    calls, captured = Counter(), {}
    for module, name in COUNTED:
        def counted(*args, _real=getattr(module, name), _key=f"{module.__name__}.{name}", **kw):
            calls[_key] += 1
            return _real(*args, **kw)
        patch(module, name, counted)
    real_finetune = pipeline.finetune

    def finetune(student, *args, **kw):
        out = real_finetune(student, *args, **kw)
        captured.update({k: v.clone() for k, v in student.state_dict().items()})
        return out

    patch(pipeline, "finetune", finetune)
    lis.compress(cfg)
    return calls, captured


def _worker(rank: int, world: int, port: int, args: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), CI="1")
    torch.set_num_threads(1)
    calls, student = compress_counting(load_config(CONFIG, args), lambda m, n, f: setattr(m, n, f))
    torch.save({"calls": dict(calls), "student": student}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _shape(record: dict) -> tuple:
    """What a metrics.jsonl record is, without its float values (the two runs sum floats in other orders)."""
    return record["phase"], record.get("iter"), record.get("epoch"), tuple(sorted(record))


@pytest.mark.slow
def test_under_torchrun_process_0_alone_evaluates_and_summarises(tmp_path, monkeypatch):
    """Bug caught: every process evaluating the whole test and val splits and measuring the summary's CPU
    latency, N times the work for one result; and, once that is done by process 0 alone, processes that
    diverge (the others without the metrics) or a metrics.jsonl that differs from a single process's."""
    single_calls, _ = compress_counting(load_config(CONFIG, _args(tmp_path, "single")), monkeypatch.setattr)
    assert single_calls["lis.pipeline.summarize"] == 1 and single_calls["lis.school.evaluate"] >= 3

    mp.spawn(_worker, args=(2, _free_port(), _args(tmp_path, "ddp"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    assert ranks[0]["calls"] == dict(single_calls)  # process 0 does what a single process does
    assert ranks[1]["calls"] == {}  # and the other nothing of it
    for key, value in ranks[0]["student"].items():
        assert torch.equal(value, ranks[1]["student"][key]), f"student {key} differs between the processes"
    runs = tmp_path / "runs"
    assert sorted(p.name for p in (runs / "ddp").iterdir()) == sorted(p.name for p in (runs / "single").iterdir())
    # (the single run trained the teacher, logging it; the other loaded it from the cache)
    records = {n: [r for r in map(json.loads, (runs / n / "metrics.jsonl").read_text().splitlines())
                   if r["phase"] != "teacher"] for n in ("single", "ddp")}
    assert [_shape(r) for r in records["ddp"]] == [_shape(r) for r in records["single"]]
    summary = json.loads((runs / "ddp" / "summary.json").read_text())
    assert summary["val_acc"] is not None and summary["student_acc"] == records["ddp"][-1]["student_acc"]
