"""Float64 NumPy re-implementation of docs/algorithms.md#rotational-wrapper: the
rotational wrapper (Kosson et al.), with the inner optimizers it is used with
(Adam, momentum SGD, Lion) and the equilibrium rates.

Written from the specification, step by step and in its order of operations. It
shares no code with riemax. Kernels are in Flax layout: a row (unit, neuron) is
``w[..., j]``, so the channel view is ``w.reshape(-1, out).T``.
"""

from __future__ import annotations

import math

import numpy as np

# ------------------------------------------------------- rotational wrapper


class AdamDirection:
    """optax.scale_by_adam's output: m_hat / (sqrt(v_hat) + eps)."""

    def __init__(self, p, b1=0.9, b2=0.999, eps=1e-8):
        self.b1, self.b2, self.eps = b1, b2, eps
        self.t = 0
        self.m = np.zeros_like(p)
        self.v = np.zeros_like(p)

    def __call__(self, g):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        den = np.sqrt(self.v) / math.sqrt(1 - self.b2**self.t) + self.eps
        return self.m / den / (1 - self.b1**self.t)


class MomentumDirection:
    """SGDM: buf <- mu buf + g."""

    def __init__(self, p, momentum=0.9):
        self.mu = momentum
        self.buf = np.zeros_like(p)

    def __call__(self, g):
        self.buf = self.mu * self.buf + g
        return self.buf


class LionDirection:
    """Lion: sign((1 - b1) g + b1 m), then m <- b2 m + (1 - b2) g."""

    def __init__(self, p, b1=0.9, b2=0.99):
        self.b1, self.b2 = b1, b2
        self.m = np.zeros_like(p)

    def __call__(self, g):
        u = np.sign((1 - self.b1) * g + self.b1 * self.m)
        self.m = self.b2 * self.m + (1 - self.b2) * g
        return u


def unit_sum(x):
    return np.sum(x, axis=tuple(range(x.ndim - 1)), keepdims=True)


def unit_dot(a, b):
    return unit_sum(a * b)


def unit_mean(x):
    return np.mean(x, axis=tuple(range(x.ndim - 1)), keepdims=True)


def center_units(p):
    """Construction (zero_mean): each unit centred, keeping its norm."""
    c = p - unit_mean(p)
    return np.sqrt(unit_dot(p, p)) * c / np.sqrt(unit_dot(c, c))


class Rotational:
    """The rotational wrapper on one kernel, around an inner direction."""

    def __init__(self, p, inner, rate, zero_mean=True, decay=0.9, eps=1e-8):
        self.inner, self.rate = inner, rate
        self.zero_mean, self.rho, self.eps = zero_mean, decay, eps
        self.t = 0
        self.r = None
        self.s = np.zeros_like(unit_sum(p))

    def step(self, p, g, rate=None):
        rate = self.rate if rate is None else rate
        u = self.inner(g)
        self.t += 1
        if self.r is None:
            c = p - unit_mean(p) if self.zero_mean else p
            self.r = np.sqrt(unit_dot(c, c))
        u = u - p * unit_dot(u, p) / self.r**2
        if self.zero_mean:
            u = u - unit_mean(u)
        self.s = (1 - self.rho) * unit_dot(u, u) + self.rho * self.s
        a = np.sqrt(self.s / (1 - self.rho**self.t))
        p = p - rate * self.r * u / (a + self.eps)
        return p * self.r / np.sqrt(unit_dot(p, p))


def equilibrium_rate(inner, lr, wd, b1=0.9, b2=0.99, momentum=0.0):
    if inner == "adamw":
        return math.sqrt(2 * lr * wd * (1 - b1) / (1 + b1))
    if inner == "sgdm":
        return math.sqrt(2 * lr * wd / (1 + momentum))
    if inner == "lion":
        return (
            math.sqrt(math.pi / 2)
            * math.sqrt(2 * lr * wd)
            * math.sqrt((1 - b1) ** 2 + b1**2 * (1 - b2) / (1 + b2))
        )
    raise ValueError(inner)
