r"""The group-wise steps of Roburin, de Mont-Marin et al. (2020): AdamS, AdamSRT
and SGD-MRT.

Groups are indexed by ``channel_axes`` (Flax layout): ``(-1,)`` one group per
output unit (the BatchNorm case), ``()`` the whole tensor (LayerNorm), ``None``
every element (the classic optimizers). :math:`\langle\cdot,\cdot\rangle_R` sums
over the other axes and :math:`d` is the group size. Leaves of any rank are
accepted; a group of one element reduces each step to Adam / momentum SGD.

Both steps take the learning rate, because the rescaled transport ("RT") depends
on the step actually taken: they return the final additive update and come last
in a chain. Their buffers are stored where they were computed and carried to the
params of the next ``update`` at its start: since the old point is the new one
plus the step, the originals' transport equals a projection at the new point,
which needs the current params only (the same trajectory).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from riemax import _checks as checks
from riemax._gram import gram_request
from riemax._hybrid import decayed
from riemax._leafmap import (
    Step,
    schedule_value,
    stateful,
    zeros_like_state,
    zeros_per_group,
)
from riemax._numerics import (
    combination,
    exponent,
    group_axes,
    group_size,
    pow2,
    safe_div,
    safe_sqrt,
    second_moment,
    to_acc,
    unscaled,
)


class ScaleByAdamsState(NamedTuple):
    """State of :func:`scale_by_adams`: step count, first moment, per-group second
    moment per element."""

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    mu: optax.Params
    nu: optax.Params


class ScaleBySgdmrtState(NamedTuple):
    """State of :func:`scale_by_sgdmrt`: step count and momentum buffer."""

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    trace: optax.Params


#: (w, m, g) index pairs of the AdamSRT Gram pass: ww, wm, mm, wg, gm, gg.
_SRT_PAIRS = ((0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2))


def _check_adams(owner, learning_rate, b1, b2, eps, channel_axes, mu_dtype):
    checks.check_learning_rate(owner, learning_rate)
    checks.check_adam(owner, b1, b2, eps)
    checks.check_channel_axes(owner, channel_axes)
    checks.check_dtype(owner, "mu_dtype", mu_dtype)


def _check_sgdmrt(owner, learning_rate, momentum, channel_axes, mu_dtype):
    checks.check_learning_rate(owner, learning_rate)
    checks.check_momentum(owner, momentum)
    checks.check_channel_axes(owner, channel_axes)
    checks.check_dtype(owner, "mu_dtype", mu_dtype)


def _adams_scale(v, mean_square, d, lr, count, b1, b2, eps):
    """``(s, v_new)`` with the step ``-s m_new`` (one scalar ``s`` per group)."""
    v = second_moment(v, mean_square, b2)  # an average of g's mean square
    t = count.astype(v.dtype)
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    root_d = jnp.sqrt(d)
    return lr * root_d / bc1 / (root_d * safe_sqrt(v) / jnp.sqrt(bc2) + eps), v


def _adams_units(gr, inputs, *, lr, count, b1, b2, eps, transport):
    """AdamS/AdamSRT's per-group math, on the groups of every leaf at once."""
    v, d = inputs
    rt = transport and len(gr.values) == len(_SRT_PAIRS)
    gg, e_g = (gr.values[5], gr.exps[2]) if rt else (gr.values[0], gr.exps[0])
    # v is the mean square of g over the group.
    rms = unscaled(safe_sqrt(gg / d), e_g)
    s, v = _adams_scale(v, rms * rms, d, lr, count, b1, b2, eps)
    if not rt:
        return s, v
    ww, wm = gr.values[0], gr.values[1]
    e_w, e_m = gr.exps[0], gr.exps[1]
    # m is stored at the params it moved (x1). The original transports it after
    # the step; with x1 = x2 + s m that equals, at x2 = w now,
    # (<x2,x2> m - <m,x2> x2) / (<x2,x2> + eps). As real coefficients on the
    # scaled arrays: m_new = c_m m~ + c_w w~ + c_g g~.
    den = ww + unscaled(eps, -2 * e_w, v.dtype)
    c_m = unscaled(b1, e_m, v.dtype) * safe_div(ww, den)
    c_w = -b1 * unscaled(safe_div(wm, den), e_m)
    c_g = unscaled(1 - b1, e_g, v.dtype)
    # v <- v <x1,x1> / (<x2,x2> + eps) with x2 = w - s m_new.
    q = (unscaled(1.0, e_w, v.dtype) - s * c_w, -s * c_m, -s * c_g)
    e_q = exponent(jnp.max(jnp.abs(jnp.stack(q)), axis=0))
    f_q = pow2(-e_q, v.dtype)
    quad = combination([x * f_q for x in q], gr.values, _SRT_PAIRS)
    x2 = unscaled(quad, 2 * (e_q - e_w)) + unscaled(eps, -2 * e_w, v.dtype)
    v_new = v * safe_div(ww, x2)
    return s, c_m, c_w, c_g, gr.factor(0), gr.factor(1), gr.factor(2), v_new


