"""Plain supervised training and evaluation, shared by the teacher and the baselines.

The KDP loop of the student lives in ``lis/school.py``; this is the ordinary
SGD loop it is compared against: momentum SGD, weight decay, a cosine or step
schedule stepped once per epoch, evaluation on the test split every epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lis.errors import NumericalFault
from lis.run import progress


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             precision: Optional[Precision] = None) -> dict:
    """Top-1 accuracy (a fraction in [0, 1]) and mean cross-entropy over ``loader``, in eval mode, the
    forward passes in ``precision``."""
    precision = precision or Precision()
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in loader:
        x, y = precision.inputs(x, device), y.to(device, non_blocking=True)
        with precision.autocast(device):
            logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += y.numel()
    model.train(was_training)
    return {"acc": correct / max(n, 1), "loss": loss / max(n, 1)}


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    # multi-tensor: a few operators per step instead of a few per parameter (PyTorch does so only on GPUs)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)


def scheduler(opt: torch.optim.Optimizer, schedule: str, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: ``cosine`` to zero, or ``step`` (x0.1 at 50% and 75% of the epochs)."""
    if schedule == "step":
        milestones = [max(1, epochs // 2), max(1, (3 * epochs) // 4)]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))


@dataclass
class Precision:
    """GPU speed options: bf16 autocast of the forward passes and the channels_last memory layout."""

    amp: bool = False
    channels_last: bool = False

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp)

    def prepare(self, *models: nn.Module) -> None:
        if self.channels_last:
            for m in models:
                m.to(memory_format=torch.channels_last)  # 4-D weights only

    def inputs(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        # non-blocking: from a pinned batch (a CUDA run's loaders) the copy overlaps the host's work
        if self.channels_last and x.dim() == 4:
            return x.to(device, memory_format=torch.channels_last, non_blocking=True)
        return x.to(device, non_blocking=True)


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    device: torch.device,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    label_smoothing: float = 0.0,
    log: Optional[Callable[[dict], None]] = None,
    desc: str = "train",
    precision: Optional[Precision] = None,
) -> dict:
    """Train ``model`` with cross-entropy; returns the last epoch's test metrics. A NaN or Inf loss stops it
    (``NumericalFault``) before the step that would spread it into the weights."""
    precision = precision or Precision()
    precision.prepare(model)
    opt = sgd(model, lr, momentum, weight_decay)
    sched = scheduler(opt, schedule, epochs)
    metrics = evaluate(model, test_loader, device, precision) if epochs == 0 else {}
    for epoch in progress(range(epochs), desc=desc):
        model.train()
        total, n = 0.0, 0
        for i, (x, y) in enumerate(train_loader):
            x, y = precision.inputs(x, device), y.to(device, non_blocking=True)
            with precision.autocast(device):
                loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            value = loss.item()
            if not math.isfinite(value):
                raise NumericalFault(f"the {desc} loss is {value} at {desc} epoch {epoch + 1}, iteration {i + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += value * y.numel()
            n += y.numel()
        sched.step()
        metrics = evaluate(model, test_loader, device, precision)
        if log is not None:
            log({"phase": desc, "epoch": epoch + 1, "train_loss": total / max(n, 1),
                 "test_loss": metrics["loss"], "test_acc": metrics["acc"]})
    return metrics
