r"""Parameter groups and weight decay.

Weight decay is per parameter group (:func:`param_groups`): ``manifold`` kernels,
Euclidean ``kernel``\ s, ``bias``\ es of Conv/Dense layers, BatchNorm ``gamma``
(scale) and ``beta`` (offset); :func:`decay_tree` maps the config's
``manifold_decay``, ``weight_decay``, ``bias_decay``, ``gamma_decay`` and
``beta_decay`` onto the leaves (:func:`experiments.optimizers.group_decays` gives
the per-group values of a config), and :func:`add_decay` adds them to the
gradient (coupled L2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optax

GROUPS = ("manifold", "kernel", "bias", "gamma", "beta")


def param_groups(params: Any, labels: Any, batchnorm_paths: set[str]) -> Any:
    """The weight-decay group of every leaf: ``manifold`` (manifold kernels),
    ``kernel`` (other leaves of rank >= 2), ``gamma``/``beta`` (scale/bias of a
    module whose ``/``-joined path is in ``batchnorm_paths``), ``bias`` (the rest)."""
    import jax

    import riemax

    def one(path, leaf, label):
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        parent = "/".join(keys[:-1])
        if label == riemax.MANIFOLD:
            return "manifold"
        if len(getattr(leaf, "shape", ())) >= 2:
            return "kernel"
        if parent in batchnorm_paths:
            return "gamma" if keys[-1] == "scale" else "beta"
        return "bias"

    return jax.tree_util.tree_map_with_path(one, params, labels)


def decay_tree(groups: Any, decays: Mapping[str, float]) -> Any:
    """Per-leaf decay coefficients (Python floats) from per-group values."""
    import jax

    return jax.tree.map(lambda g: float(decays[g]), groups)


def add_decay(decay: Any) -> optax.GradientTransformation:
    """``g + decay * w`` leaf by leaf, ``decay`` a tree of Python floats (static;
    leaves with 0 are passed through)."""
    import jax
    import optax

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        # The decay tree leads: inside optax.partition a masked leaf of the
        # updates is a MaskedNode subtree, passed through unchanged.
        out = jax.tree.map(
            lambda d, g, w: g if d == 0 or not hasattr(g, "dtype") else g + d * w,
            decay,
            updates,
            params,
        )
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)
