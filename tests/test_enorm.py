"""Tests for riemax._enorm: enorm_cycle, apply_enorm, kernel_chain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from reference.enorm import (
    reference_cycle,
    unit_norms_in,
    unit_norms_out,
    weighted_objective,
)

import riemax
from riemax._tree import path_str


@pytest.fixture
def x64():
    """Enables float64 for the duration of one test."""
    with jax.enable_x64(True):
        yield


def _unbalanced(rng: np.random.Generator, shapes, dtype=np.float64):
    """Random kernels whose units have very different norms (so s is far from 1)."""
    out = []
    for shape in shapes:
        w = rng.standard_normal(shape) * np.exp(rng.uniform(-1.5, 1.5, shape[-1]))
        out.append(w.astype(dtype))
    return out


DENSE = [(5, 7), (7, 6), (6, 8), (8, 3)]
CONV = [(3, 3, 3, 6), (3, 3, 6, 5), (1, 1, 5, 7), (3, 3, 7, 4)]
MIXED = [(4, 6), (3, 3, 6, 5), (5, 5), (1, 1, 5, 3)]
CHAINS = {"dense": DENSE, "conv": CONV, "mixed": MIXED}


# ---------------------------------------------------------------------------------
# Parity with the float64 NumPy reference.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chain", sorted(CHAINS))
@pytest.mark.parametrize("c", [1.0, 1.2])
@pytest.mark.parametrize("stale", [True, False])
def test_parity_with_reference(x64, chain, c, stale):
    rng = np.random.default_rng(0)
    shapes = CHAINS[chain]
    kernels = _unbalanced(rng, shapes)
    momenta = [rng.standard_normal(s) for s in shapes]
    biases = [rng.standard_normal(s[-1]) for s in shapes]
    ref = (kernels, momenta, biases)
    got = (kernels, momenta, biases)
    for _ in range(3):
        ref = reference_cycle(ref[0], c=c, stale=stale, momenta=ref[1], biases=ref[2])
        got = riemax.enorm_cycle(
            got[0], c=c, stale_norms=stale, momenta=got[1], biases=got[2]
        )
    for ref_list, got_list in zip(ref, got, strict=True):
        for r, g in zip(ref_list, got_list, strict=True):
            assert g.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(g), r, rtol=1e-12, atol=1e-12)
    # The kernels really moved, and the last one never does.
    assert np.max(np.abs(np.asarray(got[0][0]) - kernels[0])) > 1e-2
    np.testing.assert_array_equal(np.asarray(got[0][-1]), kernels[-1])


@pytest.mark.parametrize("p", [1.0, 3.0, np.inf])
def test_parity_other_norm_orders(x64, p):
    rng = np.random.default_rng(1)
    kernels = _unbalanced(rng, DENSE)
    ref, _, _ = reference_cycle(kernels, c=1.1, p=p)
    got, _, _ = riemax.enorm_cycle(kernels, c=1.1, p=p)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-12, atol=1e-12)


def test_stale_and_exact_differ_but_share_fixed_points(x64):
    rng = np.random.default_rng(2)
    kernels = _unbalanced(rng, CONV)
    stale, _, _ = riemax.enorm_cycle(kernels, stale_norms=True)
    exact, _, _ = riemax.enorm_cycle(kernels, stale_norms=False)
    assert np.max(np.abs(np.asarray(stale[1]) - np.asarray(exact[1]))) > 1e-3


# ---------------------------------------------------------------------------------
# Function preservation (float32).
# ---------------------------------------------------------------------------------


def _mlp(kernels, x, biases=None):
    h = x
    for k, w in enumerate(kernels):
        h = h @ w
        if biases is not None:
            h = h + biases[k]
        if k < len(kernels) - 1:
            h = jax.nn.relu(h)
    return h


def _convnet(kernels, x):
    dims = ("NHWC", "HWIO", "NHWC")
    h = x
    for k, w in enumerate(kernels):
        h = jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=dims)
        if k < len(kernels) - 1:
            h = jax.nn.relu(h)
        if k < 2:
            h = jax.lax.reduce_window(
                h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
            )
    return jnp.mean(h, axis=(1, 2))


def test_function_preserved_relu_mlp():
    rng = np.random.default_rng(3)
    kernels = [jnp.asarray(w) for w in _unbalanced(rng, DENSE, np.float32)]
    x = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
    stale = jax.jit(lambda ks: riemax.enorm_cycle(ks, c=1.2)[0])
    exact = jax.jit(lambda ks: riemax.enorm_cycle(ks, c=1.2, stale_norms=False)[0])
    new = exact(stale(kernels))
    assert float(jnp.max(jnp.abs(new[0] - kernels[0]))) > 1e-2
    mlp = jax.jit(_mlp)
    np.testing.assert_allclose(mlp(new, x), mlp(kernels, x), rtol=1e-5, atol=1e-5)


def test_function_preserved_with_balanced_biases():
    rng = np.random.default_rng(4)
    kernels = [jnp.asarray(w) for w in _unbalanced(rng, DENSE, np.float32)]
    biases = [jnp.asarray(rng.standard_normal(s[-1]), jnp.float32) for s in DENSE]
    x = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
    new, _, new_b = jax.jit(lambda k, b: riemax.enorm_cycle(k, biases=b))(
        kernels, biases
    )
    mlp = jax.jit(_mlp)
    before = mlp(kernels, x, biases)
    np.testing.assert_allclose(mlp(new, x, new_b), before, rtol=1e-5, atol=1e-5)
    # Without rescaling the biases, the function changes.
    assert float(jnp.max(jnp.abs(mlp(new, x, biases) - before))) > 1e-2
    # Biases of the last two layers feed unbalanced units: untouched.
    np.testing.assert_array_equal(new_b[-1], biases[-1])
    np.testing.assert_array_equal(new_b[-2], biases[-2])


def test_function_preserved_relu_convnet_with_max_pooling():
    rng = np.random.default_rng(5)
    kernels = [jnp.asarray(w) for w in _unbalanced(rng, CONV, np.float32)]
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    cycle = jax.jit(lambda ks: riemax.enorm_cycle(ks, c=1.1)[0])
    new = cycle(cycle(kernels))
    assert float(jnp.max(jnp.abs(new[1] - kernels[1]))) > 1e-2
    before = _convnet(kernels, x)
    np.testing.assert_allclose(_convnet(new, x), before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------
# Fixed point and objective.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1.0, 1.3])
@pytest.mark.parametrize("stale", [True, False])
def test_cycles_converge_and_objective_never_increases(x64, c, stale):
    rng = np.random.default_rng(6)
    kernels = [jnp.asarray(w) for w in _unbalanced(rng, DENSE + [(3, 4)])]
    cycle = jax.jit(lambda ks: riemax.enorm_cycle(ks, c=c, stale_norms=stale)[0])
    objective = weighted_objective(kernels, c)
    for _ in range(300):
        kernels = cycle(kernels)
        new_objective = weighted_objective(kernels, c)
        assert new_objective <= objective * (1 + 1e-12)
        objective = new_objective
    for i in range(1, len(kernels) - 1):
        out_i = unit_norms_out(np.asarray(kernels[i]))
        in_prev = unit_norms_in(np.asarray(kernels[i - 1]))
        np.testing.assert_allclose(out_i, c * in_prev, rtol=1e-8)
    # The inputs of the last layer are not balanced.
    out_last = unit_norms_out(np.asarray(kernels[-1]))
    in_last = unit_norms_in(np.asarray(kernels[-2]))
    assert np.max(np.abs(out_last / (c * in_last) - 1)) > 1e-2


@pytest.mark.parametrize("c", [1.0, 1.2])
def test_four_layer_mlp_layer_norms(x64, c):
    """docs/algorithms.md#enorm-fixed-points-and-function-preservation: equal balanced layer norms (c=1), ratio c else."""
    rng = np.random.default_rng(7)
    shapes = [(6, 8), (8, 8), (8, 8), (8, 3)]
    kernels = [jnp.asarray(w) for w in _unbalanced(rng, shapes)]
    last = np.asarray(kernels[-1])
    cycle = jax.jit(lambda ks: riemax.enorm_cycle(ks, c=c)[0])
    for _ in range(300):
        kernels = cycle(kernels)
    norms = [float(jnp.linalg.norm(w)) for w in kernels]
    np.testing.assert_allclose(norms[1] / norms[0], c, rtol=1e-8)
    np.testing.assert_allclose(norms[2] / norms[1], c, rtol=1e-8)
    np.testing.assert_array_equal(np.asarray(kernels[-1]), last)


