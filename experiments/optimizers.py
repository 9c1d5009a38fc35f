r"""The one table of optimizers used by the experiments and the benchmarks.

Each :class:`OptimizerEntry` says how one named optimizer is built from a config:

- ``factory(learning_rate, **hyper)``: the transformation of the *main* group (the
  whole tree, or the manifold leaves of a hybrid);
- ``hyper``: its hyper-parameters (config keys) with their defaults;
- ``lr`` / ``lr_manifold``: default learning rates (``lr_manifold`` only for the
  hybrids, whose two halves have their own rates);
- ``companion``: what the parameters outside the manifold get,

  * ``"none"``: the factory runs on the whole tree (the labels only feed the
    metrics);
  * ``"nesterov_sgd"``: the papers' Euclidean half (Cho & Lee): momentum SGD at
    ``lr`` with ``momentum`` and ``nesterov``, the factory at ``lr_manifold`` on
    the manifold leaves;
  * ``"elementwise"``: the same algorithm with ``channel_axes=None`` (Roburin et
    al.: the "other" parameter group, one learning rate for both);
  * ``"adamw"`` / ``"sgdm"``: the rotational wrapper on the manifold leaves, the
    wrapped optimizer's ordinary step (AdamW, momentum SGD) at ``lr`` elsewhere
    (Kosson et al.);

- ``decay``: ``"coupled"`` (L2 added to the gradient before the optimizer, the
  originals' ``weight_decay``) or ``"decoupled"`` (the factory receives the
  per-leaf decay tree as ``decay=`` and places it itself, as AdamW does);
- ``sphere``: the manifold kernels are re-initialised to unit-norm units and get
  no weight decay (SGD-G, Adam-G); ``fixed_norm``: no weight decay on the manifold
  kernels, whose norm the optimizer keeps (the rotational wrapper);
- ``init_params(params, labels)``: the optimizer's construction-time projection
  of the initial parameters (Nero's ``nero_project``, the wrapper's
  ``center_units``);
- ``decay_all``: by default biases and BatchNorm scales/offsets are decayed like the
  kernels (the papers' SGD/Adam baselines), otherwise only kernels are;
- ``paper_labels``: the rule that ``--labels=paper`` means for this optimizer
  (``"rbn"``: name contains ``conv`` and fan-in > fan-out; ``"srt"``: every conv
  kernel; ``"ndim"``: every leaf with at least two axes).

Adding an optimizer is adding one entry to :data:`OPTIMIZERS`.

Weight decay is per parameter group (:func:`param_groups`): ``manifold`` kernels,
Euclidean ``kernel``\ s, ``bias``\ es of Conv/Dense layers, BatchNorm ``gamma``
(scale) and ``beta`` (offset); :func:`decay_tree` maps the config's
``manifold_decay``, ``weight_decay``, ``bias_decay``, ``gamma_decay`` and
``beta_decay`` onto the leaves.

Schedules (:func:`make_schedule`) reproduce the three papers: ``"piecewise"``
(Cho & Lee: ``lr * factor ** #{s in decay_steps: count > s}``, strict ``>`` on the
0-based update count), ``"multistep"`` (Roburin et al.: PyTorch ``MultiStepLR``
stepped once per epoch, ``lr * factor ** #{m in decay_epochs: epoch >= m}``),
``"linear"`` (Stock et al.: ``lr * (E - epoch) / E`` set at the start of each
epoch) and ``"constant"``; ``"cosine"`` (:func:`optax.cosine_decay_schedule` to 0
at the end of the run) is the recipe for data without a paper preset. A linear
warm-up (``warmup_steps``) multiplies any of them. Every learning rate of an
optimizer follows the same schedule: both halves of a hybrid, the manifold and
the Euclidean one alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optax

# jax, optax and riemax are imported where a transformation or a schedule is
# built: the table itself is read by the config checks, which run before JAX is
# loaded (a wrong flag is reported at once).

# --------------------------------------------------------------------------------------
# Factories (the main group's transformation)
# --------------------------------------------------------------------------------------


def _sgd(learning_rate, *, momentum, nesterov):
    import optax

    return optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)


def _sgdg(learning_rate, *, momentum, grad_clip, omega):
    import riemax

    return riemax.sgdg(
        learning_rate, momentum=momentum, grad_clip=grad_clip, omega=omega
    )


def _adamg(learning_rate, *, b1, b2, eps, grad_clip, omega):
    import riemax

    return riemax.adamg(
        learning_rate, b1=b1, b2=b2, eps=eps, grad_clip=grad_clip, omega=omega
    )


def _adams(learning_rate, *, b1, b2, eps, channel_axes=(-1,)):
    import riemax

    # weight_decay=0: the coupled L2 is applied per group in front (same chain).
    return riemax.adams(learning_rate, b1, b2, eps, 0.0, channel_axes=channel_axes)


def _adamsrt(learning_rate, *, b1, b2, eps, channel_axes=(-1,)):
    import riemax

    return riemax.adamsrt(learning_rate, b1, b2, eps, 0.0, channel_axes=channel_axes)


def _sgdmrt(learning_rate, *, momentum, channel_axes=(-1,)):
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


def _adamp(learning_rate, *, b1, b2, eps, delta, wd_ratio, nesterov, decay):
    import riemax

    # AdamP decays inside its step (scaled by wd_ratio where it projects).
    return _by_decay(
        decay,
        lambda wd: riemax.adamp(
            learning_rate, b1, b2, eps, wd, delta, wd_ratio, nesterov=nesterov
        ),
    )


def _sgdp(learning_rate, *, momentum, dampening, nesterov, eps, delta, wd_ratio, decay):
    import riemax

    return _by_decay(
        decay,
        lambda wd: riemax.sgdp(
            learning_rate, momentum, dampening, wd, nesterov, eps, delta, wd_ratio
        ),
    )


def _nero(learning_rate, *, b2):
    import riemax

    return riemax.nero(learning_rate, b2)


def _rotational_adamw(learning_rate, *, b1, b2, eps, weight_decay):
    import optax

    import riemax

    rate = riemax.equilibrium_rate("adamw", learning_rate, weight_decay, b1=b1, b2=b2)
    return riemax.rotational(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), rate)


def _rotational_sgdm(learning_rate, *, momentum, weight_decay):
    import optax

    import riemax

    rate = riemax.equilibrium_rate(
        "sgdm", learning_rate, weight_decay, momentum=momentum
    )
    return riemax.rotational(optax.trace(momentum), rate)


def _nero_project(params, labels):
    import riemax

    del labels
    return riemax.nero_project(params)


def _center_units(params, labels):
    import riemax

    del labels
    return riemax.center_units(params)


def _adam(learning_rate, *, b1, b2, eps):
    import optax

    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


def _adamw(learning_rate, *, b1, b2, eps, decay):
    import optax

    # optax.adamw's chain with a per-leaf decay (PyTorch AdamW: decoupled).
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        add_decay(decay),
        optax.scale_by_learning_rate(learning_rate),
    )


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerEntry:
    """One named optimizer: see the module docstring for the fields."""

    name: str
    factory: Callable[..., optax.GradientTransformation]
    hyper: Mapping[str, Any]
    lr: float
    companion: str = "none"
    lr_manifold: float | None = None
    decay: str = "coupled"
    sphere: bool = False
    fixed_norm: bool = False
    init_params: Callable[[Any, Any], Any] | None = None
    decay_all: bool = False
    paper_labels: str = "rbn"
    description: str = ""

    def __post_init__(self):
        if self.companion not in COMPANIONS:
            raise ValueError(f"{self.name}: unknown companion {self.companion!r}")
        if self.decay not in ("coupled", "decoupled"):
            raise ValueError(f"{self.name}: unknown decay {self.decay!r}")
        if (self.lr_manifold is None) == (self.companion == "nesterov_sgd"):
            raise ValueError(f"{self.name}: lr_manifold is for nesterov_sgd hybrids")
        object.__setattr__(self, "hyper", MappingProxyType(dict(self.hyper)))

    @property
    def config_keys(self) -> tuple[str, ...]:
        """The hyper-parameter config keys this optimizer reads."""
        keys = ["lr", *self.hyper]
        if self.companion == "nesterov_sgd":
            keys += ["lr_manifold", "momentum", "nesterov"]
        return tuple(dict.fromkeys(keys))


COMPANIONS = ("none", "nesterov_sgd", "elementwise", "adamw", "sgdm")
_SGD_HYPER = {"momentum": 0.9, "nesterov": True}
_P_HYPER = {"eps": 1e-8, "delta": 0.1, "wd_ratio": 0.1}
_ADAM_HYPER = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}

OPTIMIZERS: dict[str, OptimizerEntry] = {
    e.name: e
    for e in [
        OptimizerEntry(
            "sgd",
            _sgd,
            _SGD_HYPER,
            lr=0.1,
            decay_all=True,
            description="momentum SGD (Nesterov by default) on every parameter, "
            "coupled L2 on every group (the papers' SGD baseline)",
        ),
        OptimizerEntry(
            "sgdg",
            _sgdg,
            {"momentum": 0.9, "grad_clip": 0.1, "omega": 0.1},
            lr=0.01,
            lr_manifold=0.2,
            companion="nesterov_sgd",
            sphere=True,
            description="SGD-G on the manifold kernels, Nesterov SGD with L2 on "
            "the Euclidean weights (Cho & Lee 2017)",
        ),
        OptimizerEntry(
            "adamg",
            _adamg,
            {"b1": 0.9, "b2": 0.99, "eps": 1e-8, "grad_clip": 0.1, "omega": 0.1},
            lr=0.01,
            lr_manifold=0.05,
            companion="nesterov_sgd",
            sphere=True,
            description="Adam-G on the manifold kernels, Nesterov SGD with L2 on "
            "the Euclidean weights (Cho & Lee 2017)",
        ),
        OptimizerEntry(
            "adams",
            _adams,
            _ADAM_HYPER,
            lr=1e-3,
            companion="elementwise",
            decay_all=True,
            paper_labels="srt",
            description="AdamS per unit on the manifold kernels, Adam elsewhere, "
            "coupled L2 everywhere (Roburin et al. 2020)",
        ),
        OptimizerEntry(
            "adamsrt",
            _adamsrt,
            _ADAM_HYPER,
            lr=1e-3,
            companion="elementwise",
            decay_all=True,
            paper_labels="srt",
            description="AdamSRT per unit on the manifold kernels, Adam elsewhere, "
            "coupled L2 everywhere (Roburin et al. 2020)",
        ),
        OptimizerEntry(
            "sgdmrt",
            _sgdmrt,
            {"momentum": 0.9},
            lr=0.1,
            companion="elementwise",
            decay_all=True,
            paper_labels="srt",
            description="SGD-MRT per unit on the manifold kernels, momentum SGD "
            "elsewhere, coupled L2 everywhere (Roburin et al. 2020)",
        ),
        OptimizerEntry(
            "adam",
            _adam,
            _ADAM_HYPER,
            lr=1e-3,
            decay_all=True,
            paper_labels="srt",
            description="Adam on every parameter with coupled L2 (torch.optim.Adam)",
        ),
        OptimizerEntry(
            "adamw",
            _adamw,
            _ADAM_HYPER,
            lr=1e-3,
            decay="decoupled",
            decay_all=True,
            paper_labels="srt",
            description="AdamW on every parameter, decoupled decay (torch.optim.AdamW)",
        ),
        OptimizerEntry(
            "adamp",
            _adamp,
            {**_ADAM_HYPER, **_P_HYPER, "nesterov": False},
            lr=1e-3,
            decay="decoupled",
            decay_all=True,
            description="AdamP on every parameter: the radial part of the step "
            "removed where the per-step test finds a scale-invariant tensor "
            "(Heo et al. 2021; lr and decay of the official usage)",
        ),
        OptimizerEntry(
            "sgdp",
            _sgdp,
            {"momentum": 0.9, "dampening": 0.0, "nesterov": True, **_P_HYPER},
            lr=0.1,
            decay="decoupled",
            decay_all=True,
            description="SGDP on every parameter (Heo et al. 2021; the official "
            "usage's momentum, Nesterov and decay)",
        ),
        OptimizerEntry(
            "nero",
            _nero,
            {"b2": 0.999},
            lr=0.01,
            init_params=_nero_project,
            paper_labels="ndim",
            description="Nero on every parameter, centred unit-norm neurons, no "
            "weight decay (Liu et al. 2021, their CIFAR settings)",
        ),
        OptimizerEntry(
            "rotational-adamw",
            _rotational_adamw,
            {**_ADAM_HYPER, "weight_decay": 0.01},
            lr=0.05,
            companion="adamw",
            decay="decoupled",
            fixed_norm=True,
            init_params=_center_units,
            paper_labels="ndim",
            description="AdamW's direction rotating the manifold kernels at the "
            "equilibrium rate, AdamW elsewhere (Kosson et al. 2024, ResNet-20)",
        ),
        OptimizerEntry(
            "rotational-sgdm",
            _rotational_sgdm,
            {"momentum": 0.9, "weight_decay": 1e-4},
            lr=0.5,
            companion="sgdm",
            fixed_norm=True,
            init_params=_center_units,
            paper_labels="ndim",
            description="momentum SGD's direction rotating the manifold kernels at "
            "the equilibrium rate, momentum SGD elsewhere (Kosson et al. 2024)",
        ),
    ]
}

#: Default ``weight_decay`` per optimizer where it is not the common 5e-4
#: (PyTorch AdamW's default).
DEFAULT_WEIGHT_DECAY = {"adamw": 0.01, "adamp": 0.01, "sgdp": 1e-5, "nero": 0.0}
WEIGHT_DECAY = 5e-4

#: The hyper-parameter keys of all optimizers (config keys, default ``None``).
HYPER_KEYS = ("lr", "lr_manifold", "momentum", "nesterov", "b1", "b2", "eps")
HYPER_KEYS += ("grad_clip", "omega", "dampening", "delta", "wd_ratio")


def names() -> list[str]:
    return list(OPTIMIZERS)


def lookup(name: str) -> OptimizerEntry:
    if name not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
        )
    return OPTIMIZERS[name]


_WHO_GETS_LR = {
    "none": "--lr: every parameter",
    "nesterov_sgd": "--lr (--learnRate): the Euclidean half only (Nesterov SGD on "
    "biases, BatchNorm, classifier and kernels off the manifold); --lr_manifold "
    "(--learnRateG): the manifold kernels",
    "elementwise": "--lr: both halves (per unit on the manifold kernels, element "
    "by element elsewhere)",
    "adamw": "--lr: both halves (AdamW off the manifold; the manifold kernels "
    "turn at the equilibrium rate of --lr and --weight_decay)",
    "sgdm": "--lr: both halves (momentum SGD off the manifold; the manifold "
    "kernels turn at the equilibrium rate of --lr and --weight_decay)",
}


def learning_rate_help() -> list[str]:
    """Which flag sets which learning rate, one line per kind of optimizer."""
    by_kind: dict[str, list[str]] = {}
    for entry in OPTIMIZERS.values():
        by_kind.setdefault(entry.companion, []).append(entry.name)
    return [f"{', '.join(names)}: {_WHO_GETS_LR[k]}" for k, names in by_kind.items()]


def resolve_hyper(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer's hyper-parameters: ``given`` (non-``None`` values) over the
    table's defaults. A value for a key that the optimizer does not read raises."""
    entry = lookup(name)
    keys = entry.config_keys
    extra = sorted(k for k in HYPER_KEYS if given.get(k) is not None and k not in keys)
    if extra:
        raise ValueError(
            f"{', '.join(extra)} does not apply to optimizer {name!r} "
            f"(it reads {', '.join(keys)})"
        )
    defaults = {"lr": entry.lr, **entry.hyper}
    if entry.companion == "nesterov_sgd":
        defaults |= {"lr_manifold": entry.lr_manifold} | _SGD_HYPER
    out = {k: (given[k] if given.get(k) is not None else defaults[k]) for k in keys}
    return out


