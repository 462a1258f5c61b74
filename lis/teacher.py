"""Teachers: train, save, load, and cache them by what determines them.

A teacher depends on the data, the architecture and its own training section
(including ``teacher.seed``, not ``run.seed``: the seeds of a comparison share
one teacher); ``teacher_key`` hashes exactly those, so a compress or compare
run with the same sections reuses ``<run.dir>/teachers/<key>.pt`` instead of
training again (runs started at once take turns on a lock file: one trains,
the others load). ``teacher.checkpoint`` points at an existing teacher instead.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from lis import models
from lis.config import Config
from lis.data import Loaders, Splits, make_loaders
from lis.errors import LISError, NumericalFault
from lis.run import atomic_save, seed_everything
from lis.train import Precision, evaluate, fit

# Data fields that do not change which samples a teacher sees or how.
_DATA_IRRELEVANT = ("root", "download", "num_workers")


def teacher_key(cfg: Config) -> str:
    """A short hash of the config sections that determine the trained teacher."""
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in _DATA_IRRELEVANT}
    teacher = {k: v for k, v in dataclasses.asdict(cfg.teacher).items() if k != "checkpoint"}
    blob = json.dumps({"data": data, "model": cfg.model.name, "teacher": teacher}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"{cfg.model.name.replace(':', '-')}-{cfg.data.name.replace(':', '-')}-{digest}"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) across processes; released on exit or death."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save_teacher(path: Path, model: nn.Module, model_name: str, num_classes: int, test_acc: float) -> None:
    atomic_save({"model": model_name, "num_classes": num_classes, "state_dict": model.state_dict(),
                 "test_acc": test_acc}, path)


def load_teacher(path: str | Path, model_name: str, num_classes: int) -> tuple[nn.Module, float]:
    """Load a teacher saved by ``save_teacher``; refuse one of another architecture or class count."""
    path = Path(path)
    if not path.is_file():
        raise LISError(f"teacher checkpoint {path} does not exist: fix teacher.checkpoint or set it to null")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["model"], ckpt["num_classes"], ckpt["state_dict"]
    except Exception as e:
        raise LISError(f"teacher checkpoint {path} is truncated or not a LIS teacher ({type(e).__name__}): "
                       f"retrain it with 'lis train-teacher' or point teacher.checkpoint elsewhere") from None
    if ckpt["model"] != model_name or ckpt["num_classes"] != num_classes:
        raise LISError(f"teacher checkpoint {path} is a {ckpt['model']} with {ckpt['num_classes']} classes, "
                       f"but the config asks for {model_name} with {num_classes}: fix model.name or "
                       f"teacher.checkpoint")
    model = models.create(model_name, num_classes)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as e:  # missing or extra tensors, other shapes, not a dict
        raise LISError(f"teacher checkpoint {path} says {model_name} but its weights do not fit one "
                       f"({type(e).__name__}): retrain it with 'lis train-teacher' or point teacher.checkpoint "
                       f"elsewhere") from None
    return model, float(ckpt.get("test_acc", float("nan")))


def train_teacher(cfg: Config, splits: Splits, loaders: Loaders, device: torch.device,
                  log: Optional[Callable[[dict], None]] = None, model: Optional[nn.Module] = None,
                  precision: Optional[Precision] = None) -> tuple[nn.Module, float]:
    """Train a fresh teacher from the ``teacher`` section (or ``model``, from the weights it has), its forward
    passes in ``precision`` (the run's ``run.amp`` and ``run.channels_last``); returns it and its test accuracy.

    Initialisation and data order follow ``teacher.seed`` only.
    """
    t = cfg.teacher
    seed_everything(t.seed)
    model = (models.create(cfg.model.name, splits.num_classes) if model is None else model).to(device)
    train = make_loaders(splits, cfg.data.batch_size, cfg.data.num_workers, seed=t.seed,
                         pin_memory=device.type == "cuda").train
    try:
        metrics = fit(model, train, loaders.test, device, epochs=t.epochs, lr=t.lr, momentum=t.momentum,
                      weight_decay=t.weight_decay, schedule=t.schedule, label_smoothing=t.label_smoothing,
                      log=log, desc="teacher", precision=precision)
    except NumericalFault as e:
        raise NumericalFault(f"{e}: lower teacher.lr (now {t.lr:g}) and start again") from None
    return model, metrics["acc"]


def get_teacher(cfg: Config, splits: Splits, loaders: Loaders, device: torch.device,
                log: Optional[Callable[[dict], None]] = None, precision: Optional[Precision] = None
                ) -> tuple[nn.Module, float, Path]:
    """The teacher for ``cfg``: from ``teacher.checkpoint``, else the cache, else trained (in ``precision``)
    and cached.

    Returns the model (on ``device``, eval mode), its test accuracy and the checkpoint path.
    """
    if cfg.teacher.checkpoint is not None:
        path = Path(cfg.teacher.checkpoint)
        model, _ = load_teacher(path, cfg.model.name, splits.num_classes)
        acc = evaluate(model.to(device), loaders.test, device, precision)["acc"]
    else:
        path = Path(cfg.run.dir) / "teachers" / f"{teacher_key(cfg)}.pt"
        # runs started at once need the same teacher: one trains it, the others wait and load it
        with file_lock(path.with_suffix(".lock")):
            if path.is_file():
                model, acc = load_teacher(path, cfg.model.name, splits.num_classes)
            else:
                model, acc = train_teacher(cfg, splits, loaders, device, log, precision=precision)
                save_teacher(path, model, cfg.model.name, splits.num_classes, acc)
    return model.to(device).eval(), acc, path
