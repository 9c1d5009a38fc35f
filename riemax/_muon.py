r"""Manifold Muon and hyperspherical descent (Bernstein, "Modular Manifolds",
2025): steepest descent with the weights themselves kept on a manifold.

* :func:`manifold_muon` keeps every kernel on the Stiefel manifold (all singular
  values of its matrix view equal to 1) and moves it by an update whose
  singular values are all 1 too: the steepest direction under the spectral norm
  that stays tangent, found by dual ascent, then the polar retraction
  (:mod:`riemax._msign`).
* :func:`hyperspherical_descent` keeps every leaf, as one vector, on the unit
  sphere and moves it by a tangent step of length ``learning_rate``.

Neither has momentum. Start from a point of the manifold:
:func:`riemax.to_manifold` with ``"msign"`` or ``"normalize"``. The rules, and
where the original code differs, are in docs/algorithms.md, "Manifold Muon and
hyperspherical descent".
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from riemax import _checks as checks
from riemax._gram import gram_program, normalize_program
from riemax._leafmap import Step, leaf_map, schedule_value, stateful
from riemax._msign import (
    _check_dtype,
    _check_steps,
    from_matrix_view,
    matrix_view,
    msign_matrix,
    polar_retraction,
)
from riemax._numerics import exponent, pnorm, pow2, safe_div, to_acc, unscaled


class ScaleByManifoldMuonState(NamedTuple):
    """State of :func:`scale_by_manifold_muon`: the step count (for schedules)."""

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count


class ScaleByHypersphericalDescentState(NamedTuple):
    """State of :func:`scale_by_hyperspherical_descent`: the step count."""

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count


# ------------------------------------------------------------------ start methods


def msign_start(w: jax.Array) -> jax.Array:
    """Manifold Muon's start projection of one Flax kernel: the matrix sign of
    ``w.reshape(-1, out)`` (10 iterations, in at least float32), reshaped back.

    It is one manifold-Muon step with a zero gradient and learning rate, and the
    ``"msign"`` method of :func:`riemax.to_manifold`.
    """
    if w.ndim < 2:
        raise ValueError(
            f"riemax.to_manifold: the 'msign' start needs kernels with at least 2 "
            f"axes, got a leaf of shape {tuple(w.shape)}; pass labels (e.g. "
            "functools.partial(riemax.labels_by_rule, pattern='', fan='any')) so "
            "that other leaves stay as they are."
        )
    return polar_retraction(w)


def normalize_start(w: jax.Array) -> jax.Array:
    """Hyperspherical descent's start projection: the whole leaf divided by its
    norm (a zero leaf stays zero); the ``"normalize"`` method of
    :func:`riemax.to_manifold`."""
    w_acc = to_acc(w)
    n = pnorm(w_acc, tuple(range(w.ndim)), 2)
    return safe_div(w_acc, n).astype(w.dtype)


# ----------------------------------------------------------------- manifold Muon


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """A full-precision matrix product of stacks (no TF32 on GPUs)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _muon_delta(w, g, lr, *, dual_steps, dual_lr, tol, msign_steps, msign_dtype):
    """``msign(W - lr A) - W`` for a stack ``[k, n, p]`` of tall matrices.

    The dual ascent runs ``dual_steps`` iterations; once a matrix passes the
    stopping test its multiplier and direction are frozen, so the numbers equal
    those of a loop that stops there, and no trip count depends on data.
    """
    # The iterates are those of G 2**-e, with the dual step 2**-e alpha and the
    # multiplier 2**-e Lambda: the same directions A, exactly (powers of two),
    # and finite for any finite G.
    e = exponent(jnp.max(jnp.abs(g), axis=(-2, -1), keepdims=True))
    g = g * pow2(-e, g.dtype)
    lam = -0.25 * (_mm(_t(w), g) + _mm(_t(g), w))
    size = math.sqrt(lam.shape[-1] * lam.shape[-2])

    def body(k, carry):
        lam, a, done = carry
        a_k = msign_matrix(g + 2 * _mm(w, lam), msign_steps, msign_dtype)
        h = _mm(_t(w), a_k) + _mm(_t(a_k), w)
        stop = pnorm(h, (-2, -1), 2) / size < tol
        frozen = done[..., None, None]
        a = jnp.where(frozen, a, a_k)
        rate = unscaled(dual_lr * (1 - k.astype(lam.dtype) / dual_steps), -e)
        moved = lam - rate * h
        lam = jnp.where(frozen | stop[..., None, None], lam, moved)
        return lam, a, done | stop

    done = jnp.zeros(w.shape[:-2], bool)
    _, a, _ = jax.lax.fori_loop(0, dual_steps, body, (lam, jnp.zeros_like(g), done))
    new = msign_matrix(w - lr * a, msign_steps, msign_dtype)
    return new - w


