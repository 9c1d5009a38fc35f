"""Stock et al. 2019, *Equi-normalization of neural networks* (ENorm): one
config per command of the ENorm repository's README
(``docs/algorithms.md#stock-et-al-recipes``).

Source: the README's CIFAR-10 commands (``main.py --model-type linear|conv
--enorm C ...``); the paper reports the test accuracy at the last epoch averaged
over 5 runs (``--n_iter=5``). The argument is ``cifar10-MODEL-TAG``: MODEL ``fc`` (the
15-layer bias-free MLP) or ``conv`` (the fully convolutional net); TAG
``baseline`` (no ENorm) or the README's coefficient (``c1.2`` for fc, ``c1.1``
for conv)::

  python -m experiments.main --workdir=runs/enorm \
      --config=experiments/configs/enorm.py:cifar10-conv-c1.1 --n_iter=5
  python -m experiments.cifar --dataset cifar10 --model-type conv --enorm 1.1 \
      --epochs 128 --lr 0.05 --weight-decay 1e-3 --momentum 0.9 --n-iter 5 \
      --workdir=runs/enorm                               # the README's command

Every config: momentum SGD with L2 on every parameter, learning rate
``lr * (E - e) / E`` at epoch ``e``, batch 256, the first 40960 training
images, an ENorm cycle after every step (``enorm=c``; 0 is the baseline).
"""

from __future__ import annotations

from typing import Any

from experiments.configs import default
from experiments.keys import ConfigError

_DATA = {
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
_MODELS = {
    "fc": _DATA
    | {
        "model": "enorm-fc",
        "n_layers": 15,
        "lr": 0.1,
        "momentum": 0.0,
        "epochs": 60,
        "augment": False,
    },
    "conv": _DATA
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
_C = {"fc": 1.2, "conv": 1.1}


def cells() -> list[str]:
    """Every argument this file takes."""
    return [
        f"cifar10-{kind}-{tag}"
        for kind in _MODELS
        for tag in ("baseline", f"c{_C[kind]}")
    ]


def _key(arg: str | None) -> tuple[str, float]:
    arg = default.check_cell("enorm.py", "cifar10-MODEL-TAG", arg, cells())
    _, kind, tag = arg.split("-", 2)
    return kind, 0.0 if tag == "baseline" else _C[kind]


def get_config(arg: str | None = None) -> dict[str, Any]:
    """The config of one README command (``arg``, one of :func:`cells`): the
    default config with every value the source fixes."""
    kind, c = _key(arg)
    return default.over(_MODELS[kind] | {"enorm": c})


def describe(arg: str) -> str:
    """One line: the command and its source."""
    kind, c = _key(arg)
    what = "no ENorm" if c == 0 else f"ENorm c={c}"
    return (
        f"Stock et al. 2019, cifar10, ENorm {kind} model, {what} (README command; "
        "the paper averages 5 runs)"
    )


def cell_of(model_type: str) -> str:
    """The baseline cell of ENorm's ``main.py --model-type=T`` (its ``--enorm``
    is a flag over it)."""
    kind = {"linear": "fc", "conv": "conv"}.get(model_type)
    if kind is None:
        raise ConfigError(f"unknown --model-type {model_type!r}; valid: linear, conv")
    return f"cifar10-{kind}-baseline"
