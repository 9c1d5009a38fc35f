r"""Per-unit geometry of the unit sphere, on plain arrays.

A kernel in Flax layout (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``) is a
batch of ``out`` vectors: unit ``j`` is the slice ``w[..., j]`` over all axes but
the last. Every function here acts on each unit independently, so a leaf of any
rank >= 2 is handled in one vectorised pass. For a single vector, add a trailing
axis of size 1.

``eps`` is the constant the original implementations add to norms in
:func:`unit`, the exponential map and the transports (1e-8 there). ``eps=0``
gives exact geometry; zero vectors are safe either way (they map to zero).

This module is the pure-geometry layer the transforms are built on; it is public
as ``riemax.sphere`` for experiments and notebooks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from riemax._numerics import inner, norm, normalize, per_unit, safe_div, unit_axes

DEFAULT_EPS = 1e-8


def unit(w: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
    r"""Normalizes every unit: :math:`w_j / (\|w_j\| + \epsilon)`.

    Args:
      w: Kernel, rank >= 2; units are the slices over all axes but the last.
      eps: Added to the norm (so a unit-norm input maps to norm ``1 - eps``,
        exactly as the original implementation). A zero unit maps to zero.

    Returns:
      An array of the same shape.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import sphere
      >>> sphere.unit(jnp.array([[3.0], [4.0]]), eps=0.0).ravel()
      Array([0.6, 0.8], dtype=float32)
    """
    return normalize(w, unit_axes(w.ndim), eps)[0]


def project(y: jax.Array, g: jax.Array) -> jax.Array:
    r"""Projects ``g`` onto the tangent space at the unit point ``y``.

    .. math::
      P_y(g) = g - \langle y, g \rangle\, y

    Args:
      y: Point on the sphere (per unit).
      g: Any vector of the same shape, e.g. a Euclidean gradient.

    Returns:
      The tangent component of ``g`` (``g`` itself where ``y`` is zero).

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import sphere
      >>> sphere.project(jnp.array([[1.0], [0.0]]), jnp.array([[2.0], [3.0]])).ravel()
      Array([0., 3.], dtype=float32)
    """
    return g - inner(y, g, unit_axes(y.ndim)) * y


def expmap(y: jax.Array, h: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
    r"""Exponential map: follows the great circle from ``y`` with velocity ``h``.

    .. math::
      \theta = \|h\|,\quad u = h / (\|h\| + \epsilon),\quad
      \mathrm{Exp}_y(h) = \cos\theta\, y + \sin\theta\, u

    Args:
      y: Point on the sphere.
      h: Tangent vector at ``y``.
      eps: Added to ``||h||`` in the direction ``u`` only (not in ``theta``).

    Returns:
      The new point. ``Exp_y(0) = y`` exactly, with finite gradients.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import sphere
      >>> y, h = jnp.array([[1.0], [0.0]]), jnp.array([[0.0], [jnp.pi / 2]])
      >>> z = sphere.expmap(y, h, eps=0.0).ravel()
      >>> jnp.allclose(z, jnp.array([0.0, 1.0]), atol=1e-7)
      Array(True, dtype=bool)
    """
    axes = unit_axes(h.ndim)
    theta = norm(h, axes)
    # sin(theta) * h / (theta + eps), written with sinc so that value and gradient
    # are exact at h = 0 when eps = 0.
    ratio = jnp.where(theta + eps > 0, safe_div(theta, theta + eps), 1.0)
    c, s = per_unit(jnp.cos(theta), jnp.sinc(theta / jnp.pi) * ratio)
    return c * y + s * h


def transport(
    y: jax.Array, xi: jax.Array, h: jax.Array, eps: float = DEFAULT_EPS
) -> jax.Array:
    r"""Parallel transport of ``xi`` along the geodesic ``Exp_y(t h)`` to ``t = 1``.

    .. math::
      \Gamma_y(\xi; h) = \xi - \langle u, \xi \rangle
        \left(\sin\theta\, y + (1 - \cos\theta)\, u\right)

    with :math:`u, \theta` as in :func:`expmap`. The component of ``xi`` along
    ``h`` rotates in the ``(y, u)`` plane; the rest is unchanged, so the map is an
    isometry between tangent spaces (for ``eps = 0``).

    Args:
      y: Starting point.
      xi: Tangent vector at ``y`` to transport.
      h: Tangent step defining the geodesic.
      eps: As in :func:`expmap`.

    Returns:
      The transported vector, tangent at ``expmap(y, h)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import sphere
      >>> y = jnp.array([[1.0], [0.0], [0.0]])
      >>> h = jnp.array([[0.0], [0.3], [0.0]])
      >>> xi = jnp.array([[0.0], [1.0], [2.0]])
      >>> z = sphere.expmap(y, h, eps=0.0)
      >>> t = sphere.transport(y, xi, h, eps=0.0)
      >>> float(jnp.vdot(z, t)) < 1e-6, float(jnp.linalg.norm(t)) - 5**0.5 < 1e-6
      (True, True)
    """
    axes = unit_axes(h.ndim)
    u, theta = normalize(h, axes, eps)
    return xi - inner(u, xi, axes) * (jnp.sin(theta) * y + (1 - jnp.cos(theta)) * u)


def transport_step(y: jax.Array, h: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
    r"""Transports the step ``h`` along its own geodesic (the velocity at ``t = 1``).

    .. math::
      \Gamma_y(h; h) = \theta\,(\cos\theta\, u - \sin\theta\, y)

    Args:
      y: Starting point.
      h: Tangent step.
      eps: As in :func:`expmap`.

    Returns:
      The velocity of ``t -> Exp_y(t h)`` at ``t = 1``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import sphere
      >>> y, h = jnp.array([[1.0], [0.0]]), jnp.array([[0.0], [jnp.pi / 2]])
      >>> t = sphere.transport_step(y, h, eps=0.0).ravel()
      >>> jnp.allclose(t, jnp.array([-jnp.pi / 2, 0.0]), atol=1e-6)
      Array(True, dtype=bool)
    """
    u, theta = normalize(h, unit_axes(h.ndim), eps)
    return theta * (jnp.cos(theta) * u - jnp.sin(theta) * y)


def clip(h: jax.Array, max_norm: float) -> jax.Array:
    r"""Per-unit norm clipping: :math:`h_j \min(1, \nu / \|h_j\|)`.

    Clipping happens only where :math:`\|h_j\| > \nu` (strict), so units at or
    below the threshold, and zero units, are returned unchanged.

    Args:
      h: Tangent vectors, one per unit.
      max_norm: The threshold :math:`\nu`.

    Returns:
      The clipped vectors.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import sphere
      >>> sphere.clip(jnp.array([[3.0, 0.1], [4.0, 0.0]]), 1.0)
      Array([[0.6, 0.1],
             [0.8, 0. ]], dtype=float32)
    """
    n = norm(h, unit_axes(h.ndim))
    return h * per_unit(jnp.where(n > max_norm, safe_div(max_norm, n), 1.0))[0]


def gram_residual_grad(w: jax.Array) -> jax.Array:
    r"""Gradient of :math:`\tfrac12 \|M^\top M - I\|_F^2` with respect to ``w``.

    ``M = w.reshape(-1, out)`` is the matrix whose columns are the units; the
    gradient is :math:`2 (M (M^\top M) - M)`, reshaped back. Matrix products use
    the highest precision so that accelerators do not round to bf16/TF32.

    Args:
      w: Kernel, rank >= 2.

    Returns:
      An array of the same shape.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import sphere
      >>> sphere.gram_residual_grad(jnp.eye(3)).sum()
      Array(0., dtype=float32)
    """
    m = w.reshape(-1, w.shape[-1])
    hi = jax.lax.Precision.HIGHEST
    gram = jnp.matmul(m.T, m, precision=hi)
    return (2 * (jnp.matmul(m, gram, precision=hi) - m)).reshape(w.shape)


def gram_residual(w: jax.Array) -> jax.Array:
    r"""The orthogonality residual :math:`\tfrac12 \|M^\top M - I\|_F^2` of a kernel.

    Args:
      w: Kernel, rank >= 2.

    Returns:
      A scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import sphere
      >>> sphere.gram_residual(2 * jnp.eye(2))
      Array(9., dtype=float32)
    """
    m = w.reshape(-1, w.shape[-1])
    gram = jnp.matmul(m.T, m, precision=jax.lax.Precision.HIGHEST)
    return 0.5 * jnp.sum((gram - jnp.eye(gram.shape[0], dtype=gram.dtype)) ** 2)
