"""Cayley SGD and Cayley Adam on the Stiefel geometry: parity with the float64
reference (``tests/reference/cayley.py``), orthonormality over long float32 runs,
the geometry's contract, refusals that name the leaf, and the routing and start
helpers around them."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import x64
from reference import cayley as ref

import riemax
from riemax import _cayley, _geometry, diagnostics
from riemax._stiefel import STIEFEL

#: A conv kernel, a dense one and a square one (units = fan-in).
SHAPES = {"conv": (3, 3, 4, 8), "dense": (16, 6), "square": (6, 6)}
STEPS = 20


def _orthonormal(shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    return ref.to_kernel(ref.qr(ref.to_rows(x)), shape)


def _start_point(seed=0):
    """Near the manifold but not on it: orthonormal kernels whose units are then
    rescaled (every step starts by normalising them)."""
    rng = np.random.default_rng(seed + 100)
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        w = _orthonormal(shape, seed + i)
        out[name] = w * (1 + 0.2 * rng.standard_normal(shape[-1]))
    return out


class Field:
    """Step ``k``'s gradient at ``w``: a fixed random matrix plus a pull on ``w``
    (so the gradient depends on the iterate)."""

    def __init__(self, seed=1):
        rng = np.random.default_rng(seed)
        self.r = [
            {n: rng.standard_normal(s) for n, s in SHAPES.items()} for _ in range(STEPS)
        ]

    def __call__(self, k, params):
        return {
            n: self.r[k][n] + 0.3 * np.asarray(w, np.float64) for n, w in params.items()
        }


def _jitted_step(tx):
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


# ------------------------------------------------------------------------- parity

#: (riemax optimizer, reference optimizer) per variant; the QR step fires on
#: steps 7 and 14.
VARIANTS = {
    "sgd-code": (
        lambda: riemax.cayley_sgd(0.8, reorthonormalize_every=7),
        lambda w: ref.CayleySGD(w, 0.8, qr_every=7),
    ),
    "sgd-paper": (
        lambda: riemax.cayley_sgd(
            0.2,
            0.9,
            keep_momentum=True,
            iterations=2,
            start="projected",
            reorthonormalize_every=7,
        ),
        lambda w: ref.CayleySGD(
            w, 0.2, 0.9, keep_momentum=True, iterations=2, start="projected", qr_every=7
        ),
    ),
    "adam-code": (
        lambda: riemax.cayley_adam(0.5, reorthonormalize_every=7),
        lambda w: ref.CayleyAdam(w, 0.5, qr_every=7),
    ),
    "adam-paper": (
        lambda: riemax.cayley_adam(
            0.5, iterations=2, start="projected", reorthonormalize_every=7
        ),
        lambda w: ref.CayleyAdam(w, 0.5, iterations=2, start="projected", qr_every=7),
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_equals_the_float64_reference_over_20_steps(variant):
    """Code and paper variants of both optimizers agree with the reference (which
    forms the n x n skew matrix) to 1e-10 over 20 steps on conv, dense and square
    kernels, through two QR steps (measured: below 4e-15)."""
    make, make_ref = VARIANTS[variant]
    field = Field()
    with x64():
        start = _start_point()
        params = {n: jnp.asarray(w) for n, w in start.items()}
        tx = make()
        state, step = tx.init(params), _jitted_step(tx)
        refs = {n: make_ref(w) for n, w in start.items()}
        want = dict(start)
        worst = 0.0
        for k in range(STEPS):
            grads = field(k, {n: np.asarray(w) for n, w in params.items()})
            params, state = step(
                params, state, {n: jnp.asarray(g) for n, g in grads.items()}
            )
            ref_grads = field(k, want)
            want = {n: refs[n].step(want[n], ref_grads[n]) for n in want}
            for n in want:
                worst = max(
                    worst, float(np.max(np.abs(np.asarray(params[n]) - want[n])))
                )
    assert worst < 1e-10, (variant, worst)
    # The steps moved the kernels.
    assert max(float(np.max(np.abs(want[n] - start[n]))) for n in want) > 0.1


def test_blockwise_one_norm_equals_the_norm_of_the_whole_matrix():
    """Blocks that do not divide n, one block, and the mirrored upper triangle:
    the largest absolute column sum of W = A U^T - U A^T, exactly."""
    rng = np.random.default_rng(3)
    with x64():
        a, u = rng.standard_normal((11, 3)), rng.standard_normal((11, 3))
        w = a @ u.T - u @ a.T
        want = ref.norm1(w)
        norm1 = jax.jit(_cayley._skew_norm1, static_argnums=2)
        for block in (1, 4, 11, 64):
            got = float(norm1(jnp.asarray(a), jnp.asarray(u), block))
            assert abs(got - want) < 1e-12 * want, (block, got, want)


# --------------------------------------------------------------- long float32 runs

#: Kernels of the long runs: conv, dense and square.
LONG_SHAPES = {"conv": (3, 3, 16, 32), "dense": (64, 32), "square": (32, 32)}


def _orthonormality_over(tx, steps):
    """The largest ``||X X^T - I||_F`` of every kernel over ``steps`` float32
    steps with N(0, 1) gradients (large enough that the step cap binds)."""
    keys = jax.random.split(jax.random.key(0), len(LONG_SHAPES))
    params = {
        n: jax.random.normal(k, s)
        for k, (n, s) in zip(keys, LONG_SHAPES.items(), strict=True)
    }
    params = riemax.to_manifold(params, "qr")

    def body(carry, key):
        p, s = carry
        ks = jax.random.split(key, len(LONG_SHAPES))
        g = {
            n: jax.random.normal(k, LONG_SHAPES[n])
            for k, n in zip(ks, LONG_SHAPES, strict=True)
        }
        updates, s = tx.update(g, s, p)
        p = optax.apply_updates(p, updates)
        err = diagnostics.orthogonality_error(p)
        return (p, s), jnp.stack([err[n] for n in LONG_SHAPES])

    run = jax.jit(
        lambda p, s: jax.lax.scan(
            body, (p, s), jax.random.split(jax.random.key(1), steps)
        )
    )
    _, errs = run(params, tx.init(params))
    return np.asarray(errs).max(axis=0)


def test_orthonormality_holds_over_1000_float32_steps_with_the_code_defaults():
    """5 iterations, QR every 101 steps, the authors' learning rates (0.8 for SGD,
    0.5 for Adam): ||X X^T - I||_F stays below 1e-3 on every kernel (measured:
    SGD 8e-6 conv, 4e-5 dense, 6e-4 square; Adam 3e-6 on all three). The paper's
    variant (2 iterations from the projected momentum, momentum kept) drifts
    more between QR steps on the same gradients: SGD 1e-2 conv, 3e-2 dense, 0.1
    square; Adam 1.3e-4."""
    sgd = _orthonormality_over(riemax.cayley_sgd(0.8), 1000)
    adam = _orthonormality_over(riemax.cayley_adam(0.5), 1000)
    assert sgd.max() < 1e-3 and adam.max() < 1e-3, (sgd, adam)
    # Two QR periods are enough to see the paper's variant drift further.
    paper = _orthonormality_over(
        riemax.cayley_sgd(0.8, keep_momentum=True, iterations=2, start="projected"), 202
    )
    assert paper.max() > 1e-2 and np.all(paper > sgd), (paper, sgd)


# --------------------------------------------------------------- the QR schedule


def test_the_qr_step_fires_on_steps_k_2k_and_nowhere_else():
    """With a zero gradient a step only normalises the units, except on the QR
    steps: from the same kernel of unit but not orthonormal columns, the step
    lands on the manifold exactly on steps 3 and 6 (``reorthonormalize_every=3``),
    and never with ``None``."""
    x = np.random.default_rng(0).standard_normal((8, 3))
    w = {"dense": jnp.asarray(x / np.linalg.norm(x, axis=0), jnp.float32)}
    zero = jax.tree.map(jnp.zeros_like, w)
    for every, fired in ((3, {3, 6}), (None, set())):
        tx = riemax.cayley_sgd(0.5, reorthonormalize_every=every)
        state, update = tx.init(w), jax.jit(tx.update)
        for k in range(1, 8):
            updates, state = update(zero, state, w)
            err = float(
                diagnostics.orthogonality_error(optax.apply_updates(w, updates))[
                    "dense"
                ]
            )
            assert (err < 1e-5) == (k in fired), (every, k, err)
            assert (
                err < 1e-5
                or abs(err - float(diagnostics.orthogonality_error(w)["dense"])) < 1e-5
            )


# -------------------------------------------------------------------- invariants


def _kernels(dtype=jnp.float32, seed=0):
    return {
        n: jnp.asarray(_orthonormal(s, seed + i), dtype)
        for i, (n, s) in enumerate(SHAPES.items())
    }


BOTH = {
    "cayley_sgd": lambda **kw: riemax.cayley_sgd(0.8, **kw),
    "cayley_adam": lambda **kw: riemax.cayley_adam(0.5, **kw),
    "scale_by_cayley_sgd": lambda **kw: riemax.scale_by_cayley_sgd(0.8, **kw),
    "scale_by_cayley_adam": lambda **kw: riemax.scale_by_cayley_adam(0.5, **kw),
}


@pytest.mark.parametrize("name", sorted(BOTH))
def test_a_wide_leaf_or_a_bias_is_refused_naming_its_path(name):
    tx = BOTH[name]()
    wide = {"block": {"dense": {"kernel": jnp.ones((4, 10))}}}
    with pytest.raises(
        ValueError,
        match=rf"riemax\.{name}: parameter 'block/dense/kernel' of shape \(4, 10\) has 10 units but a fan-in of 4",
    ):
        tx.init(wide)
    tall = {"block": {"dense": {"kernel": jnp.ones((10, 4))}}}
    with pytest.raises(ValueError, match=r"'block/dense/kernel' of shape \(4, 10\)"):
        tx.update(wide, tx.init(tall), wide)
    with pytest.raises(
        ValueError, match=r"'conv/bias' has shape \(4,\).*riemax.hybrid"
    ):
        tx.init({"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)}})


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda n: BOTH[n](iterations=0), r"iterations must be at least 1"),
        (lambda n: BOTH[n](iterations=2.0), r"iterations must be an int"),
        (lambda n: BOTH[n](start="paper"), r"start must be one of 'raw', 'projected'"),
        (lambda n: BOTH[n](reorthonormalize_every=0), r"reorthonormalize_every must be at least 1"),
        (lambda n: BOTH[n](reorthonormalize_every=True), r"reorthonormalize_every must be an int"),
        (lambda n: getattr(riemax, n)(-0.1), r"learning_rate must be in \[0, inf\]"),
        (lambda n: getattr(riemax, n)(float("nan")), r"learning_rate must be finite"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("name", sorted(BOTH))
def test_bad_arguments_name_the_function_the_user_called(name, call, message):
    with pytest.raises((ValueError, TypeError), match=rf"^riemax\.{name}: {message}"):
        call(name)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: riemax.cayley_sgd(0.8, momentum=1.5), r"cayley_sgd: momentum must be in"),
        (lambda: riemax.cayley_sgd(0.8, keep_momentum=1), r"cayley_sgd: keep_momentum must be True or False"),
        (lambda: riemax.cayley_adam(0.5, b1=1.0), r"cayley_adam: b1 must be in \[0, 1\)"),
        (lambda: riemax.cayley_adam(0.5, eps=-1e-8), r"cayley_adam: eps must be in \[0, inf\]"),
        (lambda: riemax.scale_by_cayley_adam(0.5, b2=-0.1), r"scale_by_cayley_adam: b2 must be in"),
    ],
)  # fmt: skip
def test_bad_hyper_parameters_name_the_argument(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize("name", ["cayley_sgd", "cayley_adam"])
def test_a_schedule_is_read_at_the_count_before_the_step(name):
    """A schedule gives the same steps as the floats it takes, the first update
    at ``schedule(0)``."""
    params = {"dense": jnp.asarray(_orthonormal((16, 6), 0), jnp.float32)}
    grads = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p) + p, params)
    schedule = optax.piecewise_constant_schedule(0.05, {1: 10.0})  # 0.05, then 0.5
    scheduled, fixed_first, fixed_second = (
        getattr(riemax, name)(lr) for lr in (schedule, 0.05, 0.5)
    )
    s = scheduled.init(params)
    u1, s = jax.jit(scheduled.update)(grads, s, params)
    u2, _ = jax.jit(scheduled.update)(grads, s, params)
    f1, s_f = jax.jit(fixed_first.update)(grads, fixed_first.init(params), params)
    f2, _ = jax.jit(fixed_second.update)(grads, s_f, params)
    for a, b in ((u1, f1), (u2, f2)):
        for n in params:
            np.testing.assert_allclose(np.asarray(a[n]), np.asarray(b[n]), atol=1e-7)


@pytest.mark.parametrize("name", ["cayley_sgd", "cayley_adam"])
def test_inject_hyperparams_with_the_structural_options_static(name):
    """Under optax.inject_hyperparams (learning rate and decays traced) the steps
    equal the plain optimizer's; without static_args the error says what to do."""
    factory = getattr(riemax, name)
    hyper = {"learning_rate": 0.5, "b1": 0.8} if name == "cayley_adam" else {}
    hyper = hyper or {"learning_rate": 0.5, "momentum": 0.5, "keep_momentum": True}
    params = {"dense": jnp.asarray(_orthonormal((16, 6), 0), jnp.float32)}
    grads = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p) + p, params)
    static = _cayley.STATIC_ARGS if name == "cayley_sgd" else _cayley.STATIC_ARGS[1:]
    injected = optax.inject_hyperparams(factory, static_args=static)(**hyper)
    plain = factory(**hyper)
    a, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    b, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    np.testing.assert_allclose(
        np.asarray(a["dense"]), np.asarray(b["dense"]), atol=1e-6
    )
    with pytest.raises(TypeError, match=r"iterations must be an int.*static_args"):
        optax.inject_hyperparams(factory)(learning_rate=0.5).init(params)


