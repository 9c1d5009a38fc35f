"""The papers' published hyper-parameters as named configs (``--preset=NAME``).

Every preset sets every value that its paper fixes (nothing is left to the
dataset defaults), and names its source:

- ``rbn-{cifar10,cifar100,svhn}-{model}-{sgd,sgdg,adamg}``: Cho & Lee 2017
  (docs/algorithms.md). Published commands: WRN-28-10 on CIFAR-10/100,
  WRN-22-8 on SVHN (all three optimizers), WRN-40-10 Adam-G and VGG-19 Adam-G on
  CIFAR-100. The other cells of the result tables (VGG-13, VGG-19, WRN-40-10,
  WRN-16-4) have no published command: their presets use the per-dataset flags of
  the published ones; VGGs get no dropout, as in the VGG-19 example. Batch 128,
  piecewise-constant learning rate decayed at epochs 60, 120, 160 (SVHN 60, 120;
  ``floor(epoch * N / 128)`` steps, strict ``>``) by 0.2 (SVHN 0.1), 200 epochs
  (SVHN 160 on train+extra), the original manifold rule (``labels=paper``), BN
  decay 0.99, evaluation every 1000 steps, last-step test error reported.
- ``srt-{cifar10,cifar100,svhn}-{model}-{optimizer}``: Roburin et al. 2020,
  ``best_hyper_parameters.py`` (docs/algorithms.md): 405 epochs, MultiStepLR
  at epochs 135, 225, 315 (x0.1), batch 128, 5 % of train held out as validation,
  test error of the best-validation checkpoint (``select_best``). The repository's
  ``adamg`` column is a different algorithm from Cho & Lee's Adam-G (see
  docs/algorithms.md: plain Adam on the convs and a normalisation of the
  BatchNorm parameters to +-1), which riemax does not implement: it has no preset.
- ``enorm-cifar10-{fc,conv}-{baseline,c1.2,c1.1}``: Stock et al. 2019 README
  commands (docs/algorithms.md): momentum SGD with L2 on every parameter, learning
  rate ``lr * (E - e) / E`` at epoch ``e``, batch 256, the first 40960 training
  images, ENorm cycle after every step (``enorm=c``; 0 is the baseline). The paper
  averages 5 runs (``--n_iter=5``).

:func:`get` returns a copy of a preset's config; :func:`describe` a one-line
summary with the published result where there is one.
"""

from __future__ import annotations

from typing import Any

# --------------------------------------------------------------------------------------
# Cho & Lee 2017 (RBN)
# --------------------------------------------------------------------------------------