def scale_by_adams(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    channel_axes: Sequence[int] | None = (-1,),
    transport: bool = True,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""AdamS / AdamSRT step: one second moment per group, rescaled transport.

    With ``t`` the step count, :math:`x_1 = w` and :math:`x_2 = w + \Delta`:

    .. math::

      \begin{align*}
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2) \langle g, g\rangle_R / d \\
        \Delta &= -\eta\sqrt{d}\;\frac{m / (1-\beta_1^t)}
          {\sqrt{d v}/\sqrt{1-\beta_2^t} + \epsilon} \\
        v &\leftarrow v\, \frac{\langle x_1, x_1\rangle_R}
          {\langle x_2, x_2\rangle_R + \epsilon}, \qquad
        m \leftarrow \frac{\langle x_1, x_2\rangle_R\, m
          - \langle m, x_2\rangle_R\, x_1}{\langle x_2, x_2\rangle_R + \epsilon}
      \end{align*}

    ``v`` is stored per element (the original's :math:`\langle g, g\rangle_R`
    divided by :math:`d`), so that it stays finite wherever the squares of the
    gradient do; :math:`\sqrt{d v}` is the original's root. The last line (rescale
    and transport, "RT") runs only when ``transport`` and :math:`d > 1`.

    With :math:`x_1 = x_2 + s\,m` the transport of ``m`` equals
    :math:`(\langle x_2, x_2\rangle_R\, m - \langle m, x_2\rangle_R\, x_2) /
    (\langle x_2, x_2\rangle_R + \epsilon)`, which needs only the new point:
    riemax stores ``m`` where it was computed and transports it at the start of
    the next update (the same trajectory); ``v`` is rescaled at the end of the
    step. All per-group inner products come from one pass over ``w``, ``m`` and
    ``g``.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule of the step count.
      b1: First-moment decay, in ``[0, 1)``.
      b2: Second-moment decay, in ``[0, 1)``.
      eps: Added after the square root (bias-corrected), and in the RT
        denominators.
      channel_axes: Axes indexing the groups: ``(-1,)`` one group per output unit
        (BatchNorm; default), ``()`` the whole tensor (LayerNorm), ``None``
        element-wise (plain Adam). Static.
      transport: Apply RT (AdamSRT) or not (AdamS). Static.
      mu_dtype: Dtype of ``m``; defaults to the params dtype promoted to at least
        float32. Static.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`ScaleByAdamsState`;
      needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax, riemax
      >>> w = jnp.array([[1.0], [0.0]])
      >>> tx = riemax.scale_by_adams(0.1)
      >>> delta, state = tx.update(jnp.array([[0.0], [1.0]]), tx.init(w), w)
      >>> round(float(delta[1, 0]), 5)  # -lr * sqrt(d) * m_hat / sqrt(d * v_hat)
      -0.14142
      >>> round(float(state.nu[0, 0]), 7)  # (0.001 / 2) rescaled by |x1|^2 / |x2|^2
      0.0004902

    References:
      Roburin, de Mont-Marin et al., `Spherical perspective on learning with
      batch norm <https://arxiv.org/abs/2006.13382>`_, 2020
    """
    owner = "scale_by_adams"
    _check_adams(owner, learning_rate, b1, b2, eps, channel_axes, mu_dtype)
    return _scale_by_adams(
        owner, learning_rate, b1, b2, eps, channel_axes, transport, mu_dtype, 0.0
    )


def _scale_by_adams(
    owner, learning_rate, b1, b2, eps, channel_axes, transport, mu_dtype, decay
):
    """:func:`scale_by_adams` on ``g + decay * w`` (coupled L2, as
    ``optax.add_decayed_weights`` in front, but added inside the step: its
    per-group sums form the decayed gradient in their loops, where a decayed
    gradient computed in front would be stored on every step)."""

    def axes_of(p):
        return group_axes(p.ndim, channel_axes)

    def init(params):
        return ScaleByAdamsState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros_like_state(params, mu_dtype),
            nu=zeros_per_group(params, axes_of),
        )

    def prepare(state, count, updates, params):
        lr = schedule_value(learning_rate, state.count)
        units = functools.partial(
            _adams_units, lr=lr, count=count, b1=b1, b2=b2, eps=eps,
            transport=transport,
        )  # fmt: skip

        def leaf(g, m, v, w):
            axes = axes_of(w)
            d = group_size(w.shape, axes)
            g, m, w_acc = to_acc(g), to_acc(m), to_acc(w)
            # The decayed gradient, also as a form of the sums (see
            # _scale_by_adams); the decay may be traced (inject_hyperparams).
            form = None
            if not (isinstance(decay, (int, float)) and decay == 0):
                form = (functools.partial(_decayed, decay=decay), (g, w_acc))
                g = _decayed(g, w_acc, decay)
            if not axes:  # one element per group: plain Adam
                s, v = _adams_scale(v, g * g, 1, lr, count, b1, b2, eps)
                m = b1 * m + (1 - b1) * g
                return (-s * m).astype(w.dtype), m, v
            rt = transport and d > 1
            size = jnp.asarray(d, v.dtype)
            if rt:
                request = gram_request(
                    (w_acc, m, g), _SRT_PAIRS, axes, verify_zero=(0,),
                    then=units, inputs=(v, size), forms=(None, None, form),
                )  # fmt: skip
                s, c_m, c_w, c_g, r_w, r_m, r_g, v = yield request
                m = c_m * (m * r_m) + c_w * (w_acc * r_w) + c_g * (g * r_g)
                return (-s * m).astype(w.dtype), m, v
            request = gram_request(
                (g,), ((0, 0),), axes, verify_zero=(), then=units, inputs=(v, size),
                forms=(form,),
            )  # fmt: skip
            s, v = yield request
            m = b1 * m + (1 - b1) * g
            return (-s * m).astype(w.dtype), m, v

        return Step(leaf)

    return stateful(
        owner,
        init,
        prepare,
        fields=("mu", "nu"),
        units=False,
        channel_axes=channel_axes,
    )


def _sgdmrt_units(gr, inputs):
    """SGD-MRT's per-group projection coefficients, for every leaf at once: the
    buffer at ``w`` is ``b + c (w 2**-e_w)``."""
    c = -unscaled(safe_div(gr.values[1], gr.values[0]), gr.exps[1])
    return c, gr.factor(0)


def scale_by_sgdmrt(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    *,
    channel_axes: Sequence[int] | None = (-1,),
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""SGD-MRT step: momentum SGD whose buffer is transported per group.

    With :math:`x_1 = w`, :math:`x_2 = w - \eta b` and groups as in
    :func:`scale_by_adams`:

    .. math::

      b \leftarrow \mu b + g, \qquad \Delta = -\eta b, \qquad
      b \leftarrow \frac{\langle x_1, x_2\rangle_R\, b
        - \langle b, x_2\rangle_R\, x_1}{\langle x_2, x_2\rangle_R}

    The transport runs only for groups of size :math:`d > 1`; it has no epsilon
    (as the original), and a group that lands exactly at zero keeps its buffer
    instead of dividing by zero. Last in a chain (it takes the learning rate).

    Because :math:`x_1 = x_2 + \eta b`, the transport equals projecting ``b`` on the
    tangent space at :math:`x_2`: :math:`b - \langle b, x_2\rangle_R\, x_2 /
    \langle x_2, x_2\rangle_R`. riemax stores ``b`` where it was computed and
    applies that projection at the start of the next update, from the current
    params (the same trajectory; the two output loops then update donated buffers
    in place).

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      momentum: :math:`\mu`, in ``[0, 1]``.
      channel_axes: Group axes as in :func:`scale_by_adams`. Static.
      mu_dtype: Dtype of the buffer; defaults to the params dtype promoted to at
        least float32. Static.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`ScaleBySgdmrtState`;
      needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = jnp.array([[1.0], [0.0]])
      >>> tx = riemax.scale_by_sgdmrt(0.1)
      >>> state = tx.init(w)
      >>> delta, state = tx.update(jnp.array([[0.0], [1.0]]), state, w)
      >>> [round(float(x), 4) for x in delta.ravel()]  # -lr * b
      [-0.0, -0.1]
      >>> w = w + delta  # b is carried to w = [1, -0.1] by the next update:
      >>> delta, _ = tx.update(jnp.zeros_like(w), state, w)
      >>> [round(float(x), 4) for x in (delta / -0.1).ravel()]  # 0.9 * b at w
      [0.0891, 0.8911]

    References:
      Roburin, de Mont-Marin et al., `Spherical perspective on learning with
      batch norm <https://arxiv.org/abs/2006.13382>`_, 2020
    """
    owner = "scale_by_sgdmrt"
    _check_sgdmrt(owner, learning_rate, momentum, channel_axes, mu_dtype)

    def init(params):
        return ScaleBySgdmrtState(
            count=jnp.zeros([], jnp.int32), trace=zeros_like_state(params, mu_dtype)
        )

    def prepare(state, count, updates, params):
        lr = schedule_value(learning_rate, state.count)

        def leaf(g, b, w):
            axes = group_axes(w.ndim, channel_axes)
            w_acc, b = to_acc(w), to_acc(b)
            if group_size(w.shape, axes) > 1:
                # b is stored at the params it moved (x1). The original transports
                # it after the step; with x1 = x2 + lr b that equals projecting it
                # at x2 = w now. A group at exactly zero keeps its buffer.
                c, r_w = yield gram_request(
                    (w_acc, b), ((0, 0), (0, 1)), axes, verify_zero=(0,),
                    then=_sgdmrt_units,
                )  # fmt: skip
                b = b + c * (w_acc * r_w)
            b = momentum * b + to_acc(g)
            return (-lr * b).astype(w.dtype), b

        return Step(leaf)

    return stateful(
        owner,
        init,
        prepare,
        fields=("trace",),
        units=False,
        channel_axes=channel_axes,
    )


