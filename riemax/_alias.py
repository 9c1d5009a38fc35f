r"""The papers' optimizers as chains of riemax and optax transformations.

Each alias is nothing but an :func:`optax.chain` (or :func:`optax.partition`) of
public transforms, so anything it does can be rebuilt, reordered or extended by
hand. SGD-G and Adam-G act on kernels only (rank >= 2); use :func:`hybrid` to
send the other parameters to a Euclidean optimizer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import optax

from riemax._adamsrt import scale_by_adams, scale_by_sgdmrt
from riemax._grassmann import ortho_penalty
from riemax._labels import EUCLIDEAN, MANIFOLD, check_labels
from riemax._sgdg_adamg import scale_by_adamg, scale_by_sgdg
from riemax._unitwise import check_channel_axes, check_number, validated


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
    return optax.chain(
        ortho_penalty(omega, at="unit", unit_eps=unit_eps),
        scale_by_adamg(learning_rate, b1, b2, eps, grad_clip, unit_eps=unit_eps),
    )


def _decayed(
    owner: str,
    weight_decay: float,
    channel_axes: Sequence[int] | None,
    step: optax.GradientTransformation,
) -> optax.GradientTransformation:
    """``chain(add_decayed_weights(weight_decay), step)`` with its leaves checked
    first (any rank), so a bad leaf is named before optax meets it."""
    check_number(owner, "weight_decay", weight_decay)
    check_channel_axes(owner, channel_axes)
    chain = optax.chain(optax.add_decayed_weights(weight_decay), step)
    return validated(owner, chain, units=False, channel_axes=channel_axes)


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
    then the standardised step of :func:`scale_by_adams`. After each step the
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
    step = scale_by_adams(
        learning_rate, b1, b2, eps, channel_axes=channel_axes, transport=transport
    )
    return _decayed("adamsrt", weight_decay, channel_axes, step)


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
    return adamsrt(
        learning_rate,
        b1,
        b2,
        eps,
        weight_decay,
        channel_axes=channel_axes,
        transport=False,
    )


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
    step = scale_by_sgdmrt(learning_rate, momentum, channel_axes=channel_axes)
    return _decayed("sgdmrt", weight_decay, channel_axes, step)


def hybrid(
    manifold_tx: optax.GradientTransformation,
    euclidean_tx: optax.GradientTransformation,
    labels: Any,
) -> optax.GradientTransformation:
    r"""Routes manifold leaves to one optimizer and all others to another.

    The papers' HybridOptimizer as :func:`optax.partition`: leaves labelled
    ``"manifold"`` get ``manifold_tx`` (e.g. :func:`sgdg`), leaves labelled
    ``"euclidean"`` get ``euclidean_tx`` (e.g. Nesterov SGD with weight decay).
    The two halves do not interact.

    Args:
      manifold_tx: Transformation for the manifold leaves.
      euclidean_tx: Transformation for every other leaf.
      labels: A tree with the structure of the params and values ``"manifold"`` or
        ``"euclidean"``, or a callable ``params -> tree`` (for instance
        :func:`riemax.labels_by_rule`). It is checked against the params at
        ``init`` and ``update``; a mismatch raises ``ValueError`` naming the
        paths. Pass it as a static argument under
        :func:`optax.inject_hyperparams`.

    Returns:
      A :class:`optax.GradientTransformation`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> kernel = riemax.unit_init()(jax.random.key(0), (3, 3, 4, 8))
      >>> params = {"conv": {"kernel": kernel, "bias": jnp.zeros(8)}}
      >>> tx = riemax.hybrid(riemax.sgdg(0.2), optax.sgd(0.01, 0.9, nesterov=True),
      ...                    riemax.labels_by_rule)
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> sorted(riemax.labels_by_rule(params)["conv"].items())
      [('bias', 'euclidean'), ('kernel', 'manifold')]

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017
    """
    for name, tx in (("manifold_tx", manifold_tx), ("euclidean_tx", euclidean_tx)):
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                f"riemax.hybrid: {name} must be an optax.GradientTransformation, "
                f"got {type(tx).__name__}."
            )
    if labels is None:
        raise TypeError("riemax.hybrid: labels must be a label tree or a callable.")
    return optax.partition(
        {MANIFOLD: manifold_tx, EUCLIDEAN: euclidean_tx},
        functools.partial(check_labels, labels=labels),
    )
