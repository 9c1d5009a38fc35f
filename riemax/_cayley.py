r"""Cayley SGD and Cayley Adam (Li, Fuxin & Todorovic, 2020): steps along the
Cayley curve of the Stiefel manifold, keeping the units of a kernel orthonormal.

Every manifold kernel is one point of the Stiefel manifold
(:mod:`riemax._stiefel`): with :math:`U` the ``(n, p)`` matrix of its units
normalised (one column per unit), a step turns a tangent candidate :math:`V`
into the skew-symmetric direction

.. math::

  W = A U^\top - U A^\top, \qquad A = V - \tfrac12\, U (U^\top V)

and moves along the Cayley curve :math:`Y = U + \alpha W (U + Y) / 2`, solved by
a few fixed-point iterations, with the step capped at
:math:`\alpha = \min(\eta, 1 / (\|W\|_1 + 10^{-8}))`. :math:`W` is ``n x n``
but is never formed inside the iterations: it is applied as the difference of
two rank-``p`` products, :math:`W Z = A (U^\top Z) - U (A^\top Z)`. Only its
1-norm needs all its entries; it is formed once per step, in column blocks of
at most :data:`NORM_BLOCK` and, being skew-symmetric, only on and above the
block diagonal.

Both optimizers act on kernels whose units fit (units <= fan-in); use
:func:`riemax.hybrid` with ``functools.partial(riemax.labels_by_rule,
fan="tall")`` to send the other parameters to a Euclidean optimizer, and
:func:`riemax.to_manifold` (method ``"qr"``) to start from orthonormal kernels.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from riemax import _checks as checks
from riemax._gram import drive, normalize_program
from riemax._leafmap import Step, schedule_value, stateful, zeros_like_state
from riemax._numerics import (
    acc_dtype,
    exponent,
    pnorm,
    pow2,
    root_ema,
    safe_div,
    safe_sqrt,
    to_acc,
    unscaled,
)
from riemax._stiefel import as_matrix, check_tall, mm, qr_columns

#: The constant of the unit normalisation and of the step cap (the original's).
EPS = 1e-8

#: The largest column block in which the 1-norm of the ``n x n`` direction is
#: formed: for a WRN-28-10 kernel (``n = 5760``) six blocks of at most
#: ``5760 x 1024``, instead of the whole matrix at once.
NORM_BLOCK = 1024

_STARTS = ("raw", "projected")


# ------------------------------------------------------------------ the Cayley step


def _skew_norm1(a: jax.Array, u: jax.Array, block: int | None = None) -> jax.Array:
    r"""The induced 1-norm (largest absolute column sum) of
    :math:`W = A U^\top - U A^\top`.

    :math:`W` is formed in square blocks: the diagonal blocks whole, each block
    above them once, its absolute column sums added to its columns and its
    absolute row sums to the columns of its mirror image below the diagonal
    (:math:`|W_{ij}| = |W_{ji}|`).
    """
    block = NORM_BLOCK if block is None else block
    n = a.shape[0]
    left = jnp.concatenate([a, -u], axis=1)  # W = left @ right.T
    right = jnp.concatenate([u, a], axis=1)
    bounds = [(s, min(s + block, n)) for s in range(0, n, block)]
    sums: list[Any] = [0.0] * len(bounds)
    for i, (i0, i1) in enumerate(bounds):
        for j in range(i, len(bounds)):
            j0, j1 = bounds[j]
            part = jnp.abs(mm(left[i0:i1], right[j0:j1].T))
            sums[j] = sums[j] + jnp.sum(part, axis=0)
            if j != i:
                sums[i] = sums[i] + jnp.sum(part, axis=1)
    return jnp.max(jnp.concatenate(sums))


def _cayley(u, a, c, lr, sign, raw_start, *, iterations, start):
    r"""One Cayley step from the normalised units ``u`` (``(n, p)``).

    The direction is :math:`W = c\, W_s`, :math:`W_s = A U^\top - U A^\top` with
    the scaled ``a`` (``c >= 0`` is the scale, a power of two for SGD), so that
    nothing overflows for any finite gradient. Returns the new point and
    :math:`W_s U` (the projected momentum, up to ``c``).

    The loop starts from :math:`U + \mathrm{sign}\, \alpha S` and iterates
    :math:`Y \leftarrow U + \mathrm{sign}\, \alpha W (U + Y) / 2`;
    ``raw_start(kappa, norm1)`` gives :math:`\alpha S` for the raw start from
    :math:`\kappa = \alpha c` and :math:`\|W_s\|_1`.
    """

    def apply(z):
        return mm(a, mm(u.T, z)) - mm(u, mm(a.T, z))

    # alpha W = kappa W_s with kappa = alpha c = min(lr c, 1 / (|W_s|_1 + EPS / c)).
    norm1 = _skew_norm1(a, u)
    den = norm1 + safe_div(EPS, c)
    lr_c = lr * c
    kappa = jnp.where(den > 0, jnp.minimum(lr_c, safe_div(1.0, den)), lr_c)
    wu = apply(u)
    first = raw_start(kappa, norm1) if start == "raw" else kappa * wu
    y = u + sign * first
    step = sign * kappa
    for _ in range(iterations):
        y = u + (0.5 * step) * apply(u + y)
    return y, wu


def _scale_of(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(e, 2**-e)``: the power of two that brings ``v``'s largest element
    below 1 (exact, no gradient)."""
    e = exponent(jnp.max(jnp.abs(v)))
    return e, pow2(-e, v.dtype)


