"""The per-leaf steps of AdamP and SGDP (Heo et al., 2021): the scale-invariance
test on the cosine of the gradient and the weights, per output unit and per
tensor, and the projection of the step (and of the decay) where it fires.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from riemax._gram import Gram, Program, gram_request
from riemax._labels import EUCLIDEAN, MANIFOLD
from riemax._numerics import (
    group_size,
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


def channel_projection(gr: Gram, inputs, leaf, *, eps, wd_ratio):
    """The channel view for every unit of the step (scale-invariant leaves):
    ``(coef, factor, scale, ratio, branch)``, the step losing
    ``((w * factor) * coef) * scale``: its projection on ``w_hat_j = w_j /
    (|w_j| + eps)``."""
    ww, wd = gr.values
    e_w, e_d = gr.exps
    dtype = ww.dtype
    rho = safe_div(1.0, safe_sqrt(ww) + unscaled(eps, -e_w, dtype))
    ones = jnp.ones_like(ww)
    return (
        rho * rho * wd,
        pow2(-e_w, dtype),
        pow2(e_d, dtype),
        wd_ratio * ones,
        CHANNEL * ones,
    )


def tested_projection(gr: Gram, inputs, leaf, *, eps, wd_ratio):
    """The per-step test for every unit of the step, each tensor deciding for
    its own units (``leaf``): the channel view where the largest cosine of its
    units is below ``delta / sqrt(unit size)``, else the layer view (the whole
    tensor as one row, on its largest scales) where that cosine is below
    ``delta / sqrt(tensor size)``, else none."""
    ww, wd, gg, wg = gr.values
    e_w, e_d, e_g = gr.exps
    threshold_channel, threshold_layer = inputs
    dtype = ww.dtype
    count = int(leaf[-1]) + 1

    def per_leaf(x, op):
        return op(x, leaf, num_segments=count, indices_are_sorted=True)

    rho = safe_div(1.0, safe_sqrt(ww) + unscaled(eps, -e_w, dtype))
    coef_channel = rho * rho * wd
    cos = _cosine(wg, ww, gg, e_w, e_g, eps)
    channel = per_leaf(cos, jax.ops.segment_max) < per_leaf(
        threshold_channel, jax.ops.segment_max
    )
    big_w, big_g, big_d = (per_leaf(e, jax.ops.segment_max) for e in (e_w, e_g, e_d))

    def lift(value, e_a, big_a, e_b, big_b):
        # The tensor's sum of a per-unit scaled product, on the common scale
        # 2**(big_a + big_b) (exact powers of two; negligible units underflow).
        shift = (e_a - big_a[leaf]) + (e_b - big_b[leaf])
        return per_leaf(unscaled(value, shift), jax.ops.segment_sum)

    ww_l = lift(ww, e_w, big_w, e_w, big_w)
    gg_l = lift(gg, e_g, big_g, e_g, big_g)
    wg_l = lift(wg, e_w, big_w, e_g, big_g)
    wd_l = lift(wd, e_w, big_w, e_d, big_d)
    cos_l = _cosine(wg_l, ww_l, gg_l, big_w, big_g, eps)
    layer = ~channel & (cos_l < per_leaf(threshold_layer, jax.ops.segment_max))
    rho_l = safe_div(1.0, safe_sqrt(ww_l) + unscaled(eps, -big_w, dtype))
    coef_layer = rho_l * rho_l * wd_l
    channel, layer = channel[leaf], layer[leaf]
    coef = jnp.where(channel, coef_channel, jnp.where(layer, coef_layer[leaf], 0.0))
    factor = jnp.where(channel, pow2(-e_w, dtype), pow2(-big_w[leaf], dtype))
    scale = jnp.where(channel, pow2(e_d, dtype), pow2(big_d[leaf], dtype))
    ratio = jnp.where(channel | layer, jnp.asarray(wd_ratio, dtype), 1.0)
    branch = jnp.where(channel, CHANNEL, jnp.where(layer, LAYER, NO_PROJECTION))
    return coef, factor, scale, ratio, branch.astype(dtype)


class Projections(NamedTuple):
    """The per-unit projection rules of one step, shared by every leaf (their
    requests resolve together): ``functools.partial`` of
    :func:`channel_projection` and :func:`tested_projection`."""

    channel: Any
    tested: Any


def projections(eps, wd_ratio) -> Projections:
    return Projections(
        functools.partial(channel_projection, eps=eps, wd_ratio=wd_ratio),
        functools.partial(tested_projection, eps=eps, wd_ratio=wd_ratio),
    )


def _project(w, g, direction, *, delta, mode, rules: Projections) -> Program:
    """``(d minus its projection on the units of w, decay ratio, branch)``
    (accumulation dtype), with ``d = fn(*sources)`` for ``direction = (fn,
    sources)``, ``fn`` elementwise.

    ``mode`` is :data:`TEST` (the per-step test on the gradient ``g``),
    :data:`~riemax.MANIFOLD` (always the channel view) or
    :data:`~riemax.EUCLIDEAN` (never; also a leaf with fewer than two axes).
    The per-unit sums compute ``d`` from its sources inside their loops (and
    inside the rescaled branch): a ``d`` computed before them would be stored on
    every step.
    """
    fn, sources = direction
    d = fn(*sources)
    if mode == EUCLIDEAN or w.ndim < 2:
        return d, 1.0, jnp.int32(NO_PROJECTION)
    axes = unit_axes(w.ndim)
    if mode == MANIFOLD:
        gr = yield gram_request(
            (w, d), ((0, 0), (0, 1)), axes, derive=rules.channel,
            forms=(None, direction),
        )  # fmt: skip
    else:
        n = group_size(w.shape, axes)
        inputs = (
            jnp.asarray(delta / n**0.5, d.dtype),
            jnp.asarray(delta / w.size**0.5, d.dtype),
        )
        gr = yield gram_request(
            (w, d, g), ((0, 0), (0, 1), (2, 2), (0, 2)), axes,
            inputs=inputs, derive=rules.tested, forms=(None, direction, None),
        )  # fmt: skip
    coef, factor, scale, ratio, branch = gr.derived
    return (
        d - ((w * factor) * coef) * scale,
        ratio,
        branch.reshape(-1)[0].astype(jnp.int32),
    )


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
    rules: Projections | None = None,
):
    """One AdamP step on one leaf: ``(update, m, v, branch)``."""
    rules = projections(eps, wd_ratio) if rules is None else rules
    g, m, v, w_acc = to_acc(g), to_acc(m), to_acc(v), to_acc(w)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    t = count.astype(m.dtype)
    bc1, bc2 = 1 - b1**t, 1 - b2**t

    def direction(m, v, g):
        den = safe_sqrt(v) / jnp.sqrt(bc2) + eps  # gradient 0, not NaN, at v = 0
        return (b1 * m + (1 - b1) * g if nesterov else m) / den

    d, ratio, branch = yield from _project(
        w_acc, g, (direction, (m, v, g)), delta=delta, mode=mode, rules=rules
    )
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
    rules: Projections | None = None,
):
    """One SGDP step on one leaf: ``(update, buf, branch)``."""
    rules = projections(eps, wd_ratio) if rules is None else rules
    g, buf, w_acc = to_acc(g), to_acc(buf), to_acc(w)
    buf = momentum * buf + (1 - dampening) * g

    def direction(g, buf):
        return g + momentum * buf if nesterov else buf

    d, ratio, branch = yield from _project(
        w_acc, g, (direction, (g, buf)), delta=delta, mode=mode, rules=rules
    )
    if not nesterov:
        buf = d  # the original projects the buffer itself, in place
    update = -(lr * weight_decay * ratio / (1 - momentum)) * w_acc - lr * d
    return update.astype(w.dtype), buf, branch
