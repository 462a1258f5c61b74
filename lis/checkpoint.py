"""Checkpoints: everything a run needs to continue exactly where it stopped.

A compress run keeps one file, ``<run>/checkpoint.pt``, rewritten at the end
of every epoch and every ``checkpoint.every_iters`` iterations of the KDP and
fine-tuning phases. It holds what the phase hands over (student, adapters,
both optimizers and schedulers, ADMM Z and U, the dean, the EMA signal
state, the position in the data order) plus, added here, every RNG state
(python, numpy, torch, this process's GPU) and the length of
``metrics.jsonl`` at that moment. ``atomic_save`` writes a temporary file and renames it, so the
previous checkpoint stays whole until the new one is complete, and a kill
-9 at any point leaves one good checkpoint.

``lis compress --resume RUN`` loads it; the phase that wrote it restores its
own state (``restore``), the RNGs are set back and ``metrics.jsonl`` is cut
back to its recorded length, so the resumed run writes the same records an
uninterrupted run would have, none twice. SIGINT and SIGTERM (``on_signals``)
make the running phase save a checkpoint at the end of the current
iteration and stop with ``Interrupted``.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from lis import dist
from lis.errors import Interrupted, LISError
from lis.run import MetricsLog, atomic_save

FILE = "checkpoint.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # this process's own GPU only: a run may resume on fewer GPUs, and under torchrun process 0 writes the
        # checkpoint for all (every process is seeded alike and draws alike, so their states are the same)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # onto this process's current GPU


def load(run_dir: Path) -> Optional[dict]:
    """The checkpoint of ``run_dir`` (None if it has none yet); a damaged file is a one-line error."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        # our own file: it pickles the pruned student module and the policy's weights
        state = torch.load(path, map_location="cpu", weights_only=False)
        state["phase"], state["iter"], state["rng"], state["log_offset"]
    except Exception as e:
        raise LISError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}): it cannot be resumed; "
                       f"start the run again with --overwrite") from None
    return state


class Stop:
    """What SIGINT/SIGTERM asked for: ``signum`` is set while a checkpointing loop runs (``armed``);
    outside one (data loading, teacher training) a signal interrupts at once as usual."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.armed = False

    def __call__(self, signum: int, frame) -> None:
        if not self.armed or self.signum is not None:  # nothing to save yet, or asked twice: stop now
            raise KeyboardInterrupt
        self.signum = signum


@contextmanager
def on_signals() -> Iterator[Stop]:
    """Route SIGINT and SIGTERM to a ``Stop`` for the duration (main thread only; elsewhere a no-op)."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class Checkpointer:
    """Saves a phase's state at epoch ends, every ``every_iters`` iterations and on a signal.

    ``resume`` is the loaded checkpoint of a resumed run: the phase that wrote
    it gets it from ``restore``, the phases before it are skipped by the job.
    """

    def __init__(self, run_dir: Optional[Path], log: Optional[MetricsLog], every_iters: int = 0,
                 stop: Optional[Stop] = None, resume: Optional[dict] = None):
        """``run_dir=None``: a checkpointer that never writes (a loop run without a run directory)."""
        self.path = None if run_dir is None else Path(run_dir) / FILE
        self.log, self.every_iters = log, every_iters
        self.stop = stop or Stop()
        self.resume = resume
        self.context: dict = {}  #: saved with every checkpoint, for the record (the teacher's path)
        self.last_iter: Optional[int] = None  #: the iteration of the last checkpoint written or resumed
        self.last_phase: Optional[str] = None
        self._started, self._before = time.perf_counter(), 0.0
        if resume is not None:
            self.last_phase, self.last_iter = resume["phase"], resume["iter"]
            self._before = resume.get("elapsed", 0.0)

    def elapsed(self) -> float:
        """Seconds the run has taken, those before the checkpoint it resumed from included."""
        return self._before + time.perf_counter() - self._started

    @classmethod
    def disabled(cls) -> "Checkpointer":
        return cls(None, None)

    @property
    def phase(self) -> Optional[str]:
        """The phase the resumed checkpoint belongs to (None: a fresh run)."""
        return None if self.resume is None else self.resume["phase"]

    def restore(self, phase: str) -> Optional[dict]:
        """The resumed state if ``phase`` wrote it, handed out once; ``metrics.jsonl`` is cut back to the
        checkpoint. The phase sets ``state["rng"]`` back (``set_rng_state``) right before its loop, after
        whatever else it builds, so the loop continues with exactly the random state it was saved with."""
        if self.phase != phase:
            return None
        state, self.resume = self.resume, None
        if dist.is_main():
            self.log.truncate(state["log_offset"])
        return state

    def save(self, state: dict) -> None:
        """Write ``state`` (with ``phase`` and ``iter``) plus the RNG states and the log length."""
        if self.path is None or not dist.is_main():
            return
        atomic_save({**self.context, **state, "rng": rng_state(), "log_offset": self.log.offset(), "elapsed": self.elapsed()},
                    self.path)
        self.last_phase, self.last_iter = state["phase"], state["iter"]

    @contextmanager
    def armed(self) -> Iterator[None]:
        """While inside, a signal waits for the end of the iteration (``step``) instead of stopping at once."""
        self.stop.armed = True
        try:
            yield
        finally:
            self.stop.armed = False

    def step(self, it: int, state: Callable[[], dict]) -> None:
        """End of iteration ``it``: save ``state()`` if one is due; after a signal, save and stop."""
        if dist.any_(self.stop.signum is not None):  # under torchrun all processes stop at the same iteration
            signum = self.stop.signum or signal.SIGTERM
            snapshot = state()
            self.save(snapshot)
            raise Interrupted(f"{signal.Signals(signum).name} at {snapshot['phase']} iteration {it}: saved a "
                              f"checkpoint; continue with 'lis compress --resume {self.path.parent}'", signum)
        if self.every_iters and it % self.every_iters == 0:
            self.save(state())

    def describe(self) -> str:
        """Where a stopped run can continue from, for messages."""
        if self.last_iter is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint ({self.last_phase} iteration {self.last_iter}) is kept"