def _normalised_units(params: Any) -> Any:
    """Every kernel's ``(n, p)`` matrix with unit columns ``m / (|m_j| + EPS)``, in
    float32 or wider: one robust-path decision for the whole tree."""
    leaves, treedef = jax.tree.flatten(params)
    programs = [normalize_program(as_matrix(to_acc(w)), (0,), EPS) for w in leaves]
    units = [unit for unit, _ in drive(programs)]
    return jax.tree.unflatten(treedef, units)


def _reorthonormalised(units: Any, count: jax.Array, every: int | None) -> Any:
    """``units`` with their QR retraction on the steps ``every, 2 every, ...``:
    one conditional for the whole tree."""
    if every is None:
        return units
    leaves, treedef = jax.tree.flatten(units)
    if not leaves:
        return units
    fire = count % every == 0
    leaves = jax.lax.cond(fire, qr_columns, list, leaves)
    return jax.tree.unflatten(treedef, leaves)


def _check_tree(owner: str, params: Any) -> None:
    checks.check_params(owner, params, units=False)

    def one(path, p):
        check_tall(owner, f"parameter '{checks.where_of(path)}'", tuple(p.shape))

    jax.tree_util.tree_map_with_path(one, params)


#: The structural options: Python values that shape the compiled step.
STATIC_ARGS = ("keep_momentum", "iterations", "start", "reorthonormalize_every")


def _check_count(owner: str, name: str, value: Any, what: str) -> None:
    """A positive Python int (``what`` describes the accepted values)."""
    if isinstance(value, (jax.Array, jax.core.Tracer)):
        raise TypeError(
            f"riemax.{owner}: {name} must be {what}, got an array: it shapes the "
            "compiled step. Under optax.inject_hyperparams pass "
            f"static_args={STATIC_ARGS!r}."
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"riemax.{owner}: {name} must be {what}, got {value!r}.")
    if value < 1:
        raise ValueError(f"riemax.{owner}: {name} must be at least 1, got {value!r}.")


def _check_cayley(owner, iterations, start, reorthonormalize_every):
    _check_count(owner, "iterations", iterations, "an int")
    checks.check_choice(owner, "start", start, _STARTS)
    if reorthonormalize_every is not None:
        _check_count(
            owner, "reorthonormalize_every", reorthonormalize_every, "an int or None"
        )


# ---------------------------------------------------------------------- Cayley SGD


class ScaleByCayleySgdState(NamedTuple):
    """State of :func:`scale_by_cayley_sgd`: step count and, with
    ``keep_momentum``, the projected momentum of every kernel (else ``None``)."""

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    trace: optax.Params


