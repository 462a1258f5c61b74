"""Shared test setup: quiet, offline, single-threaded (tiny models run fastest on one thread,
and two threads per process thrash when pytest shares the machine)."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def repo():
    from pathlib import Path

    return Path(REPO)
