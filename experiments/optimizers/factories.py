"""How the optimizers of the table are built: one factory per entry of
:data:`experiments.optimizers.OPTIMIZERS`, ``factory(learning_rate, **hyper)``,
the transformation of its main group (the whole tree, or the manifold leaves of a
hybrid); and :func:`build`, the whole optimizer of an entry (its companion on the
other leaves, its weight decay, its schedule).

jax, optax and riemax are imported inside each factory: the table is read by the
config checks, which run before JAX is loaded (a wrong flag is reported at once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from experiments.optimizers.groups import add_decay

if TYPE_CHECKING:
    import optax


def sgd(learning_rate, *, momentum, nesterov):
    import optax

    return optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)


def sgdg(learning_rate, *, momentum, grad_clip, omega):
    import riemax

    return riemax.sgdg(
        learning_rate, momentum=momentum, grad_clip=grad_clip, omega=omega
    )


def adamg(learning_rate, *, b1, b2, eps, grad_clip, omega):
    import riemax

    return riemax.adamg(
        learning_rate, b1=b1, b2=b2, eps=eps, grad_clip=grad_clip, omega=omega
    )


def adams(learning_rate, *, b1, b2, eps, channel_axes=(-1,), weight_decay=0.0):
    import riemax

    # The coupled L2 is applied in front (per group), or, where every leaf has
    # the same decay, inside the step (the registry's decay="inside").
    return riemax.adams(
        learning_rate, b1, b2, eps, weight_decay, channel_axes=channel_axes
    )


def adamsrt(learning_rate, *, b1, b2, eps, channel_axes=(-1,), weight_decay=0.0):
    import riemax

    return riemax.adamsrt(
        learning_rate, b1, b2, eps, weight_decay, channel_axes=channel_axes
    )


def sgdmrt(learning_rate, *, momentum, channel_axes=(-1,)):
    import riemax

    return riemax.sgdmrt(learning_rate, momentum, 0.0, channel_axes=channel_axes)


def _by_decay(decay, make):
    """``make(weight_decay)`` for a per-leaf decay tree: one transformation where
    every leaf has the same decay, else one per value (``optax.partition``)."""
    import jax
    import optax

    values = sorted(set(jax.tree.leaves(decay)))
    if len(values) <= 1:
        return make(values[0] if values else 0.0)
    labels = jax.tree.map(repr, decay)
    return optax.partition({repr(v): make(v) for v in values}, labels)


def adamp(learning_rate, *, b1, b2, eps, delta, wd_ratio, nesterov, decay):
    import riemax

    # AdamP decays inside its step (scaled by wd_ratio where it projects).
    return _by_decay(
        decay,
        lambda wd: riemax.adamp(
            learning_rate, b1, b2, eps, wd, delta, wd_ratio, nesterov=nesterov
        ),
    )


def sgdp(learning_rate, *, momentum, dampening, nesterov, eps, delta, wd_ratio, decay):
    import riemax

    return _by_decay(
        decay,
        lambda wd: riemax.sgdp(
            learning_rate, momentum, dampening, wd, nesterov, eps, delta, wd_ratio
        ),
    )


def nero(learning_rate, *, b2):
    import riemax

    return riemax.nero(learning_rate, b2)


def rotational_adamw(learning_rate, *, b1, b2, eps, weight_decay):
    import optax

    import riemax

    rate = riemax.equilibrium_rate("adamw", learning_rate, weight_decay, b1=b1, b2=b2)
    return riemax.rotational(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), rate)


def rotational_sgdm(learning_rate, *, momentum, weight_decay):
    import optax

    import riemax

    rate = riemax.equilibrium_rate(
        "sgdm", learning_rate, weight_decay, momentum=momentum
    )
    return riemax.rotational(optax.trace(momentum), rate)


def cayley_sgd(learning_rate, *, momentum):
    import riemax

    return riemax.cayley_sgd(learning_rate, momentum=momentum)


def cayley_adam(learning_rate, *, b1, b2, eps):
    import riemax

    return riemax.cayley_adam(learning_rate, b1=b1, b2=b2, eps=eps)


def manifold_muon(learning_rate):
    import riemax

    return riemax.manifold_muon(learning_rate)


def hyperspherical_descent(learning_rate):
    import riemax

    return riemax.hyperspherical_descent(learning_rate)


def nero_project(params, labels):
    import riemax

    del labels
    return riemax.nero_project(params)


def center_units(params, labels):
    import riemax

    del labels
    return riemax.center_units(params)


def adam(learning_rate, *, b1, b2, eps):
    import optax

    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


def adamw(learning_rate, *, b1, b2, eps, decay):
    import optax

    # optax.adamw's chain with a per-leaf decay (PyTorch AdamW: decoupled).
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        add_decay(decay),
        optax.scale_by_learning_rate(learning_rate),
    )


class RebuiltState(NamedTuple):
    """State of :func:`rebuilt_at`: the update count and the inner state."""

    count: Any  # type: ignore[assignment]  # optax's name; shadows tuple.count
    inner: Any


def rebuilt_at(
    make: Callable[..., optax.GradientTransformation],
    rates: Mapping[str, Callable[[Any], Any]],
    counts: Sequence[int],
) -> optax.GradientTransformation:
    """An optimizer that is rebuilt before the updates numbered ``counts``
    (0-based): its whole state (moments, counts, bias corrections) is that of a
    fresh ``init`` there, as when the original code creates a new optimizer at a
    learning-rate decay.

    ``make(**values)`` builds the optimizer with constant learning rates
    ``values``; ``rates`` maps each name to its schedule of the update count,
    which this wrapper's own count drives (so the rates go on with the run's
    schedule where the inner counts start again).
    """
    import jax
    import jax.numpy as jnp
    import optax

    at = jnp.asarray(sorted(set(int(c) for c in counts)) or [-1], jnp.int32)

    def values(count):
        return {k: jnp.asarray(f(count), jnp.float32) for k, f in rates.items()}

    def init_fn(params):
        count = jnp.zeros([], jnp.int32)
        return RebuiltState(count, make(**values(count)).init(params))

    def update_fn(updates, state, params=None, **extra):
        tx = make(**values(state.count))
        reset = jnp.any(state.count == at)
        fresh = tx.init(params)
        inner = jax.tree.map(
            lambda new, old: jnp.where(reset, new, old), fresh, state.inner
        )
        updates, inner = tx.update(updates, inner, params, **extra)
        return updates, RebuiltState(optax.safe_increment(state.count), inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def build(
    name: str,
    hyper: Mapping[str, Any],
    labels: Any,
    *,
    schedule: Callable[[float], optax.ScalarOrSchedule] = lambda lr: lr,
    decay: Any = None,
    rebuild_at: Sequence[int] = (),
) -> optax.GradientTransformation:
    """The optimizer ``name`` with resolved ``hyper`` (:func:`resolve_hyper`).

    Args:
      name: A key of :data:`OPTIMIZERS`.
      hyper: Every key of the entry's ``config_keys``.
      labels: ``"manifold"``/``"euclidean"`` tree (or label function).
      schedule: Turns a base learning rate into a schedule (default: constant).
        It is applied to every learning rate of the optimizer: ``lr`` and, for
        the hybrids with two rates, ``lr_manifold``.
      decay: Per-leaf decay tree (:func:`decay_tree`), or ``None`` for none.
      rebuild_at: Update counts (0-based) before which the whole optimizer is
        rebuilt, its state reset (:func:`rebuilt_at`; the entries with
        ``reset_at_decay`` get :func:`~experiments.optimizers.decay_counts`);
        empty: never.

    Returns:
      A :class:`optax.GradientTransformation`.
    """
    if rebuild_at:
        rates = {"lr": schedule(hyper["lr"])}
        if hyper.get("lr_manifold") is not None:
            rates["lr_manifold"] = schedule(hyper["lr_manifold"])
        rates = {k: v if callable(v) else (lambda _, v=v: v) for k, v in rates.items()}
        return rebuilt_at(
            lambda **values: build(name, dict(hyper) | values, labels, decay=decay),
            rates,
            rebuild_at,
        )
    import jax
    import optax

    import riemax
    from experiments.optimizers import lookup

    entry = lookup(name)
    fargs = {k: hyper[k] for k in entry.hyper}
    has_decay = decay is not None and any(d != 0 for d in jax.tree.leaves(decay))
    if decay is None:
        decay = jax.tree.map(lambda _: 0.0, labels)
    lr = schedule(hyper["lr"])
    if entry.companion in ("adamw", "sgdm"):
        if entry.companion == "adamw":
            keys = ("b1", "b2", "eps")
            euclidean = adamw(lr, **{k: hyper[k] for k in keys}, decay=decay)
        else:
            euclidean = sgd(lr, momentum=hyper["momentum"], nesterov=False)
        main = riemax.hybrid(entry.factory(lr, **fargs), euclidean, labels)
        if entry.decay != "decoupled" and has_decay:
            return optax.chain(add_decay(decay), main)
        return main
    if entry.companion == "adamw_hybrid":
        keys = ("b1", "b2", "eps")
        euclidean = adamw(lr, **{k: hyper[k] for k in keys}, decay=decay)
        return riemax.hybrid(
            entry.factory(schedule(hyper["lr_manifold"]), **fargs), euclidean, labels
        )
    if entry.decay == "decoupled":
        fargs["decay"] = decay
    # decay="inside" with one decay for every leaf: the factory adds it in its
    # step, where the decayed gradient is formed inside the per-unit sums and
    # not stored (on the WRN-28-10 tree: one kernel-sized array fewer per step).
    folded = False
    if entry.decay == "inside" and has_decay:
        values = set(jax.tree.leaves(decay))
        if len(values) == 1:
            fargs["weight_decay"] = values.pop()
            folded = True
    if entry.companion == "none":
        main = entry.factory(lr, **fargs)
    elif entry.companion == "elementwise":
        main = riemax.hybrid(
            entry.factory(lr, **fargs),
            entry.factory(lr, **fargs, channel_axes=None),
            labels,
        )
    else:
        euclidean = sgd(lr, momentum=hyper["momentum"], nesterov=hyper["nesterov"])
        main = riemax.hybrid(
            entry.factory(schedule(hyper["lr_manifold"]), **fargs), euclidean, labels
        )
    if folded:  # the same state as with the decay in front
        return optax.chain(optax.identity(), main)
    if entry.decay != "decoupled" and has_decay:
        return optax.chain(add_decay(decay), main)
    return main
