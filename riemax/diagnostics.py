r"""Per-unit measurements of kernels: norms, angles, effective step, orthogonality.

A *unit* is one output unit of a kernel in Flax layout, the slice ``w[..., j]``
over all axes but the last (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``). For a
BatchNorm-fed kernel the loss depends only on the direction of each unit, so what
an optimizer does to it is best read as an *angle*: how far each unit turned in a
step, and how that relates to the learning rate and the norm of the unit.

Every function takes parameter trees and returns a tree of the same structure.
Floating leaves with at least two axes (kernels) give an array; every other leaf
(biases, BatchNorm scales, integer counters) gives ``None``. Reductions run in at
least float32, and a unit that is exactly zero gives a finite value (documented
per function) with finite gradients, never NaN. The functions are pure and can be
called inside :func:`jax.jit`; :func:`summary` turns any of the trees into a flat
dict of scalars for logging.

Examples:
  >>> import jax, jax.numpy as jnp, optax, riemax
  >>> from riemax import diagnostics
  >>> w = riemax.unit_init()(jax.random.key(0), (3, 3, 8, 4))
  >>> tx = riemax.sgdg(0.1)
  >>> updates, _ = tx.update(jnp.ones_like(w), tx.init(w), w)
  >>> new = optax.apply_updates(w, updates)
  >>> moved = diagnostics.summary(diagnostics.angles_moved(w, new))
  >>> sorted(moved), bool(moved["max"] <= 0.1 * 0.1 + 1e-6)  # lr * grad_clip
  (['max', 'mean', 'min'], True)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from riemax._gram import norm
from riemax._numerics import safe_div, safe_sqrt, to_acc, unit_axes
from riemax._sphere import gram_residual

__all__ = [
    "angles_moved",
    "effective_learning_rate",
    "norm_drift",
    "orthogonality_error",
    "summary",
    "unit_norms",
]


def _is_kernel(leaf: Any) -> bool:
    return (
        hasattr(leaf, "ndim")
        and leaf.ndim >= 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)
    )


def _map_kernels(fn, tree: Any, *rest: Any) -> Any:
    """``fn`` on every kernel leaf (with the matching leaves of ``rest``), else None."""
    return jax.tree.map(
        lambda leaf, *others: fn(leaf, *others) if _is_kernel(leaf) else None,
        tree,
        *rest,
    )


def _norms(w: jax.Array) -> jax.Array:
    """Per-unit norms, shape ``(1, ..., 1, units)``, in the accumulation dtype."""
    return norm(to_acc(w), unit_axes(w.ndim))


def unit_norms(params: Any) -> Any:
    r"""The norm of every unit of every kernel: :math:`\|w_j\|`.

    Args:
      params: A parameter tree.

    Returns:
      A tree like ``params``: for a kernel of shape ``(..., units)`` an array of
      shape ``(units,)`` (float32 or wider), ``None`` for other leaves.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import diagnostics
      >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 2.0]]), "bias": jnp.ones(2)}
      >>> diagnostics.unit_norms(params)
      {'bias': None, 'kernel': Array([5., 2.], dtype=float32)}
    """
    return _map_kernels(lambda w: _norms(w).reshape(-1), params)


def norm_drift(params: Any) -> Any:
    r"""How far every unit is from the unit sphere: :math:`|\|w_j\| - 1|`.

    Under SGD-G and Adam-G every unit stays at norm :math:`1 - \epsilon_u`, so the
    drift is the accumulated rounding error (about 1e-7 in float32); under
    Euclidean optimizers it is the growth or shrinkage of the unit. Take its
    ``"max"`` from :func:`summary` for the worst unit.

    Args:
      params: A parameter tree.

    Returns:
      A tree like ``params`` with one value per unit (shape ``(units,)``) for
      kernels, ``None`` elsewhere. A zero unit has drift 1.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import diagnostics
      >>> diagnostics.norm_drift({"kernel": jnp.array([[3.0, 0.0], [4.0, 0.5]])})
      {'kernel': Array([4. , 0.5], dtype=float32)}
    """
    return _map_kernels(lambda w: jnp.abs(_norms(w).reshape(-1) - 1), params)


def _angle(old: jax.Array, new: jax.Array) -> jax.Array:
    axes = unit_axes(old.ndim)
    a, b = to_acc(old), to_acc(new)
    na, nb = norm(a, axes), norm(b, axes)
    a, b = safe_div(a, na), safe_div(b, nb)
    live = (na > 0) & (nb > 0)
    chord, sum_ = norm(a - b, axes), norm(a + b, axes)
    # Both zero only where a unit is zero; substitute a safe point before atan2
    # so that its gradient stays finite there.
    angle = 2 * jnp.arctan2(jnp.where(live, chord, 0), jnp.where(live, sum_, 1))
    return jnp.where(live, angle, 0).reshape(-1)


def angles_moved(old: Any, new: Any) -> Any:
    r"""The angle every unit turned between two parameter trees, in radians.

    With :math:`a = \mathrm{old}_j / \|\mathrm{old}_j\|` and
    :math:`b = \mathrm{new}_j / \|\mathrm{new}_j\|`:

    .. math::

      \theta_j = 2 \operatorname{atan2}\bigl(\|a - b\|,\ \|a + b\|\bigr)
        \in [0, \pi]

    This is exact to rounding for tiny angles too (where ``arccos`` of the inner
    product loses half the digits) and does not depend on the norms. Between the
    params before and after one step it is the angular step of every unit; for an
    SGD-G step it equals the length of the tangent step.

    Args:
      old: A parameter tree.
      new: A parameter tree of the same structure and shapes.

    Returns:
      A tree like ``old`` with one angle per unit (shape ``(units,)``) for kernels,
      ``None`` elsewhere. A unit that is zero in either tree has no direction and
      gives 0 (with zero gradient).

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import diagnostics
      >>> old = {"kernel": jnp.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])}
      >>> new = {"kernel": jnp.array([[1.0, 0.0, 1.0], [1.0, 5.0, 0.0]])}
      >>> (diagnostics.angles_moved(old, new)["kernel"] / jnp.pi).round(6)  # 1/4, 1/2
      Array([0.25, 0.5 , 0.  ], dtype=float32)
    """
    return _map_kernels(_angle, old, new)


def effective_learning_rate(
    params: Any, grads: Any, learning_rate: jax.typing.ArrayLike
) -> Any:
    r"""The angle per step that Euclidean SGD gives each unit of a kernel.

    For a loss that is invariant to the scale of each unit, the gradient is
    orthogonal to the unit and shrinks as the unit grows
    (:math:`\nabla L(c w) = \nabla L(w) / c`). A plain SGD step
    :math:`w_j - \eta g_j` then turns the unit by
    :math:`\arctan(\eta \|g_j\| / \|w_j\|)`, to first order

    .. math::

      \eta_{\mathrm{eff}, j} = \eta\, \frac{\|g_j\|}{\|w_j\|}

    so the same :math:`\eta` takes smaller and smaller angular steps as the norms
    grow (:math:`\propto 1/\|w_j\|^2` along the same direction). Riemannian
    optimizers control this angle directly.

    Args:
      params: A parameter tree.
      grads: The gradient tree (same structure).
      learning_rate: :math:`\eta`, a scalar (may be traced).

    Returns:
      A tree like ``params`` with one value per unit (shape ``(units,)``) for
      kernels, ``None`` elsewhere. A zero unit gives 0 (it has no direction to
      turn).

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import diagnostics
      >>> w = {"kernel": jnp.array([[2.0, 0.0], [0.0, 0.0]])}
      >>> g = {"kernel": jnp.array([[0.0, 1.0], [3.0, 1.0]])}
      >>> diagnostics.effective_learning_rate(w, g, 0.1)["kernel"]
      Array([0.15, 0.  ], dtype=float32)
    """

    def leaf(w, g):
        ratio = safe_div(_norms(g), _norms(w)).reshape(-1)
        return jnp.asarray(learning_rate, ratio.dtype) * ratio

    return _map_kernels(leaf, params, grads)


def orthogonality_error(params: Any) -> Any:
    r"""How far the units of each kernel are from orthonormal.

    With :math:`M` the ``(n, units)`` matrix whose columns are the units
    (``w.reshape(-1, units)``):

    .. math::

      e(W) = \|M^\top M - I\|_F

    It is 0 exactly when the units are orthonormal, which is possible only for
    ``n >= units``; :func:`riemax.ortho_penalty` with strength :math:`\omega`
    adds the gradient of :math:`\tfrac12 \omega\, e(W)^2`. Units of norm
    :math:`\neq 1` count in the diagonal: measure :func:`riemax.sphere.unit`
    of the kernel for the angles between units only.

    Args:
      params: A parameter tree.

    Returns:
      A tree like ``params`` with a scalar (float32 or wider) for every kernel,
      ``None`` elsewhere. Its gradient is finite at 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import diagnostics
      >>> s = 0.5 ** 0.5
      >>> params = {"a": jnp.eye(3, 2), "b": jnp.array([[1.0, s], [0.0, s]])}
      >>> err = diagnostics.orthogonality_error(params)
      >>> float(err["a"]), round(float(err["b"]), 6)  # <b_0, b_1> = s, twice
      (0.0, 1.0)
    """
    return _map_kernels(lambda w: safe_sqrt(2 * gram_residual(to_acc(w))), params)


def _is_none(x: Any) -> bool:
    return x is None


def _stats(values: list[jax.Array], prefix: str) -> dict[str, jax.Array]:
    values = [to_acc(v).ravel() for v in values if v.size]
    if not values:
        return {}
    count = sum(v.size for v in values)
    total = jnp.sum(jnp.stack([jnp.sum(v) for v in values]))
    return {
        f"{prefix}mean": total / count,
        f"{prefix}min": jnp.min(jnp.stack([jnp.min(v) for v in values])),
        f"{prefix}max": jnp.max(jnp.stack([jnp.max(v) for v in values])),
    }


def summary(tree: Any, labels: Any = None, prefix: str = "") -> dict[str, jax.Array]:
    r"""Mean, min and max of a diagnostic tree, as a flat dict of scalars to log.

    The statistics run over every value of every non-``None`` leaf together: over
    all units for the per-unit diagnostics, over all kernels for
    :func:`orthogonality_error`. The mean weights every value equally (a wide
    kernel counts more than a narrow one). With ``labels``, the same statistics
    are also given for the leaves of each label.

    Args:
      tree: A tree returned by a function of this module.
      labels: Optional tree with the structure of the params the diagnostic was
        computed from, with string leaves, e.g. the ``"manifold"``/``"euclidean"``
        tree of :func:`riemax.labels_from_model` or of a label function applied
        to the params. Strings are not arrays: inside :func:`jax.jit`, close over
        the labels (or pass them as a static argument).
      prefix: Prepended to every key.

    Returns:
      A dict with keys ``prefix + "mean"``, ``"min"``, ``"max"`` and, for every
      label, ``prefix + label + "_mean"``, ``"_min"``, ``"_max"``. Values are
      scalar arrays (float32 or wider); use :func:`jax.device_get` and ``float``
      to log them. A label (or a tree) without kernels gives no keys.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax import diagnostics
      >>> params = {"conv": jnp.ones((4, 2)), "fc": 3 * jnp.ones((4, 1)),
      ...           "bias": jnp.zeros(3)}
      >>> labels = {"conv": "manifold", "fc": "euclidean", "bias": "euclidean"}
      >>> stats = diagnostics.summary(diagnostics.unit_norms(params), labels, "norm_")
      >>> {k: float(v) for k, v in stats.items()}  # doctest: +NORMALIZE_WHITESPACE
      {'norm_mean': 3.3333332538604736, 'norm_min': 2.0, 'norm_max': 6.0,
       'norm_manifold_mean': 2.0, 'norm_manifold_min': 2.0,
       'norm_manifold_max': 2.0, 'norm_euclidean_mean': 6.0,
       'norm_euclidean_min': 6.0, 'norm_euclidean_max': 6.0}
    """
    leaves, structure = jax.tree.flatten(tree, is_leaf=_is_none)
    out = _stats([v for v in leaves if v is not None], prefix)
    if labels is None:
        return out
    names, label_structure = jax.tree.flatten(labels)
    if label_structure != structure:  # type: ignore[operator]  # no PyTreeDef stub
        raise ValueError(
            "summary: labels must have the structure of the params the diagnostic "
            f"was computed from; got {label_structure} for {structure}."
        )
    groups: dict[str, list[jax.Array]] = {}
    for name, value in zip(names, leaves, strict=True):
        if value is not None:
            groups.setdefault(str(name), []).append(value)
    for name, values in groups.items():
        out |= _stats(values, f"{prefix}{name}_")
    return out
