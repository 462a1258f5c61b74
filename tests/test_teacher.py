"""Tests for lis/teacher.py and lis/train.py: the teacher cache key, caching, checkpoints,
evaluation and schedules, determinism, and the accuracy the shipped configs reach."""

import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lis.teacher
from lis import models
from lis.cli import main
from lis.config import load_config
from lis.errors import LISError
from lis.pipeline import load_data
from lis.run import seed_everything
from lis.teacher import get_teacher, load_teacher, save_teacher, teacher_key, train_teacher
from lis.train import evaluate, scheduler

CPU = torch.device("cpu")


def quiet(tmp_path):
    """Overrides that keep a run out of the repository and off wandb."""
    return ["tracking.wandb=disabled", f"run.dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}"]


def digits_cfg(tmp_path, *extra):
    """The digits teacher, shrunk to one epoch."""
    return load_config(None, [*quiet(tmp_path), "data.name=digits", "data.batch_size=64", "model.name=digits_cnn",
                              "teacher.epochs=1", *extra])


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].cpu(), sb[k].cpu()), k


# --- teacher_key -------------------------------------------------------------------------------


def test_teacher_key_is_stable_for_equal_configs(tmp_path):
    assert teacher_key(digits_cfg(tmp_path)) == teacher_key(digits_cfg(tmp_path))
    # A setting that only restates a default does not move the key either.
    assert teacher_key(digits_cfg(tmp_path)) == teacher_key(digits_cfg(tmp_path, "run.seed=0"))


@pytest.mark.parametrize("override", ["teacher.epochs=2", "model.name=mnist1d_cnn", "teacher.seed=1",
                                      "data.batch_size=32"])
def test_teacher_key_changes_with_what_determines_the_teacher(tmp_path, override):
    assert teacher_key(digits_cfg(tmp_path, override)) != teacher_key(digits_cfg(tmp_path))


@pytest.mark.parametrize("override", ["data.root=/somewhere/else", "data.num_workers=2",
                                      "teacher.checkpoint=some/teacher.pt", "run.seed=1"])
def test_teacher_key_ignores_what_does_not(tmp_path, override):
    assert teacher_key(digits_cfg(tmp_path, override)) == teacher_key(digits_cfg(tmp_path))


# --- get_teacher: cache and checkpoints --------------------------------------------------------


def test_get_teacher_trains_once_then_loads_the_cache(tmp_path, monkeypatch):
    cfg = digits_cfg(tmp_path)
    splits, loaders = load_data(cfg)
    cache = tmp_path / "runs" / "teachers" / f"{teacher_key(cfg)}.pt"
    assert not cache.exists()

    model1, acc1, path1 = get_teacher(cfg, splits, loaders, CPU)
    assert path1 == cache and cache.is_file()
    # no temporary file left behind; the lock file that lets concurrent runs take turns stays
    assert sorted(cache.parent.iterdir()) == [cache.with_suffix(".lock"), cache]
    stamp = cache.stat().st_mtime_ns
    assert not model1.training

    def no_training(*args, **kwargs):
        raise AssertionError("get_teacher trained again although the teacher is cached")

    monkeypatch.setattr(lis.teacher, "train_teacher", no_training)
    model2, acc2, path2 = get_teacher(cfg, splits, loaders, CPU)
    assert path2 == cache and cache.stat().st_mtime_ns == stamp  # read, not rewritten
    assert acc2 == acc1
    assert_same_weights(model1, model2)
    assert not model2.training
    # The cached accuracy is the model's real test accuracy.
    assert evaluate(model2, loaders.test, CPU)["acc"] == pytest.approx(acc1)


@pytest.fixture
def saved_teacher(tmp_path):
    """An (untrained) digits_cnn teacher saved by ``save_teacher``: (path, model)."""
    seed_everything(3)
    model = models.create("digits_cnn", 10)
    path = tmp_path / "mine" / "teacher.pt"
    save_teacher(path, model, "digits_cnn", 10, 0.5)
    return path, model


def test_teacher_checkpoint_is_used(tmp_path, saved_teacher, monkeypatch):
    path, model = saved_teacher
    cfg = digits_cfg(tmp_path, f"teacher.checkpoint={path}")
    splits, loaders = load_data(cfg)

    def no_training(*args, **kwargs):
        raise AssertionError("get_teacher trained although teacher.checkpoint is set")

    monkeypatch.setattr(lis.teacher, "train_teacher", no_training)
    loaded, acc, used = get_teacher(cfg, splits, loaders, CPU)
    assert used == path
    assert_same_weights(loaded, model)
    # The accuracy is measured on this config's test split, not copied from the file.
    assert acc == pytest.approx(evaluate(model, loaders.test, CPU)["acc"])
    assert not (tmp_path / "runs" / "teachers").exists()  # a given teacher is not cached


@pytest.mark.parametrize("saved_as, num_classes, asked_for", [
    ("mnist1d_cnn", 10, "digits_cnn"),  # another architecture
    ("digits_cnn", 5, "digits_cnn"),  # another class count
])
def test_teacher_checkpoint_of_another_model_is_refused(tmp_path, saved_as, num_classes, asked_for):
    path = tmp_path / "other.pt"
    save_teacher(path, models.create(saved_as, num_classes), saved_as, num_classes, 0.9)
    with pytest.raises(LISError) as e:
        load_teacher(path, asked_for, 10)
    msg = str(e.value)
    assert f"{saved_as} with {num_classes} classes" in msg and f"{asked_for} with 10" in msg, msg
    assert str(path) in msg and "\n" not in msg


