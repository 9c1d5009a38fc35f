"""Invariants and edge cases of the per-unit transforms and of the named
optimizers: the sphere geometry, SGDP's buffer, Nero's scale and the rotational
wrapper's norms and rate, zero and huge units, the per-unit sums they share and
the compiled step. (Bad input is ``test_inputs.py``'s.)"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    LEAF_SHAPES,
    OPTIMIZERS,
    SPHERE_OPTIMIZERS,
    cycling_gradient,
    full_compile,
    init_params,
    unit_dot,
    unit_norms,
    x64,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import riemax
from riemax import sphere

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)

# A fixed menu of dense and conv shapes (values vary freely): compiled ops are
# reused across examples, which keeps the property tests fast on CPU.
kernel_shapes = st.sampled_from(
    [(2, 1), (5, 3), (12, 6), (1, 1, 1, 1), (3, 3, 4, 5), (2, 3, 1, 4)]
)


def rand(seed, shape, scale=1.0):
    return scale * np.random.default_rng(seed).standard_normal(shape)


def unit_rand(seed, shape):
    w = rand(seed, shape)
    return w / np.sqrt(np.sum(w * w, axis=tuple(range(w.ndim - 1)), keepdims=True))


#: The sphere primitives compiled once per shape and dtype: the property tests
#: draw many examples of a few shapes, and op-by-op dispatch would compile every
#: primitive of every call anew for each shape.
project = jax.jit(sphere.project)
expmap = jax.jit(sphere.expmap)
transport = jax.jit(sphere.transport)
transport_step = jax.jit(sphere.transport_step)


def one_step(tx, w, g):
    state = tx.init(w)
    updates, _ = tx.update(g, state, w)
    return optax.apply_updates(w, updates)


NAMED_SPHERE = {
    **{name: o.make for name, o in SPHERE_OPTIMIZERS.items()},
    "sgdg-noclip": lambda **kw: SPHERE_OPTIMIZERS["sgdg"].make(grad_clip=None, **kw),
}


# ------------------------------------------------------------------------ invariants


@SETTINGS
@given(shape=kernel_shapes, seed=st.integers(0, 2**16), log_scale=st.floats(-6, 3))
def test_updates_keep_units_on_sphere(shape, seed, log_scale):
    w = jnp.asarray(unit_rand(seed, shape), jnp.float32)
    g = jnp.asarray(rand(seed + 1, shape, 10.0**log_scale), jnp.float32)
    for name in NAMED_SPHERE:
        new = jitted_one_step(name)(w, g)
        np.testing.assert_allclose(unit_norms(new), 1.0, atol=1e-5)


@functools.cache
def jitted_one_step(name):
    """One default step of a named sphere optimizer, compiled once per shape."""
    return jax.jit(functools.partial(one_step, NAMED_SPHERE[name]()))


@functools.cache
def jitted_transported_momentum():
    tx = riemax.transported_momentum(1.0, unit_eps=0.0)
    return tx.init, jax.jit(tx.update)


@SETTINGS
@given(shape=kernel_shapes, seed=st.integers(0, 2**16), theta=st.floats(1e-3, 6.28))
def test_transported_momentum_is_tangent_and_isometric(shape, seed, theta):
    """The stored step, projected at the point it led to, is its parallel transport
    along itself (eq. 9), for every step angle up to a full turn."""
    with x64():
        y = jnp.asarray(unit_rand(seed, shape))
        d = np.asarray(project(y, jnp.asarray(rand(seed + 1, shape))))
        d = jnp.asarray(d * theta / np.maximum(unit_norms(d), 1e-300))
        init, update = jitted_transported_momentum()
        step, state = update(d, init(y), y)
        np.testing.assert_array_equal(step, d)
        y_new = expmap(y, d, 0.0)
        tau, _ = update(jnp.zeros_like(y), state, y_new)
        axes = tuple(range(y.ndim - 1))
        np.testing.assert_allclose(jnp.sum(tau * y_new, axis=axes), 0.0, atol=1e-12)
        np.testing.assert_allclose(
            unit_norms(tau), unit_norms(d), rtol=1e-12, atol=1e-14
        )
        np.testing.assert_allclose(tau, transport_step(y, d, 0.0), atol=1e-12)


@SETTINGS
@given(shape=kernel_shapes, seed=st.integers(0, 2**16), theta=st.floats(0.0, 3.0))
def test_parallel_transport_is_isometry_into_new_tangent_space(shape, seed, theta):
    with x64():
        y = jnp.asarray(unit_rand(seed, shape))
        h = project(y, jnp.asarray(rand(seed + 1, shape)))
        h = h * theta / jnp.maximum(jnp.asarray(unit_norms(h)), 1e-300)
        xi = project(y, jnp.asarray(rand(seed + 2, shape)))
        z = expmap(y, h, 0.0)
        t = transport(y, xi, h, 0.0)
        np.testing.assert_allclose(unit_norms(z), 1.0, atol=1e-12)
        np.testing.assert_allclose(
            unit_norms(t), unit_norms(xi), rtol=1e-12, atol=1e-14
        )
        axes = tuple(range(y.ndim - 1))
        np.testing.assert_allclose(jnp.sum(t * z, axis=axes), 0.0, atol=1e-12)


@SETTINGS
@given(shape=kernel_shapes, seed=st.integers(0, 2**16))
def test_exp_map_of_zero_step_is_identity(shape, seed):
    y = jnp.asarray(unit_rand(seed, shape), jnp.float32)
    np.testing.assert_array_equal(expmap(y, jnp.zeros_like(y), 0.0), y)
    np.testing.assert_allclose(_exp_map_zero_step(y), y, atol=1e-7)


@jax.jit
def _exp_map_zero_step(y):
    return one_step(riemax.exp_map_update(unit_eps=0.0), y, jnp.zeros_like(y))


@SETTINGS
@given(
    shape=kernel_shapes,
    seed=st.integers(0, 2**16),
    nu=st.floats(1e-3, 10.0),
    log_scale=st.floats(-4, 4),
)
def test_clipping_bound(shape, seed, nu, log_scale):
    h = jnp.asarray(rand(seed, shape, 10.0**log_scale), jnp.float32)
    tx = riemax.clip_tangent_norm(nu)
    out, _ = tx.update(h, tx.init(h))
    before, after = unit_norms(h), unit_norms(out)
    assert np.all(after <= nu * (1 + 1e-6))
    small = before <= nu
    np.testing.assert_array_equal(
        np.asarray(out)[..., small], np.asarray(h)[..., small]
    )
    np.testing.assert_allclose(after[~small], nu, rtol=1e-6)


def bn_loss(w, x, target):
    """A BatchNorm-fed layer: per-unit standardised outputs (exactly scale-invariant)."""
    z = x @ w.reshape(-1, w.shape[-1])
    z = z - z.mean(axis=0)
    z = z / jnp.sqrt(jnp.mean(z * z, axis=0))
    return jnp.mean((jnp.tanh(z) - target) ** 2)


@SETTINGS
@given(
    shape=kernel_shapes,
    seed=st.integers(0, 2**16),
    log_c=st.floats(-3, 3),
    name=st.sampled_from(["sgdg", "adamg"]),
    omega=st.sampled_from([0.0, 0.1]),
)
def test_trajectory_is_invariant_to_kernel_scale(shape, seed, log_c, name, omega):
    with x64():
        n = int(np.prod(shape[:-1]))
        x = jnp.asarray(rand(seed, (16, n)))
        target = jnp.asarray(rand(seed + 1, (16, shape[-1]), 0.5))
        w0 = jnp.asarray(rand(seed + 2, shape))
        grad = jax.grad(bn_loss)
        make = {"sgdg": riemax.sgdg, "adamg": riemax.adamg}[name]
        tx = make(0.1, omega=omega, unit_eps=0.0)

        @jax.jit
        def step(w, state):
            updates, state = tx.update(grad(w, x, target), state, w)
            return optax.apply_updates(w, updates), state

        def trajectory(w):
            state, out = tx.init(w), []
            for _ in range(6):
                w, state = step(w, state)
                out.append(w)
            return out

        for a, b in zip(trajectory(w0), trajectory(10.0**log_c * w0), strict=False):
            np.testing.assert_allclose(a, b, atol=1e-10)


def test_norm_drift_after_1000_steps_float32():
    shape = (3, 3, 4, 8)
    w = jnp.asarray(unit_rand(0, shape), jnp.float32)
    for tx in (riemax.sgdg(0.2), riemax.adamg(0.05)):
        state = tx.init(w)

        def body(i, carry):
            w, state = carry
            g = jax.random.normal(jax.random.fold_in(jax.random.key(0), i), shape)
            updates, state = tx.update(g, state, w)
            return optax.apply_updates(w, updates), state

        final, _ = jax.jit(lambda w, s: jax.lax.fori_loop(0, 1000, body, (w, s)))(
            w, state
        )
        np.testing.assert_allclose(unit_norms(final), 1.0, atol=1e-5)


def test_ortho_penalty_forms_agree_on_unit_kernels_and_match_autodiff():
    with x64():
        w = jnp.asarray(rand(0, (3, 3, 4, 8), 0.3))
        g = jnp.zeros_like(w)
        at_param = riemax.ortho_penalty(0.1, at="param")
        got, _ = at_param.update(g, at_param.init(w), w)
        want = jax.grad(lambda w: riemax.orthogonality_loss({"k": w}, 0.1))(w)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        u = jnp.asarray(unit_rand(1, (3, 3, 4, 8)))
        at_unit = riemax.ortho_penalty(0.1, at="unit", unit_eps=0.0)
        a, _ = at_unit.update(g, at_unit.init(u), u)
        b, _ = at_param.update(g, at_param.init(u), u)
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_orthogonality_loss_respects_labels():
    params = {"conv": {"kernel": 2 * jnp.eye(3)}, "fc": {"kernel": 3 * jnp.eye(3)}}
    labels = {"conv": {"kernel": "manifold"}, "fc": {"kernel": "euclidean"}}
    np.testing.assert_allclose(riemax.orthogonality_loss(params, 1.0, labels), 0.5 * 27)
    np.testing.assert_allclose(riemax.orthogonality_loss(params, 1.0), 0.5 * (27 + 192))


def test_unit_init_has_unit_units_and_is_truncated():
    w = riemax.unit_init(unit_eps=0.0)(jax.random.key(3), (5, 5, 32, 64))
    np.testing.assert_allclose(unit_norms(w), 1.0, atol=1e-6)
    raw = jax.random.truncated_normal(jax.random.key(3), -2.0, 2.0, (5, 5, 32, 64))
    np.testing.assert_allclose(w, raw / unit_norms(raw), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="at least 2 axes"):
        riemax.unit_init()(jax.random.key(0), (4,))


# ------------------------------------------- invariants of SGDP, Nero, rotational


def test_sgdp_projects_its_buffer_in_place_without_nesterov():
    """Without Nesterov the stored momentum loses its radial part (the original
    projects the buffer itself); with Nesterov the buffer is the plain one."""
    with x64():
        w = {
            "dense": jnp.asarray(init_params(0, LEAF_SHAPES, on_sphere=False)["dense"])
        }
        g = {"dense": jnp.asarray(cycling_gradient(0, w["dense"], "tangent"))}
        g["dense"] = g["dense"] + 0.05 * w["dense"] / unit_dot(
            np.asarray(w["dense"]), np.asarray(w["dense"])
        )
        for nesterov in (False, True):
            tx = riemax.sgdp(0.1, momentum=0.9, nesterov=nesterov)
            _, state = jax.jit(tx.update)(g, tx.init(w), w)
            buf = np.asarray(state.trace["dense"])
            radial = unit_dot(buf, np.asarray(w["dense"]))
            if nesterov:
                np.testing.assert_allclose(buf, g["dense"], rtol=1e-15)
            else:
                # Removed up to the epsilon of w_hat = w / (|w| + eps).
                np.testing.assert_allclose(radial, 0.0, atol=1e-8)
                assert (
                    np.max(np.abs(unit_dot(np.asarray(g["dense"]), w["dense"]))) > 0.04
                )


def test_nero_scale_of_a_zero_leaf_and_schedule():
    """``init`` takes the scale from the params it is given (0.01 for a zero
    leaf); a schedule is evaluated at the step count."""
    params = {"w": jnp.zeros((4, 3)), "b": jnp.full((3,), 2.0)}
    state = jax.jit(riemax.nero(0.01).init)(params)
    np.testing.assert_allclose(state.scale["w"], 0.01)
    np.testing.assert_allclose(state.scale["b"], 2.0)
    sched = optax.exponential_decay(0.01, 1, 0.5)
    a = riemax.nero(sched, constraints=False)
    b = riemax.nero(0.005, constraints=False)
    g = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    a_update, b_update = jax.jit(a.update), jax.jit(b.update)
    _, sa = a_update(g, jax.jit(a.init)(params), params)
    ua, _ = a_update(g, sa, params)
    sb = jax.jit(b.init)(params)
    _, sb = b_update(g, sb, params)
    ub, _ = b_update(g, sb, params)
    np.testing.assert_allclose(ua["b"], ub["b"], rtol=1e-6)


def _rotational_run(steps, shape=(3, 3, 16, 8), seed=0):
    """``steps`` steps of rotational Adam at AdamW's equilibrium rate on random
    gradients, in float32; returns the initial params, every iterate's per-unit
    angle to the previous one, the final params and the rate."""
    rate = riemax.equilibrium_rate("adamw", 1e-3, 0.1)
    tx = riemax.rotational(optax.scale_by_adam(), rate)
    w0 = jax.jit(riemax.center_units)(jax.random.normal(jax.random.key(seed), shape))
    axes = tuple(range(len(shape) - 1))

    def body(carry, key):
        w, state = carry
        g = jax.random.normal(key, shape)
        updates, state = tx.update(g, state, w)
        new = optax.apply_updates(w, updates)
        chord = jnp.sqrt(jnp.sum((new - w) ** 2, axis=axes))
        r = jnp.sqrt(jnp.sum(w * w, axis=axes))
        return (new, state), 2 * jnp.arcsin(chord / (2 * r))

    keys = jax.random.split(jax.random.key(seed + 1), steps)
    (final, _), angles = jax.jit(lambda w, s: jax.lax.scan(body, (w, s), keys))(
        w0, tx.init(w0)
    )
    return w0, np.asarray(angles), final, rate


def test_rotational_keeps_norms_for_1000_float32_steps():
    w0, _, final, _ = _rotational_run(1000)
    assert final.dtype == jnp.float32
    np.testing.assert_allclose(unit_norms(final), unit_norms(w0), rtol=1e-5)
    # ... and the units stay centred (zero_mean) while they moved far.
    np.testing.assert_allclose(np.sum(np.asarray(final), axis=(0, 1, 2)), 0, atol=1e-4)
    cos = (
        np.sum(np.asarray(final) * np.asarray(w0), axis=(0, 1, 2)) / unit_norms(w0) ** 2
    )
    assert np.all(cos < 0.98)


def test_rotational_mean_angular_step_converges_to_the_rate():
    """On random gradients the measured angle per step, averaged over steps 200
    to 400, is the rate for every unit (within 10 %)."""
    _, angles, _, rate = _rotational_run(400)
    mean = angles[200:].mean(axis=0)
    np.testing.assert_allclose(mean, rate, rtol=0.1)
    # The running normalisation makes the first step exactly the rate (a = |u|).
    np.testing.assert_allclose(angles[0], math.atan(rate), rtol=1e-3)


@pytest.mark.parametrize("inner", ["sgdm", "lion"])
def test_rotational_runs_sgdm_and_lion_in_float32(inner):
    make = {"sgdm": lambda: optax.trace(0.9), "lion": optax.scale_by_lion}[inner]
    rate = riemax.equilibrium_rate(inner, 0.1, 1e-3, momentum=0.9)
    tx = riemax.rotational(make(), rate)
    w = jax.jit(riemax.center_units)(jax.random.normal(jax.random.key(2), (16, 8)))
    state = tx.init(w)
    step = jax.jit(tx.update)
    w1 = w
    for k in range(50):
        updates, state = step(jax.random.normal(jax.random.key(k), w.shape), state, w1)
        new = optax.apply_updates(w1, updates)
        if k == 0:  # the first step turns every unit by atan(rate): a = |u|
            chord = unit_norms(np.asarray(new) - np.asarray(w)) / unit_norms(w)
            np.testing.assert_allclose(
                2 * np.arcsin(chord / 2), math.atan(rate), rtol=1e-3
            )
        w1 = new
    np.testing.assert_allclose(unit_norms(w1), unit_norms(w), rtol=1e-5)
    assert float(jnp.max(jnp.abs(w1 - w))) > 0.01


def test_center_units_keeps_norms_and_respects_labels():
    params = {
        "conv": jax.random.normal(jax.random.key(0), (3, 3, 2, 4)) + 1.0,
        "head": jax.random.normal(jax.random.key(1), (4, 3)) + 1.0,
        "bias": jnp.ones(4),
    }
    out = jax.jit(riemax.center_units)(params)
    for n in ("conv", "head"):
        np.testing.assert_allclose(unit_norms(out[n]), unit_norms(params[n]), rtol=1e-6)
        axes = tuple(range(out[n].ndim - 1))
        np.testing.assert_allclose(jnp.sum(out[n], axis=axes), 0.0, atol=1e-5)
    np.testing.assert_array_equal(out["bias"], params["bias"])
    labels = {"conv": "manifold", "head": "euclidean", "bias": "euclidean"}
    only = jax.jit(lambda p: riemax.center_units(p, labels))(params)
    np.testing.assert_array_equal(only["head"], params["head"])
    np.testing.assert_array_equal(only["conv"], out["conv"])


# ------------------------------------------------------------------------ edge cases

ALL_NAMED = {
    **NAMED_SPHERE,
    **{name: o.make for name, o in OPTIMIZERS.items() if not o.units_only},
}


def _edge_inputs(kind, dtype):
    """Kernels with a zero unit, a unit with zero gradient and a huge-gradient unit."""
    w = unit_rand(0, (3, 3, 4, 6))
    g = rand(1, (3, 3, 4, 6))
    huge = 1e4 if dtype == jnp.float16 else 1e15
    if kind == "mixed":
        w[..., 0] = 0.0
        g[..., 1] = 0.0
        g[..., 2] *= huge
        w[..., 3], g[..., 3] = 0.0, 0.0
    elif kind == "zero_grad":
        g[:] = 0.0
    elif kind == "huge_grad":
        g *= huge
    return jnp.asarray(w, dtype), jnp.asarray(g, dtype)


# "mixed" holds a zero unit, a zero-gradient unit and a huge-gradient unit at once.
# The default run checks it in float32 for every optimizer and in float16 (the
# narrowest range) for one of each family; the slow run checks every optimizer in
# every dtype, and with whole-kernel zero and huge gradients.
EDGE_CASES = [
    ("mixed", jnp.float32),
    ("mixed", jnp.float16),
    ("mixed", jnp.bfloat16),
    ("zero_grad", jnp.float32),
    ("huge_grad", jnp.float32),
]
DEFAULT_EDGE_CASES = EDGE_CASES[:2]
F16_BY_DEFAULT = ("sgdg", "adamg", "adamsrt", "adamp")


def edge_cases():
    for kind, dtype in EDGE_CASES:
        for name in ALL_NAMED:
            slow = (kind, dtype) not in DEFAULT_EDGE_CASES or (
                dtype == jnp.float16 and name not in F16_BY_DEFAULT
            )
            yield pytest.param(
                name,
                kind,
                dtype,
                id=f"{kind}-{jnp.dtype(dtype).name}-{name}",
                marks=pytest.mark.slow if slow else (),
            )


@pytest.mark.parametrize("name, kind, dtype", list(edge_cases()))
def test_edge_cases_are_finite_in_value_and_gradient(name, kind, dtype):
    w, g = _edge_inputs(kind, dtype)
    tx = ALL_NAMED[name]()
    state = tx.init(w)

    def f(w, g):
        updates, new_state = tx.update(g, state, w)
        new = optax.apply_updates(w, updates)
        return new, new_state

    new, new_state = jax.jit(f)(w, g)
    assert new.dtype == dtype
    assert all(
        np.all(np.isfinite(np.asarray(x, np.float32)))
        for x in jax.tree.leaves((new, new_state))
    )
    for leaf, ref in zip(
        jax.tree.leaves(new_state), jax.tree.leaves(state), strict=False
    ):
        assert leaf.dtype == ref.dtype
        if leaf.ndim == w.ndim and leaf.dtype != jnp.int32:
            assert leaf.dtype == jnp.promote_types(dtype, jnp.float32)

    def scalar(w, g):
        return jnp.sum(f(w, g)[0].astype(jnp.float32) ** 2)

    gw, gg = jax.jit(jax.grad(scalar, argnums=(0, 1)))(w, g)
    # float16 cannot hold every true derivative: at an exactly zero gradient an
    # Adam-type step (eps outside the root) has d(update)/dg = lr (1 - b1) /
    # ((1 - b1**t) eps), 1e5 for AdamP's defaults, beyond float16's 65504. There,
    # overflow to inf is the correct rounding; NaN never is.
    ok = np.isfinite if dtype != jnp.float16 else (lambda x: ~np.isnan(x))
    assert np.all(ok(np.asarray(gw, np.float32)))
    assert np.all(ok(np.asarray(gg, np.float32)))
    if name in NAMED_SPHERE:
        tol = 1e-5 if dtype == jnp.float32 else 1e-2
        live = unit_norms(w) > 0
        np.testing.assert_allclose(unit_norms(new)[live], 1.0, atol=tol)


def test_zero_unit_takes_the_euclidean_step():
    w, g = _edge_inputs("mixed", jnp.float32)
    tx = riemax.sgdg(0.2, grad_clip=None, omega=0.0)
    new = one_step(tx, w, g)
    np.testing.assert_allclose(new[..., 0], -0.2 * g[..., 0], rtol=1e-6)
    np.testing.assert_array_equal(new[..., 3], 0.0)
    # The chains of transforms store no step on a zero unit.
    for tx in (
        riemax.transported_momentum(0.9),
        riemax.spherical_adam(learning_rate=0.05),
    ):
        _, state = tx.update(g, tx.init(w), w)
        buf = [x for x in jax.tree.leaves(state) if x.shape == w.shape][0]
        np.testing.assert_array_equal(buf[..., 0], 0.0)
        assert np.all(np.asarray(buf[..., 2]) != 0)


ZERO_UNIT_OPTIMIZERS = {
    **{name: (lambda o=o: o.make(omega=0.0)) for name, o in SPHERE_OPTIMIZERS.items()},
    **{
        f"{name} chain": (lambda o=o: o.make_chain(omega=0.0))
        for name, o in SPHERE_OPTIMIZERS.items()
    },
}


@pytest.mark.parametrize("name", list(ZERO_UNIT_OPTIMIZERS))
def test_no_step_is_carried_out_of_the_origin(name):
    """A unit that leaves the origin took a radial step: none of it is carried.

    With zero gradient at the second step the unit only lands on the sphere
    (``Exp_y(0) = y``); a carried step would move it along rescaled rounding noise.
    """
    w, g = _edge_inputs("mixed", jnp.float32)
    tx = ZERO_UNIT_OPTIMIZERS[name]()
    state = tx.init(w)
    updates, state = tx.update(g, state, w)
    w1 = optax.apply_updates(w, updates)
    assert np.all(np.asarray(w1[..., 0]) != 0)
    updates, _ = tx.update(jnp.zeros_like(g), state, w1)
    w2 = np.asarray(optax.apply_updates(w1, updates))
    y1 = np.asarray(w1[..., 0]) / unit_norms(w1)[0]
    np.testing.assert_allclose(w2[..., 0], y1, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(ZERO_UNIT_OPTIMIZERS))
def test_a_radial_stored_step_is_dropped(name):
    """A stored step parallel to the params (never left by an exp-map step) has
    no tangent direction; it is dropped rather than rescaled."""
    w = jnp.asarray(unit_rand(0, (3, 3, 4, 6)), jnp.float32)
    tx = ZERO_UNIT_OPTIMIZERS[name]()
    state = jax.tree.map(lambda x: 0.1 * w if x.shape == w.shape else x, tx.init(w))
    updates, _ = tx.update(jnp.zeros_like(w), state, w)
    np.testing.assert_allclose(optax.apply_updates(w, updates), w, atol=1e-6)


def test_low_precision_drift_and_state_dtype():
    w = jnp.asarray(unit_rand(0, (3, 3, 4, 8)), jnp.bfloat16)
    for tx in (riemax.sgdg(0.2), riemax.adamg(0.05)):
        state = tx.init(w)
        assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {
            jnp.dtype(jnp.float32)
        }

        def body(i, carry):
            w, state = carry
            g = jax.random.normal(
                jax.random.fold_in(jax.random.key(1), i), w.shape, w.dtype
            )
            updates, state = tx.update(g, state, w)
            return optax.apply_updates(w, updates), state

        final, _ = jax.jit(lambda w, s: jax.lax.fori_loop(0, 300, body, (w, s)))(
            w, state
        )
        assert final.dtype == jnp.bfloat16
        np.testing.assert_allclose(unit_norms(final), 1.0, atol=1e-2)


# -------------------------------------------------------------------- per-unit sums


@pytest.mark.parametrize(
    "block", [1 << 19, 96, pytest.param(64, marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("shape", [(3, 3, 41, 16), (701, 24), (5, 7)])
@pytest.mark.parametrize("scales", [(1.0, 1.0, 1.0), (1e30, 1e-30, 1.0)])
def test_gram_matches_numpy_in_one_blocked_pass(monkeypatch, block, shape, scales):
    """The per-unit Gram quantities equal float64 NumPy sums, also when the rows
    are walked in blocks with a remainder (small blocks force that here), and in
    float32 at magnitudes whose squares overflow or underflow."""
    from riemax import _gram, _sums

    monkeypatch.setattr(_sums, "CPU_BLOCK_ELEMENTS", block)
    arrays = [rand(i, shape) * s for i, s in enumerate(scales)]
    pairs = ((0, 0), (0, 1), (0, 2), (2, 2), (1, 2), (1, 1))
    axes = tuple(range(len(shape) - 1))

    def true_values(gram):
        return [
            np.asarray(v, np.float64)
            * 2.0 ** np.asarray(gram.exps[p], np.float64)
            * 2.0 ** np.asarray(gram.exps[q], np.float64)
            for v, (p, q) in zip(gram.values, pairs, strict=True)
        ]

    got = jax.jit(lambda *a: _gram.unit_gram(a, pairs))(
        *[jnp.asarray(a, jnp.float32) for a in arrays]
    )
    for value, (p, q) in zip(true_values(got), pairs, strict=True):
        want = np.sum(arrays[p] * arrays[q], axis=axes, keepdims=True)
        assert value.shape == want.shape
        np.testing.assert_allclose(
            value, want, rtol=2e-5, atol=1e-6 * np.abs(want).max()
        )
    # Scaled values stay within the group size whatever the magnitudes.
    n = int(np.prod(shape[:-1]))
    assert all(float(jnp.max(jnp.abs(v))) <= n for v in got.values)
    with x64():
        got = jax.jit(lambda *a: _gram.unit_gram(a, pairs))(*arrays)
        for value, (p, q) in zip(true_values(got), pairs, strict=True):
            want = np.sum(arrays[p] * arrays[q], axis=axes, keepdims=True)
            np.testing.assert_allclose(value, want, rtol=1e-13)
        # Differentiable and batchable like the plain sums.
        grad = jax.grad(lambda a: _gram.norm(a, axes).sum())
        a0 = rand(0, shape)
        np.testing.assert_allclose(
            grad(a0),
            a0 / np.sqrt(np.sum(a0 * a0, axis=axes, keepdims=True)),
            rtol=1e-12,
        )
        batched = jax.vmap(lambda a: _gram.norm(a, axes))(np.stack(arrays[:2]))
        np.testing.assert_allclose(
            batched[1],
            np.sqrt(np.sum(arrays[1] ** 2, axis=axes, keepdims=True)),
            rtol=1e-13,
        )


@pytest.mark.parametrize(
    "rows, block", [(9, 1 << 19), (40000, 1 << 19), (40000, 1 << 13)]
)
@pytest.mark.parametrize("big", [False, True])
def test_gram_of_shifted_arrays_sums_the_differences(monkeypatch, rows, block, big):
    """A form ``a - c`` gives the Gram of the differences, formed inside
    the summing loops (small matrices, larger ones, the CPU blocked loop): exact
    where the identity from the sums of ``a`` would have lost six digits to a
    mean 1000 times the spread, and in the rescaled branch (magnitudes whose
    squares overflow float32)."""
    from riemax import _gram, _sums

    monkeypatch.setattr(_sums, "CPU_BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(1)
    scale = 1e30 if big else 1.0
    p = rng.standard_normal((rows, 6)) * scale
    a = (1000.0 + rng.standard_normal((rows, 6))) * scale
    a32 = np.asarray(a, np.float32).astype(np.float64)
    c = np.asarray(a32[: min(rows, 8)].mean(0, keepdims=True), np.float32)
    pairs = ((0, 0), (0, 1), (1, 1), (1, None))

    def program(x, y, shift):
        gr = yield _gram.gram_request(
            (x, y), pairs, (0,), forms=(None, (jnp.subtract, (y, shift)))
        )
        return [gr.values[i] for i in range(4)], [gr.exps[i] for i in range(2)]

    values, exps = jax.jit(lambda x, y, s: _gram.run(program(x, y, s)))(
        jnp.asarray(p, jnp.float32), jnp.asarray(a32, jnp.float32), jnp.asarray(c)
    )
    exps = [np.asarray(e, np.float64) for e in exps]
    d = a32 - c.astype(np.float64)
    p32 = np.asarray(p, np.float32).astype(np.float64)
    want = [
        (p32 * p32).sum(0, keepdims=True),
        (p32 * d).sum(0, keepdims=True),
        (d * d).sum(0, keepdims=True),
        d.sum(0, keepdims=True),
    ]
    powers = [exps[0] * 2, exps[0] + exps[1], exps[1] * 2, exps[1]]
    for value, power, w in zip(values, powers, want, strict=True):
        true = np.asarray(value, np.float64) * 2.0**power
        np.testing.assert_allclose(true, w, rtol=2e-5, atol=1e-5 * np.abs(w).max())


@pytest.mark.parametrize("block", [1 << 19, 64])
@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30])
def test_gram_plain_sums_in_the_same_pass(monkeypatch, block, scale):
    """Pairs ``(p, None)`` of the Gram pass are the per-unit sums of array ``p``
    on its scale (the wrapper's centring), exact at any magnitude and in blocks."""
    from riemax import _gram, _sums

    monkeypatch.setattr(_sums, "CPU_BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((701, 24)) * scale + 0.3 * scale
    b = rng.standard_normal((701, 24))
    pairs = ((0, None), (1, None), (0, 1))
    got = jax.jit(lambda x, y: _gram.unit_gram((x, y), pairs))(
        jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    )
    exps = [np.asarray(e, np.float64) for e in got.exps]
    true = [
        np.asarray(got.values[0], np.float64) * 2.0 ** exps[0],
        np.asarray(got.values[1], np.float64) * 2.0 ** exps[1],
        np.asarray(got.values[2], np.float64) * 2.0 ** (exps[0] + exps[1]),
    ]
    want = [
        a.sum(0, keepdims=True),
        b.sum(0, keepdims=True),
        (a * b).sum(0, keepdims=True),
    ]
    for x, y in zip(true, want, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * np.abs(y).max())


# ------------------------------------------------------------- the compiled step

IN_PLACE = {name: o.make for name, o in OPTIMIZERS.items()}
#: Known to copy one kernel-sized buffer per step (reported against riemax: the
#: step that ends in a matrix-view retraction; remove a name once it passes).
COPIES_A_KERNEL = {"cayley-sgd", "cayley-adam", "manifold-muon"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=pytest.mark.xfail(
                reason="riemax copies one kernel-sized buffer in this step",
                strict=True,
            ),
        )
        if name in COPIES_A_KERNEL
        else name
        for name in IN_PLACE
    ],
)
def test_steps_update_donated_buffers_in_place(name):
    """With params and state donated, the compiled step writes the new buffer and
    params in place: XLA inserts no copy of a kernel-sized buffer (the copies that
    output loops sharing their inputs force cost more than the step itself)."""
    tx = IN_PLACE[name]()
    w = jnp.asarray(unit_rand(0, (3, 3, 32, 48)), jnp.float32)

    def step(carry, g):
        w, state = carry
        updates, state = tx.update(g, state, w)
        return optax.apply_updates(w, updates), state

    with full_compile():  # what users get: XLA's whole pipeline
        hlo = (
            jax.jit(step, donate_argnums=0)
            .lower((w, tx.init(w)), jnp.ones_like(w))
            .compile()
            .as_text()
        )
    entry = hlo[hlo.index("ENTRY") :]
    big = [
        line
        for line in entry.splitlines()
        if " copy(" in line
        and (shape := re.search(r"= f32\[([\d,]+)\]", line))
        and np.prod([int(n) for n in shape.group(1).split(",")]) == w.size
    ]
    assert not big, big
