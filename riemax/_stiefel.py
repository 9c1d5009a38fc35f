r"""The Stiefel geometry: the units of a kernel mutually orthonormal.

A kernel in Flax layout (units on the last axis) is one point: its matrix view
:math:`M = W` ``.reshape(n, p)`` (fan-in :math:`n`, :math:`p` units, the units as
columns) has orthonormal columns, :math:`M^\top M = I_p`. The original papers
write the transpose :math:`X = M^\top` with orthonormal rows; both name the same
point. Only kernels with :math:`p \le n` can be on the manifold:
:meth:`StiefelGeometry.check` refuses the others, naming the leaf.

* :func:`qr_retraction`: the QR retraction, the matrix with orthonormal columns
  nearest in the QR sense (column signs fixed by the diagonal of R);
* :func:`qr_start`: the start method ``"qr"`` of :func:`riemax.to_manifold`;
* :data:`STIEFEL`: the :class:`riemax.Geometry` registered as ``"stiefel"``,
  whose ``retraction`` names one entry of :data:`RETRACTIONS`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from riemax._numerics import to_acc

#: The matrix products of the Stiefel math run at full float32 precision, so
#: that accelerators do not round them to bf16 or TF32 (orthonormality would not
#: survive it).
HIGHEST = jax.lax.Precision.HIGHEST


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at the highest precision."""
    return jnp.matmul(a, b, precision=HIGHEST)


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(n, p)``: the fan-in and the number of units of a kernel."""
    return math.prod(shape[:-1]), shape[-1]


def as_matrix(w: jax.Array) -> jax.Array:
    """The ``(n, p)`` matrix view of a Flax kernel: one column per unit."""
    return w.reshape(-1, w.shape[-1])


def check_tall(owner: str, where: str, shape: tuple[int, ...]) -> None:
    """Raises ``ValueError`` naming ``where`` unless a leaf of ``shape`` is a
    kernel whose units can be orthonormal (at least two axes, units <= fan-in)."""
    if len(shape) < 2:
        raise ValueError(
            f"riemax.{owner}: {where} has shape {shape}, but the Stiefel manifold "
            "needs kernels with at least 2 axes (the units are the slices over all "
            "axes but the last). Route 1-D leaves such as biases and BatchNorm "
            "scales to a Euclidean optimizer, e.g. with "
            "riemax.hybrid(manifold_tx, euclidean_tx, labels)."
        )
    n, p = fans(shape)
    if p > n:
        raise ValueError(
            f"riemax.{owner}: {where} of shape {shape} has {p} units but a fan-in "
            f"of {n}: more units than inputs cannot be orthonormal. Route it to a "
            "Euclidean optimizer: functools.partial(riemax.labels_by_rule, "
            "fan='tall') labels the kernels that fit, for riemax.hybrid."
        )


def _qr_columns(m: jax.Array) -> jax.Array:
    """Q of the reduced QR of ``m`` (``(..., n, p)``, ``n >= p``), its columns
    multiplied by the signs of R's diagonal (sign 0 gives a zero column)."""
    q, r = jnp.linalg.qr(m, mode="reduced")
    # einsum, not jnp.diagonal: the latter lowers with two (constant) conditionals.
    signs = jnp.sign(jnp.einsum("...ii->...i", r))
    return q * signs[..., None, :]