# ---------------------------------------------------------------------------------
# Edge cases.
# ---------------------------------------------------------------------------------


def _zero_unit_kernels(n_layers=4):
    rng = np.random.default_rng(8)
    ws = [w.astype(np.float32) for w in _unbalanced(rng, DENSE[:n_layers])]
    ws[0][:, 2] = 0.0  # hidden unit 2 (between W0 and W1): zero incoming norm
    ws[1][4, :] = 0.0  # hidden unit 4 (between W0 and W1): zero outgoing norm
    if n_layers > 3:
        ws[2][:, 1] = 0.0  # hidden unit 1 (between W2 and W3): never balanced
    return [jnp.asarray(w) for w in ws]


def test_zero_norm_units_are_left_unscaled():
    # Three layers: only the units between W0 and W1 are balanced.
    kernels = _zero_unit_kernels(3)
    momenta = [jnp.ones_like(w) for w in kernels]
    new, new_m, _ = riemax.enorm_cycle(kernels, momenta=momenta)
    for x in new + new_m:
        assert bool(jnp.all(jnp.isfinite(x)))
    # s = 1 for unit 2 (zero incoming norm) and unit 4 (zero outgoing norm).
    np.testing.assert_array_equal(new[1][2, :], kernels[1][2, :])
    np.testing.assert_array_equal(new_m[1][2, :], momenta[1][2, :])
    np.testing.assert_array_equal(new[0][:, 4], kernels[0][:, 4])
    np.testing.assert_array_equal(new_m[0][:, 4], momenta[0][:, 4])
    assert float(jnp.max(jnp.abs(new[1] - kernels[1]))) > 1e-3  # others move
    zeros = [jnp.zeros(s, jnp.float32) for s in DENSE]
    for x in riemax.enorm_cycle(zeros)[0]:
        np.testing.assert_array_equal(x, 0.0)


