"""The runs of a comparison as ``lis compress`` commands: printed for a scheduler (``lis compare --plan``)
or run side by side in worker processes (``lis compare --jobs N``).

A pending (policy, seed) pair is one command: ``lis compress CONFIG <overrides>
... run.name=<comparison>/<run>`` for a run not started yet, ``lis compress
--resume <run dir>`` for one that stopped. Every command carries the whole
config, ``run.threads`` included, so a run gives the same numbers wherever and
beside whatever it runs; ``lis compare`` aggregates the runs that finished.
"""

from __future__ import annotations

import os
import queue
import shlex
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from lis.config import Config
from lis.errors import LISError


class Command(NamedTuple):
    label: str
    seed: int
    run_dir: Path
    args: list[str]  #: after ``lis``


def commands(config_path: str | Path, runs: Sequence[tuple[str, str, int, Config, list[str]]]) -> list[Command]:
    """The command of every pair of ``runs`` (``compare._plan``) that has no ``summary.json`` yet."""
    from lis.compare import _check_same_config

    out = []
    for label, _, seed, cfg, args in runs:
        run_dir = Path(cfg.run.dir) / cfg.run.name
        if (run_dir / "summary.json").is_file():
            continue
        if (run_dir / "config.yaml").is_file():
            _check_same_config(run_dir, cfg)
            out.append(Command(label, seed, run_dir, ["compress", "--resume", str(run_dir)]))
        else:
            out.append(Command(label, seed, run_dir, ["compress", str(config_path), *args]))
    return out


def print_plan(cmds: Sequence[Command], cmp_dir: Path) -> None:
    """One shell line per pending run on stdout (line i is the i-th job of an array); what to do on stderr."""
    for c in cmds:
        print(shlex.join(["lis", *c.args]))
    print(f"{len(cmds)} pending runs of {cmp_dir} (one per line above); run each line once, anywhere that sees "
          f"{cmp_dir.parent}, then run the same 'lis compare' without --plan to write the comparison",
          file=sys.stderr)


def run_all(cmds: Sequence[Command], jobs: int, logs: Path) -> None:
    """Run ``cmds`` in ``jobs`` processes at once, each writing its output to ``logs/<run>.log``; one line per
    start and end. With several GPUs, process slot k sees only GPU k mod their count. Raises ``LISError``
    naming the runs that failed, after the others have finished."""
    logs.mkdir(parents=True, exist_ok=True)
    slots: queue.Queue = queue.Queue()
    for k in range(jobs):
        slots.put(k)
    gpus, lock, failed = torch.cuda.device_count(), threading.Lock(), []

    def say(text: str) -> None:
        with lock:
            print(text, flush=True)

    def run(i: int, c: Command) -> None:
        slot, log = slots.get(), logs / f"{c.run_dir.name}.log"
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(slot % gpus)} if gpus > 1 else {}))
        say(f"[{i}/{len(cmds)}] {c.label} seed {c.seed} started (log: {log})")
        try:
            with open(log, "w") as out:
                code = subprocess.run([sys.executable, "-m", "lis", *c.args], stdout=out, stderr=subprocess.STDOUT,
                                      env=env).returncode
        finally:
            slots.put(slot)
        last = (log.read_text().strip().splitlines() or [""])[-1]
        if code:
            failed.append(c.run_dir)
        say(f"[{i}/{len(cmds)}] {c.label} seed {c.seed} " + (f"failed (exit code {code}): {last}" if code else "done"))

    with ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(run, i, c) for i, c in enumerate(cmds, 1)]:
            future.result()
    if failed:
        raise LISError(f"{len(failed)} of {len(cmds)} runs failed ({', '.join(map(str, failed))}; their logs are in "
                       f"{logs}): fix the cause and run 'lis compare' again, which resumes them")
