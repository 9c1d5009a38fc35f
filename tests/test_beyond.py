"""SGDP/AdamP, Nero and the rotational wrapper against the float64 reference of
ALGORITHMS.md §8 (tests/reference_beyond.py), their invariants, and their
composition with optax, orbax and several devices."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference_beyond as ref
from helpers import OPTIMIZERS, fewer_by_default, max_abs_diff, unit_norms, x64
from jax.extend import core as jex_core

import riemax
from riemax import _adamp, _numerics

SHAPES = {"conv": (3, 3, 4, 8), "dense": (16, 6), "bias": (6,)}
KERNELS = ("conv", "dense")
STEPS = 12
PARITY = 1e-10
BRANCH_NAMES = {
    _adamp.NO_PROJECTION: "none",
    _adamp.CHANNEL: "channel",
    _adamp.LAYER: "layer",
}

NEW = [
    "adamp",
    "sgdp",
    "sgdp-nesterov",
    "nero",
    "rotational-adamw",
    "rotational-sgdm",
]


def initial(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in shapes.items()}


def _unit_dot(a, b):
    return np.sum(a * b, axis=tuple(range(a.ndim - 1)), keepdims=True)


def gradient(k, w, kind=None):
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
    ww = _unit_dot(w, w)
    tangent = g - w * _unit_dot(g, w) / ww
    if kind == "tangent":
        return tangent + 1e-4 * g
    if kind == "radial":
        return g + 0.5 * w
    # <g_j, w_j> = +-c, about half of |g_j| |w_j| on every unit, summing to 0.
    sign = np.where(np.arange(w.shape[-1]) % 2 == 0, 1.0, -1.0)
    c = 0.5 * np.mean(np.sqrt(_unit_dot(tangent, tangent) * ww))
    return tangent + c * w * sign / ww


def run_pair(tx, make_ref, params0, steps=STEPS, grad=gradient, on_step=None):
    """Runs riemax (jitted, float64) and the reference side by side.

    Each side takes its gradients at its own iterate. ``on_step(grads, state,
    params)`` is called before every riemax step. Returns both final params, the
    reference optimizers and, per step, the reference's branch per leaf (SGDP and
    AdamP).
    """
    params = {k: jnp.asarray(v) for k, v in params0.items()}
    state = tx.init(params)
    refs = {k: make_ref(k, v) for k, v in params0.items()}
    theirs = {k: np.asarray(v, np.float64) for k, v in params0.items()}
    step = jax.jit(tx.update)
    branches = []
    for k in range(steps):
        grads = {n: jnp.asarray(grad(k, params[n])) for n in params}
        if on_step is not None:
            on_step(grads, state, params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        theirs = {n: refs[n].step(theirs[n], grad(k, theirs[n])) for n in theirs}
        branches.append({n: getattr(refs[n], "branch", None) for n in refs})
    return params, theirs, refs, branches


# ---------------------------------------------------------------- SGDP / AdamP

ADAMP_CASES = [
    dict(nesterov=False, weight_decay=0.0),
    dict(nesterov=False, weight_decay=0.1),
    dict(nesterov=True, weight_decay=0.1),
    dict(nesterov=True, weight_decay=0.0, b1=0.8, b2=0.99, delta=0.2, wd_ratio=0.3),
]
SGDP_CASES = [
    dict(momentum=0.9, nesterov=False, weight_decay=0.0),
    dict(momentum=0.9, nesterov=False, weight_decay=1e-2, dampening=0.1),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.5, nesterov=True, weight_decay=0.0, delta=0.2, wd_ratio=0.5),
]


@functools.cache
def _adamp_branches(lr, kwargs):
    """The per-leaf branch (and update) of the leaf function the AdamP step uses,
    for the state before a step."""
    kw = dict(kwargs)

    @jax.jit
    def branches(grads, state, params):
        count = optax.safe_increment(state.count)
        out = {}
        for n in params:
            update, _, _, branch = _numerics.run(_adamp._adamp_leaf(
                grads[n], state.mu[n], state.nu[n], params[n], lr=lr, count=count,
                b1=kw.get("b1", 0.9), b2=kw.get("b2", 0.999), eps=1e-8,
                weight_decay=kw["weight_decay"], delta=kw.get("delta", 0.1),
                wd_ratio=kw.get("wd_ratio", 0.1), nesterov=kw["nesterov"],
                mode=_adamp.TEST,
            ))  # fmt: skip
            out[n] = (update, branch)
        return out

    return branches


@functools.cache
def _sgdp_branches(lr, kwargs):
    kw = dict(kwargs)

    @jax.jit
    def branches(grads, state, params):
        out = {}
        for n in params:
            update, _, branch = _numerics.run(_adamp._sgdp_leaf(
                grads[n], state.trace[n], params[n], lr=lr,
                momentum=kw["momentum"], dampening=kw.get("dampening", 0.0),
                weight_decay=kw["weight_decay"], nesterov=kw["nesterov"], eps=1e-8,
                delta=kw.get("delta", 0.1), wd_ratio=kw.get("wd_ratio", 0.1),
                mode=_adamp.TEST,
            ))  # fmt: skip
            out[n] = (update, branch)
        return out

    return branches


def _recorder(tx, branches_fn):
    """An ``on_step`` hook recording, per step, the branch per leaf of the leaf
    function the step runs, after checking that it gives the step's update."""
    update = jax.jit(tx.update)
    seen = []

    def hook(grads, state, params):
        got = branches_fn(grads, state, params)
        updates, _ = update(grads, state, params)
        for n in params:
            np.testing.assert_allclose(got[n][0], updates[n], rtol=1e-13, atol=1e-16)
        seen.append({n: BRANCH_NAMES[int(got[n][1])] for n in params})

    return hook, seen