def test_bf16_params_step_in_float32_and_stay_nearly_orthonormal():
    """bf16 kernels and gradients: bf16 updates, float32 state, finite values,
    and orthonormality within bf16 rounding after 20 steps."""
    params = _kernels(jnp.bfloat16)
    for tx in (riemax.cayley_sgd(0.8, keep_momentum=True), riemax.cayley_adam(0.5)):
        state, step, p = tx.init(params), _jitted_step(tx), params
        for k in range(20):
            g = {
                n: jax.random.normal(jax.random.key(k), x.shape, jnp.bfloat16)
                for n, x in p.items()
            }
            p, state = step(p, state, g)
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
        floats = [x for x in jax.tree.leaves(state) if x.dtype != jnp.int32]
        assert floats and all(x.dtype == jnp.float32 for x in floats)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((p, state)))
        errors = diagnostics.orthogonality_error(p)
        assert max(float(e) for e in jax.tree.leaves(errors)) < 5e-2, errors


@pytest.mark.parametrize("name", ["cayley_sgd", "cayley_adam"])
def test_zero_and_huge_gradients_give_finite_steps(name):
    """A zero gradient leaves an orthonormal kernel where it is (to float32
    rounding); gradients of 1e30 per element give a finite state and finite
    params. Cayley SGD's capped step does not depend on the gradient's scale:
    1e30 times the gradient takes the same steps."""
    tx = getattr(riemax, name)(0.5)
    params = _kernels()
    step = _jitted_step(tx)
    zero = jax.tree.map(jnp.zeros_like, params)
    p, state = step(params, tx.init(params), zero)
    for n in params:
        np.testing.assert_allclose(np.asarray(p[n]), np.asarray(params[n]), atol=1e-6)
    runs = []
    for scale in (1.0, 1e30):
        state, p = tx.init(params), params
        for k in range(3):
            g = {
                n: scale * jax.random.normal(jax.random.key(k), x.shape)
                for n, x in p.items()
            }
            p, state = step(p, state, g)
            assert all(
                bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((p, state))
            )
        runs.append(p)
    if name == "cayley_sgd":  # Adam's raw start is as large as its moment
        for n in params:
            np.testing.assert_allclose(
                np.asarray(runs[1][n]), np.asarray(runs[0][n]), atol=1e-5
            )


