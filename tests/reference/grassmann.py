"""Float64 NumPy re-implementation of the update rules in docs/algorithms.md (sphere geometry, SGD-G and Adam-G):
the per-unit sphere primitives, SGD-G and Adam-G (Cho & Lee), and the Euclidean
companion of their hybrid.

Written from the specification, step by step and in its order of operations, with
the state stored where the original implementations store it. It shares no code
with riemax. Kernels are in Flax layout: a unit is ``w[..., j]``.
"""

from __future__ import annotations

import numpy as np

EPS_U = 1e-8


def _axes(w):
    return tuple(range(w.ndim - 1))


def dot(a, b, axes=None):
    axes = _axes(a) if axes is None else axes
    return np.sum(a * b, axis=axes, keepdims=True)


def nrm(a, axes=None):
    return np.sqrt(dot(a, a, axes))


# Primitives ---------------------------------------------------------------------


def unit(w, eps):
    n = nrm(w)
    return w / (n + eps), n


def proj(y, g):
    return g - dot(y, g) * y


def expmap(y, h, eps):
    theta = nrm(h)
    u = h / (theta + eps)
    return np.cos(theta) * y + np.sin(theta) * u


def transport(y, xi, h, eps):
    theta = nrm(h)
    u = h / (theta + eps)
    return xi - dot(u, xi) * (np.sin(theta) * y + (1 - np.cos(theta)) * u)


def transport_self(y, h, eps):
    theta = nrm(h)
    u = h / (theta + eps)
    return theta * (np.cos(theta) * u - np.sin(theta) * y)


def clip(h, nu):
    n = nrm(h)
    scale = np.where(n > nu, nu / np.where(n > 0, n, 1), 1.0)
    return h * scale


def ortho_grad(y, omega):
    m = y.reshape(-1, y.shape[-1])
    return (2 * omega * (m @ (m.T @ m) - m)).reshape(y.shape)


# SGD-G ------------------------------------------------------------------------


class SGDG:
    def __init__(self, w, lr, momentum=0.9, grad_clip=0.1, omega=0.1, eps=EPS_U):
        self.lr, self.mom, self.nu, self.omega, self.eps = (
            lr,
            momentum,
            grad_clip,
            omega,
            eps,
        )
        self.tau = np.zeros_like(w)

    def step(self, w, g, lr=None):
        lr = self.lr if lr is None else lr
        y, _ = unit(w, self.eps)
        if self.omega:
            g = g + ortho_grad(y, self.omega)
        h = proj(y, g)
        if self.nu is not None:
            h = clip(h, self.nu)
        d = self.mom * self.tau - lr * h
        w_new = expmap(y, d, self.eps)
        self.tau = transport_self(y, d, self.eps)
        return w_new


# Adam-G -----------------------------------------------------------------------


class AdamG:
    def __init__(
        self, w, lr, b1=0.9, b2=0.99, eps=1e-8, grad_clip=0.1, omega=0.1, unit_eps=EPS_U
    ):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.nu, self.omega, self.ueps = grad_clip, omega, unit_eps
        self.m = np.zeros_like(w)
        self.v = np.zeros((1,) * (w.ndim - 1) + w.shape[-1:])
        self.p1, self.p2 = b1, b2

    def step(self, w, g, lr=None):
        lr = self.lr if lr is None else lr
        y, _ = unit(w, self.ueps)
        if self.omega:
            g = g + ortho_grad(y, self.omega)
        h = proj(y, g)
        if self.nu is not None:
            h = clip(h, self.nu)
        self.m = self.b1 * self.m + (1 - self.b1) * h
        self.v = self.b2 * self.v + (1 - self.b2) * dot(h, h)
        alpha = np.sqrt(1 - self.p2) / (1 - self.p1)
        delta = (self.m / np.sqrt(self.v + self.eps)) * (-alpha * lr)
        w_new = expmap(y, delta, self.ueps)
        self.m = transport(y, self.m, delta, self.ueps)
        self.p1 *= self.b1
        self.p2 *= self.b2
        return w_new


# Euclidean companion: TF Nesterov momentum with the L2 term in the gradient ---


class NesterovSGD:
    def __init__(self, w, lr, momentum=0.9, weight_decay=0.0):
        self.lr, self.mom, self.wd = lr, momentum, weight_decay
        self.b = np.zeros_like(w)

    def step(self, w, g, lr=None):
        lr = self.lr if lr is None else lr
        g = g + self.wd * w
        self.b = self.mom * self.b + g
        return w - lr * (g + self.mom * self.b)
