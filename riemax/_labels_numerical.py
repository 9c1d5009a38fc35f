"""Numerical label detection: measure, once, whether the loss is invariant to
rescaling each unit of a kernel."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from riemax._labels import EUCLIDEAN, MANIFOLD
from riemax._numerics import acc_dtype, unit_axes
from riemax._tree import path_str

#: "Invariant only as a whole tensor" needs per-unit deviations this many times
#: larger than the whole-tensor ones; "nearly invariant" deviations are at most
#: this many tolerances.
_GAP, _NEAR = 10.0, 30.0


def _tolerance(dtype: Any) -> float:
    r"""Default relative tolerance of the invariance tests for ``dtype``.

    :math:`\max(\sqrt{\epsilon_\mathrm{dtype}}, 10^{-3})`: the square root of the
    machine epsilon covers the rounding of a loss and its gradient, and the floor
    covers BatchNorm's own :math:`\varepsilon` (1e-5), which breaks the invariance
    by a relative :math:`\varepsilon/\sigma^2` for a pre-BN variance
    :math:`\sigma^2`.
    """
    return max(float(jnp.finfo(dtype).eps) ** 0.5, 1e-3)


def _unit_stats(g: jax.Array, w: jax.Array) -> tuple[jax.Array, ...]:
    """Per-unit ``<g_j, w_j>``, ``|g_j|^2`` and ``|w_j|^2`` (all axes but the last)."""
    axes = unit_axes(w.ndim)
    return (
        jnp.sum(g * w, axis=axes),
        jnp.sum(g * g, axis=axes),
        jnp.sum(w * w, axis=axes),
    )


def labels_by_invariance(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    alphas: Sequence[float] = (0.5, 2.0),
    rtol: float | None = None,
    seed: int = 0,
    return_details: bool = False,
) -> Any:
    r"""Labels each kernel by measuring whether the loss is invariant per unit.

    For every floating leaf ``w`` with at least two axes (units ``w_j = w[..., j]``)
    and ``g = \nabla_w L``, it measures

    .. math::

      c = \max_j \frac{|\langle g_j, w_j\rangle|}{\|g_j\| \|w_j\|}, \qquad
      \delta = \max_{s} \frac{|L(s \odot w) - L(w)|}{|L(w)|},

    where the scalings ``s`` are every ``alpha`` applied to all units at once and,
    for every ``alpha``, per-unit random factors
    :math:`\alpha^{u_j}, u_j \sim U[-1, 1]` (so that invariance to scaling each
    unit separately is tested, not only invariance to scaling the whole tensor:
    Dense → LayerNorm is invariant to the latter only). The leaf is
    ``"manifold"`` iff :math:`c \le` ``rtol`` and :math:`\delta \le` ``rtol`` (and
    its gradient is not identically zero). Other leaves are ``"euclidean"``.

    Run it once, outside the training step, on a representative batch, with
    BatchNorm in training mode (batch statistics) inside ``loss_fn``. It costs one
    gradient and ``2 * len(alphas)`` extra losses per kernel, evaluated one after
    the other by :func:`jax.lax.map` over a table of per-leaf factors (two
    compilations in all, whatever the number of kernels). Leaves in
    bfloat16/float16 are measured in float32. A positively homogeneous activation
    between a bias-free layer and its BatchNorm (ReLU) keeps the invariance, so
    this detects more than :func:`labels_from_model`.

    For an NNX model, split off everything but the params *as pure arrays*, so
    that the BatchNorm statistics can be updated inside the traced loss::

      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      rest = nnx.as_pure(rest)
      def loss_fn(params, batch):
          logits = nnx.merge(graphdef, params, rest)(batch["x"])
          return optax.softmax_cross_entropy_with_integer_labels(
              logits, batch["y"]).mean()
      labels = riemax.labels_by_invariance(loss_fn, nnx.as_pure(params), batch)

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: The parameter tree (a pure ``nnx.State`` works).
      batch: The batch passed to ``loss_fn``.
      alphas: Positive scale factors to test.
      rtol: Relative tolerance of both tests; by default
        :math:`\max(\sqrt{\epsilon}, 10^{-3})` for the (promoted) dtype of each
        leaf. Raise it if the pre-BatchNorm activations have a tiny variance.
      seed: Seed of the per-unit random factors.
      return_details: If true, also return a dict ``path -> details`` with the
        measured ``max_cosine`` (:math:`c`), ``whole_cosine`` (the same for the
        whole tensor), ``max_loss_change`` (:math:`\delta`), ``tolerance`` and a
        ``reason`` string, for :func:`label_report`.

    Returns:
      A label tree with the structure of ``params`` (and the details if asked).

    Examples:
      >>> import jax, jax.numpy as jnp, riemax
      >>> def loss_fn(params, x):
      ...     y = x @ params["w"]
      ...     y = (y - y.mean(0)) / jnp.sqrt(y.var(0) + 1e-5)  # BatchNorm
      ...     return jnp.mean(jnp.tanh(y @ params["head"]) ** 2)
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params = {"w": jax.random.normal(k1, (5, 4)),
      ...           "head": jax.random.normal(k2, (4, 3))}
      >>> riemax.labels_by_invariance(loss_fn, params, jax.random.normal(k3, (16, 5)))
      {'head': 'euclidean', 'w': 'manifold'}
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [path_str(path) for path, _ in flat]
    leaves = []
    for _, leaf in flat:
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            leaf = leaf.astype(acc_dtype(leaf.dtype))
        leaves.append(leaf)
    tested = [
        i
        for i, leaf in enumerate(leaves)
        if leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    alphas_np = np.asarray(alphas, dtype=np.float64)
    if alphas_np.ndim != 1 or not np.all((alphas_np > 0) & np.isfinite(alphas_np)):
        raise ValueError(f"alphas must be positive numbers, got {alphas!r}")
    log_alphas = np.log(alphas_np)
    # One test row per (kernel, scaling): factors are 1 on every other leaf, so
    # a single compiled loss is mapped over all rows.
    rng = np.random.default_rng(seed)
    n_rows = 2 * len(log_alphas)
    factors: list[np.ndarray | None] = [None] * len(leaves)
    for k, i in enumerate(tested):
        units = leaves[i].shape[-1]
        u = rng.uniform(-1.0, 1.0, size=(len(log_alphas), units))
        logs = log_alphas[:, None]
        rows = np.exp(np.concatenate([np.broadcast_to(logs, u.shape), logs * u]))
        f = np.ones((n_rows * len(tested), units))
        f[k * n_rows : (k + 1) * n_rows] = rows
        factors[i] = f.astype(leaves[i].dtype)

    def loss_of(leaves, batch):
        return loss_fn(jax.tree_util.tree_unflatten(treedef, leaves), batch)

    @jax.jit
    def measure(leaves, factors, batch):
        loss, grads = jax.value_and_grad(loss_of)(leaves, batch)
        stats = [
            None if f is None else _unit_stats(g, w)
            for f, g, w in zip(factors, grads, leaves, strict=False)
        ]

        def scaled_loss(fs):
            scaled = [
                w if f is None else w * f for w, f in zip(leaves, fs, strict=True)
            ]
            return loss_of(scaled, batch)

        if not tested:
            return loss, stats, jnp.zeros((0,), loss.dtype)
        return loss, stats, jax.lax.map(scaled_loss, factors)

    loss, stats, all_losses = jax.device_get(measure(leaves, factors, batch))
    loss = float(loss)
    labels: list[str] = []
    details: dict[str, Any] = {}
    n_uniform = len(log_alphas)
    for i, (name, leaf) in enumerate(zip(names, leaves, strict=False)):
        if factors[i] is None:
            labels.append(EUCLIDEAN)
            why = (
                "not floating point"
                if not jnp.issubdtype(leaf.dtype, jnp.floating)
                else "not a kernel (ndim < 2)"
            )
            details[name] = {"reason": why}
            continue
        inner, g2, w2 = (np.asarray(a, np.float64) for a in stats[i])
        k = tested.index(i)
        losses = np.asarray(all_losses, np.float64)[k * n_rows : (k + 1) * n_rows]
        tol = _tolerance(leaf.dtype) if rtol is None else float(rtol)
        denom = np.sqrt(g2 * w2)
        cos = np.where(denom > 0, np.abs(inner) / np.where(denom > 0, denom, 1), 0.0)
        whole_denom = np.sqrt(g2.sum() * w2.sum())
        whole = abs(inner.sum()) / whole_denom if whole_denom > 0 else 0.0
        change = np.abs(losses - loss) / max(abs(loss), np.finfo(np.float64).tiny)
        max_cos, max_change = float(cos.max()), float(change.max())
        uniform_change = float(change[:n_uniform].max())
        # Whole-tensor vs per-unit deviations: LayerNorm-like kernels are invariant
        # to the first only; BatchNorm-fed kernels whose invariance BN's epsilon
        # breaks slightly deviate by the same small amount under both.
        whole_dev = max(float(whole), uniform_change)
        per_unit_dev = max(max_cos, float(change[n_uniform:].max()))
        measured = f"max|<g,w>|/(|g||w|)={max_cos:.1e}, max|dL|/|L|={max_change:.1e}"
        finite = np.all(np.isfinite([loss, *inner, *g2, *losses]))
        if not finite:
            label, why = EUCLIDEAN, "loss or gradient not finite"
        elif not np.any(g2 > 0):
            label, why = EUCLIDEAN, "zero gradient on this batch: cannot tell"
        elif max_cos <= tol and max_change <= tol:
            label, why = MANIFOLD, f"invariant: {measured}"
        elif whole_dev <= tol and per_unit_dev > _GAP * max(whole_dev, tol):
            label, why = (
                EUCLIDEAN,
                (
                    "invariant only as a whole tensor, not per unit (e.g. LayerNorm): "
                    f"whole-tensor deviation {whole_dev:.1e}, per-unit {measured}"
                ),
            )
        elif max(max_cos, max_change) <= _NEAR * tol:
            label, why = (
                EUCLIDEAN,
                (
                    f"nearly invariant per unit, above the tolerance {tol:.1e} (e.g. "
                    "BatchNorm's epsilon with small pre-BN variances; pass a larger "
                    f"rtol to accept): {measured}"
                ),
            )
        else:
            label, why = EUCLIDEAN, f"not invariant: {measured}"
        labels.append(label)
        details[name] = {
            "reason": why,
            "max_cosine": max_cos,
            "whole_cosine": float(whole),
            "max_loss_change": max_change,
            "tolerance": tol,
        }
    tree = jax.tree_util.tree_unflatten(treedef, labels)
    return (tree, details) if return_details else tree
