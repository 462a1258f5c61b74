"""Nothing lost: exact resume after kill -9 or a signal, numerical faults caught, concurrent runs kept apart.

The runs go through the real console entry (``python -m lis``) in subprocesses, each on one thread, so an
uninterrupted run and a killed-then-resumed one compute the same floating-point operations; their
``summary.json`` (accuracy, params, MACs) and ``metrics.jsonl`` (every record) must be identical.
"""

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lis.school
from lis.cli import main
from lis.school import guard
from lis.errors import NumericalFault

CONFIG = "experiments/mnist1d.yaml"
SMALL = ["tracking.wandb=disabled", "teacher.epochs=2", "kdp.epochs=1", "finetune.epochs=1", "data.batch_size=256",
         "admm.interval=4", "signals.interval=1", "meta.interval=3", "checkpoint.every_iters=5"]
ENV = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


def overrides(root: Path, name: str, *extra: str) -> list[str]:
    return [f"run.dir={root / 'runs'}", f"data.root={root / 'data'}", f"run.name={name}", *SMALL, *extra]


def start(root: Path, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lis", "compress", CONFIG, *overrides(root, name, *extra)],
                            cwd=Path(__file__).resolve().parents[1], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def resume(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lis", "compress", "--resume", str(run_dir), *extra],
                          env=ENV, capture_output=True, text=True, timeout=300)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def records(run_dir: Path) -> list[dict]:
    """Every metrics record of the student's phases (the teacher's exist only where it was trained; the summary
    record holds wall time and latency)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] not in ("teacher", "summary")]


def outcome(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {k: summary[k] for k in ("student_acc", "params", "macs", "channels")}


@pytest.fixture(scope="module")
def reference(root):
    """The uninterrupted run of a policy (run once, on first use)."""
    done = {}

    def get(policy: str) -> Path:
        if policy not in done:
            code, _, err = finish(start(root, f"ref-{policy}", f"policy.name={policy}"))
            assert code == 0, err
            done[policy] = root / "runs" / f"ref-{policy}"
        return done[policy]

    return get


def wait_for_records(proc: subprocess.Popen, run_dir: Path, n: int) -> None:
    """Wait until the run has written ``n`` student records (or fail if it ends first)."""
    deadline = time.monotonic() + 300
    while True:
        path = run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        if sum('"teacher"' not in line for line in lines) >= n:
            return
        assert proc.poll() is None, f"the run ended before {n} records: {proc.communicate()[1]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("policy", ["fixed", "dean"])
def test_a_run_killed_at_a_random_iteration_resumes_to_the_uninterrupted_result(root, reference, policy):
    ref = reference(policy)
    n = len(records(ref))
    k = random.Random(f"kill-{policy}").randint(1, n - 1)  # seeded: a failure is reproducible
    print(f"kill -9 after {k} of {n} records")  # shown if the test fails
    run_dir = root / "runs" / f"kill-{policy}-{k}"
    proc = start(root, run_dir.name, f"policy.name={policy}")
    wait_for_records(proc, run_dir, k)
    proc.kill()
    assert finish(proc)[0] == -signal.SIGKILL

    r = resume(run_dir)
    assert r.returncode == 0, r.stderr
    assert outcome(run_dir) == outcome(ref)
    assert records(run_dir) == records(ref)  # no step missing, none twice, every number the same
    assert "resumed from" in (run_dir / "resume.log").read_text()


@pytest.mark.parametrize("policy,signum", [("fixed", signal.SIGTERM), ("dean", signal.SIGINT)])
def test_a_signal_saves_a_checkpoint_and_the_run_resumes_from_it(root, reference, policy, signum):
    ref = reference(policy)
    run_dir = root / "runs" / f"signal-{policy}"
    proc = start(root, run_dir.name, f"policy.name={policy}")
    wait_for_records(proc, run_dir, 8)
    proc.send_signal(signum)
    code, _, err = finish(proc)
    assert code == 128 + signum, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"lis: stopped: {name} at kdp iteration "), lines[0]
    assert lines[0].endswith(f"saved a checkpoint; continue with 'lis compress --resume {run_dir}'")
    stopped_at = int(lines[0].split("iteration ")[1].split(":")[0])
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (state["phase"], state["iter"]) == ("kdp", stopped_at)
    assert not (run_dir / "summary.json").exists()

    r = resume(run_dir)
    assert r.returncode == 0, r.stderr
    assert outcome(run_dir) == outcome(ref)
    assert records(run_dir) == records(ref)


def test_a_nan_stops_the_run_naming_iteration_layer_and_quantity_and_a_lower_lr_finishes_it(
        root, reference, monkeypatch, capsys):
    reference("fixed")  # the teacher is cached
    real, calls = lis.school.kd_features, itertools.count()

    def poisoned(pairs, feature_loss):  # one call per lesson, one lesson per KDP iteration (fixed policy)
        loss = real(pairs, feature_loss)
        return loss * torch.tensor([1, float("nan"), 1, 1]) if next(calls) == 12 else loss  # iteration 13, layer 2

    monkeypatch.setattr(lis.school, "kd_features", poisoned)
    run_dir = root / "runs" / "nan"
    code = main(["compress", CONFIG, *overrides(root, "nan", "policy.name=fixed")])
    err = capsys.readouterr().err
    assert code == 3
    assert err == (f"lis: stopped: the KD_feat loss of features.1.0 is NaN at KDP iteration 13 (epoch 0): stopped, "
                   f"the last good checkpoint (kdp iteration 10) is kept; continue with a lower learning rate, e.g. "
                   f"'lis compress --resume {run_dir} kdp.lr=0.005 finetune.lr=0.001'\n")
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["iter"] == 10

    monkeypatch.setattr(lis.school, "kd_features", real)
    assert main(["compress", "--resume", str(run_dir), "kdp.lr=0.005", "finetune.lr=0.001"]) == 0
    assert (run_dir / "summary.json").is_file()  # finished; what it computed is checked below
    assert "resumed from kdp iteration 10 with kdp.lr: 0.05 -> 0.005, finetune.lr: 0.01 -> 0.001" in \
        (run_dir / "resume.log").read_text()
    steps = [r["iter"] for r in records(run_dir) if r["phase"] == "kdp" and "ce" in r]
    assert steps == list(range(1, len(steps) + 1))  # every iteration once: none lost, none repeated
    lrs = {r["iter"]: r["lr"] for r in records(run_dir) if "ce" in r}
    ref_lrs = {r["iter"]: r["lr"] for r in records(reference("fixed")) if "ce" in r}
    assert lrs[10] == ref_lrs[10] and lrs[11] == pytest.approx(ref_lrs[11] / 10)  # the schedule, scaled


def test_guard_names_the_quantity_and_the_layer_of_the_first_non_finite_value():
    ok = torch.ones(3)
    guard("here", {"a": (ok, None), "b": (ok, ["x", "y", "z"])})  # all finite: nothing happens
    with pytest.raises(NumericalFault, match=r"^the gradient of y is Inf at KDP iteration 7$"):
        guard("KDP iteration 7", {"the loss": (torch.tensor(1.0), None),
                                  "the gradient": (torch.tensor([1.0, float("inf"), float("nan")]), ["x", "y", "z"])})
    with pytest.raises(NumericalFault, match=r"^the loss is NaN at there$"):
        guard("there", {"the loss": (torch.tensor(float("nan")), None)})


def test_runs_started_at_once_train_one_teacher_and_never_share_a_directory(tmp_path):
    # three runs at once in a fresh runs/ folder: a and b need the same teacher; a second "a" races for a's name
    procs = [start(tmp_path, name, "policy.name=fixed") for name in ("a", "b", "a")]
    results = [finish(p) for p in procs]
    codes = sorted(code for code, _, _ in (results[0], results[2]))
    assert results[1][0] == 0 and codes == [0, 2], [err for _, _, err in results]
    loser = next(err for code, _, err in results if code == 2)
    assert loser.startswith("lis: error: run directory ") and "run.name=" in loser and len(loser.splitlines()) == 1
    runs = tmp_path / "runs"
    trained = [name for name in ("a", "b") if '"teacher"' in (runs / name / "metrics.jsonl").read_text()]
    assert len(trained) == 1  # the other run waited for the cache entry and loaded it
    assert len(list((runs / "teachers").glob("*.pt"))) == 1
    for name in ("a", "b"):
        assert f"name: {name}\n" in (runs / name / "config.yaml").read_text()
        assert json.loads((runs / name / "summary.json").read_text())["policy"] == "fixed"
    assert records(runs / "a") == records(runs / "b")  # same config and seed, one teacher: the same run
