"""Training throughput, images per second: plain training, the KDP loop with a fixed policy, and with the dean.

Three loops run side by side in one process, on the same model and data:

- ``plain``: ``lis.train.fit`` for one epoch (cross-entropy, SGD step; how the
  teacher is trained);
- ``fixed``: ``lis.school.kdp`` for one epoch with ``create_policy("fixed",
  ...)`` at the config's constants, no meta step;
- ``dean``: the same call with the dean (``lis.pipeline.build_policy``) and a
  ``MetaLearner``, as ``lis compress`` builds them.

The teacher is a randomly initialised model in eval mode and the student a
copy of it, as ``lis compress`` makes one (``student.model`` unset); every
loop starts from a fresh copy, with the same seed for adapters and dean.
Everything else is ``lis.config.Config()``'s defaults, intervals included
(``admm.interval``, ``signals.interval``, ``meta.interval``; printed).

The models and their default batches: ``resnet56`` (CIFAR ResNet-56,
3x32x32, 10 classes, batch 128) and ``resnet50`` (``torchvision:resnet50``,
3x224x224, 1000 classes, batch 64). The data are random tensors: a pool of
at most 8 distinct batches made once on the device and handed out in turn,
so what is measured is the training step, not the input pipeline or the
host-to-device copy.

How the iterations are timed: the loops are the library's own and run whole
epochs, so each gets a train "loader" of exactly ``--warmup + --iters``
batches (``Stopwatch``) that reads the clock, after a device sync, when the
loop asks for batch number ``--warmup`` (the warm-up iterations are done)
and when it asks past the last batch (the timed iterations are done). The
two readings bracket the timed iterations whole, everything a KDP iteration
does before it fetches the next batch included (ADMM Z/U steps, meta steps,
logging), and leave out what a call does before its first batch (building
the optimizer) and after its last (the end-of-epoch evaluation, which runs
on an empty test loader anyway). All loops time the same number of
iterations.

The meta step runs every ``meta.interval`` iterations and the distillability
measurement (two backward passes) every ``signals.interval``; counted from
the start of the call, so a timed window of ``--iters`` iterations holds
``--iters / meta.interval`` meta steps whenever ``--iters`` is a multiple of
``meta.interval``, wherever the warm-up ends. The default, ``2 x
meta.interval`` = 40 iterations, holds two meta steps and four
measurements; the script prints how many each window held and warns when it
held no meta step (then dean/fixed leaves out the dean's main cost).
``higher`` is imported before any timing, so the first meta step does not
pay for it.

How to read it: a table of images/s and ms/iteration per model and loop,
then per model ``dean/fixed`` (the dean's throughput as a fraction of the
fixed policy's; the target of issue #8 is >= 0.6 with the default
intervals) and ``fixed/plain`` (what distillation + ADMM + the signals cost
against plain training). The last line says whether the target is met. On
a CPU the timings are noisy when the machine is shared; the ratios less so.

    python benchmarks/throughput.py                                   # both models, CUDA when present
    python benchmarks/throughput.py --models resnet56 --device cpu --batch 32

``--amp`` and ``--channels-last`` run all three loops with bf16 autocast and
the channels_last layout (``lis.train.Precision``, what ``run.amp=bf16`` and
``run.channels_last=true`` do).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lis import models
from lis.config import Config
from lis.groups import find_groups
from lis.meta import MetaLearner
from lis.pipeline import build_policy, plan
from lis.policy import create_policy
from lis.school import Classroom, KDPSettings, kdp
from lis.train import Precision, fit

TARGET = 0.6  #: the dean's throughput must be at least this fraction of the fixed policy's (issue #8)
POOL = 8  #: distinct random batches per model, handed out in turn
LOOPS = ("plain", "fixed", "dean")


@dataclass(frozen=True)
class Model:
    name: str  #: the name ``lis.models.create`` takes
    batch: int  #: default training batch
    num_classes: int


MODELS = {"resnet56": Model("resnet56", 128, 10), "resnet50": Model("torchvision:resnet50", 64, 1000)}


class Stopwatch:
    """A train "loader" of ``warmup + iters`` batches from ``pool``, in turn, that reads the clock (after a
    device sync) when batch number ``warmup`` is asked for and when a batch past the last one is: ``seconds``
    is the time of the last ``iters`` iterations of the loop that went through it."""

    def __init__(self, pool: list[tuple[torch.Tensor, torch.Tensor]], warmup: int, iters: int,
                 device: torch.device):
        self.pool, self.warmup, self.iters, self.device = pool, warmup, iters, device
        self.start = self.stop = None

    def __len__(self) -> int:
        return self.warmup + self.iters

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self)):
            if i == self.warmup:
                self.start = self._now()
            yield self.pool[i % len(self.pool)]
        self.stop = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @property
    def seconds(self) -> float:
        if self.start is None or self.stop is None:
            raise RuntimeError("the loop did not go through all its batches")
        return self.stop - self.start


@dataclass
class Bench:
    """What every loop of one model shares; built once, never changed by a loop."""

    model: Model
    device: torch.device
    batch: int
    teacher: nn.Module
    student: nn.Module
    example: torch.Tensor
    pool: list[tuple[torch.Tensor, torch.Tensor]]


def build(model: Model, device: torch.device, batch: int) -> Bench:
    torch.manual_seed(0)
    shape = models.input_shape(model.name)
    teacher = models.create(model.name, model.num_classes).to(device).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)  # as lis compress does
    pool = [(torch.randn(batch, *shape, device=device), torch.randint(0, model.num_classes, (batch,), device=device))
            for _ in range(POOL)]
    return Bench(model, device, batch, teacher, student, torch.zeros(2, *shape, device=device), pool)


def run_loop(b: Bench, student: nn.Module, loop: str, train, cfg: Config, precision: Precision = Precision()) -> None:
    """``loop`` on ``student`` over the batches of ``train``: plain training, or the KDP loop of the fixed policy
    or of the dean, set up as ``lis compress`` sets it up (``benchmarks/ops.py`` counts the same loops)."""
    k = cfg.kdp
    if loop == "plain":
        fit(student, train, [], b.device, epochs=1, lr=k.lr, momentum=k.momentum, weight_decay=k.weight_decay,
            precision=precision)
        return
    groups, admm = plan(student, b.example, cfg)
    room = Classroom(b.teacher, student, [g.name for g in groups], [g.name for g in find_groups(b.teacher, b.example)],
                     b.example, k.temperature, features=k.feature_layers == "all").to(b.device)
    p, m = cfg.policy, cfg.meta
    if loop == "fixed":
        policy, meta_step = create_policy("fixed", alpha_out=p.alpha_out, alpha=p.alpha, rho=p.rho), None
    else:
        policy = build_policy(cfg).to(b.device)
        meta_step = MetaLearner(policy, lr=m.lr, unroll=m.unroll, beta=m.beta, backend=m.backend)
    settings = KDPSettings(epochs=1, lr=k.lr, momentum=k.momentum, weight_decay=k.weight_decay,
                           admm_interval=cfg.admm.interval, signals_interval=cfg.signals.interval,
                           ema=cfg.signals.ema, meta_interval=m.interval, precision=precision)
    kdp(student, room, groups, admm, policy, train, [], b.device, settings, log=lambda record: None,
        meta_step=meta_step, meta_batches=b.pool[:1])


def seconds(b: Bench, loop: str, warmup: int, iters: int, cfg: Config, precision: Precision = Precision()) -> float:
    """Wall time of ``iters`` iterations of ``loop`` after ``warmup`` untimed ones, from a fresh student."""
    torch.manual_seed(1)  # the adapters and the dean start the same in every call
    train = Stopwatch(b.pool, warmup, iters, b.device)
    run_loop(b, copy.deepcopy(b.student), loop, train, cfg, precision)
    return train.seconds


def multiples(lo: int, hi: int, interval: int) -> int:
    """How many of the integers lo..hi-1 are multiples of ``interval``."""
    return (hi - 1) // interval - (lo - 1) // interval


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def parse_args(argv: list[str] | None = None, cfg: Config = Config()) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--iters", type=int, default=2 * cfg.meta.interval,
                        help="timed iterations per loop, best a multiple of meta.interval "
                             "(default: 2 x meta.interval = %(default)s)")
    parser.add_argument("--warmup", type=int, default=cfg.meta.interval + 1,
                        help="untimed iterations before them, past the first meta step so that the timed ones do "
                             "not pay its one-time costs (default: meta.interval + 1 = %(default)s)")
    parser.add_argument("--batch", type=int, default=None,
                        help="the batch of every model (default: 128 for resnet56, 64 for resnet50)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when present, else cpu (default)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast in every loop (run.amp=bf16)")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last memory layout in every loop (run.channels_last=true)")
    args = parser.parse_args(argv)
    args.models = [n.strip() for n in args.models.split(",") if n.strip()]
    for name in args.models:
        if name not in MODELS:
            parser.error(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
    if args.iters < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        parser.error("--iters and --batch must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is visible")
    args.device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                               else "cpu")
    return args


def main(argv: list[str] | None = None) -> None:
    cfg = Config()
    args = parse_args(argv, cfg)
    if cfg.meta.backend == "higher":
        import higher  # noqa: F401  (its import time stays out of the first timed meta step)
    print(f"training throughput on {device_name(args.device)}, torch {torch.__version__}; intervals "
          f"(lis.config.Config defaults): admm.interval={cfg.admm.interval}, signals.interval={cfg.signals.interval}, "
          f"meta.interval={cfg.meta.interval}; {args.iters} timed iterations per loop after {args.warmup} warm-up",
          flush=True)
    # kdp measures the signals when its iteration count (from 0) is a multiple of signals.interval, before the
    # step; it takes the ADMM and meta steps when the count is one after the step
    first, end = args.warmup, args.warmup + args.iters
    held = {"meta steps": multiples(first + 1, end + 1, cfg.meta.interval),
            "signal measurements": multiples(first, end, cfg.signals.interval),
            "ADMM steps": multiples(first + 1, end + 1, cfg.admm.interval)}
    print("each timed window holds " + ", ".join(f"{n} {what}" for what, n in held.items()))
    if held["meta steps"] == 0:
        print(f"warning: no meta step in the timed window (--iters {args.iters} < meta.interval={cfg.meta.interval}):"
              f" dean/fixed leaves out the dean's main cost")
    print(f"{'model':<22}{'batch':>6}  {'loop':<6}{'images/s':>10}{'ms/iter':>10}", flush=True)
    results = {}
    for key in args.models:
        model = MODELS[key]
        b = build(model, args.device, args.batch or model.batch)
        rate = {}
        for loop in LOOPS:
            print(f"  {key}: {loop} ...", file=sys.stderr, flush=True)
            s = seconds(b, loop, args.warmup, args.iters, cfg, Precision(args.amp, args.channels_last))
            rate[loop] = args.iters * b.batch / s
            print(f"{model.name:<22}{b.batch:>6}  {loop:<6}{rate[loop]:>10.1f}{1000 * s / args.iters:>10.1f}",
                  flush=True)
        results[model.name] = rate
        del b  # free its models and batches before the next model's are built
    for name, rate in results.items():
        print(f"{name}: dean/fixed x{rate['dean'] / rate['fixed']:.2f}, "
              f"fixed/plain x{rate['fixed'] / rate['plain']:.2f}")
    worst = min((rate["dean"] / rate["fixed"], name) for name, rate in results.items())
    verdict = "met" if worst[0] >= TARGET else "NOT met"
    if held["meta steps"] == 0:
        verdict = "not judged, no meta step was timed"
    print(f"target: dean >= {TARGET}x the fixed policy's images/s with the default intervals: {verdict} "
          f"(worst x{worst[0]:.2f}, {worst[1]})")


if __name__ == "__main__":
    main()