def _check_sgd(owner, learning_rate, momentum, keep_momentum, *rest):
    checks.check_learning_rate(owner, learning_rate)
    checks.check_momentum(owner, momentum)
    if not isinstance(keep_momentum, bool):
        static = (
            " (it is static: under optax.inject_hyperparams pass "
            f"static_args={STATIC_ARGS!r})"
        )
        raise TypeError(
            f"riemax.{owner}: keep_momentum must be True or False, "
            f"got {keep_momentum!r}"
            + (static if isinstance(keep_momentum, jax.Array) else "")
            + "."
        )
    _check_cayley(owner, *rest)


def _cayley_sgd(
    owner, learning_rate, momentum, keep_momentum, iterations, start, every
):
    _check_sgd(owner, learning_rate, momentum, keep_momentum, iterations, start, every)
    fields = ("trace",) if keep_momentum else ()

    def init(params):
        _check_tree(owner, params)
        trace = zeros_like_state(params, None) if keep_momentum else None
        return ScaleByCayleySgdState(count=jnp.zeros([], jnp.int32), trace=trace)

    def prepare(state, count, updates, params):
        _check_tree(owner, params)
        lr = schedule_value(learning_rate, state.count)
        units = _reorthonormalised(_normalised_units(params), count, every)

        def leaf(g, *rest):
            *trace, u, w = rest
            gm = as_matrix(to_acc(g))
            v = -gm
            if trace:
                v = momentum * as_matrix(to_acc(trace[0])) + v
            e, f = _scale_of(v)
            vs = v * f
            a = vs - 0.5 * mm(u, mm(u.T, vs))
            c = pow2(e, vs.dtype)
            y, wu = _cayley(
                u,
                a,
                c,
                lr,
                1.0,
                lambda kappa, _: kappa * vs,  # alpha V = kappa V 2**-e
                iterations=iterations,
                start=start,
            )
            delta = (y - as_matrix(to_acc(w))).reshape(w.shape).astype(w.dtype)
            if not trace:
                return (delta,)
            return delta, unscaled(wu, e).reshape(w.shape)

        return Step(leaf, extra=(units,))

    return stateful(owner, init, prepare, fields=fields, units=False)


def scale_by_cayley_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    *,
    keep_momentum: bool = False,
    iterations: int = 5,
    start: str = "raw",
    reorthonormalize_every: int | None = 101,
) -> optax.GradientTransformationExtraArgs:
    r"""The Cayley SGD step on every kernel (one point of the Stiefel manifold
    each).

    Per kernel, with :math:`M` its ``(n, p)`` matrix view, :math:`G` the
    gradient's, :math:`t` the step count and :math:`V_\mathrm{prev}` the stored
    momentum:

    .. math::

      \begin{align*}
        U &= \bigl(M_j / (\|M_j\| + 10^{-8})\bigr)_j
          \quad (\mathrm{qf}(U) \text{ on steps } k, 2k, \ldots) \\
        V &= \mu V_\mathrm{prev} - G, \qquad
        W = A U^\top - U A^\top, \quad A = V - \tfrac12 U (U^\top V) \\
        \alpha &= \min\bigl(\eta, 1/(\|W\|_1 + 10^{-8})\bigr), \qquad
        Y_0 = U + \alpha S, \qquad
        Y_{i+1} = U + \tfrac{\alpha}{2} W (U + Y_i) \\
        \text{update} &= Y_s - M, \qquad
        V_\mathrm{prev} \leftarrow W U \text{ (with keep\_momentum)}
      \end{align*}

    with :math:`s` ``iterations`` and the start :math:`S = V` (``"raw"``) or
    :math:`W U` (``"projected"``). The defaults compute what the authors' code
    computes: its momentum buffer is never written (so :math:`V = -G` and
    ``momentum`` has no effect), 5 iterations from the raw momentum.
    ``keep_momentum=True, iterations=2, start="projected"`` is the paper's
    algorithm. The stored momentum is used at the next point as it is (the
    skew construction projects it). The gradient is scaled by a power of two
    before the step (exact), so any finite gradient gives a finite step; a zero
    gradient only normalises the units.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      momentum: :math:`\mu`, in ``[0, 1]``; used only with ``keep_momentum``.
      keep_momentum: Store :math:`W U` as the momentum (the paper) instead of
        leaving the buffer at zero (the code). Static.
      iterations: Fixed-point iterations of the Cayley curve (code: 5, paper: 2).
        Static.
      start: ``"raw"`` (code) or ``"projected"`` (paper). Static.
      reorthonormalize_every: :math:`k`: replace :math:`U` by its QR retraction
        on steps :math:`k, 2k, \ldots` (the first update is step 1), inside the
        compiled step; ``None``: never. Static.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`ScaleByCayleySgdState`;
      needs ``params``; every leaf must be a kernel with at most as many units as
      fan-in (the error names the leaf).

    .. note:: ``keep_momentum``, ``iterations``, ``start`` and
      ``reorthonormalize_every`` shape the compiled step: under
      :func:`optax.inject_hyperparams` list them in ``static_args``
      (:data:`STATIC_ARGS`).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> from riemax import diagnostics
      >>> w = riemax.qr_retraction(jax.random.normal(jax.random.key(0), (3, 3, 4, 8)))
      >>> tx = riemax.scale_by_cayley_sgd(0.8)
      >>> g = jax.random.normal(jax.random.key(1), w.shape)
      >>> updates, state = tx.update(g, tx.init(w), w)
      >>> bool(diagnostics.orthogonality_error(optax.apply_updates(w, updates)) < 1e-4)
      True

    References:
      Li, Fuxin and Todorovic, `Efficient Riemannian optimization on the Stiefel
      manifold via the Cayley transform <https://arxiv.org/abs/2002.01113>`_,
      ICLR 2020
    """
    return _cayley_sgd(
        "scale_by_cayley_sgd",
        learning_rate,
        momentum,
        keep_momentum,
        iterations,
        start,
        reorthonormalize_every,
    )


