"""The one home of per-unit reductions, norms and divisions by norms.

Every other module calls these helpers instead of ``jnp.linalg.norm`` or a raw
division, so that

* reductions accumulate in at least float32 (bf16/fp16 inputs are promoted),
* a norm has value 0 *and* gradient 0 at the origin (no ``NaN`` through
  ``jax.grad``),
* a division by a zero denominator yields 0 in value and gradient (the
  "double ``where``" pattern: the risky operand is replaced *before* the op), and
* no sum of squares overflows or underflows: :func:`gram` returns the inner
  products of arrays *scaled* by a power of two per group (exact), so a gradient of
  1e38 or a unit of 1e-30 has a finite, accurate norm.

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

import functools
import math
from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

#: A leaf program for :func:`drive`: a generator that yields requests, receives
#: their results and returns the leaf's result.
Program = Generator[Any, Any, Any]


def acc_dtype(dtype: Any) -> jnp.dtype:
    """Accumulation dtype: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def to_acc(x: Any) -> jax.Array:
    """Casts ``x`` to its accumulation dtype (a no-op for float32/float64)."""
    x = jnp.asarray(x)
    return x.astype(acc_dtype(x.dtype))


def unit_axes(ndim: int) -> tuple[int, ...]:
    """Axes of one output unit in Flax layout: all axes but the last."""
    return tuple(range(ndim - 1))


def group_axes(ndim: int, channel_axes: Sequence[int] | None) -> tuple[int, ...]:
    """Reduced axes R for a group specification (axes already validated).

    Args:
      ndim: Rank of the leaf.
      channel_axes: Axes that *index* independent groups. ``(-1,)`` (one group per
        output unit, the BatchNorm case), ``()`` (the whole tensor is one group,
        the LayerNorm case) or ``None`` (every element is its own group). A scalar
        leaf has no axes: every specification gives one group of one element.

    Returns:
      The axes summed over inside one group (the complement of ``channel_axes``),
      sorted.
    """
    if channel_axes is None or ndim == 0:
        return ()
    kept = {a % ndim for a in channel_axes}
    return tuple(a for a in range(ndim) if a not in kept)