@pytest.mark.parametrize("stale", [True, False])
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, np.inf])
def test_zero_norm_units_have_finite_gradients(stale, p):
    kernels = _zero_unit_kernels()
    zeros = [jnp.zeros_like(w) for w in kernels]
    x = jnp.ones((3, 5), jnp.float32)

    def loss(ks):
        new, _, _ = riemax.enorm_cycle(ks, c=1.2, p=p, stale_norms=stale)
        return jnp.sum(_mlp(new, x) ** 2) + sum(jnp.sum(w**2) for w in new)

    grad = jax.jit(jax.grad(loss))
    for point in (kernels, zeros):
        grads = grad(point)
        for g in grads:
            assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_keeps_dtype(dtype):
    rng = np.random.default_rng(9)
    kernels = [jnp.asarray(w, dtype) for w in _unbalanced(rng, DENSE, np.float32)]
    momenta = [jnp.ones_like(w) for w in kernels]
    new, new_m, _ = riemax.enorm_cycle(kernels, momenta=momenta)
    ref, ref_m, _ = reference_cycle(
        [np.asarray(w, np.float32) for w in kernels],
        momenta=[np.asarray(m, np.float32) for m in momenta],
    )
    for got, want in zip(new + new_m, ref + ref_m, strict=True):
        assert got.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(got)))
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2)


def test_short_chains_are_unchanged():
    w0, w1 = jnp.ones((3, 4)), jnp.full((4, 2), 5.0)
    for chain in ([], [w0], [w0, w1]):
        new, m, b = riemax.enorm_cycle(chain)
        assert len(new) == len(chain) and m is None and b is None
        for x, y in zip(new, chain, strict=True):
            np.testing.assert_array_equal(x, y)


def test_width_mismatch_names_both_layers():
    kernels = [jnp.ones((3, 4)), jnp.ones((4, 5)), jnp.ones((3, 3, 6, 2))]
    with pytest.raises(ValueError, match=r"layer 1.*\(4, 5\).*layer 2.*\(3, 3, 6, 2\)"):
        riemax.enorm_cycle(kernels)
    params = {
        "a": {"kernel": kernels[0]},
        "b": {"kernel": kernels[1]},
        "c": {"kernel": kernels[2]},
    }
    with pytest.raises(ValueError, match=r"layer 1 \('b/kernel'\).*'c/kernel'"):
        riemax.apply_enorm(params, (), ["a/kernel", "b/kernel", "c/kernel"])