@pytest.mark.parametrize("name", ["cayley_sgd", "cayley_adam"])
def test_no_nan_through_jax_grad_of_the_update(name):
    """Gradients of a loss of the new params with respect to the params and the
    gradient are finite, at a zero gradient and on a QR step alike."""
    params = {"conv": jnp.asarray(_orthonormal((3, 3, 2, 4), 0), jnp.float32)}
    for every in (1, 101):
        tx = getattr(riemax, name)(0.5, reorthonormalize_every=every)
        state = tx.init(params)

        @jax.jit
        def grad(p, g, tx=tx, state=state):
            def loss(p, g):
                updates, _ = tx.update(g, state, p)
                new = optax.apply_updates(p, updates)
                return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(new))

            return jax.grad(loss, argnums=(0, 1))(p, g)

        for g in (
            jax.tree.map(jnp.zeros_like, params),
            jax.tree.map(jnp.ones_like, params),
        ):
            grads = grad(params, g)
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))


# ---------------------------------------------------------- routing and the start


def _model_params():
    rng = np.random.default_rng(5)
    return {
        "conv0": {
            "kernel": jnp.asarray(rng.standard_normal((3, 3, 3, 16)), jnp.float32)
        },
        "block": {
            "conv1": {
                "kernel": jnp.asarray(rng.standard_normal((3, 3, 16, 16)), jnp.float32)
            },
            "conv_wide": {
                "kernel": jnp.asarray(rng.standard_normal((1, 1, 4, 16)), jnp.float32)
            },
            "bn": {"scale": jnp.ones(16), "bias": jnp.zeros(16)},
        },
        "dense": {
            "kernel": jnp.asarray(rng.standard_normal((16, 10)), jnp.float32),
            "bias": jnp.zeros(10),
        },
    }


