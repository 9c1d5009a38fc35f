"""Float64 NumPy re-implementation of ALGORITHMS.md §8: SGDP/AdamP, Nero and the
rotational wrapper, with the inner optimizers the wrapper is used with.

Written from the specification, step by step and in its order of operations. It
shares no code with riemax. Kernels are in Flax layout: a row (unit, neuron) is
``w[..., j]``, so the channel view is ``w.reshape(-1, out).T``.
"""

from __future__ import annotations

import math

import numpy as np

# ------------------------------------------------------------------------ views


def channel_rows(x):
    """One row per output unit (Flax: the slice over all axes but the last)."""
    return x.reshape(-1, x.shape[-1]).T


def from_channel_rows(rows, shape):
    return rows.T.reshape(shape)


def layer_rows(x):
    return x.reshape(1, -1)


def from_layer_rows(rows, shape):
    return rows.reshape(shape)


VIEWS = (
    ("channel", channel_rows, from_channel_rows),
    ("layer", layer_rows, from_layer_rows),
)


def row_norms(rows):
    return np.sqrt(np.sum(rows * rows, axis=1))


# ------------------------------------------------------------ §8.1 SGDP / AdamP


def projection(p, g, d, delta, wd_ratio, eps, mode="test"):
    """Returns ``(d, r, branch)`` with branch "none", "channel" or "layer".

    ``mode="test"`` is the original's per-step test; ``"channel"`` projects per
    unit every step and ``"none"`` never (a label in place of the test).
    """
    if p.ndim <= 1 or mode == "none":
        return d, 1.0, "none"
    for name, rows_of, back in VIEWS:
        gr, pr = rows_of(g), rows_of(p)
        cos = np.abs(np.sum(gr * pr, axis=1)) / (
            np.maximum(row_norms(gr), eps) * np.maximum(row_norms(pr), eps)
        )
        n = pr.shape[1]
        if mode == "channel" or cos.max() < delta / math.sqrt(n):
            phat = pr / (row_norms(pr)[:, None] + eps)
            dr = rows_of(d)
            dr = dr - phat * np.sum(phat * dr, axis=1)[:, None]
            return back(dr, p.shape), wd_ratio, name
    return d, 1.0, "none"


class AdamP:
    def __init__(
        self,
        p,
        lr=1e-3,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        delta=0.1,
        wd_ratio=0.1,
        nesterov=False,
        mode="test",
    ):
        self.mode = mode
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.wd, self.delta, self.wd_ratio, self.nesterov = (
            weight_decay,
            delta,
            wd_ratio,
            nesterov,
        )
        self.t = 0
        self.m = np.zeros_like(p)
        self.v = np.zeros_like(p)
        self.branch = None

    def step(self, p, g, lr=None):
        lr = self.lr if lr is None else lr
        b1, b2 = self.b1, self.b2
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        den = np.sqrt(self.v) / math.sqrt(bc2) + self.eps
        if self.nesterov:
            d = (b1 * self.m + (1 - b1) * g) / den
        else:
            d = self.m / den
        d, r, self.branch = projection(
            p, g, d, self.delta, self.wd_ratio, self.eps, self.mode
        )
        if self.wd > 0:
            p = p * (1 - lr * self.wd * r)
        return p - lr / bc1 * d


class SGDP:
    def __init__(
        self,
        p,
        lr,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        eps=1e-8,
        delta=0.1,
        wd_ratio=0.1,
        mode="test",
    ):
        self.mode = mode
        self.lr, self.mu, self.tau, self.wd = lr, momentum, dampening, weight_decay
        self.nesterov, self.eps, self.delta, self.wd_ratio = (
            nesterov,
            eps,
            delta,
            wd_ratio,
        )
        self.buf = np.zeros_like(p)
        self.branch = None

    def step(self, p, g, lr=None):
        lr = self.lr if lr is None else lr
        self.buf = self.mu * self.buf + (1 - self.tau) * g
        d = g + self.mu * self.buf if self.nesterov else self.buf
        d, r, self.branch = projection(
            p, g, d, self.delta, self.wd_ratio, self.eps, self.mode
        )
        if not self.nesterov:
            self.buf = d  # d is the buffer: projected in place
        if self.wd > 0:
            p = p * (1 - lr * self.wd * r / (1 - self.mu))
        return p - lr * d


# ------------------------------------------------------------------- §8.2 Nero


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


# ------------------------------------------------------- §8.3 rotational wrapper


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
