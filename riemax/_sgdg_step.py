r"""The SGD-G and Adam-G steps of Cho & Lee (2017), one pass over each kernel.

:func:`scale_by_sgdg` is ``grassmann_project -> clip_tangent_norm ->
scale_by_learning_rate -> transported_momentum -> exp_map_update`` and
:func:`scale_by_adamg` is ``grassmann_project -> clip_tangent_norm ->
spherical_adam(learning_rate=...) -> exp_map_update``, computed without
materialising any intermediate of the chain:

1. one pass over memory computes the per-unit inner products of the parameters
   ``w``, the gradient ``g`` and the stored state ``s`` as plain sums; where any
   sum of the parameter tree overflows or underflows, the whole step takes them
   again on arrays scaled per unit by powers of two
   (:func:`riemax._numerics.gram_request`; exact, and finite for any magnitude);
2. every quantity of the chain (the projected gradient ``h = g~ + hw w~`` and its
   norm, the clip factor, the carried state ``tau = s~ + tw w~``, the new step and
   its angle, the exponential map and the new stored state) is a combination of
   the scaled arrays whose norm follows from those inner products. Only
   :math:`\|h\|^2 = \|g\|^2 - \langle y, g\rangle^2` can cancel, when a gradient is
   nearly radial (kernels that are not exactly scale-invariant); where any unit
   of the tree does, the step sums it directly (one more pass, that step only).
   This per-unit math runs once for the units of every leaf together;
3. two elementwise loops write the new stored state ``S`` (in place of ``s``) and
   then the update ``F S + C y - w`` from it, which reads ``S`` and ``w`` only, so
   that donated buffers are updated in place. The stored form of
   :func:`riemax.sphere.carry_coefficients` makes both the step (from ``S``) and
   the next transport (a projection of ``S``) well conditioned at every angle.

The chains of the composable transforms (:mod:`riemax._grassmann`) remain the
reference; the tests compare both with the float64 reference of the originals.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from riemax import _sphere as sphere
from riemax._gram import Batched, Fallback, Gram, Program, gram_request
from riemax._numerics import (
    PAIR_GRAM,
    TRUSTED_FRACTION,
    combination,
    exponent,
    pow2,
    safe_div,
    safe_sqrt,
    second_moment,
    to_acc,
    unit_axes,
    unscaled,
)
from riemax._sums import as_matrix

#: (w, g, s) index pairs of the per-unit Gram quantities: ww, wg, ws, ss, gs, gg.
_PAIRS = ((0, 0), (0, 1), (0, 2), (2, 2), (1, 2), (1, 1))


class _Parts(NamedTuple):
    """Per-unit quantities shared by both steps (scaled arrays ``w~, g~, s~``).

    ``y = k w~``; ``h~ = g~ + hw w~`` with ``h_hat = sigma h~`` (projected and
    clipped gradient; ``hat_norm`` is its true norm); ``tau~ = s~ + tw w~`` is the
    carried state where ``keep``; ``hh, tt, th`` are ``|h~|^2, |tau~|^2,
    <tau~, h~>``.
    """

    gram: Gram
    live: jax.Array
    k: jax.Array
    hw: jax.Array
    sigma: jax.Array
    hat_norm: jax.Array
    hh: jax.Array
    tw: jax.Array
    keep: jax.Array
    tt: jax.Array
    th: jax.Array


def step_program(g, s, w, *, unit_eps, then, inputs, derive) -> Program:
    """One leaf's step as a program for ``leaf_map``, in three rounds for the whole
    tree: the Gram of ``(w, g, s)`` (plain sums, or rescaled ones where a sum
    overflows or underflows anywhere), ``||h~||^2`` summed directly where the Gram
    identity cancels anywhere (nearly radial gradients), and ``then``, the
    per-unit math of the step, on the units of every leaf at once.

    ``derive`` (:func:`radial` with the step's ``unit_eps``, one object for every
    leaf of a step) gives ``||h~||^2`` and ``hw`` once for all units;
    ``then((gram, hh, inputs))`` returns ``(coefficients, other)``; the program
    returns ``(update, new stored state, other)``.
    """
    g, s, w_acc = to_acc(g), to_acc(s), to_acc(w)
    axes = unit_axes(w.ndim)
    gr = yield gram_request(
        (w_acc, g, s), _PAIRS, axes, verify_zero=(0,), derive=derive
    )
    # Units whose projected gradient cancels are tested once for every unit of
    # the step (the third derived array); the branch reads each leaf's part of
    # the coefficient hw, and the flat hh crosses it as one array.
    parts = gr.derived

    def direct():
        return [as_matrix(g * gr.factor(1) + parts[1] * (w_acc * gr.factor(0)), axes)]

    hh = yield Fallback(
        parts[0],
        parts[2] > 0,
        direct,
        ((0, 0),),
        whole=parts.arrays[2],
        whole_value=parts.arrays[0],
        span=(parts.start, parts.stop),
    )
    coefficients, other = yield Batched(then, (gr, hh, inputs), gr.values[0].shape)
    delta, new = _write(coefficients, w_acc, g, s)
    return delta.astype(w.dtype), new, other


def radial(gr: Gram, inputs, leaf, *, unit_eps):
    """``(hh, hw, cancels)`` for every unit of the step at once: the squared norm
    of the projected gradient from the Gram identity (exact unless it cancels),
    its coefficient ``h~ = g~ + hw w~``, and 1 where it cancels (0 elsewhere)."""
    _, _, hw = _tangent(gr, unit_eps)
    ww, wg, gg = gr.values[0], gr.values[1], gr.values[5]
    hh = combination((1.0, hw), (gg, wg, ww), PAIR_GRAM)
    cancels = jnp.where(hh < TRUSTED_FRACTION * gg, 1.0, 0.0).astype(hh.dtype)
    return hh, hw, cancels


def _tangent(gr: Gram, unit_eps):
    """``(live, k, hw)``: the units of non-zero norm, ``k = 1 / (|w~| + eps~)``
    and the coefficient of the projected gradient ``h~ = g~ + hw w~``."""
    n_w = safe_sqrt(gr.values[0])
    live = n_w > 0
    k = safe_div(1.0, n_w + unit_eps * gr.factor(0))
    # h = ||w|| (g - <y, g> y) = ||w|| 2**e_g (g~ - k^2 <w~, g~> w~) on live units.
    return live, k, jnp.where(live, -k * k * gr.values[1], 0.0)


def _parts(gr: Gram, hh, unit_eps, max_norm):
    """Per-unit quantities from the Gram and ``hh``, the squared norm of the scaled
    projected gradient ``h~``."""
    ww, wg, ws, ss, gs, _ = gr.values
    e_w, e_g = gr.exps[0], gr.exps[1]
    live, k, hw = _tangent(gr, unit_eps)
    n_h = safe_sqrt(hh)
    w_scale = jnp.where(live, safe_sqrt(ww), 1.0)
    e_h = jnp.where(live, e_w, 0) + e_g
    sigma = unscaled(w_scale, e_h)  # h = sigma h~
    h_norm = unscaled(w_scale * n_h, e_h)
    if max_norm is None:
        hat_norm = h_norm
    else:
        clipped = h_norm > max_norm
        sigma = jnp.where(clipped, safe_div(max_norm, n_h), sigma)
        hat_norm = jnp.where(clipped, max_norm, h_norm)
    # The stored state carried to y: its projection, kept where it was carried.
    tw = -k * k * ws
    tt = combination((1.0, tw), (ss, ws, ww), PAIR_GRAM)
    keep = live & sphere.carry_kept(safe_sqrt(tt), safe_sqrt(ss))
    th = gs + hw * ws + tw * wg + tw * hw * ww
    return _Parts(gr, live, k, hw, sigma, hat_norm, hh, tw, keep, tt, th)


def _combine(p: _Parts, c_tau, c_h):
    """``x = c_tau tau~ + c_h h~ = 2**e x_hat``: returns ``(e, |x_hat|)`` with
    ``x_hat = p_tau tau~ + p_h h~`` and ``|p_tau|, |p_h| <= 1``."""
    e = exponent(jnp.maximum(jnp.abs(c_tau), jnp.abs(c_h)))
    f = pow2(-e, c_h.dtype)
    n2 = combination((c_tau * f, c_h * f), (p.tt, p.th, p.hh), PAIR_GRAM)
    return e, safe_sqrt(n2)


def _coefficients(p: _Parts, stored, update):
    """The per-unit coefficients of the two elementwise loops (:func:`_write`).

    ``stored = (a_tau, a_h, a_y)``: the new state is ``a_tau tau~ + a_h h~ + a_y y``
    in real units. ``update = (f, e, c)``: the update is ``f (S 2**-e) + c y - w``
    on live units and ``f S`` on zero units, which store the Euclidean quantity
    ``a_h h~`` (radial at the new point: the next step drops it).
    """
    a_tau, a_h, a_y = stored
    f, e, c = update
    gr = p.gram
    # In the scaled arrays: tau~ = s~ + tw w~, h~ = g~ + hw w~, y = k w~.
    a_s = jnp.where(p.live, a_tau, 0.0)
    a_w = jnp.where(p.live, a_tau * p.tw + a_h * p.hw + a_y * p.k, 0.0)
    r_new = jnp.where(p.live, pow2(-e, f.dtype), 1.0)
    c = jnp.where(p.live, c * p.k, 0.0)
    r_w, r_g, r_s = gr.factor(0), gr.factor(1), gr.factor(2)
    return (a_s, a_h, a_w, r_w, r_g, r_s, f, r_new, c)


def _write(coefficients, w, g, s):
    """The two elementwise loops: the new state ``S`` and the update from it."""
    a_s, a_g, a_w, r_w, r_g, r_s, f, r_new, c = coefficients
    # The factors are powers of two, so folding one into its coefficient changes
    # nothing unless the product underflows. That loses a term only where the array
    # is huge, which the gradient and the new state can be (a clipped 1e38
    # gradient has a coefficient near 1e-39; so has a state of 1e38 in the
    # update): those are scaled first, the others folded.
    new = (a_s * r_s) * s + a_g * (g * r_g) + (a_w * r_w) * w
    return f * (new * r_new) + (c * r_w - 1) * w, new


def sgdg_units(args, *, lr, momentum, unit_eps, max_norm):
    """SGD-G's per-unit math, on the units of every leaf at once."""
    gr, hh, _ = args
    p = _parts(gr, hh, unit_eps, max_norm)
    c_tau = jnp.where(p.keep, unscaled(momentum, p.gram.exps[2], p.hh.dtype), 0.0)
    c_h = -lr * p.sigma
    # d = momentum tau - lr h_hat = 2**e d_hat, |d_hat| = n
    e, n = _combine(p, c_tau, c_h)
    _, sin_n, theta, rho = sphere.exp_coefficients(n, e, unit_eps)
    a, b, c_y = sphere.step_coefficients(theta, rho)
    # x = rho d, alpha = rho theta. Stored: rho (a d + b theta y). Update:
    # (sinc(theta) / a) S + c_y y - w, sinc(theta) S = (sin(theta)/n) S 2**-e.
    stored = (rho * a * c_tau, rho * a * c_h, rho * b * theta)
    update = (sin_n / a, e, c_y)
    # Zero units: the Euclidean step d = c_h g~, stored as it is.
    stored = (stored[0], jnp.where(p.live, stored[1], c_h), stored[2])
    update = (jnp.where(p.live, update[0], 1.0), update[1], update[2])
    return _coefficients(p, stored, update), None


