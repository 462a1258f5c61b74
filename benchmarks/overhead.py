"""Overhead of the dean: wall time per KDP iteration with the dean / the same loop with the fixed policy.

What runs is the real loop, ``lis.school.kdp``, for one epoch over a
DataLoader that holds exactly ``--iters`` batches of random data (fake
3x32x32 images for ``resnet56``, fake 1x40 signals for ``mnist1d_cnn``), with
the teacher a second randomly initialised model of the same architecture in
eval mode. Three variants of the call are timed:

- ``fixed``: ``FixedPolicy`` at the config's constants, no meta step;
- ``dean[higher]``, ``dean[func]``: a fresh ``Dean`` (which starts at the same
  constants) with a ``MetaLearner`` on the ``higher`` or ``torch.func`` backend.

All other settings are the defaults of ``lis.config.Config()``, intervals
included (``admm.interval``, ``signals.interval``, ``meta.interval``; the
script prints them). Both loops measure the signals every
``signals.interval`` iterations (two backward passes there), so that cost
is in the denominator too; what the ratio adds is the dean's forward on every
iteration and its meta step every ``meta.interval`` iterations. The meta
step is only counted if a run reaches it: ``--iters`` should be a multiple
of ``meta.interval`` (the defaults are), so the per-iteration time includes
the meta step amortised over the iterations between two of them. With the
default ``admm.interval`` of 50 a run of 20 or 40 iterations makes no Z/U
update; that step is the same in both loops.

Every timed call starts from the same student, ADMM state, adapters and
policy (copied or re-seeded outside the timed region), on CUDA between two
``torch.cuda.synchronize()``; the end-of-epoch evaluation runs on an empty
test loader, so the time is that of the iterations alone. Each variant is
run once to warm up, then ``--repeats`` times with the order of the variants
rotated every repeat. CPU runs use torch's default number of threads (set
``OMP_NUM_THREADS`` to change it); on a machine shared with other jobs the
CPU timings are noisy, the factors less so.

How to read it: one line per model and device,

    resnet56 (cpu, batch 128, 20 iters/run): fixed 812.3 ms/iter, dean[higher] 1003.1 ms/iter (x1.23), ...

gives the median ms per iteration of each variant and, in brackets, the
dean's overhead factor: the median over repeats of (dean run / the fixed run
of the same repeat), so slow drift of the machine cancels. The last line
checks every factor against the target, x1.5.

    python benchmarks/overhead.py                      # both models, CPU (and CUDA when present)
    python benchmarks/overhead.py --models resnet56 --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lis import models
from lis.admm import ADMMState
from lis.config import Config
from lis.dean import create_dean
from lis.errors import LISError
from lis.groups import ChannelGroup, find_groups
from lis.meta import BACKENDS, MetaLearner
from lis.pipeline import plan
from lis.policy import create_policy
from lis.school import Classroom, KDPSettings, kdp

TARGET = 1.5  #: the dean may cost at most this factor per KDP iteration
NUM_CLASSES = 10
MODELS = ("mnist1d_cnn", "resnet56")
VARIANTS = ("fixed",) + tuple(f"dean[{b}]" for b in BACKENDS)


@dataclass
class Bench:
    """Everything one model's timed calls share; built once, never changed by a call."""

    name: str
    device: torch.device
    iters: int
    teacher: nn.Module
    student: nn.Module
    groups: list[ChannelGroup]
    teacher_layers: list[str]
    admm: ADMMState
    example: torch.Tensor
    train: DataLoader
    meta: DataLoader
    test: DataLoader


def build(name: str, device: torch.device, batch: int, iters: int, cfg: Config) -> Bench:
    torch.manual_seed(0)
    shape = models.input_shape(name)
    teacher = models.create(name, NUM_CLASSES).to(device).eval().requires_grad_(False)
    student = models.create(name, NUM_CLASSES).to(device).train()
    example = torch.zeros(2, *shape, device=device)
    groups, admm = plan(student, example, cfg)
    teacher_layers = [g.name for g in find_groups(teacher, example)]

    def batches(n: int) -> TensorDataset:
        return TensorDataset(torch.randn(n, *shape), torch.randint(0, NUM_CLASSES, (n,)))

    return Bench(name, device, iters, teacher, student, groups, teacher_layers, admm, example,
                 train=DataLoader(batches(iters * batch), batch_size=batch),
                 meta=DataLoader(batches(batch), batch_size=batch),
                 test=DataLoader(batches(0), batch_size=batch))


