"""Baselines at the same budget: kd_only, l1_prune, scratch and Torch-Pruning's group-norm sparse training."""

import copy
import json

import pytest
import torch
from torch import nn

import lis
import lis.pipeline
from lis.admm import ADMMState
from lis.baselines import l1_masks, l1_norms, reinit_
from lis.config import load_config
from lis.groups import CostModel, channel_norms, find_groups
from lis.measure import count_macs, count_params
from lis.pipeline import load_data


def test_l1_norms_and_masks_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(2))
    example = torch.zeros(2, 1, 5, 5)
    model(example)
    groups = find_groups(model, example)
    (group,) = groups
    conv, bn = model[0], model[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, -0.2, 0.0]))
    expected = conv.weight.abs().sum((1, 2, 3)) + bn.weight.abs() + bn.bias.abs()
    torch.testing.assert_close(l1_norms(model, group), expected.detach())
    admm = ADMMState(model, groups, CostModel(model, groups, example), {"params": 0.4}, 0.25)
    mask = l1_masks(model, groups, admm)[group.name]
    kept = int(mask.sum())
    assert set(mask.nonzero().flatten().tolist()) == set(torch.argsort(-expected)[:kept].tolist())
    cost = CostModel(model, groups, example)
    assert cost.params({group.name: kept}) <= 0.6 * cost.params({})


def test_reinit_changes_every_layer():
    torch.manual_seed(0)
    model = lis.models.create("mnist1d_cnn", 10)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.123)
    reinit_(model)
    assert all(not torch.all(p == 0.123) for p in model.parameters())


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """``get(policy)``: (cfg, run dir, calls) of a tiny digits run of ``policy``, run once on first use.

    ``calls["hard_prune"]`` holds what the pipeline's hard prune got (the student, the masks) and a copy of the
    pruned student it returned; ``calls["finetune"]`` a copy of the student fine-tuning started from."""
    root = tmp_path_factory.mktemp("baselines")
    done = {}

    def get(policy):
        if policy in done:
            return done[policy]
        calls = {}
        real_prune, real_finetune = lis.pipeline.hard_prune, lis.pipeline.finetune

        def hard_prune(model, groups, masks, example):
            small = real_prune(model, groups, masks, example)
            calls["hard_prune"] = (copy.deepcopy(model), groups, masks, copy.deepcopy(small.state_dict()))
            return small

        def finetune(student, *args, **kw):
            calls["finetune"] = copy.deepcopy(student.state_dict())
            return real_finetune(student, *args, **kw)

        cfg = load_config("experiments/digits.yaml", [
            f"run.dir={root / 'runs'}", f"data.root={root / 'data'}", f"run.name={policy}", f"policy.name={policy}",
            "tracking.wandb=disabled", "teacher.epochs=2", "kdp.epochs=1", "finetune.epochs=1", "admm.interval=5",
            "signals.interval=5"])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lis.pipeline, "hard_prune", hard_prune)
            mp.setattr(lis.pipeline, "finetune", finetune)
            run_dir = lis.compress(cfg)
        done[policy] = cfg, run_dir, calls
        return done[policy]

    return get


@pytest.mark.parametrize("policy", ["kd_only", "l1_prune", "scratch", "tp_group_norm"])
def test_baseline_meets_the_budget_and_learns_end_to_end(baseline, untrained_accuracy, policy):
    cfg, run_dir, _ = baseline(policy)
    summary = json.loads((run_dir / "summary.json").read_text())
    student = lis.load_student(run_dir / "student.pt")
    teacher = lis.models.create(cfg.model.name, 10)
    shape = (1, 8, 8)
    target = cfg.prune.target_macs_reduction
    assert target - 1e-9 <= 1 - count_macs(student, shape) / count_macs(teacher, shape) <= target + 0.01
    assert summary["params"]["student"] == count_params(student) and summary["policy"] == policy
    # learning, not only running: well above chance (10%) and above the same architecture untrained
    _, loaders = load_data(cfg)
    assert summary["student_acc"] >= 0.4
    assert summary["student_acc"] >= untrained_accuracy(student, loaders.test) + 0.25
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("phase") == "kdp" and "rho" in r]
    finetune_epochs = [r for r in records if r.get("phase") == "finetune"]
    if policy == "kd_only":
        assert steps and all(r == 0 for s in steps for r in s["rho"])
        assert len(finetune_epochs) == cfg.finetune.epochs
    else:  # no KDP phase: its epochs go to fine-tuning (or, for tp_group_norm, to sparse training)
        assert not steps
        extra = cfg.kdp.epochs if policy in ("l1_prune", "scratch") else 0
        assert len(finetune_epochs) == cfg.finetune.epochs + extra