# --------------------------------------------------------------------------------------
# Parameter groups and weight decay
# --------------------------------------------------------------------------------------

GROUPS = ("manifold", "kernel", "bias", "gamma", "beta")


def param_groups(params: Any, labels: Any, batchnorm_paths: set[str]) -> Any:
    """The weight-decay group of every leaf: ``manifold`` (manifold kernels),
    ``kernel`` (other leaves of rank >= 2), ``gamma``/``beta`` (scale/bias of a
    module whose ``/``-joined path is in ``batchnorm_paths``), ``bias`` (the rest)."""
    import jax

    import riemax

    def one(path, leaf, label):
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        parent = "/".join(keys[:-1])
        if label == riemax.MANIFOLD:
            return "manifold"
        if len(getattr(leaf, "shape", ())) >= 2:
            return "kernel"
        if parent in batchnorm_paths:
            return "gamma" if keys[-1] == "scale" else "beta"
        return "bias"

    return jax.tree_util.tree_map_with_path(one, params, labels)


def decay_tree(groups: Any, decays: Mapping[str, float]) -> Any:
    """Per-leaf decay coefficients (Python floats) from per-group values."""
    import jax

    return jax.tree.map(lambda g: float(decays[g]), groups)


def add_decay(decay: Any) -> optax.GradientTransformation:
    """``g + decay * w`` leaf by leaf, ``decay`` a tree of Python floats (static;
    leaves with 0 are passed through)."""
    import jax
    import optax

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        # The decay tree leads: inside optax.partition a masked leaf of the
        # updates is a MaskedNode subtree, passed through unchanged.
        out = jax.tree.map(
            lambda d, g, w: g if d == 0 or not hasattr(g, "dtype") else g + d * w,
            decay,
            updates,
            params,
        )
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------