def seconds_per_iter(b: Bench, variant: str, cfg: Config) -> float:
    """One ``kdp`` epoch over ``b.train`` with ``variant``'s policy, from the same start every call."""
    torch.manual_seed(1)  # the adapters and the dean start the same in every call
    student = copy.deepcopy(b.student)
    admm = copy.deepcopy(b.admm)
    k, p, m = cfg.kdp, cfg.policy, cfg.meta
    room = Classroom(b.teacher, student, [g.name for g in b.groups], b.teacher_layers, b.example, k.temperature,
                     features=k.feature_layers == "all").to(b.device)
    if variant == "fixed":
        policy, meta_step = create_policy("fixed", alpha_out=p.alpha_out, alpha=p.alpha, rho=p.rho), None
    else:
        policy = create_dean(None, m.dean, init_alpha=p.alpha, init_alpha_out=p.alpha_out,
                             init_rho=p.rho).to(b.device)
        meta_step = MetaLearner(policy, lr=m.lr, unroll=m.unroll, beta=m.beta, backend=variant[len("dean["):-1])
    settings = KDPSettings(epochs=1, lr=k.lr, momentum=k.momentum, weight_decay=k.weight_decay,
                           admm_interval=cfg.admm.interval, signals_interval=cfg.signals.interval,
                           ema=cfg.signals.ema, meta_interval=m.interval)
    sync(b.device)
    start = time.perf_counter()
    kdp(student, room, b.groups, admm, policy, b.train, b.test, b.device, settings, log=lambda record: None,
        meta_step=meta_step, meta_batches=b.meta)
    sync(b.device)
    return (time.perf_counter() - start) / b.iters


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(b: Bench, repeats: int, cfg: Config) -> dict[str, list[float]]:
    """Seconds per iteration of every variant, one entry per repeat."""
    for variant in VARIANTS:
        seconds_per_iter(b, variant, cfg)  # warm-up: allocator, lazy imports, kernel selection
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        print(f"  {b.name} on {b.device}: repeat {r + 1}/{repeats}", file=sys.stderr, flush=True)
        for variant in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            times[variant].append(seconds_per_iter(b, variant, cfg))
    return times


def factors(times: dict[str, list[float]]) -> dict[str, float]:
    """Each dean variant's median over repeats of (its time / the fixed time of the same repeat)."""
    return {v: statistics.median(d / f for d, f in zip(times[v], times["fixed"])) for v in VARIANTS[1:]}


def default_iters(name: str, device: torch.device, meta_interval: int) -> int:
    # ResNet-56 on a CPU takes about a second per iteration: one meta interval is enough there
    return meta_interval if (name == "resnet56" and device.type == "cpu") else 2 * meta_interval


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated model names (default: {','.join(MODELS)})")
    parser.add_argument("--device", default=None,
                        help="comma-separated devices, e.g. cpu or cpu,cuda (default: cpu, and cuda when present)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size (default: 128)")
    parser.add_argument("--iters", type=int, default=None,
                        help="KDP iterations per timed run, best a multiple of meta.interval (default: "
                             "2 x meta.interval, 1 x for resnet56 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default: 5)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: batch 16, one meta interval, one repeat, one CPU thread "
                             "(its timings mean nothing)")
    args = parser.parse_args(argv)
    args.models = [n.strip() for n in args.models.split(",") if n.strip()]
    for name in args.models:
        try:
            models.input_shape(name)
        except LISError as e:
            parser.error(str(e))
    devices = args.device.split(",") if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    try:
        args.device = [torch.device(d.strip()) for d in devices]
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if any(d.type == "cuda" for d in args.device) and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is visible")
    for flag in ("batch_size", "iters", "repeats"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    args.batch_size = args.batch_size or (16 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 5)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        torch.set_num_threads(1)  # a smoke run shares the machine (tests): spinning threads would thrash
    cfg = Config()
    print(f"KDP wall time per iteration, dean / fixed policy; intervals (lis.config.Config defaults): "
          f"admm.interval={cfg.admm.interval}, signals.interval={cfg.signals.interval}, "
          f"meta.interval={cfg.meta.interval}; {args.repeats} repeats, median; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    worst = (0.0, "")
    for device in args.device:
        for name in args.models:
            iters = args.iters or (cfg.meta.interval if args.quick else default_iters(name, device, cfg.meta.interval))
            b = build(name, device, args.batch_size, iters, cfg)
            times = measure(b, args.repeats, cfg)
            ratio = factors(times)
            ms = {v: 1000 * statistics.median(t) for v, t in times.items()}
            parts = [f"fixed {ms['fixed']:.1f} ms/iter"] + \
                    [f"{v} {ms[v]:.1f} ms/iter (x{ratio[v]:.2f})" for v in VARIANTS[1:]]
            print(f"{name} ({device}, batch {args.batch_size}, {iters} iters/run): {', '.join(parts)}", flush=True)
            worst = max(worst, *((r, f"{name} {device} {v}") for v, r in ratio.items()))
    verdict = "met" if worst[0] <= TARGET else "NOT met"
    print(f"target: dean <= x{TARGET:.2f} the fixed policy's time per KDP iteration: {verdict} "
          f"(worst x{worst[0]:.2f}, {worst[1]})")


if __name__ == "__main__":
    main()
