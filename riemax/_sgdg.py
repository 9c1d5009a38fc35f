r"""SGD-G and Adam-G (Cho & Lee, 2017): the one-pass steps, their states and the
papers' optimizers as chains.

:func:`scale_by_sgdg` and :func:`scale_by_adamg` compute the chains of the
composable transforms (:mod:`riemax._grassmann`) in one pass over each kernel
(:mod:`riemax._sgdg_step`); :func:`sgdg` and :func:`adamg` put the
orthogonality term (:func:`riemax.ortho_penalty`) in front. SGD-G and Adam-G act
on kernels only (rank >= 2); use :func:`riemax.hybrid` to send the other
parameters to a Euclidean optimizer.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from riemax import _checks as checks
from riemax._leafmap import (
    Step,
    moments_per_unit,
    schedule_value,
    stateful,
    zeros_like_state,
)
from riemax._ortho import ortho_penalty
from riemax._sgdg_step import adamg_units, radial, sgdg_units, step_program


class ScaleBySgdgState(NamedTuple):
    """State of :func:`scale_by_sgdg`: step count (for schedules) and the last step
    in carried form."""

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    trace: optax.Params


class ScaleByAdamgState(NamedTuple):
    """State of :func:`scale_by_adamg`: step count, first moment (carried form),
    per-unit second moment per element."""

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    mu: optax.Params
    nu: optax.Params


def scale_by_sgdg(
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
    reduction pass and two elementwise passes per leaf:

    .. math::

      \begin{align*}
        \hat h &= \mathrm{clip}_\nu\bigl(\|w\|\,(g - \langle y, g\rangle y)\bigr),
          \quad y = w / (\|w\| + \epsilon_u) \\
        d &= \gamma\, \Gamma(d_\mathrm{prev}) - \eta\, \hat h, \qquad
        \text{update} = \mathrm{Exp}_y(d) - w
      \end{align*}

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      momentum: :math:`\gamma`, in ``[0, 1]``.
      grad_clip: :math:`\nu`; ``None`` disables clipping. Static.
      unit_eps: :math:`\epsilon_u`.
      mu_dtype: Dtype of the stored step; defaults to the params dtype promoted
        to at least float32. Static.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`ScaleBySgdgState`; last
      in a chain; needs ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> w = riemax.unit_init()(jax.random.key(0), (16, 4))
      >>> tx = riemax.scale_by_sgdg(0.2)
      >>> updates, state = tx.update(jnp.ones_like(w), tx.init(w), w)
      >>> jnp.linalg.norm(optax.apply_updates(w, updates), axis=0).round(5)
      Array([1., 1., 1., 1.], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017
    """
    owner = "scale_by_sgdg"
    _check_sgdg(owner, learning_rate, momentum, grad_clip, unit_eps, mu_dtype)

    def init(params):
        return ScaleBySgdgState(
            count=jnp.zeros([], jnp.int32), trace=zeros_like_state(params, mu_dtype)
        )

    def prepare(state, count, updates, params):
        # One function object per step for every leaf: their requests resolve
        # together.
        derive = functools.partial(radial, unit_eps=unit_eps)
        units = functools.partial(
            sgdg_units,
            lr=schedule_value(learning_rate, state.count),
            momentum=momentum,
            unit_eps=unit_eps,
            max_norm=grad_clip,
        )

        def leaf(g, s, w):
            delta, new, _ = yield from step_program(
                g, s, w, unit_eps=unit_eps, then=units, inputs=(), derive=derive
            )
            return delta, new

        return Step(leaf)

    return stateful(owner, init, prepare, fields=("trace",))


def _check_sgdg(owner, learning_rate, momentum, grad_clip, unit_eps, mu_dtype):
    checks.check_learning_rate(owner, learning_rate)
    checks.check_momentum(owner, momentum)
    checks.check_number(owner, "grad_clip", grad_clip, allow_none=True)
    checks.check_unit_eps(owner, unit_eps)
    checks.check_dtype(owner, "mu_dtype", mu_dtype)