def test_invalid_options():
    kernels = [jnp.ones((3, 4)), jnp.ones((4, 5)), jnp.ones((5, 2))]
    with pytest.raises(ValueError, match="p must be"):
        riemax.enorm_cycle(kernels, p=0.5)
    with pytest.raises(ValueError, match="c must be positive"):
        riemax.enorm_cycle(kernels, c=0.0)
    with pytest.raises(ValueError, match="momenta"):
        riemax.enorm_cycle(kernels, momenta=[jnp.ones((3, 4))])


# ---------------------------------------------------------------------------------
# apply_enorm with optax states, plain dicts and NNX.
# ---------------------------------------------------------------------------------

PATHS = ["layers/0/kernel", "layers/1/kernel", "layers/2/kernel", "layers/3/kernel"]


def _dict_params():
    rng = np.random.default_rng(10)
    kernels = _unbalanced(rng, DENSE, np.float32)
    return {
        "layers": {
            str(k): {
                "kernel": jnp.asarray(w),
                "bias": jnp.asarray(rng.standard_normal(w.shape[-1]), jnp.float32),
            }
            for k, w in enumerate(kernels)
        },
        "scale": jnp.ones((3,), jnp.float32),
    }


def _label_kernels(params):
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: "sgd" if path_str(kp).endswith("kernel") else "adam", params
    )


TXS = {
    "sgd": lambda: optax.sgd(0.05, momentum=0.9),
    "partition": lambda: optax.partition(
        {"sgd": optax.sgd(0.05, momentum=0.9), "adam": optax.adam(1e-3)},
        _label_kernels,
    ),
    "inject": lambda: optax.inject_hyperparams(optax.sgd)(0.05, momentum=0.9),
}


def _leaves_by_path(tree):
    return {
        path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _traces(opt_state):
    found = [
        x
        for x in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState)
        )
        if isinstance(x, optax.TraceState)
    ]
    assert len(found) == 1
    return _leaves_by_path(found[0].trace)


def _without_traces(opt_state):
    return jax.tree.leaves(
        jax.tree.map(
            lambda x: None if isinstance(x, optax.TraceState) else x,
            opt_state,
            is_leaf=lambda x: isinstance(x, optax.TraceState),
        )
    )


def _check_against_cycle(before, state_before, after, state_after, c, rtol=0.0):
    """Kernels and buffers get enorm_cycle's scaling (exactly by default); rest
    untouched. ``rtol`` allows for XLA's fusion under jit (a few ulps)."""
    p0, p1 = _leaves_by_path(before), _leaves_by_path(after)
    t0, t1 = _traces(state_before), _traces(state_after)
    want_k, want_m, _ = riemax.enorm_cycle(
        [p0[q] for q in PATHS], c=c, momenta=[t0[q] for q in PATHS]
    )
    for q, wk, wm in zip(PATHS, want_k, want_m, strict=True):
        np.testing.assert_allclose(p1[q], wk, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(t1[q], wm, rtol=rtol, atol=rtol)
    assert float(jnp.max(jnp.abs(p1[PATHS[0]] - p0[PATHS[0]]))) > 1e-3
    assert float(jnp.max(jnp.abs(t1[PATHS[1]] - t0[PATHS[1]]))) > 1e-5
    for q in p0:
        if q not in PATHS:
            np.testing.assert_array_equal(p1[q], p0[q])
    for q in t0:
        if q not in PATHS:
            np.testing.assert_array_equal(t1[q], t0[q])
    rest0, rest1 = _without_traces(state_before), _without_traces(state_after)
    assert len(rest0) == len(rest1)
    for x, y in zip(rest0, rest1, strict=True):
        np.testing.assert_array_equal(x, y)


def _inputs():
    return jnp.asarray(np.random.default_rng(11).standard_normal((4, 5)), jnp.float32)


def _loss_dict(params, x):
    ks = [params["layers"][str(k)]["kernel"] for k in range(4)]
    bs = [params["layers"][str(k)]["bias"] for k in range(4)]
    return jnp.mean(jnp.sin(_mlp(ks, x, bs))) + jnp.sum(params["scale"] ** 2)


@pytest.mark.parametrize("tx_name", sorted(TXS))
def test_apply_enorm_plain_dict(tx_name):
    params = _dict_params()
    tx = TXS[tx_name]()
    opt_state = tx.init(params)
    x = _inputs()

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(_loss_dict)(params, x)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = step(*step(params, opt_state))
    new_params, new_state = riemax.apply_enorm(params, opt_state, PATHS, c=1.2)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    assert jax.tree.structure(new_state) == jax.tree.structure(opt_state)
    _check_against_cycle(params, opt_state, new_params, new_state, c=1.2)


def test_apply_enorm_jit_matches_eager():
    params = _dict_params()
    tx = TXS["partition"]()
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, tx.init(params), params)
    params = optax.apply_updates(params, updates)
    eager = riemax.apply_enorm(params, opt_state, PATHS, c=1.2, stale_norms=False)
    jitted = jax.jit(
        lambda p, s: riemax.apply_enorm(p, s, PATHS, c=1.2, stale_norms=False)
    )(params, opt_state)
    assert jax.tree.structure(jitted) == jax.tree.structure(eager)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _constant(value):
    return lambda key, shape, dtype: jnp.asarray(value, dtype).reshape(shape)


