r"""Nero (Liu, Bernstein, Meister & Yue, 2021): per-neuron normalized steps on
centred, normalized units.

A *neuron* is one output unit of a kernel (Flax: the slice ``w[..., j]`` over all
axes but the last) or one element of a leaf with fewer than two axes (a bias, a
BatchNorm scale). Nero divides each neuron's gradient by the running root mean
square of its norm, scales the step by the mean neuron norm of the tensor, and,
with ``constraints``, keeps every unit of every kernel centred and of unit norm.

The constraints are projections: :func:`nero_project` applies them once, at
construction (call it on the params before ``init``), and every step re-applies
them after the update.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from riemax import _checks as checks
from riemax._gram import (
    Batched,
    Fallback,
    gram_program,
    gram_request,
    norm,
    normalize,
)
from riemax._leafmap import Step, schedule_value, stateful
from riemax._numerics import (
    PAIR_GRAM,
    TRUSTED_FRACTION,
    acc_dtype,
    centered,
    combination,
    exponent,
    group_size,
    kept_shape,
    pow2,
    root_ema,
    safe_div,
    safe_sqrt,
    to_acc,
    unit_axes,
    unscaled,
)
from riemax._sums import as_matrix


class ScaleByNeroState(NamedTuple):
    """State of :func:`scale_by_nero`: step count, per-neuron root mean square of
    the gradient, and the step scale of every leaf.

    ``nu`` holds, per neuron, :math:`\\sqrt{v / n}`: the square root of the
    original's moving average :math:`v` of :math:`\\|g\\|^2`, divided by the
    neuron size :math:`n`. Kept as a root, it is finite for every finite
    gradient.
    """

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    nu: optax.Params
    scale: optax.Params


def _neuron_axes(ndim: int) -> tuple[int, ...]:
    """Reduced axes of a neuron: a unit for kernels, an element otherwise."""
    return unit_axes(ndim) if ndim >= 2 else ()


def _check_constraints(owner: str, constraints: Any) -> None:
    if not isinstance(constraints, bool):
        raise TypeError(
            f"riemax.{owner}: constraints must be True or False, got {constraints!r}."
        )


def _project_leaf(w: jax.Array) -> jax.Array:
    """Centres and normalises every unit (no epsilon; a constant unit maps to 0)."""
    axes = unit_axes(w.ndim)
    c, _ = centered(to_acc(w), axes)
    return normalize(c, axes, 0.0)[0].astype(w.dtype)


def nero_project(params: optax.Params) -> optax.Params:
    r"""Nero's construction-time constraints: every kernel unit centred and
    normalized.

    For every leaf with at least two axes, each unit ``w[..., j]`` becomes

    .. math::

      w_j \leftarrow \frac{w_j - \bar w_j}{\|w_j - \bar w_j\|}

    (no epsilon; a unit that is constant, zero included, becomes zero). Leaves with
    fewer than two axes are returned unchanged. Apply it once to the initial
    params when using :func:`nero` with ``constraints=True`` (the default), before
    ``init``: the optimizer re-applies it after every step.

    Args:
      params: A tree of floating-point arrays.

    Returns:
      The projected params (same tree, shapes and dtypes).

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> params = {"kernel": jnp.array([[1.0, 2.0], [3.0, 2.0]]), "bias": jnp.ones(2)}
      >>> projected = riemax.nero_project(params)
      >>> projected["kernel"]  # each column centred, then of unit norm
      Array([[-0.70710677,  0.        ],
             [ 0.70710677,  0.        ]], dtype=float32)
      >>> projected["bias"]
      Array([1., 1.], dtype=float32)

    References:
      Liu, Bernstein, Meister and Yue, `Learning by turning: neural architecture
      aware optimisation <https://arxiv.org/abs/2102.07227>`_, ICML 2021
    """
    checks.check_params("nero_project", params, units=False)
    return jax.tree.map(lambda w: _project_leaf(w) if w.ndim >= 2 else w, params)


def _initial_scale(w: jax.Array) -> jax.Array:
    """The mean neuron norm of ``w`` (0.01 where it is 0)."""
    w = to_acc(w)
    norms = jnp.abs(w) if w.ndim < 2 else norm(w, unit_axes(w.ndim))
    scale = jnp.mean(norms)
    return jnp.where(scale == 0, jnp.asarray(0.01, scale.dtype), scale)


def scale_by_nero(
    learning_rate: optax.ScalarOrSchedule,
    b2: float = 0.999,
    *,
    constraints: bool = True,
) -> optax.GradientTransformation:
    r"""The Nero step: per-neuron normalized gradients, re-projected units.

    Per neuron (unit of a kernel, element of a smaller leaf) with ``n`` elements,
    ``t`` the step count and ``s`` the mean neuron norm of the params given to
    ``init`` (0.01 if it is 0):

    .. math::

      \begin{align*}
        v &\leftarrow \beta_2 v + (1-\beta_2) \|g\|^2, \qquad
        \hat g = g \big/ \sqrt{v / (1-\beta_2^t)} \\
        w' &= w - \eta\, s\, \hat g, \qquad
        w' \leftarrow \frac{w' - \bar w'}{\|w' - \bar w'\|}
          \text{ (kernels, with constraints)}
      \end{align*}

    A neuron whose gradients have all been zero has :math:`v = 0` and takes no
    step (the original's 0/0 is replaced by 0); a kernel unit that is exactly
    constant after the step maps to zero (the original divides 0 by 0). ``v`` is
    stored as :math:`\sqrt{v/n}` (:class:`ScaleByNeroState`).

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      b2: :math:`\beta_2`, the decay of the second moment, in ``[0, 1)``.
      constraints: Re-centre and re-normalize every kernel unit after each step.
        Static. Apply :func:`nero_project` to the params once before ``init``.

    Returns:
      A :class:`optax.GradientTransformation` with :class:`ScaleByNeroState`;
      last in a chain; needs ``params``; leaves of any rank are accepted.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> w = riemax.nero_project(jax.random.normal(jax.random.key(0), (8, 4)))
      >>> tx = riemax.scale_by_nero(0.01)
      >>> state = tx.init(w)
      >>> float(state.scale)  # the mean unit norm
      1.0
      >>> updates, state = tx.update(jnp.ones_like(w), state, w)
      >>> jnp.linalg.norm(optax.apply_updates(w, updates), axis=0).round(5)
      Array([1., 1., 1., 1.], dtype=float32)

    References:
      Liu, Bernstein, Meister and Yue, `Learning by turning: neural architecture
      aware optimisation <https://arxiv.org/abs/2102.07227>`_, ICML 2021
    """
    owner = "scale_by_nero"
    _check_nero(owner, learning_rate, b2, constraints)

    def init(params):
        return ScaleByNeroState(
            count=jnp.zeros([], jnp.int32),
            nu=jax.tree.map(
                lambda w: jnp.zeros(
                    kept_shape(w.shape, _neuron_axes(w.ndim)), acc_dtype(w.dtype)
                ),
                params,
            ),
            scale=jax.tree.map(_initial_scale, params),
        )

    def prepare(state, count, updates, params):
        # One function object per step: the per-neuron math of every leaf runs
        # once on all their neurons (elements of the small leaves) together.
        hyper = {"lr": schedule_value(learning_rate, state.count), "count": count}
        # Neurons of several elements and single elements are two batches.
        units = functools.partial(_nero_units, b2=b2, **hyper)
        elements = functools.partial(_nero_units, b2=b2, **hyper)
        derive = functools.partial(_nero_point, b2=b2, **hyper)

        def leaf(g, nu, scale, w):
            g, w_acc = to_acc(g), to_acc(w)
            axes = _neuron_axes(w.ndim)
            n = group_size(w.shape, axes)
            if constraints and axes:
                delta, nu = yield from _constrained(
                    g, nu, scale, w_acc, axes, n, derive
                )
                return delta.astype(w.dtype), nu
            # Root mean square of g over the neuron (|g| for one element), and
            # its moving average; g~ = g 2**-e_g per neuron.
            if axes:
                gr = yield from gram_program((w_acc, g), ((1, 1),), axes)
                g_sq, e_g = gr.values[0], gr.exps[1]
            else:
                g_sq, e_g = g, None
            inputs = (nu, g_sq, e_g, jnp.asarray(n, nu.dtype), scale)
            fn = units if axes else elements
            nu, step, f_g = yield Batched(fn, inputs, nu.shape)
            return (-((g * f_g) * step)).astype(w.dtype), nu

        return Step(leaf, extra=(state.scale,))

    return stateful(owner, init, prepare, fields=("nu",), units=False)


#: The per-unit sums of a constrained kernel's step, of ``(w~, g~)``:
#: ``|g~|^2, |w~|^2, <w~, g~>, sum w~, sum g~``.
_KERNEL_PAIRS = ((1, 1), (0, 0), (0, 1), (0, None), (1, None))


def _constrained(g, nu, scale, w, axes, n, derive):
    """One constrained kernel's step (a program): the new point is the centred
    and normalised ``q~ = w~ - beta g~``, whose mean and centred squared norm
    come from the one pass over ``w`` and ``g`` that also gives ``|g|^2``
    (:func:`_nero_point`); where that identity cancels anywhere, the step sums
    ``(q~ - mean)^2`` directly. ``q~`` is never stored: the write computes it
    from ``w`` and ``g``."""
    inputs = (nu, jnp.asarray(n, nu.dtype), scale)
    gr = yield gram_request((w, g), _KERNEL_PAIRS, axes, inputs=inputs, derive=derive)
    parts = gr.derived
    nu, beta, mean = (parts[i] for i in range(3))

    def centred():
        return ((w * gr.factor(0)) - beta * (g * gr.factor(1))) - mean

    cc = yield Fallback(
        parts[3],
        parts[4] > 0,
        lambda: [as_matrix(centred(), axes)],
        ((0, 0),),
        whole=parts.arrays[4],
        whole_value=parts.arrays[3],
        span=(parts.start, parts.stop),
    )
    inverse = yield Batched(_inverse_root, cc, cc.shape)
    return (centred() * inverse - w), nu


def _inverse_root(cc):
    """``1 / sqrt(cc)``, 0 where ``cc`` is 0 (a constant unit maps to 0)."""
    return safe_div(1.0, safe_sqrt(cc))


def _nero_point(gr, inputs, leaf=None, *, lr, count, b2):
    """Every constrained kernel unit of the step at once, from its sums
    (:data:`_KERNEL_PAIRS`): ``(nu, beta, mean, cc, cancels)``, the new point
    being ``(q~ - mean) / sqrt(cc)`` with ``q~ = w~ - beta g~`` (the sums'
    scaled ``w`` and ``g``); ``cancels`` is 1 where the identity for
    ``cc = |q~ - mean|^2`` cancels."""
    nu, n, scale = inputs
    gg, ww, wg, sum_w, sum_g = gr.values
    e_w, e_g = gr.exps
    nu, step, _ = _nero_units((nu, gg, e_g, n, scale), lr=lr, count=count, b2=b2)
    # The step on the scale of w: q~ = w~ - beta g~ (w~ = w 2**-e_w).
    beta = unscaled(step, -e_w)
    mean = (sum_w - beta * sum_g) / n
    cc = jnp.maximum(
        combination((1.0, -beta), (ww, wg, gg), PAIR_GRAM) - n * mean * mean, 0
    )
    cancels = jnp.where(cc < TRUSTED_FRACTION * (ww + beta * beta * gg), 1.0, 0.0)
    return nu, beta, mean, cc, cancels.astype(cc.dtype)


def _nero_units(inputs, *, lr, count, b2):
    """Nero's per-neuron math on the neurons of every leaf at once: ``(nu, step,
    f_g)`` with the update ``-(g f_g) step``.

    ``inputs`` per neuron: the stored root ``nu``, the scaled squared norm of the
    gradient and its exponent (or, for one-element neurons, the gradient itself
    and ``None``), the neuron size and the leaf's step scale.
    """
    nu, g_sq, e_g, n, scale = inputs
    if e_g is None:  # one element per neuron: |g| itself
        rms = jnp.abs(g_sq)
        e_g = exponent(rms)
    else:
        rms = unscaled(safe_sqrt(g_sq / n), e_g)
    f_g = pow2(-e_g, nu.dtype)
    nu = root_ema(nu, rms, b2)
    bc = 1 - b2 ** count.astype(nu.dtype)
    # g_hat = g~ k with k = 2**e_g / sqrt(v / bc), v = n nu**2.
    k = safe_div(jnp.sqrt(bc), jnp.sqrt(n) * unscaled(nu, -e_g))
    return nu, lr * scale * k, f_g  # the step is -step * g~


def _check_nero(owner, learning_rate, b2, constraints):
    checks.check_learning_rate(owner, learning_rate)
    checks.check_rate(owner, "b2", b2)
    _check_constraints(owner, constraints)


def nero(
    learning_rate: optax.ScalarOrSchedule = 0.01,
    b2: float = 0.999,
    constraints: bool = True,
) -> optax.GradientTransformation:
    r"""Nero (Liu et al., 2021): per-neuron normalized steps, with every kernel
    unit kept centred and of unit norm.

    Applied to every parameter, like the original: kernels per output unit,
    smaller leaves per element. It is :func:`scale_by_nero`; see there for the
    update rule. With ``constraints`` (the default) apply :func:`nero_project` to
    the initial params once, before ``init``, so that the step scale (the mean
    unit norm, taken by ``init``) is 1 and the first step starts on the
    constraint set.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule.
      b2: Decay of the per-neuron second moment.
      constraints: Keep kernel units centred and normalized.

    Returns:
      A :class:`optax.GradientTransformation`; leaves of any rank are accepted.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, riemax
      >>> params = {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 4, 8)),
      ...           "bias": jnp.zeros(8)}
      >>> params = riemax.nero_project(params)
      >>> tx = riemax.nero(0.01)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> [round(float(x), 6) for x in updates["bias"][:3]]  # -lr * 0.01 * sign(g)
      [-0.0001, -0.0001, -0.0001]

    References:
      Liu, Bernstein, Meister and Yue, `Learning by turning: neural architecture
      aware optimisation <https://arxiv.org/abs/2102.07227>`_, ICML 2021
    """
    _check_nero("nero", learning_rate, b2, constraints)
    return scale_by_nero(learning_rate, b2, constraints=constraints)
