r"""Per-unit geometry of the unit sphere, on plain arrays.

A kernel in Flax layout (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``) is a
batch of ``out`` vectors: unit ``j`` is the slice ``w[..., j]`` over all axes but
the last. Every function here acts on each unit independently, so a leaf of any
rank >= 2 is handled in one vectorised pass. For a single vector, add a trailing
axis of size 1.

``eps`` is the constant the original implementations add to norms in
:func:`unit`, the exponential map and the transports (1e-8 there). ``eps=0``
gives exact geometry; zero vectors are safe either way (they map to zero). Norms
are computed on arrays scaled by a power of two per unit, so every function is
accurate for any finite magnitude.

This module is the pure-geometry layer the transforms are built on: every
per-unit formula of the optimizers lives here once (the exponential-map and
carry coefficients, the Adam-G step scale), and both the composable transforms
and the one-pass steps call it. It is public as ``riemax.sphere`` for
experiments and notebooks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from riemax._gram import Program, normalize, run, unit_gram, unit_gram_program
from riemax._numerics import per_unit, safe_div, safe_sqrt, unit_axes, unscaled

DEFAULT_EPS = 1e-8

#: A carried tangent vector is kept while its projection on the current tangent
#: space keeps at least this fraction of its stored norm (:func:`carry`).
CARRY_KEPT = 0.5


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
      >>> sphere.unit(jnp.array([[3e-30], [4e-30]]), eps=0.0).ravel()
      Array([0.6, 0.8], dtype=float32)
    """
    return normalize(w, unit_axes(w.ndim), eps)[0]


def project_program(y: jax.Array, g: jax.Array) -> Program:
    """:func:`project` as a program for ``riemax._numerics.drive``."""
    gr = yield from unit_gram_program([y, g], [(0, 1)])
    # <y, g> y, with the scale of g applied last: finite wherever the result is.
    c = unscaled(gr.values[0], gr.exps[0])
    return g - unscaled(c * y, gr.exps[1])


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
    return run(project_program(y, g))