TALL = functools.partial(riemax.labels_by_rule, fan="tall")


def test_to_manifold_qr_orthonormalises_exactly_the_chosen_kernels():
    params = _model_params()
    labels = TALL(params)
    assert labels["conv0"]["kernel"] == labels["block"]["conv1"]["kernel"] == "manifold"
    assert (
        labels["block"]["conv_wide"]["kernel"]
        == labels["dense"]["kernel"]
        == "euclidean"
    )
    started = riemax.to_manifold(params, "qr", TALL)
    errors = diagnostics.orthogonality_error(started)
    assert float(errors["conv0"]["kernel"]) < 1e-5
    assert float(errors["block"]["conv1"]["kernel"]) < 1e-5
    assert float(errors["dense"]["kernel"]) > 1.0
    assert started["dense"]["kernel"] is params["dense"]["kernel"]
    assert (
        started["block"]["conv_wide"]["kernel"]
        is params["block"]["conv_wide"]["kernel"]
    )
    # The QR retraction keeps the span of the units in order (sign of diag R > 0).
    m = np.asarray(params["conv0"]["kernel"]).reshape(-1, 16)
    q = np.asarray(started["conv0"]["kernel"]).reshape(-1, 16)
    assert np.all(np.sum(m * q, axis=0) > 0)
    # Dense kernels on request: pattern "" takes every tall kernel.
    every = riemax.to_manifold(
        params, "qr", functools.partial(riemax.labels_by_rule, pattern="", fan="tall")
    )
    assert float(diagnostics.orthogonality_error(every)["dense"]["kernel"]) < 1e-5


