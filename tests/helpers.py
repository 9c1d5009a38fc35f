"""Shared test helpers: the registry of optimizers under test, float64 scope, toy
problems and driving loops."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import riemax

SHAPES = {"conv": (3, 3, 4, 8), "dense": (16, 6)}

#: The runner's smallest real run: the digits set through a two-stage VGG of
#: widths 4 and 8, four steps of 16 images, quiet (``train_and_evaluate`` tests).
TINY_RUN = {
    "dataset": "digits",
    "widths": [4, 8],
    "convs_per_stage": 1,
    "steps": 4,
    "batch_size": 16,
    "log_every": 2,
    "eval_every": 4,
    "checkpoint_every": 4,
    "progress": False,
}


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


def fewer_by_default(cases, keep):
    """Parametrisation in which the cases whose id (or value) contains one of
    ``keep`` run by default and the others only in the slow run (``-m slow``)."""
    out = []
    for c in cases:
        values, cid = (c.values, c.id) if hasattr(c, "values") else ((c,), str(c))
        hit = any(k in cid for k in keep)
        out.append(pytest.param(*values, id=cid, marks=() if hit else pytest.mark.slow))
    return out


def full_compile():
    """XLA's whole optimisation pipeline, for checks of the compiled program."""
    return jax_config("jax_disable_most_optimizations", False)


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


#: A conv and a dense kernel and a bias: the trees of the optimizers that run on
#: every leaf.
LEAF_SHAPES = {"conv": (3, 3, 4, 8), "dense": (16, 6), "bias": (6,)}


def unit_dot(a, b):
    """Per-unit inner products, kept as a ``(1, ..., 1, units)`` array."""
    return np.sum(a * b, axis=tuple(range(a.ndim - 1)), keepdims=True)


def cycling_gradient(k, w, kind=None):
    """Step ``k``'s gradient at ``w``, cycling through three kinds for kernels:

    * ``tangent``: orthogonal to every unit up to 1e-4 noise (the channel view
      of the SGDP/AdamP test fires);
    * ``balanced``: a radial part of alternating sign per unit, so every unit
      fails the channel view but the radial parts cancel over the tensor (the
      layer view fires);
    * ``radial``: a plain random direction plus half the params (nothing fires).
    """
    w = np.asarray(w, np.float64)
    g = np.random.default_rng(1000 + k).standard_normal(w.shape)
    if w.ndim < 2:
        return g
    kind = kind or ("tangent", "balanced", "radial")[k % 3]
    ww = unit_dot(w, w)
    tangent = g - w * unit_dot(g, w) / ww
    if kind == "tangent":
        return tangent + 1e-4 * g
    if kind == "radial":
        return g + 0.5 * w
    # <g_j, w_j> = +-c, about half of |g_j| |w_j| on every unit, summing to 0.
    sign = np.where(np.arange(w.shape[-1]) % 2 == 0, 1.0, -1.0)
    c = 0.5 * np.mean(np.sqrt(unit_dot(tangent, tangent) * ww))
    return tangent + c * w * sign / ww


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


# ----------------------------------------------------------------- the registry


def sgdg_chain(learning_rate, momentum=0.9, grad_clip=0.1, omega=0.1, unit_eps=1e-8):
    """SGD-G as the explicit chain of the composable transforms."""
    return optax.chain(
        riemax.ortho_penalty(omega, unit_eps=unit_eps),
        riemax.grassmann_project(unit_eps),
        riemax.clip_tangent_norm(grad_clip),
        optax.scale_by_learning_rate(learning_rate),
        riemax.transported_momentum(momentum, unit_eps=unit_eps),
        riemax.exp_map_update(unit_eps),
    )


def adamg_chain(
    learning_rate, b1=0.9, b2=0.99, eps=1e-8, grad_clip=0.1, omega=0.1, unit_eps=1e-8
):
    """Adam-G as the explicit chain of the composable transforms."""
    return optax.chain(
        riemax.ortho_penalty(omega, unit_eps=unit_eps),
        riemax.grassmann_project(unit_eps),
        riemax.clip_tangent_norm(grad_clip),
        riemax.spherical_adam(
            b1, b2, eps, learning_rate=learning_rate, unit_eps=unit_eps
        ),
        riemax.exp_map_update(unit_eps),
    )


def rotational_adamw(
    learning_rate,
    weight_decay=0.01,
    *,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    zero_mean=True,
    decay=0.9,
):
    """The rotational wrapper around Adam (``b1``, ``b2``, ``eps`` are Adam's, as in
    the runner's table) at AdamW's equilibrium rate.

    ``eps_root`` keeps ``jax.grad`` through optax's Adam finite where a gradient
    element is exactly zero (the derivative of its square root is infinite at 0),
    so that the batteries check the wrapper, not optax.
    """
    rate = riemax.equilibrium_rate("adamw", learning_rate, weight_decay, b1=b1, b2=b2)
    return riemax.rotational(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=1e-30),
        rate,
        zero_mean=zero_mean,
        decay=decay,
    )