def _check_branches(ours, theirs):
    """Same branch on every step and leaf; on each kernel the channel view, the
    layer view and no projection all occur."""
    assert ours == theirs
    for n in KERNELS:
        assert {step[n] for step in theirs} == {"channel", "layer", "none"}, n
    assert {step["bias"] for step in theirs} == {"none"}


@pytest.mark.parametrize("case", ADAMP_CASES, ids=str)
def test_adamp_matches_reference_and_its_branches(case):
    lr = 1e-2
    with x64():
        tx = riemax.adamp(lr, **case)
        hook, seen = _recorder(tx, _adamp_branches(lr, tuple(sorted(case.items()))))
        ours, theirs, _, branches = run_pair(
            tx, lambda n, w: ref.AdamP(w, lr, **case), initial(), on_step=hook
        )
    assert max_abs_diff(ours, theirs) < PARITY
    _check_branches(seen, branches)


@pytest.mark.parametrize("case", SGDP_CASES, ids=str)
def test_sgdp_matches_reference_and_its_branches(case):
    lr = 0.1
    with x64():
        tx = riemax.sgdp(lr, **case)
        hook, seen = _recorder(tx, _sgdp_branches(lr, tuple(sorted(case.items()))))
        ours, theirs, _, branches = run_pair(
            tx, lambda n, w: ref.SGDP(w, lr, **case), initial(), on_step=hook
        )
    assert max_abs_diff(ours, theirs) < PARITY
    _check_branches(seen, branches)


def test_sgdp_projects_its_buffer_in_place_without_nesterov():
    """Without Nesterov the stored momentum loses its radial part (the original
    projects the buffer itself); with Nesterov the buffer is the plain one."""
    with x64():
        w = {"dense": jnp.asarray(initial()["dense"])}
        g = {"dense": jnp.asarray(gradient(0, w["dense"], "tangent"))}
        g["dense"] = g["dense"] + 0.05 * w["dense"] / _unit_dot(
            np.asarray(w["dense"]), np.asarray(w["dense"])
        )
        for nesterov in (False, True):
            tx = riemax.sgdp(0.1, momentum=0.9, nesterov=nesterov)
            _, state = tx.update(g, tx.init(w), w)
            buf = np.asarray(state.trace["dense"])
            radial = _unit_dot(buf, np.asarray(w["dense"]))
            if nesterov:
                np.testing.assert_allclose(buf, g["dense"], rtol=1e-15)
            else:
                # Removed up to the epsilon of w_hat = w / (|w| + eps).
                np.testing.assert_allclose(radial, 0.0, atol=1e-8)
                assert (
                    np.max(np.abs(_unit_dot(np.asarray(g["dense"]), w["dense"]))) > 0.04
                )


