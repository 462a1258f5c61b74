"""``lis.compress`` from Python: a config's run, or your own ``nn.Module`` on your own data, without a config file.

    run_dir = lis.compress(teacher=net, train=train_loader, meta=meta_loader, val=val_loader, test=test_loader,
                           policy="dean", budget=0.75, name="my-net", overrides=["kdp.epochs=10"])
    student = lis.load_student(run_dir / "student.pt")

Both go through ``lis.pipeline.run_compress``, the body of ``lis compress``:
the same KDP with any policy, hard prune, fine-tuning, run directory,
checkpoints and ``resume=True``, plots and report. Only where the model and
the data come from differs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from lis import dist, pipeline
from lis.config import Config, load_config
from lis.data import Splits
from lis.errors import LISError
from lis.run import atomic_save
from lis.teacher import train_teacher as fit_teacher
from lis.train import evaluate


def compress(cfg: Optional[Config] = None, *, teacher: Optional[nn.Module] = None,
             train: DataLoader | Dataset | None = None, meta: DataLoader | Dataset | None = None,
             val: DataLoader | Dataset | None = None, test: DataLoader | Dataset | None = None, policy: Optional[str] = None, budget: Optional[float] = None,
             name: Optional[str] = None, overrides: Sequence[str] = (), train_teacher: bool = False,
             overwrite: bool = False, resume: bool = False) -> Path:
    """Compress a teacher into a physically pruned student; returns the run directory ``<run.dir>/<run.name>``.

    With ``cfg`` alone: the model and data the config names (``lis compress``). With ``teacher``, ``train``,
    ``meta`` and ``test``: that module, as given (``train_teacher=False``: already trained) or first trained by
    the ``teacher`` section from the weights it has, and those datasets (a ``DataLoader`` gives its dataset,
    and its batch size becomes ``data.batch_size``); ``meta`` is the dean's held-out split and ``val`` (optional)
    the split settings are chosen on (``val_acc`` in summary.json; null without it), both disjoint from ``train``. LIS draws the batches itself, seeded by ``run.seed``, so a run is reproducible and resumable
    mid-epoch. Samples are ``(input tensor, int label)``; the class count is the teacher's output width.

    ``policy`` (``policy.name``), ``budget`` (``prune.target_macs_reduction``, a fraction), ``name``
    (``run.name``) and ``overrides`` (``section.key=value`` strings) apply on top of ``cfg`` or the defaults.
    ``resume=True`` continues the run ``name`` from its checkpoint (give the same model and data).
    """
    extra = [f"{key}={value}" for key, value in (("policy.name", policy), ("prune.target_macs_reduction", budget),
                                                 ("run.name", name)) if value is not None]
    own = [x is not None for x in (teacher, train, meta, test)]
    if not any(own):
        if cfg is None:
            raise LISError("lis.compress needs a Config, or your own teacher=, train=, meta= and test=")
        cfg = load_config(None, extra + list(overrides), base=cfg)
        return pipeline.compress(pipeline.resume_config(_run_dir(cfg)) if resume else cfg, overwrite, resume)
    if not all(own):
        raise LISError("your own model and data need all four of teacher=, train=, meta= and test=")
    datasets = [x.dataset if isinstance(x, DataLoader) else x for x in (train, meta, test)]
    val = Subset(datasets[0], []) if val is None else val.dataset if isinstance(val, DataLoader) else val
    example = torch.stack([datasets[2][0][0]] * 2)
    with torch.no_grad():
        num_classes = copy.deepcopy(teacher).cpu().eval()(example).shape[-1]
    recorded = [f"model.name=python:{type(teacher).__qualname__}", f"data.name=python:{type(datasets[0]).__name__}",
                f"data.num_classes={num_classes}"]
    if isinstance(train, DataLoader):
        recorded.append(f"data.batch_size={train.batch_size}")
    overrides = recorded + extra + list(overrides)
    cfg = load_config(None, overrides, base=cfg)
    if resume:
        cfg = pipeline.resume_config(_run_dir(cfg), overrides)  # refuses overrides that make it another run
    dist.init()
    splits = Splits(datasets[0], datasets[1], val, datasets[2], num_classes=num_classes,
                    input_shape=tuple(example.shape[1:]))
    loaders = pipeline.run_loaders(cfg, splits)

    def get_teacher(run_dir: Path, device: torch.device, log) -> tuple[nn.Module, float, Optional[Path]]:
        model, path = copy.deepcopy(teacher).to(device), run_dir / "teacher.pt"
        if path.is_file():  # a resumed run: the teacher it trained
            state = torch.load(path, map_location=device, weights_only=True)
            model.load_state_dict(state["state_dict"])
            return model.eval(), state["test_acc"], path
        if not train_teacher:
            return model.eval(), evaluate(model, loaders.test, device, pipeline.precision(cfg))["acc"], None
        model, acc = fit_teacher(cfg, splits, loaders, device, log, model=model, precision=pipeline.precision(cfg))
        if dist.is_main():
            atomic_save({"state_dict": model.state_dict(), "test_acc": acc}, path)
        return model.eval(), acc, path

    return pipeline.run_compress(cfg, pipeline.Inputs(splits, loaders, copy.deepcopy(teacher), get_teacher),
                                 overwrite, resume)


def _run_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir) / cfg.run.name