def adamg_units(args, *, lr, count, b1, b2, eps, unit_eps, max_norm):
    """Adam-G's per-unit math, on the units of every leaf at once."""
    gr, hh, (v, size) = args
    p = _parts(gr, hh, unit_eps, max_norm)
    rms = p.hat_norm / jnp.sqrt(size)
    v = second_moment(v, rms * rms, b2)
    scale = -lr * sphere.adamg_scale(v, size, count, b1, b2, eps)
    c_tau = jnp.where(p.keep, unscaled(b1, p.gram.exps[2], v.dtype), 0.0)
    c_h = (1 - b1) * p.sigma
    # m_new = b1 tau + (1 - b1) h_hat = 2**e m_hat, |m_hat| = n
    e, n = _combine(p, c_tau, c_h)
    _, sin_n, theta, rho = sphere.exp_coefficients(jnp.abs(scale) * n, e, unit_eps)
    a, b, c_y = sphere.step_coefficients(theta, rho)
    norm_m = jnp.minimum(unscaled(n, e), jnp.finfo(n.dtype).max)
    alpha = jnp.where(scale < 0, -1.0, 1.0) * norm_m  # delta = scale m_new
    # x = m. Stored: a m + b alpha y. Update: (rho D scale / a) (S 2**-e)
    # + c_y y - w, with D = sin(theta) / |delta_hat|.
    stored = (a * c_tau, a * c_h, b * alpha)
    update = (rho * sin_n * scale / a, e, c_y)
    stored = (stored[0], jnp.where(p.live, stored[1], c_h), stored[2])
    # Zero units: the Euclidean step scale * m_new with S = m_new.
    update = (jnp.where(p.live, update[0], scale), update[1], update[2])
    return _coefficients(p, stored, update), v
