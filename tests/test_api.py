"""lis.compress on a model and data of the user's own (lis/api.py): a network that is not in the zoo (a custom
block with a depthwise conv and a residual add) and plain DataLoaders, through the whole method."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lis
import lis.pipeline
from lis.errors import LISError

TINY = ["kdp.epochs=2", "finetune.epochs=1", "teacher.epochs=2", "tracking.wandb=disabled", "meta.interval=5",
        "signals.interval=2", "admm.interval=5"]


class Block(nn.Module):
    """A custom residual block: pointwise expand, depthwise 3x3, pointwise project, added to its input."""

    def __init__(self, c: int):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False),
                                       nn.BatchNorm2d(2 * c), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.project(self.depthwise(self.expand(x))))


class Net(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))))


def data(n: int, seed: int) -> TensorDataset:
    """Three classes of 8x8 images: a bright row, a bright column, or a bright diagonal, in noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 8, 8, generator=g)
    idx = torch.arange(8)
    for i in range(n):
        k = int(torch.randint(0, 8, (1,), generator=g))
        if y[i] == 0:
            x[i, 0, k, :] += 2
        elif y[i] == 1:
            x[i, 0, :, k] += 2
        else:
            x[i, 0, idx, idx] += 2
    return TensorDataset(x, y)


def loaders():
    return (DataLoader(data(384, 0), batch_size=32, shuffle=True), DataLoader(data(64, 1), batch_size=32),
            DataLoader(data(128, 2), batch_size=64))


@pytest.mark.parametrize("policy", ["dean", "fixed"])
def test_own_model_and_loaders_run_the_whole_method(policy, tmp_path):
    """The user's module, trained first by LIS, compressed to a 50% MACs cut: a smaller working student that
    beats chance, the run directory of 'lis compress' (a bug that skipped a phase or lost the user's data
    or batch size shows here). The fixed run is given a val split too: its val_acc is the student's accuracy
    there; without one val_acc is null."""
    train, meta, test = loaders()
    val = DataLoader(data(64, 3), batch_size=32) if policy == "fixed" else None
    torch.manual_seed(0)
    net = Net()
    run_dir = lis.compress(teacher=net, train=train, meta=meta, val=val, test=test, policy=policy, budget=0.5,
                           name=f"own-{policy}", train_teacher=True, overrides=TINY + [f"run.dir={tmp_path}"])
    assert run_dir == tmp_path / f"own-{policy}"
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "student.pt", "report.md", "checkpoint.pt",
              "teacher.pt", "plots/kept_channels.png", "plots/distillability_heatmap.png"):
        assert (run_dir / f).is_file(), f
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["policy"] == policy and summary["model"] == "python:Net"
    assert summary["teacher_acc"] > 0.6 and summary["student_acc"] > 0.5  # chance is 1/3
    assert summary["macs_reduction"] >= 0.5 - 0.02
    student = lis.load_student(run_dir / "student.pt")
    if val is None:
        assert summary["val_acc"] is None
    else:
        with torch.no_grad():
            hits = sum(int((student.eval()(x).argmax(1) == y).sum()) for x, y in val)
        assert summary["val_acc"] == pytest.approx(hits / 64)
    assert sum(p.numel() for p in student.parameters()) == summary["params"]["student"]
    assert student(torch.zeros(5, 1, 8, 8)).shape == (5, 3)
    config = (run_dir / "config.yaml").read_text()
    assert "batch_size: 32" in config and "num_classes: 3" in config
    assert all(p.requires_grad for p in net.parameters()), "the user's module was changed"


def test_a_given_teacher_is_used_as_it_is_and_the_run_resumes_from_python(tmp_path, monkeypatch):
    """Without train_teacher the module is the teacher (its accuracy is reported, no teacher.pt); a run
    stopped after its first checkpoint resumes from Python and ends as an uninterrupted one does."""
    train, meta, test = loaders()
    torch.manual_seed(0)
    net = Net()
    args = dict(teacher=net, train=train, meta=meta, test=test, policy="fixed", budget=0.5,
                overrides=TINY + [f"run.dir={tmp_path}"])
    whole = lis.compress(name="whole", **args)
    assert not (whole / "teacher.pt").exists()
    expected = json.loads((whole / "summary.json").read_text())

    calls = []

    def stop_in_finetune(*a, **kw):  # the run stops after KDP's last checkpoint, before fine-tuning
        calls.append(1)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(lis.pipeline, "finetune", stop_in_finetune)
        with pytest.raises(KeyboardInterrupt):
            lis.compress(name="stopped", **args)
    assert calls and not (tmp_path / "stopped" / "summary.json").exists()
    with pytest.raises(LISError, match="policy.name cannot change when resuming"):
        lis.compress(name="stopped", resume=True, **{**args, "policy": "prune_only"})
    lis.compress(name="stopped", resume=True, **args)
    got = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert got["student_acc"] == expected["student_acc"] and got["params"] == expected["params"]


def test_own_data_needs_all_four():
    with pytest.raises(LISError, match="all four of teacher=, train=, meta= and test="):
        lis.compress(teacher=Net(), train=loaders()[0])


BUILDERS = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


def net(num_classes):
    return nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, num_classes))


def steps(root):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1, 16, generator=g)
    y = (x[:, 0, :8].mean(1) > x[:, 0, 8:].mean(1)).long()
    return TensorDataset(x[:200], y[:200]), TensorDataset(x[200:], y[200:])
'''


def test_model_and_data_builders_on_the_command_line(tmp_path, monkeypatch):
    """model.name and data.name as pkg.module:build_fn import the user's builders from the working directory
    and run the whole method; the teacher cache key stays a plain file name."""
    from lis.cli import main

    (tmp_path / "mine.py").write_text(BUILDERS)
    (tmp_path / "mine.yaml").write_text("prune: {target_macs_reduction: 0.5}\n")
    monkeypatch.chdir(tmp_path)
    code = main(["compress", "mine.yaml", "model.name=mine:net", "data.name=mine:steps", "data.num_classes=2", "data.batch_size=20",
                 "policy.name=fixed", "run.name=built", *TINY])
    assert code == 0
    summary = json.loads((tmp_path / "runs" / "built" / "summary.json").read_text())
    assert summary["model"] == "mine:net" and summary["data"] == "mine:steps"
    assert summary["params"]["student"] < summary["params"]["teacher"]
    assert [p.name for p in (tmp_path / "runs" / "teachers").glob("*.pt")][0].startswith("mine-net-mine-steps-")
