"""What optax survives, riemax survives: extreme magnitudes, every step angle,
zero and tiny units, low precision, and training on after a gradient spike.

Property tests (hypothesis) over the registry of named optimizers and, for SGD-G
and Adam-G, their chains of composable transforms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import OPTIMIZERS, SPHERE_OPTIMIZERS, unit_norms, x64
from hypothesis import given, settings
from hypothesis import strategies as st

import riemax
from riemax import sphere

SETTINGS = settings(max_examples=8)
SHAPE = (3, 3, 4, 6)
DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def unit_rand(seed, shape=SHAPE):
    w = np.random.default_rng(seed).standard_normal(shape)
    return w / np.sqrt(np.sum(w * w, axis=tuple(range(w.ndim - 1)), keepdims=True))


def rand(seed, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape)


def forms(name):
    """The named optimizer and, for SGD-G/Adam-G, its chain (same arguments)."""
    o = OPTIMIZERS[name]
    out = {name: o.make}
    if o.chain is not None:
        out[f"{name} chain"] = o.make_chain
    return out


ALL_FORMS = {k: v for name in OPTIMIZERS for k, v in forms(name).items()}


@jax.jit
def _finite(tree):
    return jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x.astype(jnp.float32))) for x in tree])
    )


def all_finite(tree):
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_finite(leaves)) if leaves else True  # e.g. a state of counts only


@functools.cache
def _jitted(tx):
    return jax.jit(tx.update)


@functools.cache
def cached(name, **kwargs):
    """One transform per (form, arguments): examples reuse its compiled step."""
    return ALL_FORMS[name](**kwargs)


@functools.cache
def _grad_through_update(tx):
    def loss(w, g, state):
        updates, _ = tx.update(g, state, w)
        return jnp.sum(optax.apply_updates(w, updates).astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def run(tx, w, grads):
    """Steps ``tx`` (jitted) through ``grads`` from ``w``; returns (ws, updates, states)."""
    state = tx.init(w)
    step = _jitted(tx)
    ws, ups, states = [w], [], []
    for g in grads:
        updates, state = step(g, state, w)
        w = optax.apply_updates(w, updates)
        ws.append(w)
        ups.append(updates)
        states.append(state)
    return ws, ups, states


# ------------------------------------------------------------------ magnitudes


@SETTINGS
@given(
    name=st.sampled_from(sorted(ALL_FORMS)),
    log_g=st.one_of(st.just(None), st.floats(-30.0, 38.0)),
    seed=st.integers(0, 2**16),
)
def test_any_finite_gradient_gives_finite_updates_and_params(name, log_g, seed):
    """From 0 to 1e38 per element: updates, params and (where optax.adam's state
    is finite, |g| < 1.8e19) state are finite; units stay on the sphere."""
    scale = 0.0 if log_g is None else 10.0**log_g
    w = jnp.asarray(unit_rand(seed), jnp.float32)
    g = jnp.asarray(np.clip(rand(seed + 1) * scale, -3e38, 3e38), jnp.float32)
    ws, ups, states = run(cached(name), w, [g, g * 0.5])
    assert all_finite(ups) and all_finite(ws), (name, scale)
    if scale < 1.8e19:
        assert all_finite(states), (name, scale)
    if name.split()[0] in SPHERE_OPTIMIZERS:
        np.testing.assert_allclose(unit_norms(ws[-1]), 1.0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL_FORMS))
def test_state_stays_finite_where_optax_adam_state_does(name):
    """At 1e19 per element optax.adam's state is finite (g**2 = 1e38): so is
    riemax's, whose per-unit second moments are stored per element."""
    w = jnp.asarray(unit_rand(0), jnp.float32)
    g = jnp.full(SHAPE, 1e19, jnp.float32) * jnp.asarray(np.sign(rand(1)), jnp.float32)
    adam_state = optax.adam(1e-3).update(g, optax.adam(1e-3).init(w), w)[1]
    assert all_finite(adam_state)
    make = ALL_FORMS[name]
    kwargs = {"grad_clip": None} if name.split()[0] in SPHERE_OPTIMIZERS else {}
    _, ups, states = run(make(**kwargs), w, [g, -g])
    assert all_finite(states) and all_finite(ups)


# ------------------------------------------------------------------ step angles


def tangent(w, seed):
    return np.asarray(sphere.project(jnp.asarray(w), jnp.asarray(rand(seed))))


@functools.cache
def injected(name, chain, **static):
    """The optimizer under inject_hyperparams: the learning rate is in the state,
    so examples with different learning rates share one compilation."""
    return OPTIMIZERS[name].injected(1.0, chain=chain, **static)