@pytest.mark.parametrize("name", ["cayley_sgd", "cayley_adam"])
def test_hybrid_routes_tall_kernels_to_cayley_and_the_rest_to_nesterov_sgd(name):
    """riemax.hybrid and plain optax.partition with the tall-kernel labels: the
    same updates; the Euclidean leaves take exactly optax's step; the manifold
    kernels stay orthonormal; an extra argument (the loss) is accepted."""
    params = riemax.to_manifold(_model_params(), "qr", TALL)
    manifold = getattr(riemax, name)(0.5)
    euclidean = optax.sgd(0.1, 0.9, nesterov=True)
    hybrid = riemax.hybrid(manifold, euclidean, TALL)
    plain = optax.partition({"manifold": manifold, "euclidean": euclidean}, TALL)
    grads = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params)
    a, _ = hybrid.update(grads, hybrid.init(params), params, value=jnp.asarray(1.0))
    b, _ = plain.update(grads, plain.init(params), params)
    c, _ = euclidean.update(grads, euclidean.init(params), params)
    labels = TALL(params)
    for (path, x), y, z, label in zip(
        jax.tree_util.tree_flatten_with_path(a)[0],
        jax.tree.leaves(b),
        jax.tree.leaves(c),
        jax.tree.leaves(labels),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
        if label == "euclidean":
            np.testing.assert_array_equal(
                np.asarray(x), np.asarray(z), err_msg=str(path)
            )
    new = optax.apply_updates(params, a)
    errors = diagnostics.orthogonality_error(new)
    assert float(errors["block"]["conv1"]["kernel"]) < 1e-5


# ------------------------------------------------------------- the lowered step

CONTROL_FLOW = re.compile(r"stablehlo\.(case|if|while)\b")


def _lowered_conditionals(tx, count):
    params = {f"conv{i:02d}": jnp.ones((3, 3, 16, 16)) for i in range(count)}
    state = tx.init(params)

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return len(
        CONTROL_FLOW.findall(jax.jit(step).lower(params, state, params).as_text())
    )


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: riemax.cayley_sgd(0.8), 2),
        (lambda: riemax.cayley_adam(0.5), 2),
        (lambda: riemax.cayley_sgd(0.8, reorthonormalize_every=None), 1),
    ],
    ids=["sgd", "adam", "sgd-no-qr"],
)
def test_conditionals_do_not_grow_with_the_number_of_leaves(make, expected):
    """One conditional for the unit normalisation's robust path and one for the
    QR step, for one kernel as for twenty (lowering only, nothing compiled)."""
    assert (
        _lowered_conditionals(make(), 1)
        == _lowered_conditionals(make(), 20)
        == expected
    )


