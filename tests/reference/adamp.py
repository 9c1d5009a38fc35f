"""Float64 NumPy re-implementation of docs/algorithms.md#sgdp-and-adamp: SGDP
and AdamP (Heo et al.), their channel and layer views and the per-step
projection test.

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


# ------------------------------------------------------------ SGDP / AdamP


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