# ------------------------------------------------------------------------ the aliases


def adamsrt(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    channel_axes: Sequence[int] | None = (-1,),
    transport: bool = True,
) -> optax.GradientTransformation:
    r"""AdamSRT: AdamS with rescaled transport of its moments (Roburin et al.).

    ``optax.chain(optax.add_decayed_weights(weight_decay),
    scale_by_adams(learning_rate, b1, b2, eps, transport=transport))``: coupled L2,
    then the standardised step of :func:`scale_by_adams` (the same state; the
    decay is added inside the step, where the per-group sums form the decayed
    gradient without storing it, in float32 or wider). After each step the
    first moment is transported to the new point and both moments are rescaled by
    the change of the group norm; ``transport=False`` is AdamS (:func:`adams`).

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      b1: First-moment decay.
      b2: Second-moment decay.
      eps: Added after the square root and in the transport denominators.
      weight_decay: Coupled L2 coefficient added to the gradient (>= 0).
      channel_axes: ``(-1,)`` per unit (default), ``()`` whole tensor, ``None``
        element-wise (then it is Adam with coupled L2). Static.
      transport: Rescale and transport the moments (AdamSRT) or not (AdamS).
        Static.

    Returns:
      A :class:`optax.GradientTransformation`; leaves of any rank are accepted.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = {"kernel": jnp.eye(3), "bias": jnp.zeros(3)}
      >>> tx = riemax.adamsrt(1e-3)
      >>> updates, state = tx.update(w, tx.init(w), w)
      >>> [round(float(x), 5) for x in jnp.diag(updates["kernel"])]  # -lr * sqrt(3)
      [-0.00173, -0.00173, -0.00173]

    References:
      Roburin, de Mont-Marin et al., `Spherical perspective on learning with
      batch norm <https://arxiv.org/abs/2006.13382>`_, 2020
    """
    return _srt("adamsrt", learning_rate, b1, b2, eps, weight_decay, channel_axes,
                transport)  # fmt: skip


