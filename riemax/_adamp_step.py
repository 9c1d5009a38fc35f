"""The per-leaf steps of AdamP and SGDP (Heo et al., 2021): the scale-invariance
test on the cosine of the gradient and the weights, per output unit and per
tensor, and the projection of the step (and of the decay) where it fires.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from riemax._gram import Program, unit_gram_program
from riemax._labels import EUCLIDEAN, MANIFOLD
from riemax._numerics import (
    group_size,
    per_unit,
    pow2,
    safe_div,
    safe_sqrt,
    to_acc,
    unit_axes,
    unscaled,
)

#: Outcomes of the projection test (per tensor and step).
NO_PROJECTION, CHANNEL, LAYER = 0, 1, 2

#: The mode of a leaf without labels: the per-step test.
TEST = "test"


class _Projection(NamedTuple):
    """How one step is projected: ``d - ((w * factor) * coef) * scale``, per unit.

    ``ratio`` multiplies the weight decay; ``branch`` is :data:`NO_PROJECTION`,
    :data:`CHANNEL` or :data:`LAYER` (an int32 scalar).
    """

    coef: Any
    factor: Any
    scale: Any
    ratio: Any
    branch: jax.Array


def _cosine(wg, ww, gg, e_w, e_g, eps):
    """``|<g, w>| / (max(|g|, eps) max(|w|, eps))`` from scaled inner products.

    A zero denominator (``eps = 0`` and a zero row) gives ``inf``: such a row
    blocks the test, as the NaN it produces in the original does.
    """
    dtype = wg.dtype
    den_g = jnp.maximum(safe_sqrt(gg), unscaled(eps, -e_g, dtype))
    den_w = jnp.maximum(safe_sqrt(ww), unscaled(eps, -e_w, dtype))
    ok = (den_g > 0) & (den_w > 0)
    c = jnp.abs(wg) / jnp.where(ok, den_g, 1) / jnp.where(ok, den_w, 1)
    return jnp.where(ok, c, jnp.inf)


def _lift(value, e_a, big_a, e_b, big_b):
    """Sum over units of a per-unit scaled inner product, on the common scale
    ``2**(big_a + big_b)`` (exact powers of two; negligible units underflow)."""
    return jnp.sum(unscaled(value, (e_a - big_a) + (e_b - big_b)))


def _projection(w, g, d, *, eps, delta, wd_ratio, mode) -> Program:
    """The projection of the step ``d`` at ``w`` (accumulation dtype).

    ``mode`` is :data:`TEST` (the per-step test on the gradient ``g``),
    :data:`~riemax.MANIFOLD` (always the channel view) or
    :data:`~riemax.EUCLIDEAN` (never). ``None`` means no projection (known when
    tracing: a Euclidean label or a leaf with fewer than two axes).
    """
    if mode == EUCLIDEAN or w.ndim < 2:
        return None
    dtype = d.dtype
    invariant = mode == MANIFOLD
    if invariant:
        gr = yield from unit_gram_program((w, d), ((0, 0), (0, 1)))
        ww, wd = gr.values
        e_w, e_d = gr.exps
    else:
        gr = yield from unit_gram_program((w, d, g), ((0, 0), (0, 1), (2, 2), (0, 2)))
        ww, wd, gg, wg = gr.values
        e_w, e_d, e_g = gr.exps
    # Channel view: d_j - w_j~ rho_j^2 <w_j~, d_j~> 2**e_d, rho_j = 1 / (|w_j~| +
    # eps 2**-e_w): the projection on w_hat_j = w_j / (|w_j| + eps).
    rho = safe_div(1.0, safe_sqrt(ww) + unscaled(eps, -e_w, dtype))
    coef_channel = rho * rho * wd
    if invariant:
        return _Projection(
            coef_channel,
            gr.factor(0),
            pow2(e_d, dtype),
            jnp.asarray(wd_ratio, dtype),
            jnp.int32(CHANNEL),
        )
    n = group_size(w.shape, unit_axes(w.ndim))
    channel = jnp.max(_cosine(wg, ww, gg, e_w, e_g, eps)) < delta / n**0.5
    # Layer view: the whole tensor as one row, on the largest scales.
    big_w, big_g, big_d = jnp.max(e_w), jnp.max(e_g), jnp.max(e_d)
    ww_l = _lift(ww, e_w, big_w, e_w, big_w)
    gg_l = _lift(gg, e_g, big_g, e_g, big_g)
    wg_l = _lift(wg, e_w, big_w, e_g, big_g)
    wd_l = _lift(wd, e_w, big_w, e_d, big_d)
    cos_l = _cosine(wg_l, ww_l, gg_l, big_w, big_g, eps)
    layer = ~channel & (cos_l < delta / w.size**0.5)
    rho_l = safe_div(1.0, safe_sqrt(ww_l) + unscaled(eps, -big_w, dtype))
    coef_layer = rho_l * rho_l * wd_l
    coef = jnp.where(channel, coef_channel, jnp.where(layer, coef_layer, 0.0))
    factor = jnp.where(channel, gr.factor(0), pow2(-big_w, dtype))
    scale = jnp.where(channel, pow2(e_d, dtype), pow2(big_d, dtype))
    ratio = jnp.where(channel | layer, jnp.asarray(wd_ratio, dtype), 1.0)
    branch = jnp.where(channel, CHANNEL, jnp.where(layer, LAYER, NO_PROJECTION))
    return _Projection(coef, factor, scale, ratio, branch.astype(jnp.int32))


def _project(d, w, proj: _Projection | None):
    """``(d minus its projection on the units of w, decay ratio, branch)``."""
    if proj is None:
        return d, 1.0, jnp.int32(NO_PROJECTION)
    coef, factor, scale = per_unit(proj.coef, proj.factor, proj.scale)
    return d - ((w * factor) * coef) * scale, proj.ratio, proj.branch


def adamp_leaf(
    g,
    m,
    v,
    w,
    *,
    lr,
    count,
    b1,
    b2,
    eps,
    weight_decay,
    delta,
    wd_ratio,
    nesterov,
    mode,
):
    """One AdamP step on one leaf: ``(update, m, v, branch)``."""
    g, m, v, w_acc = to_acc(g), to_acc(m), to_acc(v), to_acc(w)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    t = count.astype(m.dtype)
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    den = safe_sqrt(v) / jnp.sqrt(bc2) + eps  # gradient 0, not NaN, at v = 0
    d = (b1 * m + (1 - b1) * g if nesterov else m) / den
    proj = yield from _projection(
        w_acc, g, d, eps=eps, delta=delta, wd_ratio=wd_ratio, mode=mode
    )
    d, ratio, branch = _project(d, w_acc, proj)
    update = -(lr * weight_decay * ratio) * w_acc - (lr / bc1) * d
    return update.astype(w.dtype), m, v, branch


def sgdp_leaf(
    g,
    buf,
    w,
    *,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    eps,
    delta,
    wd_ratio,
    mode,
):
    """One SGDP step on one leaf: ``(update, buf, branch)``."""
    g, buf, w_acc = to_acc(g), to_acc(buf), to_acc(w)
    buf = momentum * buf + (1 - dampening) * g
    d = g + momentum * buf if nesterov else buf
    proj = yield from _projection(
        w_acc, g, d, eps=eps, delta=delta, wd_ratio=wd_ratio, mode=mode
    )
    d, ratio, branch = _project(d, w_acc, proj)
    if not nesterov:
        buf = d  # the original projects the buffer itself, in place
    update = -(lr * weight_decay * ratio / (1 - momentum)) * w_acc - lr * d
    return update.astype(w.dtype), buf, branch
