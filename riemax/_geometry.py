r"""The geometry seam: what a manifold of parameter blocks provides, and the
composable transforms that need nothing else.

A :class:`Geometry` says which axes of a leaf make up one point (``point_axes``),
which leaves it can hold (``check``), and how to project a gradient onto the
tangent space (``project``), step along a tangent direction (``retract``) and
carry a tangent vector to a new point (``transport``). Three transforms are
written against it alone:

* :func:`manifold_project` turns gradients into Riemannian gradients;
* :func:`manifold_momentum` keeps heavy-ball momentum in the tangent space,
  transported to the current params at every step;
* :func:`manifold_retract` (always last) turns a tangent step into the additive
  update that lands on the manifold.

A new manifold is one new file with one :class:`Geometry` and one line in
:data:`GEOMETRIES`. The sphere of riemax's optimizers is ``"sphere"``: each unit,
the slice over all axes but the last, on its own sphere (the axes are a
parameter: :class:`SphereGeometry`).
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from riemax import _checks as checks
from riemax._gram import Program, gram_program, normalize_program
from riemax._leafmap import Step, as_program, stateful, stateless, zeros_like_state
from riemax._numerics import safe_div, to_acc, unscaled


class Geometry(Protocol):
    """A manifold whose points are blocks of a parameter leaf.

    Methods act on arrays in the accumulation dtype (float32 or wider) and may be
    leaf programs (generators, :mod:`riemax._gram`), so that their per-unit sums
    share the step's one robust-path decision.
    """

    name: str

    def point_axes(self, ndim: int) -> tuple[int, ...]:
        """The axes of a leaf of rank ``ndim`` that one point spans."""
        ...

    def check(self, owner: str, where: str, shape: tuple[int, ...]) -> None:
        """Raises ``ValueError`` naming ``where`` if a leaf of ``shape`` cannot
        hold points of this manifold."""
        ...

    def project(self, w: jax.Array, g: jax.Array) -> Any:
        """The tangent part of ``g`` at the point ``w``."""
        ...

    def retract(self, w: jax.Array, d: jax.Array) -> Any:
        """The point reached from ``w`` along the tangent step ``d``."""
        ...

    def transport(self, w: jax.Array, v: jax.Array) -> Any:
        """A tangent vector ``v`` of a nearby point, carried to the point ``w``."""
        ...


class SphereGeometry(NamedTuple):
    """Each block (the slice over ``axes``; ``None``: all axes but the last) on
    its own sphere, at any radius: the direction of ``w`` is the point.

    ``project`` removes the radial part, ``retract`` follows the great circle of
    the exponential map from ``w / ||w||`` (the result has norm 1) and
    ``transport`` projects. Zero blocks pass ``g`` and ``d`` through.
    """

    axes: tuple[int, ...] | None = None
    name: str = "sphere"

    def point_axes(self, ndim: int) -> tuple[int, ...]:
        if self.axes is None:
            return tuple(range(ndim - 1))
        return tuple(sorted(a % ndim for a in self.axes))

    def check(self, owner: str, where: str, shape: tuple[int, ...]) -> None:
        if self.axes is None and len(shape) < 2:
            raise ValueError(
                f"riemax.{owner}: parameter '{where}' has shape {shape}, but the "
                f"{self.name} geometry puts each unit (the slice over all axes but "
                "the last) on a sphere, which needs at least 2 axes. Route 1-D leaves "
                "such as biases to a Euclidean optimizer, or give the unit axes: "
                "riemax.SphereGeometry(axes=(0,)) makes the whole vector one point."
            )
        if self.axes is not None and any(
            not -len(shape) <= a < len(shape) for a in self.axes
        ):
            raise ValueError(
                f"riemax.{owner}: parameter '{where}' of shape {shape} has no axes "
                f"{self.axes} for the {self.name} geometry."
            )

    def project(self, w: jax.Array, g: jax.Array) -> Program:
        axes = self.point_axes(w.ndim)
        gr = yield from gram_program((w, g), ((0, 0), (0, 1)), axes)
        # g - <w, g> / <w, w> w = g - c 2**e_g w~, with w~ = w 2**-e_w.
        c = safe_div(gr.values[1], gr.values[0])
        return g - unscaled(c, gr.exps[1]) * (w * gr.factor(0))

    def retract(self, w: jax.Array, d: jax.Array) -> Program:
        axes = self.point_axes(w.ndim)
        y, w_norm = yield from normalize_program(w, axes, 0.0)
        direction, theta = yield from normalize_program(d, axes, 0.0)
        new = jnp.cos(theta) * y + jnp.sin(theta) * direction
        return jnp.where(w_norm > 0, new, w + d)

    def transport(self, w: jax.Array, v: jax.Array) -> Program:
        return (yield from self.project(w, v))


#: The geometries by name: ``"module:attribute"`` of each, imported when used.
GEOMETRIES: dict[str, str] = {
    "sphere": "riemax._geometry:SPHERE",
    "stiefel": "riemax._stiefel:STIEFEL",
}

SPHERE = SphereGeometry()


def geometry(spec: str | Geometry) -> Geometry:
    """The :class:`Geometry` of a registered name, or ``spec`` itself.

    Examples:
      >>> import riemax
      >>> riemax.geometry("sphere").point_axes(4)
      (0, 1, 2)
    """
    if not isinstance(spec, str):
        for method in ("point_axes", "check", "project", "retract", "transport"):
            if not callable(getattr(spec, method, None)):
                raise TypeError(
                    f"riemax.geometry: {spec!r} is neither a geometry name nor a "
                    f"Geometry (it has no method {method!r})."
                )
        return spec
    if spec not in GEOMETRIES:
        valid = ", ".join(repr(k) for k in sorted(GEOMETRIES))
        raise ValueError(f"riemax.geometry: unknown geometry {spec!r}; valid: {valid}.")
    module, attribute = GEOMETRIES[spec].split(":")
    return getattr(importlib.import_module(module), attribute)


def _checked(owner: str, geo: Geometry, params: Any) -> None:
    def one(path, p):
        where = checks.where_of(path)
        checks.check_leaf(owner, path, p, units=False)
        geo.check(owner, where, tuple(p.shape))

    jax.tree_util.tree_map_with_path(one, params)


def manifold_project(spec: str | Geometry = "sphere") -> optax.GradientTransformation:
    """Projects every gradient onto the tangent space of its params' point.

    Args:
      spec: A geometry name (:data:`GEOMETRIES`) or a :class:`Geometry`.

    Returns:
      A stateless :class:`optax.GradientTransformation`; needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = jnp.array([[3.0], [4.0]])
      >>> tx = riemax.manifold_project("sphere")
      >>> tx.update(jnp.array([[3.0], [4.0]]), tx.init(w), w)[0].ravel()
      Array([0., 0.], dtype=float32)
    """
    geo = geometry(spec)
    owner = "manifold_project"

    def leaf(g, w):
        return geo.project(to_acc(w), g)  # a value or a leaf program

    inner = stateless(owner, leaf, units=False)
    return _with_geometry_checks(owner, geo, inner)


def manifold_retract(spec: str | Geometry = "sphere") -> optax.GradientTransformation:
    """Turns a tangent step into the additive update that lands on the manifold
    (last in a chain).

    Args:
      spec: A geometry name (:data:`GEOMETRIES`) or a :class:`Geometry`.

    Returns:
      A stateless :class:`optax.GradientTransformation`; needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax, riemax
      >>> w = jnp.array([[1.0], [0.0]])
      >>> tx = riemax.manifold_retract("sphere")
      >>> d, _ = tx.update(jnp.array([[0.0], [jnp.pi / 2]]), tx.init(w), w)
      >>> optax.apply_updates(w, d).ravel().round(6)
      Array([0., 1.], dtype=float32)
    """
    geo = geometry(spec)
    owner = "manifold_retract"

    def leaf(d, w):
        w = to_acc(w)
        return (yield from as_program(geo.retract(w, d))) - w

    inner = stateless(owner, leaf, units=False)
    return _with_geometry_checks(owner, geo, inner)


class ManifoldMomentumState(NamedTuple):
    """State of :func:`manifold_momentum`: the last step, a tangent vector."""

    trace: optax.Params


def manifold_momentum(
    momentum: float, spec: str | Geometry = "sphere", *, mu_dtype: Any = None
) -> optax.GradientTransformation:
    r"""Heavy-ball momentum in the tangent space: :math:`d \leftarrow \gamma\,
    \Gamma_w(d) + u`, with :math:`\Gamma_w` the geometry's transport to the
    current params.

    Args:
      momentum: :math:`\gamma`, in ``[0, 1]``.
      spec: A geometry name (:data:`GEOMETRIES`) or a :class:`Geometry`.
      mu_dtype: Dtype of the stored step (default: the params dtype promoted to at
        least float32).

    Returns:
      A :class:`optax.GradientTransformation` with :class:`ManifoldMomentumState`;
      needs ``params``.
    """
    owner = "manifold_momentum"
    checks.check_momentum(owner, momentum)
    checks.check_dtype(owner, "mu_dtype", mu_dtype)
    geo = geometry(spec)

    def init(params):
        _checked(owner, geo, params)
        return ManifoldMomentumState(trace=zeros_like_state(params, mu_dtype))

    def leaf(u, s, w):
        tau = yield from as_program(geo.transport(to_acc(w), to_acc(s)))
        d = momentum * tau + to_acc(u)
        return d.astype(u.dtype), d

    return stateful(owner, init, lambda *_: Step(leaf), fields=("trace",), units=False)


def _with_geometry_checks(
    owner: str, geo: Geometry, inner: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    def init_fn(params):
        _checked(owner, geo, params)
        return inner.init(params)

    return optax.GradientTransformationExtraArgs(init_fn, inner.update)


__all__ = [
    "GEOMETRIES",
    "Geometry",
    "ManifoldMomentumState",
    "SphereGeometry",
    "geometry",
    "manifold_momentum",
    "manifold_project",
    "manifold_retract",
]