def cayley_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    *,
    keep_momentum: bool = False,
    iterations: int = 5,
    start: str = "raw",
    reorthonormalize_every: int | None = 101,
) -> optax.GradientTransformationExtraArgs:
    r"""Cayley SGD (Li et al., 2020): SGD on the Stiefel manifold of every kernel.

    The step of :func:`scale_by_cayley_sgd` (see there for the update rule); the
    defaults are the authors' code, ``keep_momentum=True, iterations=2,
    start="projected"`` the paper. Start from orthonormal kernels
    (:func:`riemax.to_manifold` with ``"qr"``) and send the other parameters to
    Nesterov SGD with :func:`riemax.hybrid`; the authors' learning rates are 0.8
    on the manifold and 0.1 elsewhere.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      momentum: :math:`\mu` (only with ``keep_momentum``).
      keep_momentum: The paper's momentum (True) or the code's none (False).
      iterations: Fixed-point iterations (code 5, paper 2).
      start: ``"raw"`` (code) or ``"projected"`` (paper).
      reorthonormalize_every: QR re-orthonormalisation every this many steps;
        ``None`` turns it off.

    Returns:
      A :class:`optax.GradientTransformation` for tall kernels.

    Examples:
      >>> import functools, jax, jax.numpy as jnp, optax, riemax
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
      >>> params = {"conv": {"kernel": kernel, "bias": jnp.zeros(8)}}
      >>> labels = functools.partial(riemax.labels_by_rule, fan="tall")
      >>> params = riemax.to_manifold(params, "qr", labels)
      >>> tx = riemax.hybrid(riemax.cayley_sgd(0.8),
      ...                    optax.sgd(0.1, 0.9, nesterov=True), labels)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Li, Fuxin and Todorovic, `Efficient Riemannian optimization on the Stiefel
      manifold via the Cayley transform <https://arxiv.org/abs/2002.01113>`_,
      ICLR 2020
    """
    return _cayley_sgd(
        "cayley_sgd",
        learning_rate,
        momentum,
        keep_momentum,
        iterations,
        start,
        reorthonormalize_every,
    )


# --------------------------------------------------------------------- Cayley Adam


class ScaleByCayleyAdamState(NamedTuple):
    r"""State of :func:`scale_by_cayley_adam`: step count, first moment of every
    kernel (projected, undivided) and one second moment per kernel, stored as
    its root :math:`\sqrt{v}` (finite for every finite gradient)."""

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    mu: optax.Params
    nu: optax.Params


def _check_adam(owner, learning_rate, b1, b2, eps, *rest):
    checks.check_learning_rate(owner, learning_rate)
    checks.check_adam(owner, b1, b2, eps)
    _check_cayley(owner, *rest)