class _Mlp(nnx.Module):
    """ReLU MLP with biases on DENSE, initialised from NumPy (random inits are slow
    to compile op by op on CPU)."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        kernels = _unbalanced(rng, DENSE, np.float32)
        self.layers = nnx.List(
            [
                nnx.Linear(
                    i,
                    o,
                    kernel_init=_constant(w),
                    bias_init=_constant(rng.standard_normal(o)),
                    rngs=nnx.Rngs(0),
                )
                for (i, o), w in zip(DENSE, kernels, strict=True)
            ]
        )

    def __call__(self, x):
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


@pytest.mark.parametrize("tx_name", ["sgd", "partition"])
def test_apply_enorm_nnx_optimizer(tx_name):
    model = _Mlp(0)
    optimizer = nnx.Optimizer(model, TXS[tx_name](), wrt=nnx.Param)
    assert riemax.kernel_chain(model) == PATHS
    x = _inputs()

    @nnx.jit
    def sgd_step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(jnp.sin(m(x))))(model)
        optimizer.update(model, grads)

    @nnx.jit
    def enorm_step(model, optimizer):
        params, optimizer.opt_state = riemax.apply_enorm(
            nnx.state(model, nnx.Param), optimizer.opt_state, PATHS, c=1.2
        )
        nnx.update(model, params)

    sgd_step(model, optimizer)
    sgd_step(model, optimizer)
    params = jax.tree.map(jnp.array, nnx.state(model, nnx.Param))
    opt_state = jax.tree.map(jnp.array, optimizer.opt_state)
    out = model(x)
    enorm_step(model, optimizer)
    _check_against_cycle(
        params,
        opt_state,
        nnx.state(model, nnx.Param),
        optimizer.opt_state,
        c=1.2,
        rtol=1e-6,
    )
    # Biases are not balanced by default, so the function changes (as in the paper).
    assert float(jnp.max(jnp.abs(model(x) - out))) > 1e-6
    sgd_step(model, optimizer)  # the optimizer keeps working afterwards
    assert bool(jnp.all(jnp.isfinite(model(x))))


def test_apply_enorm_nnx_balance_biases_preserves_function():
    model = _Mlp(1)
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    x = _inputs()

    @nnx.jit
    def sgd_step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(jnp.sin(m(x))))(model)
        optimizer.update(model, grads)

    sgd_step(model, optimizer)
    trace = _traces(optimizer.opt_state)
    old = _leaves_by_path(jax.tree.map(jnp.array, nnx.state(model, nnx.Param)))
    before = model(x)
    params, optimizer.opt_state = riemax.apply_enorm(
        nnx.state(model, nnx.Param), optimizer.opt_state, PATHS, balance_biases=True
    )
    nnx.update(model, params)
    np.testing.assert_allclose(model(x), before, rtol=1e-5, atol=1e-5)
    # Layer 0: kernel columns and bias got s; their momenta got 1/s.
    new, new_trace = _leaves_by_path(params), _traces(optimizer.opt_state)
    s = new["layers/0/kernel"][0] / old["layers/0/kernel"][0]
    assert float(jnp.max(jnp.abs(s - 1))) > 1e-2
    np.testing.assert_allclose(
        new["layers/0/bias"], old["layers/0/bias"] * s, rtol=1e-5
    )
    np.testing.assert_allclose(
        new_trace["layers/0/bias"], trace["layers/0/bias"] / s, rtol=1e-5
    )
    # Biases of the last two layers are untouched.
    for q in ("layers/2/bias", "layers/3/bias"):
        np.testing.assert_array_equal(new[q], old[q])
        np.testing.assert_array_equal(new_trace[q], trace[q])


def test_apply_enorm_momentum_free_optimizer():
    params = _dict_params()
    tx = optax.sgd(0.05)
    opt_state = tx.init(params)
    new_params, new_state = riemax.apply_enorm(params, opt_state, PATHS)
    assert jax.tree.structure(new_state) == jax.tree.structure(opt_state)
    for x, y in zip(
        jax.tree.leaves(new_state), jax.tree.leaves(opt_state), strict=False
    ):
        assert x is y
    want, _, _ = riemax.enorm_cycle([_leaves_by_path(params)[q] for q in PATHS])
    got = _leaves_by_path(new_params)
    for q, w in zip(PATHS, want, strict=True):
        np.testing.assert_array_equal(got[q], w)


def test_apply_enorm_adjust_momentum_off():
    params = _dict_params()
    tx = optax.sgd(0.05, momentum=0.9)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, tx.init(params), params)
    params = optax.apply_updates(params, updates)
    _, new_state = riemax.apply_enorm(params, opt_state, PATHS, adjust_momentum=False)
    for x, y in zip(
        jax.tree.leaves(new_state), jax.tree.leaves(opt_state), strict=False
    ):
        np.testing.assert_array_equal(x, y)


def test_apply_enorm_unknown_path():
    params = _dict_params()
    with pytest.raises(ValueError, match=r"layers/9/kernel.*layers/0/kernel"):
        riemax.apply_enorm(params, (), PATHS[:2] + ["layers/9/kernel"])
    with pytest.raises(ValueError, match="repeated"):
        riemax.apply_enorm(params, (), PATHS + PATHS[:1])


# ---------------------------------------------------------------------------------
# kernel_chain.
# ---------------------------------------------------------------------------------


def test_kernel_chain_sequential():
    rngs = nnx.Rngs(0)
    zeros = nnx.initializers.zeros_init()  # cheap: only the paths matter here
    model = nnx.Sequential(
        nnx.Conv(3, 8, (3, 3), kernel_init=zeros, rngs=rngs),
        jax.nn.relu,
        nnx.Conv(8, 8, (3, 3), use_bias=False, kernel_init=zeros, rngs=rngs),
        jax.nn.relu,
        lambda h: h.mean(axis=(1, 2)),
        *[nnx.Linear(8, 8, kernel_init=zeros, rngs=rngs) for _ in range(9)],
        nnx.Linear(8, 2, kernel_init=zeros, rngs=rngs),
    )
    want = ["layers/0/kernel", "layers/2/kernel"] + [
        f"layers/{k}/kernel" for k in range(5, 15)
    ]
    assert riemax.kernel_chain(model) == want
    assert riemax.kernel_chain(model, jnp.ones((1, 6, 6, 3))) == want
    params = nnx.state(model, nnx.Param)
    assert set(want) <= set(_leaves_by_path(params))


def test_kernel_chain_call_order_of_attributes():
    zeros = nnx.initializers.zeros_init()

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc2 = nnx.Linear(6, 4, kernel_init=zeros, rngs=rngs)
            self.fc10 = nnx.Linear(4, 2, kernel_init=zeros, rngs=rngs)
            self.fc1 = nnx.Linear(3, 6, kernel_init=_constant(np.ones(18)), rngs=rngs)
            self.unused = nnx.Linear(2, 2, kernel_init=zeros, rngs=rngs)

        def __call__(self, x):
            return self.fc10(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))

    net = Net(nnx.Rngs(0))
    kernel_before = jnp.array(net.fc1.kernel[...])
    assert riemax.kernel_chain(net, jnp.ones((2, 3))) == [
        "fc1/kernel",
        "fc2/kernel",
        "fc10/kernel",
    ]
    # Traversal order without a sample input: sorted attribute names.
    assert riemax.kernel_chain(net)[:3] == ["fc1/kernel", "fc10/kernel", "fc2/kernel"]
    # The model and the Linear class are left as they were.
    np.testing.assert_array_equal(net.fc1.kernel[...], kernel_before)
    assert "recording" not in nnx.Linear.__call__.__qualname__
