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

from riemax import _checks as checks
from riemax._adamp_step import TEST, adamp_leaf, projections, sgdp_leaf
from riemax._labels import MANIFOLD, check_labels
from riemax._leafmap import Step, schedule_value, stateful, zeros_like_state
from riemax._tree import path_str


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


def _check_common(owner, weight_decay, eps, delta, wd_ratio, scale_invariant):
    for name, value in (("weight_decay", weight_decay), ("eps", eps),
                        ("delta", delta), ("wd_ratio", wd_ratio)):  # fmt: skip
        checks.check_number(owner, name, value)
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
    return _adamp_tx(
        "scale_by_adamp", learning_rate, b1, b2, eps, weight_decay, delta,
        wd_ratio, nesterov, scale_invariant,
    )  # fmt: skip


def _adamp_tx(owner, learning_rate, b1, b2, eps, weight_decay, delta, wd_ratio,
              nesterov, scale_invariant):  # fmt: skip
    checks.check_learning_rate(owner, learning_rate)
    checks.check_adam(owner, b1, b2, 0.0)
    _check_common(owner, weight_decay, eps, delta, wd_ratio, scale_invariant)

    def init(params):
        _modes(owner, params, scale_invariant)
        return ScaleByAdampState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros_like_state(params, None),
            nu=zeros_like_state(params, None),
        )

    def prepare(state, count, updates, params):
        lr = schedule_value(learning_rate, state.count)
        rules = projections(eps, wd_ratio)  # one per step: leaves resolve together

        def leaf(g, m, v, mode, w):
            out = yield from adamp_leaf(
                g, m, v, w, lr=lr, count=count, b1=b1, b2=b2, eps=eps,
                weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio,
                nesterov=nesterov, mode=mode, rules=rules,
            )  # fmt: skip
            return out[:3]

        return Step(leaf, extra=(_modes(owner, params, scale_invariant),))

    return stateful(owner, init, prepare, fields=("mu", "nu"), units=False)


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
    return _sgdp_tx(
        "scale_by_sgdp", learning_rate, momentum, dampening, weight_decay,
        nesterov, eps, delta, wd_ratio, scale_invariant,
    )  # fmt: skip


def _sgdp_tx(owner, learning_rate, momentum, dampening, weight_decay, nesterov, eps,
             delta, wd_ratio, scale_invariant):  # fmt: skip
    checks.check_learning_rate(owner, learning_rate)
    checks.check_rate(owner, "momentum", momentum)
    checks.check_number(owner, "dampening", dampening, high=1.0)
    _check_common(owner, weight_decay, eps, delta, wd_ratio, scale_invariant)

    def init(params):
        _modes(owner, params, scale_invariant)
        return ScaleBySgdpState(
            count=jnp.zeros([], jnp.int32), trace=zeros_like_state(params, None)
        )

    def prepare(state, count, updates, params):
        lr = schedule_value(learning_rate, state.count)
        rules = projections(eps, wd_ratio)  # one per step: leaves resolve together

        def leaf(g, buf, mode, w):
            out = yield from sgdp_leaf(
                g, buf, w, lr=lr, momentum=momentum, dampening=dampening,
                weight_decay=weight_decay, nesterov=nesterov, eps=eps, delta=delta,
                wd_ratio=wd_ratio, mode=mode, rules=rules,
            )  # fmt: skip
            return out[:2]

        return Step(leaf, extra=(_modes(owner, params, scale_invariant),))

    return stateful(owner, init, prepare, fields=("trace",), units=False)


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
      The arguments of :func:`scale_by_adamp`, with the same meaning.

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
    return _adamp_tx(
        "adamp", learning_rate, b1, b2, eps, weight_decay, delta, wd_ratio, nesterov,
        scale_invariant,
    )  # fmt: skip


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
      The arguments of :func:`scale_by_sgdp`, with the same meaning.

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
    return _sgdp_tx(
        "sgdp", learning_rate, momentum, dampening, weight_decay, nesterov, eps,
        delta, wd_ratio, scale_invariant,
    )  # fmt: skip
