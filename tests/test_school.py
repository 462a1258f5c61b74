"""The compression pipeline end to end on shrunken configs: KDP -> hard prune -> fine-tune -> report."""

import json
import math

import pytest
import torch

import lis
from lis.config import load_config
from lis.measure import count_macs, count_params
from lis.pipeline import load_data
from lis.train import evaluate

LISTS = ("distillability", "sparsity", "admm_gap", "alpha", "rho")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("school")
    return {"run.dir": str(root / "runs"), "data.root": str(root / "data")}


def run(dirs, name, *overrides, config="experiments/mnist1d.yaml"):
    base = [f"{k}={v}" for k, v in dirs.items()] + [
        f"run.name={name}", "tracking.wandb=disabled", "teacher.epochs=2", "kdp.epochs=1",
        "finetune.epochs=1", "admm.interval=10", "signals.interval=5", "meta.interval=5"]
    cfg = load_config(config, base + list(overrides))
    run_dir = lis.compress(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, run_dir, json.loads((run_dir / "summary.json").read_text()), records


def kdp_steps(records):
    return [r for r in records if r.get("phase") == "kdp" and "distillability" in r]


@pytest.mark.parametrize("policy", ["fixed", "prune_only", "dean"])
def test_compress_writes_a_pruned_student_that_meets_the_budget(dirs, policy):
    cfg, run_dir, summary, records = run(dirs, f"c-{policy}", f"policy.name={policy}")
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "student.pt", "report.md"):
        assert (run_dir / f).is_file(), f
    assert summary["policy"] == policy
    # the physically pruned student, loaded on its own, measured independently
    student = lis.load_student(run_dir / "student.pt")
    splits, loaders = load_data(cfg)
    teacher = lis.models.create(cfg.model.name, splits.num_classes)
    reduction = 1 - count_macs(student, splits.input_shape) / count_macs(teacher, splits.input_shape)
    assert reduction >= cfg.prune.target_macs_reduction - 1e-9
    assert reduction == pytest.approx(summary["macs_reduction"])
    assert count_params(student) == summary["params"]["student"] < count_params(teacher)
    assert evaluate(student, loaders.test, torch.device("cpu"))["acc"] == pytest.approx(summary["student_acc"])
    # the accuracy to choose settings on: the whole val split, counted by hand
    with torch.no_grad():
        correct = sum(int(student(x.unsqueeze(0)).argmax(1).item() == y) for x, y in splits.val)
    assert summary["val_acc"] == pytest.approx(correct / len(splits.val))

    # the per-layer series, for every policy
    names = [r for r in records if "layer_names" in r]
    assert len(names) == 1
    steps = kdp_steps(records)
    assert steps
    for r in steps:
        for key in LISTS:
            assert len(r[key]) == len(names[0]["layer_names"]), key
    if policy == "prune_only":
        assert all(a == 0 for r in steps for a in r["alpha"]) and all(r["alpha_out"] == 0 for r in steps)
    if policy == "dean":
        assert (run_dir / "dean.pt").is_file()
        assert steps[-1]["rho"] != steps[0]["rho"] and steps[-1]["alpha"] != steps[0]["alpha"]
        assert any("meta_loss" in r for r in steps)


def test_same_seed_same_numbers(dirs):
    _, _, a, _ = run(dirs, "det-a", "policy.name=dean")
    _, _, b, _ = run(dirs, "det-b", "policy.name=dean")
    for key in ("student_acc", "params", "macs", "channels"):
        assert a[key] == b[key], key


def test_a_trained_dean_is_loaded_into_another_run(dirs):
    _, first, _, _ = run(dirs, "dean-src", "policy.name=dean")
    cfg, _, _, records = run(dirs, "dean-dst", "policy.name=dean", f"policy.dean_checkpoint={first / 'dean.pt'}",
                             "prune.target_macs_reduction=0.5")
    trained = torch.load(first / "dean.pt")
    fresh = lis.dean.create_dean(None)
    assert any(not torch.equal(trained[k], v) for k, v in fresh.state_dict().items())
    # the second run starts from the trained dean, not from the fixed constants
    assert kdp_steps(records)[0]["rho"] != pytest.approx([cfg.policy.rho] * len(kdp_steps(records)[0]["rho"]))


def test_a_student_of_another_architecture_learns_through_adapters(dirs):
    _, run_dir, summary, records = run(
        dirs, "r56-to-r20", "data.name=fake", "data.fake_size=32", "data.batch_size=16", "model.name=resnet56",
        "student.model=resnet20", "policy.name=fixed", "prune.target_macs_reduction=0.5")
    assert summary["params"]["student"] < count_params(lis.models.create("resnet20", 10))
    steps = kdp_steps(records)
    assert len(steps[0]["distillability"]) == len([r for r in records if "layer_names" in r][0]["layer_names"])


def _tiny_school(seed=0, model="mnist1d_cnn", shape=(1, 40)):
    import copy

    from lis.admm import ADMMState
    from lis.groups import CostModel, find_groups
    from lis.school import Classroom

    torch.manual_seed(seed)
    teacher = lis.models.create(model, 10).eval()
    student = copy.deepcopy(teacher).train()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    example = torch.zeros(2, *shape)
    groups = find_groups(student, example)
    admm = ADMMState(student, groups, CostModel(student, groups, example), {"macs": 0.5}, 0.1)
    names = [g.name for g in groups]
    room = Classroom(teacher, student, names, names, example, temperature=4.0)
    batch = (torch.randn(32, *shape), torch.randint(0, 10, (32,)))
    return student, room, groups, admm, batch


