"""The one table of config keys, and what a resumed run may change.

:data:`KEYS` gives every key of a config its default, its help line (both shown
by ``--help``), the kind of value the command line parses, whether a resumed run
may change it and whether it is compiled into the train step; the other lists
(:data:`DEFAULT_CONFIG`, :data:`RESUMABLE_KEYS`, :data:`NOT_COMPILED`) are read
off it. :func:`differing_keys` and :func:`extension` say whether a run in a
workdir can be resumed (or extended) with a new config.

Nothing here imports JAX: the command line checks its flags before loading it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple


class ConfigError(ValueError):
    """An invalid config value (the message names the key)."""


class Key(NamedTuple):
    """One config key: its default, its help line, the kind of value the command
    line parses (``str``, ``int``, ``number``, ``bool``, ``list`` of numbers,
    ``int|epoch``), whether a resumed run may change it, and whether it is
    compiled into the train step."""

    default: Any
    help: str
    kind: str
    resumable: bool = False
    compiled: bool = True


# The one table of config keys: default, help line (both shown by --help), the
# kind of value the command line parses, whether a resumed run may change it
# (it does not change what is computed: devices, paths, logging), and whether it
# is compiled into the train step (a change builds a new one; the others, such
# as the seed or the number of steps, reuse it within a process).
KEYS: dict[str, Key] = {
    # ---- data
    "dataset": Key(
        "cifar10", "digits, cifar10, cifar100, svhn_cropped or npz:PATH", "str"
    ),
    "data_dir": Key(
        None,
        "tfds data dir (None: tfds's default)",
        "str",
        resumable=True,
        compiled=False,
    ),
    "train_split": Key(
        None, "tfds split(s) to train on, e.g. train+extra (SVHN)", "str"
    ),
    "train_size": Key(
        None, "keep the first N training examples (None: all)", "int", compiled=False
    ),
    "val_size": Key(
        0,
        "training examples held out as validation (int, or fraction)",
        "number",
        compiled=False,
    ),
    "split_seed": Key(
        0, "seed of the validation (and digits test) split", "int", compiled=False
    ),
    "test_size": Key(
        None, "digits only: test examples (None: 360)", "int", compiled=False
    ),
    "normalization": Key(
        None, "train_stats, scale (x / 255) or fixed (norm_mean/std)", "str"
    ),
    "norm_mean": Key(
        None, "fixed normalization: per-channel mean, [0, 1] units", "list"
    ),
    "norm_std": Key(None, "fixed normalization: per-channel std, [0, 1] units", "list"),
    "augment": Key(
        None, "random crop + flip on device (None: dataset default)", "bool"
    ),
    "pad": Key(4, "augmentation: padding before the random crop", "int"),
    "pad_mode": Key("reflect", "augmentation padding: reflect or zero", "str"),
    "crop": Key(None, "crop size (train random, test center; None: image size)", "int"),
    "flip": Key(True, "augmentation: random horizontal flips", "bool"),
    # ---- model
    "model": Key(None, "registered model name (None: dataset default)", "str"),
    "keep_prob": Key(None, "dropout keep probability (None: no dropout)", "number"),
    "bn_decay": Key(
        None,
        "BatchNorm running-average decay (None: the recipe of digits/npz, 0.9, "
        "else the model's)",
        "number",
    ),
    "widths": Key([32, 64], "vgg-small(-gap): width of each stage", "list"),
    "convs_per_stage": Key(2, "vgg-small(-gap): convs per stage", "int"),
    "n_layers": Key(None, "enorm-fc: number of layers (None: 15)", "int"),
    # ---- optimization
    "optimizer": Key(
        "sgdg",
        "sgd, sgdg, adamg, adams, adamsrt, sgdmrt, adam, adamw, adamp, sgdp, "
        "nero, rotational-adamw, rotational-sgdm, cayley-sgd, cayley-adam, "
        "manifold-muon or hyperspherical",
        "str",
    ),
    "lr": Key(
        None,
        "learning rate of every parameter, except the manifold kernels of the "
        "hybrids with two rates (--lr_manifold); see 'learning rates' below",
        "number",
    ),
    "lr_manifold": Key(
        None,
        "hybrids with two rates only (see 'learning rates' below): learning "
        "rate of the manifold kernels (--lr does not reach them)",
        "number",
    ),
    "momentum": Key(
        None,
        "momentum (sgd, sgdg, sgdmrt, cayley-sgd; the hybrids' Euclidean half)",
        "number",
    ),
    "nesterov": Key(None, "Nesterov momentum for sgd and the Euclidean half", "bool"),
    "b1": Key(None, "first-moment decay (Adam family)", "number"),
    "b2": Key(None, "second-moment decay (Adam family)", "number"),
    "eps": Key(None, "epsilon (Adam family)", "number"),
    "grad_clip": Key(
        None, "sgdg/adamg: per-unit clip of the Riemannian gradient", "number"
    ),
    "omega": Key(None, "sgdg/adamg: orthogonality strength", "number"),
    "dampening": Key(None, "sgdp: momentum dampening", "number"),
    "delta": Key(None, "adamp/sgdp: threshold of the scale-invariance test", "number"),
    "wd_ratio": Key(
        None, "adamp/sgdp: weight-decay ratio where the test fires", "number"
    ),
    "weight_decay": Key(
        None, "L2 on Euclidean kernels (None: 5e-4; adamw 0.01)", "number"
    ),
    "manifold_decay": Key(
        None, "L2 on manifold kernels (None: 0 on the sphere)", "number"
    ),
    "bias_decay": Key(
        None, "L2 on biases (None: weight_decay if the optimizer decays all)", "number"
    ),
    "gamma_decay": Key(None, "L2 on BatchNorm scales (None: as bias_decay)", "number"),
    "beta_decay": Key(None, "L2 on BatchNorm offsets (None: as bias_decay)", "number"),
    "labels": Key(
        None,
        "manifold split: structural, paper or invariance (None: paper for "
        "cayley-sgd, cayley-adam, manifold-muon and hyperspherical, whose manifold "
        "is part of the algorithm; structural otherwise)",
        "str",
    ),
    "unit_init": Key(
        None, "unit-norm manifold kernels at init (None: sgdg/adamg)", "bool"
    ),
    "enorm": Key(
        0.0, "ENorm asymmetric coefficient c after each step (0: off)", "number"
    ),
    "batch_size": Key(None, "global batch size (None: dataset default)", "int"),
    "steps": Key(None, "training steps (None: from epochs)", "int", compiled=False),
    "epochs": Key(None, "training epochs (None: dataset default)", "number"),
    "schedule": Key(
        None,
        "learning-rate schedule of every group: constant, piecewise (the "
        "papers' steps, strict >), multistep, linear (per epoch), linear_steps "
        "(per step, to 0 at the end) or cosine (to 0 at the last step)",
        "str",
    ),
    "warmup_epochs": Key(
        None,
        "linear learning-rate warm-up over this many epochs, on every group "
        "(None: the dataset's recipe; 0: none)",
        "number",
    ),
    "decay_epochs": Key(None, "epochs at which the learning rate decays", "list"),
    "decay_factor": Key(None, "learning-rate decay factor (None: 0.2)", "number"),
    "seed": Key(
        0, "seed of init, batch order, augmentation and dropout", "int", compiled=False
    ),
    # ---- devices
    "parallel": Key(
        "pmap",
        "pmap (replicated state) or sharded (jit + NamedSharding)",
        "str",
        resumable=True,
    ),
    "num_devices": Key(None, "local devices to use (None: all)", "int", resumable=True),
    "bn_per_device": Key(
        False, "pmap: BatchNorm statistics per device (towers)", "bool"
    ),
    "multihost": Key(
        False,
        "call jax.distributed.initialize() (one process per host)",
        "bool",
        resumable=True,
    ),
    # ---- evaluation and logging
    "eval_every": Key(
        None, "steps between evaluations, or 'epoch'", "int|epoch", compiled=False
    ),
    "eval_batch_size": Key(
        None,
        "evaluation batch (None: >= 1000, divisible)",
        "int",
        resumable=True,
        compiled=False,
    ),
    "bn_recalibrate": Key(
        0, "recompute BatchNorm statistics on N train batches", "int", compiled=False
    ),
    "select_best": Key(
        False,
        "also test the checkpoint with the best val error",
        "bool",
        compiled=False,
    ),
    "log_every": Key(None, "steps between metrics lines", "int", compiled=False),
    "checkpoint_every": Key(
        None, "steps between checkpoints (multiple of log_every)", "int", compiled=False
    ),
    "max_to_keep": Key(2, "checkpoints kept", "int", compiled=False),
    "tensorboard": Key(
        False,
        "also write TensorBoard scalars (tensorboardX)",
        "bool",
        resumable=True,
        compiled=False,
    ),
    "progress": Key(True, "tqdm progress bar", "bool", resumable=True, compiled=False),
    "halt_after_steps": Key(
        None,
        "stop after N steps of this process (testing)",
        "int",
        resumable=True,
        compiled=False,
    ),
    "stop_diverged": Key(
        None,
        "stop a run at its first divergence warning (training loss at or above "
        "chance after epoch 1 and at least 10 steps, or grown 10x); exit status "
        "1 (None: on under --task=compare, else off)",
        "bool",
        resumable=True,
        compiled=False,
    ),
}

DEFAULT_CONFIG = {k: key.default for k, key in KEYS.items()}

#: Keys that may change between a run and its resumption.
RESUMABLE_KEYS = frozenset(k for k, key in KEYS.items() if key.resumable)

#: The keys :func:`derive` adds from the data, and whether each is compiled.
DERIVED_COMPILED = {
    "num_train": False,
    "num_val": False,
    "num_test": False,
    "steps_per_epoch": True,
    "decay_steps": True,
    "warmup_steps": True,
    "input_shape": True,
    "num_classes": True,
}

#: Keys whose value is not part of the compiled train step.
NOT_COMPILED = frozenset(
    [k for k, key in KEYS.items() if not key.compiled]
    + [k for k, compiled in DERIVED_COMPILED.items() if not compiled]
)


#: Keys added to the runner after runs were saved without them: a saved config
#: that lacks one ran with this value.
ABSENT_MEANS: dict[str, Any] = {"warmup_epochs": 0, "warmup_steps": 0}

#: Keys a rerun may raise to extend a finished (or running) run: it resumes from
#: its latest checkpoint and trains on to the new length.
EXTENDABLE_KEYS = frozenset({"steps", "epochs", "warmup_steps"})


def differing_keys(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ (ignoring :data:`RESUMABLE_KEYS`)."""
    keys = (set(saved) | set(new)) - RESUMABLE_KEYS

    def value(cfg, k):
        return cfg.get(k, ABSENT_MEANS.get(k, "<absent>"))

    return sorted(k for k in keys if value(saved, k) != value(new, k))


def extension(saved: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """Whether ``new`` only lengthens the run of ``saved``: ``None`` if some other
    key differs (or nothing does), else a line saying what is extended.

    Raises:
      ConfigError: a shorter run (it cannot be made from a longer one).
    """
    diff = differing_keys(saved, new)
    if not diff or not set(diff) <= EXTENDABLE_KEYS or "steps" not in diff:
        return None
    if new["steps"] < saved["steps"]:
        raise ConfigError(
            f"steps {new['steps']} < the {saved['steps']} steps of the run in the "
            "workdir: a run can be extended, not shortened; pass --overwrite to "
            "start afresh, or use another --workdir"
        )
    line = f"extending the run from {saved['steps']} to {new['steps']} steps"
    if "warmup_steps" in diff:
        line += (
            f" (its warm-up, capped at the run's length, goes from "
            f"{saved.get('warmup_steps', 0)} to {new['warmup_steps']} steps)"
        )
    if new.get("schedule") in ("cosine", "linear", "linear_steps"):
        line += (
            f" (its {new['schedule']} schedule is stretched to the new length: "
            "the learning rate goes up from where it ended)"
        )
    return line
