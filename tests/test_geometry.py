"""The geometry seam: a manifold defined outside riemax plugs in through one
registry entry, and the sphere geometry agrees with closed forms."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import riemax
from riemax import _geometry


class RowOblique(NamedTuple):
    """Test-only geometry: every row ``w[i, :]`` of a 2-D leaf on the unit sphere
    (the oblique manifold of unit rows). Written with plain ``jnp`` only: a new
    geometry needs nothing from riemax's internals."""

    name: str = "row-oblique"

    def point_axes(self, ndim):
        return (ndim - 1,)

    def check(self, owner, where, shape):
        if len(shape) != 2:
            raise ValueError(f"riemax.{owner}: '{where}' must be 2-D, got {shape}.")

    def project(self, w, g):
        y = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
        return g - jnp.sum(y * g, axis=-1, keepdims=True) * y

    def retract(self, w, d):
        x = w + d
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def transport(self, w, v):
        return self.project(w, v)


@pytest.fixture
def oblique(monkeypatch):
    """Registers the test geometry the way a new file would: one entry."""
    monkeypatch.setitem(_geometry.GEOMETRIES, "row-oblique", f"{__name__}:ROW_OBLIQUE")
    return "row-oblique"


ROW_OBLIQUE = RowOblique()


def _rows_unit(w):
    w = np.asarray(w, np.float64)
    return w / np.linalg.norm(w, axis=-1, keepdims=True)


def test_a_new_geometry_plugs_in_by_name_and_trains_on_its_manifold(oblique):
    """SGD with momentum on the oblique manifold, built from the seam's three
    transforms: the rows stay on their spheres, and the loss (the distance of
    each row to a target row) falls to near zero."""
    rng = np.random.default_rng(0)
    target = _rows_unit(rng.standard_normal((5, 3)))
    w = jnp.asarray(_rows_unit(rng.standard_normal((5, 3))), jnp.float32)
    tx = optax.chain(
        riemax.manifold_project(oblique),
        optax.scale(-0.2),
        riemax.manifold_momentum(0.5, oblique),
        riemax.manifold_retract(oblique),
    )

    def loss(w):
        return jnp.sum((w - target) ** 2)

    @jax.jit
    def step(w, state):
        updates, state = tx.update(jax.grad(loss)(w), state, w)
        return optax.apply_updates(w, updates), state

    state = tx.init(w)
    start = float(loss(w))
    for _ in range(60):
        w, state = step(w, state)
        np.testing.assert_allclose(np.linalg.norm(w, axis=-1), 1.0, atol=1e-5)
    assert float(loss(w)) < 1e-3 * start


def test_geometry_checks_name_the_leaf_and_unknown_names_list_the_valid_ones(
    oblique,
):
    tx = riemax.manifold_project(oblique)
    with pytest.raises(ValueError, match=r"'conv/kernel' must be 2-D"):
        tx.init({"conv": {"kernel": jnp.ones((3, 3, 2))}})
    with pytest.raises(ValueError, match=r"unknown geometry 'hyperbolic'.*'sphere'"):
        riemax.manifold_project("hyperbolic")
    with pytest.raises(TypeError, match="neither a geometry name nor a Geometry"):
        riemax.geometry(42)


def test_sphere_geometry_refuses_a_vector_unless_its_axes_are_given():
    """A 1-D leaf has no units (slices over all axes but the last): the default
    sphere refuses it, naming the leaf; with ``axes=(0,)`` it is one point."""
    params = {"fc": {"bias": jnp.array([3.0, 4.0])}}
    for make in (riemax.manifold_project, riemax.manifold_retract):
        with pytest.raises(ValueError, match=r"'fc/bias' has shape \(2,\).*2 axes"):
            make("sphere").init(params)
    tx = riemax.manifold_project(riemax.SphereGeometry(axes=(0,)))
    h, _ = tx.update({"fc": {"bias": jnp.array([3.0, 4.0])}}, tx.init(params), params)
    np.testing.assert_allclose(h["fc"]["bias"], 0.0, atol=1e-6)


@pytest.mark.parametrize("axes", [None, (0,)])
def test_sphere_geometry_matches_closed_forms_for_any_unit_axes(axes):
    """Projection is tangent and idempotent, the retraction is the exponential
    map of the sphere (a quarter turn along a unit tangent lands on it), in
    float64 NumPy, for the default unit axes and for rows."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3)) * 7.0
    g = rng.standard_normal((4, 3))
    geo = _geometry.SphereGeometry(axes=axes)
    red = geo.point_axes(2)
    from riemax._gram import run

    h = np.asarray(run(geo.project(jnp.asarray(w), jnp.asarray(g))), np.float64)
    y = w / np.linalg.norm(w, axis=red, keepdims=True)
    want = g - np.sum(y * g, axis=red, keepdims=True) * y
    np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sum(h * y, axis=red), 0.0, atol=1e-5)
    e = want / np.linalg.norm(want, axis=red, keepdims=True)
    new = np.asarray(
        run(geo.retract(jnp.asarray(w), jnp.asarray(e * (np.pi / 2)))), np.float64
    )
    np.testing.assert_allclose(new, e, atol=1e-5)


def test_sphere_transforms_of_the_seam_equal_riemax_sgd_g_without_clip():
    """grassmann_project -> momentum -> exp map of the composable sphere
    transforms and the seam's sphere geometry take the same first step on
    unit-norm kernels (no clipping, no epsilon)."""
    w = riemax.unit_init(0.0)(jax.random.key(0), (6, 4))
    g = jax.random.normal(jax.random.key(1), (6, 4))
    seam = optax.chain(
        riemax.manifold_project("sphere"),
        optax.scale(-0.1),
        riemax.manifold_momentum(0.9, "sphere"),
        riemax.manifold_retract("sphere"),
    )
    composed = optax.chain(
        riemax.grassmann_project(0.0),
        optax.scale(-0.1),
        riemax.transported_momentum(0.9, unit_eps=0.0),
        riemax.exp_map_update(0.0),
    )
    a, _ = seam.update(g, seam.init(w), w)
    b, _ = composed.update(g, composed.init(w), w)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
