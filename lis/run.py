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
import secrets
import shutil
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from lis.config import Config, to_dict, to_yaml
from lis.errors import LISError, RunStopped


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


def create_run_dir(cfg: Config, overwrite: bool = False, resumable: bool = False) -> Path:
    """Make ``<run.dir>/<run.name>`` and write ``config.yaml``; never clobber a run silently.

    Creating ``config.yaml`` is the claim on the name: of two runs started at once with the same
    name, one gets it and the other stops with a one-line error.
    """
    path = Path(cfg.run.dir) / cfg.run.name
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            resume = f"continue it with 'lis compress --resume {path}', " if resumable else ""
            raise LISError(f"run directory {path} already exists: {resume}replace it with --overwrite, "
                           f"or choose another name with run.name=...")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        with open(path / "config.yaml", "x") as f:  # exclusive creation: of two runs, one gets the name
            f.write(to_yaml(cfg))
    except FileExistsError:
        raise LISError(f"run directory {path} was just created by another run: choose another name with "
                       f"run.name=...") from None
    return path


@contextmanager
def new_run_dir(cfg: Config, overwrite: bool = False, resumable: bool = False) -> Iterator[Path]:
    """``create_run_dir`` that removes the directory again if a user error (``LISError``) stops the job,
    so the corrected command can run without ``--overwrite``. A run that stopped part-way
    (``RunStopped``: interrupted, or a numerical fault) keeps its directory for ``--resume``."""
    path = create_run_dir(cfg, overwrite, resumable)
    try:
        yield path
    except LISError as e:
        if not isinstance(e, RunStopped):
            shutil.rmtree(path, ignore_errors=True)
        raise


@contextmanager
def existing_run_dir(cfg: Config) -> Iterator[Path]:
    """The run directory of ``cfg``, which a resumed run continues: kept whatever happens."""
    path = Path(cfg.run.dir) / cfg.run.name
    if not (path / "config.yaml").is_file():
        raise LISError(f"{path} is not a run directory (no config.yaml): give the directory of a 'lis compress' run")
    yield path


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
    """Appends one JSON object per call to ``metrics.jsonl`` and mirrors it to wandb.

    ``offset()`` is the file's length so far; a resumed run ``truncate``s the
    file back to the offset its checkpoint recorded, so the records written
    after that checkpoint are not duplicated when the run writes them again.
    The wandb run id is kept in ``wandb_id`` so a resumed run continues the
    same wandb run.
    """

    def __init__(self, run_dir: Path, cfg: Config):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a")
        self._wandb = None
        self.layer_names: list[str] = []
        if cfg.tracking.wandb != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            id_file = Path(run_dir) / "wandb_id"
            if not id_file.is_file():
                id_file.write_text(secrets.token_hex(4))
            self._wandb = wandb.init(
                project=cfg.tracking.project,
                name=cfg.run.name,
                group=str(Path(cfg.run.name).parent) if "/" in cfg.run.name else None,  # its comparison
                id=id_file.read_text().strip(),
                resume="allow",
                dir=str(run_dir),
                mode=cfg.tracking.wandb,
                config=to_dict(cfg),  # policy.name and run.seed among them: the UI groups and compares by them
                reinit="finish_previous",
            )

    def offset(self) -> int:
        return self._file.tell()

    def truncate(self, offset: int) -> None:
        """Drop every record after byte ``offset`` (what a checkpoint recorded with ``offset()``)."""
        self._file.truncate(offset)
        self._file.seek(offset)
        self.layer_names = []
        with self.path.open() as f:
            for line in f:
                self.layer_names = json.loads(line).get("layer_names", self.layer_names)

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


class NullLog:
    """The metrics log of a process that does not write (under torchrun, every process but the first)."""

    path = None
    layer_names: list[str] = []

    def log(self, record: dict) -> None:
        pass

    def log_images(self, paths: Iterable[Path]) -> None:
        pass

    def offset(self) -> int:
        return 0

    def truncate(self, offset: int) -> None:
        pass

    def __enter__(self) -> "NullLog":
        return self

    def __exit__(self, *exc) -> None:
        pass


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, fsync, then rename: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