def exp_coefficients(
    n: jax.Array, e: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""Coefficients of the exponential map along a step ``h = 2**e * s``, ``‖s‖ = n``.

    .. math::
      \theta = \|h\|, \quad \rho = \frac{\theta}{\theta + \epsilon}, \quad
      \mathrm{Exp}_y(h) = \cos\theta\, y + \frac{\sin\theta}{\theta + \epsilon}\, h
        = \cos\theta\, y + \rho\, D\, s, \qquad D = \frac{\sin\theta}{n}

    Args:
      n: Per-unit norm of the scaled step ``s``.
      e: Per-unit power-of-two exponent of the step's scale.
      eps: :math:`\epsilon_u`, added to :math:`\theta` in the direction only.

    Returns:
      ``(cos(theta), D, theta, rho)``. ``theta`` saturates at the largest finite
      number where ``‖h‖`` overflows (the direction ``s / n`` stays exact); at
      ``h = 0`` values and gradients are exact (``rho = 1`` there when ``eps = 0``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import sphere
      >>> c, d, theta, rho = sphere.exp_coefficients(jnp.array(0.75), 1, 0.0)
      >>> float(theta), bool(jnp.isclose(d, jnp.sin(1.5) / 0.75))
      (1.5, True)
    """
    big = jnp.finfo(n.dtype).max
    theta = jnp.minimum(unscaled(n, e), big)
    rho = jnp.where(theta + eps > 0, safe_div(theta, theta + eps), 1.0)
    # D = sin(theta) / n: 2**e sinc(theta) below one radian (exact at 0).
    small = theta < 1
    d_small = unscaled(jnp.sinc(jnp.where(small, theta, 0) / jnp.pi), e)
    d_large = jnp.sin(theta) * safe_div(1.0, n)
    return jnp.cos(theta), jnp.where(small, d_small, d_large), theta, rho


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
    return run(expmap_program(y, h, eps))


def expmap_program(y: jax.Array, h: jax.Array, eps: float = DEFAULT_EPS) -> Program:
    """:func:`expmap` as a program for ``riemax._numerics.drive``."""
    gr = yield from unit_gram_program([h], [(0, 0)])
    c, d, _, rho = exp_coefficients(safe_sqrt(gr.values[0]), gr.exps[0], eps)
    c, b = per_unit(c, rho * d)
    return c * y + b * (h * gr.factor(0))


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
    u, theta = normalize(h, unit_axes(h.ndim), eps)
    theta = jnp.minimum(theta, jnp.finfo(theta.dtype).max)
    gr = unit_gram([u, xi], [(0, 1)])
    c = unscaled(gr.values[0], gr.exps[0])  # <u, xi> without the scale of xi
    s, one_c = per_unit(jnp.sin(theta) * c, (1 - jnp.cos(theta)) * c)
    return xi - unscaled(s * y + one_c * u, gr.exps[1])


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


def carry_coefficients(theta: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""How to store a tangent vector so that its parallel transport is a projection.

    Let :math:`x = \alpha e` be tangent at ``y`` and parallel to a step of angle
    :math:`\theta` along the unit direction :math:`e`. Its parallel transport to
    :math:`y' = \cos\theta\, y + \sin\theta\, e` is
    :math:`\Gamma(x) = \alpha(\cos\theta\, e - \sin\theta\, y)`. Storing

    .. math::
      S = a\,x + b\,\alpha\, y, \qquad
      a = \cos\theta + \sigma \sin^2\theta, \quad
      b = -\sin\theta\,(1 - |\cos\theta|), \quad \sigma = \mathrm{sign}(\cos\theta)

    gives :math:`P_{y'}(S) = \Gamma(x)` exactly for every angle, because
    :math:`a\cos\theta - b\sin\theta = 1`. Both recoveries are well conditioned:
    :math:`1 \le |a| \le 5/4` (so the step follows from ``S`` and ``y`` at the
    step), and :math:`\|P_{y'}(S)\| = |\alpha| \ge \|S\|/1.61` (so the transport at
    the next step is a plain projection; no division by :math:`\cos\theta`, which
    vanishes at a quarter turn).

    Args:
      theta: Per-unit step angles.

    Returns:
      ``(a, b)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import sphere
      >>> theta = jnp.array([0.0, 1.0, jnp.pi / 2, 3.0, 5.0])
      >>> a, b = sphere.carry_coefficients(theta)
      >>> (a * jnp.cos(theta) - b * jnp.sin(theta)).round(6)  # always 1
      Array([1., 1., 1., 1., 1.], dtype=float32)
      >>> bool(jnp.all((jnp.abs(a) >= 1) & (jnp.abs(a) <= 1.25) & (jnp.abs(b) <= 1)))
      True
    """
    c, s = jnp.cos(theta), jnp.sin(theta)
    sign = jnp.where(c < 0, -1.0, 1.0)
    return c + sign * s * s, -s * (1 - jnp.abs(c))


def step_coefficients(
    theta: jax.Array, rho: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""The carried form and the exponential map of one step, per unit.

    For a tangent :math:`x = \alpha e` and a step of angle :math:`\theta` along
    :math:`e` taken as :math:`\mathrm{Exp}_y = \cos\theta\, y + \rho\sin\theta\, e`
    (:func:`exp_coefficients`), with :math:`S = a x + b \alpha y` the stored form
    (:func:`carry_coefficients`):

    .. math::
      \mathrm{Exp}_y = \frac{\rho \sin\theta}{a \alpha}\, S + c\, y,
      \qquad c = \cos\theta - \frac{\rho\, b \sin\theta}{a}

    so a step can write the new point from ``S`` and ``y`` alone.

    Returns:
      ``(a, b, c)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import sphere
      >>> theta, alpha = jnp.array(1.2), 0.5
      >>> y, e = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
      >>> a, b, c = sphere.step_coefficients(theta, 1.0)
      >>> s = a * alpha * e + b * alpha * y  # the stored form of x = alpha e
      >>> new = jnp.sin(theta) / (a * alpha) * s + c * y
      >>> bool(jnp.allclose(new, jnp.cos(theta) * y + jnp.sin(theta) * e))
      True
    """
    a, b = carry_coefficients(theta)
    return a, b, jnp.cos(theta) - rho * b * jnp.sin(theta) / a


def carry_kept(projected_norm: jax.Array, stored_norm: jax.Array) -> jax.Array:
    """Whether a stored vector was carried here (see :func:`carry`).

    A vector stored by :func:`carry_coefficients` projects to at least
    ``1/1.61`` of its norm. One that projects to less did not move the params
    along itself (it is radial here, as the Euclidean step of a unit that left the
    origin); it is dropped rather than carried as rounding noise.
    """
    return projected_norm >= CARRY_KEPT * stored_norm


def carry(y: jax.Array, s: jax.Array) -> jax.Array:
    r"""The parallel transport of a stored vector to the current point ``y``.

    ``s`` was stored as in :func:`carry_coefficients` at the previous point; its
    transport along the step taken since is its projection :math:`P_y(s)`. A
    stored vector that is not carried (:func:`carry_kept`) gives zero.

    Args:
      y: The current point (per unit).
      s: The stored vector.

    Returns:
      The transported vector, tangent at ``y``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import sphere
      >>> theta = jnp.pi / 2  # a quarter turn from y = e1 along e2
      >>> a, b = sphere.carry_coefficients(theta)
      >>> x = jnp.array([[0.0], [0.3], [0.0]])  # 0.3 * e2, parallel to the step
      >>> s = a * x + b * 0.3 * jnp.array([[1.0], [0.0], [0.0]])
      >>> sphere.carry(jnp.array([[0.0], [1.0], [0.0]]), s).ravel().round(6)  # -0.3 e1
      Array([-0.3,  0. ,  0. ], dtype=float32)
    """
    return run(carry_program(y, s))


def carry_program(y: jax.Array, s: jax.Array) -> Program:
    """:func:`carry` as a program for ``riemax._numerics.drive``."""
    p = yield from project_program(y, s)
    gr = yield from unit_gram_program([p, s], [(0, 0), (1, 1)])
    n_p = unscaled(safe_sqrt(gr.values[0]), gr.exps[0])
    n_s = unscaled(safe_sqrt(gr.values[1]), gr.exps[1])
    return jnp.where(carry_kept(n_p, n_s), p, 0)


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
    return run(clip_program(h, max_norm))


def clip_program(h: jax.Array, max_norm: float) -> Program:
    """:func:`clip` as a program for ``riemax._numerics.drive``."""
    gr = yield from unit_gram_program([h], [(0, 0)])
    n = safe_sqrt(gr.values[0])
    over = unscaled(n, gr.exps[0]) > max_norm
    # Clipped units: h * 2**-e * (max_norm / n), without forming ||h||.
    (f,) = per_unit(jnp.where(over, safe_div(max_norm, n) * gr.factor(0), 1.0))
    return h * f


def adamg_scale(
    v: jax.Array, size: int, count: jax.Array, b1: float, b2: float, eps: float
) -> jax.Array:
    r"""Adam-G's per-unit step scale :math:`\alpha_t / \sqrt{v_j + \epsilon}`.

    .. math::
      \alpha_t = \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}

    with ``v`` the per-unit second moment *per element* (the original's sum
    :math:`\|h_j\|^2` divided by the unit size ``size``, so that it stays finite
    wherever the squares of the gradient do), so the root is
    :math:`\sqrt{\mathrm{size}}\,\sqrt{v + \epsilon/\mathrm{size}}`. ``eps`` sits
    inside the root of the uncorrected moment, as in the original.

    Args:
      v: Per-unit mean square of the projected gradients.
      size: Elements per unit.
      count: The step count ``t`` (1 at the first step).
      b1: First-moment decay.
      b2: Second-moment decay.
      eps: The epsilon inside the square root.

    Returns:
      The per-unit factor that multiplies the first moment (before the learning
      rate).

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import sphere
      >>> v = jnp.array(0.01 * 4.0 / 4)  # first step, ||h||^2 = 4 over 4 elements
      >>> round(float(sphere.adamg_scale(v, 4, jnp.array(1), 0.9, 0.99, 0.0)), 4)
      5.0
    """
    t = count.astype(v.dtype)
    alpha = jnp.sqrt(1 - b2**t) / (1 - b1**t)
    root = jnp.sqrt(jnp.asarray(size, v.dtype)) * safe_sqrt(v + eps / size)
    return safe_div(alpha, root)


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