def _adam_root(nu: jax.Array, bc2: jax.Array, eps: Any) -> jax.Array:
    """``sqrt(nu**2 / bc2 + eps)`` without overflow, zero-safe."""
    eps = jnp.asarray(eps, nu.dtype)
    e = exponent(jnp.maximum(nu, jnp.sqrt(eps)))
    f = pow2(-e, nu.dtype)
    return unscaled(safe_sqrt((nu * f) ** 2 / bc2 + eps * f * f), e)


def _cayley_adam(owner, learning_rate, b1, b2, eps, iterations, start, every):
    _check_adam(owner, learning_rate, b1, b2, eps, iterations, start, every)

    def init(params):
        _check_tree(owner, params)
        return ScaleByCayleyAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros_like_state(params, None),
            nu=jax.tree.map(lambda p: jnp.zeros([], acc_dtype(p.dtype)), params),
        )

    def prepare(state, count, updates, params):
        _check_tree(owner, params)
        lr = schedule_value(learning_rate, state.count)
        units = _reorthonormalised(_normalised_units(params), count, every)

        def leaf(g, mu, nu, u, w):
            gm = as_matrix(to_acc(g))
            m = b1 * as_matrix(to_acc(mu)) + (1 - b1) * gm
            nu = root_ema(nu, pnorm(gm, (0, 1), 2), b2)
            k = count.astype(m.dtype)
            bc1, bc2 = 1 - b1**k, 1 - b2**k
            r = _adam_root(nu, bc2, eps)
            # W = skew(m / bc1) / r = c skew(m 2**-e), c = 2**e / (bc1 r).
            e, f = _scale_of(m)
            ms = m * f
            a = ms - 0.5 * mm(u, mm(u.T, ms))
            c = unscaled(safe_div(1.0, bc1 * r), e)
            # The raw start is m itself, at alpha = min(lr, 1 / (|W|_1 + EPS)) (W
            # itself is of moderate size: m / bc1 over the root of v / bc2).
            y, wu = _cayley(
                u,
                a,
                c,
                lr,
                -1.0,
                lambda _, norm1: jnp.minimum(lr, 1 / (c * norm1 + EPS)) * m,
                iterations=iterations,
                start=start,
            )
            delta = (y - as_matrix(to_acc(w))).reshape(w.shape).astype(w.dtype)
            # Stored m = (W U) r bc1 = skew(m) U.
            return delta, unscaled(wu, e).reshape(w.shape), nu

        return Step(leaf, extra=(units,))

    return stateful(owner, init, prepare, fields=("mu", "nu"), units=False)


