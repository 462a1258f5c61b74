"""The edges of a run: its directory, seeding, device, progress bars and metrics log.

A run directory ``<run.dir>/<run.name>/`` holds ``config.yaml`` (the fully
resolved config), ``metrics.jsonl`` (one JSON object per logged step or
epoch) and whatever the job writes (checkpoints, ``summary.json``, plots).
Metrics also go to wandb when ``tracking.wandb`` is ``offline`` or
``online``; offline mode never needs a login.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from lis.config import Config, to_dict, to_yaml
from lis.errors import LISError


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so that the same config gives the same numbers on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda when present, else cpu; asking for cuda without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LISError(f"run.device={name} but no CUDA device is visible: use run.device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LISError(f"run.device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None


def progress(iterable: Iterable, desc: str, **kw) -> tqdm:
    """A progress bar that shows on a terminal and stays quiet in CI and in logs."""
    quiet = bool(os.environ.get("CI")) or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=quiet, **kw)


def create_run_dir(cfg: Config, overwrite: bool = False) -> Path:
    """Make ``<run.dir>/<run.name>`` and write ``config.yaml``; never clobber a run silently."""
    path = Path(cfg.run.dir) / cfg.run.name
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise LISError(
                f"run directory {path} already exists: pass --overwrite to replace it "
                f"or choose another name with run.name=..."
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(to_yaml(cfg))
    return path


@contextmanager
def new_run_dir(cfg: Config, overwrite: bool = False) -> Iterator[Path]:
    """``create_run_dir`` that removes the directory again if a user error (``LISError``) stops the job,
    so the corrected command can run without ``--overwrite``."""
    path = create_run_dir(cfg, overwrite)
    try:
        yield path
    except LISError:
        shutil.rmtree(path, ignore_errors=True)
        raise


def wandb_scalars(record: dict, layer_names: list[str]) -> dict:
    """What wandb gets of a metrics record: its numbers, and each per-layer list as one key per layer
    (``distillability/<layer>``), so wandb draws every layer's curve."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bool) or key == "layer_names":
            continue
        if isinstance(value, (int, float)):
            out[key] = value
        elif isinstance(value, list) and len(value) == len(layer_names) and layer_names:
            out.update({f"{key}/{name}": v for name, v in zip(layer_names, value)})
    return out


class MetricsLog:
    """Appends one JSON object per call to ``metrics.jsonl`` and mirrors it to wandb."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a")
        self._wandb = None
        self.layer_names: list[str] = []
        if cfg.tracking.wandb != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=cfg.tracking.project,
                name=cfg.run.name,
                dir=str(run_dir),
                mode=cfg.tracking.wandb,
                config=to_dict(cfg),
                reinit="finish_previous",
            )

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.layer_names = record.get("layer_names", self.layer_names)
        if self._wandb is not None:
            self._wandb.log(wandb_scalars(record, self.layer_names))

    def log_images(self, paths: Iterable[Path]) -> None:
        """Log PNGs (the run's plots) to wandb as images, one key per file name."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"plots/{Path(p).stem}": wandb.Image(str(p)) for p in paths})

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
