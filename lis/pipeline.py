"""The jobs a user runs, from a resolved ``Config`` to files in a run directory.

Each job here is what one CLI command does; ``lis/cli.py`` only parses
arguments. The jobs translate the config into plain values for the
components (data, models, teacher, school) so deep code never sees a config.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from lis import checkpoint, dist, models
from lis.admm import ADMMState
from lis.baselines import EXTERNAL, ONE_SHOT, l1_masks, reinit_, tp_group_norm
from lis.checkpoint import Checkpointer, on_signals
from lis.config import Config, check_dean_start, check_per_layer, load_config, to_dict
from lis.data import MNIST1D_VARIANTS, Loaders, Splits, build_splits, make_loaders
from lis.groups import ChannelGroup, CostModel, find_groups
from lis.dean import create_dean
from lis.errors import LISError, NumericalFault
from lis.meta import MetaLearner
from lis.plots import plot_run
from lis.policy import Policy, Weights, create_policy
from lis.prune import hard_prune
from lis.report import format_summary, layer_spread, summarize, write_report
from lis.run import (MetricsLog, NullLog, atomic_save, atomic_write_text, existing_run_dir, new_run_dir, resolve_device,
                     seed_everything)
from lis.school import Classroom, KDPSettings, finetune, kdp
from lis.train import Precision, evaluate
from lis.signals import SignalTracker
from lis.teacher import get_teacher, load_teacher, save_teacher, teacher_key, train_teacher


def load_data(cfg: Config) -> tuple[Splits, Loaders]:
    d = cfg.data
    # the meta and val splits are carved with a fixed seed (docs/design.md section 6): every run and its teacher
    # see the same training set, whatever run.seed; run.seed orders the batches
    splits = build_splits(d.name, d.root, download=d.download, meta_fraction=d.meta_fraction,
                          val_fraction=d.val_fraction, seed=0, image_size=d.image_size, num_classes=d.num_classes,
                          fake_size=d.fake_size,
                          mnist1d={k: getattr(d, f"mnist1d_{k}") for k in MNIST1D_VARIANTS["mnist1d"]})
    return splits, run_loaders(cfg, splits)


def run_loaders(cfg: Config, splits: Splits) -> Loaders:
    """The loaders of a run over ``splits``: batches of ``data.batch_size`` in an order that ``run.seed`` fixes
    and a resumed run continues, each process its slice under torchrun; pinned for a CUDA run."""
    d = cfg.data
    return make_loaders(splits, d.batch_size, d.num_workers, seed=cfg.run.seed, rank=dist.rank(),
                        world=dist.world(), meta_batch_size=cfg.meta.batch_size,
                        pin_memory=resolve_device(dist.device(cfg.run.device)).type == "cuda")


def train_teacher_job(cfg: Config, overwrite: bool = False) -> Path:
    """``lis train-teacher``: train a teacher into ``<run>/teacher.pt`` and the teacher cache."""
    device = resolve_device(cfg.run.device)
    splits, loaders = load_data(cfg)
    models.create(cfg.model.name, splits.num_classes)  # a bad name fails before the run directory exists
    with new_run_dir(cfg, overwrite) as run_dir, MetricsLog(run_dir, cfg) as log:
        model, acc = train_teacher(cfg, splits, loaders, device, log.log, precision=precision(cfg))
    save_teacher(run_dir / "teacher.pt", model, cfg.model.name, splits.num_classes, acc)
    cache = Path(cfg.run.dir) / "teachers" / f"{teacher_key(cfg)}.pt"
    save_teacher(cache, model, cfg.model.name, splits.num_classes, acc)
    (run_dir / "summary.json").write_text(json.dumps({"teacher_acc": acc, "model": cfg.model.name}, indent=2))
    print(f"teacher {cfg.model.name} on {cfg.data.name}: test accuracy {acc:.4f}")
    print(f"saved {run_dir / 'teacher.pt'} (cached as {cache})")
    return run_dir


def build_policy(cfg: Config) -> Policy:
    """The policy named by ``policy.name``: the dean (starting at the fixed constants) or a fixed preset."""
    p = cfg.policy
    if p.name == "dean":
        check_dean_start(cfg)
        return create_dean(p.dean_checkpoint, cfg.meta.dean, init_alpha=p.alpha, init_alpha_out=p.alpha_out,
                           init_rho=p.rho, learn_rho=cfg.meta.learn_rho, a_max=p.a_max, r_min=p.r_min, r_max=p.r_max)
    return create_policy(p.name, alpha_out=p.alpha_out, alpha=p.alpha, rho=p.rho)


def budgets(cfg: Config) -> dict[str, float]:
    """The pruning budgets set in ``prune``: ``{"macs": ..., "params": ...}`` (one or both)."""
    targets = {"macs": cfg.prune.target_macs_reduction, "params": cfg.prune.target_params_reduction}
    return {name: t for name, t in targets.items() if t is not None}


def plan(student: nn.Module, example: torch.Tensor, cfg: Config) -> tuple[list[ChannelGroup], ADMMState]:
    """The student's channel groups and its ADMM state at the configured budget."""
    groups = find_groups(student, example)
    return groups, ADMMState(student, groups, CostModel(student, groups, example), budgets(cfg),
                             cfg.prune.min_keep_ratio)


