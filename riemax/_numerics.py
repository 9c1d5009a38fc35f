"""The one home of per-unit arithmetic that must not overflow, underflow or NaN.

Every other module calls these helpers instead of ``jnp.linalg.norm`` or a raw
division, so that

* reductions accumulate in at least float32 (bf16/fp16 inputs are promoted),
* a norm has value 0 *and* gradient 0 at the origin (no ``NaN`` through
  ``jax.grad``),
* a division by a zero denominator yields 0 in value and gradient (the
  "double ``where``" pattern: the risky operand is replaced *before* the op), and
* scaling by powers of two (:func:`exponent`, :func:`pow2`, :func:`unscaled`) is
  exact, so that a gradient of 1e38 or a unit of 1e-30 keeps a finite, accurate
  norm (the sums themselves live in :mod:`riemax._gram`).

It also holds the per-unit formulas that several optimizers share: the norm of a
combination of two arrays from their inner products (:func:`combination`), the
rule that decides when such an identity cancels (:data:`TRUSTED_FRACTION`), and
the moving average of squared magnitudes kept as a root (:func:`root_ema`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from riemax._sums import add


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
    m = jax.lax.stop_gradient(m)
    lo, hi = _exp_range(m.dtype)
    info = jnp.finfo(m.dtype)
    bits = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[info.dtype.itemsize]
    # frexp's exponent read from the bits: the biased exponent field less
    # (bias - 1). Subnormals read as the smallest normal's, which the clip to the
    # normal range of both factors (lo is far above it) makes no difference to.
    field = jax.lax.shift_right_logical(
        jax.lax.bitcast_convert_type(m, bits), jnp.asarray(info.nmant, bits)
    ) & jnp.asarray((1 << info.nexp) - 1, bits)
    e = field.astype(jnp.int32) - (int(info.maxexp) - 2)
    ok = (m > 0) & jnp.isfinite(m)
    return jnp.clip(jnp.where(ok, e, 0), lo, hi)


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
    e = jnp.asarray(e)
    half = jax.lax.shift_right_arithmetic(e, jnp.asarray(1, e.dtype))  # floor(e / 2)
    return x * pow2(half, x.dtype) * pow2(e - half, x.dtype)


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
    coefficients pass through one variadic sum over a size-2 axis whose second
    slot is 0 (exact: ``c + 0``, also for inf and NaN). One reduction for all of
    them is one compiled loop in which their shared terms are computed once
    (XLA's CPU backend forms no multi-output fusion otherwise). On CPU
    ``lax.optimization_barrier`` does not prevent that fusion.
    """
    return _per_unit(tuple(jnp.broadcast_arrays(*coefficients)))


@jax.custom_jvp
def _per_unit(xs: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    by_dtype: dict[Any, list[int]] = {}
    for i, x in enumerate(xs):
        by_dtype.setdefault(jnp.result_type(x), []).append(i)
    out: list[Any] = [None] * len(xs)
    for dtype, index in by_dtype.items():
        ops = []
        zero = jnp.zeros((), dtype)
        for i in index:
            x = jnp.asarray(xs[i], dtype)
            # x, then a slot of zeros, along a new leading axis.
            ops.append(jax.lax.pad(x[None], zero, [(0, 1, 0)] + [(0, 0, 0)] * x.ndim))
        zeros = (zero,) * len(index)
        summed = jax.lax.reduce(tuple(ops), zeros, add, (0,))
        for i, y in zip(index, summed, strict=True):
            out[i] = y
    return tuple(out)


@_per_unit.defjvp
def _per_unit_jvp(primals, tangents):
    # The identity: tangents pass through (variadic reductions are not
    # differentiable everywhere).
    (xs,), (dots,) = primals, tangents
    return _per_unit(xs), dots


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


#: A squared norm obtained from a Gram identity (a difference of inner products)
#: is trusted while it keeps at least this fraction of the largest squared norm
#: it is computed from: at most one bit lost to cancellation. Below it, the
#: optimizers sum the combination directly.
TRUSTED_FRACTION = 0.5

#: The inner products of a combination of two arrays ``a, b`` (for
#: :func:`combination`): ``(|a|^2, <a, b>, |b|^2)``.
PAIR_GRAM = ((0, 0), (0, 1), (1, 1))


def combination(
    coefs: Sequence[Any],
    values: Sequence[jax.Array],
    pairs: Sequence[tuple[int, int]],
) -> jax.Array:
    r"""The squared norm of :math:`\sum_p c_p x_p` from per-unit inner products.

    ``values[i]`` is :math:`\langle x_p, x_q\rangle` for ``pairs[i] = (p, q)``
    (every pair with ``p <= q`` that the combination needs, squares included);
    the result :math:`\sum_i (2 - [p = q])\, c_p c_q \langle x_p, x_q\rangle` is
    clamped at 0, where rounding could make it slightly negative. Where it is
    small next to the squared norms it comes from, it has cancelled
    (:data:`TRUSTED_FRACTION`).
    """
    total: Any = 0.0
    for value, (p, q) in zip(values, pairs, strict=True):
        total = total + (1 if p == q else 2) * coefs[p] * coefs[q] * value
    return jnp.maximum(total, 0)


def second_moment(v: jax.Array, mean_square: jax.Array, decay: Any) -> jax.Array:
    """The moving average of a per-group mean square: ``decay v + (1 - decay) x``."""
    return decay * v + (1 - decay) * mean_square
