"""Baselines at the same budget: kd_only, l1_prune, scratch and Torch-Pruning's group-norm sparse training."""

import json

import pytest
import torch
from torch import nn

import lis
from lis.admm import ADMMState
from lis.baselines import l1_masks, l1_norms, reinit_
from lis.config import load_config
from lis.groups import CostModel, find_groups
from lis.measure import count_macs, count_params


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
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    return [f"run.dir={root / 'runs'}", f"data.root={root / 'data'}"]


@pytest.mark.parametrize("policy", ["kd_only", "l1_prune", "scratch", "tp_group_norm"])
def test_baseline_meets_the_budget_end_to_end(dirs, policy):
    cfg = load_config("experiments/digits.yaml", dirs + [
        f"run.name={policy}", f"policy.name={policy}", "tracking.wandb=disabled", "teacher.epochs=2",
        "kdp.epochs=1", "finetune.epochs=1", "admm.interval=5", "signals.interval=5"])
    run_dir = lis.compress(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    student = lis.load_student(run_dir / "student.pt")
    teacher = lis.models.create(cfg.model.name, 10)
    shape = (1, 8, 8)
    assert 1 - count_macs(student, shape) / count_macs(teacher, shape) >= cfg.prune.target_macs_reduction - 1e-9
    assert summary["params"]["student"] == count_params(student) and summary["policy"] == policy
    assert 0 <= summary["student_acc"] <= 1
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