def _iterations(student, room, groups, admm, batches, signals_interval, precision=None):
    from lis.policy import FixedPolicy
    from lis.school import KDPSettings, kdp
    from lis.train import Precision

    records = []
    settings = KDPSettings(epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0, admm_interval=100,
                           signals_interval=signals_interval, ema=0.9, meta_interval=100,
                           precision=precision or Precision())
    kdp(student, room, groups, admm, FixedPolicy(0.7, 0.3, 1e-2), batches, batches, torch.device("cpu"),
        settings, records.append)
    return records


def test_logged_distillability_equals_separate_backward_passes():
    """Independent computation: two separate backward passes on a copy, cosine by hand per group."""
    import copy

    import numpy as np

    student, room, groups, admm, (x, y) = _tiny_school()
    reference = copy.deepcopy(student)
    records = _iterations(student, room, groups, admm, [(x, y)], signals_interval=1)
    logged = next(r for r in records if "distillability" in r)["distillability"]

    lesson = room.lesson(reference, x, y)
    kd = 0.7 * lesson.kd_logit + 0.3 * lesson.kd_feat.sum()
    params = dict(reference.named_parameters())
    grads = {}
    for label, loss in (("ce", lesson.ce), ("kd", kd)):
        reference.zero_grad()
        loss.backward(retain_graph=True)
        grads[label] = {n: p.grad.detach().clone() for n, p in params.items()}
    for value, g in zip(logged, groups):
        a = np.concatenate([grads["kd"][n].movedim(d, 0).reshape(-1).numpy() for n, d in g.out_slices])
        b = np.concatenate([grads["ce"][n].movedim(d, 0).reshape(-1).numpy() for n, d in g.out_slices])
        assert value == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-5)


def test_a_measured_iteration_updates_like_a_plain_one():
    """The update built from the two measured gradients equals one backward of CE + KD (no third pass)."""
    (plain, *rest_a, batch), (measured, *rest_b, _) = _tiny_school(), _tiny_school()
    second = (torch.randn(32, 1, 40), torch.randint(0, 10, (32,)))
    records = _iterations(plain, *rest_a, [batch, second], signals_interval=2)  # iteration 1 is plain
    assert [r["iter"] for r in records if "distillability" in r] == [1]
    _iterations(measured, *rest_b, [batch, second], signals_interval=1)  # both iterations measured
    for (n, a), b in zip(plain.named_parameters(), measured.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_autocast_runs_and_stays_close_to_float32(dirs):
    # bf16 autocast works on CPU too; bfloat16 keeps 8 bits of mantissa, so only the outcome can be compared
    _, _, plain, _ = run(dirs, "plain-fixed", "policy.name=fixed", config="experiments/digits.yaml")
    _, run_dir, fast, records = run(dirs, "bf16-fixed", "policy.name=fixed", "run.amp=bf16",
                                    config="experiments/digits.yaml")
    assert fast["params"] == plain["params"] and fast["macs"] == plain["macs"]
    assert abs(fast["student_acc"] - plain["student_acc"]) < 0.1
    assert all(math.isfinite(r["ce"]) for r in kdp_steps(records))


def test_channels_last_computes_what_the_default_layout_computes():
    """Bug caught: a layout change that alters the numbers (a kernel or a hook that reads memory in the wrong
    order). Two KDP iterations of the 2-D digits CNN (one measured, one plain) in either layout: the same
    signals and the same weights up to float32 rounding."""
    from lis.train import Precision

    second = (torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 10)
    results = []
    for precision in (Precision(), Precision(channels_last=True)):
        student, *rest, batch = _tiny_school(model="digits_cnn", shape=(1, 8, 8))
        records = _iterations(student, *rest, [batch, second], signals_interval=2, precision=precision)
        results.append((student, next(r for r in records if "distillability" in r)))
    (plain, logged_plain), (fast, logged_fast) = results
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fast.parameters())  # the layout did change
    assert logged_fast["distillability"] == pytest.approx(logged_plain["distillability"], abs=1e-5)
    assert logged_fast["ce"] == pytest.approx(logged_plain["ce"], abs=1e-5)
    for (n, a), b in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.contiguous(), a, rtol=0, atol=1e-5, msg=n)


def test_kdp_on_digits_learns_shrinks_the_admm_gap_and_raises_sparsity(dirs, untrained_accuracy):
    """Bug caught: a loop that runs without learning (a wrong sign, a step on the wrong tensors, a penalty
    that pushes W away from Z). Digits, fixed weights, a pull strong enough to act within the run
    (lr * rho * admm.interval = 0.2): the pruned student is well above chance (10%) and far above its own
    untrained copy, and over KDP the mean ADMM gap falls while the mean sparsity rises."""
    cfg, run_dir, summary, records = run(
        dirs, "learns", "policy.name=fixed", "kdp.epochs=3", "admm.interval=10", "policy.rho=1",
        config="experiments/digits.yaml")
    student = lis.load_student(run_dir / "student.pt")
    _, loaders = load_data(cfg)
    assert summary["student_acc"] >= 0.8
    assert summary["student_acc"] >= untrained_accuracy(student, loaders.test) + 0.5
    steps = kdp_steps(records)
    gap = [sum(r["admm_gap"]) / len(r["admm_gap"]) for r in steps]
    sparsity = [sum(r["sparsity"]) / len(r["sparsity"]) for r in steps]
    assert gap[-1] < 0.75 * gap[0]
    assert sparsity[-1] > sparsity[0]