LABELS = {"conv": "manifold", "dense": "euclidean", "bias": "euclidean"}


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_scale_invariant_labels_replace_the_test(name):
    """With labels, "manifold" kernels are projected per unit every step and the
    others never, whatever the gradient; the trajectory matches the reference
    with the test forced the same way."""
    modes = {"conv": "channel", "dense": "none", "bias": "none"}
    with x64():
        if name == "adamp":
            tx = riemax.adamp(1e-2, weight_decay=0.1, scale_invariant=LABELS)

            def make(n, w):
                return ref.AdamP(w, 1e-2, weight_decay=0.1, mode=modes[n])
        else:
            tx = riemax.sgdp(
                0.1, momentum=0.9, weight_decay=1e-2, scale_invariant=LABELS
            )

            def make(n, w):
                return ref.SGDP(w, 0.1, momentum=0.9, weight_decay=1e-2, mode=modes[n])

        ours, theirs, _, _ = run_pair(tx, make, initial())
        assert max_abs_diff(ours, theirs) < PARITY
        # ... and it differs from the per-step test (which fires on "dense").
        plain = {"adamp": riemax.adamp(1e-2, weight_decay=0.1),
                 "sgdp": riemax.sgdp(0.1, momentum=0.9, weight_decay=1e-2)}[name]  # fmt: skip
        tested, _, _, _ = run_pair(plain, make, initial())
        assert float(np.max(np.abs(tested["dense"] - ours["dense"]))) > 1e-6
        # A callable gives the same as the tree.
        call = {"adamp": riemax.adamp(1e-2, weight_decay=0.1,
                                      scale_invariant=lambda p: LABELS),
                "sgdp": riemax.sgdp(0.1, momentum=0.9, weight_decay=1e-2,
                                    scale_invariant=lambda p: LABELS)}[name]  # fmt: skip
        again, _, _, _ = run_pair(call, make, initial(), steps=3)
        short, _, _, _ = run_pair(tx, make, initial(), steps=3)
        assert max_abs_diff(again, short) == 0


def test_adamp_and_sgdp_reduce_to_optax_on_one_dimensional_leaves():
    """A leaf with one axis takes the plain step: AdamW, and momentum SGD.

    (AdamP's Nesterov form keeps Adam's bias correction 1 - b1**t for the whole
    step, unlike optax's NAdam, so it is compared with the reference only.)
    """
    with x64():
        b = {"bias": jnp.asarray(initial()["bias"])}
        pairs = [
            (riemax.adamp(1e-2, weight_decay=0.1), optax.adamw(1e-2, weight_decay=0.1)),
            (riemax.adamp(1e-2), optax.adam(1e-2)),
            (riemax.sgdp(0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)),
            (riemax.sgdp(0.1, momentum=0.9, nesterov=True),
             optax.sgd(0.1, momentum=0.9, nesterov=True)),
        ]  # fmt: skip
        for ours_tx, optax_tx in pairs:
            p, q = b, b
            s, t = ours_tx.init(p), optax_tx.init(q)
            for k in range(5):
                g = {"bias": jnp.asarray(gradient(k, p["bias"]))}
                u, s = ours_tx.update(g, s, p)
                v, t = optax_tx.update(g, t, q)
                p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
            np.testing.assert_allclose(p["bias"], q["bias"], rtol=1e-13, atol=1e-15)


CALLBACK_OR_IO = ("callback", "infeed", "outfeed", "print", "host", "io_")


