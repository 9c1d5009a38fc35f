r"""The composable sphere transforms of Cho & Lee (2017).

SGD-G and Adam-G as chains of small transforms that can be reordered, replaced and
extended by hand (:func:`riemax.ortho_penalty` in front adds the gradient of the
orthogonality regulariser):

* :func:`grassmann_project` takes the Riemannian gradient of every unit;
* :func:`clip_tangent_norm` clips it per unit (an angle bound);
* :func:`transported_momentum` (after :func:`optax.scale_by_learning_rate`) or
  :func:`spherical_adam` (which takes the learning rate) keep their state in the
  tangent space, carried along the step taken;
* :func:`exp_map_update` (always last) turns the tangent step into the additive
  update that follows the great circle.

Conventions shared by every transform here:

* A *unit* is one output unit of a kernel in Flax layout, the slice ``w[..., j]``
  over all axes but the last (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``).
  The transforms reject leaves with fewer than two axes, naming the parameter
  path; route such leaves to a Euclidean optimizer with :func:`riemax.hybrid`.
* Reductions run in at least float32 on arrays scaled per unit by a power of two,
  so any finite gradient gives finite updates; params and updates keep their
  dtype; state is float32 for bf16/fp16 params (``mu_dtype`` overrides it).
* ``unit_eps`` is the constant the original implementations add to norms
  (``unit(w) = w / (||w|| + unit_eps)``, and inside the exponential map and the
  transports). ``unit_eps=0`` gives exact geometry.
* A unit whose parameter vector is exactly zero has no tangent space: every
  transform passes the Euclidean quantity through unchanged there, and no
  state is carried out of the origin.
* Tangent-valued state is stored at the step in the form of
  :func:`riemax.sphere.carry_coefficients`, so that its parallel transport to the
  params passed to the next ``update`` is a projection, exact for every step
  angle.
* Any finite gradient gives finite updates; per-unit second moments overflow only
  where optax's element-wise ones do (then, as in ``optax.adam``, the step is 0).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from riemax import _checks as checks
from riemax import _sphere as sphere
from riemax._gram import unit_gram_program
from riemax._leafmap import (
    Step,
    moments_per_unit,
    schedule_value,
    stateful,
    stateless,
    unit_of_program,
    zeros_like_state,
)
from riemax._numerics import (
    per_unit,
    safe_div,
    safe_sqrt,
    second_moment,
    to_acc,
    unscaled,
)


class TransportedMomentumState(NamedTuple):
    """State of :func:`transported_momentum`: the last step, in carried form."""

    trace: optax.Params


class SphericalAdamState(NamedTuple):
    """State of :func:`spherical_adam`: step count, first moment, per-unit second."""

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    mu: optax.Params
    nu: optax.Params


def stored_form(x, alpha, theta, y):
    """The carried form ``a x + b alpha y`` of a tangent ``x = alpha e`` stepped by
    ``theta`` along ``e`` (:func:`riemax.sphere.carry_coefficients`)."""
    a, b = sphere.carry_coefficients(theta)
    a, ya = per_unit(a, b * alpha)
    return a * x + ya * y


# ----------------------------------------------------------------- the transforms


def grassmann_project(unit_eps: float = 1e-8) -> optax.GradientTransformation:
    r"""Projects each unit's gradient onto the tangent space of the sphere.

    For a BatchNorm-fed kernel the loss depends only on the direction of each unit
    ``w_j``; its Riemannian gradient on the sphere (equivalently on the
    Grassmannian :math:`G(1, n)`) is the Euclidean gradient minus its radial part,
    taken at the point :math:`y_j` the unit represents:

    .. math::

      y_j = \frac{w_j}{\|w_j\| + \epsilon_u}, \qquad
      h_j = \|w_j\|\,\bigl(g_j - \langle y_j, g_j \rangle\, y_j\bigr)

    The factor :math:`\|w_j\|` converts the gradient at ``w`` into the gradient at
    ``unit(w)`` for a scale-invariant loss (:math:`\nabla L(cw) = \nabla L(w)/c`),
    so the whole optimizer is invariant to the scale of the kernel it starts
    from. The riemax updates keep :math:`\|w_j\| = 1`, where the factor is 1 and
    the rule is exactly the original's. A zero unit passes ``g`` through.

    Args:
      unit_eps: :math:`\epsilon_u`, added to the norm in ``unit(w)``.

    Returns:
      A :class:`optax.GradientTransformation` (stateless; needs ``params``).

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> g = jnp.array([[3.0, 5.0], [4.0, 6.0]])
      >>> tx = riemax.grassmann_project(unit_eps=0.0)
      >>> h, _ = tx.update(g, tx.init(w), w)
      >>> h  # the second unit has norm 2: its gradient at unit(w) is twice as large
      Array([[ 0., 10.],
             [ 4.,  0.]], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017 (eq. 6)
    """
    checks.check_unit_eps("grassmann_project", unit_eps)

    def leaf(g, w):
        y, w_norm = yield from unit_of_program(w, unit_eps)
        h = yield from sphere.project_program(y, g)
        return h * jnp.where(w_norm > 0, w_norm, 1)

    return stateless("grassmann_project", leaf)


def clip_tangent_norm(max_norm: float | None) -> optax.GradientTransformation:
    r"""Clips the norm of every unit of a tangent update to ``max_norm``.

    .. math::

      \hat h_j = h_j \cdot \min\!\left(1, \frac{\nu}{\|h_j\|}\right)

    Clipping acts only where :math:`\|h_j\| > \nu` (strict); zero units stay zero.
    On the sphere the norm of a tangent step is the angle it turns the unit by, so
    this bounds the angular step of every unit independently.

    Args:
      max_norm: The threshold :math:`\nu`; ``None`` disables clipping.

    Returns:
      A stateless :class:`optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> tx = riemax.clip_tangent_norm(1.0)
      >>> h = jnp.array([[3.0, 0.1], [4.0, 0.0]])
      >>> tx.update(h, tx.init(h))[0]
      Array([[0.6, 0.1],
             [0.8, 0. ]], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017 (section 3.3)
    """
    if max_norm is None:
        return optax.identity()
    checks.check_number("clip_tangent_norm", "max_norm", max_norm)
    return stateless(
        "clip_tangent_norm",
        lambda h: sphere.clip_program(h, max_norm),
        needs_params=False,
    )


def transported_momentum(
    momentum: float, *, unit_eps: float = 1e-8, mu_dtype: Any = None
) -> optax.GradientTransformation:
    r"""Heavy-ball momentum kept in the tangent space of the sphere.

    The step ``d`` of the previous iteration is carried to the current point
    ``y = unit(w)`` by parallel transport along the geodesic it moved along, then
    decayed and added to the incoming tangent update ``u``:

    .. math::

      \tau \leftarrow \Gamma_{y_\mathrm{prev}}(d; d), \qquad
      d \leftarrow \gamma\,\tau + u

    With :func:`optax.scale_by_learning_rate` before this transform, ``u`` is
    :math:`-\eta\hat h` and the learning rate sits inside the momentum, exactly as
    SGD-G stores it. The next transform must move the params along ``d`` itself
    (:func:`exp_map_update`).

    The step is stored in the carried form of
    :func:`riemax.sphere.carry_coefficients` (same memory as the step itself), so
    the transport at the next ``update`` is a projection on the tangent space of
    the params passed then, exact for every step angle. The transported length is
    :math:`\|d\|^2 / (\|d\| + \epsilon_u)`, the length the original's formula
    gives. A zero unit stores nothing; a stored step that the params did not move
    along (it projects to less than half of itself) is dropped.

    Args:
      momentum: The decay :math:`\gamma`, in ``[0, 1]``.
      unit_eps: :math:`\epsilon_u` of ``unit(w)`` and of the transport.
      mu_dtype: Dtype of the stored step; defaults to the params dtype promoted to
        at least float32. Static under :func:`optax.inject_hyperparams`.

    Returns:
      A :class:`optax.GradientTransformation` with
      :class:`TransportedMomentumState`; needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax, riemax
      >>> w = jnp.array([[1.0], [0.0]])
      >>> tx = riemax.transported_momentum(0.9)
      >>> state = tx.init(w)
      >>> d, state = tx.update(jnp.array([[0.0], [0.1]]), state, w)
      >>> d.ravel()
      Array([0. , 0.1], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017 (eq. 9, Algorithm 1)
    """
    owner = "transported_momentum"
    checks.check_momentum(owner, momentum)
    checks.check_unit_eps(owner, unit_eps)
    checks.check_dtype(owner, "mu_dtype", mu_dtype)

    def init(params):
        return TransportedMomentumState(trace=zeros_like_state(params, mu_dtype))

    def leaf(u, s, w):
        y, w_norm = yield from unit_of_program(w, unit_eps)
        live = w_norm > 0
        tau = jnp.where(live, (yield from sphere.carry_program(y, to_acc(s))), 0)
        d = momentum * tau + to_acc(u)
        gr = yield from unit_gram_program([d], [(0, 0)])
        n = safe_sqrt(gr.values[0])
        _, _, theta, rho = sphere.exp_coefficients(n, gr.exps[0], unit_eps)
        # x = rho d, alpha = rho theta: the original's transported length.
        stored = stored_form(rho * d, rho * theta, theta, y)
        return d.astype(u.dtype), jnp.where(live, stored, 0).astype(s.dtype)

    return stateful(owner, init, lambda *_: Step(leaf), fields=("trace",))


def spherical_adam(
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    unit_eps: float = 1e-8,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Adam on the sphere: element-wise first moment, one second moment per unit.

    With ``h`` the (projected, clipped) tangent gradient, ``n`` the unit size and
    ``t`` the step count:

    .. math::

      \begin{align*}
        m &\leftarrow \beta_1\, \Gamma(m) + (1 - \beta_1)\, h \\
        v_j &\leftarrow \beta_2\, v_j + (1 - \beta_2)\, \|h_j\|^2 / n \\
        \delta_j &\leftarrow -\eta\, \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
          \frac{m_j}{\sqrt{n v_j + \epsilon}}
      \end{align*}

    ``eps`` sits *inside* the square root of the *uncorrected* second moment (as in
    the original; equal to Adam with :math:`\hat\epsilon = \epsilon /
    (1-\beta_2^t)`). ``v`` is stored per element (the original's
    :math:`\|h_j\|^2` divided by ``n``) so that it stays finite wherever the
    squares of the gradient do. Because ``v`` is one scalar per unit, each unit's
    step is parallel to its first moment.

    With ``learning_rate`` (a float or schedule) the output is the tangent step
    :math:`\delta` itself: follow with :func:`exp_map_update` only. ``m`` is then
    stored in the carried form of :func:`riemax.sphere.carry_coefficients`, and
    its transport to the params of the next ``update`` is exact for every step
    angle.

    Without ``learning_rate`` the output is :math:`-\delta/\eta` (follow with
    :func:`optax.scale_by_learning_rate` and :func:`exp_map_update`); the angle
    of the step is then unknown when ``m`` is stored, so ``m`` is carried by
    projection and norm restoration. That is exact for steps well below a quarter
    turn; within 0.03 rad of a quarter turn the projection keeps less than 1/16 of
    ``m`` and ``m`` is dropped.

    Args:
      b1: Decay of the first moment.
      b2: Decay of the per-unit second moment.
      eps: Added inside the square root.
      learning_rate: :math:`\eta` (float or schedule), or ``None`` (see above).
      unit_eps: :math:`\epsilon_u` of ``unit(w)``.
      mu_dtype: Dtype of ``m``; defaults to the params dtype promoted to at least
        float32 (``v`` always accumulates in at least float32). Static under
        :func:`optax.inject_hyperparams`.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`SphericalAdamState`
      (``nu`` has shape ``(1, ..., 1, out)``); needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = jnp.array([[1.0], [0.0]])
      >>> tx = riemax.spherical_adam(learning_rate=0.05)
      >>> state = tx.init(w)
      >>> step, state = tx.update(jnp.array([[0.0], [0.1]]), state, w)
      >>> round(float(step[1, 0]), 4), state.nu.shape  # the first step turns by lr
      (-0.05, (1, 1))

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017 (Algorithm 2)
    """
    owner = "spherical_adam"
    if learning_rate is not None:
        checks.check_learning_rate(owner, learning_rate)
    checks.check_adam(owner, b1, b2, eps)
    checks.check_unit_eps(owner, unit_eps)
    checks.check_dtype(owner, "mu_dtype", mu_dtype)

    def init(params):
        return SphericalAdamState(**moments_per_unit(params, mu_dtype))

    def prepare(state, count, updates, params):
        lr = None
        if learning_rate is not None:
            lr = schedule_value(learning_rate, state.count)

        def leaf(h, s, v, w):
            y, w_norm = yield from unit_of_program(w, unit_eps)
            live = w_norm > 0
            s, h = to_acc(s), to_acc(h)
            if lr is not None:
                tau = yield from sphere.carry_program(y, s)
            else:
                tau = yield from _restored(y, s)
            m = b1 * jnp.where(live, tau, 0) + (1 - b1) * h
            size = h.size // h.shape[-1]
            gr = yield from unit_gram_program([h, m], [(0, 0), (1, 1)])
            rms = unscaled(safe_sqrt(gr.values[0] / size), gr.exps[0])
            v = second_moment(v, rms * rms, b2)
            scale = sphere.adamg_scale(v, size, count, b1, b2, eps)
            if lr is None:
                return (scale * m).astype(h.dtype), jnp.where(live, m, 0), v
            scale = -lr * scale
            n_m = safe_sqrt(gr.values[1])
            _, _, theta, _ = sphere.exp_coefficients(
                jnp.abs(scale) * n_m, gr.exps[1], unit_eps
            )
            big = jnp.finfo(n_m.dtype).max
            norm_m = jnp.minimum(unscaled(n_m, gr.exps[1]), big)
            alpha = jnp.where(scale < 0, -1.0, 1.0) * norm_m
            stored = stored_form(m, alpha, theta, y)
            return (scale * m).astype(h.dtype), jnp.where(live, stored, 0), v

        return Step(leaf)

    return stateful(owner, init, prepare, fields=("mu", "nu"))


#: Without the step angle, a stored ``m`` is kept while its projection keeps this
#: fraction of its norm (every step shorter than ``pi/2 - 0.03`` radians).
_LEGACY_KEPT = 2.0**-4


def _restored(y, m):
    """``m`` projected at ``y`` and rescaled to its norm (step angle unknown)."""
    p = yield from sphere.project_program(y, m)
    gr = yield from unit_gram_program([p, m], [(0, 0), (1, 1)])
    n_p, n_m = safe_sqrt(gr.values[0]), safe_sqrt(gr.values[1])
    n_p_true, n_m_true = unscaled(n_p, gr.exps[0]), unscaled(n_m, gr.exps[1])
    keep = n_p_true >= _LEGACY_KEPT * n_m_true
    (f,) = per_unit(jnp.where(keep, safe_div(n_m, n_p), 0))
    return unscaled((p * gr.factor(0)) * f, gr.exps[1])


def exp_map_update(unit_eps: float = 1e-8) -> optax.GradientTransformation:
    r"""Turns a tangent step into the additive update that follows the geodesic.

    Last in a chain. With ``y = unit(w)`` and incoming tangent step ``d``:

    .. math::

      \theta = \|d_j\|, \quad
      w_j^{+} = \cos\theta\; y_j + \sin\theta\, \frac{d_j}{\|d_j\| + \epsilon_u},
      \qquad \text{update} = w^{+} - w

    so that :func:`optax.apply_updates` and ``nnx.Optimizer`` land exactly on the
    new point. Every step restarts from ``unit(w)``, so norm errors never
    accumulate. Zero-norm units receive ``d`` unchanged (Euclidean step).

    Args:
      unit_eps: :math:`\epsilon_u` of ``unit(w)`` and of the direction of ``d``.

    Returns:
      A stateless :class:`optax.GradientTransformation`; needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax, riemax
      >>> w = jnp.array([[2.0], [0.0]])
      >>> tx = riemax.exp_map_update(unit_eps=0.0)
      >>> delta, _ = tx.update(jnp.array([[0.0], [jnp.pi / 2]]), tx.init(w), w)
      >>> optax.apply_updates(w, delta).ravel().round(6)
      Array([0., 1.], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017 (eq. 7)
    """
    checks.check_unit_eps("exp_map_update", unit_eps)

    def leaf(d, w):
        y, w_norm = yield from unit_of_program(w, unit_eps)
        new = yield from sphere.expmap_program(y, d, unit_eps)
        return jnp.where(w_norm > 0, new - to_acc(w), d)

    return stateless("exp_map_update", leaf)
