r"""The orthogonality regulariser of Cho & Lee (2017) and the unit-norm initialiser.

:func:`ortho_penalty` adds the gradient of
:math:`\tfrac12\,\omega\,\|M^\top M - I\|_F^2` of each kernel inside the
optimizer (in front of :func:`riemax.grassmann_project`);
:func:`orthogonality_loss` is the same term to add to a loss; :func:`unit_init`
draws kernels whose units have norm 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from riemax import _checks as checks
from riemax import _sphere as sphere
from riemax._gram import Batched
from riemax._leafmap import stateless, unit_of_program
from riemax._numerics import acc_dtype, safe_div, to_acc


def ortho_penalty(
    omega: float, *, at: str = "unit", unit_eps: float = 1e-8
) -> optax.GradientTransformation:
    r"""Adds the gradient of the orthogonality regulariser of each kernel.

    With :math:`M` the ``(n, out)`` matrix whose columns are the units:

    .. math::

      R(M) = \tfrac12\,\omega\,\|M^\top M - I\|_F^2, \qquad
      \nabla R = 2\omega\,\bigl(M (M^\top M) - M\bigr)

    With ``at="unit"`` the regulariser is :math:`R(\mathrm{unit}(W))`, evaluated
    at the unit vectors (the PyTorch original, inside the optimizer); its
    gradient with respect to ``w`` is :math:`\nabla R(Y) / \|w_j\|` up to a radial
    part that :func:`grassmann_project` removes, which keeps SGD-G and Adam-G
    invariant to the scale of ``w`` (on unit-norm kernels the factor is 1, as in
    the original). With ``at="param"`` it is :math:`R(W)` at the raw kernel (the
    TensorFlow original, which adds :math:`R` to the loss; see
    :func:`orthogonality_loss`). The two agree to ~1e-11 on unit-norm kernels.

    Args:
      omega: Strength :math:`\omega`; ``0.0`` disables the term.
      at: ``"unit"`` or ``"param"``, see above.
        Static under :func:`optax.inject_hyperparams`.
      unit_eps: :math:`\epsilon_u` of ``unit(w)`` for ``at="unit"``.

    Returns:
      A stateless :class:`optax.GradientTransformation`; needs ``params``. Place it
      before :func:`grassmann_project`.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = jnp.array([[1.0, 1.0], [0.0, 0.0]])
      >>> tx = riemax.ortho_penalty(0.5, at="param")
      >>> tx.update(jnp.zeros_like(w), tx.init(w), w)[0]
      Array([[1., 1.],
             [0., 0.]], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017 (section 3.4)
    """
    checks.check_choice("ortho_penalty", "at", at, ("unit", "param"))
    checks.check_number("ortho_penalty", "omega", omega)
    checks.check_unit_eps("ortho_penalty", unit_eps)
    if isinstance(omega, (int, float)) and omega == 0:
        return optax.identity()

    def leaf(g, w):
        if at == "param":
            return g + omega * sphere.gram_residual_grad(to_acc(w))
        y, w_norm = yield from unit_of_program(w, unit_eps)
        # 1 / |w| once for the units of every kernel, not once per kernel.
        inverse = yield Batched(_reciprocal, w_norm, w_norm.shape)
        return g + (omega * sphere.gram_residual_grad(y)) * inverse

    return stateless("ortho_penalty", leaf)


def _reciprocal(x: jax.Array) -> jax.Array:
    return safe_div(1.0, x)


def orthogonality_loss(params: Any, omega: float, labels: Any = None) -> jax.Array:
    r"""The orthogonality regulariser summed over kernels, to add to a loss.

    .. math::

      \sum_W \tfrac12\,\omega\,\|M(W)^\top M(W) - I\|_F^2

    Args:
      params: A parameter tree.
      omega: Strength :math:`\omega`.
      labels: Optional label tree (or callable of ``params``) with values
        ``"manifold"``/``"euclidean"``; only manifold leaves are counted. Without
        labels every leaf of rank >= 2 is counted.

    Returns:
      A scalar (float32 or wider).

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> riemax.orthogonality_loss({"conv": {"kernel": 2 * jnp.eye(2)}}, 0.1)
      Array(0.90000004, dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017 (section 3.4)
    """
    from riemax._labels import MANIFOLD, check_labels

    checks.check_number("orthogonality_loss", "omega", omega)
    if labels is None:
        keep = jax.tree.map(lambda p: p.ndim >= 2, params)
    else:
        keep = jax.tree.map(lambda lab: lab == MANIFOLD, check_labels(params, labels))
    terms = jax.tree.map(
        lambda p, k: sphere.gram_residual(to_acc(p)) if k else jnp.zeros([]),
        params,
        keep,
    )
    return omega * sum(jax.tree.leaves(terms), jnp.zeros([]))


def unit_init(unit_eps: float = 1e-8) -> Callable[..., jax.Array]:
    r"""A Flax ``kernel_init`` that draws unit-norm units.

    Each unit is drawn from a standard normal truncated to :math:`\pm 2`
    (values outside are resampled) and then normalized:
    :math:`w_j / (\|w_j\| + \epsilon_u)`.

    Args:
      unit_eps: :math:`\epsilon_u`; the original keeps 1e-8 (norm ``1 - 1e-8``).

    Returns:
      An initializer ``init(key, shape, dtype=float32)`` for shapes of rank >= 2
      and floating dtypes.

    Examples:
      >>> import jax, jax.numpy as jnp, riemax
      >>> w = riemax.unit_init()(jax.random.key(0), (3, 3, 16, 8))
      >>> jnp.linalg.norm(w.reshape(-1, 8), axis=0).round(6)
      Array([1., 1., 1., 1., 1., 1., 1., 1.], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017
    """
    checks.check_unit_eps("unit_init", unit_eps)

    def init(key, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        shape = tuple(shape)
        if len(shape) < 2 or 0 in shape:
            raise ValueError(
                f"riemax.unit_init: shape {shape} has no units; it needs at least 2 "
                "axes, none of size 0."
            )
        checks.check_dtype("unit_init", "dtype", dtype)
        w = jax.random.truncated_normal(key, -2.0, 2.0, shape, acc_dtype(dtype))
        return sphere.unit(w, unit_eps).astype(dtype)

    return init