def _primitives(jaxpr):
    """Every primitive name in a closed jaxpr, sub-jaxprs (cond, pjit, loops)
    included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    names |= _primitives(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    names |= _primitives(sub)
    return names


@pytest.mark.parametrize("name", ["adamp", "sgdp", "sgdp-nesterov"])
def test_projection_test_runs_on_device(name):
    """The jitted step has no callback or host transfer in its program, and runs
    with implicit transfers disallowed."""
    tx = OPTIMIZERS[name].make()
    params = {k: jnp.asarray(v, jnp.float32) for k, v in initial().items()}
    grads = {k: jnp.asarray(gradient(0, v), jnp.float32) for k, v in params.items()}
    state = tx.init(params)

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    names = _primitives(jax.make_jaxpr(step)(grads, state, params).jaxpr)
    assert "reduce_max" in names or "max" in names  # the test itself is there
    assert not [n for n in names if any(bad in n for bad in CALLBACK_OR_IO)], names
    jitted = jax.jit(step)
    jax.block_until_ready(jitted(grads, state, params))
    with jax.transfer_guard("disallow"):
        out = jax.block_until_ready(jitted(grads, state, params))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out[0]))


# ------------------------------------------------------------------------- Nero


@pytest.mark.parametrize("constraints", [True, False])
def test_nero_project_then_nero_matches_reference(constraints):
    """nero_project, then Nero: float64 parity, with a neuron of zero gradient on
    one step (the original's 0/0 -> 0) and on conv, dense and 1-D leaves."""

    def grad(k, w):
        g = gradient(k, w)
        if k == 4:
            g = np.array(g)
            g[..., 1] = 0.0
        return g

    with x64():
        p0 = initial(3)
        if constraints:
            projected = riemax.nero_project({k: jnp.asarray(v) for k, v in p0.items()})
            want = {k: ref.nero_project(v) for k, v in p0.items()}
            assert max_abs_diff(projected, want) < 1e-14
            p0 = {k: np.asarray(v) for k, v in projected.items()}
        tx = riemax.nero(0.01, constraints=constraints)
        ours, theirs, refs, _ = run_pair(
            tx,
            lambda n, w: ref.Nero(w, 0.01, constraints=constraints),
            p0,
            grad=grad,
        )
        state = tx.init({k: jnp.asarray(v) for k, v in p0.items()})
        for n in p0:
            np.testing.assert_allclose(state.scale[n], refs[n].scale, rtol=1e-14)
        ours = {k: np.asarray(v) for k, v in ours.items()}
    assert max_abs_diff(ours, theirs) < PARITY
    if constraints:
        for n in KERNELS:
            np.testing.assert_allclose(unit_norms(ours[n]), 1.0, atol=1e-14)
            np.testing.assert_allclose(
                np.sum(ours[n], axis=tuple(range(ours[n].ndim - 1))), 0.0, atol=1e-13
            )


def test_nero_scale_of_a_zero_leaf_and_schedule():
    """``init`` takes the scale from the params it is given (0.01 for a zero
    leaf); a schedule is evaluated at the step count."""
    params = {"w": jnp.zeros((4, 3)), "b": jnp.full((3,), 2.0)}
    state = riemax.nero(0.01).init(params)
    np.testing.assert_allclose(state.scale["w"], 0.01)
    np.testing.assert_allclose(state.scale["b"], 2.0)
    sched = optax.exponential_decay(0.01, 1, 0.5)
    a = riemax.nero(sched, constraints=False)
    b = riemax.nero(0.005, constraints=False)
    g = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    _, sa = a.update(g, a.init(params), params)
    ua, _ = a.update(g, sa, params)
    sb = b.init(params)
    _, sb = b.update(g, sb, params)
    ub, _ = b.update(g, sb, params)
    np.testing.assert_allclose(ua["b"], ub["b"], rtol=1e-6)


# ------------------------------------------------------------------ rotational

INNERS = {
    "adam": (optax.scale_by_adam, ref.AdamDirection),
    "sgdm": (lambda: optax.trace(0.9), lambda w: ref.MomentumDirection(w, 0.9)),
    "lion": (optax.scale_by_lion, ref.LionDirection),
}


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize(
    "zero_mean, centre",
    [
        (True, True),
        (False, False),
        pytest.param(True, False, marks=pytest.mark.slow),
        pytest.param(False, True, marks=pytest.mark.slow),
    ],
)
def test_rotational_matches_reference(inner, zero_mean, centre):
    make_inner, make_direction = INNERS[inner]
    rate = 0.05
    with x64():
        p0 = {k: v for k, v in initial(5).items() if k in KERNELS}
        if centre:
            p0 = {
                k: np.asarray(v)
                for k, v in riemax.center_units(
                    {k: jnp.asarray(v) for k, v in p0.items()}
                ).items()
            }
            want = {
                k: ref.center_units(v) for k, v in initial(5).items() if k in KERNELS
            }
            assert max_abs_diff(p0, want) < 1e-13
        tx = riemax.rotational(make_inner(), rate, zero_mean=zero_mean)
        ours, theirs, refs, _ = run_pair(
            tx,
            lambda n, w: ref.Rotational(
                w, make_direction(w), rate, zero_mean=zero_mean
            ),
            p0,
        )
    assert max_abs_diff(ours, theirs) < PARITY
    for n in ours:
        np.testing.assert_allclose(unit_norms(ours[n]), refs[n].r.ravel(), rtol=1e-13)


def test_rotational_schedule_rate_matches_reference():
    def sched(count):
        return 0.1 * 0.8**count

    with x64():
        p0 = {"conv": initial(6)["conv"]}
        tx = riemax.rotational(optax.scale_by_adam(), sched)
        params = {k: jnp.asarray(v) for k, v in p0.items()}
        state = tx.init(params)
        r = ref.Rotational(p0["conv"], ref.AdamDirection(p0["conv"]), None)
        theirs = p0["conv"]
        for k in range(STEPS):
            g = {"conv": jnp.asarray(gradient(k, params["conv"]))}
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
            theirs = r.step(theirs, gradient(k, theirs), rate=float(sched(k)))
    np.testing.assert_allclose(params["conv"], theirs, atol=PARITY)


def _rotational_run(steps, shape=(3, 3, 16, 8), seed=0):
    """``steps`` steps of rotational Adam at AdamW's equilibrium rate on random
    gradients, in float32; returns the initial params, every iterate's per-unit
    angle to the previous one, the final params and the rate."""
    rate = riemax.equilibrium_rate("adamw", 1e-3, 0.1)
    tx = riemax.rotational(optax.scale_by_adam(), rate)
    w0 = riemax.center_units(jax.random.normal(jax.random.key(seed), shape))
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
    w = riemax.center_units(jax.random.normal(jax.random.key(2), (16, 8)))
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


def test_equilibrium_rates_are_the_papers_formulas():
    cases = [
        ("adamw", 1e-3, 0.05, {}),
        ("adamw", 0.05, 0.01, {"b1": 0.8}),
        ("sgdm", 0.5, 1e-4, {"momentum": 0.9}),
        ("sgdm", 0.1, 5e-4, {}),
        ("lion", 1e-4, 1.0, {}),
        ("lion", 3e-4, 0.1, {"b1": 0.95, "b2": 0.98}),
    ]
    for inner, lr, wd, kw in cases:
        want = ref.equilibrium_rate(inner, lr, wd, **kw)
        got = riemax.equilibrium_rate(inner, lr, wd, **kw)
        assert isinstance(got, float)
        assert got == pytest.approx(want, rel=1e-15)
        sched = riemax.equilibrium_rate(inner, lambda c: lr * 0.5**c, wd, **kw)
        assert float(sched(2)) == pytest.approx(
            ref.equilibrium_rate(inner, lr * 0.25, wd, **kw), rel=1e-6
        )
        traced = jax.jit(lambda a: riemax.equilibrium_rate(inner, a, wd, **kw))(lr)
        assert float(traced) == pytest.approx(want, rel=1e-6)
    # The closed forms, once by hand: AdamW at b1 = 0.9 is sqrt(lr wd / 9.5).
    assert riemax.equilibrium_rate("adamw", 1e-3, 0.05) == pytest.approx(
        math.sqrt(1e-3 * 0.05 / 9.5), rel=1e-14
    )
    with pytest.raises(ValueError, match="'adamw', 'sgdm', 'lion', got 'adam'"):
        riemax.equilibrium_rate("adam", 1e-3, 0.1)


def test_center_units_keeps_norms_and_respects_labels():
    params = {
        "conv": jax.random.normal(jax.random.key(0), (3, 3, 2, 4)) + 1.0,
        "head": jax.random.normal(jax.random.key(1), (4, 3)) + 1.0,
        "bias": jnp.ones(4),
    }
    out = riemax.center_units(params)
    for n in ("conv", "head"):
        np.testing.assert_allclose(unit_norms(out[n]), unit_norms(params[n]), rtol=1e-6)
        axes = tuple(range(out[n].ndim - 1))
        np.testing.assert_allclose(jnp.sum(out[n], axis=axes), 0.0, atol=1e-5)
    np.testing.assert_array_equal(out["bias"], params["bias"])
    labels = {"conv": "manifold", "head": "euclidean", "bias": "euclidean"}
    only = riemax.center_units(params, labels)
    np.testing.assert_array_equal(only["head"], params["head"])
    np.testing.assert_array_equal(only["conv"], out["conv"])


@pytest.mark.parametrize("block", [1 << 19, 64])
@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30])
def test_gram_plain_sums_in_the_same_pass(monkeypatch, block, scale):
    """Pairs ``(p, None)`` of the Gram pass are the per-unit sums of array ``p``
    on its scale (the wrapper's centring), exact at any magnitude and in blocks."""
    from riemax import _numerics

    monkeypatch.setattr(_numerics, "CPU_BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((701, 24)) * scale + 0.3 * scale
    b = rng.standard_normal((701, 24))
    pairs = ((0, None), (1, None), (0, 1))
    got = jax.jit(lambda x, y: _numerics.unit_gram((x, y), pairs))(
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


# ------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: riemax.adamp(delta=-0.1), ValueError, r"adamp: delta must be in"),
        (lambda: riemax.adamp(wd_ratio=float("nan")), ValueError, r"wd_ratio must be finite"),
        (lambda: riemax.sgdp(0.1, dampening=1.5), ValueError, r"dampening must be in \[0, 1\]"),
        (lambda: riemax.sgdp(0.1, momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
        (lambda: riemax.adamp(scale_invariant=True), TypeError, r"scale_invariant must be"),
        (lambda: riemax.nero(constraints="yes"), TypeError, r"constraints must be True or False"),
        (lambda: riemax.nero(b2=1.0), ValueError, r"b2 must be in \[0, 1\)"),
        (lambda: riemax.rotational("adam", 0.01), TypeError, r"inner must be an optax"),
        (lambda: riemax.rotational(optax.scale_by_adam(), -0.1), ValueError, r"rate must be in"),
        (lambda: riemax.rotational(optax.scale_by_adam(), 0.1, decay=1.0), ValueError, r"decay must be in"),
        (lambda: riemax.equilibrium_rate("sgdm", 0.1, -1.0), ValueError, r"weight_decay must be in"),
    ],
)  # fmt: skip
def test_bad_options_name_the_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_labels_and_leaves_are_checked_with_their_paths():
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)}}
    tx = riemax.adamp(scale_invariant={"conv": {"kernel": "manifold"}})
    with pytest.raises(ValueError, match=r"scale_invariant: .*no label for: conv/bias"):
        tx.init(params)
    tx = riemax.sgdp(
        0.1, scale_invariant={"conv": {"kernel": "manifold", "bias": "manifold"}}
    )
    with pytest.raises(ValueError, match=r"'conv/bias' of shape \(4,\) as 'manifold'"):
        tx.init(params)
    tx = OPTIMIZERS["rotational-adamw"].make()
    with pytest.raises(
        ValueError, match=r"'conv/bias' has shape \(4,\).*riemax.hybrid"
    ):
        tx.init(params)