def run_at(tx, lr, w, grads):
    state = tx.init(w)
    state.hyperparams["learning_rate"] = jnp.asarray(
        lr, state.hyperparams["learning_rate"].dtype
    )
    step = _jitted(tx)
    ws = [w]
    for g in grads:
        updates, state = step(g, state, w)
        w = optax.apply_updates(w, updates)
        ws.append(w)
    return ws


@SETTINGS
@given(
    theta=st.floats(0.0, 2 * np.pi),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_sgdg_at_every_step_angle(theta, seed, dtype):
    """A first step that turns every unit by theta in [0, 2 pi], then two steps
    with the momentum carried: units stay at norm 1 (1e-6 in float32) and the
    one-pass step equals the chain (1e-5), for the originals' unit_eps and for
    exact geometry."""
    lr = 0.5
    w0 = unit_rand(seed)
    t = tangent(w0, seed + 1)
    g0 = -t / unit_norms(t) * theta / lr  # h = g0 (tangent): d = -lr g0
    grads = [g0, rand(seed + 2) * 0.1, rand(seed + 3) * 0.1]
    static = {"grad_clip": None, "omega": 0.0}
    with x64() if dtype == "float64" else _nothing():
        w = jnp.asarray(w0, dtype)
        gs = [jnp.asarray(g, dtype) for g in grads]
        for unit_eps in (1e-8, 0.0):
            a = run_at(injected("sgdg", False, unit_eps=unit_eps, **static), lr, w, gs)
            b = run_at(injected("sgdg", True, unit_eps=unit_eps, **static), lr, w, gs)
            for x, y in zip(a[1:], b[1:], strict=True):
                np.testing.assert_allclose(unit_norms(x), 1.0, atol=1e-6)
                np.testing.assert_allclose(unit_norms(y), 1.0, atol=1e-6)
                np.testing.assert_allclose(x, y, atol=1e-5)
        # The first step turned each unit by theta (mod 2 pi).
        cos = np.sum(np.asarray(a[1], np.float64) * w0, axis=(0, 1, 2))
        np.testing.assert_allclose(cos, np.cos(theta), atol=1e-5)


@SETTINGS
@given(theta=st.floats(1e-3, 2 * np.pi), seed=st.integers(0, 2**16))
def test_adamg_at_every_step_angle(theta, seed):
    """Adam-G's first step turns each unit by the learning rate: lr = theta."""
    w = jnp.asarray(unit_rand(seed), jnp.float32)
    gs = [jnp.asarray(rand(seed + k), jnp.float32) for k in range(1, 4)]
    static = {"grad_clip": None, "omega": 0.0}
    a = run_at(injected("adamg", False, **static), theta, w, gs)
    b = run_at(injected("adamg", True, **static), theta, w, gs)
    cos = np.sum(np.asarray(a[1], np.float64) * np.asarray(w), axis=(0, 1, 2))
    np.testing.assert_allclose(cos, np.cos(theta), atol=1e-4)
    for x, y in zip(a[1:], b[1:], strict=True):
        np.testing.assert_allclose(unit_norms(x), 1.0, atol=1e-6)
        np.testing.assert_allclose(x, y, atol=1e-5)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_quarter_turn_step_carries_the_momentum_exactly():
    """At exactly a quarter turn the projection of the previous step vanishes; the
    stored form still gives the parallel transport (here: the momentum points back
    to the starting point)."""
    with x64():
        y = jnp.asarray(unit_rand(4))
        d = jnp.asarray(tangent(np.asarray(y), 5))
        d = d / jnp.asarray(unit_norms(d)) * (np.pi / 2)
        tx = riemax.transported_momentum(1.0, unit_eps=0.0)
        _, state = tx.update(d, tx.init(y), y)
        y1 = sphere.expmap(y, d, 0.0)
        tau, _ = tx.update(jnp.zeros_like(y), state, y1)
        np.testing.assert_allclose(tau, -(np.pi / 2) * y, atol=1e-12)


# ------------------------------------------------------- zero, tiny, dtypes


@SETTINGS
@given(
    name=st.sampled_from(sorted(ALL_FORMS)),
    log_tiny=st.floats(-37.0, -3.0),
    dtype=st.sampled_from(sorted(DTYPES)),
    seed=st.integers(0, 2**16),
)
def test_zero_and_tiny_units_in_every_dtype(name, log_tiny, dtype, seed):
    """A zero unit, a tiny unit and normal units, in float32/bf16/fp16: no NaN in
    values or gradients; with exact geometry every non-zero unit lands on the
    sphere, the tiny one included (its norm is computed on a scaled copy).

    The gradient through the update is checked with the tiny unit at 1e-12 or
    larger: second derivatives of a scale-invariant step grow like 1/|w|^2, which
    leaves the float32 range below |w| ~ 1e-18.
    """
    dt = DTYPES[dtype]
    tiny = max(10.0**log_tiny, float(jnp.finfo(dt).tiny) * 1e3)
    w = unit_rand(seed)
    w[..., 0] = 0.0
    w[..., 1] *= tiny
    w = jnp.asarray(w, dt)
    g = jnp.asarray(rand(seed + 1), dt)
    base = name.split()[0]
    kw = {"unit_eps": 0.0} if base in SPHERE_OPTIMIZERS else {}
    tx = cached(name, **kw)
    ws, ups, states = run(tx, w, [g, g])
    assert all_finite(ws) and all_finite(ups) and all_finite(states)
    if base in SPHERE_OPTIMIZERS:
        norms = unit_norms(np.asarray(ws[-1], np.float32))
        tol = 1e-5 if dt == jnp.float32 else 1e-2
        np.testing.assert_allclose(norms[1:], 1.0, atol=tol)
    w = np.array(w, np.float32)
    w[..., 1] *= max(1.0, 1e-12 / tiny)
    w = jnp.asarray(w, dt)
    gw, gg = _grad_through_update(tx)(w, g, tx.init(w))
    assert all_finite([gw, gg])


def test_float64_params_keep_float64_state_and_norms():
    with x64():
        w = jnp.asarray(unit_rand(1))
        g = jnp.asarray(rand(2))
        for name, make in ALL_FORMS.items():
            ws, _, states = run(make(), w, [g, g])
            assert ws[-1].dtype == jnp.float64
            kernels = [x for x in jax.tree.leaves(states[-1]) if x.shape == SHAPE]
            assert all(x.dtype == jnp.float64 for x in kernels), name
            if name.split()[0] in SPHERE_OPTIMIZERS:
                np.testing.assert_allclose(unit_norms(ws[-1]), 1.0, atol=1e-7)


# ----------------------------------------------------------------- recovery


@pytest.mark.parametrize("name", sorted(ALL_FORMS))
@pytest.mark.parametrize("clip", [True, False])
def test_apply_if_finite_goes_on_after_a_spike(name, clip):
    """One gradient of magnitude 1e20 or 1e38 (finite: the optimizer takes it) or
    inf (apply_if_finite skips it), then ordinary gradients: every update stays
    finite, as optax.adam's do, and the params go on moving. With the default
    clipping the state stays finite too."""
    base = name.split()[0]
    if not clip and base not in SPHERE_OPTIMIZERS:
        pytest.skip("only SGD-G and Adam-G clip")
    kw = {} if clip else {"grad_clip": None}
    tx = optax.apply_if_finite(ALL_FORMS[name](**kw), max_consecutive_errors=5)
    adam = optax.apply_if_finite(optax.adam(1e-3), max_consecutive_errors=5)
    w = jnp.asarray(unit_rand(3), jnp.float32)
    for spike in (1e20, 1e38, float("inf")):  # one compiled step serves all three
        grads = [jnp.asarray(rand(4 + k), jnp.float32) for k in range(4)]
        grads[1] = jnp.sign(grads[1]) * jnp.float32(spike)
        ws, ups, states = run(tx, w, grads)
        assert all_finite(ups) and all_finite(ws), (name, spike)
        skipped = int(states[1].total_notfinite)
        assert skipped == (1 if spike == float("inf") else 0), spike
        if skipped or (clip and base in SPHERE_OPTIMIZERS):
            assert all_finite(states[-1].inner_state), (name, spike)
            assert float(jnp.max(jnp.abs(ws[-1] - ws[-2]))) > 0
        if base in SPHERE_OPTIMIZERS:
            np.testing.assert_allclose(unit_norms(ws[-1]), 1.0, atol=1e-5)
        # The same sequence through optax.adam: its updates are finite as well.
        assert all_finite(run(adam, w, grads)[1])


def test_sgdmrt_is_finite_as_far_as_optax_sgd():
    """SGD-MRT's update is finite whenever momentum SGD's is (same buffer)."""
    w = jnp.asarray(unit_rand(5), jnp.float32)
    g = jnp.asarray(rand(6), jnp.float32) * 1e37
    ours = run(riemax.sgdmrt(0.1, channel_axes=(-1,)), w, [g, g])[1]
    theirs = run(optax.sgd(0.1, 0.9), w, [g, g])[1]
    assert all_finite(theirs) and all_finite(ours)
