"""The one home of per-unit reductions, norms and divisions by norms.

Every other module calls these helpers instead of ``jnp.linalg.norm`` or a raw
division, so that

* reductions accumulate in at least float32 (bf16/fp16 inputs are promoted),
* a norm has value 0 *and* gradient 0 at the origin (no ``NaN`` through
  ``jax.grad``), and
* a division by a zero denominator yields 0 in value and gradient (the
  "double ``where``" pattern: the risky operand is replaced *before* the op).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation dtype: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def to_acc(x: jax.Array) -> jax.Array:
    """Casts ``x`` to its accumulation dtype (a no-op for float32/float64)."""
    return jnp.asarray(x).astype(acc_dtype(jnp.asarray(x).dtype))


def unit_axes(ndim: int) -> tuple[int, ...]:
    """Axes of one output unit in Flax layout: all axes but the last."""
    return tuple(range(ndim - 1))


def group_axes(ndim: int, channel_axes: Sequence[int] | None) -> tuple[int, ...]:
    """Reduced axes R for a group specification.

    Args:
      ndim: Rank of the leaf.
      channel_axes: Axes that *index* independent groups. ``(-1,)`` (one group per
        output unit, the BatchNorm case), ``()`` (the whole tensor is one group,
        the LayerNorm case) or ``None`` (every element is its own group).

    Returns:
      The axes summed over inside one group (the complement of ``channel_axes``).
      Channel axes outside the leaf's rank are ignored, so ``(-1,)`` on a scalar
      leaf gives element-wise groups.
    """
    if channel_axes is None:
        return ()
    kept = {a % ndim for a in channel_axes if -ndim <= a < ndim} if ndim else set()
    return tuple(a for a in range(ndim) if a not in kept)


def group_size(shape: Sequence[int], axes: Sequence[int]) -> int:
    """Number of elements in one group (``d`` in the AdamS/SGD-MRT updates)."""
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def inner(a: jax.Array, b: jax.Array, axes: Sequence[int]) -> jax.Array:
    """Per-group inner product ``sum(a * b)`` over ``axes``, dims kept."""
    return jnp.sum(a * b, axis=tuple(axes), keepdims=True)


#: Elements per operand in one block of :func:`unit_inners` on CPU (2 MiB in
#: float32): three operands stay in the last-level cache while six products are
#: summed over them.
CPU_BLOCK_ELEMENTS = 1 << 19


def unit_inners(
    arrays: Sequence[jax.Array], pairs: Sequence[tuple[int, int]]
) -> tuple[jax.Array, ...]:
    """Per-unit inner products ``<arrays[p], arrays[q]>`` for every ``(p, q)``.

    All arrays share one shape; a unit is a slice ``x[..., j]`` (Flax layout) and
    each result has shape ``(1, ..., 1, units)`` like :func:`inner`. Where the
    kernel is large the inner products are computed in a single pass over memory:
    XLA's CPU backend runs every reduction as its own pass, so on CPU the rows are
    walked in cache-sized blocks and all products of a block are summed while it
    is in cache. Other backends merge sibling reductions themselves and get the
    plain sums.
    """
    shape = arrays[0].shape
    units = shape[-1] if shape else 1
    rows = math.prod(shape[:-1])
    mats = [a.reshape(rows, units) for a in arrays]
    block = max(1, CPU_BLOCK_ELEMENTS // max(units, 1))
    if rows >= 2 * block:
        sums = jax.lax.platform_dependent(
            *mats,
            cpu=functools.partial(_blocked_inners, pairs=pairs, block=block),
            default=functools.partial(_column_inners, pairs=pairs),
        )
    else:
        sums = _column_inners(*mats, pairs=pairs)
    keep = (1,) * (len(shape) - 1) + (units,)
    return tuple(s.reshape(keep) for s in sums)


def group_inners(
    arrays: Sequence[jax.Array],
    pairs: Sequence[tuple[int, int]],
    axes: Sequence[int],
) -> tuple[jax.Array, ...]:
    """Per-group inner products over ``axes`` (sorted, as :func:`group_axes` gives
    them; dims kept), like :func:`inner`.

    Groups of one output unit (all axes but the last) and of the whole tensor take
    the single pass of :func:`unit_inners`; other groupings sum each pair.
    """
    ndim, axes = arrays[0].ndim, tuple(axes)
    if ndim and axes == tuple(range(ndim - 1)):
        return unit_inners(arrays, pairs)
    if ndim and axes == tuple(range(ndim)):
        columns = unit_inners([a.reshape(-1, 1) for a in arrays], pairs)
        return tuple(c.reshape((1,) * ndim) for c in columns)
    return tuple(inner(arrays[p], arrays[q], axes) for p, q in pairs)


def _column_inners(*mats, pairs):
    return tuple(jnp.sum(mats[p] * mats[q], axis=0) for p, q in pairs)


def _blocked_inners(*mats, pairs, block):
    rows = mats[0].shape[0]
    count, rest = divmod(rows, block)

    def body(i, acc):
        part = [jax.lax.dynamic_slice_in_dim(m, i * block, block, 0) for m in mats]
        return tuple(
            a + s for a, s in zip(acc, _column_inners(*part, pairs=pairs), strict=True)
        )

    zeros = tuple(
        jnp.zeros(mats[0].shape[1:], jnp.result_type(mats[p], mats[q]))
        for p, q in pairs
    )
    sums = jax.lax.fori_loop(0, count, body, zeros)
    if rest:
        tail = _column_inners(*[m[count * block :] for m in mats], pairs=pairs)
        sums = tuple(a + t for a, t in zip(sums, tail, strict=True))
    return sums


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x >= 0`` with value 0 and gradient 0 at ``x = 0``."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den != 0`` and 0 elsewhere, NaN-free in gradients."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def norm(x: jax.Array, axes: Sequence[int]) -> jax.Array:
    """Per-group Euclidean norm over ``axes`` (dims kept), zero-safe."""
    return safe_sqrt(inner(x, x, axes))


def normalize(
    x: jax.Array, axes: Sequence[int], eps: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """Returns ``(x / (||x|| + eps), ||x||)`` per group; a zero group maps to 0."""
    n = norm(x, axes)
    return safe_div(x, n + eps), n


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
    once = jnp.sum(jnp.where(first, stacked[None], 0), axis=0)
    return tuple(once[i] for i in range(len(coefficients)))


def check_nonnegative(name: str, value) -> None:
    """Raises ``ValueError`` for a negative Python number (arrays are not checked)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}.")
