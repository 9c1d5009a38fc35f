"""Roburin, de Mont-Marin et al. 2020, *Spherical perspective on learning with
normalization layers* (AdamS, AdamSRT, SGD-MRT): one config per cell of its
result table (``docs/algorithms.md#roburin-et-al-recipes``).

Source: the SRT repository's ``best_hyper_parameters.py`` (the paper's appendix
table: learning rate, betas and weight decay of each optimizer on each dataset
and model) and its README's table of test accuracies (mean and std). The
argument is ``DATA-MODEL-OPTIMIZER``: DATA-MODEL ``cifar10-resnet20``,
``cifar10-resnet18``, ``cifar10-vgg16``, ``cifar100-resnet18``,
``cifar100-vgg16``, ``svhn-resnet18``, ``svhn-vgg16``; OPTIMIZER ``sgd``,
``sgdmrt``, ``adam``, ``adamw``, ``adams`` or ``adamsrt``::

  python -m experiments.main --workdir=runs/srt \
      --config=experiments/configs/srt.py:cifar100-resnet18-adamsrt
  python -m experiments.cifar --optimizer=adamsrt --model=resnet18 \
      --dataloader=cifar100 --workdir=runs/srt     # SRT's own command line

Every config: 405 epochs, MultiStepLR at epochs 135, 225, 315 (x0.1), batch 128,
5 % of train held out as validation, the test error of the best-validation
checkpoint (``select_best``), one weight decay for every parameter. The
repository's ``adamg`` column is a different algorithm from Cho & Lee's Adam-G
(``docs/algorithms.md#the-adamg-baseline-of-the-original-code``: plain Adam on
the convs and a normalisation of the BatchNorm parameters to +-1), which riemax
does not implement: it has no config.
"""

from __future__ import annotations

from typing import Any

from experiments.configs import default
from experiments.keys import ConfigError

_DATA = {
    "cifar10": {
        "dataset": "cifar10",
        "normalization": "fixed",
        "norm_mean": [0.4914, 0.4822, 0.4465],
        "norm_std": [0.2470, 0.2435, 0.2616],
        "augment": True,
        "pad": 4,
        "pad_mode": "zero",
        "flip": True,
    },
    "cifar100": {
        "dataset": "cifar100",
        "normalization": "fixed",
        "norm_mean": [0.5071, 0.4867, 0.4408],
        "norm_std": [0.2675, 0.2565, 0.2761],
        "augment": True,
        "pad": 4,
        "pad_mode": "zero",
        "flip": True,
    },
    "svhn": {"dataset": "svhn_cropped", "normalization": "scale", "augment": False},
}
_MODELS = {"resnet18": "resnet18", "resnet20": "resnet20", "vgg16": "vgg16-srt"}
# best_hyper_parameters.py: sgd/sgdmrt (weight decay; lr 0.1, momentum 0.9),
# adam-family (b2, weight decay; lr 1e-3, b1 0.9).
_HYPER = {
    ("cifar10", "resnet18"): {
        "sgd": 2.5e-4,
        "sgdmrt": 2.5e-4,
        "adam": (0.999, 7.8125e-6),
        "adamw": (0.99, 6.25e-5),
        "adams": (0.99, 1.5625e-5),
        "adamsrt": (0.99, 7.8125e-6),
    },
    ("cifar10", "resnet20"): {
        "sgd": 2.5e-4,
        "sgdmrt": 3.125e-5,
        "adam": (0.99, 5e-4),
        "adamw": (0.99, 0.01),  # absent in the file: torch AdamW's default
        "adams": (0.99, 5e-4),
        "adamsrt": (0.99, 7.8125e-6),
    },
    ("cifar10", "vgg16"): {
        "sgd": 2.5e-4,
        "sgdmrt": 6.25e-5,
        "adam": (0.999, 3.125e-5),
        "adamw": (0.999, 2.5e-4),
        "adams": (0.999, 3.125e-5),
        "adamsrt": (0.999, 1.5625e-5),
    },
    ("cifar100", "resnet18"): {
        "sgd": 5e-4,
        "sgdmrt": 5e-4,
        "adam": (0.999, 1.25e-4),
        "adamw": (0.99, 1.25e-4),
        "adams": (0.99, 1.25e-4),
        "adamsrt": (0.999, 0.0),
    },
    ("cifar100", "vgg16"): {
        "sgd": 5e-4,
        "sgdmrt": 1.25e-4,
        "adam": (0.99, 6.25e-5),
        "adamw": (0.99, 1.5625e-5),
        "adams": (0.99, 6.25e-5),
        "adamsrt": (0.99, 7.8125e-6),
    },
    ("svhn", "resnet18"): {
        "sgd": 5e-4,
        "sgdmrt": 5e-4,
        "adam": (0.999, 0.0),
        "adamw": (0.999, 7.8125e-6),
        "adams": (0.99, 3.125e-5),
        "adamsrt": (0.999, 7.8125e-6),
    },
    ("svhn", "vgg16"): {
        "sgd": 5e-4,
        "sgdmrt": 3.125e-5,
        "adam": (0.99, 0.0),
        "adamw": (0.99, 3.125e-5),
        "adams": (0.99, 7.8125e-6),
        "adamsrt": (0.999, 2.5e-4),
    },
}
# Published test accuracy %, mean (std) (SRT README).
_COLUMNS = (
    ("cifar10", "resnet20"),
    ("cifar10", "resnet18"),
    ("cifar10", "vgg16"),
    ("cifar100", "resnet18"),
    ("cifar100", "vgg16"),
    ("svhn", "resnet18"),
    ("svhn", "vgg16"),
)
_RESULTS = {
    "sgd": (
        "92.39 (0.12)",
        "95.10 (0.04)",
        "93.56 (0.05)",
        "77.08 (0.18)",
        "73.77 (0.10)",
        "95.96 (0.15)",
        "95.95 (0.09)",
    ),
    "adam": (
        "90.98 (0.06)",
        "93.77 (0.20)",
        "92.83 (0.17)",
        "71.30 (0.36)",
        "68.43 (0.16)",
        "95.32 (0.23)",
        "95.57 (0.20)",
    ),
    "adamw": (
        "90.19 (0.24)",
        "93.61 (0.12)",
        "92.53 (0.25)",
        "67.39 (0.27)",
        "71.37 (0.22)",
        "95.38 (0.15)",
        "95.60 (0.08)",
    ),
    "sgdmrt": (
        "92.25 (0.12)",
        "94.93 (0.23)",
        "93.68 (0.30)",
        "77.09 (0.15)",
        "73.32 (0.29)",
        "96.17 (0.12)",
        "95.95 (0.12)",
    ),
    "adams": (
        "91.15 (0.11)",
        "93.95 (0.23)",
        "92.92 (0.11)",
        "74.44 (0.22)",
        "68.73 (0.27)",
        "95.75 (0.09)",
        "95.66 (0.09)",
    ),
    "adamsrt": (
        "91.81 (0.20)",
        "94.92 (0.05)",
        "93.75 (0.06)",
        "75.28 (0.35)",
        "71.45 (0.13)",
        "95.84 (0.07)",
        "95.82 (0.05)",
    ),
}