SCHEDULES = ("constant", "piecewise", "multistep", "linear", "cosine")
#: Schedules whose shape depends on the length of the run (``steps``).
LENGTH_DEPENDENT = ("cosine",)


def schedule_of(cfg: dict, base: float) -> optax.Schedule:
    """:func:`make_schedule` of a resolved config for the base rate ``base``: the
    schedule the training loop applies to each learning rate."""
    return make_schedule(
        base,
        cfg["schedule"],
        decay_steps=tuple(cfg["decay_steps"]),
        decay_epochs=tuple(cfg["decay_epochs"]),
        decay_factor=cfg["decay_factor"],
        steps_per_epoch=cfg["steps_per_epoch"],
        epochs=cfg["epochs"],
        total_steps=cfg.get("steps"),  # in the key of length-dependent ones
        warmup_steps=cfg["warmup_steps"],
    )


def make_schedule(
    base: float,
    kind: str,
    *,
    decay_steps: tuple[int, ...] = (),
    decay_epochs: tuple[float, ...] = (),
    decay_factor: float = 0.1,
    steps_per_epoch: int = 1,
    epochs: int | None = None,
    total_steps: int | None = None,
    warmup_steps: int = 0,
) -> optax.Schedule:
    """The learning rate as a function of the 0-based update count.

    ``kind`` is one of :data:`SCHEDULES`: the papers' ``"piecewise"``,
    ``"multistep"`` and ``"linear"`` (see the module docstring), ``"constant"``,
    or ``"cosine"``: :func:`optax.cosine_decay_schedule` from ``base`` down to 0
    over the ``total_steps - warmup_steps`` updates after the warm-up.

    With ``warmup_steps = W > 1`` the schedule is multiplied by a linear ramp
    (:func:`optax.linear_schedule`) from ``1/W`` at update 0 to 1 at update
    ``W - 1``; the papers' decay points stay where they were.
    """
    import jax.numpy as jnp
    import optax

    if kind == "constant":

        def schedule(count):
            return jnp.asarray(base, jnp.float32) + 0 * count

    elif kind == "piecewise":
        bounds = jnp.asarray(decay_steps or [2**31 - 1], jnp.int32)

        def schedule(count):
            n = jnp.sum(jnp.asarray(count, jnp.int32) > bounds) if decay_steps else 0
            return base * jnp.asarray(decay_factor, jnp.float32) ** n

    elif kind == "multistep":
        milestones = jnp.asarray(decay_epochs or [2**31 - 1], jnp.float32)

        def schedule(count):
            epoch = jnp.asarray(count, jnp.int32) // steps_per_epoch
            n = jnp.sum(epoch >= milestones) if decay_epochs else 0
            return base * jnp.asarray(decay_factor, jnp.float32) ** n

    elif kind == "linear":
        if not epochs:
            raise ValueError("the linear schedule needs epochs")

        def schedule(count):
            epoch = jnp.asarray(count, jnp.int32) // steps_per_epoch
            frac = jnp.maximum(epochs - epoch, 0).astype(jnp.float32) / epochs
            return base * frac

    elif kind == "cosine":
        if not total_steps:
            raise ValueError("the cosine schedule needs total_steps")
        cosine = optax.cosine_decay_schedule(base, max(total_steps - warmup_steps, 1))

        def schedule(count):
            return cosine(jnp.maximum(jnp.asarray(count, jnp.int32) - warmup_steps, 0))

    else:
        raise ValueError(f"unknown schedule {kind!r}; valid schedules: {SCHEDULES}")
    if warmup_steps <= 1:
        return schedule
    ramp = optax.linear_schedule(1.0 / warmup_steps, 1.0, warmup_steps - 1)

    def warmed_up(count):
        return schedule(count) * ramp(count)

    return warmed_up


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------


