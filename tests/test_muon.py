"""The matrix sign, manifold Muon and hyperspherical descent.

* ``msign``: parity with the float64 reference (1, 3 and 10 iterations; tall,
  wide, square), distance to the exact polar factor (float64 about 1e-15, float32
  about 2e-7 and bfloat16 about 1e-2 on well-conditioned matrices), zero in,
  zero out, with a zero gradient.
* Manifold Muon: 5-step float64 trajectories under a decaying learning rate
  equal the reference to 1e-10 on tall, wide, square and conv kernels, with a
  dual ascent that stops early and one that runs out; in float32 the kernels
  stay on the Stiefel manifold (``||W^T W - I||_F`` about 5e-7 after 200
  steps), with bfloat16 matrix signs at the original code's level (about 1e-2).
* Hyperspherical descent: parity and unit norm.
* The start projections, the hybrid recipe on a 3-layer MLP without biases,
  schedules and extra arguments, and the shape of the compiled step: every loop
  has a fixed trip count, one loop per matrix shape, no conditional per leaf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import GradientField, max_abs_diff, run_riemax, x64
from reference import muon as ref

import riemax

#: Kernels of every orientation. The wide kernel's matrix is the transpose of
#: the tall one's shape, so the two run stacked in one loop.
SHAPES = {"tall": (16, 6), "wide": (6, 16), "square": (8, 8), "conv": (3, 3, 4, 8)}
STEPS = 5
#: A dual ascent in which the wide kernel passes its test after 21 to 26 of 30
#: iterations on three of the five steps while the tall one, stacked with it in
#: the same loop, runs out; and the defaults, under which it runs out on every
#: non-square kernel. A square kernel's first direction is already tangent: it
#: stops at the first iteration in both.
DUAL = {
    "stops early": {"dual_steps": 30, "dual_learning_rate": 0.3, "tol": 5e-3},
    "runs out": {},
}


def _lr(count):
    """0.1 decayed linearly to 0 over STEPS (float64 under x64)."""
    return 0.1 * (1.0 - jnp.asarray(count).astype(float) / STEPS)


def _start(shapes, seed=0, method=ref.msign_start):
    rng = np.random.default_rng(seed)
    return {k: method(rng.standard_normal(s)) for k, s in shapes.items()}


#: The matrix sign, compiled once per shape, dtype and iteration count.
msign = jax.jit(riemax.msign, static_argnames=("steps", "dtype"))


def _stiefel_error(w):
    m = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
    if m.shape[0] < m.shape[1]:
        m = m.T
    return float(np.linalg.norm(m.T @ m - np.eye(m.shape[1])))


# ------------------------------------------------------------------------ msign


@pytest.mark.parametrize("shape", [(24, 6), (6, 24), (7, 7)], ids=str)
def test_msign_matches_reference_float64(shape):
    x = np.random.default_rng(1).standard_normal(shape)
    with x64():
        for steps in (1, 3, 10):
            got = np.asarray(msign(jnp.asarray(x), steps=steps, dtype=jnp.float64))
            np.testing.assert_allclose(got, ref.msign(x, steps), rtol=0, atol=1e-12)


def test_msign_reaches_the_polar_factor():
    """float64: to rounding after 10 iterations; float32 to 1e-6 (measured about
    2e-7); bfloat16 to 3e-2 (measured 5e-3 to 9e-3), on random Gaussian
    matrices (condition number about 2.5)."""
    rng = np.random.default_rng(2)
    for shape in ((64, 16), (16, 64)):
        x = rng.standard_normal(shape)
        polar = ref.polar(x)
        with x64():
            got = msign(jnp.asarray(x), dtype=jnp.float64)
            assert float(np.abs(np.asarray(got) - polar).max()) < 1e-12
        x32 = jnp.asarray(x, jnp.float32)
        f32 = np.asarray(msign(x32), np.float64)
        assert float(np.abs(f32 - polar).max()) < 1e-6
        b16 = msign(x32, dtype=jnp.bfloat16)
        assert b16.dtype == jnp.float32  # the input's dtype
        assert float(np.abs(np.asarray(b16, np.float64) - polar).max()) < 3e-2


def test_msign_of_zero_is_zero_with_a_zero_gradient_and_stacks_are_per_matrix():
    @jax.jit
    def run(zero, x):
        grad = jax.grad(lambda x: jnp.sum(riemax.msign(x) ** 2))(zero)
        stacked = riemax.msign(x.at[1].set(0.0))
        alone = [riemax.msign(x[i]) for i in (0, 2)]
        return (
            riemax.msign(zero),
            grad,
            stacked,
            alone,
            riemax.msign(x[0].astype(jnp.bfloat16)),
        )

    x = jax.random.normal(jax.random.key(0), (3, 5, 2))
    signed, grad, stacked, alone, bf16 = run(jnp.zeros((5, 2)), x)
    np.testing.assert_array_equal(np.asarray(signed), 0.0)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    for i, a in zip((0, 2), alone, strict=True):
        np.testing.assert_allclose(stacked[i], a, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stacked[1]), 0.0)
    assert bf16.dtype == jnp.bfloat16 and bool(jnp.isfinite(bf16).all())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: riemax.msign(jnp.ones(3)), "riemax.msign: x must be a matrix"),
        (lambda: riemax.msign(jnp.ones((2, 2)), steps=0), "riemax.msign: steps"),
        (
            lambda: riemax.msign(jnp.ones((2, 2)), dtype=jnp.int32),
            "riemax.msign: dtype",
        ),
        (lambda: riemax.manifold_muon(0.1, dual_steps=0), "riemax.manifold_muon: dual"),
        (lambda: riemax.manifold_muon(-0.1), "riemax.manifold_muon: learning_rate"),
        (
            lambda: riemax.scale_by_manifold_muon(0.1, msign_dtype="int8"),
            "riemax.scale_by_manifold_muon: msign_dtype",
        ),
        (
            lambda: riemax.manifold_muon(0.1, tol=float("nan")),
            "riemax.manifold_muon: tol",
        ),
        (
            lambda: riemax.hyperspherical_descent("fast"),
            "riemax.hyperspherical_descent: learning_rate",
        ),
        (
            lambda: riemax.manifold_muon(0.1).init({"b": jnp.ones(3)}),
            "riemax.manifold_muon: parameter 'b' has shape (3,)",
        ),
        (
            lambda: riemax.to_manifold({"b": jnp.ones(3)}, "msign"),
            "riemax.to_manifold: parameter 'b': the 'msign' start",
        ),
    ],
)
def test_errors_name_the_function_and_the_parameter(call, message):
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    assert str(err.value).startswith(message), str(err.value)


# ----------------------------------------------------------------- manifold Muon


@pytest.mark.parametrize("dual", sorted(DUAL))
def test_manifold_muon_matches_reference_float64(dual):
    kwargs = DUAL[dual]
    params0, field = _start(SHAPES), GradientField(SHAPES, STEPS)
    with x64():
        tx = riemax.manifold_muon(_lr, msign_dtype=jnp.float64, **kwargs)
        got, state = run_riemax(tx, params0, field, STEPS, jnp.float64)
    assert int(state.count) == STEPS
    params = {k: v.copy() for k, v in params0.items()}
    used = {k: [] for k in params}
    T = kwargs.get("dual_steps", 100)
    for k in range(STEPS):
        grads = field(k, params)
        for name in params:
            params[name], n = ref.manifold_muon_step(
                params[name],
                grads[name],
                0.1 * (1 - k / STEPS),
                T,
                kwargs.get("dual_learning_rate", 0.01),
                kwargs.get("tol", 1e-6),
            )
            used[name].append(n)
    assert max_abs_diff(got, params) < 1e-10
    assert used["square"] == [1] * STEPS
    others = [n for name in ("tall", "wide", "conv") for n in used[name]]
    if dual == "runs out":
        assert others == [T] * len(others), used
    else:
        assert min(others) < T and max(others) <= T, used
    for name in params:
        assert _stiefel_error(got[name]) < 1e-12


def _drift(msign_dtype, steps, dual_steps):
    """Max over steps and kernels (tall, wide, conv) of ||W^T W - I||_F, float32
    params, random gradients plus a pull on W, lr 0.1 decayed linearly to 0."""
    key = jax.random.key(3)
    shapes = {k: SHAPES[k] for k in ("tall", "wide", "conv")}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in _start(shapes, 4).items()}
    tx = riemax.manifold_muon(
        optax.linear_schedule(0.1, 0.0, steps),
        dual_steps=dual_steps,
        msign_dtype=msign_dtype,
    )

    def error(w):
        m = w.reshape(-1, w.shape[-1])
        m = m.T if m.shape[0] < m.shape[1] else m
        return jnp.sqrt(jnp.sum((m.T @ m - jnp.eye(m.shape[1])) ** 2))

    def body(carry, k):
        p, s = carry
        g = jax.tree.map(
            lambda w: jax.random.normal(jax.random.fold_in(key, k), w.shape) + 0.5 * w,
            p,
        )
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), jnp.stack([error(w) for w in jax.tree.leaves(p)])

    run = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), jnp.arange(steps)))
    (_, _), errors = run(params)
    return float(errors.max())


def test_manifold_muon_keeps_float32_kernels_on_the_stiefel_manifold():
    """200 float32 steps: ||W^T W - I||_F stays below 1e-5 (measured about 5e-7,
    also with the default 100 dual iterations)."""
    assert _drift(jnp.float32, 200, 10) < 1e-5


def test_bfloat16_matrix_sign_stays_at_the_original_level():
    """msign in bfloat16, as the original code computes it: the error stays at
    about 1e-2 (the original's layers: 0.013 to 0.044), far above float32's."""
    err = _drift(jnp.bfloat16, 40, 5)
    assert 1e-3 < err < 5e-2, err


def test_bfloat16_params_and_zero_gradients_give_finite_updates():
    params = {k: jnp.asarray(v, jnp.bfloat16) for k, v in _start(SHAPES, 5).items()}
    tx = riemax.manifold_muon(0.1, dual_steps=3)
    step = jax.jit(tx.update)
    state = tx.init(params)
    for grads in (
        jax.tree.map(jnp.zeros_like, params),
        jax.tree.map(jnp.ones_like, params),
    ):
        updates, _ = step(grads, state, params)
        new = optax.apply_updates(params, updates)
        for name, u in updates.items():
            assert u.dtype == jnp.bfloat16 and bool(jnp.isfinite(u).all())
            assert _stiefel_error(np.asarray(new[name], np.float32)) < 0.1


def test_zero_kernel_and_zero_gradient_have_finite_gradients():
    """A zero gradient gives A = 0 and the step msign(W) - W; a zero kernel
    moves to msign(-lr msign(G)) = -msign(msign(G)); both zero stay zero. jax.grad through the
    update is finite at all of them."""
    tx = riemax.manifold_muon(0.1, dual_steps=1, msign_steps=3)
    w = jnp.asarray(_start({"k": (6, 3)}, 10)["k"], jnp.float32)
    g = jnp.asarray(np.random.default_rng(11).standard_normal((6, 3)), jnp.float32)

    def total(w, g):
        updates, _ = tx.update({"k": g}, tx.init({"k": w}), {"k": w})
        return jnp.sum(updates["k"] ** 2), updates["k"]

    run = jax.jit(jax.grad(total, argnums=(0, 1), has_aux=True))
    cases = [(w, jnp.zeros_like(g)), (jnp.zeros_like(w), g), (0 * w, 0 * g)]
    for (grad_w, grad_g), update in (run(a, b) for a, b in cases):
        for x in (grad_w, grad_g, update):
            assert bool(jnp.isfinite(x).all())
    np.testing.assert_allclose(
        run(*cases[0])[1], riemax.msign(w, steps=3) - w, rtol=0, atol=1e-6
    )
    a = riemax.msign(g, steps=3)
    np.testing.assert_allclose(run(*cases[1])[1], -riemax.msign(a, steps=3), atol=1e-5)
    assert float(jnp.abs(run(*cases[2])[1]).max()) == 0.0


def test_any_finite_gradient_magnitude():
    """The dual ascent is not scale-invariant in G (its step alpha is absolute),
    but G s with the dual step alpha s takes the same step: riemax gives it for
    s = 1e36 and 1e-30 too (overflow and underflow avoided by powers of two)."""
    w = jnp.asarray(_start({"k": (6, 3)}, 12)["k"], jnp.float32)
    g = jnp.asarray(np.random.default_rng(13).standard_normal((6, 3)), jnp.float32)
    hyper = optax.inject_hyperparams(
        riemax.manifold_muon, static_args=("dual_steps", "msign_steps")
    )

    @jax.jit
    def step(scale):
        tx = hyper(0.1, dual_steps=4, dual_learning_rate=0.3 * scale, msign_steps=6)
        return tx.update(g * scale, tx.init(w), w)[0]

    one = step(1.0)
    for scale in (1e36, 1e-30):
        np.testing.assert_allclose(step(scale), one, rtol=0, atol=1e-6)


def test_schedules_inject_hyperparams_and_extra_args():
    """An optax schedule is read at the step count; under inject_hyperparams
    (structural options static) the steps are the same; ``value=`` is ignored."""
    shapes = {k: SHAPES[k] for k in ("tall", "wide")}  # one loop
    params = {k: jnp.asarray(v, jnp.float32) for k, v in _start(shapes, 6).items()}
    grads = jax.tree.map(lambda w: 0.3 * jnp.roll(w, 1, axis=0) + 0.01, params)
    schedule = optax.linear_schedule(0.1, 0.0, 4)
    kwargs = {"dual_steps": 4, "msign_steps": 8}
    plain = riemax.manifold_muon(schedule, **kwargs)
    injected = optax.inject_hyperparams(
        riemax.manifold_muon, static_args=("dual_steps", "msign_steps", "msign_dtype")
    )(learning_rate=schedule, dual_learning_rate=0.01, tol=1e-6, **kwargs)
    fixed = riemax.manifold_muon(0.1 * (1 - 1 / 4), **kwargs)

    @jax.jit
    def two_steps(params):
        out = []
        for tx in (plain, injected):
            state = tx.init(params)
            _, state = tx.update(grads, state, params)
            u, _ = tx.update(grads, state, params, value=jnp.asarray(2.0))
            out.append(u)
        u, _ = fixed.update(grads, fixed.init(params), params)
        return out + [u]

    a, b, c = two_steps(params)
    for x, y in ((a, b), (a, c)):
        for name in params:
            np.testing.assert_allclose(x[name], y[name], rtol=0, atol=1e-6)


# ---------------------------------------------------------- hyperspherical descent


def test_hyperspherical_descent_matches_reference_and_keeps_unit_norm():
    shapes = {**SHAPES, "bias": (5,)}
    params0 = _start(shapes, 7, ref.normalize_start)
    field = GradientField(shapes, STEPS)
    with x64():
        got, _ = run_riemax(
            riemax.hyperspherical_descent(_lr), params0, field, STEPS, jnp.float64
        )
    params = {k: v.copy() for k, v in params0.items()}
    for k in range(STEPS):
        grads = field(k, params)
        params = {
            n: ref.hyperspherical_step(params[n], grads[n], 0.1 * (1 - k / STEPS))
            for n in params
        }
    assert max_abs_diff(got, params) < 1e-12
    got32, _ = run_riemax(
        riemax.scale_by_hyperspherical_descent(0.05), params0, field, STEPS, jnp.float32
    )
    for w in got32.values():
        assert abs(float(np.linalg.norm(w)) - 1.0) < 1e-6


def test_hyperspherical_descent_zero_leaf_and_zero_gradient():
    """A zero leaf moves to -g/|g| (and stays zero under a zero gradient); no
    NaN in the updates or in their gradient with respect to the params."""
    tx = riemax.hyperspherical_descent(0.1)

    def total(w, g):
        updates, _ = tx.update(g, tx.init(w), w)
        return sum(jnp.sum(u) for u in updates.values()), updates

    run = jax.jit(jax.grad(total, has_aux=True))
    w = {"zero": jnp.zeros((4, 3)), "unit": jnp.full((4, 3), 12**-0.5)}
    for g in (jax.tree.map(jnp.zeros_like, w), jax.tree.map(jnp.ones_like, w)):
        grad, updates = run(w, g)
        for tree in (updates, grad):
            assert all(bool(jnp.isfinite(x).all()) for x in tree.values())
        if float(g["zero"].sum()) == 0.0:
            np.testing.assert_array_equal(np.asarray(updates["zero"]), 0.0)
    np.testing.assert_allclose(updates["zero"], -(12**-0.5), rtol=1e-6)  # -g/|g|


# ------------------------------------------------------------------ start, recipe


def test_to_manifold_msign_and_normalize():
    rng = np.random.default_rng(8)
    tree = {
        "conv": {
            "kernel": rng.standard_normal((3, 3, 2, 4)),
            "bias": rng.standard_normal(4),
        },
        "wide": {"kernel": rng.standard_normal((3, 7))},
    }
    labels = functools.partial(riemax.labels_by_rule, pattern="", fan="any")

    @jax.jit
    def starts(params, small):
        return (
            riemax.to_manifold(params, "msign", labels),
            riemax.to_manifold(params, "normalize"),
            riemax.to_manifold(small, "msign"),
            riemax.to_manifold(jax.tree.map(jnp.zeros_like, small), "normalize"),
        )

    with x64():
        params = jax.tree.map(jnp.asarray, tree)
        on, sphere, b16, zero = starts(params, {"k": jnp.ones((4, 2), jnp.bfloat16)})
    for name in ("conv", "wide"):
        k = np.asarray(on[name]["kernel"])
        np.testing.assert_allclose(k, ref.msign_start(tree[name]["kernel"]), atol=1e-12)
        assert _stiefel_error(k) < 1e-12
    np.testing.assert_array_equal(on["conv"]["bias"], tree["conv"]["bias"])
    for name, w in jax.tree_util.tree_flatten_with_path(sphere)[0]:
        assert abs(float(np.linalg.norm(np.asarray(w))) - 1.0) < 1e-12, name
    assert b16["k"].dtype == jnp.bfloat16 and float(jnp.abs(zero["k"]).max()) == 0.0


def _mlp(params, x):
    for name in sorted(params)[:-1]:
        x = jax.nn.relu(x @ params[name]["kernel"] + params[name].get("bias", 0.0))
    last = params[sorted(params)[-1]]
    return x @ last["kernel"] + last.get("bias", 0.0)


@pytest.mark.parametrize("name", ["manifold_muon", "hyperspherical_descent"])
def test_hybrid_recipe_on_a_small_mlp(name):
    """The original recipe, shrunk: a 3-layer MLP (12 -> 24 -> 12 -> 10) without
    biases, every weight on the manifold, lr 0.1 decayed linearly to 0, AdamW with
    the same decay for the rest; here one bias is added so that the Euclidean
    half has a leaf. 30 full-batch steps on a random teacher's labels."""
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((256, 12)), jnp.float32)
    y = jnp.argmax(x @ jnp.asarray(rng.standard_normal((12, 10))), axis=-1)
    dims = (12, 24, 12, 10)  # the first two kernels' tall matrices share a loop
    params = {
        f"fc{i}": {
            "kernel": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32)
        }
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True))
    }
    params["fc2"]["bias"] = jnp.zeros(10)
    labels = functools.partial(riemax.labels_by_rule, pattern="", fan="any")
    assert labels(params) == {
        "fc0": {"kernel": riemax.MANIFOLD},
        "fc1": {"kernel": riemax.MANIFOLD},
        "fc2": {"kernel": riemax.MANIFOLD, "bias": riemax.EUCLIDEAN},
    }
    method = "msign" if name == "manifold_muon" else "normalize"
    params = riemax.to_manifold(params, method, labels)
    schedule = optax.linear_schedule(0.1, 0.0, 30)
    manifold_tx = (
        riemax.manifold_muon(schedule, dual_steps=10)
        if name == "manifold_muon"
        else riemax.hyperspherical_descent(schedule)
    )
    tx = riemax.hybrid(manifold_tx, optax.adamw(schedule), labels)

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(_mlp(p, x), y).mean()

    def body(carry, _):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p, value=loss)
        return (optax.apply_updates(p, u), s), loss

    (final, _), losses = jax.jit(
        lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=30)
    )(params)
    # Hyperspherical descent keeps each whole kernel at norm 1, so its logits
    # stay small and its loss falls more slowly.
    drop = 0.8 if name == "manifold_muon" else 0.95
    assert float(losses[-1]) < drop * float(losses[0]), losses
    assert float(jnp.abs(final["fc2"]["bias"]).max()) > 0  # AdamW moved it
    for i in range(3):
        k = np.asarray(final[f"fc{i}"]["kernel"])
        if name == "manifold_muon":
            assert _stiefel_error(k) < 1e-5
        else:
            assert abs(float(np.linalg.norm(k)) - 1.0) < 1e-5


