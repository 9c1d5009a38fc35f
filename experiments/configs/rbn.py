"""Cho & Lee 2017, *Riemannian approach to batch normalization*: one config per
cell of its result tables (``docs/algorithms.md#cho-and-lee-recipes``).

Source: the RBN-TF repository's README, its training commands and its table of
test errors (median of five runs). The argument is ``DATA-MODEL-OPTIMIZER``:
DATA ``cifar10``, ``cifar100`` or ``svhn``; MODEL ``vgg13``, ``vgg19``,
``wrn-28-10``, ``wrn-40-10`` (SVHN: ``vgg13``, ``vgg19``, ``wrn-16-4``,
``wrn-22-8``); OPTIMIZER ``sgd``, ``sgdg`` or ``adamg``::

  python -m experiments.main --workdir=runs/wrn \
      --config=experiments/configs/rbn.py:cifar10-wrn-28-10-sgdg
  python -m experiments.cifar --preset=rbn-cifar10-wrn-28-10-sgdg --workdir=runs/wrn

Published commands: WRN-28-10 on CIFAR-10/100 and WRN-22-8 on SVHN (all three
optimizers), WRN-40-10 Adam-G and VGG-19 Adam-G on CIFAR-100. The other cells of
the tables (VGG-13, VGG-19, WRN-40-10, WRN-16-4) have no published command:
their configs use the per-dataset flags of the published ones; VGGs get no
dropout, as in the VGG-19 example. Every config sets every value the source
fixes: batch 128, piecewise-constant learning rate decayed at epochs 60, 120,
160 (SVHN 60, 120; ``floor(epoch * N / 128)`` steps, strict ``>``) by 0.2 (SVHN
0.1), 200 epochs (SVHN 160 on train+extra), the original manifold rule
(``labels=paper``), BatchNorm decay 0.99, evaluation every 1000 steps, the
last-step test error reported.
"""

from __future__ import annotations

from typing import Any

from experiments.configs import default

_DATA = {
    "cifar10": {
        "dataset": "cifar10",
        "train_split": "train",
        "epochs": 200,
        "decay_epochs": [60, 120, 160],
        "decay_factor": 0.2,
        "normalization": "train_stats",
        "augment": True,
        "pad": 4,
        "pad_mode": "reflect",
        "flip": True,
    },
    "svhn": {
        "dataset": "svhn_cropped",
        "train_split": "train+extra",
        "epochs": 160,
        "decay_epochs": [60, 120],
        "decay_factor": 0.1,
        "normalization": "scale",
        "augment": False,
    },
}
_DATA["cifar100"] = _DATA["cifar10"] | {"dataset": "cifar100"}

# (Euclidean lr, manifold lr) of the published commands.
_LR = {
    "cifar": {"sgd": (0.1, None), "sgdg": (0.01, 0.2), "adamg": (0.01, 0.05)},
    "svhn": {"sgd": (0.01, None), "sgdg": (0.001, 0.02), "adamg": (0.001, 0.005)},
}
_KEEP_PROB = {"cifar": 0.7, "svhn": 0.6}
_MODELS = {
    "cifar10": ("vgg13", "vgg19", "wrn-28-10", "wrn-40-10"),
    "cifar100": ("vgg13", "vgg19", "wrn-28-10", "wrn-40-10"),
    "svhn": ("vgg13", "vgg19", "wrn-16-4", "wrn-22-8"),
}
_PUBLISHED_COMMANDS = {
    ("cifar10", "wrn-28-10", "sgd"),
    ("cifar10", "wrn-28-10", "sgdg"),
    ("cifar10", "wrn-28-10", "adamg"),
    ("cifar100", "wrn-28-10", "sgd"),
    ("cifar100", "wrn-28-10", "sgdg"),
    ("cifar100", "wrn-28-10", "adamg"),
    ("svhn", "wrn-22-8", "sgd"),
    ("svhn", "wrn-22-8", "sgdg"),
    ("svhn", "wrn-22-8", "adamg"),
    ("cifar100", "wrn-40-10", "adamg"),
    ("cifar100", "vgg19", "adamg"),
}
# Published test error % (median of five runs), RBN-TF README.
_RESULTS = {
    "cifar10": {
        "vgg13": (5.88, 5.87, 6.05),
        "vgg19": (6.49, 5.92, 6.02),
        "wrn-28-10": (3.89, 3.85, 3.78),
        "wrn-40-10": (3.72, 3.72, 3.80),
    },
    "cifar100": {
        "vgg13": (26.17, 25.29, 24.89),
        "vgg19": (27.62, 25.79, 25.59),
        "wrn-28-10": (18.66, 18.19, 18.30),
        "wrn-40-10": (18.39, 18.04, 17.85),
    },
    "svhn": {
        "vgg13": (1.78, 1.74, 1.72),
        "vgg19": (1.94, 1.81, 1.77),
        "wrn-16-4": (1.64, 1.67, 1.61),
        "wrn-22-8": (1.64, 1.63, 1.55),
    },
}
_OPTIMIZERS = ("sgd", "sgdg", "adamg")

_OPTIMIZER_NAMES = {"sgd": "SGD", "sgdg": "SGD-G", "adamg": "Adam-G"}


def cells() -> list[str]:
    """Every argument this file takes, in the order of the tables."""
    return [
        f"{data}-{model}-{opt}"
        for data, models in _MODELS.items()
        for model in models
        for opt in _OPTIMIZERS
    ]


def _key(arg: str | None) -> tuple[str, str, str]:
    arg = default.check_cell("rbn.py", "a cell DATA-MODEL-OPTIMIZER", arg, cells())
    data, rest = arg.split("-", 1)
    model, opt = rest.rsplit("-", 1)
    return data, model, opt


def get_config(arg: str | None = None) -> dict[str, Any]:
    """Cho & Lee's config of cell ``arg`` (:func:`cells`): every value the
    source fixes, over the default config."""
    data, model, optimizer = _key(arg)
    family = "svhn" if data == "svhn" else "cifar"
    lr, lr_g = _LR[family][optimizer]
    cfg: dict[str, Any] = {
        **_DATA[data],
        "model": model,
        "optimizer": optimizer,
        "lr": lr,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "batch_size": 128,
        "schedule": "piecewise",
        "labels": "paper",
        "bn_decay": 0.99,
        "keep_prob": _KEEP_PROB[family] if model.startswith("wrn") else None,
        "eval_every": 1000,
    }
    if optimizer == "sgd":
        cfg |= {"bias_decay": 5e-4, "gamma_decay": 5e-4, "beta_decay": 5e-4}
    else:
        cfg |= {
            "lr_manifold": lr_g,
            "omega": 0.1,
            "grad_clip": 0.1,
            "manifold_decay": 0.0,
            "bias_decay": 0.0,
            "gamma_decay": 0.0,
            "beta_decay": 0.0,
            "unit_init": True,
        }
    if optimizer == "adamg":
        cfg |= {"b1": 0.9, "b2": 0.99, "eps": 1e-8}
    return default.over(cfg)


def describe(arg: str) -> str:
    """One line: the cell, its source and the published result."""
    data, model, opt = _key(arg)
    published = (data, model, opt) in _PUBLISHED_COMMANDS
    source = (
        "published command"
        if published
        else "flags of the dataset's published commands"
    )
    error = _RESULTS[data][model][_OPTIMIZERS.index(opt)]
    return (
        f"Cho & Lee 2017, {data}, {model}, {_OPTIMIZER_NAMES[opt]} ({source}); "
        f"paper: {error} % test error (median of 5)"
    )
