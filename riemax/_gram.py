"""Per-unit Gram sums and leaf programs: one robust-path decision per step.

:func:`gram` returns the inner products of arrays *scaled* by a power of two per
group (exact), so that no sum of squares overflows or underflows.

Inside an optimizer step the choice between plain sums (the common case) and
rescaled ones is made once for the whole parameter tree. Each leaf's update is a
*program*, a generator that yields its requests (:class:`UnitRequest`,
:class:`Fallback`, :class:`Batched`) and receives their results; :func:`drive`
runs the programs of every leaf in lockstep and resolves the requests of each
round together: one conditional per round, and per-unit math run once on the
units of every leaf. Called on their own (:func:`gram`, :func:`norm`,
:func:`normalize`), the same programs run for a single array.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from riemax._numerics import (
    exponent,
    kept_shape,
    per_unit,
    pow2,
    safe_div,
    safe_sqrt,
    unit_axes,
    unscaled,
)
from riemax._sums import (
    FUSED_MAX_ELEMENTS,
    as_matrix,
    column_max_abs,
    formed,
    one_pass,
    product,
)

#: A leaf program for :func:`drive`: a generator that yields requests, receives
#: their results and returns the leaf's result.
Program = Generator[Any, Any, Any]


# -------------------------------------------------------------------------- the Gram


class Gram(NamedTuple):
    """Per-group inner products of arrays scaled by powers of two.

    ``values[i]`` is :math:`\\langle x_p 2^{-E_p}, x_q 2^{-E_q}\\rangle` for the
    ``i``-th pair ``(p, q)``, and ``exps[p]`` is ``E_p``, a power of two per group
    that brings the scaled array to norm about 1 (or its largest element below 1):
    all values are at most the group size, whatever the magnitudes of the arrays;
    true inner products are ``unscaled(values[i], exps[p] + exps[q])``.
    A pair ``(p, None)`` is the plain sum :math:`\\sum x_p 2^{-E_p}` (true value
    ``unscaled(values[i], exps[p])``).
    """

    values: tuple[jax.Array, ...]
    exps: tuple[jax.Array, ...]

    def factor(self, p: int) -> jax.Array:
        """``2**-E_p``: multiply array ``p`` by it to get its scaled version."""
        return pow2(-self.exps[p], self.values[0].dtype)


class UnitRequest(NamedTuple):
    """A leaf's per-unit statistics and what to compute from them.

    A leaf program (:func:`drive`) yields one and receives its result. The
    statistics are per-group inner products of the leaf's arrays (a :class:`Gram`);
    ``then(gram, inputs)`` turns them into the per-unit quantities the leaf needs
    (``inputs``: per-unit arrays of the leaf, such as a second moment), or, without
    ``then``, the leaf receives the Gram itself, with the per-unit arrays of
    ``derive(gram, inputs, leaf)`` (computed once on the units of every leaf;
    ``leaf`` is the static index of each unit's leaf, for per-leaf reductions
    such as a maximum over a tensor) as ``gram.derived``. ``then`` acts elementwise on
    units, so :func:`resolve` runs it once on the units of every leaf of a step,
    concatenated.

    The statistics come in two forms, with one decision for the whole step:

    * fast: plain sums from one pass over memory (:func:`resolve` sums the
      small matrices with as many rows side by side, :func:`_runs`); the scaled Gram
      follows from them exactly where every sum is finite and every squared norm
      is zero (arrays not in ``verify``) or at least ``floor``. Where that test
      fails the sums are replaced by harmless values, so that the discarded value
      and its gradient stay finite;
    * exact, when the test fails anywhere in the step: the Gram summed on the
      matrices ``mats`` (reduced elements by groups) rescaled by powers of two,
      with the exponents of every leaf of the step computed together.
    """

    floor: float
    verify: tuple[int, ...]
    mats: tuple[jax.Array, ...]
    pairs: tuple[tuple[int, int | None], ...]
    diagonal: tuple[int, ...]
    keep: tuple[int, ...]
    then: Callable[..., Any] | None = None
    inputs: Any = None
    derive: Callable[..., tuple[jax.Array, ...]] | None = None
    #: Optionally, per matrix, None or a form ``(fn, sources)``: the matrix is
    #: ``fn(*sources)`` (elementwise; sources are matrices or rows ``(1,
    #: groups)``), computed inside the summing loops (the CPU blocked one too)
    #: and in the rescaled branch, never stored.
    forms: tuple[Any, ...] | None = None


def _from_plain(sums, pairs, diagonal) -> Gram:
    """The scaled Gram from plain sums (exact where the sums are)."""
    exps = [exponent(safe_sqrt(jax.lax.stop_gradient(sums[d]))) for d in diagonal]
    dtype = sums[0].dtype
    factors = [pow2(-e, dtype) for e in exps]
    values = tuple(
        sums[i] * factors[p] * (1 if q is None else factors[q])
        for i, (p, q) in enumerate(pairs)
    )
    return Gram(values, tuple(exps))


#: The leaves' parts of flat per-unit arrays, one registry per running
#: :func:`drive` (per thread): ``id(part) -> (part, whole, start, stop)``. A
#: later round that hands such parts to per-unit math (:func:`_concat`) reads
#: static slices of the flat array instead (the whole array where they cover
#: it): slices at run-time offsets (:func:`_offsets`) are opaque to XLA, which
#: would otherwise copy each and concatenate the copies.
_LOCAL = threading.local()


def _registries() -> list[dict[int, tuple[jax.Array, jax.Array, int, int]]]:
    if not hasattr(_LOCAL, "parts"):
        _LOCAL.parts = []
    return _LOCAL.parts


def _noted(part: jax.Array, whole: jax.Array, start: int, stop: int) -> jax.Array:
    registries = _registries()
    if registries:
        registries[-1][id(part)] = (part, whole, start, stop)
    return part


def _spans(xs: Sequence[Any], keeps: Sequence[tuple[int, ...]]) -> list[Any]:
    """``xs`` (per-unit arrays of leaves shaped ``keeps``) as the pieces of their
    concatenation: a part of a flat array as ``(whole, start, stop)``,
    consecutive parts of one array merged; any other array flattened."""
    registries = _registries()
    registry = registries[-1] if registries else {}
    spans: list[Any] = []
    for x, keep in zip(xs, keeps, strict=True):
        entry = registry.get(id(x))
        if entry is None or entry[0] is not x or tuple(x.shape) != tuple(keep):
            spans.append(jnp.broadcast_to(x, keep).reshape(-1))
            continue
        _, of, start, stop = entry
        last = spans[-1] if spans else None
        if isinstance(last, tuple) and last[0] is of and last[2] == start:
            spans[-1] = (of, last[1], stop)
        else:
            spans.append((of, start, stop))
    return spans


def _covers(span: Any) -> bool:
    """Whether ``span`` is a whole flat array (it needs no copy)."""
    return isinstance(span, tuple) and span[1:] == (0, span[0].shape[0])


def _piece(span: Any) -> jax.Array:
    """A span of :func:`_spans` as an array (a static slice for a part)."""
    if not isinstance(span, tuple):
        return span
    of, start, stop = span
    return of if _covers(span) else of[start:stop]


class _Parts:
    """One leaf's part of flat per-unit arrays: each slice is taken where it is
    read (a leaf reads only what its elementwise loops need), at the leaf's
    run-time offset ``at`` where it has one (:func:`_offsets`). Nothing is
    cached: a slice taken inside a conditional's branch must not leak out of
    it."""

    def __init__(self, arrays, start: int, stop: int, keep: tuple[int, ...], at=None):
        self.arrays, self.start, self.stop, self.keep = arrays, start, stop, keep
        self.at = at

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return tuple(self[k] for k in range(*j.indices(len(self))))
        whole = x = self.arrays[j]
        if (self.start, self.stop) != (0, x.shape[0]):
            x = _slice(x, self.start, self.stop, self.at)
        return _noted(x.reshape(self.keep), whole, self.start, self.stop)

    def __iter__(self):
        return (self[j] for j in range(len(self)))


class _GramView(Gram):
    """A leaf's part of a Gram resolved for many leaves (:func:`resolve`).

    Values, exponents, factors and the per-unit quantities the request derives
    from the whole Gram (``derived``) are sliced when read. A later round that
    hands the views of the same leaves, in the same order, to per-unit math
    (:func:`_concat`) gets the whole arrays back without a concatenation.
    """

    whole: Gram
    factors: _Parts
    derived: _Parts
    position: int
    siblings: int

    def factor(self, p: int) -> jax.Array:
        return self.factors[p]


def _views(
    whole: Gram, keeps: Sequence[tuple[int, ...]], derive=None, inputs=None
) -> list[_GramView]:
    dtype = whole.values[0].dtype
    factors = per_unit(*(pow2(-e, dtype) for e in whole.exps))
    derived: Any = ()
    if derive is not None:
        sizes = [math.prod(k) for k in keeps]
        leaf = np.repeat(np.arange(len(keeps), dtype=np.int32), sizes)
        derived = per_unit(*derive(whole, inputs, leaf))
    bounds = np.cumsum([0, *(math.prod(k) for k in keeps)])
    offsets: Sequence[Any] = [None] * len(keeps)
    if len(keeps) > 1:
        offsets = _offsets(bounds[:-1], whole.values[0])
    views = []
    for i, keep in enumerate(keeps):
        start, stop = int(bounds[i]), int(bounds[i + 1])
        at = offsets[i]
        view = _GramView(
            _Parts(whole.values, start, stop, keep, at),  # type: ignore[arg-type]
            _Parts(whole.exps, start, stop, keep, at),  # type: ignore[arg-type]
        )
        view.whole, view.position, view.siblings = whole, i, len(keeps)
        view.factors = _Parts(factors, start, stop, keep, at)
        view.derived = _Parts(derived, start, stop, keep, at)
        views.append(view)
    return views


def _whole(trees: Sequence[Any]) -> Gram | None:
    """The whole Gram when ``trees`` are all the views of one resolution, in
    order; else None."""
    first = trees[0]
    if not isinstance(first, _GramView) or len(trees) != first.siblings:
        return None
    for i, t in enumerate(trees):
        if (
            not isinstance(t, _GramView)
            or t.whole is not first.whole
            or t.position != i
        ):
            return None
    return first.whole


def _concat(trees: Sequence[Any], keeps: Sequence[tuple[int, ...]]) -> Any:
    """Per-unit trees of several leaves as one tree of flat arrays, materialised
    (:func:`_once`): the per-unit math reads them instead of fusing a
    concatenation of every leaf into each of its loops. Views of a resolved Gram
    (:class:`_GramView`) that cover it give back its whole arrays."""
    fresh: list[jax.Array] = []

    def cat(xs):
        spans = _spans(xs, keeps)
        if len(spans) == 1 and _covers(spans[0]):
            return spans[0][0]
        flat = [_piece(span) for span in spans]
        fresh.append(flat[0] if len(flat) == 1 else jnp.concatenate(flat))
        return _Fresh(len(fresh) - 1)

    def walk(items):
        first = items[0]
        if isinstance(first, Gram):
            whole = _whole(items)
            if whole is not None:
                return whole
            return Gram(
                tuple(
                    walk([t.values[j] for t in items]) for j in range(len(first.values))
                ),
                tuple(walk([t.exps[j] for t in items]) for j in range(len(first.exps))),
            )
        if isinstance(first, (tuple, list)):
            parts = [walk([t[j] for t in items]) for j in range(len(first))]
            if hasattr(first, "_fields"):
                return type(first)(*parts)
            return type(first)(parts)
        if first is None:
            return None
        return cat(items)

    tree = walk(list(trees))
    once = _once(fresh)

    def fill(x):
        if isinstance(x, _Fresh):
            return once[x.i]
        if isinstance(x, (tuple, list)):
            parts = [fill(y) for y in x]
            if hasattr(x, "_fields"):
                return type(x)(*parts)
            return type(x)(parts)
        return x

    return fill(tree)


def _exact(requests: Sequence[UnitRequest]) -> Gram:
    """The Gram of many leaves on matrices rescaled per group by the power of two
    of their largest magnitude: the exponents of every leaf in one batch, one
    variadic reduction per run of leaves (:func:`_runs`, the order of
    ``requests``) for the maxima and one for the sums."""
    dtype = requests[0].mats[0].dtype
    mats_of = [tuple(formed(r.mats, r.forms)) for r in requests]
    runs = [_side_by_side([mats_of[i] for i in run]) for run in _runs(mats_of)]
    maxes = _once(
        _flat([column_max_abs([jax.lax.stop_gradient(x) for x in run]) for run in runs])
    )
    exps = tuple(exponent(m) for m in maxes)
    factors = per_unit(*(pow2(-e, dtype) for e in exps))
    scaled = []
    start = 0
    for run in runs:
        stop = start + run[0].shape[1]
        scaled.append(
            [m * f[None, start:stop] for m, f in zip(run, factors, strict=True)]
        )
        start = stop
    values = one_pass(scaled, requests[0].pairs, fused=True)
    return Gram(_once(_flat(values)), exps)


class _Fresh(NamedTuple):
    """A placeholder for the ``i``-th array concatenated by :func:`_concat`."""

    i: int


def _offsets(starts, like: jax.Array) -> tuple[jax.Array, ...]:
    """The first unit of each leaf in flat per-unit arrays, as values computed
    at run time: a leaf's loops then slice at an offset they receive, so that
    the loops of leaves of the same shape compile to one kernel (a constant
    offset would make each leaf's loops kernels of their own). The offsets pass
    through one reduction, which XLA neither folds (they depend on ``like``,
    by a term that is always 0) nor fuses into the loops that read them."""
    if like.size == 0:
        return tuple(jnp.int32(s) for s in starts)
    x = jax.lax.stop_gradient(like.reshape(-1)[0])
    zero = (jnp.isnan(x) & jnp.isinf(x)).astype(jnp.int32)
    return per_unit(*(zero + np.int32(s) for s in starts))


def _slice(x: jax.Array, start: int, stop: int, at) -> jax.Array:
    if at is None:
        return x[start:stop]
    return jax.lax.dynamic_slice_in_dim(
        x, at, stop - start, allow_negative_indices=False
    )


def _split(tree: Any, keeps: Sequence[tuple[int, ...]]) -> list[Any]:
    sizes = [math.prod(k) for k in keeps]
    total = sum(sizes)
    bounds = np.cumsum([0, *sizes])
    offsets: Sequence[Any] = [None] * len(keeps)
    if len(keeps) > 1:
        offsets = _offsets(bounds[:-1], jax.tree.leaves(tree)[0])

    tree = jax.tree.map(lambda x: jnp.broadcast_to(x, (total,)), tree)

    def part(x, i):
        start, stop = int(bounds[i]), int(bounds[i + 1])
        if len(keeps) == 1:
            return _noted(x.reshape(keeps[0]), x, start, stop)
        piece = _slice(x, start, stop, offsets[i]).reshape(keeps[i])
        return _noted(piece, x, start, stop)

    return [jax.tree.map(lambda x, i=i: part(x, i), tree) for i in range(len(keeps))]


def _group_key(r: UnitRequest) -> tuple:
    return (r.then, r.derive, r.pairs, r.diagonal, r.verify, r.mats[0].dtype)


def _all_pairs(r: UnitRequest) -> tuple[tuple[int, int | None], ...]:
    """The pairs summed by the plain pass: the requested ones, then the squared
    norm of every array that no requested pair gives."""
    listed = {p for p, q in r.pairs if p == q}
    return r.pairs + tuple((p, p) for p in range(len(r.diagonal)) if p not in listed)


def _pack(arrays: Sequence[jax.Array]) -> jax.Array:
    return jnp.stack(arrays) if len(arrays) > 1 else arrays[0][None]


def _once(tree: Any) -> Any:
    """``tree`` (flat per-unit arrays) evaluated once, before the leaves read
    slices of it: :func:`per_unit` on the arrays of each dtype."""
    leaves, treedef = jax.tree.flatten(tree)
    by_dtype: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        by_dtype.setdefault(x.dtype, []).append(i)
    out = list(leaves)
    for index in by_dtype.values():
        for i, x in zip(index, per_unit(*(leaves[i] for i in index)), strict=True):
            out[i] = x
    return jax.tree.unflatten(treedef, out)


#: Matrices summed together (:func:`_runs`) hold at most this many elements each
#: and per run: larger ones are summed alone, without a copy.
RUN_MAX_ELEMENTS = 1 << 20


def _runs(mats_of: Sequence[Sequence[jax.Array]]) -> list[list[int]]:
    """The leaves (indices into ``mats_of``, each a leaf's matrices) whose sums
    are taken together: small matrices with as many rows, side by side (one
    reduction for the run, not one per leaf), in order of first appearance."""
    runs: dict[Any, list[list[int]]] = {}
    for i, mats in enumerate(mats_of):
        rows, cols = mats[0].shape
        if rows * cols > FUSED_MAX_ELEMENTS:
            runs[("alone", i)] = [[i]]
            continue
        chunks = runs.setdefault(("rows", rows), [[]])
        size = sum(mats_of[j][0].size for j in chunks[-1])
        if chunks[-1] and size + rows * cols > RUN_MAX_ELEMENTS:
            chunks.append([])
        chunks[-1].append(i)
    return [run for chunks in runs.values() for run in chunks]


def _side_by_side(mats_of: Sequence[Sequence[jax.Array]]) -> list[jax.Array]:
    """The matrices of a run side by side (one matrix per array of the leaves)."""
    if len(mats_of) == 1:
        return list(mats_of[0])
    return [
        jnp.concatenate([mats[k] for mats in mats_of], axis=1)
        for k in range(len(mats_of[0]))
    ]


def _flat(parts: Sequence[Sequence[jax.Array]]) -> tuple[jax.Array, ...]:
    """Per-run tuples of per-unit arrays as one tuple of flat arrays."""
    if len(parts) == 1:
        return tuple(parts[0])
    return tuple(jnp.concatenate(xs) for xs in zip(*parts, strict=True))


def _plain_sums(
    mats_of: Sequence[Sequence[jax.Array]], pairs, forms_of=None
) -> tuple[jax.Array, ...]:
    """Plain column sums of the pair products of every leaf, one pass over each
    leaf (side by side, a run's matrices would be copied first: on CPU the copy
    costs more than the loops it saves)."""
    return _flat(one_pass(mats_of, pairs, forms_of=forms_of))


def resolve(requests: Sequence[UnitRequest]) -> list[Any]:
    """The results of many :class:`UnitRequest`: one decision for all, and one
    ``then`` per kind of request on the units of all leaves together."""
    requests = list(requests)
    if not requests:
        return []
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(_group_key(r), []).append(i)
    # Within a group, leaves that the rescaled branch sums together (small
    # matrices with as many rows) are adjacent: the per-unit arrays of the step
    # list their units in that order.
    members_of = [
        [members[j] for run in _runs([requests[i].mats for i in members]) for j in run]
        for members in groups.values()
    ]
    keeps_of = [[requests[i].keep for i in members] for members in members_of]
    checks = []
    fast = []
    for members, keeps in zip(members_of, keeps_of, strict=True):
        first = requests[members[0]]
        sums = _once(
            _plain_sums(
                [requests[i].mats for i in members],
                _all_pairs(first),
                [requests[i].forms for i in members],
            )
        )
        floor = jnp.asarray(
            np.repeat(
                np.array([requests[i].floor for i in members]),
                [math.prod(k) for k in keeps],
            ),
            sums[0].dtype,
        )
        ok = jnp.all(jnp.stack([jnp.isfinite(s) for s in sums]), axis=0)
        for p, d in enumerate(first.diagonal):
            sq = jax.lax.stop_gradient(sums[d])
            zero_ok = (sq == 0) & (p not in first.verify)
            ok = ok & ((sq >= floor) | zero_ok)
        # Harmless sums where the test fails: orthonormal arrays of norm 1.
        sums = tuple(
            jnp.where(ok, s, 1.0 if p == q else 0.0)
            for s, (p, q) in zip(sums, _all_pairs(first), strict=True)
        )
        checks.append(jnp.all(ok))
        fast.append(_from_plain(sums, first.pairs, first.diagonal))

    def packed(grams):
        # Two arrays per group (values and exponents) cross the branch: the
        # compile time of a conditional grows with its number of outputs.
        return [(_pack(g.values), _pack(g.exps)) for g in grams]

    def exact():
        return packed(_exact([requests[i] for i in members]) for members in members_of)

    stats = jax.lax.cond(jnp.all(jnp.stack(checks)), lambda: packed(fast), exact)
    results: list[Any] = [None] * len(requests)
    for members, keeps, (values, exps) in zip(members_of, keeps_of, stats, strict=True):
        first = requests[members[0]]
        out = _once(Gram(tuple(values), tuple(exps)))
        if first.then is None:
            inputs = None
            if first.inputs is not None:
                inputs = _concat([requests[i].inputs for i in members], keeps)
            parts = _views(out, keeps, first.derive, inputs)
        else:
            inputs = _concat([requests[i].inputs for i in members], keeps)
            parts = _split(_once(first.then(out, inputs)), keeps)
        for i, value in zip(members, parts, strict=True):
            results[i] = value
    return results


class Fallback(NamedTuple):
    """Per-unit sums with a careful form where their fast form is not exact.

    ``value`` is the fast form (an array, or a tuple of arrays, one per pair),
    ``mask`` marks the units where it is not exact, and the careful form is
    summed directly: the column sums of the products ``pairs`` of the matrices
    ``mats()`` (``(reduced elements, units)``, e.g. a projected gradient where a
    Gram identity cancels). One conditional for every leaf of a round: the
    careful sums are taken only when some mask is set anywhere.
    """

    value: Any
    mask: jax.Array
    mats: Callable[[], Sequence[jax.Array]]
    pairs: tuple[tuple[int, int | None], ...]
    #: Optionally the mask of every unit of the step (flat; non-zero marks a
    #: unit), of which ``mask`` is this leaf's part, the same array object for
    #: every leaf: the test then reads it once instead of once per leaf.
    whole: jax.Array | None = None
    #: Optionally, with ``whole``, the flat arrays of every unit's fast form of
    #: which ``value`` (arrays) is the part ``span`` (first and last unit + 1):
    #: leaves whose parts cover it cross the conditional as that one array,
    #: not as one slice each.
    whole_value: Any = None
    span: tuple[int, int] | None = None


def _flat_members(requests: Sequence[Fallback]) -> list[int]:
    """The requests that cross the conditional as one flat array: those with the
    same ``whole`` and ``whole_value`` whose spans cover it, in order."""
    first = requests[0]
    if first.whole_value is None or first.whole is None:
        return []
    members = [
        i
        for i, r in enumerate(requests)
        if r.whole_value is first.whole_value
        and r.whole is first.whole
        and r.span is not None
        and r.pairs == first.pairs
    ]
    spans = sorted((requests[i].span or (0, 0), i) for i in members)
    edge = 0
    for (start, stop), _ in spans:
        if start != edge:
            return []
        edge = stop
    if edge != jax.tree.leaves(first.whole_value)[0].shape[0]:
        return []
    return [i for _, i in spans]


def _careful_sums(requests: Sequence[Fallback]) -> list[tuple[jax.Array, ...]]:
    """The careful sums of each request (per-unit arrays, one per pair), one
    pass over each leaf's matrices. Not side by side: copying the matrices
    together inside the branch slowed the step even where the branch is not
    taken (the rotational wrapper on ResNet-20: 6 %), and leaves of one shape
    share their compiled loops anyway."""
    out: list[Any] = [None] * len(requests)
    groups: dict[Any, list[int]] = {}
    mats_of = [tuple(r.mats()) for r in requests]
    for i, r in enumerate(requests):
        groups.setdefault(r.pairs, []).append(i)
    for pairs, members in groups.items():
        found = one_pass([mats_of[i] for i in members], pairs, blocked=False)
        for i, sums in zip(members, found, strict=True):
            out[i] = sums
    return out


def _resolve_fallbacks(requests: Sequence[Fallback]) -> list[Any]:
    if not requests:
        return []
    masks: list[jax.Array] = []
    for r in requests:
        m = r.mask if r.whole is None else r.whole
        if not any(m is x for x in masks):
            masks.append(m)
    needed = jnp.any(jnp.stack([jnp.any(m != 0) for m in masks]))
    flat = _flat_members(requests)
    rest = sorted(set(range(len(requests))) - set(flat))

    def shaped(sums, value):
        # The careful sums in the structure and shapes of the fast form.
        if isinstance(value, tuple):
            return tuple(s.reshape(v.shape) for s, v in zip(sums, value, strict=True))
        (s,) = sums
        return s.reshape(value.shape)

    def careful():
        order = rest + flat
        found = _careful_sums([requests[i] for i in order])
        sums = dict(zip(order, found, strict=True))
        out = [
            jax.tree.map(
                lambda c, v, r=requests[i]: jnp.where(r.mask, c, v),
                shaped(sums[i], requests[i].value),
                requests[i].value,
            )
            for i in rest
        ]
        if not flat:
            return out, ()
        first = requests[flat[0]]
        whole = tuple(
            jnp.concatenate([sums[i][k] for i in flat]) for k in range(len(first.pairs))
        )
        chosen = jax.tree.map(
            lambda c, v: jnp.where(first.whole != 0, c, v),
            shaped(whole, first.whole_value),
            first.whole_value,
        )
        return out, (chosen,)

    def fast():
        kept = () if not flat else (requests[flat[0]].whole_value,)
        return [requests[i].value for i in rest], kept

    out, kept = jax.lax.cond(needed, careful, fast)
    results: list[Any] = [None] * len(requests)
    for i, value in zip(rest, out, strict=True):
        results[i] = value
    for i in flat:
        start, stop = requests[i].span  # type: ignore[misc]
        results[i] = jax.tree.map(
            lambda x, v, a=start, b=stop: x[a:b].reshape(v.shape),
            kept[0],
            requests[i].value,
        )
    return results


class Batched(NamedTuple):
    """A per-unit function of a leaf's per-unit arrays, run once for the units of
    every leaf that asks for the same ``fn`` in a round (no decision involved).

    ``inputs`` is a tree of arrays broadcastable to ``keep`` (the leaf's per-unit
    shape); ``fn(inputs)`` acts elementwise on units and returns a tree of them.
    """

    fn: Callable[[Any], Any]
    inputs: Any
    keep: tuple[int, ...]


def _position(tree: Any) -> int:
    """The position of the first Gram view in ``tree`` among its siblings (0
    without one)."""
    if isinstance(tree, _GramView):
        return tree.position
    if isinstance(tree, (tuple, list)) and not isinstance(tree, Gram):
        for x in tree:
            if isinstance(x, (tuple, list)):
                return _position(x)
    return 0


def _resolve_batched(requests: Sequence[Batched]) -> list[Any]:
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.fn, []).append(i)
    results: list[Any] = [None] * len(requests)
    for fn, members in groups.items():
        # Leaves in the order of their units in a Gram they share (:func:`_runs`),
        # so that its whole arrays are read without a concatenation.
        members = sorted(members, key=lambda i: _position(requests[i].inputs))
        keeps = [requests[i].keep for i in members]
        out = _once(fn(_concat([requests[i].inputs for i in members], keeps)))
        for i, value in zip(members, _split(out, keeps), strict=True):
            results[i] = value
    return results


def _resolve_any(requests: Sequence[Any]) -> list[Any]:
    """One round: :func:`resolve` for the :class:`UnitRequest`, one conditional for
    the :class:`Fallback` and :func:`_resolve_batched` for the :class:`Batched`
    requests."""
    kinds = [type(r) for r in requests]
    done = {
        UnitRequest: resolve([r for r in requests if type(r) is UnitRequest]),
        Fallback: _resolve_fallbacks([r for r in requests if type(r) is Fallback]),
        Batched: _resolve_batched([r for r in requests if type(r) is Batched]),
    }
    iters = {k: iter(v) for k, v in done.items()}
    return [next(iters[k]) for k in kinds]


def drive(programs: Sequence[Any]) -> list[Any]:
    """Runs per-leaf programs in lockstep, resolving their requests together.

    A program is a generator that yields requests (:class:`UnitRequest`,
    :class:`Fallback`, :class:`Batched`) and receives their results
    (``value = yield request``), or any other object (a finished result). All
    programs advance one request at a time and the requests of one round are
    resolved together, so the lowered step holds at most one conditional per kind
    of request and round, and one copy of each per-unit function, whatever the
    number of leaves.
    """
    registries = _registries()
    registries.append({})
    try:
        return _drive(list(programs))
    finally:
        registries.pop()


def _drive(results: list[Any]) -> list[Any]:
    sends: list[Any] = [None] * len(results)
    active = [i for i, p in enumerate(results) if isinstance(p, Generator)]
    while active:
        waiting, requests = [], []
        for i in active:
            try:
                request = results[i].send(sends[i])
            except StopIteration as stop:
                results[i] = stop.value
                continue
            waiting.append(i)
            requests.append(request)
        if requests:
            for i, value in zip(waiting, _resolve_any(requests), strict=True):
                sends[i] = value
        active = waiting
    return results


def run(program: Any) -> Any:
    """The result of one program (:func:`drive` of a single leaf)."""
    return drive([program])[0]


def gram_request(
    arrays: Sequence[jax.Array],
    pairs: Sequence[tuple[int, int | None]],
    axes: Sequence[int],
    *,
    verify_zero: Sequence[int] | None = None,
    then: Callable[..., Any] | None = None,
    inputs: Any = None,
    derive: Callable[..., tuple[jax.Array, ...]] | None = None,
    forms: Sequence[Any] | None = None,
) -> UnitRequest:
    """The :class:`UnitRequest` of the Gram of ``arrays`` (see :func:`gram`).

    ``forms``, if given, holds
    per array None or ``(fn, sources)``: the Gram is then that of
    ``fn(*sources)`` in place of ``arrays[p]`` (``fn`` elementwise; each source
    of the array's shape, or per-group with dims kept, broadcast over the
    group), computed inside the summing loops and never stored.
    """
    axes = tuple(axes)
    if not axes:
        raise ValueError("gram_request needs at least one reduced axis.")
    shape, dtype = arrays[0].shape, arrays[0].dtype
    keep = kept_shape(shape, axes)
    count = len(arrays)
    pairs = tuple(pairs)
    diagonal_of = {p: i for i, (p, q) in enumerate(pairs) if p == q}
    missing = [p for p in range(count) if p not in diagonal_of]
    diagonal_of.update({p: len(pairs) + k for k, p in enumerate(missing)})
    diagonal = tuple(diagonal_of[p] for p in range(count))
    mats = [as_matrix(a, axes) for a in arrays]
    info = jnp.finfo(dtype)
    floor = mats[0].shape[0] * 2.0 ** (int(info.minexp) + info.nmant + 1)
    verify = tuple(range(count)) if verify_zero is None else tuple(verify_zero)

    matrix_forms = None
    if forms is not None:

        def as_source(x):
            if x.shape == shape:
                return as_matrix(x, axes)
            return jnp.broadcast_to(x, keep).reshape(1, -1)

        matrix_forms = tuple(
            None if f is None else (f[0], tuple(as_source(x) for x in f[1]))
            for f in forms
        )
    return UnitRequest(
        floor,
        verify,
        tuple(mats),
        pairs,
        diagonal,
        keep,
        then,
        inputs,
        derive,
        matrix_forms,
    )


def gram_program(
    arrays: Sequence[jax.Array],
    pairs: Sequence[tuple[int, int | None]],
    axes: Sequence[int],
    *,
    verify_zero: Sequence[int] | None = None,
) -> Program:
    """:func:`gram` as a program for :func:`drive`."""
    axes = tuple(axes)
    if not axes:  # one element per group: products cannot be rescaled usefully
        values = tuple(product(arrays, p, q) for p, q in pairs)
        exps = tuple(jnp.zeros(arrays[0].shape, jnp.int32) for _ in arrays)
        return Gram(values, exps)
    return (yield gram_request(arrays, pairs, axes, verify_zero=verify_zero))


def gram(
    arrays: Sequence[jax.Array],
    pairs: Sequence[tuple[int, int | None]],
    axes: Sequence[int],
    *,
    verify_zero: Sequence[int] | None = None,
) -> Gram:
    """Scaled per-group inner products ``<arrays[p], arrays[q]>`` over ``axes``
    (and plain sums of ``arrays[p]`` for pairs ``(p, None)``).

    All arrays share one shape and one floating dtype; ``axes`` are the reduced
    axes (sorted; ``unit_axes(ndim)`` for one group per output unit). Results have
    the shape of a per-group quantity (:func:`kept_shape`).

    One pass over memory computes the plain inner products (and every array's
    squared norm). Where each squared norm is finite and far above the smallest
    normal number, the plain sums are accurate, and the scaled values, with
    ``E_p`` the exponent of ``||x_p||``, follow from them exactly (a multiplication
    by powers of two). Otherwise every array is scaled by the exponent of its
    largest magnitude and summed again. Inside an optimizer step that choice is
    made once for the whole parameter tree (:func:`gram_request`,
    :func:`drive`); called alone, it is one :func:`jax.lax.cond`.

    A group whose squared norm is exactly zero counts as zero, except for the
    arrays in ``verify_zero`` (default: all), for which the exact branch tells a
    true zero from a group whose every square underflows (magnitudes below about
    ``1e-19`` in float32). Other arrays' groups of such magnitudes count as zero:
    their contribution is below float32 resolution next to any other term.
    """
    g = run(gram_program(arrays, pairs, axes, verify_zero=verify_zero))
    return Gram(tuple(g.values), tuple(g.exps))


def unit_gram(
    arrays: Sequence[jax.Array],
    pairs: Sequence[tuple[int, int | None]],
    *,
    verify_zero: Sequence[int] | None = None,
) -> Gram:
    """:func:`gram` with one group per output unit (all axes but the last)."""
    return gram(arrays, pairs, unit_axes(arrays[0].ndim), verify_zero=verify_zero)


def unit_gram_program(
    arrays: Sequence[jax.Array],
    pairs: Sequence[tuple[int, int | None]],
    *,
    verify_zero: Sequence[int] | None = None,
) -> Program:
    """:func:`gram_program` with one group per output unit."""
    axes = unit_axes(arrays[0].ndim)
    return (yield from gram_program(arrays, pairs, axes, verify_zero=verify_zero))


def norm_program(x: jax.Array, axes: Sequence[int]) -> Program:
    """:func:`norm` as a program for :func:`drive`."""
    g = yield from gram_program([x], [(0, 0)], axes)
    return unscaled(safe_sqrt(g.values[0]), g.exps[0])


def norm(x: jax.Array, axes: Sequence[int]) -> jax.Array:
    """Per-group Euclidean norm over ``axes`` (dims kept): zero-safe, and finite
    wherever the true norm is representable."""
    return run(norm_program(x, axes))


def _normalize_units(gram: Gram, eps):
    """``(2**-E, 1 / (|x~| + eps 2**-E), |x|)`` for the units of every leaf."""
    f = gram.factor(0)
    n = safe_sqrt(gram.values[0])
    return f, safe_div(1.0, n + eps * f), unscaled(n, gram.exps[0])


def normalize_program(
    x: jax.Array,
    axes: Sequence[int],
    eps: Any,
) -> Program:
    """:func:`normalize` as a program for :func:`drive`: its per-unit math runs
    once for the units of every leaf of a step."""
    axes = tuple(axes)
    if not axes:
        g = yield from gram_program([x], [(0, 0)], axes)
        n = safe_sqrt(g.values[0])
        unit = (x * g.factor(0)) * safe_div(1.0, n + eps * g.factor(0))
        return unit, unscaled(n, g.exps[0])
    eps = jnp.asarray(eps, x.dtype)
    f, scale, n = yield gram_request(
        [x], [(0, 0)], axes, then=_normalize_units, inputs=eps
    )
    return (x * f) * scale, n


def normalize(
    x: jax.Array, axes: Sequence[int], eps: Any
) -> tuple[jax.Array, jax.Array]:
    """Returns ``(x / (||x|| + eps), ||x||)`` per group; a zero group maps to 0.

    Computed on the scaled array, so it is exact for any magnitude of ``x``.
    """
    return run(normalize_program(x, axes, eps))