# ----------------------------------------------------------- the compiled step


def _jaxpr_of_update(tx, count):
    params = {f"k{i}": jnp.eye(6, 4) for i in range(count)}
    return jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(
        params, tx.init(params), params
    )


def _primitives(jaxpr, out=None):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it."""
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        out.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr
                if hasattr(sub, "eqns"):
                    _primitives(sub, out)
    return out


@pytest.mark.parametrize("name", ["manifold_muon", "hyperspherical_descent"])
def test_compiled_step_has_fixed_loops_and_no_callbacks(name):
    """Every loop is a scan of static length (the dual ascent: ``dual_steps``),
    none grows with the number of kernels of one shape, there is no conditional
    per leaf and nothing goes back to the host."""
    make = {
        "manifold_muon": lambda: riemax.manifold_muon(0.1, dual_steps=7),
        "hyperspherical_descent": lambda: riemax.hyperspherical_descent(0.1),
    }[name]
    counts = {}
    for leaves in (1, 5):
        eqns = _primitives(_jaxpr_of_update(make(), leaves).jaxpr)
        kinds = [e.primitive.name for e in eqns]
        assert "while" not in kinds and not any("callback" in k for k in kinds), kinds
        scans = [e.params["length"] for e in eqns if e.primitive.name == "scan"]
        assert scans == ([7] if name == "manifold_muon" else []), scans
        counts[leaves] = kinds.count("cond")
    assert counts[1] == counts[5] <= 3, counts


def test_the_stiefel_geometry_retracts_with_the_matrix_sign():
    """``StiefelGeometry(retraction="polar")`` is the retraction of manifold Muon:
    the seam's transforms land on the manifold, and equal the polar factor of
    ``W + D`` from a float64 SVD."""
    rng = np.random.default_rng(3)
    w = np.linalg.qr(rng.standard_normal((12, 4)))[0]
    d = 0.1 * rng.standard_normal((12, 4))
    geo = riemax.StiefelGeometry(retraction="polar")
    tx = riemax.manifold_retract(geo)
    params = {"fc": {"kernel": jnp.asarray(w, jnp.float32)}}
    step, _ = tx.update(
        {"fc": {"kernel": jnp.asarray(d, jnp.float32)}}, tx.init(params), params
    )
    new = np.asarray(optax.apply_updates(params, step)["fc"]["kernel"], np.float64)
    u, _, vt = np.linalg.svd(w + d, full_matrices=False)
    np.testing.assert_allclose(new, u @ vt, atol=2e-5)
    np.testing.assert_allclose(new.T @ new, np.eye(4), atol=2e-5)
