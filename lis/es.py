"""Evolution strategies: a gradient estimate that needs no backpropagation (``meta.estimator=es``).

The gradient-free check of the dean's meta-gradient (docs/design.md section 4):
with antithetic Gaussian perturbations eps_i ~ N(0, I) of the parameters theta,

    g = 1 / n * sum_i (f(theta + sigma eps_i) - f(theta - sigma eps_i)) / (2 sigma) * eps_i,   n = population / 2

is an unbiased estimate of the gradient of the Gaussian-smoothed f, E[f(theta + sigma eps)]; for a quadratic
(and, as sigma -> 0, for any smooth f) that is grad f itself. Antithetic pairs cancel the even part of f
around theta, so g has no variance from f(theta) itself. Where g and the hypergradient disagree, the
hypergradient's estimator (its truncated, short look-ahead) is at fault; where both fail, the objective is.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def antithetic_gradient(f: Callable[[], float], params: Sequence[torch.Tensor], sigma: float,
                        population: int) -> list[torch.Tensor]:
    """The ES estimate of grad f at ``params`` (one tensor per parameter) from ``population`` evaluations of
    ``f`` (even: ``population / 2`` antithetic pairs) at perturbations of standard deviation ``sigma``.

    ``f`` reads ``params``, which are shifted in place and restored exactly afterwards (each parameter is
    saved, not shifted back, so rounding cannot drift it). The perturbations are drawn from torch's global
    generator on the CPU: a seeded run draws the same ones, and a resumed run continues its stream."""
    saved = [p.detach().clone() for p in params]
    grads = [torch.zeros_like(p) for p in params]
    pairs = population // 2
    try:
        for _ in range(pairs):
            eps = [torch.randn(p.shape, dtype=p.dtype).to(p.device) for p in params]
            values = []
            for sign in (1.0, -1.0):
                with torch.no_grad():  # f itself may need autograd (the meta step's plain unroll does)
                    for p, s, e in zip(params, saved, eps):
                        p.copy_(s + sign * sigma * e)
                values.append(f())
            for g, e in zip(grads, eps):
                g.add_(e, alpha=(values[0] - values[1]) / (2 * sigma * pairs))
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return grads
