"""Parameter-path helpers shared by the transforms, the label builders and ENorm."""

from __future__ import annotations

from typing import Any

import jax


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: tuple[Any, ...]) -> str:
    """Returns a key path as a ``/``-joined string, dropping a trailing ``value``.

    ``nnx.Optimizer`` hands transforms ``Param``-wrapped leaves at init (their
    paths end in ``.value``) and plain arrays at update; stripping the suffix
    makes both spell the same path.

    Examples:
      >>> import jax
      >>> from riemax._tree import path_str
      >>> tree = {"block": {"conv": {"kernel": 0}}}
      >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
      ['block/conv/kernel']
    """
    names = [_key_name(k) for k in path]
    if (
        names
        and names[-1] == "value"
        and isinstance(path[-1], jax.tree_util.GetAttrKey)
    ):
        names = names[:-1]
    return "/".join(names)