def adams(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    channel_axes: Sequence[int] | None = (-1,),
) -> optax.GradientTransformation:
    r"""AdamS: Adam with one second moment per group (Roburin et al., 2020).

    :func:`adamsrt` without the rescaled transport (``transport=False``): coupled
    L2, then the standardised step of :func:`scale_by_adams`. With
    ``channel_axes=None`` it is Adam with coupled L2.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      b1: First-moment decay.
      b2: Second-moment decay.
      eps: Added after the square root.
      weight_decay: Coupled L2 coefficient added to the gradient (>= 0).
      channel_axes: ``(-1,)`` per unit (default), ``()`` whole tensor, ``None``
        element-wise. Static.

    Returns:
      A :class:`optax.GradientTransformation`; leaves of any rank are accepted.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}
      >>> tx = riemax.adams(1e-3)
      >>> updates, _ = tx.update(w, tx.init(w), w)
      >>> updates["kernel"][0].round(6)
      Array([-0.001, -0.001], dtype=float32)

    References:
      Roburin, de Mont-Marin et al., `Spherical perspective on learning with
      batch norm <https://arxiv.org/abs/2006.13382>`_, 2020
    """
    return _srt("adams", learning_rate, b1, b2, eps, weight_decay, channel_axes,
                False)  # fmt: skip


