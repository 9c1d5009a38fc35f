"""Label trees that route parameters to the manifold or the Euclidean optimizer."""

from __future__ import annotations

import math
from typing import Any

import jax

from riemax._tree import path_str

MANIFOLD = "manifold"
EUCLIDEAN = "euclidean"


def labels_by_rule(params: Any, pattern: str = "conv") -> Any:
    """Labels kernels by the papers' syntactic rule (placeholder docstring)."""

    def label(path, leaf):
        name = path_str(path)
        shape = getattr(leaf, "shape", ())
        ok = (
            pattern in name
            and name.rsplit("/", 1)[-1] in ("kernel", "weight", "w")
            and len(shape) >= 2
            and math.prod(shape[:-1]) > shape[-1]
        )
        return MANIFOLD if ok else EUCLIDEAN

    return jax.tree_util.tree_map_with_path(label, params)


def labels_by_regex(*args, **kwargs):
    raise NotImplementedError


def labels_from_model(*args, **kwargs):
    raise NotImplementedError


def labels_by_invariance(*args, **kwargs):
    raise NotImplementedError


def label_report(*args, **kwargs):
    raise NotImplementedError
