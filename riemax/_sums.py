"""Per-unit sums of products in one pass over memory, fastest per backend.

Column sums of matrices ``(reduced elements, groups)``: one variadic reduction
for small matrices (cheapest to compile), cache-sized row blocks on XLA's CPU
backend for large ones (it runs every other reduction as its own pass), plain
reductions elsewhere (other backends merge sibling reductions themselves).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

#: Elements per operand in one block of the CPU pass (2 MiB in float32): three
#: operands stay in the last-level cache while their products are summed.
CPU_BLOCK_ELEMENTS = 1 << 19


# The reducers are module-level functions: lax.reduce caches a reducer's traced
# form by the function object, so a function made anew on each call is traced
# (and, outside jit, compiled) anew on each call.


def add(xs, ys):
    """Elementwise sum of two tuples (a variadic reducer)."""
    return tuple(x + y for x, y in zip(xs, ys, strict=True))


def biggest(xs, ys):
    """Elementwise maximum of two tuples (a variadic reducer)."""
    return tuple(jnp.maximum(x, y) for x, y in zip(xs, ys, strict=True))


def product(mats, p, q):
    return mats[p] if q is None else mats[p] * mats[q]


def _stats(mats, pairs):
    """Column sums of the pair products (of the matrix itself for ``(p, None)``)."""
    return tuple(jnp.sum(product(mats, p, q), axis=0) for p, q in pairs)


def formed(mats, forms=None) -> list[Any]:
    """``mats`` with those given by a form ``(fn, sources)`` computed from their
    sources (``forms``: one form or None per matrix, or None for none)."""
    return _rebuilt(*_operands(mats, forms))


def _operands(mats, forms):
    """The arrays a pass reads (the matrices without a form, then every form's
    sources) and how to put the matrices back together from them."""
    arrays: list[Any] = []
    layout: list[Any] = []
    for m, f in zip(mats, forms or (None,) * len(mats), strict=True):
        if f is None:
            layout.append(len(arrays))
            arrays.append(m)
        else:
            layout.append((f[0], tuple(range(len(arrays), len(arrays) + len(f[1])))))
            arrays.extend(f[1])
    return arrays, tuple(layout)


def _rebuilt(arrays, layout):
    """The matrices of :func:`_operands` from (slices of) its arrays."""
    return [
        arrays[k] if isinstance(k, int) else k[0](*(arrays[j] for j in k[1]))
        for k in layout
    ]


def _blocked_stats(*arrays, pairs, block, layout):
    """:func:`_stats` in one pass over memory: row blocks in a ``fori_loop``.
    ``arrays`` and ``layout`` come from :func:`_operands`: a matrix given by a
    form is computed inside the loop from its sources' rows (one computed before
    it would be stored); sources of one row are broadcast, not sliced."""
    rows = max(a.shape[0] for a in arrays)
    count, rest = divmod(rows, block)

    def rows_of(a, start, size):
        if a.shape[0] != rows:
            return a
        return jax.lax.dynamic_slice_in_dim(a, start, size, 0)

    def merge(acc, part):
        return tuple(a + s for a, s in zip(acc, part, strict=True))

    def body(i, acc):
        part = [rows_of(a, i * block, block) for a in arrays]
        return merge(acc, _stats(_rebuilt(part, layout), pairs))

    sums = jax.eval_shape(lambda *a: _stats(_rebuilt(a, layout), pairs), *arrays)
    zeros = tuple(jnp.zeros(x.shape, x.dtype) for x in sums)
    acc = jax.lax.fori_loop(0, count, body, zeros)
    if rest:
        tail = [a if a.shape[0] != rows else a[count * block :] for a in arrays]
        acc = merge(acc, _stats(_rebuilt(tail, layout), pairs))
    return acc


#: Matrices up to this many elements are summed by one variadic reduction (one
#: loop for every pair, the cheapest to compile); larger ones by one reduction per
#: pair, which XLA runs faster on them.
FUSED_MAX_ELEMENTS = 1 << 17


def _variadic(mats, pairs):
    """:func:`_stats` as one variadic reduction (one loop, one compiled kernel)."""
    products = tuple(product(mats, p, q) for p, q in pairs)
    zeros = tuple(jnp.zeros((), x.dtype) for x in products)
    if len(products) == 1:
        # XLA's CPU backend splits a lone column sum into two loops (a windowed
        # partial sum and its total) and keeps a variadic one as one loop: the
        # sum is taken twice in that loop, and both results are read.
        a, b = jax.lax.reduce(products * 2, zeros * 2, add, (0,))
        return (jnp.minimum(a, b),)
    return tuple(jax.lax.reduce(products, zeros, add, (0,)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _fused_stats(mats_of, pairs):
    """:func:`_variadic` for the matrices of many leaves: one traced function
    (and one custom derivative) for all of them, not one per leaf."""
    return [_variadic(mats, pairs) for mats in mats_of]


@_fused_stats.defjvp
def _fused_stats_jvp(pairs, primals, tangents):
    # Differentiation of a variadic reduction is not supported everywhere: the
    # tangents are plain sums (linear in the tangents, as for ``jnp.sum``).
    (mats_of,), (dots_of,) = primals, tangents
    out = _fused_stats(mats_of, pairs)
    tangent = [
        tuple(
            jnp.sum(dots[p] if q is None else dots[p] * mats[q] + mats[p] * dots[q], 0)
            for p, q in pairs
        )
        for mats, dots in zip(mats_of, dots_of, strict=True)
    ]
    return out, tangent


def one_pass(
    mats_of, pairs, *, fused: bool = False, blocked: bool = True, forms_of=None
):
    """Column sums of the pair products of each leaf's matrices (``mats_of``, a
    sequence of one tuple of matrices per leaf), each in a single pass over
    memory.

    Small matrices (and every matrix with ``fused``, used off the hot path) get one
    variadic reduction. XLA's CPU backend runs every other reduction as its own
    pass over memory, so large matrices are walked in cache-sized row blocks
    there; other backends merge sibling reductions themselves and get the plain
    reductions. ``blocked=False`` keeps the plain reductions on CPU too: inside
    a conditional's branch the blocked loop makes XLA copy the branch's kernels
    on every step, taken or not. ``forms_of``, if given, holds per leaf None or
    per matrix None or a form ``(fn, sources)``: the matrix is ``fn(*sources)``
    (elementwise; a source is a matrix or a row broadcast over the rows),
    computed inside the summing loops and never stored.
    """
    pairs = tuple(pairs)
    forms_of = forms_of or [None] * len(mats_of)

    def is_small(mats):
        rows, cols = mats[0].shape
        return fused or rows * cols <= FUSED_MAX_ELEMENTS

    out: list[Any] = [None] * len(mats_of)
    small = [i for i, mats in enumerate(mats_of) if is_small(mats)]
    if small:
        found = _fused_stats([formed(mats_of[i], forms_of[i]) for i in small], pairs)
        for i, sums in zip(small, found, strict=True):
            out[i] = tuple(sums)
    for i, mats in enumerate(mats_of):
        if out[i] is not None:
            continue
        rows, cols = mats[0].shape
        block = max(1, CPU_BLOCK_ELEMENTS // max(cols, 1))
        forms = forms_of[i]
        if forms is not None and any(f is not None for f in forms) and rows < 2 * block:
            # A formed matrix too small for cache-sized blocks still goes
            # through the loop, in two blocks: outside it, XLA would store it
            # to feed several reductions (or share it with the write).
            block = max(1, rows // 2)
        if blocked and rows >= 2 * block:
            arrays, layout = _operands(mats, forms)
            out[i] = jax.lax.platform_dependent(
                *arrays,
                cpu=functools.partial(
                    _blocked_stats, pairs=pairs, block=block, layout=layout
                ),
                default=lambda *a, k=layout: _stats(_rebuilt(a, k), pairs),
            )
        else:
            out[i] = _stats(formed(mats, forms), pairs)
    return out


def column_max_abs(mats):
    """The largest magnitude of every column of every matrix, in one reduction."""
    absolute = tuple(jnp.abs(m) for m in mats)
    zeros = tuple(jnp.zeros((), m.dtype) for m in mats)
    return jax.lax.reduce(absolute, zeros, biggest, (0,))


def as_matrix(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``x`` as ``(reduced elements, groups)``: the reduced axes first."""
    rest = tuple(a for a in range(x.ndim) if a not in axes)
    if axes != tuple(range(len(axes))):
        x = jnp.transpose(x, axes + rest)
    rows = math.prod(x.shape[: len(axes)])
    return x.reshape(rows, -1)