def qr_columns(mats: list[jax.Array]) -> list[jax.Array]:
    """:func:`qr_retraction` of ``(n, p)`` matrices; those of one shape are
    stacked and factored together."""
    groups: dict[tuple[tuple[int, ...], jnp.dtype], list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((m.shape, m.dtype), []).append(i)
    out: list[jax.Array] = list(mats)
    for members in groups.values():
        if len(members) == 1:
            out[members[0]] = _qr_columns(mats[members[0]])
            continue
        q = _qr_columns(jnp.stack([mats[i] for i in members]))
        for k, i in enumerate(members):
            out[i] = q[k]
    return out


def qr_retraction(x: jax.Array) -> jax.Array:
    r"""The QR retraction of a kernel onto the Stiefel manifold.

    With :math:`M` = ``x.reshape(n, p)`` (one column per unit) and its reduced QR
    decomposition :math:`M = QR`, the result is

    .. math::

      \mathrm{qf}(M) = Q\, \mathrm{diag}(\mathrm{sign}(\mathrm{diag}\, R))

    reshaped back: the units are orthonormal, and the sign convention makes the
    factor unique (a unit already orthonormal to the previous ones keeps its
    direction). A column of :math:`R` with a zero diagonal (a unit in the span of
    the previous ones, or zero) gives a zero unit. Computed in float32 or wider;
    the result has the dtype of ``x``.

    Args:
      x: A kernel in Flax layout, with at most as many units (last axis) as
        fan-in (the product of the other axes).

    Returns:
      An array of the shape and dtype of ``x``.

    Raises:
      ValueError: if ``x`` has fewer than two axes or more units than fan-in.

    Examples:
      >>> import jax, jax.numpy as jnp, riemax
      >>> riemax.qr_retraction(jnp.array([[3.0], [4.0]]))  # one unit: normalised
      Array([[0.6],
             [0.8]], dtype=float32)
      >>> q = riemax.qr_retraction(jax.random.normal(jax.random.key(0), (3, 3, 2, 4)))
      >>> m = q.reshape(-1, 4)
      >>> bool(jnp.allclose(m.T @ m, jnp.eye(4), atol=1e-5))
      True
    """
    x = jnp.asarray(x)
    check_tall("qr_retraction", "the kernel", tuple(x.shape))
    return _qr_columns(as_matrix(to_acc(x))).reshape(x.shape).astype(x.dtype)


def qr_start(leaf: jax.Array) -> jax.Array:
    """The start method ``"qr"`` of :func:`riemax.to_manifold`: the kernel
    replaced by its :func:`qr_retraction` (same shape and dtype), as Cayley SGD
    and Cayley Adam start.

    Examples:
      >>> import jax, jax.numpy as jnp, riemax
      >>> from riemax import diagnostics
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
      >>> params = {"conv": {"kernel": kernel}, "bias": jnp.ones(8)}
      >>> labels = {"conv": {"kernel": "manifold"}, "bias": "euclidean"}
      >>> params = riemax.to_manifold(params, "qr", labels)
      >>> bool(diagnostics.orthogonality_error(params)["conv"]["kernel"] < 1e-5)
      True
    """
    check_tall("to_manifold", "a leaf", tuple(leaf.shape))
    return _qr_columns(as_matrix(to_acc(leaf))).reshape(leaf.shape).astype(leaf.dtype)


#: The retractions of :class:`StiefelGeometry` by name: ``"module:attribute"`` of
#: a function ``kernel -> kernel`` onto the manifold, imported when used.
RETRACTIONS: dict[str, str] = {
    "qr": "riemax._stiefel:qr_retraction",
    "polar": "riemax._msign:polar_retraction",
}


def _sym(a: jax.Array) -> jax.Array:
    return 0.5 * (a + a.T)


class StiefelGeometry(NamedTuple):
    r"""The whole kernel one point: its units orthonormal.

    ``project`` is the tangent projection of the embedded (Euclidean) metric at a
    point :math:`M` with orthonormal columns, :math:`G - M\,\mathrm{sym}(M^\top
    G)`; ``retract`` applies the named retraction (:data:`RETRACTIONS`: ``"qr"``,
    or ``"polar"``, the matrix sign of manifold Muon) to :math:`M + D`;
    ``transport`` projects onto the tangent space of the new point. Kernels with
    more units than fan-in are refused by ``check``.
    """

    retraction: str = "qr"
    name: str = "stiefel"

    def point_axes(self, ndim: int) -> tuple[int, ...]:
        return tuple(range(ndim))

    def check(self, owner: str, where: str, shape: tuple[int, ...]) -> None:
        check_tall(owner, f"parameter '{where}'", shape)
        self._retraction()

    def _retraction(self) -> Callable[[jax.Array], jax.Array]:
        if self.retraction not in RETRACTIONS:
            valid = ", ".join(repr(k) for k in sorted(RETRACTIONS))
            raise ValueError(
                f"riemax.geometry: unknown Stiefel retraction {self.retraction!r}; "
                f"valid: {valid}."
            )
        module, attribute = RETRACTIONS[self.retraction].split(":")
        return getattr(importlib.import_module(module), attribute)

    def project(self, w: jax.Array, g: jax.Array) -> jax.Array:
        m, gm = as_matrix(w), as_matrix(g)
        return (gm - mm(m, _sym(mm(m.T, gm)))).reshape(g.shape)

    def retract(self, w: jax.Array, d: jax.Array) -> jax.Array:
        return self._retraction()(w + d)

    def transport(self, w: jax.Array, v: jax.Array) -> jax.Array:
        return self.project(w, v)


STIEFEL = StiefelGeometry()

__all__ = [
    "RETRACTIONS",
    "STIEFEL",
    "StiefelGeometry",
    "qr_retraction",
    "qr_start",
]
