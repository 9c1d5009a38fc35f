"""Bad input gives a clear error that names the argument or the parameter path.

One test per kind of bad input, over every optimizer of the registry it applies
to: hyper-parameters are checked at construction, leaves at ``init``/``update``.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import KERNEL_OPTIMIZERS, OPTIMIZERS

import riemax

ALL = sorted(OPTIMIZERS)


def taking(arg):
    """The registry's optimizers whose factory takes ``arg``."""
    return sorted(
        name
        for name, o in OPTIMIZERS.items()
        if arg in inspect.signature(o.factory).parameters
    )


def params_tree(dtype=jnp.float32, shape=(3, 3, 4, 8)):
    kernel = riemax.unit_init()(jax.random.key(0), shape).astype(dtype)
    return {"block": {"conv": {"kernel": kernel}}}


# --------------------------------------------------------------- hyper-parameters


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "lr, error, message",
    [
        (float("nan"), ValueError, r"learning_rate must be finite, got nan"),
        (float("inf"), ValueError, r"learning_rate must be finite, got inf"),
        (-0.1, ValueError, r"learning_rate must be in \[0, inf\], got -0.1"),
        (jnp.asarray(-0.1), ValueError, r"learning_rate must be in \[0, inf\]"),
        (np.float32(-2.0), ValueError, r"learning_rate must be in \[0, inf\]"),
        ("0.1", TypeError, r"learning_rate must be a real number or a schedule"),
        (jnp.ones(2), ValueError, r"learning_rate must be a scalar"),
        (lambda count: -0.1 + 0 * count, ValueError, r"schedule's value at step 0"),
    ],
)
def test_bad_learning_rate(name, lr, error, message):
    with pytest.raises(error, match=message):
        OPTIMIZERS[name].make(lr)


@pytest.mark.parametrize("name", taking("momentum"))
@pytest.mark.parametrize("momentum", [1.5, -0.1, float("nan")])
def test_bad_momentum(name, momentum):
    with pytest.raises(ValueError, match=r"momentum must be"):
        OPTIMIZERS[name].make(0.1, momentum=momentum)


@pytest.mark.parametrize(
    "name, arg, value",
    [
        (name, arg, value)
        for arg, value in [("b2", 1.0), ("b1", 1.0), ("b1", -0.5)]
        for name in taking(arg)
    ],
)
def test_bad_decay_rates(name, arg, value):
    with pytest.raises(ValueError, match=rf"{arg} must be in \[0, 1\), got"):
        OPTIMIZERS[name].make(1e-3, **{arg: value})


@pytest.mark.parametrize("name", taking("weight_decay"))
def test_negative_weight_decay(name):
    with pytest.raises(ValueError, match=r"weight_decay must be in \[0, inf\]"):
        OPTIMIZERS[name].make(1e-3, weight_decay=-1e-4)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: riemax.adamg(0.1, eps=-1.0), ValueError, r"eps must be in"),
        (lambda: riemax.sgdg(0.1, grad_clip=float("inf")), ValueError, r"grad_clip must be finite"),
        (lambda: riemax.sgdg(0.1, omega=-0.1), ValueError, r"omega must be in"),
        (lambda: riemax.sgdg(0.1, unit_eps="1e-8"), TypeError, r"unit_eps must be a real number"),
        (lambda: riemax.sgdg(0.1, unit_eps=-1.0), ValueError, r"unit_eps must be in \[0, inf\]"),
        (lambda: riemax.adams(0.1, channel_axes=-1), TypeError, r"channel_axes must be None or"),
        (lambda: riemax.adams(0.1, channel_axes=(1.5,)), TypeError, r"channel_axes must contain"),
        (lambda: riemax.spherical_adam(mu_dtype=jnp.int32), TypeError, r"mu_dtype must be a float"),
        (lambda: riemax.ortho_penalty(0.1, at="weights"), ValueError, r"at must be one of 'unit', 'param'"),
        (lambda: riemax.clip_tangent_norm(-0.5), ValueError, r"max_norm must be in \[0, inf\]"),
        (lambda: riemax.hybrid(riemax.sgdg(0.1), "sgd", {}), TypeError, r"euclidean_tx must be"),
        (lambda: riemax.adamp(delta=-0.1), ValueError, r"adamp: delta must be in"),
        (lambda: riemax.adamp(wd_ratio=float("nan")), ValueError, r"wd_ratio must be finite"),
        (lambda: riemax.sgdp(0.1, dampening=1.5), ValueError, r"dampening must be in \[0, 1\]"),
        (lambda: riemax.sgdp(0.1, momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
        (lambda: riemax.adamp(scale_invariant=True), TypeError, r"scale_invariant must be"),
        (lambda: riemax.nero(constraints="yes"), TypeError, r"constraints must be True or False"),
        (lambda: riemax.rotational("adam", 0.01), TypeError, r"inner must be an optax"),
        (lambda: riemax.rotational(optax.scale_by_adam(), -0.1), ValueError, r"rate must be in"),
        (lambda: riemax.rotational(optax.scale_by_adam(), 0.1, decay=1.0), ValueError, r"decay must be in"),
        (lambda: riemax.equilibrium_rate("sgdm", 0.1, -1.0), ValueError, r"weight_decay must be in"),
    ],
)  # fmt: skip
def test_other_bad_options_name_the_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


# ------------------------------------------------------------------------- leaves