# what a resumed run may change: learning rates (the way out of a numerical fault), checkpointing,
# tracking and where things run or load from; anything else would continue a different run
RESUMABLE = ("kdp.lr", "finetune.lr", "meta.lr", "checkpoint.every_iters", "run.device", "data.root",
             "data.num_workers", "tracking.wandb", "tracking.project")


def resume_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config of the run in ``run_dir`` (its ``config.yaml``) with ``overrides`` of ``RESUMABLE`` keys."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise LISError(f"{path} is not a run directory (no config.yaml): give the directory of a 'lis compress' run")
    if (path / "summary.json").is_file():
        raise LISError(f"{path} has finished (it has a summary.json): nothing to resume; start a new run instead")
    cfg = _stored_config(path, overrides)
    for key, (old, new) in _changes(path, cfg).items():
        if key not in RESUMABLE:
            raise LISError(f"{key} cannot change when resuming (it would continue a different run): "
                           f"a resume may change only {', '.join(RESUMABLE)}")
    return cfg


def _stored_config(run_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """``run_dir/config.yaml`` with ``overrides``; its run.dir and run.name stay if they still name
    ``run_dir`` (a comparison's runs are ``<comparison>/<run>`` in the comparison's run.dir, where the teacher
    cache is), else they become where the directory is now."""
    stored = load_config(run_dir / "config.yaml")
    if (Path(stored.run.dir) / stored.run.name).resolve() != run_dir.resolve():
        overrides = [f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", *overrides]
    return load_config(run_dir / "config.yaml", overrides)


def _changes(run_dir: Path, cfg: Config) -> dict[str, tuple]:
    """``{"section.key": (stored value, value in cfg)}`` for every config value ``cfg`` changes (where the run
    directory is aside)."""
    old, new = to_dict(_stored_config(run_dir)), to_dict(cfg)
    return {f"{section}.{key}": (old[section][key], value) for section, values in new.items()
            for key, value in values.items()
            if value != old[section][key] and f"{section}.{key}" not in ("run.dir", "run.name")}


def _note_resume(run_dir: Path, cfg: Config, state: Optional[dict]) -> None:
    """Append to ``resume.log`` where the run resumed from and which config values the resume changed."""
    changed = [f"{key}: {old} -> {new}" for key, (old, new) in _changes(run_dir, cfg).items()]
    where = "the start (no checkpoint yet)" if state is None else f"{state['phase']} iteration {state['iter']}"
    with open(run_dir / "resume.log", "a") as f:
        f.write(f"{datetime.now().isoformat(timespec='seconds')} resumed from {where}"
                + (f" with {', '.join(changed)}" if changed else "") + "\n")


def _recipe(cfg: Config, student: nn.Module, room: Classroom, groups: list[ChannelGroup], admm: ADMMState,
            policy: Policy, loaders: Loaders, device: torch.device, example: torch.Tensor, log: MetricsLog,
            ckpt: Checkpointer) -> tuple[nn.Module, Optional[dict[str, torch.Tensor]], Weights]:
    """What policy ``policy.name`` does before fine-tuning: the pruned student, the channels it kept
    (None: unknown) and the weights fine-tuning teaches with."""
    k, name = cfg.kdp, cfg.policy.name
    if name in ONE_SHOT:
        # one-shot baselines: no KDP phase, its epochs go to fine-tuning (same total epochs)
        masks = l1_masks(student, groups, admm)
        small = hard_prune(student, groups, masks, example)
        if name == "scratch":
            reinit_(small)
        return small, masks, policy(SignalTracker(len(groups), device=device).state()).detached()
    if name in EXTERNAL:
        # its own training loop, without checkpoints: a resumed run starts it again
        small = tp_group_norm(copy.deepcopy(student), example, budgets(cfg), loaders.train, device,
                              epochs=k.epochs, lr=k.lr, momentum=k.momentum, weight_decay=k.weight_decay,
                              precision=precision(cfg))
        return small, None, policy(SignalTracker(len(groups), device=device).state()).detached()
    settings = KDPSettings(epochs=k.epochs, lr=k.lr, momentum=k.momentum, weight_decay=k.weight_decay,
                           admm_interval=cfg.admm.interval, signals_interval=cfg.signals.interval,
                           ema=cfg.signals.ema, meta_interval=cfg.meta.interval, precision=precision(cfg))
    meta_step = None
    if name == "dean" or cfg.meta.measure:  # measure: the policy's hypergradients, nothing learned
        m = cfg.meta
        meta_step = MetaLearner(policy, lr=m.lr, unroll=m.unroll, beta=m.beta, backend=m.backend,
                                objective=m.objective, truncate=m.truncate, accumulate=m.accumulate,
                                finetune_steps=m.finetune_steps, finetune_lr=cfg.finetune.lr, estimator=m.estimator,
                                es_sigma=m.es_sigma, es_population=m.es_population, measure=m.measure)
    _, weights = kdp(student, room, groups, admm, policy, loaders.train, loaders.test, device, settings, log.log,
                     meta_step=meta_step, meta_batches=loaders.meta, ahead_batches=loaders.ahead,
                     ckpt=ckpt)
    if name == "dean" and dist.is_main():
        atomic_save(policy.state_dict(), Path(cfg.run.dir) / cfg.run.name / "dean.pt")
    if name == "kd_only":
        # no ADMM pull was applied: prune by magnitude, i.e. project W itself (U = 0)
        admm.U = {n: torch.zeros_like(u) for n, u in admm.U.items()}
        admm.project(student)
    # hard prune: zero what lies outside Z's support, then physically remove it
    return hard_prune(student, groups, admm.masks, example), admm.masks, weights


def precision(cfg: Config) -> Precision:
    return Precision(amp=cfg.run.amp == "bf16", channels_last=cfg.run.channels_last)


@contextmanager
def _run_dir(cfg: Config, overwrite: bool, resume: bool) -> Iterator[Path]:
    """The run directory: created (or, to resume, found) by process 0; the others only know its path."""
    if not dist.is_main():
        yield Path(cfg.run.dir) / cfg.run.name
        return
    with existing_run_dir(cfg) if resume else new_run_dir(cfg, overwrite, resumable=True) as path:
        yield path


@dataclass
class Inputs:
    """What a compress run works on: built from the config by ``compress``, or given from Python by ``lis.api``."""

    splits: Splits
    loaders: Loaders
    #: the teacher's architecture, untrained: checked (channel groups, budget) before anything is written
    architecture: nn.Module
    #: ``(run_dir, device, log) -> (teacher, its test accuracy, where it is stored)``: loaded or trained
    teacher: Callable[[Path, torch.device, Callable[[dict], None]], tuple[nn.Module, float, Optional[Path]]]


def compress(cfg: Config, overwrite: bool = False, resume: bool = False) -> Path:
    """``lis compress``: teacher (cached or trained) -> KDP -> hard prune -> fine-tune -> evaluate.

    Writes ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt``, ``summary.json``,
    ``student.pt`` and ``report.md`` into the run directory and returns it.
    ``resume=True`` continues the run directory of ``cfg`` from its
    checkpoint (``resume_config`` gives its config), or from the start if it
    stopped before the first one.
    """
    dist.init()  # under torchrun: join the other processes (process 0 alone writes the run directory)
    splits, loaders = load_data(cfg)
    # a bad model name or teacher checkpoint fails before anything is written or trained
    architecture = models.create(cfg.model.name, splits.num_classes)
    if cfg.teacher.checkpoint is not None:
        load_teacher(cfg.teacher.checkpoint, cfg.model.name, splits.num_classes)
    inputs = Inputs(splits, loaders, architecture,
                    lambda run_dir, device, log: get_teacher(cfg, splits, loaders, device, log, precision(cfg)))
    return run_compress(cfg, inputs, overwrite, resume)


def run_compress(cfg: Config, inputs: Inputs, overwrite: bool = False, resume: bool = False) -> Path:
    """The whole method on ``inputs``, the one implementation under ``lis compress`` and ``lis.compress``."""
    dist.init()
    if cfg.run.threads is None:
        cfg.run.threads = torch.get_num_threads()  # recorded in config.yaml: a CPU run's numbers depend on it
    torch.set_num_threads(cfg.run.threads)
    device = resolve_device(dist.device(cfg.run.device))
    splits, loaders = inputs.splits, inputs.loaders
    # fail on user mistakes before anything is written or trained
    seed_everything(cfg.run.seed)  # the dean's initial weights
    policy = build_policy(cfg).to(device)
    if cfg.run.sync_bn and device.type != "cuda":
        raise LISError("run.sync_bn=true needs GPUs (SyncBatchNorm does not run on CPU): set run.sync_bn=false")
    if (cfg.policy.name == "dean" or cfg.meta.measure) and len(splits.meta) == 0:
        who = "the dean" if cfg.policy.name == "dean" else "meta.measure=true"
        raise LISError(f"{who} needs a meta split but data.meta_fraction=0 leaves none: set it to e.g. 0.1")
    example = torch.zeros(2, *splits.input_shape, device=device)
    student_groups, _ = plan((models.create(cfg.student.model, splits.num_classes) if cfg.student.model
                              else copy.deepcopy(inputs.architecture)).to(device), example, cfg)
    check_per_layer(cfg, [g.name for g in student_groups])
    state = checkpoint.load(Path(cfg.run.dir) / cfg.run.name) if resume else None

    with _run_dir(cfg, overwrite, resume) as run_dir, \
            (MetricsLog(run_dir, cfg) if dist.is_main() else NullLog()) as log, on_signals() as stop:
        if resume and dist.is_main():
            _note_resume(run_dir, cfg, state)
            if state is None:
                log.truncate(0)  # stopped before its first checkpoint: start again, in place
        ckpt = Checkpointer(run_dir, log, cfg.checkpoint.every_iters, stop, state)
        teacher, teacher_acc, teacher_path = inputs.teacher(run_dir, device, log.log)
        ckpt.context["teacher"] = str(teacher_path)
        for p in teacher.parameters():
            p.requires_grad_(False)
        seed_everything(cfg.run.seed)
        if cfg.student.model is None:
            student = copy.deepcopy(teacher).train()
            student.requires_grad_(True)
        else:
            student = models.create(cfg.student.model, splits.num_classes).to(device)

        # the sparse target: channel groups, their cost model, ADMM state with the budget
        groups, admm = plan(student, example, cfg)
        if cfg.run.sync_bn and dist.world() > 1:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)  # in place: names and groups stay
        teacher_groups = find_groups(teacher, example)
        layers, teacher_layers = [g.name for g in groups], [g.name for g in teacher_groups]
        features = cfg.kdp.feature_layers == "all"
        try:
            resumed = ckpt.restore("finetune")
            if resumed is None:
                room = Classroom(teacher, student, layers, teacher_layers, example, cfg.kdp.temperature,
                                 features=features, feature_loss=cfg.kdp.feature_loss).to(device)
                small, masks, weights = _recipe(cfg, student, room, groups, admm, policy, loaders, device, example,
                                                log, ckpt)
                keep_index = None if masks is None or cfg.policy.name == "scratch" else \
                    {g.name: masks[g.name].nonzero().flatten() for g in groups}
            else:  # KDP (or the one-shot pruning) is done: continue fine-tuning the pruned student
                small, weights = resumed["student"].to(device), resumed["weights"]
                keep_index = resumed.get("keep_index")
            # fine-tune the small student with the policy's final weights; adapters start as the kept channels
            # (every fine-tuning checkpoint holds them: a resumed run builds the same adapters, full-width ones too)
            ckpt.context["keep_index"] = keep_index
            small_room = Classroom(teacher, small, layers, teacher_layers, example, cfg.kdp.temperature,
                                   features=features, init_index=keep_index,
                                   feature_loss=cfg.kdp.feature_loss).to(device)
            k, f = cfg.kdp, cfg.finetune
            metrics = finetune(small, small_room, weights, loaders.train, loaders.test, device,
                               epochs=f.epochs + (k.epochs if cfg.policy.name in ONE_SHOT else 0), lr=f.lr,
                               momentum=k.momentum, weight_decay=k.weight_decay, log=log.log, ckpt=ckpt,
                               resumed=resumed, precision=precision(cfg))
        except NumericalFault as e:
            raise NumericalFault(f"{e}: stopped, {ckpt.describe()}; continue with a lower learning rate, e.g. "
                                 f"'lis compress --resume {run_dir} kdp.lr={cfg.kdp.lr / 10:g} "
                                 f"finetune.lr={cfg.finetune.lr / 10:g}'") from None

        if not dist.is_main():  # every process holds the same student: process 0 alone measures and writes it
            return run_dir
        modules = dict(small.named_modules())
        kept = [modules[g.name].weight.shape[0] for g in groups]
        # the val split, whole and in order: the accuracy to choose settings on
        val = DataLoader(splits.val, batch_size=cfg.data.batch_size)
        val_acc = evaluate(small, val, device, precision(cfg))["acc"] if len(splits.val) else None
        # the policy's logged weights (metrics.jsonl, written by process 0 alone)
        spread = layer_spread([json.loads(line) for line in log.path.read_text().splitlines()])
        summary = summarize(cfg, teacher, small, splits.input_shape, teacher_acc, metrics["acc"], ckpt.elapsed(),
                            layers, [g.num_channels for g in groups], kept, val_acc=val_acc, spread=spread)
        log.log({"phase": "summary", **{k: v for k, v in summary.items() if not isinstance(v, (list, dict))}})
        atomic_save(small.cpu(), run_dir / "student.pt")
        write_report(run_dir, summary)
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))  # the run is finished
        log.log_images(plot_run(run_dir))
    print(format_summary(summary, run_dir))
    return run_dir
