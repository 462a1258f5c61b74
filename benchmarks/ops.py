"""Cost of one training iteration in aten operators and host synchronisations, on any device.

Counted, not timed: a ``TorchDispatchMode`` counts every aten operator the
iteration dispatches (what a GPU launches as kernels; on a small net the GPU
is launch-bound, so the count is the cost), and a ``TorchFunctionMode``
counts the calls that make the host wait for the device (``.item()``,
``.tolist()``, ``bool()``/``float()``/``int()`` of a tensor, ``.numpy()``,
``torch.equal``, ``nonzero``). A copy to the host is a sync on a GPU too but
indistinguishable on a CPU, so it is not counted here.

Side by side, on the same model and batch (``benchmarks/throughput.py``'s
``build``, random data, ``lis.config.Config`` defaults but for the intervals
below): the reference ``student forward + backward + teacher forward``;
plain training (``lis.train.fit``); the KDP loop with the fixed policy; the
KDP loop with the dean. Each KDP iteration is classed by what it does:
``ordinary`` (nothing else), ``measurement`` (distillability: two
backwards), ``admm`` (Z- and U-step), ``meta`` (the dean's meta step); the
table gives the median per class. Targets (issue #17): an ordinary KDP
iteration at most 1.5x the reference's operators, at most one host sync.

    python benchmarks/ops.py                       # resnet56, batch 8, CPU
    python benchmarks/ops.py --models resnet56 --batch 8 --iters 24
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import MODELS, Bench, build, run_loop  # noqa: E402

from lis.config import Config  # noqa: E402

TARGET_OPS, TARGET_SYNCS = 1.5, 1
SYNC_METHODS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "equal"}


class Count(TorchDispatchMode):
    """Counts aten operators (and ``nonzero``, whose output size the host must wait for)."""

    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func.overloadpacket is torch.ops.aten.nonzero
        return func(*args, **(kwargs or {}))


class Syncs(TorchFunctionMode):
    """Counts the tensor calls that hand a value to the host (the outermost one only)."""

    def __init__(self, count: Count):
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count.syncs += getattr(func, "__name__", "") in SYNC_METHODS
        return func(*args, **(kwargs or {}))


class Ledger:
    """A train "loader" of ``n`` batches that records the counts each iteration made (from asking for its batch
    to asking for the next)."""

    def __init__(self, pool, n: int, count: Count):
        self.pool, self.n, self.count, self.per_iter = pool, n, count, []

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator:
        mark = None
        for i in range(self.n):
            now = (self.count.ops, self.count.syncs)
            if mark is not None:
                self.per_iter.append((now[0] - mark[0], now[1] - mark[1]))
            mark = now
            yield self.pool[i % len(self.pool)]
        self.per_iter.append((self.count.ops - mark[0], self.count.syncs - mark[1]))  # the last, to the loop's end


def counted(fn) -> Count:
    count = Count()
    with count, Syncs(count):
        fn()
    return count


def reference(b: Bench) -> tuple[int, int]:
    """Operators of student forward + backward and teacher forward, and of the student's alone."""
    student = copy.deepcopy(b.student)
    x, y = b.pool[0]
    fwd_bwd = counted(lambda: F.cross_entropy(student(x), y).backward()).ops
    with torch.no_grad():
        teacher = counted(lambda: b.teacher(x)).ops
    return fwd_bwd + teacher, fwd_bwd


def run(b: Bench, loop: str, iters: int, cfg: Config) -> list[tuple[int, int]]:
    torch.manual_seed(1)
    count = Count()
    train = Ledger(b.pool, iters, count)
    with count, Syncs(count):
        run_loop(b, copy.deepcopy(b.student), loop, train, cfg)
    return train.per_iter


def kind(i: int, loop: str, cfg: Config) -> str:
    """What KDP iteration ``i`` (from 0) does besides the step (``lis.school.kdp``'s schedule)."""
    if loop == "plain":
        return "ordinary"
    if i % cfg.signals.interval == 0:
        return "measurement"
    if loop == "dean" and (i + 1) % cfg.meta.interval == 0:
        return "meta"
    if (i + 1) % cfg.admm.interval == 0:
        return "admm"
    return "ordinary"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet56", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=24, help="iterations per loop (default: 24)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    cfg = Config()
    cfg.signals.interval, cfg.admm.interval, cfg.meta.interval = 10, 12, 8  # every kind in a short run
    device = torch.device(args.device)
    print(f"aten operators and host syncs per iteration, {device.type}, torch {torch.__version__}, batch "
          f"{args.batch}; signals.interval={cfg.signals.interval}, admm.interval={cfg.admm.interval}, "
          f"meta.interval={cfg.meta.interval}; median over the iterations of each kind")
    verdicts = []
    for key in args.models.split(","):
        b = build(MODELS[key], device, args.batch)
        ref, fwd_bwd = reference(b)
        print(f"{key}: student forward+backward {fwd_bwd} ops; + teacher forward = reference {ref} ops")
        print(f"{'loop':<7}{'kind':<13}{'iters':>6}{'ops':>8}{'x ref':>7}{'syncs':>7}")
        for loop in ("plain", "fixed", "dean"):
            per_iter = run(b, loop, args.iters, cfg)
            kinds: dict[str, list] = {}
            for i, c in enumerate(per_iter[1:], start=1):  # the first builds optimizer state: left out
                kinds.setdefault(kind(i, loop, cfg), []).append(c)
            for name, counts in kinds.items():
                ops = statistics.median(c[0] for c in counts)
                syncs = statistics.median(c[1] for c in counts)
                print(f"{loop:<7}{name:<13}{len(counts):>6}{ops:>8.0f}{ops / ref:>7.2f}{syncs:>7.0f}")
                if loop != "plain" and name == "ordinary":
                    verdicts.append((loop, ops / ref, syncs))
    for loop, ratio, syncs in verdicts:
        ok = ratio <= TARGET_OPS and syncs <= TARGET_SYNCS
        print(f"target {loop}: ordinary iteration x{ratio:.2f} of the reference's ops (<= {TARGET_OPS}), {syncs:.0f} "
              f"host syncs (<= {TARGET_SYNCS}): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
