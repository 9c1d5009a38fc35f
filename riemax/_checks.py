"""Checks of arguments and parameter trees, with errors that name what is wrong.

* **Argument checks** at construction (:func:`check_number`, :func:`check_dtype`):
  a concrete hyper-parameter outside its range, NaN, infinite, or not a number is
  a ``ValueError``/``TypeError`` that names the optimizer and the argument.
* **Leaf checks** at ``init``/``update`` (:func:`check_params`,
  :func:`check_leaf`): non-floating params, kernels with fewer than two axes where
  units are needed, zero-size axes, channel axes outside a leaf's rank, and updates
  or state whose tree differs from the params are errors that name the parameter
  path.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from riemax._tree import path_str

# ----------------------------------------------------------------- argument checks


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = 0.0,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    allow_schedule: bool = False,
) -> None:
    """Checks a hyper-parameter given as a number (or a concrete array).

    Values that are traced (inside :func:`optax.inject_hyperparams`) are not
    checked; a schedule (when allowed) is checked through its value at step 0.

    Raises:
      TypeError: if ``value`` is not a real number (a string, a bool, ...).
      ValueError: if it is NaN, infinite or outside
        ``[low, high]`` (open ends with ``low_open``/``high_open``).
    """
    if value is None:
        if allow_none:
            return
        raise TypeError(f"riemax.{owner}: {name} must be a number, got None.")
    if callable(value):
        if not allow_schedule:
            raise TypeError(
                f"riemax.{owner}: {name} must be a number, got {_describe(value)}."
            )
        try:
            first = value(0)
        except Exception:  # a schedule that cannot be evaluated outside a step
            return
        return check_number(
            owner,
            f"{name} (the schedule's value at step 0)",
            first,
            low=low,
            high=high,
            low_open=low_open,
            high_open=high_open,
        )
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, (bool, np.bool_)) or not (
        isinstance(value, numbers.Real)
        or (
            isinstance(value, (np.ndarray, jax.Array, np.generic))
            and np.issubdtype(np.asarray(value).dtype, np.number)
        )
    ):
        raise TypeError(
            f"riemax.{owner}: {name} must be a real number"
            + (" or a schedule" if allow_schedule else "")
            + f", got {_describe(value)} of type {type(value).__name__}."
        )
    array = np.asarray(value, dtype=np.float64)
    if array.ndim:
        raise ValueError(
            f"riemax.{owner}: {name} must be a scalar, got shape {array.shape}."
        )
    x = float(array)
    if not math.isfinite(x):
        raise ValueError(f"riemax.{owner}: {name} must be finite, got {x!r}.")
    too_low = low is not None and (x <= low if low_open else x < low)
    too_high = high is not None and (x >= high if high_open else x > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(
            f"riemax.{owner}: {name} must be in {left}{lo}, {hi}{right}, got {x!r}."
        )


def check_rate(owner: str, name: str, value: Any) -> None:
    """A decay rate (momentum, b1, b2): a number in ``[0, 1)``."""
    check_number(owner, name, value, low=0.0, high=1.0, high_open=True)


def check_learning_rate(owner: str, learning_rate: Any) -> None:
    """A non-negative finite number or a schedule of the step count."""
    check_number(owner, "learning_rate", learning_rate, allow_schedule=True)


def check_dtype(owner: str, name: str, dtype: Any) -> None:
    """``None`` or a floating dtype (for ``mu_dtype``)."""
    if dtype is None:
        return
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(
            f"riemax.{owner}: {name} must be a floating dtype or None, "
            f"got {_describe(dtype)}."
        )


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(
            f"riemax.{owner}: {name} must be one of {valid}, got {_describe(value)}."
        )


def check_channel_axes(owner: str, channel_axes: Any) -> None:
    """``None`` or a sequence of distinct integers (ranges are checked per leaf)."""
    if channel_axes is None:
        return
    if isinstance(channel_axes, (str, bytes)) or not isinstance(channel_axes, Sequence):
        raise TypeError(
            f"riemax.{owner}: channel_axes must be None or a tuple of ints, "
            f"got {_describe(channel_axes)}."
        )
    if not all(
        isinstance(a, numbers.Integral) and not isinstance(a, bool)
        for a in channel_axes
    ):
        raise TypeError(
            f"riemax.{owner}: channel_axes must contain ints, "
            f"got {_describe(channel_axes)}."
        )


def check_unit_eps(owner: str, unit_eps: Any) -> None:
    check_number(owner, "unit_eps", unit_eps)


def check_momentum(owner: str, momentum: Any) -> None:
    check_number(owner, "momentum", momentum, low=0.0, high=1.0)


NO_PARAMS_MSG = (
    "needs the current parameters: call `tx.update(updates, state, params)`."
)


def need_params(owner: str, params: Any) -> None:
    if params is None:
        raise ValueError(f"riemax.{owner} {NO_PARAMS_MSG}")


# --------------------------------------------------------------------- leaf checks


def where_of(path: tuple) -> str:
    return path_str(path) or "<root>"


def check_leaf(
    owner: str,
    path: tuple,
    leaf: Any,
    *,
    units: bool,
    channel_axes: Sequence[int] | None = None,
    what: str = "parameter",
) -> None:
    """Checks one parameter leaf: floating dtype, rank (``units``: at least two
    axes), no zero-size axis, and ``channel_axes`` (if not None) within its rank."""
    where = where_of(path)
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"riemax.{owner}: {what} '{where}' has dtype {dtype}; riemax "
            "transforms need floating-point parameters (float32, bfloat16, "
            "float16 or float64)."
        )
    if units and len(shape) < 2:
        raise ValueError(
            f"riemax.{owner}: {what} '{where}' has shape {shape}, but sphere "
            "transforms need kernels with at least 2 axes (a unit is the slice over "
            "all axes but the last). Route 1-D leaves such as biases and BatchNorm "
            "scales to a Euclidean optimizer, e.g. with "
            "riemax.hybrid(manifold_tx, euclidean_tx, labels)."
        )
    if 0 in shape:
        raise ValueError(
            f"riemax.{owner}: {what} '{where}' has shape {shape} with a zero-size "
            "axis; it has no units to optimize."
        )
    if channel_axes is not None and shape:
        ndim, given = len(shape), tuple(channel_axes)
        if any(not -ndim <= a < ndim for a in given):
            raise ValueError(
                f"riemax.{owner}: channel_axes={given} is out of range for {what} "
                f"'{where}' of shape {shape} (valid axes: {-ndim} to {ndim - 1})."
            )
        if len({a % ndim for a in given}) != len(given):
            raise ValueError(
                f"riemax.{owner}: channel_axes={given} repeats an axis of {what} "
                f"'{where}' of shape {shape}."
            )


def check_params(owner: str, params: Any, **kwargs: Any) -> None:
    """:func:`check_leaf` on every leaf of ``params``."""
    jax.tree_util.tree_map_with_path(
        lambda path, p: check_leaf(owner, path, p, **kwargs), params
    )


def _paths(tree: Any) -> list[str]:
    return [where_of(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_like_params(owner: str, what: str, tree: Any, params: Any) -> None:
    """Raises if ``tree`` (updates or state) does not have the params' leaves."""
    structure: Any = jax.tree.structure(tree)  # PyTreeDef has no type stub
    if structure == jax.tree.structure(params):
        return
    got, want = _paths(tree), _paths(params)
    missing = [p for p in want if p not in got]
    extra = [p for p in got if p not in want]
    detail = []
    if missing:
        detail.append("missing: " + ", ".join(missing[:8]))
    if extra:
        detail.append("not in the params: " + ", ".join(extra[:8]))
    if not detail:
        detail.append(
            f"tree structures differ: {jax.tree.structure(tree)} vs "
            f"{jax.tree.structure(params)}"
        )
    raise ValueError(
        f"riemax.{owner}: the {what} do not match the params ({'; '.join(detail)})."
    )


def check_adam(owner: str, b1: Any, b2: Any, eps: Any) -> None:
    """Adam's decays (in ``[0, 1)``) and its epsilon (non-negative)."""
    check_rate(owner, "b1", b1)
    check_rate(owner, "b2", b2)
    check_number(owner, "eps", eps)
