"""Float64 NumPy re-implementation of docs/algorithms.md#nero: Nero (Liu et
al.) and its construction-time constraints.

Written from the specification, step by step and in its order of operations. It
shares no code with riemax. Kernels are in Flax layout: a row (unit, neuron) is
``w[..., j]``, so the channel view is ``w.reshape(-1, out).T``.
"""

from __future__ import annotations

import numpy as np

from .adamp import channel_rows, row_norms  # a neuron is a row of the channel view

# ------------------------------------------------------------------- Nero


def neuron_norm(x):
    if x.ndim <= 1:
        return np.abs(x)
    return row_norms(channel_rows(x))


def neuron_mean(x):
    return np.mean(channel_rows(x), axis=1)


def per_neuron(values, x):
    """Broadcasts one value per neuron back onto the tensor's shape."""
    if x.ndim <= 1:
        return values
    return values.reshape((1,) * (x.ndim - 1) + (-1,))


def nero_project(p):
    """The construction-time constraints: centre, then normalise, every unit."""
    if p.ndim <= 1:
        return p
    p = p - per_neuron(neuron_mean(p), p)
    return p / per_neuron(neuron_norm(p), p)


class Nero:
    def __init__(self, p, lr=0.01, beta=0.999, constraints=True):
        self.lr, self.beta, self.constraints = lr, beta, constraints
        self.t = 0
        self.v = np.zeros_like(neuron_norm(p))
        scale = float(np.mean(neuron_norm(p)))
        self.scale = 0.01 if scale == 0.0 else scale

    def step(self, p, g, lr=None):
        lr = self.lr if lr is None else lr
        self.t += 1
        self.v = self.beta * self.v + (1 - self.beta) * neuron_norm(g) ** 2
        vhat = self.v / (1 - self.beta**self.t)
        with np.errstate(invalid="ignore", divide="ignore"):
            ghat = g / per_neuron(np.sqrt(vhat), g)
        ghat[np.isnan(ghat)] = 0.0
        p = p - lr * self.scale * ghat
        if self.constraints and p.ndim > 1:
            p = nero_project(p)
        return p