def group_size(shape: Sequence[int], axes: Sequence[int]) -> int:
    """Number of elements in one group (``d`` in the AdamS/SGD-MRT updates)."""
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def kept_shape(shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    """Shape of a per-group quantity: ``shape`` with the reduced ``axes`` set to 1."""
    return tuple(1 if a in axes else s for a, s in enumerate(shape))


def inner(a: jax.Array, b: jax.Array, axes: Sequence[int]) -> jax.Array:
    """Per-group inner product ``sum(a * b)`` over ``axes``, dims kept (unscaled)."""
    return jnp.sum(a * b, axis=tuple(axes), keepdims=True)


def tolerance(dtype: Any) -> float:
    """A rounding tolerance for ``dtype``: the square root of its machine epsilon."""
    return float(jnp.finfo(dtype).eps) ** 0.5


# --------------------------------------------------------------------- powers of two


def _exp_range(dtype: Any) -> tuple[int, int]:
    """Exponents ``E`` whose scaling factors ``2**E`` and ``2**-E`` are both normal."""
    info = jnp.finfo(dtype)
    return int(info.minexp) + info.nmant + 1, int(info.maxexp) - 2


def pow2(e: jax.Array, dtype: Any) -> jax.Array:
    """Exactly ``2.0 ** e`` for integer ``e`` inside the normal range of ``dtype``."""
    info = jnp.finfo(dtype)
    bits = {4: jnp.int32, 8: jnp.int64}[jnp.dtype(dtype).itemsize]
    e = jnp.clip(
        jnp.asarray(e).astype(bits), int(info.minexp) - 1, int(info.maxexp) - 1
    )
    biased = (e + (int(info.maxexp) - 1)) << info.nmant
    return jax.lax.bitcast_convert_type(biased.astype(bits), dtype)


def exponent(m: jax.Array) -> jax.Array:
    """Per-group scaling exponent of a non-negative magnitude ``m``.

    ``E`` with ``m * 2**-E`` in ``[0.5, 1)``, clamped so that ``2**E`` and
    ``2**-E`` stay normal; 0 where ``m`` is zero or not finite. Piecewise constant,
    so it carries no gradient.
    """
    lo, hi = _exp_range(m.dtype)
    _, e = jnp.frexp(m)
    ok = (m > 0) & jnp.isfinite(m)
    return jax.lax.stop_gradient(jnp.clip(jnp.where(ok, e, 0), lo, hi))


def scaled(x: jax.Array, e: jax.Array) -> jax.Array:
    """``x * 2**-e`` (exact; ``e`` broadcasts per group)."""
    return x * pow2(-e, x.dtype)


def unscaled(x: Any, e: jax.Array, dtype: Any = None) -> jax.Array:
    """``x * 2**e``: infinite only where the true value overflows.

    ``e`` may be a sum of two scaling exponents: the factor is applied in two
    halves of the same sign, each a normal power of two. ``dtype`` gives the dtype
    of a Python number ``x``.
    """
    x = jnp.asarray(x, dtype)
    half = e // 2
    return x * pow2(half, x.dtype) * pow2(e - half, x.dtype)


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


#: Elements per operand in one block of the CPU pass (2 MiB in float32): three
#: operands stay in the last-level cache while their products are summed.
CPU_BLOCK_ELEMENTS = 1 << 19


def _product(mats, p, q):
    return mats[p] if q is None else mats[p] * mats[q]


def _stats(mats, pairs):
    """Column sums of the pair products (of the matrix itself for ``(p, None)``)."""
    return tuple(jnp.sum(_product(mats, p, q), axis=0) for p, q in pairs)


def _blocked_stats(*mats, pairs, block):
    """:func:`_stats` in one pass over memory: row blocks in a ``fori_loop``."""
    rows = mats[0].shape[0]
    count, rest = divmod(rows, block)

    def merge(acc, part):
        return tuple(a + s for a, s in zip(acc, part, strict=True))

    def body(i, acc):
        part = [jax.lax.dynamic_slice_in_dim(m, i * block, block, 0) for m in mats]
        return merge(acc, _stats(part, pairs))

    zeros = tuple(
        jnp.zeros(mats[0].shape[1:], _product(mats, p, q).dtype) for p, q in pairs
    )
    acc = jax.lax.fori_loop(0, count, body, zeros)
    if rest:
        acc = merge(acc, _stats([m[count * block :] for m in mats], pairs))
    return acc


#: Matrices up to this many elements are summed by one variadic reduction (one
#: loop for every pair, the cheapest to compile); larger ones by one reduction per
#: pair, which XLA runs faster on them.
FUSED_MAX_ELEMENTS = 1 << 17


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _fused_stats(mats, pairs):
    """:func:`_stats` as one variadic reduction (one loop, one compiled kernel)."""
    products = tuple(_product(mats, p, q) for p, q in pairs)
    zeros = tuple(jnp.zeros((), x.dtype) for x in products)

    def add(xs, ys):
        return tuple(x + y for x, y in zip(xs, ys, strict=True))

    return tuple(jax.lax.reduce(products, zeros, add, (0,)))


@_fused_stats.defjvp
def _fused_stats_jvp(pairs, primals, tangents):
    # Differentiation of a variadic reduction is not supported everywhere: the
    # tangents are plain sums (linear in the tangents, as for ``jnp.sum``).
    (mats,), (dots,) = primals, tangents
    out = _fused_stats(mats, pairs)
    tangent = tuple(
        jnp.sum(dots[p] if q is None else dots[p] * mats[q] + mats[p] * dots[q], 0)
        for p, q in pairs
    )
    return out, tangent


def _one_pass(mats, pairs, *, fused: bool = False):
    """Column sums of the pair products, in a single pass over memory.

    Small matrices (and every matrix with ``fused``, used off the hot path) get one
    variadic reduction. XLA's CPU backend runs every other reduction as its own
    pass over memory, so large matrices are walked in cache-sized row blocks
    there; other backends merge sibling reductions themselves and get the plain
    reductions.
    """
    rows, cols = mats[0].shape
    if fused or rows * cols <= FUSED_MAX_ELEMENTS:
        return _fused_stats(list(mats), tuple(pairs))
    block = max(1, CPU_BLOCK_ELEMENTS // max(cols, 1))
    if rows >= 2 * block:
        return jax.lax.platform_dependent(
            *mats,
            cpu=functools.partial(_blocked_stats, pairs=pairs, block=block),
            default=lambda *m: _stats(m, pairs),
        )
    return _stats(mats, pairs)


def _column_max_abs(mats):
    """The largest magnitude of every column of every matrix, in one reduction."""
    absolute = tuple(jnp.abs(m) for m in mats)
    zeros = tuple(jnp.zeros((), m.dtype) for m in mats)

    def biggest(xs, ys):
        return tuple(jnp.maximum(x, y) for x, y in zip(xs, ys, strict=True))

    return jax.lax.reduce(absolute, zeros, biggest, (0,))


def _as_matrix(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``x`` as ``(reduced elements, groups)``: the reduced axes first."""
    rest = tuple(a for a in range(x.ndim) if a not in axes)
    if axes != tuple(range(len(axes))):
        x = jnp.transpose(x, axes + rest)
    rows = math.prod(x.shape[: len(axes)])
    return x.reshape(rows, -1)


class UnitRequest(NamedTuple):
    """A leaf's per-unit statistics and what to compute from them.

    A leaf program (:func:`drive`) yields one and receives its result. The
    statistics are per-group inner products of the leaf's arrays (a :class:`Gram`);
    ``then(gram, inputs)`` turns them into the per-unit quantities the leaf needs
    (``inputs``: per-unit arrays of the leaf, such as a second moment), or, without
    ``then``, the leaf receives the Gram itself. ``then`` acts elementwise on
    units, so :func:`resolve` runs it once on the units of every leaf of a step,
    concatenated.

    The statistics come in two forms, with one decision for the whole step:

    * fast: ``sums`` are plain sums from one pass over memory; the scaled Gram
      follows from them exactly where every sum is finite and every squared norm
      is zero (arrays not in ``verify``) or at least ``floor``. Where that test
      fails the sums are replaced by harmless values, so that the discarded value
      and its gradient stay finite;
    * exact, when the test fails anywhere in the step: ``exact()`` returns the Gram
      summed on arrays rescaled by powers of two.
    """

    sums: tuple[jax.Array, ...]
    floor: float
    verify: tuple[int, ...]
    exact: Callable[[], Gram]
    pairs: tuple[tuple[int, int | None], ...]
    diagonal: tuple[int, ...]
    keep: tuple[int, ...]
    then: Callable[..., Any] | None = None
    inputs: Any = None


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


def _concat(trees: Sequence[Any], keeps: Sequence[tuple[int, ...]]) -> Any:
    """Per-unit trees of several leaves as one tree of flat arrays, materialised
    (:func:`_once`): the per-unit math reads them instead of fusing a
    concatenation of every leaf into each of its loops."""

    def cat(*xs):
        flat = [
            jnp.broadcast_to(x, k).reshape(-1) for x, k in zip(xs, keeps, strict=True)
        ]
        return flat[0] if len(flat) == 1 else jnp.concatenate(flat)

    return _once(jax.tree.map(cat, *trees))


def _split(tree: Any, keeps: Sequence[tuple[int, ...]]) -> list[Any]:
    sizes = [math.prod(k) for k in keeps]
    total = sum(sizes)
    bounds = np.cumsum([0, *sizes])

    def part(x, i):
        x = jnp.broadcast_to(x, (total,))
        if len(keeps) == 1:
            return x.reshape(keeps[0])
        return x[bounds[i] : bounds[i + 1]].reshape(keeps[i])

    return [jax.tree.map(lambda x, i=i: part(x, i), tree) for i in range(len(keeps))]


def _group_key(r: UnitRequest) -> tuple:
    return (r.then, r.pairs, r.diagonal, r.verify, r.sums[0].dtype)


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


def resolve(requests: Sequence[UnitRequest]) -> list[Any]:
    """The results of many :class:`UnitRequest`: one decision for all, and one
    ``then`` per kind of request on the units of all leaves together."""
    requests = list(requests)
    if not requests:
        return []
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(_group_key(r), []).append(i)
    members_of = list(groups.values())
    keeps_of = [[requests[i].keep for i in members] for members in members_of]
    checks = []
    fast = []
    for members, keeps in zip(members_of, keeps_of, strict=True):
        first = requests[members[0]]
        sums = _concat([requests[i].sums for i in members], keeps)
        floor = _concat(
            [jnp.asarray(requests[i].floor, sums[0].dtype) for i in members], keeps
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
        return packed(
            _concat([requests[i].exact() for i in members], keeps)
            for members, keeps in zip(members_of, keeps_of, strict=True)
        )

    stats = jax.lax.cond(jnp.all(jnp.stack(checks)), lambda: packed(fast), exact)
    results: list[Any] = [None] * len(requests)
    for members, keeps, (values, exps) in zip(members_of, keeps_of, stats, strict=True):
        first = requests[members[0]]
        out = Gram(tuple(values), tuple(exps))
        if first.then is not None:
            out = first.then(out, _concat([requests[i].inputs for i in members], keeps))
        for i, value in zip(members, _split(_once(out), keeps), strict=True):
            results[i] = value
    return results


class Fallback(NamedTuple):
    """A per-unit value with a careful form where its fast form is not exact.

    ``value`` is the fast form, ``mask`` marks the units where it is not exact,
    and ``compute()`` gives the careful form (e.g. sums taken directly where a
    Gram identity cancels). One conditional for every leaf of a round: the
    careful forms are computed only when some mask is set anywhere.
    """

    value: Any
    mask: jax.Array
    compute: Callable[[], Any]


def _resolve_fallbacks(requests: Sequence[Fallback]) -> list[Any]:
    if not requests:
        return []
    needed = jnp.any(jnp.stack([jnp.any(r.mask) for r in requests]))

    def careful():
        return [
            jax.tree.map(
                lambda c, v, r=r: jnp.where(r.mask, c, v), r.compute(), r.value
            )
            for r in requests
        ]

    return jax.lax.cond(needed, careful, lambda: [r.value for r in requests])


class Batched(NamedTuple):
    """A per-unit function of a leaf's per-unit arrays, run once for the units of
    every leaf that asks for the same ``fn`` in a round (no decision involved).

    ``inputs`` is a tree of arrays broadcastable to ``keep`` (the leaf's per-unit
    shape); ``fn(inputs)`` acts elementwise on units and returns a tree of them.
    """

    fn: Callable[[Any], Any]
    inputs: Any
    keep: tuple[int, ...]


def _resolve_batched(requests: Sequence[Batched]) -> list[Any]:
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.fn, []).append(i)
    results: list[Any] = [None] * len(requests)
    for fn, members in groups.items():
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
    results = list(programs)
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
) -> UnitRequest:
    """The :class:`UnitRequest` of the Gram of ``arrays`` (see :func:`gram`)."""
    axes = tuple(axes)
    if not axes:
        raise ValueError("gram_request needs at least one reduced axis.")
    shape, dtype = arrays[0].shape, arrays[0].dtype
    keep = kept_shape(shape, axes)
    count = len(arrays)
    pairs = tuple(pairs)
    diagonal_of = {p: i for i, (p, q) in enumerate(pairs) if p == q}
    missing = [p for p in range(count) if p not in diagonal_of]
    all_pairs = pairs + tuple((p, p) for p in missing)
    diagonal_of.update({p: len(pairs) + k for k, p in enumerate(missing)})
    diagonal = tuple(diagonal_of[p] for p in range(count))
    mats = [_as_matrix(a, axes) for a in arrays]
    sums = tuple(s.reshape(keep) for s in _one_pass(mats, all_pairs))
    info = jnp.finfo(dtype)
    floor = mats[0].shape[0] * 2.0 ** (int(info.minexp) + info.nmant + 1)
    verify = tuple(range(count)) if verify_zero is None else tuple(verify_zero)

    def exact():
        maxes = _column_max_abs([jax.lax.stop_gradient(m) for m in mats])
        exps = [exponent(m) for m in maxes]
        scaled_mats = [m * pow2(-e, dtype) for m, e in zip(mats, exps, strict=True)]
        values = _one_pass(scaled_mats, pairs, fused=True)
        return Gram(
            tuple(v.reshape(keep) for v in values),
            tuple(e.reshape(keep) for e in exps),
        )

    return UnitRequest(sums, floor, verify, exact, pairs, diagonal, keep, then, inputs)


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
        values = tuple(_product(arrays, p, q) for p, q in pairs)
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
    return run(gram_program(arrays, pairs, axes, verify_zero=verify_zero))


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


# -------------------------------------------------------------- zero-safe primitives


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x >= 0`` with value 0 and gradient 0 at ``x = 0``."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def safe_div(num: Any, den: Any) -> jax.Array:
    """``num / den`` where ``den != 0`` and 0 elsewhere, NaN-free in gradients."""
    den = jnp.asarray(den)
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def norm_program(x: jax.Array, axes: Sequence[int]) -> Program:
    """:func:`norm` as a program for :func:`drive`."""
    g = yield from gram_program([x], [(0, 0)], axes)
    return unscaled(safe_sqrt(g.values[0]), g.exps[0])


def norm(x: jax.Array, axes: Sequence[int]) -> jax.Array:
    """Per-group Euclidean norm over ``axes`` (dims kept): zero-safe, and finite
    wherever the true norm is representable."""
    return run(norm_program(x, axes))


def normalize_program(x: jax.Array, axes: Sequence[int], eps: Any) -> Program:
    """:func:`normalize` as a program for :func:`drive`."""
    g = yield from gram_program([x], [(0, 0)], axes)
    n = safe_sqrt(g.values[0])
    unit = (x * g.factor(0)) * safe_div(1.0, n + eps * g.factor(0))
    return unit, unscaled(n, g.exps[0])


def normalize(
    x: jax.Array, axes: Sequence[int], eps: Any
) -> tuple[jax.Array, jax.Array]:
    """Returns ``(x / (||x|| + eps), ||x||)`` per group; a zero group maps to 0.

    Computed on the scaled array, so it is exact for any magnitude of ``x``.
    """
    return run(normalize_program(x, axes, eps))


def pnorm(x: jax.Array, axes: Sequence[int], p: float) -> jax.Array:
    """Per-group p-norm over ``axes`` (dims dropped) in >= float32, for p >= 1 or
    inf; zero with zero gradient at zero, scaled so that no power overflows."""
    x = to_acc(x)
    axes = tuple(axes)
    big = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axes, keepdims=True))
    if math.isinf(p):
        return jnp.max(jnp.abs(x), axis=axes)
    e = exponent(big)
    xs = scaled(x, e)
    if p == 2:
        total = jnp.sum(xs * xs, axis=axes, keepdims=True)
        return unscaled(safe_sqrt(total), e).squeeze(axes)
    total = jnp.sum(jnp.abs(xs) ** p, axis=axes, keepdims=True)
    positive = total > 0
    root = jnp.where(positive, jnp.where(positive, total, 1) ** (1.0 / p), 0)
    return unscaled(root, e).squeeze(axes)


def per_unit(*coefficients: jax.Array) -> tuple[jax.Array, ...]:
    """Returns the per-unit coefficient arrays unchanged, computed once per unit.

    XLA fuses scalar math on per-unit values (square roots, divisions, sin, cos)
    into the elementwise loop that broadcasts them, evaluating it once per
    *element*: on large kernels that costs more than the memory traffic of the
    whole step. A genuine reduction is never fused into its consumers, so the
    coefficients are stacked and passed through a sum over a size-2 axis whose
    second slot is 0 (exact: ``c + 0``, also for inf and NaN). On CPU
    ``lax.optimization_barrier`` does not prevent that fusion.
    """
    stacked = jnp.stack(jnp.broadcast_arrays(*coefficients))
    first = (jnp.arange(2) == 0).reshape((2,) + (1,) * stacked.ndim)
    zero = jnp.zeros((), stacked.dtype)
    once = jnp.sum(jnp.where(first, stacked[None], zero), axis=0, dtype=stacked.dtype)
    return tuple(once[i] for i in range(len(coefficients)))


def root_ema(r: jax.Array, x: jax.Array, decay: Any) -> jax.Array:
    r"""The root of an exponential moving average of squares, kept as a root.

    Returns :math:`\sqrt{\rho\, r^2 + (1 - \rho)\, x^2}` for ``r, x >= 0``: with
    ``r`` the stored root of the average and ``x`` the new magnitude (a norm or
    a root mean square). Both are scaled by the power of two of the larger before
    squaring, so the result is finite and accurate wherever it is representable,
    even where ``r**2`` or ``x**2`` would overflow or underflow.
    """
    e = exponent(jnp.maximum(r, x))
    f = pow2(-e, r.dtype)
    rs, xs = r * f, x * f
    return unscaled(safe_sqrt(decay * rs * rs + (1 - decay) * xs * xs), e)


def centered(x: jax.Array, axes: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Returns ``((x - mean(x)) * 2**-e, e)`` per group (mean over ``axes``).

    ``e`` is the group's scaling exponent (:func:`exponent` of its largest
    magnitude), so the centred array is finite for any finite ``x``; its true
    value is ``unscaled(result, e)``.
    """
    axes = tuple(axes)
    e = exponent(jnp.max(jnp.abs(x), axis=axes, keepdims=True))
    xs = scaled(x, e)
    return xs - jnp.mean(xs, axis=axes, keepdims=True), e