def rotational_sgdm(
    learning_rate,
    weight_decay=1e-4,
    momentum=0.9,
    *,
    zero_mean=True,
    decay=0.9,
    eps=1e-8,
):
    """The rotational wrapper around heavy-ball momentum at SGDM's rate."""
    rate = riemax.equilibrium_rate(
        "sgdm", learning_rate, weight_decay, momentum=momentum
    )
    return riemax.rotational(
        optax.trace(momentum), rate, zero_mean=zero_mean, decay=decay, eps=eps
    )


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """One optimizer under test.

    ``factory(learning_rate, **kwargs)`` builds it (also under
    ``optax.inject_hyperparams``); ``kernels_only`` optimizers accept kernels only
    (rank >= 2), ``units_only`` ones (kernels only too) also keep every unit on the
    sphere; ``chain`` builds the same optimizer from the composable transforms
    (``chain(learning_rate, **kwargs)``); ``family`` is its name in the runner's
    table (``experiments/optimizers/``) where the entry is a variant of another
    (``tests/test_registry.py`` checks the two tables against each other).
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    lr: float
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    units_only: bool = False
    chain: Callable[..., optax.GradientTransformation] | None = None
    kernels_only: bool = False
    family: str | None = None

    @property
    def runner_name(self):
        """Its name in the runner's table."""
        return self.family or self.name

    def make(self, lr=None, **overrides):
        lr = self.lr if lr is None else lr
        return self.factory(lr, **{**self.kwargs, **overrides})

    def make_chain(self, lr=None, **overrides):
        lr = self.lr if lr is None else lr
        return self.chain(lr, **{**self.kwargs, **overrides})

    def injected(self, lr=None, chain=False, **overrides):
        """Under ``optax.inject_hyperparams`` (the chain form with ``chain``)."""
        lr = self.lr if lr is None else lr
        factory = self.chain if chain else self.factory
        kwargs = {**self.kwargs, **overrides}
        return optax.inject_hyperparams(factory)(learning_rate=lr, **kwargs)


#: Every named optimizer, with the learning rate of its paper's CIFAR runs.
OPTIMIZERS = {
    o.name: o
    for o in [
        Optimizer(
            "sgdg",
            riemax.sgdg,
            0.2,
            units_only=True,
            kernels_only=True,
            chain=sgdg_chain,
        ),
        Optimizer(
            "adamg",
            riemax.adamg,
            0.05,
            units_only=True,
            kernels_only=True,
            chain=adamg_chain,
        ),
        Optimizer("adams", riemax.adams, 1e-2, {"weight_decay": 1e-4}),
        Optimizer("adamsrt", riemax.adamsrt, 1e-2, {"weight_decay": 1e-4}),
        Optimizer("sgdmrt", riemax.sgdmrt, 0.1, {"weight_decay": 1e-4}),
        Optimizer("adamp", riemax.adamp, 1e-3, {"weight_decay": 1e-2}),
        Optimizer("sgdp", riemax.sgdp, 0.1, {"momentum": 0.9, "weight_decay": 1e-4}),
        Optimizer(
            "sgdp-nesterov",
            riemax.sgdp,
            0.1,
            {"momentum": 0.9, "weight_decay": 1e-5, "nesterov": True},
            family="sgdp",
        ),
        Optimizer("nero", riemax.nero, 0.01),
        # The wrappers take the rate from the learning rate and weight decay, so
        # that the learning rate is the first argument (and is what is checked).
        Optimizer(
            "rotational-adamw",
            rotational_adamw,
            0.05,
            {"weight_decay": 0.01},
            kernels_only=True,
        ),
        Optimizer(
            "rotational-sgdm",
            rotational_sgdm,
            0.5,
            {"weight_decay": 1e-4},
            kernels_only=True,
        ),
        # The Stiefel and sphere optimizers that keep the weights themselves on
        # their manifold (the runner puts them there once, riemax.to_manifold),
        # at their sources' manifold rates.
        Optimizer("cayley-sgd", riemax.cayley_sgd, 0.8, kernels_only=True),
        Optimizer("cayley-adam", riemax.cayley_adam, 0.5, kernels_only=True),
        Optimizer("manifold-muon", riemax.manifold_muon, 0.1, kernels_only=True),
        Optimizer("hyperspherical", riemax.hyperspherical_descent, 0.1),
    ]
}

#: The optimizers that keep every unit on the sphere.
SPHERE_OPTIMIZERS = {k: o for k, o in OPTIMIZERS.items() if o.units_only}

#: The optimizers that take kernels only (a bias goes to ``riemax.hybrid``).
KERNEL_OPTIMIZERS = {k: o for k, o in OPTIMIZERS.items() if o.kernels_only}
