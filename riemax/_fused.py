r"""SGD-G and Adam-G steps in a few fused passes over each kernel.

:func:`sgdg_update` is ``grassmann_project -> clip_tangent_norm ->
scale_by_learning_rate -> transported_momentum -> exp_map_update`` and
:func:`adamg_update` is ``grassmann_project -> clip_tangent_norm -> spherical_adam ->
scale_by_learning_rate -> exp_map_update``, computed without materialising any
intermediate of the chain:

1. one pass over memory computes the per-unit inner products of the parameters
   ``w``, the gradient ``g`` and the stored step ``m``
   (:math:`\langle w,w\rangle, \langle w,g\rangle, \langle w,m\rangle,
   \langle m,m\rangle, \langle g,m\rangle, \langle g,g\rangle`;
   :func:`riemax._numerics.unit_inners`);
2. every quantity of the chain (the projected gradient ``h = a*g + b*w`` and its
   norm, the clip factor, the transported momentum, the new step and its length,
   the exponential map) is a combination ``a*m + b*g + c*w`` whose norm follows
   from those inner products. Only :math:`\|h\|^2 = \|g\|^2 - \langle y,
   g\rangle^2` can cancel, when a gradient is nearly radial (kernels that are not
   exactly scale-invariant); a leaf with such a unit sums it directly instead;
3. two elementwise loops write the new step ``d`` (in place of ``m``) and then the
   update ``f*d + c*w`` from it, which reads ``d`` and ``w`` only, so that donated
   buffers are updated in place.

The chains of the public transforms remain the reference; the tests compare both
with the float64 reference of the original algorithms.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from riemax._numerics import (
    check_nonnegative,
    inner,
    per_unit,
    safe_div,
    safe_sqrt,
    to_acc,
    unit_axes,
    unit_inners,
)
from riemax._transforms import (
    ADAM_KEPT_FRACTION,
    _check_learning_rate,
    _check_units,
    _map_units,
    _moved_along,
    _need_params,
    _schedule_value,
    _unzip,
    _zeros_like_state,
    _zeros_per_unit,
)


class SgdgUpdateState(NamedTuple):
    """State of :func:`sgdg_update`: step count (for schedules) and the last step."""

    count: jax.Array
    trace: optax.Params


class AdamgUpdateState(NamedTuple):
    """State of :func:`adamg_update`: step count, first moment, per-unit second."""

    count: jax.Array
    mu: optax.Params
    nu: optax.Params


#: (w, g, m) index pairs of the per-unit Gram quantities, in ``gram`` order.
_GRAM_PAIRS = ((0, 0), (0, 1), (0, 2), (2, 2), (1, 2), (1, 1))

#: ``||h||^2`` from Gram quantities is trusted while the tangent part keeps at
#: least this fraction of ``||g||^2`` (at most one bit of cancellation).
_TANGENT_FRACTION = 0.5


def _gram(w, g, m):
    """Per-unit ``<w,w>, <w,g>, <w,m>, <m,m>, <g,m>, <g,g>`` in one pass."""
    return unit_inners((w, g, m), _GRAM_PAIRS)


def _tangent_parts(g, w, gram, axes, unit_eps, max_norm):
    """The projected, clipped gradient ``h_hat = hg*g + hw*w`` and ``||h_hat||^2``.

    Returns ``(k, live, hg, hw, hh)`` with ``k = 1/(||w|| + eps)`` (``y = k*w``) and
    ``live`` the units of non-zero norm; on the others ``h = g``.
    """
    ww, wg, gg = gram[0], gram[1], gram[5]
    n_w = safe_sqrt(ww)
    live = n_w > 0
    k = safe_div(1.0, n_w + unit_eps)
    # h = ||w|| (g - <y, g> y) = ||w|| g - ||w|| k^2 <w, g> w on live units.
    hg = jnp.where(live, n_w, 1.0)
    hw = jnp.where(live, -n_w * k * k * wg, 0.0)
    # ||h||^2 expanded over the Gram quantities cancels when g is nearly radial;
    # a leaf with such a unit sums ||h||^2 directly (a second pass, rarely taken).
    full = hg * hg * gg
    hh = jnp.maximum(full + hw * (2 * hg * wg + hw * ww), 0)
    radial = hh < _TANGENT_FRACTION * full

    def direct(hh):
        h = hg * g + hw * w
        return jnp.where(radial, inner(h, h, axes), hh)

    hh = jax.lax.cond(jnp.any(radial), direct, lambda hh: hh, hh)
    if max_norm is not None:
        n_h = safe_sqrt(hh)
        clip = jnp.where(n_h > max_norm, safe_div(max_norm, n_h), 1.0)
        hg, hw, hh = hg * clip, hw * clip, hh * clip * clip
    return k, live, hg, hw, hh


def _transported(gram, k, live, length, expected):
    """``tau = t_m*m + t_w*w``: ``m`` projected at ``y`` and rescaled to ``length``;
    dropped on zero units and where the projection is shorter than half of
    ``expected`` (a radial step, see ``transported_momentum``).

    Returns ``(t_m, t_w, ||tau||^2)``.
    """
    ww, wm, mm = gram[0], gram[2], gram[3]
    t_w = -k * k * wm
    # ||m + t_w w||^2; m is (nearly) tangent, so no cancellation here.
    n_p = safe_sqrt(jnp.maximum(mm + 2 * t_w * wm + t_w * t_w * ww, 0))
    rho = safe_div(length, n_p)
    keep = live & _moved_along(n_p, expected)
    return (
        jnp.where(keep, rho, 0.0),
        jnp.where(keep, rho * t_w, 0.0),
        jnp.where(keep, length * length, 0.0),
    )


def _step_norm(a, t_m, t_w, tt, b, hg, hw, hh, gram):
    """``||a*tau + b*h_hat||`` from ``||tau||^2 = tt``, ``||h_hat||^2 = hh`` and
    ``<tau, h_hat>`` expanded over ``<g,m>, <w,m>, <w,g>, <w,w>``."""
    ww, wg, wm, _, gm, _ = gram
    th = t_m * (hg * gm + hw * wm) + t_w * (hg * wg + hw * ww)
    return safe_sqrt(jnp.maximum(a * a * tt + 2 * a * b * th + b * b * hh, 0))


def _expmap_coefficients(theta, k, unit_eps):
    """``Exp_y(d) = cos(theta) k w + b d``: returns ``(cos(theta) k, b)``."""
    ratio = jnp.where(theta + unit_eps > 0, safe_div(theta, theta + unit_eps), 1.0)
    return jnp.cos(theta) * k, jnp.sinc(theta / jnp.pi) * ratio


def _write(live, scale, ck, b, a_m, a_g, a_w, m, g, w):
    """The new stored step ``d = a_m m + a_g g + a_w w`` and the update
    ``scale * Exp_y(d) - w = f d + c w`` (``scale * d`` on zero-norm units).

    ``(ck, b)`` are the exponential-map coefficients of the step ``scale * d``.
    Written from ``d`` itself, the update loop reads only ``d`` and ``w``: the two
    output loops form a chain (``m -> d -> update``), so donated parameter and
    state buffers are updated in place without copies. This is why zero-norm units
    store the Euclidean step they take (``c = 0`` there): it is radial at the new
    point, and the next step drops it.
    """
    f = scale * jnp.where(live, b, 1.0)
    c = jnp.where(live, ck - 1, 0.0)
    a_m, a_g, a_w, f, c = per_unit(a_m, a_g, a_w, f, c)
    d = a_m * m + a_g * g + a_w * w
    return f * d + c * w, d


def sgdg_update(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    grad_clip: float | None = 0.1,
    *,
    unit_eps: float = 1e-8,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""The SGD-G step (projection, clipping, momentum, exp map) in one pass.

    Equal to ``optax.chain(grassmann_project(unit_eps), clip_tangent_norm(grad_clip),
    optax.scale_by_learning_rate(learning_rate), transported_momentum(momentum,
    unit_eps=unit_eps), exp_map_update(unit_eps))`` up to rounding, with one
    reduction pass and one elementwise pass per leaf:

    .. math::

      \begin{align*}
        \hat h &= \mathrm{clip}_\nu\bigl(\|w\|\,(g - \langle y, g\rangle y)\bigr),
          \quad y = w / (\|w\| + \epsilon_u) \\
        d &= \gamma\, \Gamma(d_\mathrm{prev}) - \eta\, \hat h, \qquad
        \text{update} = \mathrm{Exp}_y(d) - w
      \end{align*}

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      momentum: :math:`\gamma`.
      grad_clip: :math:`\nu`; ``None`` disables clipping. Static.
      unit_eps: :math:`\epsilon_u`.
      mu_dtype: Dtype of the stored step; defaults to the params dtype promoted
        to at least float32. Static.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`SgdgUpdateState`; last in
      a chain; needs ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> w = riemax.unit_init()(jax.random.key(0), (16, 4))
      >>> tx = riemax.sgdg_update(0.2)
      >>> updates, state = tx.update(jnp.ones_like(w), tx.init(w), w)
      >>> jnp.linalg.norm(optax.apply_updates(w, updates), axis=0).round(5)
      Array([1., 1., 1., 1.], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017
    """
    check_nonnegative("unit_eps", unit_eps)
    check_nonnegative("max_norm", grad_clip)
    _check_learning_rate(learning_rate)

    def init_fn(params):
        _check_units("sgdg_update", params)
        return SgdgUpdateState(
            count=jnp.zeros([], jnp.int32), trace=_zeros_like_state(params, mu_dtype)
        )

    def update_fn(updates, state, params=None):
        _need_params("sgdg_update", params)
        lr = _schedule_value(learning_rate, state.count)

        def leaf(g, d_prev, w):
            axes = unit_axes(w.ndim)
            g, d_prev, w_acc = to_acc(g), to_acc(d_prev), to_acc(w)
            gram = _gram(w_acc, g, d_prev)
            k, live, hg, hw, hh = _tangent_parts(
                g, w_acc, gram, axes, unit_eps, grad_clip
            )
            # Transport the previous step along itself: project, restore the
            # length the original's formula gives, and the sign past a quarter turn.
            n = safe_sqrt(gram[3])
            length = safe_div(n * n, n + unit_eps) * jnp.where(jnp.cos(n) < 0, -1, 1)
            t_m, t_w, tt = _transported(gram, k, live, length, jnp.abs(jnp.cos(n)) * n)
            # d = momentum * tau - lr * h_hat = a_m d_prev + a_g g + a_w w
            theta = _step_norm(momentum, t_m, t_w, tt, -lr, hg, hw, hh, gram)
            a_m, a_g, a_w = momentum * t_m, -lr * hg, momentum * t_w - lr * hw
            ck, b = _expmap_coefficients(theta, k, unit_eps)
            delta, d = _write(live, 1.0, ck, b, a_m, a_g, a_w, d_prev, g, w_acc)
            return delta.astype(w.dtype), d

        results = _map_units("sgdg_update", leaf, updates, state.trace, params)
        deltas, trace = _unzip(updates, results, 2)
        return optax.tree.cast_like(deltas, updates), SgdgUpdateState(
            count=optax.safe_increment(state.count),
            trace=optax.tree.cast_like(trace, state.trace),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def adamg_update(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
    grad_clip: float | None = 0.1,
    *,
    unit_eps: float = 1e-8,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""The Adam-G step (projection, clipping, moments, exp map) in one pass.

    Equal to ``optax.chain(grassmann_project(unit_eps), clip_tangent_norm(grad_clip),
    spherical_adam(b1, b2, eps, unit_eps=unit_eps),
    optax.scale_by_learning_rate(learning_rate), exp_map_update(unit_eps))`` up to
    rounding, with one reduction pass and one elementwise pass per leaf:

    .. math::

      \begin{align*}
        m &\leftarrow \beta_1 \Gamma(m) + (1-\beta_1)\hat h, \qquad
        v_j \leftarrow \beta_2 v_j + (1-\beta_2)\|\hat h_j\|^2 \\
        \delta_j &= -\eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
          \frac{m_j}{\sqrt{v_j+\epsilon}}, \qquad
        \text{update} = \mathrm{Exp}_y(\delta) - w
      \end{align*}

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      b1: First-moment decay.
      b2: Per-unit second-moment decay.
      eps: Inside the square root of the uncorrected second moment.
      grad_clip: :math:`\nu`; ``None`` disables clipping. Static.
      unit_eps: :math:`\epsilon_u`.
      mu_dtype: Dtype of ``m``; defaults to the params dtype promoted to at least
        float32. Static.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`AdamgUpdateState`; last
      in a chain; needs ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> w = riemax.unit_init()(jax.random.key(0), (16, 4))
      >>> tx = riemax.adamg_update(0.05)
      >>> updates, state = tx.update(jnp.ones_like(w), tx.init(w), w)
      >>> state.nu.shape
      (1, 4)
      >>> jnp.linalg.norm(optax.apply_updates(w, updates), axis=0).round(5)
      Array([1., 1., 1., 1.], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017
    """
    check_nonnegative("unit_eps", unit_eps)
    check_nonnegative("max_norm", grad_clip)
    _check_learning_rate(learning_rate)

    def init_fn(params):
        _check_units("adamg_update", params)
        return AdamgUpdateState(
            count=jnp.zeros([], jnp.int32),
            mu=_zeros_like_state(params, mu_dtype),
            nu=_zeros_per_unit(params),
        )

    def update_fn(updates, state, params=None):
        _need_params("adamg_update", params)
        lr = _schedule_value(learning_rate, state.count)
        count = optax.safe_increment(state.count)

        def leaf(g, m, v, w):
            axes = unit_axes(w.ndim)
            g, m, w_acc = to_acc(g), to_acc(m), to_acc(w)
            gram = _gram(w_acc, g, m)
            k, live, hg, hw, hh = _tangent_parts(
                g, w_acc, gram, axes, unit_eps, grad_clip
            )
            n_m = safe_sqrt(gram[3])
            t_m, t_w, tt = _transported(gram, k, live, n_m, ADAM_KEPT_FRACTION * n_m)
            v = b2 * v + (1 - b2) * hh
            t = count.astype(v.dtype)
            alpha = jnp.sqrt(1 - b2**t) / (1 - b1**t)
            scale = -lr * safe_div(alpha, safe_sqrt(v + eps))  # delta = scale * m_new
            # m_new = b1 * tau + (1 - b1) * h_hat = a_m m + a_g g + a_w w
            norm_m = _step_norm(b1, t_m, t_w, tt, 1 - b1, hg, hw, hh, gram)
            theta = jnp.abs(scale) * norm_m
            a_m, a_g, a_w = b1 * t_m, (1 - b1) * hg, b1 * t_w + (1 - b1) * hw
            ck, b = _expmap_coefficients(theta, k, unit_eps)
            delta, m_new = _write(live, scale, ck, b, a_m, a_g, a_w, m, g, w_acc)
            return delta.astype(w.dtype), m_new, v

        results = _map_units("adamg_update", leaf, updates, state.mu, state.nu, params)
        deltas, mu, nu = _unzip(updates, results, 3)
        return optax.tree.cast_like(deltas, updates), AdamgUpdateState(
            count=count,
            mu=optax.tree.cast_like(mu, state.mu),
            nu=optax.tree.cast_like(nu, state.nu),
        )

    return optax.GradientTransformation(init_fn, update_fn)
