"""riemax.diagnostics against float64 NumPy, closed forms, zero units and jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64

import riemax
from riemax import diagnostics

SHAPES = {
    "conv": (3, 3, 4, 8),  # HWIO: units are the 8 output channels
    "dense": (16, 6),
    "wide": (4, 10),  # more units than fan-in: never orthonormal
    "bias": (6,),
    "scale": (8,),
}
KERNELS = ("conv", "dense", "wide")


def random_tree(seed, scale=True):
    rng = np.random.default_rng(seed)
    tree = {}
    for name, shape in SHAPES.items():
        w = rng.standard_normal(shape)
        if scale and len(shape) > 1:
            w = w * np.exp(rng.uniform(-2, 2, shape[-1]))  # norms over 4 decades
        tree[name] = w
    return tree


def as_jax(tree, dtype=jnp.float32):
    return {k: jnp.asarray(v, dtype) for k, v in tree.items()}


def np_norms(w):
    w = np.asarray(w, np.float64)
    return np.sqrt(np.sum(w.reshape(-1, w.shape[-1]) ** 2, axis=0))


def np_angles(a, b):
    a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
    b = np.asarray(b, np.float64).reshape(-1, b.shape[-1])
    cos = np.sum(a * b, 0) / (np_norms(a) * np_norms(b))
    return np.arccos(np.clip(cos, -1, 1))


def np_ortho(w):
    m = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
    return np.linalg.norm(m.T @ m - np.eye(m.shape[1]))


def check_tree(result, expected, rtol, atol=0.0):
    """Kernels match ``expected`` (a dict over KERNELS); every other leaf is None."""
    assert set(result) == set(SHAPES)
    for name in SHAPES:
        if name in KERNELS:
            assert result[name].dtype in (jnp.float32, jnp.float64)
            np.testing.assert_allclose(
                np.asarray(result[name], np.float64),
                expected[name],
                rtol=rtol,
                atol=atol,
                err_msg=name,
            )
        else:
            assert result[name] is None, name


@pytest.mark.parametrize("seed", [0, 1])
def test_unit_norms_and_drift_match_numpy(seed):
    tree = random_tree(seed)
    params = as_jax(tree)
    expected = {k: np_norms(tree[k]) for k in KERNELS}
    check_tree(diagnostics.unit_norms(params), expected, rtol=1e-6)
    drift = {k: np.abs(v - 1) for k, v in expected.items()}
    check_tree(diagnostics.norm_drift(params), drift, rtol=1e-5, atol=1e-6)
    assert diagnostics.unit_norms(params)["conv"].shape == (8,)


@pytest.mark.parametrize("seed", [0, 1])
def test_angles_moved_matches_numpy(seed):
    old, new = random_tree(seed), random_tree(seed + 10)
    # also small moves, where arccos in float64 is still accurate to ~1e-8 rad
    near = {k: v + 1e-3 * random_tree(seed + 20)[k] for k, v in old.items()}
    for other in (new, near):
        result = diagnostics.angles_moved(as_jax(old), as_jax(other))
        expected = {k: np_angles(old[k], other[k]) for k in KERNELS}
        check_tree(result, expected, rtol=1e-5, atol=1e-6)


def test_effective_learning_rate_matches_numpy():
    params, grads = random_tree(0), random_tree(1)
    result = diagnostics.effective_learning_rate(as_jax(params), as_jax(grads), 0.3)
    expected = {k: 0.3 * np_norms(grads[k]) / np_norms(params[k]) for k in KERNELS}
    check_tree(result, expected, rtol=1e-6)
    # a traced learning rate
    traced = jax.jit(diagnostics.effective_learning_rate)(
        as_jax(params), as_jax(grads), jnp.float32(0.3)
    )
    check_tree(traced, expected, rtol=1e-6)


def test_orthogonality_error_matches_numpy():
    tree = random_tree(2)
    expected = {k: np_ortho(tree[k]) for k in KERNELS}
    check_tree(diagnostics.orthogonality_error(as_jax(tree)), expected, rtol=1e-5)
    # orthonormal columns (QR) give 0; a wide kernel cannot reach 0
    q = np.linalg.qr(np.random.default_rng(3).standard_normal((36, 8)))[0]
    with x64():
        err = diagnostics.orthogonality_error({"k": jnp.asarray(q.reshape(3, 3, 4, 8))})
        assert float(err["k"]) < 1e-13


def test_exp_map_step_length_is_the_angle_moved():
    # Exp_y(d) turns y by exactly ||d|| (for ||d|| <= pi): a closed form.
    rng = np.random.default_rng(4)
    with x64():
        y = riemax.sphere.unit(jnp.asarray(rng.standard_normal((9, 7))), eps=0.0)
        d = riemax.sphere.project(y, jnp.asarray(rng.standard_normal((9, 7))))
        d = d * jnp.asarray(np.logspace(-7, 0, 7) * 3) / np_norms(d)
        z = riemax.sphere.expmap(y, d, eps=0.0)
        angles = diagnostics.angles_moved({"k": y}, {"k": z})["k"]
        # float64 unit vectors carry ~1e-16 absolute error: the angle's floor
        np.testing.assert_allclose(
            angles, np.logspace(-7, 0, 7) * 3, rtol=1e-12, atol=1e-15
        )


def test_sgd_step_on_scale_invariant_kernel_turns_by_arctan_of_effective_lr():
    # With g orthogonal to w (the gradient of a scale-invariant loss), w - lr g
    # turns each unit by exactly arctan(lr ||g|| / ||w||).
    rng = np.random.default_rng(5)
    with x64():
        w = jnp.asarray(rng.standard_normal((3, 3, 4, 8)) * np.logspace(-1, 1, 8))
        g = w.shape[-1] * riemax.sphere.project(
            riemax.sphere.unit(w, eps=0.0), jnp.asarray(rng.standard_normal(w.shape))
        )
        eff = diagnostics.effective_learning_rate({"w": w}, {"w": g}, 0.05)["w"]
        moved = diagnostics.angles_moved({"w": w}, {"w": w - 0.05 * g})["w"]
        np.testing.assert_allclose(moved, np.arctan(eff), rtol=1e-12)
        assert float(eff.min()) < 0.1 and float(eff.max()) > 1.0  # small and large


@pytest.mark.parametrize("theta", [1e-3, 1e-5])
def test_tiny_angles_are_accurate_in_float32(theta):
    # arccos of the normalised inner product would be off by ~sqrt(eps) = 3e-4.
    rng = np.random.default_rng(6)
    a = rng.standard_normal((64, 16))
    a /= np_norms(a)
    t = rng.standard_normal((64, 16))
    t -= np.sum(t * a, 0) * a
    t /= np_norms(t)
    b = np.cos(theta) * a + np.sin(theta) * t
    old = {"k": jnp.asarray(a * 3.0, jnp.float32)}
    new = {"k": jnp.asarray(b * 0.5, jnp.float32)}
    moved = np.asarray(diagnostics.angles_moved(old, new)["k"], np.float64)
    np.testing.assert_allclose(moved, theta, rtol=0, atol=3e-7 + 1e-2 * theta)


def test_zero_units_give_specified_values_and_finite_gradients():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    w[:, 1] = 0.0
    w2 = rng.standard_normal((5, 4)).astype(np.float32)
    w2[:, 2] = 0.0
    g = rng.standard_normal((5, 4)).astype(np.float32)
    g[:, 3] = 0.0
    w, w2, g = (jnp.asarray(v) for v in (w, w2, g))

    assert float(diagnostics.unit_norms(w)[1]) == 0.0
    assert float(diagnostics.norm_drift(w)[1]) == 1.0
    moved = diagnostics.angles_moved(w, w2)
    assert float(moved[1]) == 0.0 and float(moved[2]) == 0.0
    assert float(diagnostics.angles_moved(w, w)[0]) == 0.0
    eff = diagnostics.effective_learning_rate(w, g, 0.1)
    assert float(eff[1]) == 0.0 and float(eff[3]) == 0.0

    functions = {
        "unit_norms": lambda a, b: diagnostics.unit_norms(a),
        "norm_drift": lambda a, b: diagnostics.norm_drift(a),
        "angles_moved": diagnostics.angles_moved,
        "effective_lr": lambda a, b: diagnostics.effective_learning_rate(a, b, 0.1),
        "orthogonality": lambda a, b: diagnostics.orthogonality_error(a),
    }
    zeros = jnp.zeros((5, 4))
    for name, fn in functions.items():
        # Compiled once per function (all pairs share one shape).
        value_of = jax.jit(fn)
        grad_of = jax.jit(
            jax.grad(lambda a, b, fn=fn: jnp.sum(fn(a, b)), argnums=(0, 1))
        )
        for a, b in [(w, w2), (w, g), (zeros, zeros), (w, w)]:
            value = value_of(a, b)
            grads = grad_of(a, b)
            assert np.all(np.isfinite(value)), name
            for grad in grads:
                assert np.all(np.isfinite(grad)), name
    # gradient of the orthogonality error at an orthonormal kernel (error 0)
    grad = jax.grad(lambda a: diagnostics.orthogonality_error(a))(jnp.eye(5, 4))
    assert np.all(np.isfinite(grad))


def test_low_precision_params_measure_in_float32_and_ints_are_skipped():
    tree = {"k": jnp.ones((8, 3), jnp.bfloat16), "step": jnp.zeros((2, 2), jnp.int32)}
    norms = diagnostics.unit_norms(tree)
    assert norms["k"].dtype == jnp.float32 and norms["step"] is None
    np.testing.assert_allclose(norms["k"], np.sqrt(8), rtol=1e-6)
    assert diagnostics.orthogonality_error(tree)["k"].dtype == jnp.float32


def test_summary_matches_numpy_overall_and_per_label():
    tree = random_tree(8)
    labels = {
        "conv": "manifold",
        "dense": "manifold",
        "wide": "euclidean",
        "bias": "euclidean",
        "scale": "euclidean",
    }
    stats = diagnostics.summary(diagnostics.unit_norms(as_jax(tree)), labels, "n/")
    groups = {
        "n/": np.concatenate([np_norms(tree[k]) for k in KERNELS]),
        "n/manifold_": np.concatenate(
            [np_norms(tree["conv"]), np_norms(tree["dense"])]
        ),
        "n/euclidean_": np_norms(tree["wide"]),
    }
    assert set(stats) == {f"{p}{s}" for p in groups for s in ("mean", "min", "max")}
    for p, values in groups.items():
        np.testing.assert_allclose(stats[p + "mean"], values.mean(), rtol=1e-6)
        np.testing.assert_allclose(stats[p + "min"], values.min(), rtol=1e-6)
        np.testing.assert_allclose(stats[p + "max"], values.max(), rtol=1e-6)
    # one value per kernel for the orthogonality error
    ortho = diagnostics.summary(diagnostics.orthogonality_error(as_jax(tree)))
    errors = [np_ortho(tree[k]) for k in KERNELS]
    np.testing.assert_allclose(ortho["mean"], np.mean(errors), rtol=1e-5)
    # a label with no kernels gives no keys; a tree without kernels gives {}
    only_bias = dict.fromkeys(SHAPES, "euclidean") | {"conv": "manifold"}
    stats = diagnostics.summary(diagnostics.unit_norms(as_jax(tree)), only_bias)
    assert "manifold_mean" in stats and "euclidean_max" in stats
    assert diagnostics.summary(diagnostics.unit_norms({"b": jnp.ones(3)})) == {}


def test_summary_rejects_labels_of_another_structure():
    norms = diagnostics.unit_norms(as_jax(random_tree(0)))
    with pytest.raises(ValueError, match="structure"):
        diagnostics.summary(norms, {"conv": "manifold"})


def test_everything_jits_and_matches_eager():
    old, new, grads = (as_jax(random_tree(s)) for s in (0, 1, 2))
    labels = {k: "manifold" if k == "conv" else "euclidean" for k in SHAPES}

    def measure(old, new, grads, lr):
        return {
            **diagnostics.summary(diagnostics.unit_norms(new), labels, "norm_"),
            **diagnostics.summary(diagnostics.norm_drift(new), labels, "drift_"),
            **diagnostics.summary(diagnostics.angles_moved(old, new), None, "angle_"),
            **diagnostics.summary(
                diagnostics.effective_learning_rate(old, grads, lr), None, "eff_"
            ),
            **diagnostics.summary(diagnostics.orthogonality_error(new), None, "ortho_"),
        }

    eager = measure(old, new, grads, 0.1)
    jitted = jax.device_get(jax.jit(measure)(old, new, grads, 0.1))
    assert set(eager) == set(jitted) and len(eager) == 27
    for key in eager:
        assert np.ndim(jitted[key]) == 0 and np.isfinite(jitted[key]), key
        np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-5, err_msg=key)