def test_teacher_checkpoint_of_another_model_is_refused_through_the_config(tmp_path):
    path = tmp_path / "other.pt"
    save_teacher(path, models.create("mnist1d_cnn", 10), "mnist1d_cnn", 10, 0.9)
    cfg = digits_cfg(tmp_path, f"teacher.checkpoint={path}")
    splits, loaders = load_data(cfg)
    with pytest.raises(LISError, match="mnist1d_cnn.*digits_cnn"):
        get_teacher(cfg, splits, loaders, CPU)


def test_truncated_teacher_checkpoint_is_refused(tmp_path, saved_teacher):
    path, _ = saved_teacher
    data = path.read_bytes()
    half = tmp_path / "half.pt"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(LISError, match="truncated or not a LIS teacher") as e:
        load_teacher(half, "digits_cnn", 10)
    assert str(half) in str(e.value)


def test_a_file_that_is_not_a_teacher_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(models.create("digits_cnn", 10).state_dict(), path)  # a bare state_dict, no metadata
    with pytest.raises(LISError, match="truncated or not a LIS teacher"):
        load_teacher(path, "digits_cnn", 10)


def test_missing_teacher_checkpoint_is_refused(tmp_path):
    cfg = digits_cfg(tmp_path, f"teacher.checkpoint={tmp_path / 'nope.pt'}")
    splits, loaders = load_data(cfg)
    with pytest.raises(LISError, match="does not exist") as e:
        get_teacher(cfg, splits, loaders, CPU)
    assert "nope.pt" in str(e.value)


# --- train.py: evaluate and the schedules ------------------------------------------------------


def test_evaluate_matches_a_hand_count():
    # nn.Identity: the inputs are the logits, so the predictions are known by construction.
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.5],
                           [0.0, 0.2, 0.1], [0.3, 0.1, 0.0], [0.0, 0.0, 9.0]])
    # predictions:             0            1            2            0            1            0          2
    labels = torch.tensor([0, 1, 0, 0, 2, 0, 1])
    # correct:                 y            y            n            y            n            y          n  -> 4 / 7
    model = nn.Identity().train()
    loader = DataLoader(TensorDataset(logits, labels), batch_size=3)  # batches of 3, 3, 1
    out = evaluate(model, loader, CPU)
    assert out["acc"] == pytest.approx(4 / 7)
    by_hand = sum(-torch.log_softmax(logits[i], 0)[labels[i]].item() for i in range(7)) / 7
    assert out["loss"] == pytest.approx(by_hand, rel=1e-6)
    assert model.training  # evaluate restores the mode it found


def test_evaluate_runs_in_eval_mode():
    # BatchNorm in eval mode with fresh stats is the identity; in train mode it would normalise per batch.
    model = nn.Sequential(nn.BatchNorm1d(2)).train()
    x = torch.tensor([[5.0, 0.0], [6.0, 0.0], [7.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 0, 1])
    out = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=4), CPU)
    assert out["acc"] == 1.0
    assert out["loss"] == pytest.approx(F.cross_entropy(x, y).item(), rel=1e-5)


def _lrs(schedule, epochs, lr=1.0):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = scheduler(opt, schedule, epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
    assert _lrs("step", 8) == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_schedule_decays_from_lr_towards_zero():
    lrs = _lrs("cosine", 4, lr=0.2)
    assert lrs == pytest.approx([0.2 * (1 + torch.cos(torch.tensor(torch.pi * e / 4)).item()) / 2 for e in range(4)])


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_bit_identical_teachers(tmp_path):
    cfg = digits_cfg(tmp_path)
    trained = []
    for _ in range(2):
        splits, loaders = load_data(cfg)
        model, acc = train_teacher(cfg, splits, loaders, CPU)
        trained.append((model, acc))
    (a, acc_a), (b, acc_b) = trained
    assert_same_weights(a, b)
    assert acc_a == acc_b


# --- acceptance: the shipped configs reach their accuracy ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name, min_acc, max_seconds", [("digits", 0.97, None), ("mnist1d", 0.975, 120.0)])
def test_shipped_teacher_configs_reach_their_accuracy(repo, tmp_path, capsys, name, min_acc, max_seconds):
    start = time.perf_counter()
    code = main(["train-teacher", str(repo / "experiments" / f"{name}.yaml"), *quiet(tmp_path)])
    seconds = time.perf_counter() - start
    assert code == 0, capsys.readouterr().err
    run_dir = tmp_path / "runs" / name
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = summary["teacher_acc"]
    assert acc >= min_acc, f"{name} teacher: test accuracy {acc:.4f} < {min_acc} (took {seconds:.1f} s)"
    if max_seconds is not None:
        assert seconds < max_seconds, f"{name} teacher took {seconds:.1f} s (>= {max_seconds} s), acc {acc:.4f}"
    # What the run wrote agrees with itself: the saved teacher loads and scores what the summary says.
    model, saved_acc = load_teacher(run_dir / "teacher.pt", summary["model"], 10)
    assert saved_acc == acc
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 30 and epochs[-1]["test_acc"] == acc
    print(f"{name} teacher: test accuracy {acc:.4f} in {seconds:.1f} s")