def test_kd_only_prunes_by_magnitude_after_kdp(baseline):
    """Bug caught: kd_only's hard prune using the masks of W + U (U still accumulates with r = 0) or a stale
    Z instead of W's own channel norms. The masks the pipeline pruned with keep, in every group, the channels
    of largest norm of the student as KDP left it, as many as the keep plan of those norms allows."""
    cfg, _, calls = baseline("kd_only")
    student, groups, masks, _ = calls["hard_prune"]
    example = torch.zeros(2, 1, 8, 8)
    _, fresh = lis.pipeline.plan(student, example, cfg)  # U = 0: the plan and projection of W alone
    assert fresh.keep == {g: int(m.sum()) for g, m in masks.items()}
    assert any(not m.all() for m in masks.values())
    for g in groups:
        norms = channel_norms(student, g)
        kept, dropped = norms[masks[g.name]], norms[~masks[g.name]]
        assert len(dropped) == 0 or kept.min() >= dropped.max(), g.name


@pytest.mark.parametrize("policy", ["l1_prune", "scratch"])
def test_scratch_fine_tunes_a_reinitialised_student_and_l1_prune_the_pruned_one(baseline, policy):
    """Bug caught: scratch inheriting the teacher's weights (then it is l1_prune without a teacher). The
    student fine-tuning starts from is, for scratch, different from the hard-pruned one in every tensor (the
    same shapes); for l1_prune it is the hard-pruned one."""
    _, _, calls = baseline(policy)
    pruned, start = calls["hard_prune"][3], calls["finetune"]
    assert {k: v.shape for k, v in pruned.items()} == {k: v.shape for k, v in start.items()}
    weights = [k for k, v in pruned.items() if v.is_floating_point() and k.endswith("weight")]
    assert weights
    if policy == "scratch":
        assert all(not torch.equal(pruned[k], start[k]) for k in weights)
    else:
        assert all(torch.equal(pruned[k], start[k]) for k in pruned)


def _tp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    from lis import dist
    from lis.baselines import tp_group_norm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init()
    torch.manual_seed(0)  # one model
    model = lis.models.create("mnist1d_cnn", 4)
    gen = torch.Generator().manual_seed(100 + rank)  # each process its own shard of the data
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 40, generator=gen),
                                          torch.randint(0, 4, (64,), generator=gen))
    small = tp_group_norm(model, torch.zeros(2, 1, 40), {"macs": 0.5}, torch.utils.data.DataLoader(data, 16),
                          torch.device("cpu"), epochs=2, lr=0.1, momentum=0.9, weight_decay=5e-4, reg=1e-2)
    torch.save({k: v for k, v in small.state_dict().items() if "running" not in k}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_tp_group_norm_under_torchrun_gives_every_process_the_same_pruned_student(tmp_path):
    """Two CPU processes (gloo) that see different data: their gradients are averaged, so they prune to one
    architecture with the same weights (BatchNorm running statistics stay per process, as in KDP)."""
    import torch.multiprocessing as mp

    from test_distributed import _free_port

    mp.spawn(_tp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert {k: v.shape for k, v in ranks[0].items()} == {k: v.shape for k, v in ranks[1].items()}
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