def sgdmrt(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    *,
    channel_axes: Sequence[int] | None = (-1,),
) -> optax.GradientTransformation:
    r"""SGD-MRT: momentum SGD with per-group rescaled transport (Roburin et al.).

    ``optax.chain(optax.add_decayed_weights(weight_decay),
    scale_by_sgdmrt(learning_rate, momentum))``; see :func:`scale_by_sgdmrt`.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      momentum: :math:`\mu`, in ``[0, 1]``.
      weight_decay: Coupled L2 coefficient added to the gradient (>= 0).
      channel_axes: ``(-1,)`` per unit (default), ``()`` whole tensor, ``None``
        element-wise (then it is SGD with momentum). Static.

    Returns:
      A :class:`optax.GradientTransformation`; leaves of any rank are accepted.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = jnp.ones((2, 2))
      >>> tx = riemax.sgdmrt(0.1, channel_axes=None)
      >>> tx.update(jnp.ones_like(w), tx.init(w), w)[0]
      Array([[-0.1, -0.1],
             [-0.1, -0.1]], dtype=float32)

    References:
      Roburin, de Mont-Marin et al., `Spherical perspective on learning with
      batch norm <https://arxiv.org/abs/2006.13382>`_, 2020
    """
    _check_sgdmrt("sgdmrt", learning_rate, momentum, channel_axes, None)
    step = scale_by_sgdmrt(learning_rate, momentum, channel_axes=channel_axes)
    return decayed("sgdmrt", weight_decay, channel_axes, step)


def _decayed(g, w, decay):
    """``g + decay * w``, the coupled L2 gradient."""
    return g + decay * w


def _srt(owner, learning_rate, b1, b2, eps, weight_decay, channel_axes, transport):
    """AdamS or AdamSRT under the name the user called: the chain of
    :func:`decayed` (the same state), with the decay added inside the step."""
    _check_adams(owner, learning_rate, b1, b2, eps, channel_axes, None)
    step = _scale_by_adams(
        owner, learning_rate, b1, b2, eps, channel_axes, transport, None, weight_decay
    )
    return decayed(owner, weight_decay, channel_axes, step, inside=True)