def build(
    name: str,
    hyper: Mapping[str, Any],
    labels: Any,
    *,
    schedule: Callable[[float], optax.ScalarOrSchedule] = lambda lr: lr,
    decay: Any = None,
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

    Returns:
      A :class:`optax.GradientTransformation`.
    """
    import jax
    import optax

    import riemax

    entry = lookup(name)
    fargs = {k: hyper[k] for k in entry.hyper}
    has_decay = decay is not None and any(d != 0 for d in jax.tree.leaves(decay))
    if decay is None:
        decay = jax.tree.map(lambda _: 0.0, labels)
    lr = schedule(hyper["lr"])
    if entry.companion in ("adamw", "sgdm"):
        if entry.companion == "adamw":
            keys = ("b1", "b2", "eps")
            euclidean = _adamw(lr, **{k: hyper[k] for k in keys}, decay=decay)
        else:
            euclidean = _sgd(lr, momentum=hyper["momentum"], nesterov=False)
        main = riemax.hybrid(entry.factory(lr, **fargs), euclidean, labels)
        if entry.decay == "coupled" and has_decay:
            return optax.chain(add_decay(decay), main)
        return main
    if entry.decay == "decoupled":
        fargs["decay"] = decay
    if entry.companion == "none":
        main = entry.factory(lr, **fargs)
    elif entry.companion == "elementwise":
        main = riemax.hybrid(
            entry.factory(lr, **fargs),
            entry.factory(lr, **fargs, channel_axes=None),
            labels,
        )
    else:
        euclidean = _sgd(lr, momentum=hyper["momentum"], nesterov=hyper["nesterov"])
        main = riemax.hybrid(
            entry.factory(schedule(hyper["lr_manifold"]), **fargs), euclidean, labels
        )
    if entry.decay == "coupled" and has_decay:
        return optax.chain(add_decay(decay), main)
    return main


def group_decays(name: str, cfg: Mapping[str, Any]) -> dict[str, float]:
    """The per-group decay of a config (``None`` values take the entry's
    defaults): ``weight_decay`` for Euclidean kernels; ``manifold_decay`` 0 on the
    sphere, else ``weight_decay``; biases and BatchNorm parameters
    ``weight_decay`` if the entry decays all groups, else 0."""
    entry = lookup(name)
    wd = cfg.get("weight_decay")
    if wd is None:
        wd = DEFAULT_WEIGHT_DECAY.get(name, WEIGHT_DECAY)
    rest = wd if entry.decay_all else 0.0

    def pick(key, default):
        value = cfg.get(key)
        return float(default if value is None else value)

    fixed = entry.sphere or entry.fixed_norm
    manifold = pick("manifold_decay", 0.0 if fixed else wd)
    if fixed and manifold != 0:
        raise ValueError(
            f"manifold_decay must be 0 for {name!r}: it keeps the norm of its "
            "manifold kernels, weight decay does not apply"
        )
    return {
        "manifold": manifold,
        "kernel": float(wd),
        "bias": pick("bias_decay", rest),
        "gamma": pick("gamma_decay", rest),
        "beta": pick("beta_decay", rest),
    }
