"""Equi-normalization (ENorm) of a chain of consecutive layers.

ENorm (Stock et al., 2019) exploits the positive homogeneity of ReLU networks:
multiplying the weights that produce a hidden unit by ``s > 0`` and the weights that
read it by ``1/s`` leaves a bias-free ReLU/max-pool network unchanged. One ENorm cycle
chooses these per-unit scales layer by layer so that every balanced unit's outgoing
norm equals ``c`` times its incoming norm. It is not a gradient transformation: it
rewrites the parameters of *consecutive* layers and the optimizer's momentum, and is
applied right after :func:`optax.apply_updates`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from riemax._numerics import acc_dtype, per_unit, pnorm, safe_div
from riemax._tree import path_str

__all__ = ["apply_enorm", "enorm_cycle"]

# (s, 1/s) for the hidden units between W_{i-1} and W_i, i = 1, ..., L-2.
_Scales = list[tuple[jax.Array, jax.Array]]
# Momentum buffers or biases aligned with the kernels (None: nothing at that layer).
_Buffers = list[jax.Array | None]


# ---------------------------------------------------------------------------------
# Per-unit norms and balancers (zero-safe in values and gradients).
# ---------------------------------------------------------------------------------


def _in_norm(w: jax.Array, p: float) -> jax.Array:
    """Incoming norm of each unit produced by ``w``: over all axes but the last."""
    return pnorm(w, tuple(range(w.ndim - 1)), p)


def _out_norm(w: jax.Array, p: float) -> jax.Array:
    """Outgoing norm of each input unit read by ``w``: over all axes but axis -2."""
    return pnorm(w, tuple(range(w.ndim - 2)) + (w.ndim - 1,), p)


def _balancer(a: jax.Array, b: jax.Array, c: ArrayLike) -> jax.Array:
    """``s = (b / (c a))^0.5``; ``s = 1`` where that ratio is zero or non-finite.

    A zero incoming (``a``) or outgoing (``b``) norm, or a non-finite one, leaves
    the unit unscaled. Both ``where`` branches are finite, so are the gradients.
    """
    ratio = safe_div(b, c * a)  # 0 where a == 0
    ok = jnp.isfinite(ratio) & (ratio > 0)
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, ratio, 1)), 1).astype(ratio.dtype)


def _scale_last(x: jax.Array, f: jax.Array) -> jax.Array:
    """``x[..., j] * f[j]``, computed in >= float32 and cast back to ``x.dtype``."""
    acc = jnp.promote_types(acc_dtype(x.dtype), f.dtype)
    return (x.astype(acc) * f).astype(x.dtype)


def _scale_rows(x: jax.Array, f: jax.Array) -> jax.Array:
    """``x[..., j, :] * f[j]``, computed in >= float32 and cast back to ``x.dtype``."""
    acc = jnp.promote_types(acc_dtype(x.dtype), f.dtype)
    return (x.astype(acc) * f[:, None]).astype(x.dtype)


# ---------------------------------------------------------------------------------
# The cycle.
# ---------------------------------------------------------------------------------


def _layer_name(k: int, names: Sequence[str] | None) -> str:
    return f"layer {k} ({names[k]!r})" if names is not None else f"layer {k}"


def _check_chain(kernels: Sequence[jax.Array], names: Sequence[str] | None) -> None:
    for k, w in enumerate(kernels):
        if w.ndim < 2:
            raise ValueError(
                f"ENorm: {_layer_name(k, names)} has shape {tuple(w.shape)}; a kernel "
                "needs at least 2 axes (dense (in, out), conv (kh, kw, in, out))."
            )
    for k in range(len(kernels) - 1):
        w, v = kernels[k], kernels[k + 1]
        if w.shape[-1] != v.shape[-2]:
            raise ValueError(
                f"ENorm: width mismatch between {_layer_name(k, names)} with shape "
                f"{tuple(w.shape)} and {_layer_name(k + 1, names)} with shape "
                f"{tuple(v.shape)}: the outputs of one ({w.shape[-1]}, last axis) "
                f"must be the inputs of the next ({v.shape[-2]}, axis -2)."
            )


def _check_aligned(
    what: str,
    trees: Sequence[jax.Array | None],
    kernels: Sequence[jax.Array],
    full_shape: bool,
) -> None:
    if len(trees) != len(kernels):
        raise ValueError(
            f"ENorm: got {len(trees)} {what} for {len(kernels)} kernels; pass one "
            "entry (or None) per kernel."
        )
    for k, (x, w) in enumerate(zip(trees, kernels, strict=True)):
        if x is None:
            continue
        bad = x.shape != w.shape if full_shape else x.shape[-1:] != w.shape[-1:]
        if bad:
            raise ValueError(
                f"ENorm: {what} entry {k} has shape {tuple(x.shape)}, incompatible "
                f"with kernel {k} of shape {tuple(w.shape)}."
            )


def _balance(
    kernels: Sequence[jax.Array],
    c: ArrayLike,
    p: float,
    stale_norms: bool,
) -> tuple[list[jax.Array], _Scales]:
    """Rescales the kernels of a checked chain; returns them and the (s, 1/s) list."""
    ws = list(kernels)
    n_layers = len(ws)
    scales: _Scales = []
    if n_layers < 3:
        return ws, scales
    a = _in_norm(ws[0], p)
    b = _out_norm(ws[1], p)
    for i in range(1, n_layers - 1):
        s = _balancer(a, b, c)
        s, r = per_unit(s, 1.0 / s)  # once per unit, not once per kernel element
        more = i + 1 < n_layers - 1
        if more:
            b = _out_norm(ws[i + 1], p)
            if stale_norms:
                a = _in_norm(ws[i], p)  # read before W_i is rescaled below
        ws[i - 1] = _scale_last(ws[i - 1], s)
        ws[i] = _scale_rows(ws[i], r)
        if more and not stale_norms:
            a = _in_norm(ws[i], p)  # exact block-coordinate step: read after
        scales.append((s, r))
    return ws, scales


def _rescale_inverse(buffers: Sequence[jax.Array | None], scales: _Scales) -> _Buffers:
    """Momentum rule: ``B_{i-1}[..., j] *= 1/s_j`` and ``B_i[..., j, :] *= s_j``."""
    out = list(buffers)
    for i, (s, r) in enumerate(scales, start=1):
        before, at = out[i - 1], out[i]
        if before is not None:
            out[i - 1] = _scale_last(before, r)
        if at is not None:
            out[i] = _scale_rows(at, s)
    return out


def _rescale_biases(
    biases: Sequence[jax.Array | None], scales: _Scales, inverse: bool
) -> _Buffers:
    """``b_{i-1}[j] *= s_j`` (or ``1/s_j`` for a bias's momentum when ``inverse``)."""
    out = list(biases)
    for i, (s, r) in enumerate(scales, start=1):
        before = out[i - 1]
        if before is not None:
            out[i - 1] = _scale_last(before, r if inverse else s)
    return out


def _as_array_or_none(x: ArrayLike | None) -> jax.Array | None:
    return None if x is None else jnp.asarray(x)


def _check_options(c: ArrayLike, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p >= 1:
        raise ValueError(f"ENorm: p must be a Python number >= 1 (or inf), got {p!r}.")
    if isinstance(c, numbers.Real) and not isinstance(c, bool) and not c > 0:
        raise ValueError(f"ENorm: c must be positive, got {c!r}.")


def enorm_cycle(
    kernels: Sequence[ArrayLike],
    *,
    c: ArrayLike = 1.0,
    p: float = 2.0,
    stale_norms: bool = True,
    momenta: Sequence[ArrayLike | None] | None = None,
    biases: Sequence[ArrayLike | None] | None = None,
) -> tuple[list[jax.Array], _Buffers | None, _Buffers | None]:
    r"""One equi-normalization cycle over a chain of kernels.

    ``kernels`` is the chain :math:`W_0 \to W_1 \to \dots \to W_{L-1}` in Flax layout
    (dense ``(in, out)``, conv ``(kh, kw, in, out)``; dense and conv may be mixed
    when widths match: ``W_k.shape[-1] == W_{k+1}.shape[-2]``). For a hidden unit
    :math:`j` between :math:`W_{i-1}` and :math:`W_i` the incoming norm is
    :math:`\mathrm{in}_{i-1}[j] = \|W_{i-1}[\dots, j]\|_p` (all axes but the last) and
    the outgoing norm is :math:`\mathrm{out}_i[j] = \|W_i[\dots, j, :]\|_p` (all
    axes but axis -2). For :math:`i = 1, \dots, L-2` in order:

    .. math::

      \begin{align*}
        s &\leftarrow \left(b / (c\, a)\right)^{1/2}
          \quad (a = \mathrm{in}_{i-1},\ b = \mathrm{out}_i) \\
        W_{i-1}[\dots, j] &\leftarrow W_{i-1}[\dots, j] \cdot s_j \\
        W_i[\dots, j, :] &\leftarrow W_i[\dots, j, :] \cdot (1 / s_j) \\
        B_{i-1}[\dots, j] &\leftarrow B_{i-1}[\dots, j] \cdot (1 / s_j), \quad
        B_i[\dots, j, :] \leftarrow B_i[\dots, j, :] \cdot s_j \\
        b_{i-1}[j] &\leftarrow b_{i-1}[j] \cdot s_j
      \end{align*}

    With ``stale_norms=True`` (the original code) :math:`a = \mathrm{in}_{i-1}` is
    the value read at step :math:`i-1` *before* the rows of :math:`W_{i-1}` were
    multiplied by :math:`1/s`; with ``stale_norms=False`` it is re-read after that
    rescale (exact block-coordinate descent). Both have the same fixed points,
    :math:`\mathrm{out}_i[j] = c \cdot \mathrm{in}_{i-1}[j]`, which for ``p=2`` are
    the stationary points of :math:`\sum_k c^{-2k} \|W_k\|_F^2` over the balanced
    layers: ``c > 1`` lets deeper layers grow (this is the original code's
    convention for ``c``). With ``p=2`` the exact variant never increases that
    objective (each step minimizes it over one block of scales); the stale variant
    decreased it in all our tests but is not guaranteed to. The inputs of the last
    layer (units between :math:`W_{L-2}` and :math:`W_{L-1}`) are never balanced,
    so :math:`W_{L-1}` is never changed.

    A bias-free network of ReLUs (or any positively 1-homogeneous activation) and
    max/average pooling computes the same function after the cycle. With biases it
    does so only if they are passed in ``biases`` (``b`` above); a BatchNorm between
    two layers of the chain breaks function preservation.

    Differences from the original code: ``p`` applies to every kernel (the original
    uses the 2-norm on its conv path whatever ``p`` is, so the default ``p=2``
    matches it), and momentum buffers are rescaled whenever ``momenta`` is given,
    including on all-dense chains (the original's linear path never rescales them).

    Zero norms: a unit whose incoming or outgoing norm is zero (or non-finite) is
    left unscaled (``s = 1``); values and :func:`jax.grad` through the cycle stay
    finite (norms use a double ``where``). Norms and scales are computed in at
    least float32 (bf16/fp16 kernels accumulate in float32); every output keeps
    its input dtype. The cycle is pure and jittable (``p`` and ``stale_norms`` are
    static Python values).

    Args:
      kernels: The chain of kernels, first layer first.
      c: Asymmetric scaling coefficient (positive); ``1`` equalizes incoming and
        outgoing norms.
      p: Norm order, a Python number ``>= 1`` or ``inf``.
      stale_norms: ``True`` reproduces the original (stale incoming norms);
        ``False`` is exact block-coordinate descent.
      momenta: ``None``, or one momentum buffer per kernel (same shape, or ``None``
        to skip), e.g. the ``trace`` of :func:`optax.trace`; rescaled inversely.
      biases: ``None`` (the default and the original: biases untouched), or one
        bias per kernel (shape ``(out,)``, or ``None``); the bias of layer
        :math:`i-1` is multiplied by :math:`s`.

    Returns:
      A tuple ``(kernels, momenta, biases)`` of lists (``momenta``/``biases`` are
      ``None`` when not given). A chain of fewer than three kernels has no balanced
      unit (a two-layer chain's only hidden units feed the last layer) and is
      returned unchanged.

    Raises:
      ValueError: If consecutive widths do not match (the message names both
        layers and their shapes), or a kernel has fewer than 2 axes.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, riemax
      >>> rng = np.random.default_rng(0)
      >>> kernels = [jnp.asarray(rng.standard_normal(shape), jnp.float32)
      ...            for shape in [(4, 8), (3, 3, 8, 6), (6, 2)]]
      >>> cycle = jax.jit(lambda ks: riemax.enorm_cycle(ks)[0])
      >>> for _ in range(100):
      ...     kernels = cycle(kernels)
      >>> in_0 = jnp.linalg.norm(kernels[0], axis=0)
      >>> out_1 = jnp.sqrt(jnp.sum(kernels[1] ** 2, axis=(0, 1, 3)))
      >>> bool(jnp.allclose(out_1, in_0, rtol=1e-4))
      True

    References:
      Stock, Graham, Gribonval and Jégou, `Equi-normalization of Neural Networks
      <https://arxiv.org/abs/1902.10416>`_, ICLR 2019
    """
    _check_options(c, p)
    ws = [jnp.asarray(w) for w in kernels]
    _check_chain(ws, None)
    ms = None if momenta is None else [_as_array_or_none(m) for m in momenta]
    bs = None if biases is None else [_as_array_or_none(b) for b in biases]
    if ms is not None:
        _check_aligned("momenta", ms, ws, full_shape=True)
    if bs is not None:
        _check_aligned("biases", bs, ws, full_shape=False)
    ws, scales = _balance(ws, c, p, stale_norms)
    if ms is not None:
        ms = _rescale_inverse(ms, scales)
    if bs is not None:
        bs = _rescale_biases(bs, scales, inverse=False)
    return ws, ms, bs


# ---------------------------------------------------------------------------------
# Parameters and optimizer state by path.
# ---------------------------------------------------------------------------------


def _bias_path(kernel_path: str) -> str:
    parent, _, _ = kernel_path.rpartition("/")
    return f"{parent}/bias" if parent else "bias"


def _is_trace_state(x: Any) -> bool:
    return isinstance(x, optax.TraceState)


def _rescale_trace(
    state: optax.TraceState,
    paths: Sequence[str],
    bias_paths: Sequence[str] | None,
    kernels: Sequence[jax.Array],
    scales: _Scales,
) -> optax.TraceState:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state.trace)
    index = {path_str(kp): n for n, (kp, _) in enumerate(leaves)}
    values = [leaf for _, leaf in leaves]
    if not any(q in index for q in paths):
        return state
    buffers = [values[index[q]] if q in index else None for q in paths]
    _check_aligned("momentum buffers", buffers, kernels, full_shape=True)
    for q, new in zip(paths, _rescale_inverse(buffers, scales), strict=True):
        if new is not None:
            values[index[q]] = new
    if bias_paths is not None:
        bias_buffers = [values[index[q]] if q in index else None for q in bias_paths]
        new_bias = _rescale_biases(bias_buffers, scales, inverse=True)
        for q, new in zip(bias_paths, new_bias, strict=True):
            if new is not None:
                values[index[q]] = new
    return state._replace(trace=jax.tree_util.tree_unflatten(treedef, values))


def apply_enorm(
    params: optax.Params,
    opt_state: optax.OptState,
    paths: Sequence[str],
    *,
    c: ArrayLike = 1.0,
    p: float = 2.0,
    stale_norms: bool = True,
    adjust_momentum: bool = True,
    balance_biases: bool = False,
) -> tuple[optax.Params, optax.OptState]:
    r"""Applies one ENorm cycle to parameters and optimizer momentum, by path.

    Call it right after :func:`optax.apply_updates`. The kernels named by ``paths``
    (in chain order, ``"/"``-joined parameter paths such as ``"layers/0/kernel"``;
    see :func:`riemax.kernel_chain` for NNX models) are rescaled exactly as by
    :func:`riemax.enorm_cycle`:

    .. math::

      W_{i-1}[\dots, j] \leftarrow s_j\, W_{i-1}[\dots, j], \quad
      W_i[\dots, j, :] \leftarrow W_i[\dots, j, :] / s_j, \quad
      s = \left(\mathrm{out}_i / (c\, \mathrm{in}_{i-1})\right)^{1/2}

    With ``adjust_momentum`` every :class:`optax.TraceState` (the state of
    :func:`optax.trace`, used by ``optax.sgd(..., momentum=...)``) found anywhere
    in ``opt_state`` -- inside chains, :func:`optax.partition` /
    ``multi_transform`` or :func:`optax.masked` states, the ``inner_state`` of
    :func:`optax.inject_hyperparams`, an ``nnx.Optimizer``'s ``opt_state`` -- has
    its ``trace`` entries at the same paths scaled inversely (``1/s`` and ``s``),
    which keeps :math:`b = \mu b + g` consistent with the rescaled weights.
    Entries masked out (:class:`optax.MaskedNode`) are skipped; an optimizer
    without momentum is fine (nothing to adjust). Other states (e.g. Adam's
    moments) are left untouched. With ``balance_biases`` the sibling leaf
    ``bias`` of each kernel path (if present) is multiplied by :math:`s`, and its
    momentum, when adjusted, by :math:`1/s`.

    Works on nested dicts and on ``nnx.State`` (``nnx.state(model, nnx.Param)``;
    the result can be passed to ``nnx.update``). Pure and jittable for fixed
    ``paths``; zero-norm units are left unscaled (see :func:`riemax.enorm_cycle`).

    Args:
      params: The parameters (after the optimizer step).
      opt_state: The optax state of the optimizer that produced them.
      paths: Ordered kernel paths of the chain, first layer first.
      c: Asymmetric scaling coefficient (see :func:`riemax.enorm_cycle`).
      p: Norm order, ``>= 1`` or ``inf``.
      stale_norms: ``True`` reproduces the original; ``False`` is exact
        block-coordinate descent.
      adjust_momentum: Rescale the momentum buffers of every ``optax.TraceState``.
      balance_biases: Also rescale the biases next to the kernels (the original
        never does; needed for function preservation in networks with biases).

    Returns:
      The tuple ``(params, opt_state)`` with the same tree structures as the inputs.

    Raises:
      ValueError: For an unknown or repeated path (the message lists the available
        kernel paths), or for a chain whose widths do not match.

    Examples:
      A plain optax loop, with a momentum buffer adjusted in place of the original
      ``torch.optim.SGD`` buffer:

      >>> import jax, jax.numpy as jnp, numpy as np, optax, riemax
      >>> rng = np.random.default_rng(0)
      >>> params = {f"fc{k}": {"kernel": jnp.asarray(rng.standard_normal(shape),
      ...                                            jnp.float32)}
      ...           for k, shape in enumerate([(5, 8), (8, 8), (8, 3)])}
      >>> paths = ["fc0/kernel", "fc1/kernel", "fc2/kernel"]
      >>> tx = optax.sgd(0.01, momentum=0.9)
      >>> opt_state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, opt_state = tx.update(grads, opt_state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> params, opt_state = riemax.apply_enorm(params, opt_state, paths)
      >>> in_0 = jnp.linalg.norm(params["fc0"]["kernel"], axis=0)
      >>> out_1 = jnp.linalg.norm(params["fc1"]["kernel"], axis=1)
      >>> bool(jnp.all(jnp.abs(out_1 / in_0 - 1) < 0.5))
      True

      In an NNX training loop, two lines after ``optimizer.update``:

      >>> from flax import nnx
      >>> rngs = nnx.Rngs(0)
      >>> model = nnx.Sequential(nnx.Linear(8, 8, rngs=rngs), jax.nn.relu,
      ...                        nnx.Linear(8, 8, rngs=rngs), jax.nn.relu,
      ...                        nnx.Linear(8, 8, rngs=rngs))
      >>> optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9),
      ...                           wrt=nnx.Param)
      >>> paths = riemax.kernel_chain(model)
      >>> paths
      ['layers/0/kernel', 'layers/2/kernel', 'layers/4/kernel']
      >>> @nnx.jit
      ... def train_step(model, optimizer, x):
      ...     grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
      ...     optimizer.update(model, grads)
      ...     params, optimizer.opt_state = riemax.apply_enorm(
      ...         nnx.state(model, nnx.Param), optimizer.opt_state, paths)
      ...     nnx.update(model, params)
      >>> train_step(model, optimizer, jnp.ones((2, 8)))

    References:
      Stock, Graham, Gribonval and Jégou, `Equi-normalization of Neural Networks
      <https://arxiv.org/abs/1902.10416>`_, ICLR 2019
    """
    _check_options(c, p)
    if isinstance(paths, str):
        raise TypeError("ENorm: paths must be a sequence of path strings, not a str.")
    paths = list(paths)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    index = {path_str(kp): n for n, (kp, _) in enumerate(leaves)}
    values = [leaf for _, leaf in leaves]
    unknown = [q for q in paths if q not in index]
    repeated = sorted({q for q in paths if paths.count(q) > 1})
    if unknown or repeated:
        available = [q for q, n in index.items() if getattr(values[n], "ndim", 0) >= 2]
        problem = (
            f"unknown path(s) {unknown}" if unknown else f"repeated path(s) {repeated}"
        )
        raise ValueError(
            f"ENorm: {problem}; available kernel paths (leaves with >= 2 axes): "
            f"{available}"
        )
    kernels = [jnp.asarray(values[index[q]]) for q in paths]
    _check_chain(kernels, paths)
    new_kernels, scales = _balance(kernels, c, p, stale_norms)
    if not scales:
        return params, opt_state
    for q, w in zip(paths, new_kernels, strict=True):
        values[index[q]] = w

    bias_paths = [_bias_path(q) for q in paths] if balance_biases else None
    if bias_paths is not None:
        biases = [values[index[q]] if q in index else None for q in bias_paths]
        _check_aligned("biases", biases, kernels, full_shape=False)
        new_biases = _rescale_biases(biases, scales, inverse=False)
        for q, b in zip(bias_paths, new_biases, strict=True):
            if b is not None:
                values[index[q]] = b
    params = jax.tree_util.tree_unflatten(treedef, values)

    if adjust_momentum:

        def rescale(x: Any) -> Any:
            if not _is_trace_state(x):
                return x
            return _rescale_trace(x, paths, bias_paths, kernels, scales)

        opt_state = jax.tree.map(rescale, opt_state, is_leaf=_is_trace_state)
    return params, opt_state