def scale_by_cayley_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
    *,
    iterations: int = 5,
    start: str = "raw",
    reorthonormalize_every: int | None = 101,
) -> optax.GradientTransformationExtraArgs:
    r"""The Cayley Adam step on every kernel (one point of the Stiefel manifold
    each).

    Per kernel, with :math:`U` and :math:`W = \mathrm{skew}(\cdot)` as in
    :func:`scale_by_cayley_sgd`, :math:`G` the gradient's matrix view and
    :math:`t` the step count:

    .. math::

      \begin{align*}
        m' &= \beta_1 m + (1 - \beta_1) G, \qquad
        v' = \beta_2 v + (1 - \beta_2) \textstyle\sum G^2
          \quad \text{(one scalar per kernel)} \\
        r &= \sqrt{v' / (1 - \beta_2^t) + \epsilon}, \qquad
        W = \mathrm{skew}\bigl(m' / (1 - \beta_1^t)\bigr) / r, \qquad
        \alpha = \min\bigl(\eta, 1/(\|W\|_1 + 10^{-8})\bigr) \\
        Y_0 &= U - \alpha S, \qquad
        Y_{i+1} = U - \tfrac{\alpha}{2} W (U + Y_i), \qquad
        \text{update} = Y_s - M \\
        m &\leftarrow W U\, r\, (1 - \beta_1^t), \qquad v \leftarrow v'
      \end{align*}

    with the start :math:`S = m'` (``"raw"``, the authors' code) or :math:`W U`
    (``"projected"``, the paper). :math:`\epsilon` sits *inside* the square root
    and the second moment is one scalar per kernel, as in the code; the state
    keeps :math:`\sqrt{v}` (:class:`ScaleByCayleyAdamState`). With
    :math:`\epsilon = 0` and a zero gradient, the direction is zero.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      b1: :math:`\beta_1`, in ``[0, 1)``.
      b2: :math:`\beta_2`, in ``[0, 1)`` (the authors' 0.99).
      eps: :math:`\epsilon`, inside the square root.
      iterations: Fixed-point iterations (code 5, paper 2). Static.
      start: ``"raw"`` (code) or ``"projected"`` (paper). Static.
      reorthonormalize_every: QR re-orthonormalisation of :math:`U` on steps
        :math:`k, 2k, \ldots`; ``None``: never. Static.

    Returns:
      A :class:`optax.GradientTransformation` with
      :class:`ScaleByCayleyAdamState`; needs ``params``; every leaf must be a
      kernel with at most as many units as fan-in.

    .. note:: ``iterations``, ``start`` and ``reorthonormalize_every`` shape the
      compiled step: under :func:`optax.inject_hyperparams` list them in
      ``static_args``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> from riemax import diagnostics
      >>> w = riemax.qr_retraction(jax.random.normal(jax.random.key(0), (16, 6)))
      >>> tx = riemax.scale_by_cayley_adam(0.5)
      >>> g = jax.random.normal(jax.random.key(1), w.shape)
      >>> updates, state = tx.update(g, tx.init(w), w)
      >>> state.nu.shape
      ()
      >>> bool(diagnostics.orthogonality_error(optax.apply_updates(w, updates)) < 1e-5)
      True

    References:
      Li, Fuxin and Todorovic, `Efficient Riemannian optimization on the Stiefel
      manifold via the Cayley transform <https://arxiv.org/abs/2002.01113>`_,
      ICLR 2020
    """
    return _cayley_adam(
        "scale_by_cayley_adam",
        learning_rate,
        b1,
        b2,
        eps,
        iterations,
        start,
        reorthonormalize_every,
    )


def cayley_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
    *,
    iterations: int = 5,
    start: str = "raw",
    reorthonormalize_every: int | None = 101,
) -> optax.GradientTransformationExtraArgs:
    r"""Cayley Adam (Li et al., 2020): Adam on the Stiefel manifold of every
    kernel.

    The step of :func:`scale_by_cayley_adam` (see there for the update rule);
    the defaults are the authors' code, ``iterations=2, start="projected"`` the
    paper. The authors train the other parameters with Nesterov SGD, not Adam
    (learning rates 0.5 on the manifold, 0.1 elsewhere).

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      b1: First-moment decay.
      b2: Decay of the one second moment per kernel.
      eps: Inside the square root.
      iterations: Fixed-point iterations (code 5, paper 2).
      start: ``"raw"`` (code) or ``"projected"`` (paper).
      reorthonormalize_every: QR re-orthonormalisation every this many steps;
        ``None`` turns it off.

    Returns:
      A :class:`optax.GradientTransformation` for tall kernels.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> w = riemax.qr_retraction(jax.random.normal(jax.random.key(0), (3, 3, 4, 8)))
      >>> tx = riemax.cayley_adam(0.5)
      >>> updates, state = tx.update(jnp.ones_like(w), tx.init(w), w)
      >>> riemax.cayley_adam(0.5, b2=1.0)
      Traceback (most recent call last):
        ...
      ValueError: riemax.cayley_adam: b2 must be in [0, 1), got 1.0.

    References:
      Li, Fuxin and Todorovic, `Efficient Riemannian optimization on the Stiefel
      manifold via the Cayley transform <https://arxiv.org/abs/2002.01113>`_,
      ICLR 2020
    """
    return _cayley_adam(
        "cayley_adam",
        learning_rate,
        b1,
        b2,
        eps,
        iterations,
        start,
        reorthonormalize_every,
    )


__all__ = [
    "ScaleByCayleyAdamState",
    "ScaleByCayleySgdState",
    "cayley_adam",
    "cayley_sgd",
    "scale_by_cayley_adam",
    "scale_by_cayley_sgd",
]