_RBN_DATA = {
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
_RBN_DATA["cifar100"] = _RBN_DATA["cifar10"] | {"dataset": "cifar100"}

# (Euclidean lr, manifold lr) of the published commands.
_RBN_LR = {
    "cifar": {"sgd": (0.1, None), "sgdg": (0.01, 0.2), "adamg": (0.01, 0.05)},
    "svhn": {"sgd": (0.01, None), "sgdg": (0.001, 0.02), "adamg": (0.001, 0.005)},
}
_RBN_KEEP_PROB = {"cifar": 0.7, "svhn": 0.6}
_RBN_MODELS = {
    "cifar10": ("vgg13", "vgg19", "wrn-28-10", "wrn-40-10"),
    "cifar100": ("vgg13", "vgg19", "wrn-28-10", "wrn-40-10"),
    "svhn": ("vgg13", "vgg19", "wrn-16-4", "wrn-22-8"),
}
_RBN_PUBLISHED_COMMANDS = {
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
_RBN_RESULTS = {
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
_RBN_OPTIMIZERS = ("sgd", "sgdg", "adamg")


def _rbn(data: str, model: str, optimizer: str) -> dict[str, Any]:
    family = "svhn" if data == "svhn" else "cifar"
    lr, lr_g = _RBN_LR[family][optimizer]
    cfg: dict[str, Any] = {
        **_RBN_DATA[data],
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
        "keep_prob": _RBN_KEEP_PROB[family] if model.startswith("wrn") else None,
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
    return cfg


# --------------------------------------------------------------------------------------
# Roburin, de Mont-Marin et al. 2020 (SRT)
# --------------------------------------------------------------------------------------

_SRT_DATA = {
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
_SRT_MODELS = {"resnet18": "resnet18", "resnet20": "resnet20", "vgg16": "vgg16-srt"}
# best_hyper_parameters.py: sgd/sgdmrt (weight decay; lr 0.1, momentum 0.9),
# adam-family (b2, weight decay; lr 1e-3, b1 0.9).
_SRT_HYPER = {
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
_SRT_COLUMNS = (
    ("cifar10", "resnet20"),
    ("cifar10", "resnet18"),
    ("cifar10", "vgg16"),
    ("cifar100", "resnet18"),
    ("cifar100", "vgg16"),
    ("svhn", "resnet18"),
    ("svhn", "vgg16"),
)
_SRT_RESULTS = {
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


def _srt(data: str, model: str, optimizer: str) -> dict[str, Any]:
    hp = _SRT_HYPER[(data, model)][optimizer]
    cfg: dict[str, Any] = {
        **_SRT_DATA[data],
        "train_split": "train",
        "model": _SRT_MODELS[model],
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
    return cfg


# --------------------------------------------------------------------------------------
# Stock et al. 2019 (ENorm)
# --------------------------------------------------------------------------------------

_ENORM_DATA = {
    "dataset": "cifar10",
    "train_split": "train",
    "train_size": 40960,
    "val_size": 0,
    "normalization": "fixed",
    "norm_mean": [0.4914, 0.4822, 0.4465],
    "norm_std": [0.2023, 0.1994, 0.2010],
    "batch_size": 256,
    "schedule": "linear",
    "optimizer": "sgd",
    "nesterov": False,
    "weight_decay": 1e-3,
    "bias_decay": 1e-3,
    "gamma_decay": 1e-3,
    "beta_decay": 1e-3,
    "manifold_decay": 1e-3,
    "labels": "paper",
    "bn_decay": 0.9,
    "eval_every": "epoch",
}
_ENORM = {
    "fc": _ENORM_DATA
    | {
        "model": "enorm-fc",
        "n_layers": 15,
        "lr": 0.1,
        "momentum": 0.0,
        "epochs": 60,
        "augment": False,
    },
    "conv": _ENORM_DATA
    | {
        "model": "enorm-conv",
        "lr": 0.05,
        "momentum": 0.9,
        "epochs": 128,
        "augment": True,
        "pad": 2,
        "pad_mode": "zero",
        "crop": 28,
        "flip": True,
    },
}
_ENORM_C = {"fc": 1.2, "conv": 1.1}


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


def _build() -> dict[str, tuple[dict[str, Any], str]]:
    out: dict[str, tuple[dict[str, Any], str]] = {}
    names = {"sgd": "SGD", "sgdg": "SGD-G", "adamg": "Adam-G"}
    for data, models in _RBN_MODELS.items():
        for model in models:
            for k, opt in enumerate(_RBN_OPTIMIZERS):
                cfg = _rbn(data, model, opt)
                published = (data, model, opt) in _RBN_PUBLISHED_COMMANDS
                src = "published command" if published else "flags of the dataset's"
                src += "" if published else " published commands"
                err = _RBN_RESULTS[data][model][k]
                desc = (
                    f"Cho & Lee 2017, {data}, {model}, {names[opt]} ({src}); "
                    f"paper: {err} % test error (median of 5)"
                )
                out[f"rbn-{data}-{model}-{opt}"] = (cfg, desc)
    for data, model in _SRT_HYPER:
        col = _SRT_COLUMNS.index((data, model))
        for opt in ("sgd", "sgdmrt", "adam", "adamw", "adams", "adamsrt"):
            acc = _SRT_RESULTS[opt][col]
            desc = (
                f"Roburin et al. 2020, {data}, {model}, {opt} "
                f"(best_hyper_parameters.py); paper: {acc} % test accuracy"
            )
            out[f"srt-{data}-{model}-{opt}"] = (_srt(data, model, opt), desc)
    for kind, base in _ENORM.items():
        for c in (0.0, _ENORM_C[kind]):
            tag = "baseline" if c == 0 else f"c{c}"
            desc = (
                f"Stock et al. 2019, cifar10, ENorm {kind} model, "
                f"{'no ENorm' if c == 0 else f'ENorm c={c}'} (README command; "
                "the paper averages 5 runs)"
            )
            out[f"enorm-cifar10-{kind}-{tag}"] = (base | {"enorm": c}, desc)
    return out


PRESETS = _build()


def names() -> list[str]:
    return list(PRESETS)


def get(name: str) -> dict[str, Any]:
    """A copy of the preset's config.

    Raises:
      ValueError: for an unknown name (the message lists the valid ones).
    """
    if name not in PRESETS:
        raise ValueError(
            f"unknown preset {name!r}; valid presets (--list_presets): "
            + ", ".join(PRESETS)
        )
    cfg, _ = PRESETS[name]
    return {k: list(v) if isinstance(v, list) else v for k, v in cfg.items()}


def describe(name: str) -> str:
    get(name)
    return PRESETS[name][1]


def srt_name(data: str, model: str, optimizer: str) -> str:
    """The preset that SRT's ``training.py --dataloader=D --model=M
    --optimizer=O`` runs (it looks its hyper-parameters up in the same table)."""
    data = {"svhn_cropped": "svhn"}.get(data, data)
    model = {"vgg16-srt": "vgg16"}.get(model, model)
    if optimizer == "adamg":
        raise ValueError(
            "SRT's adamg is a different algorithm from Cho & Lee's Adam-G "
            "(docs/algorithms.md#the-adamg-baseline-of-the-original-code) and has "
            "no preset; use --optimizer=adamg without "
            "--dataloader for Cho & Lee's"
        )
    return f"srt-{data}-{model}-{optimizer}"


def enorm_name(model_type: str, c: float) -> str:
    """The preset that ENorm's ``main.py --model-type=T --enorm=C`` runs."""
    kind = {"linear": "fc", "conv": "conv"}.get(model_type)
    if kind is None:
        raise ValueError(f"unknown --model-type {model_type!r}; valid: linear, conv")
    return f"enorm-cifar10-{kind}-baseline"
