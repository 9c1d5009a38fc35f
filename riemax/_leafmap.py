"""Per-leaf mapping and the skeletons every riemax transform stands on.

* :func:`leaf_map` maps a leaf function over the params with the checks of
  :mod:`riemax._checks` (naming the path of a bad leaf) and runs leaf *programs*
  (:mod:`riemax._gram`) in lockstep, so that a step makes its decisions once for
  the whole tree.
* :func:`stateless` and :func:`stateful` are the two skeletons of a transform:
  argument-free plumbing of ``init``/``update`` (checks, the step count, the
  per-leaf state fields cast back to their dtypes, extra arguments accepted and
  ignored as optax's own transforms do).
* Per-leaf state helpers (:func:`zeros_like_state`, :func:`zeros_per_unit`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from riemax._checks import (
    check_leaf,
    check_like_params,
    check_params,
    need_params,
    where_of,
)
from riemax._gram import Program, drive, normalize, normalize_program
from riemax._numerics import acc_dtype, kept_shape, to_acc, unit_axes


def leaf_map(
    owner: str,
    fn: Callable[..., Any],
    updates: Any,
    *others: Any,
    params: Any = None,
    units: bool = True,
    channel_axes: Sequence[int] | None = None,
) -> Any:
    """``tree_map`` of ``fn(update, *others, param)`` (or ``fn(update, *others)``
    without params) over the leaves, with the checks of :func:`check_leaf` and
    shape checks of every update against its parameter, naming the path."""
    if params is not None:
        check_like_params(owner, "updates", updates, params)
        for other in others:
            check_like_params(owner, "state", other, params)

    def leaf(path, u, *rest):
        ref = u if params is None else rest[-1]
        check_leaf(owner, path, ref, units=units, channel_axes=channel_axes)
        if params is not None:
            if getattr(u, "shape", None) != ref.shape:
                raise ValueError(
                    f"riemax.{owner}: the update of '{where_of(path)}' has shape "
                    f"{tuple(getattr(u, 'shape', ()))}, but the parameter has shape "
                    f"{tuple(ref.shape)}."
                )
            if not jnp.issubdtype(u.dtype, jnp.floating):
                raise TypeError(
                    f"riemax.{owner}: the update of '{where_of(path)}' has dtype "
                    f"{u.dtype}; gradients must be floating point."
                )
        return fn(u, *rest)

    trees = (updates, *others) if params is None else (updates, *others, params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    treedef = cast(Any, treedef)  # flatten_up_to has no type stub
    columns = [[u for _, u in flat]] + [treedef.flatten_up_to(t) for t in trees[1:]]
    outs = [
        leaf(path, *row)
        for (path, _), row in zip(flat, zip(*columns, strict=True), strict=True)
    ]
    # Leaf programs (generators) run in lockstep: one decision per round for the
    # whole tree (riemax._numerics.drive).
    return jax.tree_util.tree_unflatten(treedef, drive(outs))


def validated(
    owner: str,
    inner: optax.GradientTransformation,
    *,
    units: bool,
    channel_axes: Sequence[int] | None = None,
) -> optax.GradientTransformation:
    """``inner`` with the leaf checks of :func:`leaf_map` run first (same state).

    Aliases that start with an optax transform (weight decay) use it, so that a
    bad leaf is reported by name before optax meets it.
    """

    def init_fn(params):
        check_params(owner, params, units=units, channel_axes=channel_axes)
        return inner.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        need_params(owner, params)
        leaf_map(
            owner,
            lambda u, p: None,
            updates,
            params=params,
            units=units,
            channel_axes=channel_axes,
        )
        return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def unzip(template: Any, results: Any, n: int) -> tuple[Any, ...]:
    """Splits a tree of n-tuples (structured like ``template``) into n trees."""
    return tuple(
        jax.tree.map(lambda _, r, i=i: r[i], template, results) for i in range(n)
    )


def as_program(result: Any) -> Program:
    """``result`` itself, from a leaf program or a plain value alike."""
    if isinstance(result, Generator):
        return (yield from result)
    return result


def stateless(
    owner: str,
    leaf_fn: Callable[..., Any],
    *,
    needs_params: bool = True,
    units: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """A stateless per-unit transform: ``leaf_fn(update, param)`` (or
    ``leaf_fn(update)``) on every kernel, in the accumulation dtype, cast back.

    The unit-aware counterpart of optax's ``stateless_with_tree_map``: ``init``
    checks that every leaf is a floating kernel, ``update`` checks the updates
    against the params and names the path of any mismatch.
    """

    def init_fn(params):
        check_params(owner, params, units=units)
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted and ignored, as optax's own transforms do
        if needs_params:
            need_params(owner, params)

            def fn(u, w):
                return (yield from as_program(leaf_fn(to_acc(u), w))).astype(u.dtype)

            return leaf_map(owner, fn, updates, params=params, units=units), state

        def fn_u(u):
            return (yield from as_program(leaf_fn(to_acc(u)))).astype(u.dtype)

        return leaf_map(owner, fn_u, updates, units=units), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class Step(NamedTuple):
    """One ``update`` of a :func:`stateful` transform, as its ``prepare`` gives it.

    ``leaf(u, *fields, *extra, w)`` computes one leaf (a value or a leaf program)
    and returns ``(update, *new fields)``. ``extra`` are more per-leaf trees passed
    after the state fields; ``updates`` replaces the tree that is mapped (a
    transform that runs an inner optimizer first); ``state`` is the state whose
    fields are read (default: the incoming one); ``replace`` sets other fields of
    the new state.
    """

    leaf: Callable[..., Any]
    extra: tuple = ()
    updates: Any = None
    state: Any = None
    replace: Any = None


def stateful(
    owner: str,
    init_state: Callable[[Any], Any],
    prepare: Callable[[Any, Any, Any, Any], Step],
    *,
    fields: Sequence[str],
    units: bool = True,
    channel_axes: Sequence[int] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """A transform with per-leaf state: the skeleton of every stateful riemax
    optimizer.

    ``init`` checks the params and returns ``init_state(params)``. ``update``
    needs the params, increments the state's ``count`` (where it has one), calls
    ``prepare(state, new_count, updates, params)`` for the step's :class:`Step`,
    maps its leaf function over the params with :func:`leaf_map` (one decision
    per round for the whole tree) and stores every field of ``fields`` cast back
    to the dtypes of the incoming state. Extra arguments (``value=loss``, ...)
    are accepted and ignored.
    """
    fields = tuple(fields)

    def init_fn(params):
        check_params(owner, params, units=units, channel_axes=channel_axes)
        return init_state(params)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted and ignored, as optax's own transforms do
        need_params(owner, params)
        counted = "count" in state._fields
        count = optax.safe_increment(state.count) if counted else None
        step = prepare(state, count, updates, params)
        source = state if step.state is None else step.state
        mapped = updates if step.updates is None else step.updates
        results = leaf_map(
            owner,
            step.leaf,
            mapped,
            *(getattr(source, f) for f in fields),
            *step.extra,
            params=params,
            units=units,
            channel_axes=channel_axes,
        )
        deltas, *trees = unzip(updates, results, 1 + len(fields))
        new = {
            f: optax.tree.cast_like(t, getattr(state, f))
            for f, t in zip(fields, trees, strict=True)
        }
        if counted:
            new["count"] = count
        return deltas, state._replace(**new, **(step.replace or {}))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------- state helpers


def state_dtype(p: Any, mu_dtype: Any) -> jnp.dtype:
    return jnp.dtype(mu_dtype) if mu_dtype is not None else acc_dtype(p.dtype)


def zeros_like_state(params: Any, mu_dtype: Any) -> Any:
    """A zero buffer per leaf, in ``mu_dtype`` or the accumulation dtype."""
    return jax.tree.map(lambda p: jnp.zeros(p.shape, state_dtype(p, mu_dtype)), params)


def zeros_per_group(params: Any, axes_of: Callable[[Any], Sequence[int]]) -> Any:
    """One float32-or-wider zero per group, shaped like a per-group quantity."""
    return jax.tree.map(
        lambda p: jnp.zeros(kept_shape(p.shape, axes_of(p)), acc_dtype(p.dtype)),
        params,
    )


def zeros_per_unit(params: Any) -> Any:
    """One float32-or-wider zero per unit, shaped ``(1, ..., 1, out)``."""
    return zeros_per_group(params, lambda p: unit_axes(p.ndim))


def unit_of(w: jax.Array, unit_eps: Any) -> tuple[jax.Array, jax.Array]:
    """Returns ``(unit(w), ||w||)`` per unit, in the accumulation dtype."""
    return normalize(to_acc(w), unit_axes(w.ndim), unit_eps)


def unit_of_program(w: jax.Array, unit_eps: Any) -> Program:
    """:func:`unit_of` as a program for :func:`riemax._numerics.drive`."""
    return (yield from normalize_program(to_acc(w), unit_axes(w.ndim), unit_eps))


def schedule_value(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> Any:
    return learning_rate(count) if callable(learning_rate) else learning_rate


def moments_per_unit(params: Any, mu_dtype: Any) -> dict[str, Any]:
    """The fields of an Adam-like state on units: a zero step count, an
    element-wise first moment (``mu``, in ``mu_dtype`` or the accumulation
    dtype) and one second moment per unit (``nu``)."""
    return {
        "count": jnp.zeros([], jnp.int32),
        "mu": zeros_like_state(params, mu_dtype),
        "nu": zeros_per_unit(params),
    }