# ------------------------------------------------------------------ composition

KERNEL = (3, 3, 4, 8)


def _tree(seed=0):
    kernel = riemax.center_units(jax.random.normal(jax.random.key(seed), KERNEL))
    return {
        "conv": kernel,
        "fc": riemax.center_units(jax.random.normal(jax.random.key(seed + 1), (16, 8))),
    }


def _grads(k):
    return {
        "conv": jax.random.normal(jax.random.key(100 + k), KERNEL),
        "fc": jax.random.normal(jax.random.key(200 + k), (16, 8)),
    }


@pytest.mark.parametrize("name", fewer_by_default(NEW, ["adamp", "rotational-sgdm"]))
def test_multisteps_equals_stepping_on_mean_gradients(name):
    o = OPTIMIZERS[name]
    params = _tree()
    multi = optax.MultiSteps(o.make(), every_k_schedule=2)
    state, a = multi.init(params), params
    step = jax.jit(multi.update)
    for k in range(4):
        updates, state = step(_grads(k), state, a)
        a = optax.apply_updates(a, updates)
    tx = o.make()
    state, b = tx.init(params), params
    for k in (0, 2):
        mean = jax.tree.map(lambda x, y: (x + y) / 2, _grads(k), _grads(k + 1))
        updates, state = tx.update(mean, state, b)
        b = optax.apply_updates(b, updates)
    for n in params:
        np.testing.assert_allclose(a[n], b[n], atol=2e-6)