def _check_manifold_muon(
    owner, learning_rate, dual_steps, dual_learning_rate, tol, msign_steps, msign_dtype
):
    checks.check_learning_rate(owner, learning_rate)
    _check_steps(owner, "dual_steps", dual_steps)
    checks.check_number(owner, "dual_learning_rate", dual_learning_rate)
    checks.check_number(owner, "tol", tol)
    _check_steps(owner, "msign_steps", msign_steps)
    return _check_dtype(owner, "msign_dtype", msign_dtype)


def _check_matrices(owner: str, params: Any) -> None:
    def one(path, p):
        checks.check_leaf(owner, path, p, units=False)
        if p.ndim < 2:
            raise ValueError(
                f"riemax.{owner}: parameter '{checks.where_of(path)}' has shape "
                f"{tuple(p.shape)}, but manifold Muon needs kernels with at least 2 "
                "axes (the matrix w.reshape(-1, out)). Route other leaves to a "
                "Euclidean optimizer, e.g. with riemax.hybrid(manifold_tx, "
                "euclidean_tx, functools.partial(riemax.labels_by_rule, "
                "pattern='', fan='any'))."
            )

    jax.tree_util.tree_map_with_path(one, params)


def _manifold_muon(
    owner: str,
    learning_rate: optax.ScalarOrSchedule,
    *,
    dual_steps: int,
    dual_learning_rate: float,
    tol: float,
    msign_steps: int,
    msign_dtype: Any,
    stack: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """The manifold-Muon transformation; ``stack=False`` runs every leaf in its
    own loop (for measurements) instead of one loop per matrix shape."""
    msign_dtype = _check_manifold_muon(
        owner,
        learning_rate,
        dual_steps,
        dual_learning_rate,
        tol,
        msign_steps,
        msign_dtype,
    )
    options = {
        "dual_steps": int(dual_steps),
        "dual_lr": dual_learning_rate,
        "tol": tol,
        "msign_steps": int(msign_steps),
        "msign_dtype": msign_dtype,
    }

    def init_fn(params):
        _check_matrices(owner, params)
        return ScaleByManifoldMuonState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted and ignored, as optax's own transforms do
        checks.need_params(owner, params)
        _check_matrices(owner, params)
        leaf_map(owner, lambda u, p: None, updates, params=params, units=False)
        lr = schedule_value(learning_rate, state.count)
        flat_u, treedef = jax.tree_util.tree_flatten(updates)
        flat_p = treedef.flatten_up_to(params)
        # Tall matrices of one shape and dtype run in one loop, stacked.
        views, groups = [], {}
        for i, (u, p) in enumerate(zip(flat_u, flat_p, strict=True)):
            w, transposed = matrix_view(to_acc(p))
            g, _ = matrix_view(u.astype(w.dtype))
            views.append((w, g, transposed))
            key = (w.shape, w.dtype) if stack else i
            groups.setdefault(key, []).append(i)
        deltas: list[Any] = [None] * len(flat_u)
        for members in groups.values():
            w = jnp.stack([views[i][0] for i in members])
            g = jnp.stack([views[i][1] for i in members])
            d = _muon_delta(w, g, jnp.asarray(lr, w.dtype), **options)
            for j, i in enumerate(members):
                p = flat_p[i]
                deltas[i] = from_matrix_view(d[j], views[i][2], p.shape).astype(p.dtype)
        updates = jax.tree_util.tree_unflatten(treedef, deltas)
        return updates, ScaleByManifoldMuonState(
            count=optax.safe_increment(state.count)
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_manifold_muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    dual_steps: int = 100,
    dual_learning_rate: float = 0.01,
    tol: float = 1e-6,
    msign_steps: int = 10,
    msign_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
    r"""The manifold-Muon step: steepest descent under the spectral norm on the
    Stiefel manifold, with the polar retraction.

    Per kernel, with :math:`W` the matrix ``w.reshape(-1, out)`` and :math:`G`
    that of the gradient, both transposed if :math:`W` is wide (and the result
    transposed back), :math:`T` = ``dual_steps``, :math:`\alpha` =
    ``dual_learning_rate``:

    .. math::

      \begin{align*}
        \Lambda &\leftarrow -\tfrac14 (W^\top G + G^\top W) \\
        A_k &= \mathrm{msign}(G + 2 W \Lambda_k), \quad
          H_k = W^\top A_k + A_k^\top W \\
        \Lambda_{k+1} &= \Lambda_k - \alpha (1 - k/T)\, H_k
          \quad (k = 0, \ldots, T-1) \\
        W &\leftarrow \mathrm{msign}(W - \eta A)
      \end{align*}

    where :math:`A = A_k` for the first :math:`k` with
    :math:`\|H_k\|_F / \sqrt{\mathrm{numel}\, H_k} <` ``tol`` and
    :math:`A_{T-1}` if there is none. The update is the difference of the
    kernels. :math:`\mathrm{msign}` is :func:`riemax.msign` (``msign_steps``
    iterations in ``msign_dtype``); the rest is computed in the params' dtype
    promoted to at least float32, on :math:`G` scaled by a power of two (and
    :math:`\alpha` with it), which changes no number but keeps every finite
    gradient finite. A zero gradient gives :math:`A = 0` and the
    retraction :math:`\mathrm{msign}(W)`; a zero kernel moves to
    :math:`-\mathrm{msign}(G)`.

    The dual ascent always runs :math:`T` iterations inside the compiled step
    (no value goes back to the host); a matrix that passed the test keeps its
    :math:`\Lambda` and :math:`A`, so the numbers are those of the loop that
    stops. Kernels whose matrices have one shape run stacked, in one loop.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule of the step
        count.
      dual_steps: :math:`T`, the most dual-ascent iterations (static).
      dual_learning_rate: :math:`\alpha`, the dual step size.
      tol: The stopping threshold of the dual ascent (0: always :math:`T`
        iterations).
      msign_steps: Iterations of every :func:`riemax.msign` (static).
      msign_dtype: Dtype of the :func:`riemax.msign` iterations (static):
        ``jnp.float32`` keeps :math:`\|W^\top W - I\|_F` at about 1e-6;
        ``jnp.bfloat16`` (the original code's choice, for accelerators with
        bfloat16 matrix units; no faster on CPU) leaves it at about 1e-2.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with
      :class:`ScaleByManifoldMuonState`; needs ``params``; every leaf must have
      at least two axes (route others with :func:`riemax.hybrid`). Under
      :func:`optax.inject_hyperparams` list ``dual_steps``, ``msign_steps`` and
      ``msign_dtype`` in ``static_args``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> w = riemax.to_manifold(jax.random.normal(jax.random.key(0), (8, 4)), "msign")
      >>> tx = riemax.scale_by_manifold_muon(0.1)
      >>> g = jax.random.normal(jax.random.key(1), (8, 4))
      >>> updates, state = tx.update(g, tx.init(w), w)
      >>> w = optax.apply_updates(w, updates)
      >>> float(jnp.abs(w.T @ w - jnp.eye(4)).max()) < 1e-5
      True

    References:
      Bernstein, `Modular manifolds
      <https://thinkingmachines.ai/blog/modular-manifolds/>`_, Thinking Machines
      Lab, 2025
    """
    return _manifold_muon(
        "scale_by_manifold_muon",
        learning_rate,
        dual_steps=dual_steps,
        dual_learning_rate=dual_learning_rate,
        tol=tol,
        msign_steps=msign_steps,
        msign_dtype=msign_dtype,
    )


def manifold_muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    dual_steps: int = 100,
    dual_learning_rate: float = 0.01,
    tol: float = 1e-6,
    msign_steps: int = 10,
    msign_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
    r"""Manifold Muon (Bernstein, 2025): every kernel on the Stiefel manifold,
    moved by an orthogonal update.

    It is :func:`scale_by_manifold_muon`; see there for the rule. Like the
    original it has no momentum and no weight decay. Put the kernels on the
    manifold first with :func:`riemax.to_manifold` (``"msign"``), and route
    leaves with fewer than two axes to another optimizer with
    :func:`riemax.hybrid` (the original puts every weight matrix on the manifold:
    ``functools.partial(riemax.labels_by_rule, pattern="", fan="any")``).

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      dual_steps: The most dual-ascent iterations (static).
      dual_learning_rate: The dual step size.
      tol: The stopping threshold of the dual ascent.
      msign_steps: Iterations of the matrix sign (static).
      msign_dtype: Dtype of the matrix sign (static; ``jnp.bfloat16`` for the
        original's numbers).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`; needs ``params``.

    Examples:
      >>> import functools, jax, jax.numpy as jnp, optax, riemax
      >>> params = {"fc1": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))},
      ...           "fc2": {"kernel": jax.random.normal(jax.random.key(1), (8, 4)),
      ...                   "bias": jnp.zeros(4)}}
      >>> labels = functools.partial(riemax.labels_by_rule, pattern="", fan="any")
      >>> params = riemax.to_manifold(params, "msign", labels)
      >>> tx = riemax.hybrid(riemax.manifold_muon(0.1), optax.adamw(1e-3), labels)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> w = optax.apply_updates(params, updates)["fc2"]["kernel"]
      >>> float(jnp.abs(w.T @ w - jnp.eye(4)).max()) < 1e-5
      True

    References:
      Bernstein, `Modular manifolds
      <https://thinkingmachines.ai/blog/modular-manifolds/>`_, Thinking Machines
      Lab, 2025
    """
    return _manifold_muon(
        "manifold_muon",
        learning_rate,
        dual_steps=dual_steps,
        dual_learning_rate=dual_learning_rate,
        tol=tol,
        msign_steps=msign_steps,
        msign_dtype=msign_dtype,
    )


# ---------------------------------------------------------- hyperspherical descent


#: Added to the norm of the tangent direction before dividing by it.
TANGENT_EPS = 1e-12


def _hyperspherical(
    owner: str, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformationExtraArgs:
    checks.check_learning_rate(owner, learning_rate)

    def init(params):
        return ScaleByHypersphericalDescentState(count=jnp.zeros([], jnp.int32))

    def prepare(state, count, updates, params):
        lr = schedule_value(learning_rate, state.count)

        def leaf(g, w):
            w_acc = to_acc(w)
            g = g.astype(w_acc.dtype)
            axes = tuple(range(w.ndim))
            gr = yield from gram_program((w_acc, g), ((0, 1),), axes)
            wg = unscaled(gr.values[0], gr.exps[0] + gr.exps[1])
            a, _ = yield from normalize_program(g - w_acc * wg, axes, TANGENT_EPS)
            q = w_acc - jnp.asarray(lr, w_acc.dtype) * a
            new, _ = yield from normalize_program(q, axes, 0.0)
            return ((new - w_acc).astype(w.dtype),)

        return Step(leaf)

    return stateful(owner, init, prepare, fields=(), units=False)


def scale_by_hyperspherical_descent(
    learning_rate: optax.ScalarOrSchedule,
) -> optax.GradientTransformationExtraArgs:
    r"""The hyperspherical-descent step: each leaf, as one vector, on the unit
    sphere, moved by a tangent step of length :math:`\eta`.

    With :math:`w, g` the leaf and its gradient flattened (the whole tensor is one
    point, not one per unit as in :func:`riemax.sgdg`):

    .. math::

      \begin{align*}
        a &= g - w \langle w, g \rangle, \qquad
        a \leftarrow a / (\|a\| + 10^{-12}) \\
        w &\leftarrow (w - \eta a) / \|w - \eta a\|
      \end{align*}

    The projection assumes :math:`\|w\| = 1` (start with
    :func:`riemax.to_manifold` and ``"normalize"``). A zero gradient gives
    :math:`a = 0`; a zero leaf moves to :math:`-g/\|g\|`, and stays zero where
    the gradient is zero too. Norms and inner products are taken in the params'
    dtype promoted to at least float32, exact for any magnitude.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule of the step
        count.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with
      :class:`ScaleByHypersphericalDescentState`; needs ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> w = riemax.to_manifold(jnp.ones((4, 3)), "normalize")
      >>> tx = riemax.scale_by_hyperspherical_descent(0.1)
      >>> g = jnp.arange(12.0).reshape(4, 3)
      >>> updates, state = tx.update(g, tx.init(w), w)
      >>> round(float(jnp.linalg.norm(optax.apply_updates(w, updates))), 5)
      1.0

    References:
      Bernstein, `Modular manifolds
      <https://thinkingmachines.ai/blog/modular-manifolds/>`_, Thinking Machines
      Lab, 2025
    """
    return _hyperspherical("scale_by_hyperspherical_descent", learning_rate)


def hyperspherical_descent(
    learning_rate: optax.ScalarOrSchedule,
) -> optax.GradientTransformationExtraArgs:
    r"""Hyperspherical descent (Bernstein, 2025): every leaf, as one vector, on
    the unit sphere.

    It is :func:`scale_by_hyperspherical_descent`; see there for the rule. No
    momentum, no weight decay. Start from :func:`riemax.to_manifold` with
    ``"normalize"``.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`; needs ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> params = riemax.to_manifold({"w": jnp.ones((8, 4))}, "normalize")
      >>> tx = riemax.hyperspherical_descent(optax.linear_schedule(0.1, 0.0, 10))
      >>> updates, state = tx.update({"w": jnp.eye(8, 4)}, tx.init(params), params)
      >>> int(state.count)
      1

    References:
      Bernstein, `Modular manifolds
      <https://thinkingmachines.ai/blog/modular-manifolds/>`_, Thinking Machines
      Lab, 2025
    """
    return _hyperspherical("hyperspherical_descent", learning_rate)
