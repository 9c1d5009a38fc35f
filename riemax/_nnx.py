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

import jax


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


def kernel_chain(model: Any, sample_input: Any = None) -> list[str]:
    """Returns the kernel paths of an NNX model's ``Linear``/``Conv`` layers, in order.

    The paths (``"/"``-joined, e.g. ``"layers/0/kernel"``) are those of
    ``nnx.state(model, nnx.Param)`` and can be passed to :func:`riemax.apply_enorm`.

    Without ``sample_input`` the order is NNX's graph traversal order: list and
    :class:`flax.nnx.Sequential` entries by index, but module *attributes* sorted
    by name (``fc1, fc10, fc2``), not in definition order. It is the call order
    only for ``Sequential``-like models and attributes whose names sort in call
    order. With ``sample_input`` the order is that in which ``nnx.Linear`` and
    ``nnx.Conv`` layers are *called* during ``model(sample_input)``, traced
    abstractly with :func:`jax.eval_shape` on a copy of the model (nothing is
    computed and the model is not modified; ``Linear.__call__``/``Conv.__call__``
    are wrapped for the duration of the trace, so do not call it from several
    threads at once). A layer called several times is listed once, at its first
    call; layers never called are omitted; subclasses are recorded when their
    ``__call__`` goes through the base class's.

    Flax is imported lazily: :mod:`riemax` itself only needs jax, optax and numpy.
    The list is not checked to form a chain; :func:`riemax.apply_enorm` checks
    the widths.

    Args:
      model: An ``nnx.Module``.
      sample_input: Optional input; if given, the order is the call order of
        ``model(sample_input)``.

    Returns:
      The list of kernel path strings.

    Examples:
      >>> import jax, jax.numpy as jnp, riemax
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.stem = nnx.Conv(1, 8, (3, 3), rngs=rngs)
      ...         self.head = nnx.Linear(8, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         h = jax.nn.relu(self.stem(x)).mean(axis=(1, 2))
      ...         return self.head(h)
      >>> net = Net(nnx.Rngs(0))
      >>> riemax.kernel_chain(net)  # attribute names sorted: NOT the call order
      ['head/kernel', 'stem/kernel']
      >>> riemax.kernel_chain(net, jnp.ones((1, 6, 6, 1)))  # call order
      ['stem/kernel', 'head/kernel']
    """
    from flax import nnx  # lazy: flax is an optional dependency

    kinds = (nnx.Linear, nnx.Conv)

    def kernel_paths(root: Any) -> dict[int, str]:
        return {i: f"{q}/kernel" for i, q in module_paths(root, kinds).items()}

    if sample_input is None:
        return list(kernel_paths(model).values())

    graphdef, state = nnx.split(model)
    order: list[str] = []

    def forward(state: Any, x: Any) -> None:
        copy = nnx.merge(graphdef, state)
        where = kernel_paths(copy)

        def recording(original: Callable[..., Any]) -> Callable[..., Any]:
            def call(self: Any, *args: Any, **kwargs: Any) -> Any:
                path = where.get(id(self))
                if path is not None and path not in order:
                    order.append(path)
                return original(self, *args, **kwargs)

            return call

        with wrapped_calls({cls: recording for cls in kinds}):
            copy(x)

    jax.eval_shape(forward, state, sample_input)
    return order