@pytest.mark.parametrize("name", ALL)
def test_integer_params_are_rejected_with_their_path(name):
    params = params_tree(jnp.int32)
    with pytest.raises(TypeError, match=r"'block/conv/kernel' has dtype int32"):
        OPTIMIZERS[name].make().init(params)


@pytest.mark.parametrize("name", ALL)
def test_zero_size_kernel_is_rejected_with_its_path(name):
    params = {"fc": {"kernel": jnp.zeros((4, 0))}}
    with pytest.raises(ValueError, match=r"'fc/kernel' has shape \(4, 0\) with a zero"):
        OPTIMIZERS[name].make().init(params)


@pytest.mark.parametrize("name", ALL)
def test_gradient_of_the_wrong_shape_names_the_path(name):
    tx = OPTIMIZERS[name].make()
    params = params_tree()
    state = tx.init(params)
    grads = {"block": {"conv": {"kernel": jnp.ones((3, 3, 4, 7))}}}
    with pytest.raises(
        ValueError, match=r"'block/conv/kernel' has shape \(3, 3, 4, 7\)"
    ):
        tx.update(grads, state, params)


@pytest.mark.parametrize("name", ALL)
def test_gradient_tree_that_does_not_match_names_the_paths(name):
    tx = OPTIMIZERS[name].make()
    params = params_tree()
    state = tx.init(params)
    grads = {"block": {"conv2": {"kernel": jnp.ones((3, 3, 4, 8))}}}
    with pytest.raises(ValueError, match=r"missing: block/conv/kernel"):
        tx.update(grads, state, params)


@pytest.mark.parametrize("name", ["adams", "adamsrt", "sgdmrt"])
@pytest.mark.parametrize("axes", [(5,), (-5,), (0, 4), (1, -3)])
def test_channel_axes_out_of_range_or_repeated_name_the_path(name, axes):
    tx = OPTIMIZERS[name].make(channel_axes=axes)
    with pytest.raises(ValueError, match=r"channel_axes=.* 'block/conv/kernel'"):
        tx.init(params_tree())


@pytest.mark.parametrize("name", sorted(KERNEL_OPTIMIZERS))
def test_kernels_only_optimizers_reject_a_bias_and_point_to_hybrid(name):
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(
        ValueError, match=r"'conv/bias' has shape \(4,\).*riemax.hybrid"
    ):
        OPTIMIZERS[name].make().init(params)


SPHERE_TRANSFORMS = {
    "grassmann_project": riemax.grassmann_project,
    "clip_tangent_norm": lambda: riemax.clip_tangent_norm(0.1),
    "transported_momentum": lambda: riemax.transported_momentum(0.9),
    "spherical_adam": riemax.spherical_adam,
    "exp_map_update": riemax.exp_map_update,
    "ortho_penalty": lambda: riemax.ortho_penalty(0.1),
}


@pytest.mark.parametrize("name", list(SPHERE_TRANSFORMS))
def test_one_dimensional_leaf_is_rejected_by_the_transforms_with_its_path(name):
    params = {
        "block": {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)}}
    }
    tx = SPHERE_TRANSFORMS[name]()
    with pytest.raises(ValueError, match=r"'block/conv/bias' has shape \(4,\)"):
        tx.init(params)


@pytest.mark.parametrize(
    "name, overrides", [(name, {}) for name in ALL] + [("sgdg", {"grad_clip": None})]
)
def test_missing_params_is_a_clear_error(name, overrides):
    w = jnp.ones((4, 2))
    tx = OPTIMIZERS[name].make(**overrides)
    state = jax.eval_shape(tx.init, w)  # (abstract: nothing is compiled)
    with pytest.raises(ValueError, match="params"):
        tx.update(w, state)


def test_scale_invariant_labels_are_checked_with_their_paths():
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)}}
    tx = riemax.adamp(scale_invariant={"conv": {"kernel": "manifold"}})
    with pytest.raises(ValueError, match=r"scale_invariant: .*no label for: conv/bias"):
        tx.init(params)
    tx = riemax.sgdp(
        0.1, scale_invariant={"conv": {"kernel": "manifold", "bias": "manifold"}}
    )
    with pytest.raises(ValueError, match=r"'conv/bias' of shape \(4,\) as 'manifold'"):
        tx.init(params)


def test_unit_init_rejects_integer_dtypes_and_empty_shapes():
    with pytest.raises(TypeError, match=r"unit_init: dtype must be a floating"):
        riemax.unit_init()(jax.random.key(0), (3, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"shape \(4, 0\) has no units"):
        riemax.unit_init()(jax.random.key(0), (4, 0))


def test_partitioned_leaves_are_named_by_their_full_path():
    """Inside optax.partition / riemax.hybrid the path is the full parameter path."""
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4), jnp.int32)}, "b": jnp.ones(4)}
    tx = riemax.hybrid(riemax.sgdg(0.1), optax.sgd(0.1), riemax.labels_by_rule)
    with pytest.raises(TypeError, match=r"'conv/kernel' has dtype int32"):
        tx.init(params)


def test_traced_hyperparameters_are_not_checked_at_construction():
    """Under inject_hyperparams the values are tracers; a jitted step still runs."""
    tx = optax.inject_hyperparams(riemax.adamg)(learning_rate=0.05)
    params = params_tree()
    updates, _ = jax.jit(tx.update)(
        jax.tree.map(jnp.ones_like, params), tx.init(params), params
    )
    assert np.isfinite(np.asarray(updates["block"]["conv"]["kernel"])).all()
