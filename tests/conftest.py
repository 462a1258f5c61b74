"""Shared test setup: quiet, offline, single-threaded (tiny models run fastest on one thread,
and two threads per process thrash when pytest shares the machine)."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def repo():
    from pathlib import Path

    return Path(REPO)


@pytest.fixture
def untrained_accuracy():
    """``f(model, loader)``: the test accuracy of a copy of ``model`` with every layer re-initialised at random
    (seeded): what a learning check must beat by a wide margin."""
    import copy

    from lis.baselines import reinit_
    from lis.train import evaluate

    def accuracy(model, loader):
        torch.manual_seed(0)
        untrained = copy.deepcopy(model)
        reinit_(untrained)
        return evaluate(untrained, loader, torch.device("cpu"))["acc"]

    return accuracy