# ------------------------------------------------------------ the geometry itself


def test_stiefel_geometry_contract():
    """In float64: the projection is tangent (M^T D + D^T M = 0) and idempotent,
    the retraction lands on the manifold, the transport lands in the tangent
    space of the new point, and the registry name resolves to it."""
    assert riemax.geometry("stiefel") is STIEFEL
    assert STIEFEL.point_axes(4) == (0, 1, 2, 3)
    rng = np.random.default_rng(7)
    with x64():
        w = jnp.asarray(_orthonormal((3, 3, 2, 5), 0))
        m = np.asarray(w).reshape(-1, 5)
        g = jnp.asarray(rng.standard_normal(w.shape))
        d = np.asarray(STIEFEL.project(w, g))
        dm = d.reshape(-1, 5)
        np.testing.assert_allclose(m.T @ dm + dm.T @ m, 0.0, atol=1e-12)
        np.testing.assert_allclose(
            np.asarray(STIEFEL.project(w, jnp.asarray(d))), d, atol=1e-12
        )
        new = np.asarray(STIEFEL.retract(w, jnp.asarray(0.3 * d))).reshape(-1, 5)
        np.testing.assert_allclose(new.T @ new, np.eye(5), atol=1e-12)
        t = np.asarray(
            STIEFEL.transport(jnp.asarray(new.reshape(w.shape)), jnp.asarray(d))
        )
        t = t.reshape(-1, 5)
        np.testing.assert_allclose(new.T @ t + t.T @ new, 0.0, atol=1e-12)
        # qr_retraction: Q with the signs of diag R; a zero unit stays zero.
        x = rng.standard_normal((7, 3))
        q, r = np.linalg.qr(x)
        want = q * np.sign(np.diag(r))
        np.testing.assert_allclose(
            np.asarray(riemax.qr_retraction(jnp.asarray(x))), want, atol=1e-12
        )
        x[:, 2] = 0.0
        np.testing.assert_allclose(
            np.asarray(riemax.qr_retraction(jnp.asarray(x)))[:, 2], 0.0, atol=1e-7
        )


def test_the_seam_trains_on_the_stiefel_manifold_and_refuses_wide_leaves():
    """manifold_project -> momentum -> manifold_retract on "stiefel" (the
    geometry's QR retraction): a Procrustes problem, min ||M - T||^2 over
    orthonormal M, is solved while every iterate stays orthonormal."""
    target = jnp.asarray(_orthonormal((12, 4), 3), jnp.float32)
    w = jnp.asarray(_orthonormal((12, 4), 4), jnp.float32)
    tx = optax.chain(
        riemax.manifold_project("stiefel"),
        optax.scale(-0.2),
        riemax.manifold_momentum(0.5, "stiefel"),
        riemax.manifold_retract("stiefel"),
    )

    def loss(w):
        return jnp.sum((w - target) ** 2)

    @jax.jit
    def step(w, state):
        updates, state = tx.update(jax.grad(loss)(w), state, w)
        return optax.apply_updates(w, updates), state

    state, first = tx.init(w), float(loss(w))
    for _ in range(60):
        w, state = step(w, state)
    assert float(loss(w)) < 1e-3 * first
    assert float(diagnostics.orthogonality_error(w)) < 1e-5
    with pytest.raises(
        ValueError, match=r"manifold_project: parameter 'fc/kernel' of shape \(3, 5\)"
    ):
        riemax.manifold_project("stiefel").init({"fc": {"kernel": jnp.ones((3, 5))}})
    with pytest.raises(ValueError, match=r"unknown Stiefel retraction 'cayley'.*'qr'"):
        _geometry._checked("manifold_project", STIEFEL._replace(retraction="cayley"), w)
