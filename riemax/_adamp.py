r"""SGDP and AdamP (Heo et al., 2021): momentum optimizers that drop the radial
part of the step on scale-invariant weights.

On a weight ``w`` that feeds a normalization layer, the loss does not change
along ``w`` itself, yet momentum (and Adam's preconditioning) keeps a radial
component in the step that only grows ``||w||`` and shrinks the effective step
size. SGDP and AdamP remove it, each step, on the tensors that look
scale-invariant, and decay those tensors ``wd_ratio`` times less.

**The test** (every step, per tensor with at least two axes; it uses the
*gradient* ``g``, not the step). For the *channel* view (one row per output unit:
the Flax slice ``w[..., j]``, all axes but the last) and then, if it does not
fire, the *layer* view (the whole tensor as one row):

.. math::

  c_i = \frac{|\langle g_i, w_i\rangle|}
    {\max(\|g_i\|, \epsilon)\,\max(\|w_i\|, \epsilon)}, \qquad
  \text{fire} \iff \max_i c_i < \delta / \sqrt{n}

with ``n`` the elements per row of that view. When a view fires, every row of
the step ``d`` is projected, :math:`d_i \leftarrow d_i - \hat w_i \langle \hat
w_i, d_i\rangle` with :math:`\hat w_i = w_i / (\|w_i\| + \epsilon)`, and the
weight decay is multiplied by ``wd_ratio``. Tensors with fewer than two axes take
the plain step.

The test is a per-tensor boolean computed inside the jitted step (a ``where``, no
host transfer). All inner products come from one pass over ``w``, ``g`` and the
step, on arrays scaled per unit by powers of two (:mod:`riemax._numerics`), so
the step is finite for any finite gradient. ``scale_invariant=labels`` replaces
the test by a label tree: ``"manifold"`` leaves are always projected per unit
(the channel view), the others never.

Both steps take the learning rate (the weight decay is scaled by the test's
outcome): they return the final additive update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from riemax._labels import EUCLIDEAN, MANIFOLD, check_labels
from riemax._numerics import (
    Program,
    group_size,
    per_unit,
    pow2,
    safe_div,
    safe_sqrt,
    to_acc,
    unit_axes,
    unit_gram_program,
    unscaled,
)
from riemax._tree import path_str
from riemax._unitwise import (
    check_learning_rate,
    check_number,
    check_params,
    check_rate,
    leaf_map,
    need_params,
    schedule_value,
    unzip,
    zeros_like_state,
)

#: Outcomes of the projection test (per tensor and step).
NO_PROJECTION, CHANNEL, LAYER = 0, 1, 2

#: The mode of a leaf without labels: the per-step test.
TEST = "test"


class ScaleByAdampState(NamedTuple):
    """State of :func:`scale_by_adamp`: step count, first and second moments."""

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    mu: optax.Params
    nu: optax.Params


class ScaleBySgdpState(NamedTuple):
    """State of :func:`scale_by_sgdp`: step count (for schedules) and the momentum
    buffer."""

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    trace: optax.Params


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


def _adamp_leaf(
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


def _sgdp_leaf(
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


def _check_common(owner, weight_decay, eps, delta, wd_ratio, scale_invariant):
    check_number(owner, "weight_decay", weight_decay)
    check_number(owner, "eps", eps)
    check_number(owner, "delta", delta)
    check_number(owner, "wd_ratio", wd_ratio)
    if isinstance(scale_invariant, (bool, int, float)):
        raise TypeError(
            f"riemax.{owner}: scale_invariant must be None, a label tree or a "
            f"callable params -> label tree, got {scale_invariant!r}."
        )


def _modes(owner, params, scale_invariant):
    """Per leaf: :data:`TEST` (the per-step test) or its label."""
    if scale_invariant is None:
        return jax.tree.map(lambda _: TEST, params)
    try:
        labels = check_labels(params, scale_invariant)
    except ValueError as err:
        raise ValueError(f"riemax.{owner}: scale_invariant: {err}") from None

    def one(path, label, w):
        if label == MANIFOLD and len(getattr(w, "shape", ())) < 2:
            raise ValueError(
                f"riemax.{owner}: scale_invariant labels parameter "
                f"'{path_str(path)}' of shape {tuple(w.shape)} as {MANIFOLD!r}, but "
                "a unit needs at least 2 axes (the slice over all axes but the "
                "last)."
            )
        return label

    return jax.tree_util.tree_map_with_path(one, labels, params)


def scale_by_adamp(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    nesterov: bool = False,
    *,
    scale_invariant: Any = None,
) -> optax.GradientTransformation:
    r"""The AdamP step: Adam whose step loses its radial part on scale-invariant
    tensors, with decoupled weight decay.

    With ``t`` the step count and :math:`(d, r)` the projected step and decay
    ratio of the test (module docstring; :math:`r = 1` where it does not fire):

    .. math::

      \begin{align*}
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        d &= \frac{m \text{ (or } \beta_1 m + (1-\beta_1) g
          \text{ with Nesterov)}}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
          \;\xrightarrow{\text{test}}\; (d, r) \\
        \Delta &= -\eta\lambda r\, w - \frac{\eta}{1-\beta_1^t}\, d
      \end{align*}

    Every leaf is accepted; leaves with fewer than two axes take the plain step
    (AdamW with decoupled decay :math:`\eta\lambda`).

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      b1: First-moment decay, in ``[0, 1)``.
      b2: Second-moment decay, in ``[0, 1)``.
      eps: Added after the square root; also the floor of the norms in the test
        and the epsilon of :math:`\hat w`.
      weight_decay: :math:`\lambda` (decoupled, multiplied by the learning rate).
      delta: Threshold of the test (:math:`\delta / \sqrt{n}`).
      wd_ratio: Weight-decay factor where the projection applies.
      nesterov: Nesterov form of the step. Static.
      scale_invariant: ``None`` (the per-step test), or a label tree / callable
        ``params -> label tree`` as :func:`riemax.hybrid` takes (e.g.
        :func:`riemax.labels_from_model`): ``"manifold"`` leaves are projected per
        unit every step, the others never. Static (``static_args`` under
        :func:`optax.inject_hyperparams` if it is a callable).

    Returns:
      A :class:`optax.GradientTransformation` with :class:`ScaleByAdampState`;
      last in a chain; needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = jnp.array([[1.0], [0.0]])  # one unit, e1
      >>> g = jnp.array([[0.01], [1.0]])  # almost orthogonal to it: the test fires
      >>> tx = riemax.scale_by_adamp(0.1)
      >>> update, state = tx.update(g, tx.init(w), w)
      >>> [round(float(x), 4) for x in update.ravel()]  # -0.1 sign(g) minus its e1 part
      [-0.0, -0.1]

    References:
      Heo, Chun, Oh, Han, Yun, Kim, Uh and Ha, `AdamP: Slowing down the slowdown
      for momentum optimizers on scale-invariant weights
      <https://arxiv.org/abs/2006.08217>`_, ICLR 2021
    """
    owner = "scale_by_adamp"
    check_learning_rate(owner, learning_rate)
    check_rate(owner, "b1", b1)
    check_rate(owner, "b2", b2)
    _check_common(owner, weight_decay, eps, delta, wd_ratio, scale_invariant)

    def init_fn(params):
        check_params(owner, params, units=False)
        _modes(owner, params, scale_invariant)
        return ScaleByAdampState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros_like_state(params, None),
            nu=zeros_like_state(params, None),
        )

    def update_fn(updates, state, params=None):
        need_params(owner, params)
        lr = schedule_value(learning_rate, state.count)
        count = optax.safe_increment(state.count)
        modes = _modes(owner, params, scale_invariant)

        def leaf(g, m, v, mode, w):
            out = yield from _adamp_leaf(
                g, m, v, w, lr=lr, count=count, b1=b1, b2=b2, eps=eps,
                weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio,
                nesterov=nesterov, mode=mode,
            )  # fmt: skip
            return out[:3]

        results = leaf_map(
            owner, leaf, updates, state.mu, state.nu, modes, params=params, units=False
        )
        deltas, mu, nu = unzip(updates, results, 3)
        return deltas, ScaleByAdampState(
            count=count,
            mu=optax.tree.cast_like(mu, state.mu),
            nu=optax.tree.cast_like(nu, state.nu),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_sgdp(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    eps: float = 1e-8,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    *,
    scale_invariant: Any = None,
) -> optax.GradientTransformation:
    r"""The SGDP step: momentum SGD whose step loses its radial part on
    scale-invariant tensors.

    With :math:`(d, r)` the projected step and decay ratio of the test (module
    docstring; :math:`r = 1` where it does not fire):

    .. math::

      \begin{align*}
        b &\leftarrow \mu b + (1-\tau) g, \qquad
        d = b \text{ (or } g + \mu b \text{ with Nesterov)}
          \;\xrightarrow{\text{test}}\; (d, r) \\
        \Delta &= -\frac{\eta\lambda r}{1-\mu}\, w - \eta\, d
      \end{align*}

    Without Nesterov the projected step *is* the stored buffer (the original
    projects the buffer in place), so the momentum loses its radial part too; with
    Nesterov the buffer is kept as it is. The buffer starts at zero, so with
    :math:`\tau > 0` the first step is :math:`(1-\tau) g` (unlike
    ``torch.optim.SGD``). Every leaf is accepted; leaves with fewer than two axes
    take the plain step.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      momentum: :math:`\mu`, in ``[0, 1)``.
      dampening: :math:`\tau`, in ``[0, 1]``.
      weight_decay: :math:`\lambda` (decoupled, as in the original:
        :math:`\eta\lambda r/(1-\mu)`).
      nesterov: Nesterov form of the step. Static.
      eps: Floor of the norms in the test and the epsilon of :math:`\hat w`.
      delta: Threshold of the test (:math:`\delta / \sqrt{n}`).
      wd_ratio: Weight-decay factor where the projection applies.
      scale_invariant: As in :func:`scale_by_adamp`. Static.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`ScaleBySgdpState`;
      last in a chain; needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> w = jnp.array([[3.0], [4.0]])
      >>> tx = riemax.scale_by_sgdp(0.1, momentum=0.9)
      >>> g = jnp.array([[4.0], [-3.0]])  # orthogonal to w: the test fires
      >>> update, state = tx.update(g, tx.init(w), w)
      >>> update.ravel()
      Array([-0.4,  0.3], dtype=float32)

    References:
      Heo, Chun, Oh, Han, Yun, Kim, Uh and Ha, `AdamP: Slowing down the slowdown
      for momentum optimizers on scale-invariant weights
      <https://arxiv.org/abs/2006.08217>`_, ICLR 2021
    """
    owner = "scale_by_sgdp"
    check_learning_rate(owner, learning_rate)
    check_rate(owner, "momentum", momentum)
    check_number(owner, "dampening", dampening, high=1.0)
    _check_common(owner, weight_decay, eps, delta, wd_ratio, scale_invariant)

    def init_fn(params):
        check_params(owner, params, units=False)
        _modes(owner, params, scale_invariant)
        return ScaleBySgdpState(
            count=jnp.zeros([], jnp.int32), trace=zeros_like_state(params, None)
        )

    def update_fn(updates, state, params=None):
        need_params(owner, params)
        lr = schedule_value(learning_rate, state.count)
        modes = _modes(owner, params, scale_invariant)

        def leaf(g, buf, mode, w):
            out = yield from _sgdp_leaf(
                g, buf, w, lr=lr, momentum=momentum, dampening=dampening,
                weight_decay=weight_decay, nesterov=nesterov, eps=eps, delta=delta,
                wd_ratio=wd_ratio, mode=mode,
            )  # fmt: skip
            return out[:2]

        results = leaf_map(
            owner, leaf, updates, state.trace, modes, params=params, units=False
        )
        deltas, trace = unzip(updates, results, 2)
        return deltas, ScaleBySgdpState(
            count=optax.safe_increment(state.count),
            trace=optax.tree.cast_like(trace, state.trace),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def adamp(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    nesterov: bool = False,
    *,
    scale_invariant: Any = None,
) -> optax.GradientTransformation:
    r"""AdamP (Heo et al., 2021): Adam without the radial step on scale-invariant
    tensors.

    Applied to every parameter, like the original: each step, a tensor whose
    gradient is nearly orthogonal to its weights (per output unit, or as a whole)
    has the radial part of its Adam step removed and its weight decay multiplied
    by ``wd_ratio``; other tensors take the AdamW step. It is
    :func:`scale_by_adamp`; see there for the update rule.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      b1: First-moment decay.
      b2: Second-moment decay.
      eps: Added after the square root; the norm floor of the test.
      weight_decay: Decoupled weight decay :math:`\lambda`.
      delta: Threshold of the scale-invariance test.
      wd_ratio: Weight-decay factor on projected tensors.
      nesterov: Nesterov form of the step.
      scale_invariant: ``None`` (the test) or labels (``"manifold"`` = project).

    Returns:
      A :class:`optax.GradientTransformation`; leaves of any rank are accepted.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> params = {"conv": jax.random.normal(jax.random.key(0), (3, 3, 4, 8)),
      ...           "bias": jnp.zeros(8)}
      >>> tx = riemax.adamp(1e-3, weight_decay=1e-2)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Heo, Chun, Oh, Han, Yun, Kim, Uh and Ha, `AdamP: Slowing down the slowdown
      for momentum optimizers on scale-invariant weights
      <https://arxiv.org/abs/2006.08217>`_, ICLR 2021
    """
    return scale_by_adamp(
        learning_rate,
        b1,
        b2,
        eps,
        weight_decay,
        delta,
        wd_ratio,
        nesterov,
        scale_invariant=scale_invariant,
    )


def sgdp(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    eps: float = 1e-8,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    *,
    scale_invariant: Any = None,
) -> optax.GradientTransformation:
    r"""SGDP (Heo et al., 2021): momentum SGD without the radial step on
    scale-invariant tensors.

    Applied to every parameter, like the original; see :func:`scale_by_sgdp` for
    the update rule (including the in-place projection of the buffer without
    Nesterov).

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      momentum: :math:`\mu`, in ``[0, 1)``.
      dampening: :math:`\tau`.
      weight_decay: Weight decay :math:`\lambda`.
      nesterov: Nesterov momentum.
      eps: The norm floor of the test.
      delta: Threshold of the scale-invariance test.
      wd_ratio: Weight-decay factor on projected tensors.
      scale_invariant: ``None`` (the test) or labels (``"manifold"`` = project).

    Returns:
      A :class:`optax.GradientTransformation`; leaves of any rank are accepted.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> params = {"fc": jax.random.normal(jax.random.key(0), (16, 4)),
      ...           "bias": jnp.zeros(4)}
      >>> tx = riemax.sgdp(0.1, momentum=0.9, weight_decay=1e-5, nesterov=True)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Heo, Chun, Oh, Han, Yun, Kim, Uh and Ha, `AdamP: Slowing down the slowdown
      for momentum optimizers on scale-invariant weights
      <https://arxiv.org/abs/2006.08217>`_, ICLR 2021
    """
    return scale_by_sgdp(
        learning_rate,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        eps,
        delta,
        wd_ratio,
        scale_invariant=scale_invariant,
    )
