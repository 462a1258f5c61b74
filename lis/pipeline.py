"""The jobs a user runs, from a resolved ``Config`` to files in a run directory.

Each job here is what one CLI command does; ``lis/cli.py`` only parses
arguments. The jobs translate the config into plain values for the
components (data, models, teacher, school) so deep code never sees a config.
"""

from __future__ import annotations

import json
from pathlib import Path

import copy
import time

import torch
from torch import nn

from lis import models
from lis.admm import ADMMState
from lis.baselines import EXTERNAL, ONE_SHOT, l1_masks, reinit_, tp_group_norm
from lis.config import Config
from lis.data import Loaders, Splits, build_splits, make_loaders
from lis.groups import ChannelGroup, CostModel, find_groups
from lis.dean import create_dean
from lis.errors import LISError
from lis.meta import MetaLearner
from lis.plots import plot_run
from lis.policy import Policy, create_policy
from lis.prune import hard_prune
from lis.report import format_summary, summarize, write_report
from lis.run import MetricsLog, new_run_dir, resolve_device, seed_everything
from lis.school import Classroom, KDPSettings, finetune, kdp
from lis.signals import SignalTracker
from lis.teacher import get_teacher, save_teacher, teacher_key, train_teacher


def load_data(cfg: Config) -> tuple[Splits, Loaders]:
    d = cfg.data
    # the meta split is carved with a fixed seed (DESIGN.md section 6): every run and its teacher see the same
    # training set, whatever run.seed; run.seed orders the batches
    splits = build_splits(d.name, d.root, download=d.download, meta_fraction=d.meta_fraction, seed=0,
                          image_size=d.image_size, num_classes=d.num_classes, fake_size=d.fake_size)
    return splits, make_loaders(splits, d.batch_size, d.num_workers, seed=cfg.run.seed)


def train_teacher_job(cfg: Config, overwrite: bool = False) -> Path:
    """``lis train-teacher``: train a teacher into ``<run>/teacher.pt`` and the teacher cache."""
    device = resolve_device(cfg.run.device)
    splits, loaders = load_data(cfg)
    models.create(cfg.model.name, splits.num_classes)  # a bad name fails before the run directory exists
    with new_run_dir(cfg, overwrite) as run_dir, MetricsLog(run_dir, cfg) as log:
        model, acc = train_teacher(cfg, splits, loaders, device, log.log)
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
        return create_dean(p.dean_checkpoint, init_alpha=p.alpha, init_alpha_out=p.alpha_out, init_rho=p.rho)
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


def compress(cfg: Config, overwrite: bool = False) -> Path:
    """``lis compress``: teacher (cached or trained) -> KDP -> hard prune -> fine-tune -> evaluate.

    Writes ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``student.pt``
    and ``report.md`` into the run directory and returns it.
    """
    start = time.perf_counter()
    device = resolve_device(cfg.run.device)
    splits, loaders = load_data(cfg)
    # fail on user mistakes before anything is written or trained
    seed_everything(cfg.run.seed)  # the dean's initial weights
    policy = build_policy(cfg).to(device)
    if cfg.policy.name == "dean" and len(splits.meta) == 0:
        raise LISError("the dean needs a meta split but data.meta_fraction=0 leaves none: set it to e.g. 0.1")
    example = torch.zeros(2, *splits.input_shape, device=device)
    models.create(cfg.model.name, splits.num_classes)
    plan(models.create(cfg.student.model or cfg.model.name, splits.num_classes).to(device), example, cfg)

    with new_run_dir(cfg, overwrite) as run_dir, MetricsLog(run_dir, cfg) as log:
        teacher, teacher_acc, _ = get_teacher(cfg, splits, loaders, device, log.log)
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
        teacher_groups = find_groups(teacher, example)
        room = Classroom(teacher, student, [g.name for g in groups], [g.name for g in teacher_groups], example,
                         cfg.kdp.temperature, features=cfg.kdp.feature_layers == "all").to(device)

        k, f, name = cfg.kdp, cfg.finetune, cfg.policy.name
        finetune_epochs = f.epochs
        final_weights = policy(SignalTracker(len(groups)).state()).detached()  # KDP recipes: their last weights
        if name in ONE_SHOT:
            # one-shot baselines: no KDP phase, its epochs go to fine-tuning (same total epochs)
            masks = l1_masks(student, groups, admm)
            small = hard_prune(student, groups, masks, example)
            if name == "scratch":
                reinit_(small)
            finetune_epochs = k.epochs + f.epochs
        elif name in EXTERNAL:
            small = tp_group_norm(copy.deepcopy(student), example, budgets(cfg), loaders.train, device,
                                  epochs=k.epochs, lr=k.lr, momentum=k.momentum, weight_decay=k.weight_decay)
            masks = None
        else:
            settings = KDPSettings(epochs=k.epochs, lr=k.lr, momentum=k.momentum, weight_decay=k.weight_decay,
                                   admm_interval=cfg.admm.interval, signals_interval=cfg.signals.interval,
                                   ema=cfg.signals.ema, meta_interval=cfg.meta.interval)
            meta_step = None
            if name == "dean":
                meta_step = MetaLearner(policy, lr=cfg.meta.lr, unroll=cfg.meta.unroll, beta=cfg.meta.beta,
                                        backend=cfg.meta.backend)
            _, final_weights = kdp(student, room, groups, admm, policy, loaders.train, loaders.test, device,
                                   settings, log.log, meta_step=meta_step, meta_batches=loaders.meta)
            if name == "dean":
                torch.save(policy.state_dict(), run_dir / "dean.pt")
            if name == "kd_only":
                # no ADMM pull was applied: prune by magnitude, i.e. project W itself (U = 0)
                admm.U = {n: torch.zeros_like(u) for n, u in admm.U.items()}
                admm.project(student)
            masks = admm.masks
            # hard prune: zero what lies outside Z's support, then physically remove it
            small = hard_prune(student, groups, masks, example)

        # fine-tune the small student with the policy's final weights; adapters start as the kept channels
        keep_index = None if masks is None or name == "scratch" else \
            {g.name: masks[g.name].nonzero().flatten() for g in groups}
        small_room = Classroom(teacher, small, [g.name for g in groups], [g.name for g in teacher_groups], example,
                               cfg.kdp.temperature, features=cfg.kdp.feature_layers == "all",
                               init_index=keep_index).to(device)
        metrics = finetune(small, small_room, final_weights, loaders.train, loaders.test, device,
                           epochs=finetune_epochs, lr=f.lr, momentum=k.momentum, weight_decay=k.weight_decay,
                           log=log.log)
        modules = dict(small.named_modules())
        kept = [modules[g.name].weight.shape[0] for g in groups]

        summary = summarize(cfg, teacher, small, splits.input_shape, teacher_acc, metrics["acc"],
                            time.perf_counter() - start, [g.name for g in groups],
                            [g.num_channels for g in groups], kept)
        log.log({"phase": "summary", **{k: v for k, v in summary.items() if not isinstance(v, (list, dict))}})
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        torch.save(small.cpu(), run_dir / "student.pt")
        write_report(run_dir, summary)
        log.log_images(plot_run(run_dir))
    print(format_summary(summary, run_dir))
    return run_dir
