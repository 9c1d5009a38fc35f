"""Wrapping the calls of Flax NNX layers while a model is traced.

Structural label detection (:func:`riemax.labels_from_model`) and the call order of
ENorm's chain (:func:`riemax.kernel_chain`) both trace one forward pass of a model
abstractly with the ``__call__`` of some NNX classes wrapped. This module is the one
place that patches Flax classes; Flax is imported lazily by the callers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any


def module_paths(root: Any, kinds: Any = None) -> dict[int, str]:
    """``id(module) -> "/"``-joined path of every NNX module (of the classes
    ``kinds``, by default all) in ``root``'s graph, in traversal order, at the first
    path where it is reached."""
    from flax import nnx

    kinds = nnx.Module if kinds is None else kinds
    found: dict[int, str] = {}
    for path, node in nnx.iter_graph(root):
        if isinstance(node, kinds):
            found.setdefault(id(node), "/".join(str(k) for k in path))
    return found


@contextlib.contextmanager
def wrapped_calls(
    wrappers: Mapping[type, Callable[[Callable[..., Any]], Callable[..., Any]]],
) -> Iterator[None]:
    """Replaces ``cls.__call__`` by ``make(original)`` for every ``cls -> make``
    while the block runs, and restores the classes afterwards (also on errors).

    An inherited ``__call__`` is wrapped in the subclass and removed again on exit,
    so the parent's method is never shadowed. Not thread-safe: do not trace other
    models of the same classes concurrently.
    """
    originals = {cls: cls.__dict__.get("__call__") for cls in wrappers}
    resolved = {cls: cls.__call__ for cls in wrappers}
    try:
        for cls, make in wrappers.items():
            cls.__call__ = make(resolved[cls])  # type: ignore[method-assign]
        yield
    finally:
        for cls, call in originals.items():
            if call is None:
                del cls.__call__
            else:
                cls.__call__ = call  # type: ignore[method-assign]
