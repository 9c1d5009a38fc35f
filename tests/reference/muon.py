"""Float64 NumPy re-implementation of docs/algorithms.md#manifold-muon-and-hyperspherical-descent:
the Polar Express matrix sign, manifold Muon with its dual ascent, hyperspherical
descent and their start projections.

Written from the specification, step by step and in its order of operations,
with the dual ascent as a Python loop that stops as soon as its test passes. It
shares no code with riemax. Kernels are in Flax layout: the matrix of a kernel is
``w.reshape(-1, out)``.
"""

from __future__ import annotations

import numpy as np

COEFFICIENTS = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
SAFETY = 1.01


def coefficients():
    out = []
    for i, (a, b, c) in enumerate(COEFFICIENTS):
        if i < len(COEFFICIENTS) - 1:
            a, b, c = a / SAFETY, b / SAFETY**3, c / SAFETY**5
        out.append((a, b, c))
    return out


def msign(g, steps=10):
    """The Polar Express matrix sign of one matrix, in float64."""
    x = np.array(g, dtype=np.float64)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    with np.errstate(invalid="ignore", divide="ignore"):
        x = x / (np.linalg.norm(x) * SAFETY)
    table = coefficients()
    eye = np.eye(x.shape[0])
    for k in range(steps):
        a, b, c = table[min(k, len(table) - 1)]
        s = x @ x.T
        y = c * s + b * eye
        y = y @ s + a * eye
        x = y @ x
    x = np.nan_to_num(x)
    return x.T if transposed else x


def polar(g):
    """The exact polar factor U V^T of a thin SVD."""
    u, _, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
    return u @ vt


def dual_ascent(w, g, steps=100, alpha=0.01, tol=1e-6, msign_steps=10):
    """The tangent direction A of one manifold-Muon step on a tall matrix, and
    the number of dual iterations run (the stopping one included)."""
    lam = -0.25 * (w.T @ g + g.T @ w)
    a = None
    for k in range(steps):
        a = msign(g + 2 * w @ lam, msign_steps)
        h = w.T @ a + a.T @ w
        if np.linalg.norm(h) / np.sqrt(h.size) < tol:
            return a, k + 1
        lam = lam - alpha * (1 - k / steps) * h
    return a, steps


def manifold_muon_step(w, g, lr, steps=100, alpha=0.01, tol=1e-6, msign_steps=10):
    """One manifold-Muon step on a Flax kernel; returns the new kernel and the
    number of dual iterations."""
    shape = w.shape
    w = np.asarray(w, np.float64).reshape(-1, shape[-1])
    g = np.asarray(g, np.float64).reshape(-1, shape[-1])
    transposed = w.shape[0] < w.shape[1]
    if transposed:
        w, g = w.T, g.T
    a, used = dual_ascent(w, g, steps, alpha, tol, msign_steps)
    new = msign(w - lr * a, msign_steps)
    if transposed:
        new = new.T
    return new.reshape(shape), used


def hyperspherical_step(w, g, lr):
    """One hyperspherical-descent step: the whole tensor is one point."""
    shape = w.shape
    w = np.asarray(w, np.float64).reshape(-1)
    g = np.asarray(g, np.float64).reshape(-1)
    a = g - w * np.dot(w, g)
    a = a / (np.linalg.norm(a) + 1e-12)
    w = w - lr * a
    w = w / np.linalg.norm(w)
    return w.reshape(shape)


def msign_start(w, msign_steps=10):
    """Manifold Muon's start: one step with G = 0 and lr = 0, i.e. msign(W)."""
    shape = w.shape
    return msign(np.asarray(w, np.float64).reshape(-1, shape[-1]), msign_steps).reshape(
        shape
    )


def normalize_start(w):
    w = np.asarray(w, np.float64)
    return w / np.linalg.norm(w)
