r"""Label trees that route parameters to the manifold or the Euclidean optimizer.

A kernel ``W`` whose output units ``W[..., j]`` each feed a BatchNorm (with batch
statistics) is scale-invariant per unit,

.. math::

  L(w_1, \ldots, \alpha_j w_j, \ldots) = L(w_1, \ldots, w_j, \ldots)
  \quad \forall \alpha_j > 0,

so it can be optimized on the sphere; every other parameter is optimized by a
Euclidean optimizer. :func:`riemax.hybrid` routes leaves by a *label tree* (or a
function ``params -> label tree``) whose leaves are :data:`MANIFOLD` or
:data:`EUCLIDEAN`. This module holds the vocabulary, :func:`check_labels` (for
users of plain :func:`optax.partition` too), the rule-based builders and the
report:

* :func:`labels_by_rule`: the papers' syntactic rule (name contains ``conv`` and the
  kernel is undercomplete);
* :func:`labels_by_regex`: ordered ``(regex, label)`` rules over ``/``-joined paths;
* :func:`label_report`: which parameter went where and why.

Structural detection (:func:`riemax.labels_from_model`) lives in
``_labels_structural.py`` and numerical detection
(:func:`riemax.labels_by_invariance`) in ``_labels_numerical.py``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from riemax._tree import path_str

MANIFOLD = "manifold"
EUCLIDEAN = "euclidean"
_LABEL_VALUES = (MANIFOLD, EUCLIDEAN)
_KERNEL_NAMES = ("kernel", "weight")


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _flatten(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` with ``/``-joined paths (a trailing ``.value`` dropped)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(path_str(path), leaf) for path, leaf in leaves]


def _is_label(value: Any) -> bool:
    return isinstance(value, str) and value in _LABEL_VALUES


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", ()))


def _label_from_lookup(lookup: Mapping[str, str], source: str) -> Callable[[Any], Any]:
    """A label function that maps every leaf of ``params`` to ``lookup[path]``."""

    def label_fn(params: Any) -> Any:
        missing: list[str] = []

        def one(path, _):
            name = path_str(path)
            if name not in lookup:
                missing.append(name)
                return EUCLIDEAN
            return lookup[name]

        labels = jax.tree_util.tree_map_with_path(one, params)
        if missing:
            raise ValueError(
                f"{source} has no label for these parameter paths: "
                + ", ".join(missing)
            )
        return labels

    return label_fn


def check_labels(params: Any, labels: Any) -> Any:
    """Validates labels against params and returns them with the params' structure.

    Accepts a label tree (a plain nested dict, an ``nnx.State`` — pure or with
    ``Variable``-wrapped leaves —, any pytree whose ``/``-joined paths match the
    params' paths), a single label for every leaf, or a callable
    ``params -> label tree``. Paths are compared with a trailing ``.value`` key
    dropped, so an ``nnx.State`` of ``Param`` objects matches a pure tree.

    Args:
      params: The parameter tree.
      labels: A label tree, a single label, or a callable returning a label tree.

    Returns:
      A tree with exactly the structure of ``params`` whose leaves are
      ``"manifold"`` or ``"euclidean"``.

    Raises:
      ValueError: naming every parameter path without a label, every label path
        that is not a parameter, and every label that is not ``"manifold"`` or
        ``"euclidean"``.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 8, 4))}, "b": jnp.zeros(4)}
      >>> labels = {"conv": {"kernel": "manifold"}, "b": "euclidean"}
      >>> riemax.check_labels(params, labels)
      {'b': 'euclidean', 'conv': {'kernel': 'manifold'}}
      >>> riemax.check_labels(params, {"conv": {"kernel": "manifold"}})
      Traceback (most recent call last):
        ...
      ValueError: labels do not match the parameters: no label for: b
    """
    if callable(labels):
        labels = labels(params)
    param_items = _flatten(params)
    if isinstance(labels, str):
        if not _is_label(labels):
            raise ValueError(f"label {labels!r} is not {MANIFOLD!r} or {EUCLIDEAN!r}")
        return jax.tree.map(lambda _: labels, params)
    label_items = _flatten(labels)
    lookup = dict(label_items)
    param_paths = [name for name, _ in param_items]
    known = set(param_paths)
    problems = []
    missing = [name for name in param_paths if name not in lookup]
    if missing:
        problems.append("no label for: " + ", ".join(missing))
    extra = [name for name, _ in label_items if name not in known]
    if extra:
        problems.append("labels for unknown paths: " + ", ".join(extra))
    bad = [f"{name}={value!r}" for name, value in label_items if not _is_label(value)]
    if bad:
        problems.append(
            f"labels must be {MANIFOLD!r} or {EUCLIDEAN!r}, got: " + ", ".join(bad)
        )
    if problems:
        raise ValueError("labels do not match the parameters: " + "; ".join(problems))
    return jax.tree_util.tree_map_with_path(
        lambda path, _: lookup[path_str(path)], params
    )


# ---------------------------------------------------------------------------
# 1. The papers' rule
# ---------------------------------------------------------------------------


#: The shape conditions of :func:`labels_by_rule`, by name.
FAN_RULES = ("undercomplete", "tall", "any")


def _rule(name: str, shape: tuple[int, ...], pattern: str, fan: str) -> tuple[str, str]:
    last = name.rsplit("/", 1)[-1]
    if last not in _KERNEL_NAMES or len(shape) < 2:
        return EUCLIDEAN, "rule: not a kernel"
    if pattern not in name:
        return EUCLIDEAN, f"rule: {pattern!r} not in path"
    fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
    if fan == "any":
        return MANIFOLD, f"rule: {pattern!r} & a kernel"
    if fan == "tall":
        if fan_in >= fan_out:
            return MANIFOLD, f"rule: {pattern!r} & fan_in {fan_in} >= fan_out {fan_out}"
        return (
            EUCLIDEAN,
            f"rule: fan_in {fan_in} < fan_out {fan_out} (more units than inputs)",
        )
    if fan_in > fan_out:
        return MANIFOLD, f"rule: {pattern!r} & fan_in {fan_in} > fan_out {fan_out}"
    return EUCLIDEAN, f"rule: fan_in {fan_in} <= fan_out {fan_out} (not undercomplete)"


def labels_by_rule(
    params: Any,
    pattern: str = "conv",
    *,
    fan: str = "undercomplete",
    return_details: bool = False,
) -> Any:
    r"""Labels kernels by the papers' syntactic rule (Cho & Lee, 2017).

    A leaf goes to the manifold iff its ``/``-joined path contains ``pattern``, its
    last path key is ``kernel`` (or ``weight``), it has at least two axes, and it is
    undercomplete,

    .. math::

      \textstyle\prod_{i < d} \mathrm{shape}_i > \mathrm{shape}_{d}
      \quad (\text{fan-in} > \text{fan-out, strict}).

    This reproduces the original split exactly (for a WRN-28-10 the first conv of
    the second group, ``[3, 3, 16, 160]``, stays Euclidean), but it is *syntactic*:
    it also puts on the sphere convs that feed a residual sum, which are not
    scale-invariant. Use :func:`labels_from_model` to select by structure.

    The function takes only ``params`` besides its defaults, so it can be passed
    directly as the labels of :func:`optax.partition` / :func:`riemax.hybrid`,
    including inside ``nnx.Optimizer`` (``Param``-wrapped leaves at init and plain
    arrays at update spell the same paths).

    Args:
      params: The parameter tree (arrays, ``jax.ShapeDtypeStruct`` or anything with
        a ``shape``; ``nnx.State`` works).
      pattern: Substring that the path must contain (``""``: every path).
      fan: The shape condition. ``"undercomplete"`` (default): fan-in > fan-out,
        the papers' rule for the sphere. ``"tall"``: fan-in >= fan-out, the kernels
        whose units can be mutually orthonormal (the Stiefel optimizers,
        :func:`riemax.cayley_sgd`). ``"any"``: every kernel of two axes or more
        (manifold Muon, which takes wide matrices too).
      return_details: If true, also return a dict ``path -> reason`` for
        :func:`label_report`.

    Returns:
      A label tree with the structure of ``params`` (and the details if asked).

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> params = {
      ...     "conv0": {"kernel": jnp.zeros((3, 3, 16, 32))},
      ...     "projection": {"kernel": jnp.zeros((1, 1, 16, 32))},
      ...     "fc": {"kernel": jnp.zeros((64, 10)), "bias": jnp.zeros(10)},
      ... }
      >>> labels = riemax.labels_by_rule(params)
      >>> labels["conv0"], labels["projection"], labels["fc"]["kernel"]
      ({'kernel': 'manifold'}, {'kernel': 'euclidean'}, 'euclidean')
      >>> import optax
      >>> tx = optax.partition(
      ...     {"manifold": optax.sgd(0.1), "euclidean": optax.adam(1e-3)},
      ...     riemax.labels_by_rule)
      >>> state = tx.init(params)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017
    """
    if fan not in FAN_RULES:
        valid = ", ".join(repr(f) for f in FAN_RULES)
        raise ValueError(f"riemax.labels_by_rule: unknown fan {fan!r}; valid: {valid}.")
    if not isinstance(pattern, str):
        raise TypeError(
            f"riemax.labels_by_rule: pattern must be a string, got {pattern!r}; to "
            "pass options to optax.partition use "
            "functools.partial(riemax.labels_by_rule, ...)."
        )
    details: dict[str, str] = {}

    def one(path, leaf):
        name = path_str(path)
        label, details[name] = _rule(name, _shape(leaf), pattern, fan)
        return label

    labels = jax.tree_util.tree_map_with_path(one, params)
    return (labels, details) if return_details else labels


# ---------------------------------------------------------------------------
# 2. Regex rules
# ---------------------------------------------------------------------------


def labels_by_regex(
    params: Any,
    rules: Sequence[tuple[str, str]] | Mapping[str, str],
    *,
    return_details: bool = False,
) -> Any:
    r"""Labels parameters by ordered ``(regex, label)`` rules; the first match wins.

    Each rule's regex is matched with :func:`re.search` against the ``/``-joined
    parameter path (e.g. ``"group2/block0/conv1/kernel"``). Every parameter must be
    covered by some rule: end with a catch-all such as ``(".*", "euclidean")`` to
    route the rest explicitly.

    Args:
      params: The parameter tree.
      rules: An ordered sequence of ``(regex, label)`` pairs (or an ordered mapping
        ``regex -> label``); each label is ``"manifold"`` or ``"euclidean"``.
      return_details: If true, also return a dict ``path -> reason`` naming the
        rule that matched, for :func:`label_report`.

    Returns:
      A label tree with the structure of ``params`` (and the details if asked).

    Raises:
      ValueError: if a label is not ``"manifold"``/``"euclidean"``, or if some
        parameters are covered by no rule (all their paths are listed).

    Examples:
      >>> import functools, jax.numpy as jnp, riemax
      >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 4, 8)), "bias": jnp.zeros(8)},
      ...           "head": {"kernel": jnp.zeros((8, 2))}}
      >>> rules = [(r"conv/kernel$", "manifold"), (r".*", "euclidean")]
      >>> labels = riemax.labels_by_regex(params, rules)
      >>> labels["conv"], labels["head"]
      ({'bias': 'euclidean', 'kernel': 'manifold'}, {'kernel': 'euclidean'})
      >>> label_fn = functools.partial(riemax.labels_by_regex, rules=rules)
      >>> riemax.labels_by_regex(params, [(r"kernel", "manifold")])
      Traceback (most recent call last):
        ...
      ValueError: no rule covers these parameters: conv/bias
    """
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    compiled = []
    for i, rule in enumerate(items):
        try:
            regex, label = rule
        except (TypeError, ValueError):
            raise ValueError(
                f"rule #{i} must be a (regex, label) pair, got {rule!r}"
            ) from None
        if not _is_label(label):
            raise ValueError(
                f"rule #{i} ({regex!r}) has label {label!r}; "
                f"use {MANIFOLD!r} or {EUCLIDEAN!r}"
            )
        compiled.append((re.compile(regex), label, regex))

    details: dict[str, str] = {}
    uncovered: list[str] = []

    def one(path, _):
        name = path_str(path)
        for i, (rx, label, regex) in enumerate(compiled):
            if rx.search(name):
                details[name] = f"regex #{i} {regex!r}"
                return label
        uncovered.append(name)
        return EUCLIDEAN

    labels = jax.tree_util.tree_map_with_path(one, params)
    if uncovered:
        raise ValueError("no rule covers these parameters: " + ", ".join(uncovered))
    return (labels, details) if return_details else labels


# ---------------------------------------------------------------------------
# 5. Report
# ---------------------------------------------------------------------------


def label_report(
    params: Any, labels: Any, *, details: Mapping[str, Any] | None = None
) -> str:
    """Returns a table of every parameter's path, shape, label and reason.

    Args:
      params: The parameter tree.
      labels: A label tree or label function (anything :func:`riemax.hybrid`
        accepts); it is validated against ``params``.
      details: Optional ``path -> reason`` mapping, as returned by any label
        builder called with ``return_details=True``; a value may be a string or a
        dict with a ``"reason"`` key (:func:`labels_by_invariance`).

    Returns:
      The table as a string, with counts of leaves, kernels (leaves with at least
      two axes) and scalar parameters on each side at the bottom.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 16, 32))},
      ...           "fc": {"kernel": jnp.zeros((32, 10)), "bias": jnp.zeros(10)}}
      >>> labels, why = riemax.labels_by_rule(params, return_details=True)
      >>> print(riemax.label_report(params, labels, details=why))
      path         shape           label      why
      conv/kernel  (3, 3, 16, 32)  manifold   rule: 'conv' & fan_in 144 > fan_out 32
      fc/bias      (10,)           euclidean  rule: not a kernel
      fc/kernel    (32, 10)        euclidean  rule: 'conv' not in path
      manifold: 1 leaf (1 kernel), 4,608 parameters
      euclidean: 2 leaves (1 kernel), 330 parameters
    """
    resolved = dict(_flatten(check_labels(params, labels)))
    details = details or {}
    rows = [("path", "shape", "label", "why")]
    counts = {label: [0, 0, 0] for label in _LABEL_VALUES}
    for name, leaf in _flatten(params):
        shape = _shape(leaf)
        label = resolved[name]
        why = details.get(name, "")
        if isinstance(why, Mapping):
            why = why.get("reason", "")
        rows.append((name, str(shape), label, str(why)))
        counts[label][0] += 1
        counts[label][1] += len(shape) >= 2
        counts[label][2] += math.prod(shape)
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    lines = [
        "  ".join(
            cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)
        )
        + "  "
        + row[3]
        for row in rows
    ]
    lines = [line.rstrip() for line in lines]
    for label, (leaves, kernels, size) in counts.items():
        lines.append(
            f"{label}: {_count(leaves, 'leaf', 'leaves')} "
            f"({_count(kernels, 'kernel')}), {_count(size, 'parameter')}"
        )
    return "\n".join(lines)


def _count(n: int, one: str, many: str | None = None) -> str:
    """``n`` with the noun in the right number: "1 kernel", "2 kernels"."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"
