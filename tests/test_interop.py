"""riemax inside the optax / Flax / orbax / multi-device ecosystem.

The batteries run over the registry of ``tests/helpers.py``: every optimizer in
the slow run, one of each family (or the variants that differ in what is
checked) by default.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import OPTIMIZERS, fewer_by_default, unit_norms

import riemax

KERNEL = (3, 3, 4, 8)


def kernel(seed=0, shape=KERNEL):
    return riemax.unit_init()(jax.random.key(seed), shape)


def grads(seed, shape=KERNEL, scale=1.0):
    return scale * jax.random.normal(jax.random.key(100 + seed), shape)


def start_tree(name, seed=0):
    """A conv and a dense kernel to start from: unit units for the optimizers that
    keep units on the sphere (``riemax.unit_init``), centred normal units for the
    others (``riemax.center_units``, as the rotational wrapper wants them)."""
    if OPTIMIZERS[name].units_only:
        init = riemax.unit_init()
    else:

        def init(key, shape):
            return jax.jit(riemax.center_units)(jax.random.normal(key, shape))

    return {
        "conv": init(jax.random.key(seed), KERNEL),
        "fc": init(jax.random.key(seed + 1), (16, 8)),
    }


def tree_grads(k):
    return {"conv": grads(k), "fc": jax.random.normal(jax.random.key(200 + k), (16, 8))}


def ulp_atol(name, unit, other):
    """Updates are differences of params, so their rounding errors are at the
    params' ulp: ``unit`` on unit units, ``other`` on the centred normal ones
    (norms of about 6)."""
    return unit if OPTIMIZERS[name].units_only else other


NAMED = {name: o.make for name, o in OPTIMIZERS.items()}


def run(tx, w, steps, jit=True, start=0):
    state = tx.init(w)
    update = jax.jit(tx.update) if jit else tx.update
    for k in range(start, start + steps):
        updates, state = update(grads(k), state, w)
        w = optax.apply_updates(w, updates)
    return w, state


@pytest.mark.parametrize("name", list(NAMED))
def test_jit_does_not_recompile(name):
    tx, traces = NAMED[name](), []

    @jax.jit
    def step(w, state, g):
        traces.append(1)
        updates, state = tx.update(g, state, w)
        return optax.apply_updates(w, updates), state

    w = kernel()
    state = tx.init(w)
    for k in range(3):
        w, state = step(w, state, grads(k))
    assert len(traces) == 1


# every optimizer family by default, each variant in the slow run
@pytest.mark.parametrize(
    "name",
    fewer_by_default(
        list(NAMED),
        ["sgdg", "adamg", "adamsrt", "sgdmrt", "adamp", "nero", "rotational-adamw"],
    ),
)
def test_inject_hyperparams_matches_and_controls_the_learning_rate(name):
    plain, injected = OPTIMIZERS[name].make(), OPTIMIZERS[name].injected()
    w = kernel()
    a, _ = run(plain, w, 3)
    b, state = run(injected, w, 3)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # The learning rate lives in the state and can be changed between steps.
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    updates, _ = injected.update(grads(9), state, b)
    moved = float(jnp.max(jnp.abs(optax.apply_updates(b, updates) - b)))
    if name == "sgdg":
        assert moved > 1e-3  # SGD-G stores lr inside its momentum: it keeps moving
    else:
        assert moved < 1e-6


def test_schedule_learning_rate_under_inject_hyperparams():
    sched = optax.exponential_decay(0.2, 1, 0.5)
    injected = optax.inject_hyperparams(riemax.sgdg)(learning_rate=sched)
    a, state = run(injected, kernel(), 3)
    b, _ = run(riemax.sgdg(sched), kernel(), 3)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(
        state.hyperparams["learning_rate"], 0.2 * 0.5**2, rtol=1e-6
    )


def test_inside_chain_after_global_clipping():
    tx = optax.chain(optax.clip_by_global_norm(0.5), riemax.sgdg(0.2))
    w = kernel()
    a, _ = run(tx, w, 3)
    state, b = riemax.sgdg(0.2).init(w), w
    for k in range(3):
        g = grads(k)
        g = g * jnp.minimum(1.0, 0.5 / jnp.linalg.norm(g))
        updates, state = riemax.sgdg(0.2).update(g, state, b)
        b = optax.apply_updates(b, updates)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_partition_with_frozen_third_group():
    params = {"conv": kernel(), "bias": jnp.ones(8), "fc": jnp.ones((8, 3))}
    labels = {"conv": "manifold", "bias": "euclidean", "fc": "frozen"}
    tx = optax.partition(
        {
            "manifold": riemax.adamg(0.05),
            "euclidean": optax.sgd(0.1),
            "frozen": optax.set_to_zero(),
        },
        labels,
    )
    state = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(g, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["fc"], params["fc"])
    np.testing.assert_allclose(new["bias"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(unit_norms(new["conv"]), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "name", fewer_by_default(list(NAMED), ["sgdg", "adamp", "rotational-sgdm"])
)
def test_multisteps_equals_stepping_on_mean_gradients(name):
    o = OPTIMIZERS[name]
    params = start_tree(name)
    multi = optax.MultiSteps(o.make(), every_k_schedule=2)
    state, a = multi.init(params), params
    step = jax.jit(multi.update)
    for k in range(4):
        updates, state = step(tree_grads(k), state, a)
        a = optax.apply_updates(a, updates)
    tx = o.make()
    state, b = tx.init(params), params
    update = jax.jit(tx.update)
    for k in (0, 2):
        mean = jax.tree.map(lambda x, y: (x + y) / 2, tree_grads(k), tree_grads(k + 1))
        updates, state = update(mean, state, b)
        b = optax.apply_updates(b, updates)
    for n in params:
        np.testing.assert_allclose(a[n], b[n], atol=ulp_atol(name, 1e-6, 2e-6))


@pytest.mark.parametrize(
    "name",
    fewer_by_default(list(NAMED), ["adamg", "adamp", "sgdp", "nero", "rotational"]),
)
def test_apply_if_finite_skips_a_nan_step(name):
    o = OPTIMIZERS[name]
    params = start_tree(name)
    tx = optax.apply_if_finite(o.make(), max_consecutive_errors=3)
    state = tx.init(params)
    bad = tree_grads(0)
    bad["conv"] = bad["conv"].at[0, 0, 0, 0].set(jnp.nan)
    updates, state = jax.jit(tx.update)(bad, state, params)
    for n in params:
        np.testing.assert_array_equal(
            optax.apply_updates(params, updates)[n], params[n]
        )
    assert int(state.notfinite_count) == 1
    updates, state = jax.jit(tx.update)(tree_grads(0), state, params)
    plain = o.make()
    want, _ = jax.jit(plain.update)(tree_grads(0), plain.init(params), params)
    for n in params:
        np.testing.assert_allclose(updates[n], want[n], atol=ulp_atol(name, 1e-7, 1e-6))


def test_drives_nnx_optimizer_with_hybrid_labels():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv0 = nnx.Conv(
                3, 8, (3, 3), use_bias=False, kernel_init=riemax.unit_init(), rngs=rngs
            )
            self.bn0 = nnx.BatchNorm(8, rngs=rngs)
            self.fc = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn0(self.conv0(x)))
            return self.fc(x.mean(axis=(1, 2)))

    model = Net(nnx.Rngs(0))
    tx = riemax.hybrid(
        riemax.sgdg(0.2),
        optax.sgd(0.05, momentum=0.9, nesterov=True),
        riemax.labels_by_rule,
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (16, 6, 6, 3))
    y = jax.random.randint(jax.random.key(2), (16,), 0, 4)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, g = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, g)
        return loss

    fc_before = np.asarray(model.fc.kernel[...])
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(8)]
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(unit_norms(model.conv0.kernel[...]), 1.0, atol=1e-5)
    assert np.max(np.abs(np.asarray(model.fc.kernel[...]) - fc_before)) > 1e-4


@pytest.mark.parametrize(
    "name",
    fewer_by_default(
        list(NAMED),
        ["sgdg", "adamg", "adamsrt", "adamp", "nero", "rotational-sgdm"],
    ),
)
def test_state_round_trips_through_orbax(name, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = {**start_tree(name), "bias": jnp.zeros(8)}
    labels = {"conv": "manifold", "fc": "manifold", "bias": "euclidean"}
    tx = riemax.hybrid(
        NAMED[name](), optax.sgd(0.1, momentum=0.9, nesterov=True), labels
    )
    update = jax.jit(tx.update)
    state = tx.init(params)
    for k in range(2):
        updates, state = update({**tree_grads(k), "bias": jnp.ones(8)}, state, params)
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
    # ... and training continues identically from the restored state.
    g = {**tree_grads(5), "bias": jnp.ones(8)}
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

    labels = {"conv": "manifold", "fc": "manifold", "bias": "euclidean"}
    mesh = Mesh(np.array(jax.devices()), ("d",))
    # jit with NamedSharding: units split across devices for the conv kernel,
    # the reduced axis split for the dense kernel (cross-device reductions).
    spec = {"conv": P(None, None, None, "d"), "fc": P("d", None), "bias": P()}
    shard = lambda t: jax.tree.map(lambda x, sp: jax.device_put(x, NamedSharding(mesh, sp)), t, spec)
    rep = lambda t: jax.tree.map(lambda x: jnp.stack([x] * 8), t)
    for name in sys.argv[1:]:
        o = OPTIMIZERS[name]
        if o.units_only:
            init = riemax.unit_init()
        else:
            init = lambda key, shape: riemax.center_units(jax.random.normal(key, shape))
        params = {"conv": init(jax.random.key(0), (3, 3, 4, 8)),
                  "fc": init(jax.random.key(1), (16, 8)),
                  "bias": jnp.zeros(8)}
        per_device = [jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(7 + i), p.shape), params)
                      for i in range(8)]
        mean_g = jax.tree.map(lambda *g: sum(g) / 8, *per_device)
        tx = riemax.hybrid(o.make(), optax.sgd(0.1, momentum=0.9, nesterov=True), labels)

        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        ref_p, ref_s = params, tx.init(params)
        for _ in range(3):
            ref_p, ref_s = jax.jit(step)(ref_p, ref_s, mean_g)

        # pmap: replicated params/state, per-device gradients averaged with pmean.
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
        # One sphere optimizer, the projection test (with its cross-unit layer
        # view) and the wrapper around an optax transformation; every optimizer
        # in the slow run.
        ["adamg", "adamp", "rotational-adamw"],
        pytest.param(list(NAMED), marks=pytest.mark.slow),
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