def scale_by_adamg(
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
    spherical_adam(b1, b2, eps, learning_rate=learning_rate, unit_eps=unit_eps),
    exp_map_update(unit_eps))`` up to rounding, with one reduction pass and two
    elementwise passes per leaf (``n`` is the unit size; ``v`` is stored per
    element):

    .. math::

      \begin{align*}
        m &\leftarrow \beta_1 \Gamma(m) + (1-\beta_1)\hat h, \qquad
        v_j \leftarrow \beta_2 v_j + (1-\beta_2)\|\hat h_j\|^2 / n \\
        \delta_j &= -\eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
          \frac{m_j}{\sqrt{n v_j+\epsilon}}, \qquad
        \text{update} = \mathrm{Exp}_y(\delta) - w
      \end{align*}

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      b1: First-moment decay, in ``[0, 1)``.
      b2: Per-unit second-moment decay, in ``[0, 1)``.
      eps: Inside the square root of the uncorrected second moment.
      grad_clip: :math:`\nu`; ``None`` disables clipping. Static.
      unit_eps: :math:`\epsilon_u`.
      mu_dtype: Dtype of ``m``; defaults to the params dtype promoted to at least
        float32. Static.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`ScaleByAdamgState`;
      last in a chain; needs ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> w = riemax.unit_init()(jax.random.key(0), (16, 4))
      >>> tx = riemax.scale_by_adamg(0.05)
      >>> updates, state = tx.update(jnp.ones_like(w), tx.init(w), w)
      >>> state.nu.shape
      (1, 4)
      >>> jnp.linalg.norm(optax.apply_updates(w, updates), axis=0).round(5)
      Array([1., 1., 1., 1.], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017
    """
    owner = "scale_by_adamg"
    _check_adamg(owner, learning_rate, b1, b2, eps, grad_clip, unit_eps, mu_dtype)

    def init(params):
        return ScaleByAdamgState(**moments_per_unit(params, mu_dtype))

    def prepare(state, count, updates, params):
        # One function object per step for every leaf: their requests resolve
        # together.
        derive = functools.partial(radial, unit_eps=unit_eps)
        units = functools.partial(
            adamg_units,
            lr=schedule_value(learning_rate, state.count),
            count=count,
            b1=b1,
            b2=b2,
            eps=eps,
            unit_eps=unit_eps,
            max_norm=grad_clip,
        )

        def leaf(g, s, v, w):
            size = jnp.asarray(w.size // w.shape[-1], v.dtype)
            return (
                yield from step_program(
                    g,
                    s,
                    w,
                    unit_eps=unit_eps,
                    then=units,
                    inputs=(v, size),
                    derive=derive,
                )
            )

        return Step(leaf)

    return stateful(owner, init, prepare, fields=("mu", "nu"))


def _check_adamg(owner, learning_rate, b1, b2, eps, grad_clip, unit_eps, mu_dtype):
    checks.check_learning_rate(owner, learning_rate)
    checks.check_adam(owner, b1, b2, eps)
    checks.check_number(owner, "grad_clip", grad_clip, allow_none=True)
    checks.check_unit_eps(owner, unit_eps)
    checks.check_dtype(owner, "mu_dtype", mu_dtype)


# ------------------------------------------------------------------------ the aliases


def sgdg(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    grad_clip: float | None = 0.1,
    omega: float = 0.1,
    unit_eps: float = 1e-8,
) -> optax.GradientTransformation:
    r"""SGD-G: momentum SGD on the sphere of every kernel unit (Cho & Lee, 2017).

    One step, per unit, with :math:`y = w/(\|w\|+\epsilon_u)`:

    .. math::

      \begin{align*}
        g &\leftarrow g + 2\omega\,(Y (Y^\top Y) - Y) \\
        \hat h &\leftarrow \mathrm{clip}_\nu\bigl(g - \langle y, g\rangle y\bigr) \\
        d &\leftarrow \gamma\, \Gamma(d_\mathrm{prev}) - \eta\, \hat h \\
        w &\leftarrow \mathrm{Exp}_y(d)
      \end{align*}

    It is ``optax.chain(ortho_penalty(omega), scale_by_sgdg(learning_rate, momentum,
    grad_clip))``, where :func:`scale_by_sgdg` computes ``grassmann_project() ->
    clip_tangent_norm(grad_clip) -> optax.scale_by_learning_rate(learning_rate) ->
    transported_momentum(momentum) -> exp_map_update()`` in one pass over each
    kernel (the tests check the two agree to float64 rounding). The learning rate
    sits inside the momentum, as in the original.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      momentum: :math:`\gamma`.
      grad_clip: :math:`\nu`, per-unit clip of the Riemannian gradient (before the
        learning rate); ``None`` disables it.
      omega: :math:`\omega` of the orthogonality term (gradient taken at
        ``unit(w)``); ``0.0`` disables it.
      unit_eps: :math:`\epsilon_u`; ``0.0`` gives exact geometry.

    Returns:
      A :class:`optax.GradientTransformation` for kernel leaves.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> w = riemax.unit_init()(jax.random.key(0), (3, 3, 8, 4))
      >>> tx = riemax.sgdg(0.2)
      >>> state = tx.init(w)
      >>> updates, state = tx.update(jnp.ones_like(w), state, w)
      >>> w = optax.apply_updates(w, updates)
      >>> jnp.linalg.norm(w.reshape(-1, 4), axis=0).round(5)
      Array([1., 1., 1., 1.], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017
    """
    _check_sgdg("sgdg", learning_rate, momentum, grad_clip, unit_eps, None)
    checks.check_number("sgdg", "omega", omega)
    return optax.chain(
        ortho_penalty(omega, at="unit", unit_eps=unit_eps),
        scale_by_sgdg(learning_rate, momentum, grad_clip, unit_eps=unit_eps),
    )


def adamg(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
    grad_clip: float | None = 0.1,
    omega: float = 0.1,
    unit_eps: float = 1e-8,
) -> optax.GradientTransformation:
    r"""Adam-G: Adam on the sphere of every kernel unit (Cho & Lee, 2017).

    Same projection, clipping and orthogonality term as :func:`sgdg`, then an
    element-wise first moment and one second moment per unit
    (:func:`spherical_adam`), and the exponential map:

    .. math::

      \delta_j = -\eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
        \frac{m_j}{\sqrt{v_j + \epsilon}}, \qquad w_j \leftarrow
        \mathrm{Exp}_{y_j}(\delta_j)

    It is ``optax.chain(ortho_penalty(omega), scale_by_adamg(learning_rate, b1, b2,
    eps, grad_clip))``, where :func:`scale_by_adamg` computes ``grassmann_project()
    -> clip_tangent_norm(grad_clip) -> spherical_adam(b1, b2, eps,
    learning_rate=learning_rate) -> exp_map_update()`` in one pass over each
    kernel.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      b1: First-moment decay.
      b2: Second-moment decay (the original's default 0.99).
      eps: Inside the square root of the uncorrected second moment.
      grad_clip: :math:`\nu`; ``None`` disables clipping.
      omega: :math:`\omega`; ``0.0`` disables the orthogonality term.
      unit_eps: :math:`\epsilon_u`; ``0.0`` gives exact geometry.

    Returns:
      A :class:`optax.GradientTransformation` for kernel leaves.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> w = riemax.unit_init()(jax.random.key(0), (16, 4))
      >>> tx = riemax.adamg(0.05)
      >>> updates, state = tx.update(jnp.ones_like(w), tx.init(w), w)
      >>> jnp.linalg.norm(optax.apply_updates(w, updates), axis=0).round(5)
      Array([1., 1., 1., 1.], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017
    """
    _check_adamg("adamg", learning_rate, b1, b2, eps, grad_clip, unit_eps, None)
    checks.check_number("adamg", "omega", omega)
    return optax.chain(
        ortho_penalty(omega, at="unit", unit_eps=unit_eps),
        scale_by_adamg(learning_rate, b1, b2, eps, grad_clip, unit_eps=unit_eps),
    )
