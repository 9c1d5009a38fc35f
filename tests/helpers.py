"""Shared test helpers: float64 scope, toy problems and driving loops."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

SHAPES = {"conv": (3, 3, 4, 8), "dense": (16, 6)}


@contextlib.contextmanager
def jax_config(name, value):
    """Sets a jax config flag inside the block and restores the previous value."""
    old = jax.config.read(name)
    jax.config.update(name, value)
    try:
        yield
    finally:
        jax.config.update(name, old)


def x64():
    """Enables float64 inside the block."""
    return jax_config("jax_enable_x64", True)


def fast_compile():
    """Skips most XLA optimisations: tiny test models compile several times faster."""
    return jax_config("jax_disable_most_optimizations", True)


def unit_np(w):
    n = np.sqrt(np.sum(w * w, axis=tuple(range(w.ndim - 1)), keepdims=True))
    return w / n


def init_params(seed=0, shapes=SHAPES, on_sphere=True):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        w = rng.standard_normal(shape)
        out[name] = unit_np(w) if on_sphere and len(shape) > 1 else w
    return out


class GradientField:
    """G_k(w) = R_k * s + 0.5 w: a fixed random field per step plus a pull on w.

    Per-unit scales ``s`` span three decades so that a 0.1 clip is active on
    some units and not on others.
    """

    def __init__(self, shapes, steps, seed=1, scale=1.0):
        rng = np.random.default_rng(seed)
        self.r = {
            k: [rng.standard_normal(s) for _ in range(steps)] for k, s in shapes.items()
        }
        self.s = {k: scale * np.logspace(-2.5, 0.5, s[-1]) for k, s in shapes.items()}

    def __call__(self, k, params):
        return {
            name: self.r[name][k] * self.s[name] + 0.5 * np.asarray(w, np.float64)
            for name, w in params.items()
        }


def run_riemax(tx, params0, field, steps, dtype):
    """Runs ``steps`` jitted updates; gradients come from ``field`` at the iterate."""
    params = {k: jnp.asarray(v, dtype) for k, v in params0.items()}
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for k in range(steps):
        grads = {n: jnp.asarray(g, dtype) for n, g in field(k, params).items()}
        params, state = step(params, state, grads)
    return {k: np.asarray(v, np.float64) for k, v in params.items()}, state


def run_reference(make_opt, params0, field, steps, lr_at=None):
    """Runs one reference optimizer per leaf (``make_opt(name, w0)``)."""
    params = {k: np.asarray(v, np.float64) for k, v in params0.items()}
    opts = {k: make_opt(k, v) for k, v in params.items()}
    for k in range(steps):
        grads = field(k, params)
        lr = None if lr_at is None else lr_at(k)
        params = {n: opts[n].step(params[n], grads[n], lr) for n in params}
    return params


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


def unit_norms(w):
    w = np.asarray(w, np.float64)
    return np.sqrt(np.sum(w * w, axis=tuple(range(w.ndim - 1))))
