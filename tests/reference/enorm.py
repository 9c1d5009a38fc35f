"""Float64 NumPy reference of one ENorm cycle (docs/algorithms.md#enorm-cycle), Flax layout.

Written from the specification only, independently of ``riemax/_enorm.py``.
Kernels are dense ``(in, out)`` or conv ``(kh, kw, in, out)``; the hidden unit ``j``
between layers ``i-1`` and ``i`` is column ``j`` (last axis) of ``W[i-1]`` and row
``j`` (axis -2) of ``W[i]``. A unit whose incoming or outgoing norm is zero gets
the balancer 1.
"""

from __future__ import annotations

import numpy as np


def unit_norms_in(w: np.ndarray, p: float = 2.0) -> np.ndarray:
    """Norm of each column ``w[..., j]`` (the weights that produce unit ``j``)."""
    cols = np.moveaxis(np.asarray(w, np.float64), -1, 0).reshape(w.shape[-1], -1)
    return _vector_norms(cols, p)


def unit_norms_out(w: np.ndarray, p: float = 2.0) -> np.ndarray:
    """Norm of each row ``w[..., i, :]`` (the weights that read input unit ``i``)."""
    rows = np.moveaxis(np.asarray(w, np.float64), -2, 0).reshape(w.shape[-2], -1)
    return _vector_norms(rows, p)


def _vector_norms(m: np.ndarray, p: float) -> np.ndarray:
    if np.isinf(p):
        return np.abs(m).max(axis=1)
    return (np.abs(m) ** p).sum(axis=1) ** (1.0 / p)


def reference_cycle(kernels, *, c=1.0, p=2.0, stale=True, momenta=None, biases=None):
    """One cycle; returns new lists ``(kernels, momenta, biases)`` in float64."""
    w = [np.array(k, dtype=np.float64) for k in kernels]
    m = (
        None
        if momenta is None
        else [None if x is None else np.array(x, dtype=np.float64) for x in momenta]
    )
    b = (
        None
        if biases is None
        else [None if x is None else np.array(x, dtype=np.float64) for x in biases]
    )
    n = len(w)
    if n < 3:
        return w, m, b
    a_norm = unit_norms_in(w[0], p)
    b_norm = unit_norms_out(w[1], p)
    for i in range(1, n - 1):
        safe = (a_norm > 0) & (b_norm > 0)
        s = np.ones_like(a_norm)
        s[safe] = np.sqrt(b_norm[safe] / (c * a_norm[safe]))
        inv = 1.0 / s
        if stale:
            a_norm = unit_norms_in(w[i], p)
        if i + 1 < n:
            b_norm = unit_norms_out(w[i + 1], p)
        # Producing side: column j of W[i-1] times s_j.
        w[i - 1] = w[i - 1] * s
        # Reading side: row j of W[i] times 1/s_j.
        w[i] = np.swapaxes(np.swapaxes(w[i], -2, -1) * inv, -2, -1)
        if not stale:
            a_norm = unit_norms_in(w[i], p)
        if m is not None:
            if m[i - 1] is not None:
                m[i - 1] = m[i - 1] * inv
            if m[i] is not None:
                m[i] = np.swapaxes(np.swapaxes(m[i], -2, -1) * s, -2, -1)
        if b is not None and b[i - 1] is not None:
            b[i - 1] = b[i - 1] * s
    return w, m, b


def weighted_objective(kernels, c=1.0) -> float:
    """``sum_k c^(-2k) ||W_k||_F^2`` over all kernels."""
    return float(
        sum(
            c ** (-2 * k) * np.sum(np.asarray(w, np.float64) ** 2)
            for k, w in enumerate(kernels)
        )
    )
