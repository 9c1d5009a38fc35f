r"""The one table of optimizers used by the experiments and the benchmarks.

Each :class:`OptimizerEntry` says how one named optimizer is built from a config:

- ``factory(learning_rate, **hyper)``: the transformation of the *main* group (the
  whole tree, or the manifold leaves of a hybrid);
- ``hyper``: its hyper-parameters (config keys) with their defaults;
- ``lr`` / ``lr_manifold``: default learning rates (``lr_manifold`` only for the
  two-rate hybrids, ``nesterov_sgd`` and ``adamw_hybrid``, whose two halves have
  their own rates);
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
  * ``"adamw_hybrid"``: AdamW (``b1``, ``b2``, ``eps``, decoupled decay) at ``lr``
    on the Euclidean leaves, the factory at ``lr_manifold`` on the manifold leaves
    (manifold Muon and hyperspherical descent, Bernstein 2025, whose AdamW
    baseline this is);

- ``decay``: ``"coupled"`` (L2 added to the gradient before the optimizer, the
  originals' ``weight_decay``), ``"inside"`` (the same coupled L2, which the
  factory adds inside its step when every leaf has one decay, given as
  ``weight_decay=``: its per-unit sums then form the decayed gradient without
  storing it; added in front otherwise) or ``"decoupled"`` (the factory receives
  the per-leaf decay tree as ``decay=`` and places it itself, as AdamW does);
- ``sphere``: the manifold kernels are re-initialised to unit-norm units and get
  no weight decay (SGD-G, Adam-G); ``fixed_norm``: no weight decay on the manifold
  kernels, whose norm the optimizer keeps (the rotational wrapper);
- ``init_params(params, labels)``: the optimizer's construction-time projection
  of the initial parameters (Nero's ``nero_project``, the wrapper's
  ``center_units``);
- ``start``: the :func:`riemax.to_manifold` method (``"qr"``, ``"msign"``,
  ``"normalize"``) that puts the manifold kernels on the optimizer's manifold once,
  at init, before its state is created (the Stiefel and sphere optimizers that
  keep the weights themselves there); a resumed run restores its kernels as they
  were and is not projected again;
- ``fan``: ``"tall"`` where the manifold takes only kernels whose matrix view
  ``w.reshape(-1, out)`` is tall (fan-in >= fan-out: orthonormal units, Cayley
  SGD/Adam): a wider kernel that the labels put on the manifold is moved to the
  Euclidean half, whatever the ``labels`` mode; ``"any"``: no condition;
- ``reset_at_decay``: the optimizer's state is reset (the optimizer rebuilt, as
  the Cayley authors' code does) at every decay of a step schedule
  (``piecewise``, ``multistep``): moments, counts and bias corrections start
  afresh while the learning rates follow the run's schedule;
- ``decay_all``: by default biases and BatchNorm scales/offsets are decayed like the
  kernels (the papers' SGD/Adam baselines), otherwise only kernels are;
- ``paper_labels``: the rule that ``--labels=paper`` means for this optimizer
  (``"rbn"``: name contains ``conv`` and fan-in > fan-out; ``"srt"``: every conv
  kernel; ``"ndim"``: every leaf with at least two axes; ``"stiefel"``: name
  contains ``conv`` and fan-in >= fan-out, the Cayley authors' rule;
  ``"kernels"``: every kernel, ``riemax.labels_by_rule(pattern="", fan="any")``,
  Bernstein's "every weight on the manifold"). For the optimizers with a
  ``start`` it is also the default split (``labels`` ``None``): their manifold
  is part of the algorithm.

Adding an optimizer is adding one entry to :data:`OPTIMIZERS`.

The table's neighbours: :mod:`~experiments.optimizers.factories` (the
transformation of each entry), :mod:`~experiments.optimizers.groups` (parameter
groups and weight decay), :mod:`~experiments.optimizers.schedules` (the
learning-rate schedules).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from experiments.optimizers import factories
from experiments.optimizers.factories import build
from experiments.optimizers.groups import (
    GROUPS,
    add_decay,
    decay_tree,
    param_groups,
)
from experiments.optimizers.schedules import (
    LENGTH_DEPENDENT,
    SCHEDULES,
    decay_counts,
    make_schedule,
    schedule_of,
)

if TYPE_CHECKING:
    import optax

__all__ = [
    "COMPANIONS",
    "DEFAULT_WEIGHT_DECAY",
    "GROUPS",
    "HYPER_KEYS",
    "LENGTH_DEPENDENT",
    "OPTIMIZERS",
    "PAPER_LABELS",
    "SCHEDULES",
    "START_METHODS",
    "TWO_RATES",
    "WEIGHT_DECAY",
    "OptimizerEntry",
    "add_decay",
    "build",
    "decay_counts",
    "decay_tree",
    "group_decays",
    "learning_rate_help",
    "lookup",
    "make_schedule",
    "names",
    "param_groups",
    "resolve_hyper",
    "schedule_of",
]


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
    start: str | None = None
    fan: str = "any"
    reset_at_decay: bool = False

    def __post_init__(self):
        if self.companion not in COMPANIONS:
            raise ValueError(f"{self.name}: unknown companion {self.companion!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"{self.name}: unknown decay {self.decay!r}")
        if (self.lr_manifold is None) == (self.companion in TWO_RATES):
            raise ValueError(
                f"{self.name}: lr_manifold is for the two-rate hybrids "
                f"({', '.join(TWO_RATES)})"
            )
        if self.start is not None and self.start not in START_METHODS:
            raise ValueError(f"{self.name}: unknown start method {self.start!r}")
        if self.fan not in ("any", "tall"):
            raise ValueError(f"{self.name}: unknown fan {self.fan!r}")
        if self.paper_labels not in PAPER_LABELS:
            raise ValueError(f"{self.name}: unknown paper_labels {self.paper_labels!r}")
        object.__setattr__(self, "hyper", MappingProxyType(dict(self.hyper)))

    @property
    def config_keys(self) -> tuple[str, ...]:
        """The hyper-parameter config keys this optimizer reads."""
        keys = ["lr", *self.hyper]
        if self.companion == "nesterov_sgd":
            keys += ["lr_manifold", "momentum", "nesterov"]
        elif self.companion == "adamw_hybrid":
            keys += ["lr_manifold", *_ADAM_HYPER]
        return tuple(dict.fromkeys(keys))

    @property
    def default_labels(self) -> str:
        """The ``labels`` mode of a config that leaves it ``None``: the paper's
        rule where the manifold is part of the algorithm (a ``start``), else the
        structural split."""
        return "paper" if self.start is not None else "structural"


DECAYS = ("coupled", "inside", "decoupled")
COMPANIONS = ("none", "nesterov_sgd", "elementwise", "adamw", "sgdm", "adamw_hybrid")
#: The companions whose two halves have their own learning rates.
TWO_RATES = ("nesterov_sgd", "adamw_hybrid")
#: The start projections (:func:`riemax.to_manifold` methods) an entry may name;
#: each with what it does, for ``--help``.
START_METHODS = {
    "qr": "orthonormal units by QR",
    "msign": "the matrix sign, every singular value 1",
    "normalize": "each kernel scaled to norm 1 as a whole",
}
PAPER_LABELS = ("rbn", "srt", "ndim", "stiefel", "kernels")
_SGD_HYPER = {"momentum": 0.9, "nesterov": True}
_P_HYPER = {"eps": 1e-8, "delta": 0.1, "wd_ratio": 0.1}
_ADAM_HYPER = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}

OPTIMIZERS: dict[str, OptimizerEntry] = {
    e.name: e
    for e in [
        OptimizerEntry(
            "sgd",
            factories.sgd,
            _SGD_HYPER,
            lr=0.1,
            decay_all=True,
            description="momentum SGD (Nesterov by default) on every parameter, "
            "coupled L2 on every group (the papers' SGD baseline)",
        ),
        OptimizerEntry(
            "sgdg",
            factories.sgdg,
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
            factories.adamg,
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
            factories.adams,
            _ADAM_HYPER,
            lr=1e-3,
            companion="elementwise",
            decay="inside",
            decay_all=True,
            paper_labels="srt",
            description="AdamS per unit on the manifold kernels, Adam elsewhere, "
            "coupled L2 everywhere (Roburin et al. 2020)",
        ),
        OptimizerEntry(
            "adamsrt",
            factories.adamsrt,
            _ADAM_HYPER,
            lr=1e-3,
            companion="elementwise",
            decay="inside",
            decay_all=True,
            paper_labels="srt",
            description="AdamSRT per unit on the manifold kernels, Adam elsewhere, "
            "coupled L2 everywhere (Roburin et al. 2020)",
        ),
        OptimizerEntry(
            "sgdmrt",
            factories.sgdmrt,
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
            factories.adam,
            _ADAM_HYPER,
            lr=1e-3,
            decay_all=True,
            paper_labels="srt",
            description="Adam on every parameter with coupled L2 (torch.optim.Adam)",
        ),
        OptimizerEntry(
            "adamw",
            factories.adamw,
            _ADAM_HYPER,
            lr=1e-3,
            decay="decoupled",
            decay_all=True,
            paper_labels="srt",
            description="AdamW on every parameter, decoupled decay (torch.optim.AdamW)",
        ),
        OptimizerEntry(
            "adamp",
            factories.adamp,
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
            factories.sgdp,
            {"momentum": 0.9, "dampening": 0.0, "nesterov": True, **_P_HYPER},
            lr=0.1,
            decay="decoupled",
            decay_all=True,
            description="SGDP on every parameter (Heo et al. 2021; the official "
            "usage's momentum, Nesterov and decay)",
        ),
        OptimizerEntry(
            "nero",
            factories.nero,
            {"b2": 0.999},
            lr=0.01,
            init_params=factories.nero_project,
            paper_labels="ndim",
            description="Nero on every parameter, centred unit-norm neurons, no "
            "weight decay (Liu et al. 2021, their CIFAR settings)",
        ),
        OptimizerEntry(
            "rotational-adamw",
            factories.rotational_adamw,
            {**_ADAM_HYPER, "weight_decay": 0.01},
            lr=0.05,
            companion="adamw",
            decay="decoupled",
            fixed_norm=True,
            init_params=factories.center_units,
            paper_labels="ndim",
            description="AdamW's direction rotating the manifold kernels at the "
            "equilibrium rate, AdamW elsewhere (Kosson et al. 2024, ResNet-20)",
        ),
        OptimizerEntry(
            "rotational-sgdm",
            factories.rotational_sgdm,
            {"momentum": 0.9, "weight_decay": 1e-4},
            lr=0.5,
            companion="sgdm",
            fixed_norm=True,
            init_params=factories.center_units,
            paper_labels="ndim",
            description="momentum SGD's direction rotating the manifold kernels at "
            "the equilibrium rate, momentum SGD elsewhere (Kosson et al. 2024)",
        ),
        OptimizerEntry(
            "cayley-sgd",
            factories.cayley_sgd,
            {"momentum": 0.9},
            lr=0.1,
            lr_manifold=0.8,
            companion="nesterov_sgd",
            fixed_norm=True,
            start="qr",
            fan="tall",
            reset_at_decay=True,
            paper_labels="stiefel",
            description="Cayley SGD keeping the units of each tall manifold kernel "
            "orthonormal, Nesterov SGD with L2 elsewhere; rebuilt at each decay "
            "(Li, Fuxin & Todorovic 2020, the authors' README rates)",
        ),
        OptimizerEntry(
            "cayley-adam",
            factories.cayley_adam,
            {"b1": 0.9, "b2": 0.99, "eps": 1e-8},
            lr=0.1,
            lr_manifold=0.5,
            companion="nesterov_sgd",
            fixed_norm=True,
            start="qr",
            fan="tall",
            reset_at_decay=True,
            paper_labels="stiefel",
            description="Cayley Adam keeping the units of each tall manifold "
            "kernel orthonormal, Nesterov SGD with L2 elsewhere; rebuilt at each "
            "decay (Li, Fuxin & Todorovic 2020, the authors' README rates)",
        ),
        OptimizerEntry(
            "manifold-muon",
            factories.manifold_muon,
            {},
            lr=1e-3,
            lr_manifold=0.1,
            companion="adamw_hybrid",
            decay="decoupled",
            fixed_norm=True,
            start="msign",
            paper_labels="kernels",
            description="manifold Muon keeping every manifold kernel on the "
            "Stiefel manifold (all singular values 1), AdamW elsewhere, no weight "
            "decay (Bernstein 2025)",
        ),
        OptimizerEntry(
            "hyperspherical",
            factories.hyperspherical_descent,
            {},
            lr=1e-3,
            lr_manifold=0.1,
            companion="adamw_hybrid",
            decay="decoupled",
            fixed_norm=True,
            start="normalize",
            paper_labels="kernels",
            description="hyperspherical descent keeping every manifold kernel, as "
            "one vector, at norm 1, AdamW elsewhere, no weight decay (Bernstein "
            "2025)",
        ),
    ]
}

#: Default ``weight_decay`` per optimizer where it is not the common 5e-4
#: (PyTorch AdamW's default).
DEFAULT_WEIGHT_DECAY = {"adamw": 0.01, "adamp": 0.01, "sgdp": 1e-5, "nero": 0.0}
DEFAULT_WEIGHT_DECAY |= {"manifold-muon": 0.0, "hyperspherical": 0.0}
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
    "adamw_hybrid": "--lr: the Euclidean half only (AdamW on biases, BatchNorm "
    "and kernels off the manifold); --lr_manifold: the manifold kernels",
}


def learning_rate_help() -> list[str]:
    """Which flag sets which learning rate, one line per kind of optimizer (the
    optimizers that keep the weights on a manifold also say how they start)."""
    by_kind: dict[tuple[str, bool], list[OptimizerEntry]] = {}
    for entry in OPTIMIZERS.values():
        by_kind.setdefault((entry.companion, entry.start is not None), []).append(entry)
    lines = []
    for (companion, starts), entries in by_kind.items():
        line = f"{', '.join(e.name for e in entries)}: {_WHO_GETS_LR[companion]}"
        if starts:
            how: dict[str, list[str]] = {}
            for e in entries:
                how.setdefault(START_METHODS[e.start], []).append(e.name)
            line += ", put on their manifold once at init"
            if len(how) == 1:
                line += f" ({next(iter(how))})"
            else:
                line += " (" + "; ".join(f"{', '.join(n)}: {h}" for h, n in how.items())
                line += ")"
        lines.append(line)
    return lines


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
    elif entry.companion == "adamw_hybrid":
        defaults |= {"lr_manifold": entry.lr_manifold} | _ADAM_HYPER
    out = {k: (given[k] if given.get(k) is not None else defaults[k]) for k in keys}
    return out


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