@pytest.mark.parametrize("name", NEW)
def test_apply_if_finite_skips_a_nan_step(name):
    o = OPTIMIZERS[name]
    params = _tree()
    tx = optax.apply_if_finite(o.make(), max_consecutive_errors=3)
    state = tx.init(params)
    bad = _grads(0)
    bad["conv"] = bad["conv"].at[0, 0, 0, 0].set(jnp.nan)
    updates, state = jax.jit(tx.update)(bad, state, params)
    for n in params:
        np.testing.assert_array_equal(
            optax.apply_updates(params, updates)[n], params[n]
        )
    assert int(state.notfinite_count) == 1
    updates, state = jax.jit(tx.update)(_grads(0), state, params)
    want, _ = o.make().update(_grads(0), o.make().init(params), params)
    for n in params:  # (updates are differences of params: errors at their ulp)
        np.testing.assert_allclose(updates[n], want[n], atol=1e-6)


@pytest.mark.parametrize(
    "name", fewer_by_default(NEW, ["adamp", "nero", "rotational-sgdm"])
)
def test_state_round_trips_through_orbax(name, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = {**_tree(), "bias": jnp.zeros(8)}
    labels = {"conv": "manifold", "fc": "manifold", "bias": "euclidean"}
    tx = riemax.hybrid(OPTIMIZERS[name].make(), optax.sgd(0.1, momentum=0.9), labels)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for k in range(2):
        updates, state = update({**_grads(k), "bias": jnp.ones(8)}, state, params)
        params = optax.apply_updates(params, updates)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        target = jax.tree.map(jnp.zeros_like, tx.init(params))
        restored = mngr.restore(2, args=ocp.args.StandardRestore(target))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    g = {**_grads(5), "bias": jnp.ones(8)}
    np.testing.assert_array_equal(
        update(g, restored, params)[0]["conv"],
        update(g, state, params)[0]["conv"],
    )


MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, numpy as np, optax, riemax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from helpers import OPTIMIZERS
    assert jax.device_count() == 8, jax.devices()

    params = {"conv": riemax.center_units(jax.random.normal(jax.random.key(0), (3, 3, 4, 8))),
              "fc": riemax.center_units(jax.random.normal(jax.random.key(1), (16, 8))),
              "bias": jnp.zeros(8)}
    labels = {"conv": "manifold", "fc": "manifold", "bias": "euclidean"}
    per_device = [jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(7 + i), p.shape), params)
                  for i in range(8)]
    mean_g = jax.tree.map(lambda *g: sum(g) / 8, *per_device)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    spec = {"conv": P(None, None, None, "d"), "fc": P("d", None), "bias": P()}
    shard = lambda t: jax.tree.map(lambda x, sp: jax.device_put(x, NamedSharding(mesh, sp)), t, spec)
    rep = lambda t: jax.tree.map(lambda x: jnp.stack([x] * 8), t)
    worst = 0.0
    for name in sys.argv[1:]:
        tx = riemax.hybrid(OPTIMIZERS[name].make(), optax.sgd(0.1, momentum=0.9), labels)

        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        ref_p, ref_s = params, tx.init(params)
        for _ in range(3):
            ref_p, ref_s = jax.jit(step)(ref_p, ref_s, mean_g)

        def pstep(p, s, g):
            return step(p, s, jax.lax.pmean(g, "d"))
        pp, ps = rep(params), rep(tx.init(params))
        stacked = jax.tree.map(lambda *g: jnp.stack(g), *per_device)
        for _ in range(3):
            pp, ps = jax.pmap(pstep, axis_name="d")(pp, ps, stacked)
        err_pmap = max(float(jnp.max(jnp.abs(pp[k] - ref_p[k][None]))) for k in params)

        sp, ss = shard(params), tx.init(shard(params))
        g = shard(mean_g)
        for _ in range(3):
            sp, ss = jax.jit(step)(sp, ss, g)
        assert sp["conv"].sharding.spec == P(None, None, None, "d")
        err_shard = max(float(jnp.max(jnp.abs(sp[k] - ref_p[k]))) for k in params)
        print(name, err_pmap, err_shard)
        assert err_pmap < 1e-6 and err_shard < 1e-6, (name, err_pmap, err_shard)
    print("OK")
    """
)


@pytest.mark.parametrize(
    "names",
    [
        # The projection test (with its cross-unit layer view) and the wrapper
        # around an optax transformation; every new optimizer in the slow run.
        ["adamp", "rotational-adamw"],
        pytest.param(NEW, marks=pytest.mark.slow),
    ],
    ids=["fast", "all"],
)
def test_pmap_and_named_sharding_match_single_device(names):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE_SCRIPT, *names],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout
