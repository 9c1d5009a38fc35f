"""The start projection: put the chosen leaves of a param tree on their manifold
before training, each optimizer family with its own method.

The Stiefel and sphere optimizers that keep the weights themselves on a manifold
(rather than only their directions) start from a point on it: Cayley SGD/Adam
orthonormalise each kernel by QR, manifold Muon takes its matrix sign,
hyperspherical descent normalises the whole tensor. :func:`to_manifold` is the
one call for all of them; a method is a function of one Flax-layout leaf that
returns the projected leaf (same shape and dtype), registered by name in
:data:`START_METHODS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import jax

from riemax import _checks as checks
from riemax._labels import MANIFOLD, check_labels

#: The start methods by name: ``"module:attribute"`` of each, imported when used.
START_METHODS: dict[str, str] = {
    "qr": "riemax._stiefel:qr_start",
    "msign": "riemax._muon:msign_start",
    "normalize": "riemax._muon:normalize_start",
}


def _method(
    method: str | Callable[[jax.Array], jax.Array],
) -> Callable[[jax.Array], jax.Array]:
    if callable(method):
        return method
    if not isinstance(method, str) or method not in START_METHODS:
        valid = ", ".join(repr(k) for k in sorted(START_METHODS))
        raise ValueError(
            f"riemax.to_manifold: unknown method {method!r}; valid: {valid} or a "
            "function of one leaf."
        )
    module, attribute = START_METHODS[method].split(":")
    return getattr(importlib.import_module(module), attribute)


def to_manifold(
    params: Any,
    method: str | Callable[[jax.Array], jax.Array],
    labels: Any = None,
) -> Any:
    """The params with every manifold leaf projected onto its manifold.

    Args:
      params: The parameter tree.
      method: ``"qr"`` (orthonormal units, Cayley SGD/Adam), ``"msign"`` (the
        matrix sign, manifold Muon), ``"normalize"`` (the whole leaf at norm 1,
        hyperspherical descent), or a function of one leaf.
      labels: A label tree (``"manifold"``/``"euclidean"``) or a callable
        ``params -> labels`` (e.g. :func:`riemax.labels_by_rule`); ``None``: every
        leaf. Only ``"manifold"`` leaves are projected.

    Returns:
      A tree like ``params``; leaves that are not projected are the same objects.
    """
    fn = _method(method)
    labels = check_labels(params, MANIFOLD if labels is None else labels)

    def one(path, p, label):
        if label != MANIFOLD:
            return p
        checks.check_leaf("to_manifold", path, p, units=False)
        try:
            return fn(p)
        except ValueError as e:  # name the leaf the method refused
            reason = str(e).removeprefix("riemax.to_manifold: ")
            raise ValueError(
                f"riemax.to_manifold: parameter '{checks.where_of(path)}': {reason}"
            ) from e

    return jax.tree_util.tree_map_with_path(one, params, labels)


__all__ = ["START_METHODS", "to_manifold"]
