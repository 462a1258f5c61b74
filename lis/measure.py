"""How big and how fast a model is: parameters, multiply-accumulates, CPU latency.

MACs are multiply-accumulates of one sample, what compression papers call
FLOPs; torch's ``FlopCounterMode`` counts a multiply and an add as two FLOPs,
so MACs = FLOPs // 2. Only the matrix products are counted (convs, Linear,
matmuls); BatchNorm, activations, pooling and residual adds are not, as in
the papers.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (all of them, trainable or not); buffers are not counted."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one sample of shape ``input_shape`` (no batch dimension)."""
    x = torch.zeros(1, *input_shape, device=_device(model))
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch_size: int,
               repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time, in milliseconds, of one forward pass of a batch of ``batch_size`` samples.

    The model must be on the CPU; it runs in eval mode without autograd, and
    ``warmup`` untimed passes come before the ``repeats`` timed ones.
    """
    x = torch.randn(batch_size, *input_shape)
    times = []
    with eval_mode(model), torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, every submodule's own training flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
