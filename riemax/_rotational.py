r"""The rotational wrapper (Kosson, Messmer & Jaggi, 2024): any optax direction
turned into rotations of every unit at a controlled average rate.

With weight decay, the norm of a scale-invariant unit settles where decay and
gradient growth balance, and the unit then rotates at an *equilibrium* angular
rate set by the learning rate and the weight decay. The wrapper imposes that
equilibrium from the first step: every unit ``w[..., j]`` (Flax layout; all axes
but the last) keeps its norm, and moves by an angle whose running average is the
``rate`` (:func:`equilibrium_rate` gives the paper's rates of AdamW, SGDM and
Lion).

The inner transformation only supplies a *direction* ``u`` (the quantity its
optimizer would multiply by ``-learning_rate``): ``optax.scale_by_adam()``,
``optax.trace(momentum)``, ``optax.scale_by_lion()``. Because ``u`` is divided by
its own running root mean square per unit, the inner's scale cancels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from riemax import _checks as checks
from riemax._gram import (
    Batched,
    Fallback,
    Gram,
    Program,
    drive,
    gram_request,
    norm,
    norm_program,
    normalize,
)
from riemax._labels import MANIFOLD, check_labels
from riemax._leafmap import Step, leaf_map, schedule_value, stateful, zeros_per_unit
from riemax._numerics import (
    PAIR_GRAM,
    TRUSTED_FRACTION,
    centered,
    combination,
    group_size,
    kept_shape,
    root_ema,
    safe_div,
    safe_sqrt,
    to_acc,
    unit_axes,
    unscaled,
)
from riemax._sums import as_matrix
from riemax._tree import path_str

#: The inner optimizers whose equilibrium rate :func:`equilibrium_rate` knows.
INNERS = ("adamw", "sgdm", "lion")


class RotationalState(NamedTuple):
    """State of :func:`rotational`: step count, the inner state, the per-unit root
    mean square of the rotational direction, and the per-unit norm kept.

    ``nu`` holds :math:`\\sqrt{s / n}` per unit: the square root of the
    original's moving average :math:`s` of :math:`\\|u\\|^2`, divided by the unit
    size. ``radius`` is 0 until the first step stores it.
    """

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    inner_state: optax.OptState
    nu: optax.Params
    radius: optax.Params


def _check_centrable(path, w) -> None:
    """With ``zero_mean``, a unit needs at least 3 elements: a centred unit of 2
    is one of the two points ``+-(r, -r)/sqrt(2)`` (no direction to turn in, and
    rounding drifts it off the centred line), a centred unit of 1 is 0."""
    size = math.prod(w.shape[:-1])
    if size < 3:
        raise ValueError(
            f"riemax.rotational: parameter '{path_str(path) or '<root>'}' of shape "
            f"{tuple(w.shape)} has units of {size} element(s); zero_mean=True needs "
            "at least 3 (a centred unit of 2 elements cannot turn). Pass "
            "zero_mean=False, or route this leaf to another optimizer."
        )


def _radius(w: jax.Array, zero_mean: bool) -> Program:
    """``||w - mean(w)||`` (or ``||w||``) per unit, for any magnitude (a program
    for :func:`riemax._numerics.drive`)."""
    axes = unit_axes(w.ndim)
    if not zero_mean:
        return (yield from norm_program(w, axes))
    c, e = centered(w, axes)
    return unscaled((yield from norm_program(c, axes)), e)


def _direction(gr: Gram, inputs, leaf=None):
    """``(kappa, mu, vv, pv, cancels)`` for every unit of the step: the centred
    direction ``v~ = u~ - kappa p~ - mu``, from the Gram identity (exact unless it
    cancels) ``|v~|^2`` and ``<p~, v~>``, and 1 where it cancels (0 elsewhere).
    ``inputs``: the radius and size."""
    r, n, c = inputs
    if len(gr.values) == 5:
        pp, pu, uu, sum_p, sum_u = gr.values
    else:
        pp, pu, uu = gr.values
        sum_p = sum_u = jnp.zeros_like(pp)
    # u <- u - p <u, p> / r**2, then minus its mean. The sums are those of the
    # shifted direction u - c (:func:`_shift`): <p, u> = <p, u - c> + c sum(p),
    # and removing the mean removes the shift.
    r_s = unscaled(r, -gr.exps[0])
    c_s = unscaled(c, -gr.exps[1])
    kappa = safe_div(pu + c_s * sum_p, r_s * r_s)
    mu = (sum_u - kappa * sum_p) / n
    vv = combination((1.0, -kappa), (uu, pu, pp), PAIR_GRAM) - n * mu * mu
    pv = pu - kappa * pp - mu * sum_p
    cancels = jnp.where(vv < TRUSTED_FRACTION * uu, 1.0, 0.0).astype(vv.dtype)
    # The mean taken from u~ itself (the shift put back): v~ = u~ - kappa p~ - mu.
    return kappa, mu + c_s, vv, pv, cancels


def _step_units(inputs, *, rate, count, decay, eps):
    """The rest of the step for every unit at once: ``(nu, phi, gamma, kappa,
    mu)``, the new point being ``phi (p~ - gamma v~)``."""
    gr, vv, pv, nu, r, n, c = inputs
    kappa, mu, _, _, _ = _direction(gr, (r, n, c))
    pp, e_u, dtype = gr.values[0], gr.exps[1], nu.dtype
    vv = jnp.maximum(vv, 0)
    # s <- (1 - rho) |v|**2 + rho s, kept as the root mean square nu = sqrt(s / n).
    nu = root_ema(nu, unscaled(safe_sqrt(vv / n), e_u), decay)
    bc = 1 - decay ** count.astype(dtype)
    # p <- p - rate r v / (a + eps) with a = sqrt(s / bc): on the scale of p,
    # p~ - gamma v~ with gamma = rate r~ / (a~ + eps~).
    a_s = jnp.sqrt(n) * safe_div(unscaled(nu, -e_u), jnp.sqrt(bc))
    r_s = unscaled(r, -gr.exps[0])
    gamma = rate * r_s * safe_div(1.0, a_s + unscaled(eps, -e_u, dtype))
    # p <- p r / |p|.
    big = safe_sqrt(combination((1.0, -gamma), (pp, pv, vv), PAIR_GRAM))
    return nu, safe_div(r, big), gamma, kappa, mu


#: Rows of a unit whose mean is the shift of :func:`_shift`.
SHIFT_ROWS = 32


def _shift(u: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Per unit, the mean of :data:`SHIFT_ROWS` rows of ``u`` spread evenly over
    the unit (0 where it is not finite or not below 2**100, so that ``u - c``
    cannot overflow).

    The rotational direction loses its per-unit mean. Where that mean is about
    half of ``u``'s squared norm or more (the inner's output is not orthogonal
    to the constant vector), the Gram identity for the centred norm loses more
    than the one bit it is trusted with, and the step sums the centred direction
    again: on most steps of a ResNet-20 trained on random batches. Summing
    ``u - c`` instead, with ``c`` an estimate of the mean, keeps the identity
    exact there (every ``c`` gives the same centred direction); rows spread over
    the unit estimate it better than the first ones (one spatial tap)."""
    m = as_matrix(u, axes)
    c = jnp.mean(m[:: max(1, m.shape[0] // SHIFT_ROWS)][:SHIFT_ROWS], axis=0)
    c = jnp.where(jnp.abs(c) < 2.0**100, c, jnp.zeros_like(c))
    return c.reshape(kept_shape(u.shape, axes))


def _rotate(p, u, r, nu, *, zero_mean, derive, units):
    """One rotational step of one kernel: ``(update, nu)`` (accumulation dtype).

    On the arrays scaled per unit, ``p~ = p 2**-e_p`` and ``u~ = u 2**-e_u``:
    the projected, centred direction is ``v~ = u~ - kappa p~ - mu`` and the new
    point ``(r / N) (p~ - gamma v~)``, with ``N`` its norm, all from one Gram pass;
    the per-unit math (``derive``, ``units``) runs once for every leaf.
    """
    axes = unit_axes(p.ndim)
    n = jnp.asarray(group_size(p.shape, axes), p.dtype)
    pairs = ((0, 0), (0, 1), (1, 1))
    if zero_mean:
        pairs += ((0, None), (1, None))
        c = _shift(u, axes)
    else:
        c = jnp.zeros(r.shape, u.dtype)
    # The sums are those of u - c, formed inside the summing loops only (the
    # writes read u itself): a shifted copy would be stored on every step.
    gr = yield gram_request(
        (p, u),
        pairs,
        axes,
        inputs=(r, n, c),
        derive=derive,
        forms=(None, (jnp.subtract, (u, c))) if zero_mean else None,
    )
    # Units where the Gram identity cancels are tested once for every unit of
    # the step; the flat vv and pv cross the branch as single arrays, and the
    # branch reads each leaf's part of kappa and mu.
    parts = gr.derived

    def direct():
        pt = p * gr.factor(0)
        v = (u * gr.factor(1) - parts[0] * pt) - parts[1]
        return [as_matrix(v, axes), as_matrix(pt, axes)]

    vv, pv = yield Fallback(
        (parts[2], parts[3]),
        parts[4] > 0,
        direct,
        ((0, 0), (1, 0)),
        whole=parts.arrays[4],
        whole_value=(parts.arrays[2], parts.arrays[3]),
        span=(parts.start, parts.stop),
    )
    nu, phi, gamma, kappa, mu = yield Batched(
        units, (gr, vv, pv, nu, r, n, c), gr.values[0].shape
    )
    pt = p * gr.factor(0)
    new = phi * (pt - gamma * ((u * gr.factor(1) - kappa * pt) - mu))
    return new - p, nu


def rotational(
    inner: optax.GradientTransformation,
    rate: optax.ScalarOrSchedule,
    *,
    zero_mean: bool = True,
    decay: float = 0.9,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    r"""Rotates every kernel unit at the average angular rate ``rate``, in the
    direction given by any optax transformation.

    Per unit ``w`` (Flax: ``w[..., j]``) with ``n`` elements, ``u`` the inner's
    output (a direction: the update is :math:`-u` up to scale), ``t`` the step
    count and :math:`r` the unit's norm, stored at the first step
    (:math:`\|w - \bar w\|` with ``zero_mean``, else :math:`\|w\|`):

    .. math::

      \begin{align*}
        u &\leftarrow u - w\,\langle u, w\rangle / r^2, \qquad
        u \leftarrow u - \bar u \text{ (with zero\_mean)} \\
        s &\leftarrow (1-\rho)\,\|u\|^2 + \rho\, s, \qquad
        a = \sqrt{s / (1 - \rho^t)} \\
        w' &= w - \eta_r\, r\, \frac{u}{a + \epsilon}, \qquad
        w \leftarrow w'\, r / \|w'\|
      \end{align*}

    Every unit keeps the norm :math:`r`; its step turns it by about
    :math:`\eta_r \|u\|/a`, whose average is :math:`\eta_r`. With ``zero_mean``,
    centre the units once at construction with :func:`center_units` (which keeps
    their norms); otherwise the first step rescales each unit to the norm of its
    centred version, as the original does. A zero unit stays zero.

    All kernels given to it rotate (leaves need at least two axes); route other
    parameters to an ordinary optimizer with :func:`riemax.hybrid` or
    :func:`optax.partition`. The inner transformation runs in float32 (or wider)
    for bf16/fp16 params, as riemax's own state does.

    Args:
      inner: An :class:`optax.GradientTransformation` whose output is a direction
        (e.g. ``optax.scale_by_adam()``, ``optax.trace(momentum)``,
        ``optax.scale_by_lion()``), *not* an optimizer that already includes a
        negative learning rate (that would turn the steps around).
      rate: :math:`\eta_r`, the average angle per step in radians: a float or an
        optax schedule (see :func:`equilibrium_rate`).
      zero_mean: Keep the direction (and, with :func:`center_units`, the units)
        centred. Static.
      decay: :math:`\rho`, the decay of the running :math:`\|u\|^2`, in
        ``[0, 1)``.
      eps: Added to :math:`a`.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`RotationalState`; last
      in a chain; needs ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> w = riemax.center_units(jax.random.normal(jax.random.key(0), (16, 4)))
      >>> rate = riemax.equilibrium_rate("adamw", learning_rate=1e-3,
      ...                                weight_decay=0.05)
      >>> tx = riemax.rotational(optax.scale_by_adam(), rate)
      >>> state = tx.init(w)
      >>> g = jax.random.normal(jax.random.key(1), w.shape)
      >>> updates, state = tx.update(g, state, w)
      >>> new = optax.apply_updates(w, updates)
      >>> bool(jnp.allclose(jnp.linalg.norm(new, axis=0),
      ...                   jnp.linalg.norm(w, axis=0), rtol=1e-6))
      True
      >>> cos = jnp.sum(new * w, axis=0) / jnp.sum(w * w, axis=0)
      >>> bool(jnp.allclose(jnp.arccos(cos), rate, rtol=0.05))  # first step: a = |u|
      True

    References:
      Kosson, Messmer and Jaggi, `Rotational equilibrium: how weight decay balances
      learning across neural networks <https://arxiv.org/abs/2305.17212>`_, ICML
      2024
    """
    owner = "rotational"
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"riemax.{owner}: inner must be an optax.GradientTransformation, got "
            f"{type(inner).__name__}."
        )
    checks.check_number(owner, "rate", rate, allow_schedule=True)
    if not isinstance(zero_mean, bool):
        raise TypeError(
            f"riemax.{owner}: zero_mean must be True or False, got {zero_mean!r}."
        )
    checks.check_rate(owner, "decay", decay)
    checks.check_number(owner, "eps", eps)

    def init(params):
        if zero_mean:
            jax.tree_util.tree_map_with_path(_check_centrable, params)
        acc = jax.tree.map(to_acc, params)
        return RotationalState(
            count=jnp.zeros([], jnp.int32),
            inner_state=inner.init(acc),
            nu=zeros_per_unit(params),
            radius=zeros_per_unit(params),
        )

    def prepare(state, count, updates, params):
        leaf_map(owner, lambda g, w: None, updates, params=params)
        if zero_mean:
            jax.tree_util.tree_map_with_path(_check_centrable, params)
        acc = jax.tree.map(to_acc, params)
        direction, inner_state = inner.update(
            jax.tree.map(to_acc, updates), state.inner_state, acc
        )
        eta = schedule_value(rate, state.count)
        # The radius of every unit, taken once at the first step.
        leaves, treedef = jax.tree.flatten(acc)

        def measured():
            radii = drive([_radius(p, zero_mean) for p in leaves])
            return jax.tree.unflatten(treedef, radii)

        radius = jax.lax.cond(state.count == 0, measured, lambda: state.radius)

        # One function object per step: every leaf's requests resolve together.
        units = functools.partial(
            _step_units, rate=eta, count=count, decay=decay, eps=eps
        )

        def leaf(u, nu, r, w):
            p = to_acc(w)
            delta, nu = yield from _rotate(
                p, to_acc(u), r, nu, zero_mean=zero_mean, derive=_direction, units=units
            )
            return delta.astype(w.dtype), nu, r

        return Step(
            leaf,
            updates=direction,
            state=state._replace(radius=radius),
            replace={"inner_state": inner_state},
        )

    return stateful(owner, init, prepare, fields=("nu", "radius"))


def center_units(params: optax.Params, labels: Any = None) -> optax.Params:
    r"""Centres every kernel unit, keeping its norm (the rotational wrapper's
    construction with ``zero_mean``).

    .. math::

      w_j \leftarrow \|w_j\|\, \frac{w_j - \bar w_j}{\|w_j - \bar w_j\|}

    for every unit ``w[..., j]`` of every leaf with at least two axes (or, with
    ``labels``, of the leaves labelled ``"manifold"``); other leaves are returned
    unchanged. A unit that is constant (zero included) becomes zero.

    Args:
      params: A tree of floating-point arrays.
      labels: Optional label tree or callable ``params -> label tree`` (as
        :func:`riemax.hybrid` takes): only ``"manifold"`` leaves are centred.

    Returns:
      The centred params (same tree, shapes and dtypes).

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = riemax.center_units(jnp.array([[1.0, 0.0], [3.0, 2.0]]))
      >>> [round(float(x), 5) for x in w.sum(axis=0)]  # centred
      [0.0, 0.0]
      >>> [round(float(x), 5) for x in jnp.linalg.norm(w, axis=0)]  # norms kept
      [3.16228, 2.0]
    """
    owner = "center_units"
    checks.check_params(owner, params, units=False)
    if labels is None:
        chosen = jax.tree.map(lambda w: w.ndim >= 2, params)
    else:
        chosen = jax.tree.map(lambda lab: lab == MANIFOLD, check_labels(params, labels))

    def one(w, pick):
        if not pick:
            return w
        if w.ndim < 2:
            raise ValueError(
                f"riemax.{owner}: a leaf labelled {MANIFOLD!r} has shape "
                f"{tuple(w.shape)}; units need at least 2 axes."
            )
        axes = unit_axes(w.ndim)
        acc = to_acc(w)
        c, _ = centered(acc, axes)
        return (normalize(c, axes, 0.0)[0] * norm(acc, axes)).astype(w.dtype)

    return jax.tree.map(one, params, chosen)


def _root(x: Any) -> Any:
    """``sqrt(x)`` for numbers (a float) and traced values (an array)."""
    return math.sqrt(x) if isinstance(x, (int, float)) else jnp.sqrt(x)


def equilibrium_rate(
    inner: str,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    b1: float = 0.9,
    b2: float = 0.99,
    momentum: float = 0.0,
) -> Any:
    r"""The equilibrium angular update rate of a scale-invariant unit.

    The average angle per step at which a unit trained by ``inner`` with
    decoupled weight decay rotates once its norm has reached equilibrium (Kosson et
    al., 2024), with :math:`\eta` the learning rate and :math:`\lambda` the weight
    decay:

    .. math::

      \eta_r^{\mathrm{AdamW}} = \sqrt{\frac{2\eta\lambda(1-\beta_1)}{1+\beta_1}},
      \quad
      \eta_r^{\mathrm{SGDM}} = \sqrt{\frac{2\eta\lambda}{1+\mu}}, \quad
      \eta_r^{\mathrm{Lion}} = \sqrt{\frac{\pi}{2}}\sqrt{2\eta\lambda}
        \sqrt{(1-\beta_1)^2 + \frac{\beta_1^2(1-\beta_2)}{1+\beta_2}}

    Args:
      inner: ``"adamw"``, ``"sgdm"`` or ``"lion"``.
      learning_rate: :math:`\eta`, a float or an optax schedule (then the result is
        a schedule of the rate).
      weight_decay: :math:`\lambda` (decoupled, as in AdamW / Lion; for SGDM the
        coupled L2 coefficient), ``>= 0``.
      b1: :math:`\beta_1` (AdamW, Lion).
      b2: :math:`\beta_2` (Lion).
      momentum: :math:`\mu` (SGDM).

    Returns:
      The rate :math:`\eta_r` for :func:`rotational` (a float, or a schedule).

    Raises:
      ValueError: for an unknown ``inner`` (the message lists the known ones) or
        an argument out of range.

    Examples:
      >>> import riemax
      >>> round(riemax.equilibrium_rate("sgdm", 0.5, 1e-4, momentum=0.9), 6)
      0.007255
      >>> rate = riemax.equilibrium_rate("adamw", lambda count: 1e-3, 0.1)
      >>> round(float(rate(0)), 6)
      0.003244

    References:
      Kosson, Messmer and Jaggi, `Rotational equilibrium: how weight decay balances
      learning across neural networks <https://arxiv.org/abs/2305.17212>`_, ICML
      2024
    """
    owner = "equilibrium_rate"
    checks.check_choice(owner, "inner", inner, INNERS)
    checks.check_learning_rate(owner, learning_rate)
    checks.check_number(owner, "weight_decay", weight_decay)
    checks.check_rate(owner, "b1", b1)
    checks.check_rate(owner, "b2", b2)
    checks.check_rate(owner, "momentum", momentum)

    def of(lr: Any) -> Any:
        if inner == "adamw":
            return _root(2 * lr * weight_decay * (1 - b1) / (1 + b1))
        if inner == "sgdm":
            return _root(2 * lr * weight_decay / (1 + momentum))
        spread = (1 - b1) ** 2 + b1**2 * (1 - b2) / (1 + b2)
        return _root(math.pi / 2) * _root(2 * lr * weight_decay) * _root(spread)

    if callable(learning_rate):
        schedule: Callable[[Any], Any] = learning_rate
        return lambda count: of(schedule(count))
    return of(learning_rate)
