"""The experiments' config: the per-dataset defaults, and the checks that fill
and validate every value before anything touches the workdir.

A config is a flat dict over the keys of :data:`experiments.keys.KEYS` (a key
left out takes its default there). ``None`` means "derive": from the dataset
(:data:`DATASET_DEFAULTS`), from the optimizer table
(:mod:`experiments.optimizers`) or from the data (steps from epochs, decay steps
from decay epochs). :func:`resolve` fills and checks every value (a resolved
config resolves to itself); :func:`derive` adds what needs the loaded data. Both
raise :class:`ConfigError` with a one-line message. Config files
(:mod:`experiments.configs`) and the command line (:mod:`experiments.flags`)
produce configs; nothing here imports JAX.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from experiments.keys import (
    ABSENT_MEANS,
    DEFAULT_CONFIG,
    DERIVED_COMPILED,
    EXTENDABLE_KEYS,
    KEYS,
    NOT_COMPILED,
    RESUMABLE_KEYS,
    ConfigError,
    Key,
    differing_keys,
    extension,
)

__all__ = [
    "ABSENT_MEANS",
    "DATASET_DEFAULTS",
    "DEFAULT_CONFIG",
    "DERIVED_COMPILED",
    "EXTENDABLE_KEYS",
    "KEYS",
    "LABEL_MODES",
    "NORMALIZATIONS",
    "NOT_COMPILED",
    "PARALLEL_MODES",
    "RESUMABLE_KEYS",
    "ConfigError",
    "Key",
    "dataset_kind",
    "derive",
    "differing_keys",
    "extension",
    "resolve",
]

_CIFAR = {
    "model": "wrn-28-10",
    "train_split": "train",
    "batch_size": 128,
    "epochs": 200,
    "schedule": "piecewise",
    "decay_epochs": [60, 120, 160],
    "normalization": "train_stats",
    "augment": True,
    "eval_every": 1000,
    "log_every": 100,
    "checkpoint_every": 1000,
}
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # RBN-TF's recipe (docs/algorithms.md#cho-and-lee-recipes).
    "cifar10": _CIFAR,
    "cifar100": _CIFAR,
    "svhn_cropped": _CIFAR
    | {
        "model": "wrn-22-8",
        "train_split": "train+extra",
        "epochs": 160,
        "decay_epochs": [60, 120],
        "normalization": "scale",
        "augment": False,
    },
    # The recipe for data without a paper preset (digits, npz): a small VGG
    # whose classifier reads the global average of its last stage (a flattened
    # one blew up under momentum SGD), linear warm-up over the first epoch, then
    # cosine decay to 0 on every learning rate, and BatchNorm running averages
    # that keep up with a short run (0.9).
    "digits": {
        "model": "vgg-small",  # 8x8: its classifier reads 2x2x64 values
        "bn_decay": 0.9,
        "test_size": 360,
        "batch_size": 64,
        "steps": 300,
        "schedule": "cosine",
        "warmup_epochs": 1,
        "decay_epochs": [],
        "normalization": "train_stats",
        "augment": False,
        "eval_every": 100,
        "log_every": 25,
        "checkpoint_every": 100,
    },
    "npz": {
        "model": "vgg-small-gap",
        "bn_decay": 0.9,
        "batch_size": 128,
        "epochs": 10,
        "schedule": "cosine",
        "warmup_epochs": 1,
        "decay_epochs": [],
        "normalization": "train_stats",
        "augment": False,
        "eval_every": "epoch",
        "log_every": 50,
        "checkpoint_every": 500,
    },
}

LABEL_MODES = ("structural", "paper", "invariance")
NORMALIZATIONS = ("train_stats", "scale", "fixed")
PARALLEL_MODES = ("pmap", "sharded")


def dataset_kind(name: str) -> str:
    return "npz" if str(name).startswith("npz:") else str(name)


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def _num(cfg, key, *, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must be a number, got {v!r}")
    if integer and not float(v).is_integer():
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    if not math.isfinite(v):
        raise ConfigError(f"{key} must be finite, got {v!r}")
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (
        hi is not None and (v >= hi if hi_open else v > hi)
    )
    if bad:
        left = "(" if lo_open or lo is None else "["
        right = ")" if hi_open or hi is None else "]"
        low = "-inf" if lo is None else lo
        high = "inf" if hi is None else hi
        rng = f"{left}{low}, {high}{right}"
        raise ConfigError(f"{key} must be in {rng}, got {v!r}")
    if integer:
        cfg[key] = int(v)


def _opt_num(cfg, key, **kw):
    if cfg[key] is not None:
        _num(cfg, key, **kw)


def _bool(cfg, key):
    if not isinstance(cfg[key], bool):
        raise ConfigError(f"{key} must be true or false, got {cfg[key]!r}")


def _choice(cfg, key, valid):
    if cfg[key] not in valid:
        raise ConfigError(
            f"unknown {key} {cfg[key]!r}; valid values: {', '.join(map(str, valid))}"
        )


def _int_list(cfg, key, *, lo=0, numbers=False):
    v = cfg[key]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise ConfigError(f"{key} must be a list of numbers, got {v!r}")
    out = []
    for x in v:
        if (
            isinstance(x, bool)
            or not isinstance(x, (int, float))
            or not math.isfinite(x)
        ):
            raise ConfigError(f"{key} must be a list of numbers, got {v!r}")
        if x < lo:
            raise ConfigError(f"{key} entries must be >= {lo}, got {v!r}")
        out.append(x if numbers else int(x))
        if not numbers and not float(x).is_integer():
            raise ConfigError(f"{key} entries must be integers, got {v!r}")
    cfg[key] = out


# --------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------


def resolve(config: Mapping[str, Any]) -> dict[str, Any]:
    """Fills defaults and checks every value (no data needed).

    Raises:
      ConfigError: for an unknown key or name (listing the valid ones) or a value
        out of range (naming the key).
    """
    from experiments import data, models, optimizers

    unknown = sorted(set(config) - set(KEYS))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)}; valid keys: "
            f"{', '.join(sorted(KEYS))}"
        )
    cfg = {**DEFAULT_CONFIG, **config}
    try:
        data.check_name(cfg["dataset"])
    except data.DataError as e:
        raise ConfigError(str(e)) from None
    kind = dataset_kind(cfg["dataset"])
    for key, value in DATASET_DEFAULTS[kind].items():
        # A config that gives its length in epochs keeps it on data whose
        # recipe counts steps (digits): 5 epochs of batch 1024 stay 7 steps.
        if key == "steps" and cfg["epochs"] is not None:
            continue
        if cfg[key] is None:
            cfg[key] = list(value) if isinstance(value, list) else value
    if cfg["test_size"] is not None and kind != "digits":
        raise ConfigError("test_size applies to the digits dataset only")
    if cfg["train_split"] is not None and kind not in data.TFDS_DATASETS:
        raise ConfigError("train_split applies to the tfds datasets only")

    # model
    try:
        models.check_name(cfg["model"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _opt_num(cfg, "keep_prob", lo=0, hi=1, lo_open=True)
    if cfg["bn_decay"] is None:
        cfg["bn_decay"] = models.default_bn_decay(cfg["model"])
    _num(cfg, "bn_decay", lo=0, hi=1, hi_open=True)
    _int_list(cfg, "widths", lo=1)
    if not cfg["widths"]:
        raise ConfigError("widths must not be empty")
    _num(cfg, "convs_per_stage", lo=1, integer=True)
    _opt_num(cfg, "n_layers", lo=2, integer=True)
    if cfg["n_layers"] is not None and cfg["model"] != "enorm-fc":
        raise ConfigError("n_layers applies to the enorm-fc model only")

    # optimizer
    _choice(cfg, "optimizer", optimizers.names())
    try:
        hyper = optimizers.resolve_hyper(cfg["optimizer"], cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg.update(hyper)
    for key in ("lr", "lr_manifold"):
        _opt_num(cfg, key, lo=0, lo_open=True)
    for key in ("momentum", "b1", "b2"):
        _opt_num(cfg, key, lo=0, hi=1, hi_open=True)
    _opt_num(cfg, "eps", lo=0)
    _opt_num(cfg, "grad_clip", lo=0, lo_open=True)
    _opt_num(cfg, "omega", lo=0)
    _opt_num(cfg, "dampening", lo=0, hi=1)
    _opt_num(cfg, "delta", lo=0)
    _opt_num(cfg, "wd_ratio", lo=0, hi=1)
    if cfg["nesterov"] is not None:
        _bool(cfg, "nesterov")
    for key in ("weight_decay", "manifold_decay", "bias_decay", "gamma_decay"):
        _opt_num(cfg, key, lo=0)
    _opt_num(cfg, "beta_decay", lo=0)
    try:
        decays = optimizers.group_decays(cfg["optimizer"], cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg["weight_decay"] = decays["kernel"]
    for group in ("manifold", "bias", "gamma", "beta"):
        cfg[f"{group}_decay"] = decays[group]
    entry = optimizers.lookup(cfg["optimizer"])
    if cfg["labels"] is None:
        cfg["labels"] = entry.default_labels
    _choice(cfg, "labels", LABEL_MODES)
    if cfg["unit_init"] is None:
        cfg["unit_init"] = entry.sphere
    _bool(cfg, "unit_init")
    _num(cfg, "enorm", lo=0)

    # schedule and length
    _num(cfg, "batch_size", lo=1, integer=True)
    _opt_num(cfg, "steps", lo=1, integer=True)
    _opt_num(cfg, "epochs", lo=0, lo_open=True)
    if cfg["steps"] is None and cfg["epochs"] is None:
        raise ConfigError("give steps or epochs")
    _choice(cfg, "schedule", optimizers.SCHEDULES)
    _int_list(cfg, "decay_epochs", numbers=True)
    if cfg["decay_epochs"] != sorted(cfg["decay_epochs"]):
        raise ConfigError(f"decay_epochs must be increasing, got {cfg['decay_epochs']}")
    if cfg["decay_factor"] is None:
        cfg["decay_factor"] = 0.2
    _num(cfg, "decay_factor", lo=0, lo_open=True)
    if cfg["warmup_epochs"] is None:
        cfg["warmup_epochs"] = 0
    _num(cfg, "warmup_epochs", lo=0)
    if cfg["schedule"] == "linear" and cfg["epochs"] is None:
        raise ConfigError("the linear schedule needs epochs")
    _num(cfg, "seed", lo=0, integer=True)

    # data options
    _opt_num(cfg, "train_size", lo=1, integer=True)
    _num(cfg, "val_size", lo=0)
    if cfg["val_size"] >= 1 or cfg["val_size"] == 0:
        _num(cfg, "val_size", lo=0, integer=True)
    _num(cfg, "split_seed", lo=0, integer=True)
    _opt_num(cfg, "test_size", lo=1, integer=True)
    _choice(cfg, "normalization", NORMALIZATIONS)
    if cfg["normalization"] == "fixed":
        for key in ("norm_mean", "norm_std"):
            if cfg[key] is None:
                raise ConfigError(f"fixed normalization needs {key}")
            _int_list(cfg, key, numbers=True)
        if min(cfg["norm_std"]) <= 0:
            raise ConfigError(f"norm_std must be positive, got {cfg['norm_std']}")
    elif cfg["norm_mean"] is not None or cfg["norm_std"] is not None:
        raise ConfigError("norm_mean/norm_std need normalization=fixed")
    _bool(cfg, "augment")
    _num(cfg, "pad", lo=0, integer=True)
    _choice(cfg, "pad_mode", ("reflect", "zero"))
    _opt_num(cfg, "crop", lo=1, integer=True)
    _bool(cfg, "flip")

    # devices
    if cfg["stop_diverged"] is None:
        cfg["stop_diverged"] = False  # --task=compare sets it before resolving
    _choice(cfg, "parallel", PARALLEL_MODES)
    _opt_num(cfg, "num_devices", lo=1, integer=True)
    for key in (
        "bn_per_device",
        "multihost",
        "select_best",
        "tensorboard",
        "progress",
        "stop_diverged",
    ):
        _bool(cfg, key)
    if cfg["bn_per_device"] and cfg["parallel"] != "pmap":
        raise ConfigError("bn_per_device needs parallel=pmap")

    # evaluation and logging
    if cfg["eval_every"] != "epoch":
        _num(cfg, "eval_every", lo=1, integer=True)
    _opt_num(cfg, "eval_batch_size", lo=1, integer=True)
    _num(cfg, "bn_recalibrate", lo=0, integer=True)
    if cfg["select_best"] and not cfg["val_size"]:
        raise ConfigError("select_best needs a validation split (val_size > 0)")
    _num(cfg, "log_every", lo=1, integer=True)
    _num(cfg, "checkpoint_every", lo=1, integer=True)
    if cfg["checkpoint_every"] % cfg["log_every"]:
        raise ConfigError(
            f"checkpoint_every ({cfg['checkpoint_every']}) must be a multiple of "
            f"log_every ({cfg['log_every']}), so that a resumed run logs the same "
            "metrics"
        )
    _num(cfg, "max_to_keep", lo=1, integer=True)
    _opt_num(cfg, "halt_after_steps", lo=0, integer=True)
    return cfg


def derive(cfg: dict[str, Any], *, n_train: int, image_shape) -> dict[str, Any]:
    """Adds the values that need the data: ``steps_per_epoch``, ``steps``,
    ``decay_steps`` (RBN: ``floor(epoch * N / batch)``), ``warmup_steps``
    (``warmup_epochs`` rounded to steps, at most ``steps``), ``eval_every`` for
    ``'epoch'``, the model input shape."""
    cfg = dict(cfg)
    batch = cfg["batch_size"]
    if batch > n_train:
        raise ConfigError(f"batch_size {batch} > {n_train} training examples")
    spe = n_train // batch
    cfg["num_train"] = n_train
    cfg["steps_per_epoch"] = spe
    if cfg["steps"] is None:
        cfg["steps"] = max(1, math.floor(cfg["epochs"] * n_train / batch))
    cfg["decay_steps"] = [math.floor(e * n_train / batch) for e in cfg["decay_epochs"]]
    cfg["warmup_steps"] = min(round(cfg["warmup_epochs"] * spe), cfg["steps"])
    if cfg["eval_every"] == "epoch":
        cfg["eval_every"] = spe
    h, w, c = image_shape
    crop = cfg["crop"]
    if crop is not None and crop > min(h, w):
        raise ConfigError(f"crop {crop} is larger than the images ({h}x{w})")
    if cfg["normalization"] == "fixed" and len(cfg["norm_mean"]) not in (1, c):
        raise ConfigError(
            f"norm_mean has {len(cfg['norm_mean'])} values for {c} channels"
        )
    if cfg["normalization"] == "fixed" and len(cfg["norm_std"]) not in (1, c):
        raise ConfigError(
            f"norm_std has {len(cfg['norm_std'])} values for {c} channels"
        )
    side = crop or None
    cfg["input_shape"] = [side or h, side or w, c]
    return cfg
