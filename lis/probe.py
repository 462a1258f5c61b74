"""``lis probe``: distillability and sparsability of a teacher's layers, without training a dean.

Two offline measurements (docs/design.md section 1) on the teacher of a config
(cached or trained, as ``lis compress`` gets it):

(a) **distillability** per layer over a few epochs of plain distillation: a
    student copy of the teacher is taught by the KDP loop itself
    (``lis.school.kdp``) with fixed weights a_out = 1, a_l = 1 and no ADMM pull
    (r_l = 0), so the curves are measured exactly as in a run. Unlike a run's
    logged series they are the raw measurements, every ``signals.interval``
    iterations, not their moving average. The number of epochs is
    ``kdp.epochs`` capped by ``epochs`` (default 3).
(b) **sparsability** per layer by a sensitivity sweep: for each channel group
    alone, remove the fraction r in ``RATIOS`` of its channels (round(r * n),
    keeping at least one; the channels of smallest group L2 norm go, as in
    the Z-step), measure the accuracy, and take the drop from the teacher's.
    Zeroing the channels (``lis.prune.mask_``) gives in eval mode the same
    outputs as removing them (``hard_prune``), so no model is rebuilt.
    A layer's sparsability is the largest r whose drop is at most ``max_drop``
    (``sparsability``).

Accuracies are measured on the val split (``data.val_fraction``), so per-layer
budgets or weights may be chosen from them and the test split stays for
reports; on the test split only when the config has no val split
(``probe.json``'s ``split`` says which). Writes into ``out_dir`` (default
``<run.dir>/<run.name>-probe/``): ``probe.json``, ``config.yaml``,
``probe_distillability.png`` and ``probe_sparsability.png``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from lis.config import Config, to_yaml
from lis.errors import LISError
from lis.groups import ChannelGroup, find_groups
from lis.pipeline import load_data, plan, precision
from lis.plots import parse_records, plot_probe
from lis.policy import FixedPolicy
from lis.prune import keep_masks_from_norms, mask_
from lis.run import resolve_device, seed_everything
from lis.school import Classroom, KDPSettings, kdp
from lis.teacher import get_teacher
from lis.train import evaluate

#: fractions of a layer's channels removed by the sensitivity sweep
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: accuracies are counts over a split, so a drop of exactly ``max_drop`` can exceed it by rounding
_TOLERANCE = 1e-9


def sparsability(ratios: Sequence[float], drops: Sequence[float], max_drop: float) -> float:
    """The largest prune ratio whose accuracy drop is at most ``max_drop`` (0.0 if none).

    ``ratios`` and ``drops`` are paired (any order); drops are fractions
    (0.01 = one accuracy point), negative when pruning helped. A ratio counts
    even when a smaller one exceeded ``max_drop`` (a noisy, non-monotone
    sweep): it is the most that can be removed at that cost.
    """
    if len(ratios) != len(drops):
        raise ValueError(f"{len(ratios)} ratios but {len(drops)} drops")
    ok = [r for r, d in zip(ratios, drops) if d <= max_drop + _TOLERANCE]
    return float(max(ok, default=0.0))


def removed_channels(num_channels: int, ratio: float) -> int:
    """Channels removed at ``ratio``: round(ratio * n) (halves up), keeping at least one channel."""
    return min(int(ratio * num_channels + 0.5), num_channels - 1)


@torch.no_grad()
def sensitivity(teacher: torch.nn.Module, groups: Sequence[ChannelGroup], data, device: torch.device,
                ratios: Sequence[float] = RATIOS) -> tuple[np.ndarray, np.ndarray]:
    """``(accuracy (L, R), removed channels (L, R))``: accuracy on ``data`` (fractions) with only group l pruned at
    ratio r (its channels of smallest norm zeroed), every other layer intact."""
    work = copy.deepcopy(teacher).eval()
    pristine = {k: v.clone() for k, v in work.state_dict().items()}
    acc = np.zeros((len(groups), len(ratios)))
    removed = np.zeros((len(groups), len(ratios)), dtype=int)
    for i, g in enumerate(groups):
        for j, r in enumerate(ratios):
            removed[i, j] = removed_channels(g.num_channels, r)
            work.load_state_dict(pristine)
            masks = keep_masks_from_norms(work, [g], {g.name: g.num_channels - removed[i, j]})
            mask_(work, [g], masks)
            acc[i, j] = evaluate(work, data, device)["acc"]
    return acc, removed


def probe(cfg: Config, out_dir: Optional[str | Path] = None, *, epochs: int = 3, max_drop: float = 0.01,
          overwrite: bool = False) -> Path:
    """Measure distillability and sparsability per layer of ``cfg``'s teacher; returns the output directory.

    ``epochs``: at most this many epochs of plain distillation (fewer if
    ``kdp.epochs`` is smaller); ``max_drop``: the accuracy cost (fraction,
    0.01 = one point) a layer's sparsability allows. An existing
    ``probe.json`` in ``out_dir`` is replaced only with ``overwrite``.
    """
    if epochs < 0:
        raise LISError(f"epochs={epochs} must be >= 0")
    if not 0.0 <= max_drop < 1.0:
        raise LISError(f"max_drop={max_drop} must be a fraction in [0, 1) (0.01 = one accuracy point)")
    out = Path(out_dir) if out_dir is not None else Path(cfg.run.dir) / f"{cfg.run.name}-probe"
    if (out / "probe.json").exists() and not overwrite:
        raise LISError(f"{out / 'probe.json'} already exists: pass --overwrite to replace it "
                       f"or choose another run.name")
    device = resolve_device(cfg.run.device)
    splits, loaders = load_data(cfg)
    example = torch.zeros(2, *splits.input_shape, device=device)

    teacher, _, _ = get_teacher(cfg, splits, loaders, device, precision=precision(cfg))
    teacher.requires_grad_(False)
    # accuracies on the val split (the protocol reads the test split only for reports); on test without one
    split = "val" if len(splits.val) else "test"
    held_out = DataLoader(splits.val, batch_size=cfg.data.batch_size) if len(splits.val) else loaders.test
    teacher_acc = evaluate(teacher, held_out, device)["acc"]

    # (a) distillability over plain distillation: the KDP loop with a = 1 and r = 0, raw measurements (ema 0)
    seed_everything(cfg.run.seed)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    groups, admm = plan(student, example, cfg)
    names = [g.name for g in groups]
    teacher_names = [g.name for g in find_groups(teacher, example)]
    room = Classroom(teacher, student, names, teacher_names, example, cfg.kdp.temperature,
                     features=cfg.kdp.feature_layers == "all", feature_loss=cfg.kdp.feature_loss).to(device)
    n_epochs = min(cfg.kdp.epochs, epochs)
    settings = KDPSettings(epochs=n_epochs, lr=cfg.kdp.lr, momentum=cfg.kdp.momentum,
                           weight_decay=cfg.kdp.weight_decay, admm_interval=cfg.admm.interval,
                           signals_interval=cfg.signals.interval, ema=0.0, meta_interval=cfg.meta.interval)
    records: list[dict] = []
    kdp(student, room, groups, admm, FixedPolicy(1.0, 1.0, 0.0), loaders.train, held_out, device, settings,
        records.append)
    curves = parse_records(records)

    # (b) sparsability by a per-layer sensitivity sweep of the teacher
    acc, removed = sensitivity(teacher, groups, held_out, device)
    drops = teacher_acc - acc
    spars = [sparsability(RATIOS, d, max_drop) for d in drops]

    result = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "split": split,  #: the split teacher_acc and accuracy are measured on
        "teacher_acc": teacher_acc,
        "layer_names": names,
        "channels": [g.num_channels for g in groups],
        "ratios": list(RATIOS),
        "max_drop": max_drop,
        "accuracy": acc.tolist(),
        "drops": drops.tolist(),
        "removed_channels": removed.tolist(),
        "sparsability": spars,
        "distillability": {"epochs": n_epochs, "iters": curves.steps.tolist(), "epoch": curves.epoch.tolist(),
                           "values": curves.series.get("distillability", np.zeros((0, len(names)))).tolist()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "probe.json").write_text(json.dumps(result, indent=2))
    plot_probe(out)
    print(format_probe(result))
    print(f"probe: {out / 'probe.json'}")
    return out


def format_probe(result: dict) -> str:
    """A per-layer table of the probe: channels, sparsability, distillability (first and last epoch's mean)."""
    d = result["distillability"]
    values, epoch = np.array(d["values"], dtype=float), np.array(d["epoch"], dtype=int)
    lines = [f"teacher {result['model']} on {result['data']}: {result.get('split', 'test')} accuracy "
             f"{result['teacher_acc']:.4f}; "
             f"sparsability = largest prune ratio with accuracy drop <= {100 * result['max_drop']:g} points",
             f"{'layer':<24} {'channels':>8} {'sparsability':>12} {'distillability (first -> last epoch)':>38}"]
    for i, name in enumerate(result["layer_names"]):
        dist = "-"
        if len(values):
            first, last = values[epoch == epoch.min(), i].mean(), values[epoch == epoch.max(), i].mean()
            dist = f"{first:+.3f} -> {last:+.3f}"
        lines.append(f"{name:<24} {result['channels'][i]:>8} {result['sparsability'][i]:>12.1f} {dist:>38}")
    return "\n".join(lines)
