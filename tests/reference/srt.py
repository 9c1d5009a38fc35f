"""Float64 NumPy re-implementation of the update rules in docs/algorithms.md#adams-adamsrt-and-sgd-mrt: the
channel groups, AdamS/AdamSRT and SGD-MRT (Roburin et al.).

Written from the specification, step by step and in its order of operations, with
the state stored where the original implementations store it. It shares no code
with riemax. Kernels are in Flax layout: a unit is ``w[..., j]``.
"""

from __future__ import annotations

import numpy as np


def _axes(w):
    return tuple(range(w.ndim - 1))


def dot(a, b, axes=None):
    axes = _axes(a) if axes is None else axes
    return np.sum(a * b, axis=axes, keepdims=True)


# Groups, AdamS / AdamSRT, SGD-MRT -------------------------------------------------


def reduced_axes(ndim, channel_axes):
    if channel_axes is None:
        return ()
    kept = {a % ndim for a in channel_axes}
    return tuple(a for a in range(ndim) if a not in kept)


class AdamSRT:
    def __init__(
        self,
        w,
        lr,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        channel_axes=(-1,),
        rt=True,
    ):
        self.lr, self.b1, self.b2, self.eps, self.wd, self.rt = (
            lr,
            b1,
            b2,
            eps,
            weight_decay,
            rt,
        )
        self.R = reduced_axes(w.ndim, channel_axes)
        self.d = int(np.prod([w.shape[a] for a in self.R])) if self.R else 1
        self.t = 0
        self.m = np.zeros_like(w)
        self.v = np.zeros_like(w)  # stored full-shape, constant within a group

    def step(self, w, g, lr=None):
        lr = self.lr if lr is None else lr
        R = self.R
        if self.wd:
            g = g + self.wd * w
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * dot(g, g, R)
        bc1, bc2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        denom = np.sqrt(self.v) / np.sqrt(bc2) + self.eps
        w_new = w + (-lr * np.sqrt(self.d)) * (self.m / bc1) / denom
        if self.rt and self.d > 1:
            x1, x2 = w, w_new
            x1x1, x1x2, x2x2, mx2 = (
                dot(x1, x1, R),
                dot(x1, x2, R),
                dot(x2, x2, R),
                dot(self.m, x2, R),
            )
            self.v = self.v * x1x1 / (x2x2 + self.eps)
            self.m = (x1x2 * self.m - mx2 * x1) / (x2x2 + self.eps)
        return w_new


class SGDMRT:
    def __init__(self, w, lr, momentum=0.9, weight_decay=0.0, channel_axes=(-1,)):
        self.lr, self.mom, self.wd = lr, momentum, weight_decay
        self.R = reduced_axes(w.ndim, channel_axes)
        self.d = int(np.prod([w.shape[a] for a in self.R])) if self.R else 1
        self.b = np.zeros_like(w)

    def step(self, w, g, lr=None):
        lr = self.lr if lr is None else lr
        R = self.R
        if self.wd:
            g = g + self.wd * w
        self.b = self.mom * self.b + g
        w_new = w - lr * self.b
        if self.d > 1:
            x1, x2 = w, w_new
            self.b = (dot(x1, x2, R) * self.b - dot(self.b, x2, R) * x1) / dot(
                x2, x2, R
            )
        return w_new
