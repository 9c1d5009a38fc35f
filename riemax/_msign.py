r"""The matrix sign by matrix products (Polar Express) and the polar retraction
of the Stiefel manifold built on it.

:func:`msign` drives every singular value of a matrix to about 1 with a fixed
number of odd polynomial iterations, so it costs only matrix products: for
:math:`G = U S V^\top` it approximates :math:`U V^\top`, the orthonormal matrix
nearest to :math:`G` (its polar factor). :func:`polar_retraction` steps from a
point of the Stiefel manifold and lands back on it through :func:`msign`, the
retraction of manifold Muon (:func:`riemax.manifold_muon`). The rules are those
of docs/algorithms.md, "Manifold Muon and hyperspherical descent".
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp

from riemax._numerics import acc_dtype, pnorm, safe_div

#: The Polar Express coefficients ``(a, b, c)`` of each iteration
#: ``x <- a x + b (x x^T) x + c (x x^T)^2 x``; iterations past the last entry
#: reuse it.
POLAR_EXPRESS: tuple[tuple[float, float, float], ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)

#: The safety factor: the input is divided by its Frobenius norm times this, and
#: every triple but the last by ``(SAFETY, SAFETY**3, SAFETY**5)``.
SAFETY = 1.01


def _coefficients(steps: int) -> list[tuple[float, float, float]]:
    """The triple of each of ``steps`` iterations, safety factors applied."""
    last = len(POLAR_EXPRESS) - 1
    table = [
        (a / SAFETY, b / SAFETY**3, c / SAFETY**5) if i < last else (a, b, c)
        for i, (a, b, c) in enumerate(POLAR_EXPRESS)
    ]
    return [table[min(k, last)] for k in range(steps)]


def _precision(dtype: Any) -> jax.lax.Precision:
    """Full precision for float32/float64 products (GPUs and TPUs would otherwise
    round float32 inputs to TF32 or bfloat16); the native one below that."""
    if jnp.finfo(dtype).bits >= 32:
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def _check_steps(owner: str, name: str, steps: Any) -> int:
    try:
        value = operator.index(steps)
    except TypeError:
        raise TypeError(
            f"riemax.{owner}: {name} must be a Python int (a static argument), "
            f"got {steps!r}."
        ) from None
    if isinstance(steps, bool) or value < 1:
        raise ValueError(f"riemax.{owner}: {name} must be at least 1, got {steps!r}.")
    return value


def _check_dtype(owner: str, name: str, dtype: Any) -> jnp.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"riemax.{owner}: {name} must be a floating dtype (jnp.float32, "
            f"jnp.bfloat16, ...), got {dtype!r}."
        )
    return dt


def msign_matrix(x: jax.Array, steps: int, dtype: Any) -> jax.Array:
    """:func:`msign` without argument checks: ``x`` of shape ``[..., m, n]`` in
    a floating dtype, ``steps >= 1``; the result has the dtype of ``x``."""
    out_dtype = x.dtype
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation: x x^T is the smaller product
        x = jnp.swapaxes(x, -1, -2)
    x = x.astype(acc_dtype(x.dtype))
    scale = pnorm(x, (-2, -1), 2)[..., None, None] * SAFETY
    x = safe_div(x, scale).astype(dtype)  # msign(0) = 0, with gradient 0
    precision = _precision(dtype)
    eye = jnp.eye(x.shape[-2], dtype=dtype)
    for a, b, c in _coefficients(steps):
        s = jnp.matmul(x, jnp.swapaxes(x, -1, -2), precision=precision)
        y = c * s + b * eye
        y = jnp.matmul(y, s, precision=precision) + a * eye
        x = jnp.matmul(y, x, precision=precision)
    x = jnp.nan_to_num(x)
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(out_dtype)


def msign(
    x: jax.typing.ArrayLike, *, steps: int = 10, dtype: Any = jnp.float32
) -> jax.Array:
    r"""The matrix sign of a matrix (its polar factor), by Polar Express.

    For :math:`X = U S V^\top` (thin SVD) the result approximates :math:`U V^\top`:
    every singular value is driven to about 1, with matrix products only. On the
    wide orientation (a tall matrix is transposed, and the result transposed
    back), with :math:`(a_k, b_k, c_k)` the coefficients of
    :data:`POLAR_EXPRESS` (the first seven divided by
    :math:`(1.01, 1.01^3, 1.01^5)`, iterations past the eighth reusing it):

    .. math::

      \begin{align*}
        x_0 &= X \,/\, (1.01\, \|X\|_F) \\
        x_{k+1} &= a_k x_k + b_k (x_k x_k^\top) x_k + c_k (x_k x_k^\top)^2 x_k
      \end{align*}

    computed as :math:`s = x x^\top`, :math:`y = c s + b I`,
    :math:`y \leftarrow y s + a I`, :math:`x \leftarrow y x`. Non-finite values
    of the result become finite (``nan_to_num``); a zero matrix maps to zero,
    with a zero gradient.

    Args:
      x: A matrix ``[m, n]`` in either orientation, or a stack ``[..., m, n]`` of
        matrices of one shape (each is signed on its own).
      steps: Number of iterations (static); 10 reach the polar factor of a
        well-conditioned matrix to rounding in float64.
      dtype: The dtype of the iterations (static): ``jnp.float32`` (default),
        ``jnp.bfloat16`` (the original code's choice, for accelerators with
        bfloat16 matrix units; no faster on CPU; singular values only within
        about 4e-3 of 1) or ``jnp.float64``. The
        normalisation is taken in at least float32; float32 and float64
        products run at full precision on every backend.

    Returns:
      An array like ``x`` (same shape and dtype).

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> x = jnp.array([[3.0, 0.0], [0.0, 0.5], [0.0, 0.0]])
      >>> riemax.msign(x).round(4)
      Array([[1., 0.],
             [0., 1.],
             [0., 0.]], dtype=float32)
      >>> riemax.msign(jnp.zeros((2, 3)))
      Array([[0., 0., 0.],
             [0., 0., 0.]], dtype=float32)

    References:
      Amsel, Persson, Musco and Gower, `The Polar Express: optimal matrix sign
      methods and their application to the Muon algorithm
      <https://arxiv.org/abs/2505.16932>`_, 2025
    """
    owner = "msign"
    steps = _check_steps(owner, "steps", steps)
    dt = _check_dtype(owner, "dtype", dtype)
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"riemax.msign: x must be a matrix or a stack of matrices, got shape "
            f"{tuple(x.shape)}."
        )
    if 0 in x.shape:
        raise ValueError(f"riemax.msign: x has a zero-size axis: {tuple(x.shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return msign_matrix(x, steps, dt)


def matrix_view(w: jax.Array) -> tuple[jax.Array, bool]:
    """The Flax kernel ``w`` (``[..., out]``) as the tall matrix of manifold Muon:
    ``w.reshape(-1, out)``, transposed when it has fewer rows than columns.
    Returns the matrix and whether it was transposed."""
    m = w.reshape(-1, w.shape[-1])
    if m.shape[0] < m.shape[1]:
        return m.T, True
    return m, False


def from_matrix_view(
    m: jax.Array, transposed: bool, shape: tuple[int, ...]
) -> jax.Array:
    """The inverse of :func:`matrix_view`."""
    return (m.T if transposed else m).reshape(shape)


def polar_retraction(x: jax.Array, *, steps: int = 10, dtype: Any = None) -> jax.Array:
    r"""The polar retraction of a kernel onto the Stiefel manifold:
    :math:`\mathrm{msign}(M)` of its matrix view :math:`M` = ``x.reshape(-1, out)``,
    reshaped back.

    Retracting from a point :math:`W` along a step :math:`D` is
    ``polar_retraction(W + D)``; manifold Muon takes :math:`D = -\eta A`. The
    matrix view may be tall or wide (the polar factor of the transpose is the
    transpose of the polar factor): a tall one gets orthonormal columns, a wide
    one orthonormal rows.

    Args:
      x: A kernel in Flax layout (at least two axes).
      steps: Iterations of :func:`msign` (static).
      dtype: Dtype of the :func:`msign` iterations (static); ``None``: the dtype
        of ``x`` promoted to at least float32.

    Returns:
      An array of the shape and dtype of ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax._msign import polar_retraction
      >>> w, d = jnp.eye(3, 2), jnp.array([[0.0, 0.1], [-0.1, 0.0], [0.0, 0.0]])
      >>> p = polar_retraction(w + d)  # w + d, rescaled onto the manifold
      >>> (p.T @ p).round(6)
      Array([[1., 0.],
             [0., 1.]], dtype=float32)
      >>> round(float(p[0, 1]), 6)  # sin(atan(0.1)): turned by atan(0.1)
      0.099504
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"riemax.polar_retraction: x must be a kernel with at least 2 axes, got "
            f"shape {tuple(x.shape)}."
        )
    steps = _check_steps("polar_retraction", "steps", steps)
    if dtype is None:
        dt = acc_dtype(x.dtype)
    else:
        dt = _check_dtype("polar_retraction", "dtype", dtype)
    m = x.reshape(-1, x.shape[-1])
    return msign_matrix(m, steps, dt).reshape(x.shape).astype(x.dtype)
