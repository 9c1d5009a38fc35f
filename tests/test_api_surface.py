"""The public surface: deprecated names, extra arguments, and errors that name
the function the user called."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import riemax

#: Every exported optimizer and transform, built with minimal arguments, and
#: whether it needs kernels (rank >= 2) only.
BUILDERS = {
    "sgdg": (lambda: riemax.sgdg(0.1), True),
    "adamg": (lambda: riemax.adamg(0.05), True),
    "scale_by_sgdg": (lambda: riemax.scale_by_sgdg(0.1), True),
    "scale_by_adamg": (lambda: riemax.scale_by_adamg(0.05), True),
    "adams": (lambda: riemax.adams(1e-3), False),
    "adamsrt": (lambda: riemax.adamsrt(1e-3), False),
    "sgdmrt": (lambda: riemax.sgdmrt(0.1), False),
    "scale_by_adams": (lambda: riemax.scale_by_adams(1e-3), False),
    "scale_by_sgdmrt": (lambda: riemax.scale_by_sgdmrt(0.1), False),
    "adamp": (lambda: riemax.adamp(1e-3), False),
    "sgdp": (lambda: riemax.sgdp(0.1, momentum=0.9), False),
    "scale_by_adamp": (lambda: riemax.scale_by_adamp(1e-3), False),
    "scale_by_sgdp": (lambda: riemax.scale_by_sgdp(0.1), False),
    "nero": (lambda: riemax.nero(0.01), False),
    "scale_by_nero": (lambda: riemax.scale_by_nero(0.01), False),
    "rotational": (lambda: riemax.rotational(optax.adamw(1e-3), 0.01), True),
    "grassmann_project": (lambda: riemax.grassmann_project(), True),
    "clip_tangent_norm": (lambda: riemax.clip_tangent_norm(0.1), True),
    "transported_momentum": (lambda: riemax.transported_momentum(0.9), True),
    "spherical_adam": (lambda: riemax.spherical_adam(learning_rate=0.05), True),
    "exp_map_update": (lambda: riemax.exp_map_update(), True),
    "ortho_penalty": (lambda: riemax.ortho_penalty(0.1), True),
    "manifold_project": (lambda: riemax.manifold_project(), True),
    "manifold_momentum": (lambda: riemax.manifold_momentum(0.9), True),
    "manifold_retract": (lambda: riemax.manifold_retract(), True),
    "cayley_sgd": (lambda: riemax.cayley_sgd(0.8), True),
    "cayley_adam": (lambda: riemax.cayley_adam(0.5), True),
    "scale_by_cayley_sgd": (lambda: riemax.scale_by_cayley_sgd(0.8), True),
    "scale_by_cayley_adam": (lambda: riemax.scale_by_cayley_adam(0.5), True),
    "manifold_muon": (lambda: riemax.manifold_muon(0.1), True),
    "scale_by_manifold_muon": (lambda: riemax.scale_by_manifold_muon(0.1), True),
    "hyperspherical_descent": (lambda: riemax.hyperspherical_descent(0.1), False),
    "scale_by_hyperspherical_descent": (
        lambda: riemax.scale_by_hyperspherical_descent(0.1),
        False,
    ),
}


def test_every_exported_transform_is_listed():
    """A new public optimizer or transform must join BUILDERS (and so the
    extra-args check): every ``scale_by_*`` and alias riemax exports is there."""
    aliases = {"sgdg", "adamg", "adams", "adamsrt", "sgdmrt", "adamp", "sgdp"}
    aliases |= {"nero", "rotational", "manifold_muon", "hyperspherical_descent"}
    aliases |= {"cayley_sgd", "cayley_adam"}
    factories = {n for n in riemax.__all__ if n.startswith("scale_by_")} | aliases
    assert factories <= set(BUILDERS), sorted(factories - set(BUILDERS))
    assert all(n in riemax.__all__ for n in BUILDERS)


def _params(kernels_only):
    params = {"conv": jnp.ones((3, 3, 2, 4)) * 0.3}
    if not kernels_only:
        params["bias"] = jnp.full((4,), 0.2)
    return params


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_extra_args_are_accepted_and_ignored(name):
    """``update(..., value=loss)`` as ``nnx.Optimizer`` and optax's
    ``GradientTransformationExtraArgs`` chains call it: same result as without."""
    build, kernels_only = BUILDERS[name]
    tx = build()
    params = _params(kernels_only)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.05), params)
    state = tx.init(params)
    plain, _ = tx.update(grads, state, params)
    extra, _ = tx.update(grads, state, params, value=jnp.asarray(1.5), other=3)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(extra), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_chain_with_a_transform_that_reads_an_extra_arg():
    """riemax inside optax.chain next to optax.contrib.reduce_on_plateau, which
    reads ``value``: the loss reaches it, riemax ignores it."""
    params = _params(True)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.05), params)
    tx = optax.chain(
        riemax.sgdg(0.1),
        optax.contrib.reduce_on_plateau(factor=0.5, patience=0, cooldown=0),
    )
    state = tx.init(params)
    for loss in (1.0, 2.0, 3.0):
        updates, state = tx.update(grads, state, params, value=jnp.asarray(loss))
    assert float(state[1].scale) < 1.0  # the plateau scaled the step down
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
    "call, called",
    [
        (lambda: riemax.adamg(0.05, b1=1.5), "riemax.adamg"),
        (lambda: riemax.sgdg(0.1, momentum=-1.0), "riemax.sgdg"),
        (lambda: riemax.sgdg(0.1, omega=float("nan")), "riemax.sgdg"),
        (lambda: riemax.adams(1e-3, b2=2.0), "riemax.adams"),
        (lambda: riemax.adamsrt(1e-3, eps=-1.0), "riemax.adamsrt"),
        (lambda: riemax.sgdmrt(0.1, momentum=2.0), "riemax.sgdmrt"),
        (lambda: riemax.adamp(1e-3, b1=-0.5), "riemax.adamp"),
        (lambda: riemax.sgdp(0.1, momentum=1.5), "riemax.sgdp"),
        (lambda: riemax.nero(0.01, b2=1.0), "riemax.nero"),
        (lambda: riemax.cayley_sgd(0.8, iterations=0), "riemax.cayley_sgd"),
        (lambda: riemax.cayley_adam(0.5, start="paper"), "riemax.cayley_adam"),
        (lambda: riemax.manifold_muon(0.1, dual_steps=0), "riemax.manifold_muon"),
        (
            lambda: riemax.hyperspherical_descent(-1.0),
            "riemax.hyperspherical_descent",
        ),
    ],
)
def test_errors_name_the_function_the_user_called(call, called):
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    message = str(err.value)
    assert message.startswith(called + ":"), message


@pytest.mark.parametrize(
    "old, new",
    [
        ("sgdg_update", "scale_by_sgdg"),
        ("adamg_update", "scale_by_adamg"),
        ("SgdgUpdateState", "ScaleBySgdgState"),
        ("AdamgUpdateState", "ScaleByAdamgState"),
        ("AdamSState", "ScaleByAdamsState"),
        ("SgdMRTState", "ScaleBySgdmrtState"),
    ],
)
def test_deprecated_names_warn_once_and_still_work(monkeypatch, old, new):
    monkeypatch.setattr(riemax, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = getattr(riemax, old)
        second = getattr(riemax, old)
    assert first is second is getattr(riemax, new)
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert len(messages) == 1 and f"riemax.{new}" in messages[0], messages
    assert old not in riemax.__all__
    with pytest.raises(AttributeError, match="no attribute 'sgdg_updates'"):
        riemax.sgdg_updates  # noqa: B018


def test_rotational_zero_mean_refuses_units_that_cannot_turn():
    """zero_mean=True on units of 2 elements (one centred line, two points): a
    clear error naming the leaf, at init and at update; zero_mean=False works."""
    params = {"dense": {"kernel": jnp.ones((2, 5))}}
    tx = riemax.rotational(optax.adamw(1e-3), 0.01)
    with pytest.raises(ValueError, match=r"'dense/kernel'.*units of 2 element"):
        tx.init(params)
    ok = {"dense": {"kernel": jnp.ones((3, 5))}}
    with pytest.raises(ValueError, match=r"'dense/kernel'.*zero_mean=False"):
        tx.update(params, tx.init(ok), params)
    loose = riemax.rotational(optax.adamw(1e-3), 0.01, zero_mean=False)
    updates, _ = loose.update(params, loose.init(params), params)
    assert np.isfinite(np.asarray(updates["dense"]["kernel"])).all()


def test_label_report_counts_in_the_right_number():
    params = {"a": jnp.ones((3, 4)), "b": jnp.ones(4)}
    report = riemax.label_report(params, riemax.labels_by_rule(params))
    assert "euclidean: 2 leaves (1 kernel), 16 parameters" in report
    assert "manifold: 0 leaves (0 kernels), 0 parameters" in report