_OPTIMIZERS = ("sgd", "sgdmrt", "adam", "adamw", "adams", "adamsrt")


def cells() -> list[str]:
    """Every argument this file takes, in the order of the table."""
    return [f"{d}-{m}-{o}" for d, m in _HYPER for o in _OPTIMIZERS]


def _key(arg: str | None) -> tuple[str, str, str]:
    arg = default.check_cell("srt.py", "a cell DATA-MODEL-OPTIMIZER", arg, cells())
    data, model, opt = arg.split("-")
    return data, model, opt


def get_config(arg: str | None = None) -> dict[str, Any]:
    """Roburin et al.'s config of cell ``arg`` (:func:`cells`): every value the
    source fixes, over the default config."""
    data, model, optimizer = _key(arg)
    hp = _HYPER[(data, model)][optimizer]
    cfg: dict[str, Any] = {
        **_DATA[data],
        "train_split": "train",
        "model": _MODELS[model],
        "optimizer": optimizer,
        "batch_size": 128,
        "epochs": 405,
        "schedule": "multistep",
        "decay_epochs": [135, 225, 315],
        "decay_factor": 0.1,
        "val_size": 0.05,
        "select_best": True,
        "labels": "paper",
        "bn_decay": 0.9,
        "eval_every": "epoch",
    }
    if optimizer in ("sgd", "sgdmrt"):
        wd = hp
        cfg |= {"lr": 0.1, "momentum": 0.9}
        if optimizer == "sgd":
            cfg["nesterov"] = False
    else:
        b2, wd = hp
        cfg |= {"lr": 1e-3, "b1": 0.9, "b2": b2, "eps": 1e-8}
    cfg |= {
        "weight_decay": wd,
        "manifold_decay": wd,
        "bias_decay": wd,
        "gamma_decay": wd,
        "beta_decay": wd,
    }
    return default.over(cfg)


def describe(arg: str) -> str:
    """One line: the cell, its source and the published result."""
    data, model, opt = _key(arg)
    accuracy = _RESULTS[opt][_COLUMNS.index((data, model))]
    return (
        f"Roburin et al. 2020, {data}, {model}, {opt} "
        f"(best_hyper_parameters.py); paper: {accuracy} % test accuracy"
    )


def cell_of(data: str, model: str, optimizer: str) -> str:
    """The cell that SRT's ``training.py --dataloader=D --model=M --optimizer=O``
    runs (it looks its hyper-parameters up in the same table)."""
    data = {"svhn_cropped": "svhn"}.get(data, data)
    model = {"vgg16-srt": "vgg16"}.get(model, model)
    if optimizer == "adamg":
        raise ConfigError(
            "SRT's adamg is a different algorithm from Cho & Lee's Adam-G "
            "(docs/algorithms.md#the-adamg-baseline-of-the-original-code) and has "
            "no preset; use --optimizer=adamg without "
            "--dataloader for Cho & Lee's"
        )
    return f"{data}-{model}-{optimizer}"
