"""Compositions of whole optimizers: the hybrid split of a parameter tree and
coupled weight decay in front of a step.

:func:`hybrid` is the papers' hybrid optimizer: manifold leaves to one
transformation, every other leaf to another (:func:`optax.partition`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import optax

from riemax import _checks as checks
from riemax._labels import EUCLIDEAN, MANIFOLD, check_labels
from riemax._leafmap import validated


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


def decayed(
    owner: str,
    weight_decay: float,
    channel_axes: Sequence[int] | None,
    step: optax.GradientTransformation,
    *,
    inside: bool = False,
) -> optax.GradientTransformation:
    """``chain(add_decayed_weights(weight_decay), step)`` with its leaves checked
    first (any rank), so a bad leaf is named before optax meets it. ``inside``:
    ``step`` adds the decay itself (``weight_decay`` is only checked here); the
    chain keeps the same state with ``optax.identity()`` in front."""
    checks.check_number(owner, "weight_decay", weight_decay)
    checks.check_channel_axes(owner, channel_axes)
    front = optax.identity() if inside else optax.add_decayed_weights(weight_decay)
    chain = optax.chain(front, step)
    return validated(owner, chain, units=False, channel_axes=channel_axes)
