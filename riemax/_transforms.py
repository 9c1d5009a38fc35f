r"""Composable Riemannian gradient transformations.

Conventions shared by every transform here:

* A *unit* is one output unit of a kernel in Flax layout, the slice ``w[..., j]``
  over all axes but the last (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``).
  The sphere transforms reject leaves with fewer than two axes, naming the
  parameter path; route such leaves to a Euclidean optimizer with
  :func:`riemax.hybrid`.
* Reductions run in at least float32; params and updates keep their dtype; state
  is float32 for bf16/fp16 params (``mu_dtype`` overrides it).
* ``unit_eps`` is the constant the original implementations add to norms
  (``unit(w) = w / (||w|| + unit_eps)``, and inside the exponential map and the
  transports). ``unit_eps=0`` gives exact geometry.
* A unit whose parameter vector is exactly zero has no tangent space: every
  transform passes the Euclidean quantity through unchanged there, and no
  momentum is carried out of the origin (the step a unit took from there is
  radial at its new point and has no tangent meaning). The chains store no
  momentum for such a unit; the fused :func:`sgdg_update`/:func:`adamg_update`
  store the radial step and drop it at the next step.
* Tangent-valued state (momentum) lives at the parameters it was computed at and
  is carried to the current parameters at the start of the next ``update``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from riemax import _sphere as sphere
from riemax._numerics import (
    acc_dtype,
    check_nonnegative,
    group_axes,
    group_inners,
    group_size,
    inner,
    norm,
    normalize,
    per_unit,
    safe_div,
    safe_sqrt,
    to_acc,
    unit_axes,
)
from riemax._tree import path_str

_CITE_RBN = "Cho and Lee, Riemannian approach to batch normalization, NeurIPS 2017"


class TransportedMomentumState(NamedTuple):
    """State of :func:`transported_momentum`: the last step taken, per leaf."""

    trace: optax.Params


class SphericalAdamState(NamedTuple):
    """State of :func:`spherical_adam`: step count, first moment, per-unit second."""

    count: jax.Array
    mu: optax.Params
    nu: optax.Params


class AdamSState(NamedTuple):
    """State of :func:`scale_by_adams`: step count, first moment, per-group second."""

    count: jax.Array
    mu: optax.Params
    nu: optax.Params


class SgdMRTState(NamedTuple):
    """State of :func:`scale_by_sgdmrt`: step count and momentum buffer."""

    count: jax.Array
    trace: optax.Params


# --------------------------------------------------------------------------- helpers


def _need_params(name: str, params: Any) -> None:
    if params is None:
        raise ValueError(
            f"riemax.{name} needs the current parameters: call "
            "`tx.update(updates, state, params)`."
        )


def _check_unit_leaf(name: str, path: tuple, leaf: Any) -> None:
    shape = getattr(leaf, "shape", ())
    if len(shape) < 2:
        raise ValueError(
            f"riemax.{name}: parameter '{path_str(path) or '<root>'}' has shape "
            f"{tuple(shape)}, but sphere transforms need kernels with at least 2 "
            "axes (a unit is the slice over all axes but the last). Route 1-D "
            "leaves such as biases and BatchNorm scales to a Euclidean optimizer, "
            "e.g. with riemax.hybrid(manifold_tx, euclidean_tx, labels)."
        )


def _map_units(name: str, fn: Callable, *trees: Any) -> Any:
    """``tree_map`` over kernels, raising a path-naming error for rank < 2 leaves."""

    def leaf_fn(path, *leaves):
        _check_unit_leaf(name, path, leaves[0])
        return fn(*leaves)

    return jax.tree_util.tree_map_with_path(leaf_fn, *trees)


def _check_units(name: str, params: Any) -> None:
    _map_units(name, lambda p: None, params)


def _unzip(template: Any, results: Any, n: int) -> tuple[Any, ...]:
    """Splits a tree of n-tuples (structured like ``template``) into n trees."""
    return tuple(
        jax.tree.map(lambda _, r, i=i: r[i], template, results) for i in range(n)
    )


def _state_dtype(p: jax.Array, mu_dtype: Any) -> jnp.dtype:
    return jnp.dtype(mu_dtype) if mu_dtype is not None else acc_dtype(p.dtype)


def _zeros_like_state(params: Any, mu_dtype: Any) -> Any:
    return jax.tree.map(lambda p: jnp.zeros(p.shape, _state_dtype(p, mu_dtype)), params)


def _zeros_per_unit(params: Any) -> Any:
    """One float32-or-wider zero per unit, shaped ``(1, ..., 1, out)``."""
    return jax.tree.map(
        lambda p: jnp.zeros((1,) * (p.ndim - 1) + p.shape[-1:], acc_dtype(p.dtype)),
        params,
    )


def _unit_of(w: jax.Array, unit_eps) -> tuple[jax.Array, jax.Array]:
    """Returns ``(unit(w), ||w||)`` per unit, in the accumulation dtype."""
    return normalize(to_acc(w), unit_axes(w.ndim), unit_eps)


#: Adam-G moves along ``scale * m`` by an angle the next step does not know; its
#: stored ``m`` is kept while its projection keeps half of this fraction of its
#: length (1/32: every step shorter than ``pi/2 - 0.03`` radians).
ADAM_KEPT_FRACTION = 2.0**-4


def _moved_along(projected, expected):
    """Whether a stored step is carried to the current point.

    When the params moved along the stored step by the exponential map, its
    projection on the new tangent space has length ``|cos(theta)| * ||d||``
    (``expected``). A step that is radial at the new point, as the Euclidean step
    a unit takes off the origin, projects to rounding noise; rescaling that noise to
    the transported length would invent a direction, so such a step is dropped.
    """
    return projected >= 0.5 * expected


#: (w, m, g) index pairs of the AdamSRT Gram pass: ww, wm, mm, wg, gm, gg.
_SRT_PAIRS = ((0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2))


def _check_learning_rate(learning_rate: optax.ScalarOrSchedule) -> None:
    if not callable(learning_rate):
        check_nonnegative("learning_rate", learning_rate)


def _schedule_value(learning_rate: optax.ScalarOrSchedule, count: jax.Array):
    return learning_rate(count) if callable(learning_rate) else learning_rate


# ----------------------------------------------------------------- sphere transforms


def grassmann_project(unit_eps: float = 1e-8) -> optax.GradientTransformation:
    r"""Projects each unit's gradient onto the tangent space of the sphere.

    For a BatchNorm-fed kernel the loss depends only on the direction of each unit
    ``w_j``; its Riemannian gradient on the sphere (equivalently on the
    Grassmannian :math:`G(1, n)`) is the Euclidean gradient minus its radial part,
    taken at the point :math:`y_j` the unit represents:

    .. math::

      y_j = \frac{w_j}{\|w_j\| + \epsilon_u}, \qquad
      h_j = \|w_j\|\,\bigl(g_j - \langle y_j, g_j \rangle\, y_j\bigr)

    The factor :math:`\|w_j\|` converts the gradient at ``w`` into the gradient at
    ``unit(w)`` for a scale-invariant loss (:math:`\nabla L(cw) = \nabla L(w)/c`),
    so the whole optimizer is invariant to the scale of the kernel it starts
    from. The riemax updates keep :math:`\|w_j\| = 1`, where the factor is 1 and
    the rule is exactly the original's. A zero unit passes ``g`` through.

    Args:
      unit_eps: :math:`\epsilon_u`, added to the norm in ``unit(w)``.

    Returns:
      A :class:`optax.GradientTransformation` (stateless; needs ``params``).

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> g = jnp.array([[3.0, 5.0], [4.0, 6.0]])
      >>> tx = riemax.grassmann_project(unit_eps=0.0)
      >>> h, _ = tx.update(g, tx.init(w), w)
      >>> h  # the second unit has norm 2: its gradient at unit(w) is twice as large
      Array([[ 0., 10.],
             [ 4.,  0.]], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017 (eq. 6)
    """
    check_nonnegative("unit_eps", unit_eps)

    def init_fn(params):
        _check_units("grassmann_project", params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        _need_params("grassmann_project", params)

        def leaf(g, w):
            y, w_norm = _unit_of(w, unit_eps)
            h = sphere.project(y, to_acc(g)) * jnp.where(w_norm > 0, w_norm, 1)
            return h.astype(g.dtype)

        return _map_units("grassmann_project", leaf, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def clip_tangent_norm(max_norm: float | None) -> optax.GradientTransformation:
    r"""Clips the norm of every unit of a tangent update to ``max_norm``.

    .. math::

      \hat h_j = h_j \cdot \min\!\left(1, \frac{\nu}{\|h_j\|}\right)

    Clipping acts only where :math:`\|h_j\| > \nu` (strict); zero units stay zero.
    On the sphere the norm of a tangent step is the angle it turns the unit by, so
    this bounds the angular step of every unit independently.

    Args:
      max_norm: The threshold :math:`\nu`; ``None`` disables clipping.

    Returns:
      A stateless :class:`optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> tx = riemax.clip_tangent_norm(1.0)
      >>> h = jnp.array([[3.0, 0.1], [4.0, 0.0]])
      >>> tx.update(h, tx.init(h))[0]
      Array([[0.6, 0.1],
             [0.8, 0. ]], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017 (section 3.3)
    """
    if max_norm is None:
        return optax.identity()
    check_nonnegative("max_norm", max_norm)

    def init_fn(params):
        _check_units("clip_tangent_norm", params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params

        def leaf(h):
            return sphere.clip(to_acc(h), max_norm).astype(h.dtype)

        return _map_units("clip_tangent_norm", leaf, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def transported_momentum(
    momentum: float, *, unit_eps: float = 1e-8, mu_dtype: Any = None
) -> optax.GradientTransformation:
    r"""Heavy-ball momentum kept in the tangent space of the sphere.

    The step ``d`` of the previous iteration is carried to the current point
    ``y = unit(w)`` by parallel transport along the geodesic it moved along, then
    decayed and added to the incoming tangent update ``u``:

    .. math::

      \tau \leftarrow \Gamma_{y_\mathrm{prev}}(d; d), \qquad
      d \leftarrow \gamma\,\tau + u

    With :func:`optax.scale_by_learning_rate` before this transform, ``u`` is
    :math:`-\eta\hat h` and the learning rate sits inside the momentum, exactly as
    SGD-G stores it.

    The transport is computed at the start of the next ``update`` from the current
    params only (no extra memory): when the params moved along ``d`` itself,
    parallel transport equals projecting ``d`` onto the new tangent space and
    restoring its length. The restored length is
    :math:`\|d\|^2 / (\|d\| + \epsilon_u)`, the length the original transport
    formula gives, so the default ``unit_eps`` follows the reference implementation
    to :math:`O(\epsilon_u \theta^2)`. For angular steps beyond that the sign is
    restored from :math:`\cos\|d\|`
    (the step is the stored momentum itself), so any step length is exact.

    Parallel transport along ``d`` leaves a projection of length
    :math:`|\cos\|d\||\,\|d\|`. A stored step whose projection is shorter than
    half of that did not move the params along itself (it is radial here, as the
    Euclidean step of a unit leaving the origin); rescaling its rounding noise
    would invent a direction, so it is dropped.

    Args:
      momentum: The decay :math:`\gamma`.
      unit_eps: :math:`\epsilon_u` of ``unit(w)`` and of the transport.
      mu_dtype: Dtype of the stored step; defaults to the params dtype promoted to
        at least float32. Static under :func:`optax.inject_hyperparams`.

    Returns:
      A :class:`optax.GradientTransformation` with
      :class:`TransportedMomentumState`; needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax, riemax
      >>> w = jnp.array([[1.0], [0.0]])
      >>> tx = riemax.transported_momentum(0.9)
      >>> state = tx.init(w)
      >>> d, state = tx.update(jnp.array([[0.0], [0.1]]), state, w)
      >>> d.ravel()
      Array([0. , 0.1], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017 (eq. 9, Algorithm 1)
    """
    check_nonnegative("unit_eps", unit_eps)

    def init_fn(params):
        _check_units("transported_momentum", params)
        return TransportedMomentumState(trace=_zeros_like_state(params, mu_dtype))

    def update_fn(updates, state, params=None):
        _need_params("transported_momentum", params)

        def leaf(u, d_prev, w):
            axes = unit_axes(w.ndim)
            y, w_norm = _unit_of(w, unit_eps)
            d_prev = to_acc(d_prev)
            n = norm(d_prev, axes)
            # P_y'(d) = cos(theta) * Gamma(d; d) with theta = ||d||: restore the
            # length, and the sign for steps beyond a quarter turn.
            length = safe_div(n * n, n + unit_eps) * jnp.where(jnp.cos(n) < 0, -1, 1)
            projected = sphere.project(y, d_prev)
            n_p = norm(projected, axes)
            tau = projected * safe_div(length, n_p)
            # A zero unit has no tangent space to carry a step through, and a step
            # that is radial here (the one a unit took off the origin) has no
            # direction left: both are dropped.
            keep = (w_norm > 0) & _moved_along(n_p, jnp.abs(jnp.cos(n)) * n)
            tau = jnp.where(keep, tau, 0)
            d = momentum * tau + to_acc(u)
            return d.astype(u.dtype), jnp.where(w_norm > 0, d, 0).astype(d_prev.dtype)

        results = _map_units("transported_momentum", leaf, updates, state.trace, params)
        new_updates, trace = _unzip(updates, results, 2)
        trace = optax.tree.cast_like(trace, state.trace)
        return new_updates, TransportedMomentumState(trace=trace)

    return optax.GradientTransformation(init_fn, update_fn)


def spherical_adam(
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
    *,
    unit_eps: float = 1e-8,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Adam on the sphere: element-wise first moment, one second moment per unit.

    With ``h`` the (projected, clipped) tangent gradient and ``t`` the step count:

    .. math::

      \begin{align*}
        m &\leftarrow \beta_1\, \Gamma(m) + (1 - \beta_1)\, h \\
        v_j &\leftarrow \beta_2\, v_j + (1 - \beta_2)\, \|h_j\|^2 \\
        \delta_j &\leftarrow \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
          \frac{m_j}{\sqrt{v_j + \epsilon}}
      \end{align*}

    ``eps`` sits *inside* the square root of the *uncorrected* ``v`` (as in the
    original; equal to Adam with :math:`\hat\epsilon = \epsilon / (1-\beta_2^t)`).
    Because ``v`` is one scalar per unit, each unit's step is parallel to its first
    moment, so the transport :math:`\Gamma` of ``m`` along the step equals
    projecting ``m`` onto the new tangent space and restoring its norm; that is
    done at the start of the next ``update``. The step angle is not known then, so
    ``m`` is dropped where its projection keeps less than 1/32 of its norm (a
    radial ``m``, as after a unit leaves the origin; a step along ``m`` shortens it
    that much only within 0.03 rad of a quarter turn). Follow with
    :func:`optax.scale_by_learning_rate` and :func:`exp_map_update`.

    Args:
      b1: Decay of the first moment.
      b2: Decay of the per-unit second moment.
      eps: Added to ``v`` inside the square root.
      unit_eps: :math:`\epsilon_u` of ``unit(w)``.
      mu_dtype: Dtype of ``m``; defaults to the params dtype promoted to at least
        float32 (``v`` always accumulates in at least float32). Static under
        :func:`optax.inject_hyperparams`.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`SphericalAdamState`
      (``nu`` has shape ``(1, ..., 1, out)``); needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = jnp.array([[1.0], [0.0]])
      >>> tx = riemax.spherical_adam()
      >>> state = tx.init(w)
      >>> step, state = tx.update(jnp.array([[0.0], [0.1]]), state, w)
      >>> step.ravel().round(4), state.nu.shape
      (Array([0.    , 0.9999], dtype=float32), (1, 1))

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017 (Algorithm 2)
    """
    check_nonnegative("unit_eps", unit_eps)

    def init_fn(params):
        _check_units("spherical_adam", params)
        return SphericalAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=_zeros_like_state(params, mu_dtype),
            nu=_zeros_per_unit(params),
        )

    def update_fn(updates, state, params=None):
        _need_params("spherical_adam", params)
        count = optax.safe_increment(state.count)

        def leaf(h, m, v, w):
            axes = unit_axes(w.ndim)
            y, w_norm = _unit_of(w, unit_eps)
            m = to_acc(m)
            n_m, projected = norm(m, axes), sphere.project(y, m)
            n_p = norm(projected, axes)
            # Transported to y; dropped on zero units (no tangent space) and where
            # it is radial (see transported_momentum).
            keep = (w_norm > 0) & _moved_along(n_p, ADAM_KEPT_FRACTION * n_m)
            m = jnp.where(keep, projected * safe_div(n_m, n_p), 0)
            h = to_acc(h)
            m = b1 * m + (1 - b1) * h
            v = b2 * v + (1 - b2) * inner(h, h, axes)
            t = count.astype(v.dtype)
            alpha = jnp.sqrt(1 - b2**t) / (1 - b1**t)
            step = safe_div(m, safe_sqrt(v + eps)) * alpha
            return step, jnp.where(w_norm > 0, m, 0), v

        results = _map_units(
            "spherical_adam", leaf, updates, state.mu, state.nu, params
        )
        steps, mu, nu = _unzip(updates, results, 3)
        steps = optax.tree.cast_like(steps, updates)
        return steps, SphericalAdamState(
            count=count,
            mu=optax.tree.cast_like(mu, state.mu),
            nu=optax.tree.cast_like(nu, state.nu),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def exp_map_update(unit_eps: float = 1e-8) -> optax.GradientTransformation:
    r"""Turns a tangent step into the additive update that follows the geodesic.

    Last in a chain. With ``y = unit(w)`` and incoming tangent step ``d``:

    .. math::

      \theta = \|d_j\|, \quad
      w_j^{+} = \cos\theta\; y_j + \sin\theta\, \frac{d_j}{\|d_j\| + \epsilon_u},
      \qquad \text{update} = w^{+} - w

    so that :func:`optax.apply_updates` and ``nnx.Optimizer`` land exactly on the
    new point. Every step restarts from ``unit(w)``, so norm errors never
    accumulate. Zero-norm units receive ``d`` unchanged (Euclidean step).

    Args:
      unit_eps: :math:`\epsilon_u` of ``unit(w)`` and of the direction of ``d``.

    Returns:
      A stateless :class:`optax.GradientTransformation`; needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax, riemax
      >>> w = jnp.array([[2.0], [0.0]])
      >>> tx = riemax.exp_map_update(unit_eps=0.0)
      >>> delta, _ = tx.update(jnp.array([[0.0], [jnp.pi / 2]]), tx.init(w), w)
      >>> optax.apply_updates(w, delta).ravel().round(6)
      Array([0., 1.], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017 (eq. 7)
    """
    check_nonnegative("unit_eps", unit_eps)

    def init_fn(params):
        _check_units("exp_map_update", params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        _need_params("exp_map_update", params)

        def leaf(d, w):
            y, w_norm = _unit_of(w, unit_eps)
            d_acc = to_acc(d)
            new = sphere.expmap(y, d_acc, unit_eps)
            return jnp.where(w_norm > 0, new - to_acc(w), d_acc).astype(d.dtype)

        return _map_units("exp_map_update", leaf, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


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
    if at not in ("unit", "param"):
        raise ValueError(f"ortho_penalty: `at` must be 'unit' or 'param', got {at!r}.")
    check_nonnegative("omega", omega)
    if isinstance(omega, (int, float)) and omega == 0:
        return optax.identity()

    def init_fn(params):
        _check_units("ortho_penalty", params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        _need_params("ortho_penalty", params)

        def leaf(g, w):
            if at == "param":
                return (
                    to_acc(g) + omega * sphere.gram_residual_grad(to_acc(w))
                ).astype(g.dtype)
            y, w_norm = _unit_of(w, unit_eps)
            grad = safe_div(omega * sphere.gram_residual_grad(y), w_norm)
            return (to_acc(g) + grad).astype(g.dtype)

        return _map_units("ortho_penalty", leaf, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


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
    if labels is None:
        keep = jax.tree.map(lambda p: p.ndim >= 2, params)
    else:
        from riemax._labels import MANIFOLD, check_labels

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
      An initializer ``init(key, shape, dtype=float32)`` for shapes of rank >= 2.

    Examples:
      >>> import jax, jax.numpy as jnp, riemax
      >>> w = riemax.unit_init()(jax.random.key(0), (3, 3, 16, 8))
      >>> jnp.linalg.norm(w.reshape(-1, 8), axis=0).round(6)
      Array([1., 1., 1., 1., 1., 1., 1., 1.], dtype=float32)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017
    """
    check_nonnegative("unit_eps", unit_eps)

    def init(key, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(
                f"unit_init: shape {shape} has no units; it needs at least 2 axes."
            )
        w = jax.random.truncated_normal(key, -2.0, 2.0, shape, acc_dtype(dtype))
        return sphere.unit(w, unit_eps).astype(dtype)

    return init


# ------------------------------------------------------ group-wise AdamS / SGD-MRT


def scale_by_adams(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    channel_axes: Sequence[int] | None = (-1,),
    transport: bool = True,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""AdamS / AdamSRT step: one second moment per group, rescaled transport.

    Groups are indexed by ``channel_axes``; :math:`\langle\cdot,\cdot\rangle_R`
    sums over the other axes and :math:`d` is the group size. With ``t`` the step
    count, :math:`x_1 = w` and :math:`x_2 = w + \Delta`:

    .. math::

      \begin{align*}
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2) \langle g, g\rangle_R \\
        \Delta &= -\eta\sqrt{d}\;\frac{m / (1-\beta_1^t)}
          {\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon} \\
        v &\leftarrow v\, \frac{\langle x_1, x_1\rangle_R}
          {\langle x_2, x_2\rangle_R + \epsilon}, \qquad
        m \leftarrow \frac{\langle x_1, x_2\rangle_R\, m
          - \langle m, x_2\rangle_R\, x_1}{\langle x_2, x_2\rangle_R + \epsilon}
      \end{align*}

    The last line (rescale and transport, "RT") runs only when ``transport`` and
    :math:`d > 1`. Because RT depends on the step actually taken, this transform
    takes the learning rate and returns the final additive update: it comes last
    in a chain (weight decay, if any, before it).

    With :math:`x_1 = x_2 + s\,m` the transport of ``m`` equals
    :math:`(\langle x_2, x_2\rangle_R\, m - \langle m, x_2\rangle_R\, x_2) /
    (\langle x_2, x_2\rangle_R + \epsilon)`, which needs only the new point:
    riemax stores ``m`` where it was computed and transports it at the start of
    the next update (the same trajectory); ``v`` is rescaled at the end of the
    step. All per-group inner products come from one pass over ``w``, ``m`` and
    ``g``.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule of the step count.
      b1: First-moment decay.
      b2: Second-moment decay.
      eps: Added after the square root (bias-corrected), and in the RT
        denominators.
      channel_axes: Axes indexing the groups: ``(-1,)`` one group per output unit
        (BatchNorm; default), ``()`` the whole tensor (LayerNorm), ``None``
        element-wise (plain Adam). Static.
      transport: Apply RT (AdamSRT) or not (AdamS). Static.
      mu_dtype: Dtype of ``m``; defaults to the params dtype promoted to at least
        float32. Static.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`AdamSState`; needs
      ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax, riemax
      >>> w = jnp.array([[1.0], [0.0]])
      >>> tx = riemax.scale_by_adams(0.1)
      >>> delta, state = tx.update(jnp.array([[0.0], [1.0]]), tx.init(w), w)
      >>> round(float(delta[1, 0]), 5)  # -lr * sqrt(d) * m_hat / sqrt(v_hat)
      -0.14142
      >>> round(float(state.nu[0, 0]), 7)  # v rescaled by |x1|^2 / |x2|^2 = 1 / 1.02
      0.0009804

    References:
      Roburin, de Mont-Marin et al., `Spherical perspective on learning with
      batch norm <https://arxiv.org/abs/2006.13382>`_, 2020
    """
    _check_learning_rate(learning_rate)

    def init_fn(params):
        def nu0(p):
            axes = group_axes(p.ndim, channel_axes)
            shape = tuple(1 if a in axes else s for a, s in enumerate(p.shape))
            return jnp.zeros(shape, acc_dtype(p.dtype))

        return AdamSState(
            count=jnp.zeros([], jnp.int32),
            mu=_zeros_like_state(params, mu_dtype),
            nu=jax.tree.map(nu0, params),
        )

    def update_fn(updates, state, params=None):
        _need_params("scale_by_adams", params)
        lr = _schedule_value(learning_rate, state.count)
        count = optax.safe_increment(state.count)

        def leaf(g, m, v, w):
            axes = group_axes(w.ndim, channel_axes)
            d = group_size(w.shape, axes)
            g, m, w_acc = to_acc(g), to_acc(m), to_acc(w)
            rt = transport and d > 1
            if rt:
                # m is stored at the params it moved (x1). The original transports
                # it after the step; with x1 = x2 + s m that equals, at x2 = w now,
                # (<x2,x2> m - <m,x2> x2) / (<x2,x2> + eps): one Gram pass of
                # (w, m, g) gives it and every quantity below.
                ww, wm, mm, wg, gm, gg = group_inners((w_acc, m, g), _SRT_PAIRS, axes)
                a_m = b1 * safe_div(ww, ww + eps)
                a_w = -b1 * safe_div(wm, ww + eps)
            else:
                gg = inner(g, g, axes)
            v = b2 * v + (1 - b2) * gg
            t = count.astype(v.dtype)
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            # delta = -s * m with one scalar s per group.
            s = lr * d**0.5 / bc1 / (safe_sqrt(v) / jnp.sqrt(bc2) + eps)
            if not rt:
                s = per_unit(s)[0] if d > 1 else s
                m = b1 * m + (1 - b1) * g
                return (-s * m).astype(w.dtype), m, v
            # m_new = a_m m + a_w w + a_g g; v <- v <x1,x1> / (<x2,x2> + eps) with
            # x2 = w - s m_new, expanded over the Gram quantities.
            a_g = 1 - b1
            w_mn = a_m * wm + a_w * ww + a_g * wg
            mn_mn = jnp.maximum(
                a_m * a_m * mm
                + a_w * a_w * ww
                + a_g * a_g * gg
                + 2 * (a_m * a_w * wm + a_m * a_g * gm + a_w * a_g * wg),
                0,
            )
            v = v * safe_div(ww, ww - 2 * s * w_mn + s * s * mn_mn + eps)
            # v goes through per_unit with the coefficients, so that every read of
            # the Gram pass is ordered before the loops that overwrite w and m
            # (otherwise XLA copies both donated buffers).
            s, a_m, a_w, v = per_unit(s, a_m, a_w, v)
            m = a_m * m + a_w * w_acc + a_g * g
            return (-s * m).astype(w.dtype), m, v

        results = jax.tree.map(leaf, updates, state.mu, state.nu, params)
        deltas, mu, nu = _unzip(updates, results, 3)
        deltas = optax.tree.cast_like(deltas, updates)
        return deltas, AdamSState(
            count=count,
            mu=optax.tree.cast_like(mu, state.mu),
            nu=optax.tree.cast_like(nu, state.nu),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_sgdmrt(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    *,
    channel_axes: Sequence[int] | None = (-1,),
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""SGD-MRT step: momentum SGD whose buffer is transported per group.

    With :math:`x_1 = w`, :math:`x_2 = w - \eta b` and groups as in
    :func:`scale_by_adams`:

    .. math::

      b \leftarrow \mu b + g, \qquad \Delta = -\eta b, \qquad
      b \leftarrow \frac{\langle x_1, x_2\rangle_R\, b
        - \langle b, x_2\rangle_R\, x_1}{\langle x_2, x_2\rangle_R}

    The transport runs only for groups of size :math:`d > 1`; it has no epsilon
    (as the original), and a group that lands exactly at zero keeps its buffer
    instead of dividing by zero. Last in a chain (it takes the learning rate).

    Because :math:`x_1 = x_2 + \eta b`, the transport equals projecting ``b`` on the
    tangent space at :math:`x_2`: :math:`b - \langle b, x_2\rangle_R\, x_2 /
    \langle x_2, x_2\rangle_R`. riemax stores ``b`` where it was computed and
    applies that projection at the start of the next update, from the current
    params (the same trajectory; the two output loops then update donated buffers
    in place).

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      momentum: :math:`\mu`.
      channel_axes: Group axes as in :func:`scale_by_adams`. Static.
      mu_dtype: Dtype of the buffer; defaults to the params dtype promoted to at
        least float32. Static.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`SgdMRTState`; needs
      ``params``.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = jnp.array([[1.0], [0.0]])
      >>> tx = riemax.scale_by_sgdmrt(0.1)
      >>> state = tx.init(w)
      >>> delta, state = tx.update(jnp.array([[0.0], [1.0]]), state, w)
      >>> [round(float(x), 4) for x in delta.ravel()]  # -lr * b
      [-0.0, -0.1]
      >>> w = w + delta  # b is carried to w = [1, -0.1] by the next update:
      >>> delta, _ = tx.update(jnp.zeros_like(w), state, w)
      >>> [round(float(x), 4) for x in (delta / -0.1).ravel()]  # 0.9 * b at w
      [0.0891, 0.8911]

    References:
      Roburin, de Mont-Marin et al., `Spherical perspective on learning with
      batch norm <https://arxiv.org/abs/2006.13382>`_, 2020
    """
    _check_learning_rate(learning_rate)

    def init_fn(params):
        return SgdMRTState(
            count=jnp.zeros([], jnp.int32), trace=_zeros_like_state(params, mu_dtype)
        )

    def update_fn(updates, state, params=None):
        _need_params("scale_by_sgdmrt", params)
        lr = _schedule_value(learning_rate, state.count)

        def leaf(g, b, w):
            axes = group_axes(w.ndim, channel_axes)
            w_acc, b = to_acc(w), to_acc(b)
            if group_size(w.shape, axes) > 1:
                # b is stored at the params it moved (x1). The original transports
                # it after the step; with x1 = x2 + lr b that equals projecting it
                # at x2 = w now. A group at exactly zero keeps its buffer.
                ww, wb = group_inners((w_acc, b), ((0, 0), (0, 1)), axes)
                (c,) = per_unit(safe_div(wb, ww))
                b = b - c * w_acc
            b = momentum * b + to_acc(g)
            return (-lr * b).astype(w.dtype), b

        results = jax.tree.map(leaf, updates, state.trace, params)
        deltas, trace = _unzip(updates, results, 2)
        return optax.tree.cast_like(deltas, updates), SgdMRTState(
            count=optax.safe_increment(state.count),
            trace=optax.tree.cast_like(trace, state.trace),
        )

    return optax.GradientTransformation(init_fn, update_fn)
