"""Float64 NumPy re-implementation of docs/algorithms.md#cayley-sgd-and-cayley-adam:
Cayley SGD and Cayley Adam (Li, Fuxin & Todorovic) on the Stiefel manifold.

Written from the specification, step by step and in its order of operations, in
the original's own layout: a kernel is the matrix ``X`` of shape ``(p, n)`` whose
rows are the units, ``X = K.reshape(-1, out).T`` for a Flax kernel ``K``. The
skew-symmetric ``n x n`` direction is formed explicitly, as the original does. It
shares no code with riemax.

The re-orthonormalisation by QR fires on the steps ``k, 2k, ...`` (``qr_every``;
the first step is 1), the deterministic schedule riemax offers instead of the
original's random draw.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-8


def to_rows(w):
    """The ``(p, n)`` matrix of a Flax kernel: one row per unit."""
    return w.reshape(-1, w.shape[-1]).T


def to_kernel(x, shape):
    return x.T.reshape(shape)


def unit_rows(x):
    return x / (np.sqrt(np.sum(x * x, axis=1, keepdims=True)) + EPS)


def qr(x):
    """Orthonormal rows: reduced QR of ``x.T``, Q's columns signed by diag(R)."""
    q, r = np.linalg.qr(x.T, mode="reduced")
    return (q * np.sign(np.diag(r))[None, :]).T


def norm1(w):
    """The induced 1-norm: the largest absolute column sum."""
    return float(np.max(np.sum(np.abs(w), axis=0)))


def skew(m, u):
    """The skew-symmetric ``n x n`` direction of the tangent candidate ``m (n, p)``
    at ``u (p, n)``."""
    w_hat = m @ u - 0.5 * u.T @ (u @ m @ u)
    return w_hat - w_hat.T


def cayley_loop(xt, w, s, alpha, iterations):
    """Fixed-point iteration of ``Y = Xt + alpha W (Xt + Y) / 2`` from
    ``Xt + alpha S``."""
    y = xt + alpha * s
    for _ in range(iterations):
        y = xt + alpha * (w @ (0.5 * (xt + y)))
    return y


class CayleySGD:
    """One kernel. ``keep_momentum=False`` (the original's code): the buffer is
    never written and stays zero; ``True`` (the paper): it becomes ``W U^T``."""

    def __init__(
        self,
        w0,
        lr,
        momentum=0.9,
        keep_momentum=False,
        iterations=5,
        start="raw",
        qr_every=101,
    ):
        p, n = to_rows(w0).shape
        self.lr, self.momentum = lr, momentum
        self.keep_momentum, self.iterations = keep_momentum, iterations
        self.start, self.qr_every = start, qr_every
        self.buf = np.zeros((n, p))
        self.t = 0

    def step(self, w, g, lr=None):
        lr = self.lr if lr is None else lr
        self.t += 1
        x, gx = to_rows(w), to_rows(g)
        u = unit_rows(x)
        if self.qr_every and self.t % self.qr_every == 0:
            u = qr(u)
        v = self.momentum * self.buf - gx.T
        wd = skew(v, u)
        alpha = min(lr, 1.0 / (norm1(wd) + EPS))
        s = v if self.start == "raw" else wd @ u.T
        y = cayley_loop(u.T, wd, s, alpha, self.iterations)
        if self.keep_momentum:
            self.buf = wd @ u.T
        return to_kernel(y.T, w.shape)


class CayleyAdam:
    """One kernel: ``m`` of the kernel's size, one scalar ``v``, and the powers
    of ``b1``, ``b2`` kept as running products."""

    def __init__(
        self,
        w0,
        lr,
        b1=0.9,
        b2=0.99,
        eps=1e-8,
        iterations=5,
        start="raw",
        qr_every=101,
    ):
        p, n = to_rows(w0).shape
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.iterations, self.start, self.qr_every = iterations, start, qr_every
        self.m = np.zeros((n, p))
        self.v = 0.0
        self.b1_t, self.b2_t = b1, b2
        self.t = 0

    def step(self, w, g, lr=None):
        lr = self.lr if lr is None else lr
        self.t += 1
        x, gx = to_rows(w), to_rows(g)
        u = unit_rows(x)
        if self.qr_every and self.t % self.qr_every == 0:
            u = qr(u)
        m = self.b1 * self.m + (1 - self.b1) * gx.T
        v = self.b2 * self.v + (1 - self.b2) * float(np.sum(gx * gx))
        m_hat = m / (1 - self.b1_t)
        v_hat = v / (1 - self.b2_t)
        r = np.sqrt(v_hat + self.eps)
        wd = skew(m_hat, u) / r
        alpha = min(lr, 1.0 / (norm1(wd) + EPS))
        s = m if self.start == "raw" else wd @ u.T
        y = cayley_loop(u.T, wd, s, -alpha, self.iterations)
        self.m = (wd @ u.T) * r * (1 - self.b1_t)
        self.v = v
        self.b1_t *= self.b1
        self.b2_t *= self.b2
        return to_kernel(y.T, w.shape)
