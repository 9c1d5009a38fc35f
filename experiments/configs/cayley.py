"""Li, Fuxin & Todorovic, ICLR 2020, *Efficient Riemannian optimization on the
Stiefel manifold via the Cayley transform*: Cayley SGD and Cayley Adam on CIFAR.

Source: the authors' README (JunLi-Galios/Optimization-on-Stiefel-Manifold-via-
Cayley-Transform): its CIFAR-10/100 commands (WRN-28-10; ``--lr_decay_ratio
0.2``) and learning rates, and the code they run (a fork of the PyTorch wide
ResNet code of RBN: 200 epochs of batch 128, the rate times 0.2 at epochs 60,
120 and 160, the optimizer rebuilt at each decay). No results table ships with
the code. The argument is ``DATA-MODEL-OPTIMIZER``: DATA ``cifar10`` or
``cifar100``; MODEL ``wrn-28-10`` (the README's commands) or ``vgg16`` (the
paper's other network; no published command, the same flags); OPTIMIZER
``cayley-sgd``, ``cayley-adam`` or ``sgd`` (the README's SGD baseline)::

  python -m experiments.main --workdir=runs/cayley \
      --config=experiments/configs/cayley.py:cifar10-wrn-28-10-cayley-sgd

Every config: random crops (padding 4) and flips, per-channel normalisation,
batch 128, 200 epochs, piecewise-constant rates decayed by 0.2 after epochs 60,
120 and 160 (``floor(epoch * N / 128)`` steps, strict ``>``), no dropout,
BatchNorm decay 0.9 (PyTorch's), the authors' manifold rule (``labels=paper``:
conv kernels with fan-in >= fan-out, orthonormalised by QR once at init). Cayley
SGD: manifold rate 0.8 (``--lr_manifold``), Euclidean rate 0.1 (``--lr``);
Cayley Adam: 0.5 / 0.1. Both train the Euclidean parameters with Nesterov SGD
(momentum 0.9) and L2 5e-4 on the Euclidean kernels only (biases and BatchNorm
undecayed, ``bnDecay`` 0), as the runner's Cho & Lee presets do; the whole
optimizer state is reset at each decay (the table's ``reset_at_decay``). The
README's commands spell the rates ``--lr 0.8 --lrg 0.1``; the manifold gets the
larger one (its step is capped at ``1 / ||W||_1`` anyway). SGD: Nesterov momentum
0.9 at 0.1 with L2 5e-4 on every parameter, its state reset at each decay too
in the original; here (the ``sgd`` entry) it is kept.
"""

from __future__ import annotations

from typing import Any

from experiments.configs import default

_DATA = ("cifar10", "cifar100")
_MODELS = ("wrn-28-10", "vgg16")
_OPTIMIZERS = ("cayley-sgd", "cayley-adam", "sgd")
# (Euclidean lr, manifold lr) of the README.
_LR = {"cayley-sgd": (0.1, 0.8), "cayley-adam": (0.1, 0.5), "sgd": (0.1, None)}
_NAMES = {"cayley-sgd": "Cayley SGD", "cayley-adam": "Cayley Adam", "sgd": "SGD"}


def cells() -> list[str]:
    """Every argument this file takes."""
    return [
        f"{data}-{model}-{opt}"
        for data in _DATA
        for model in _MODELS
        for opt in _OPTIMIZERS
    ]


def _key(arg: str | None) -> tuple[str, str, str]:
    arg = default.check_cell("cayley.py", "a cell DATA-MODEL-OPTIMIZER", arg, cells())
    data, rest = arg.split("-", 1)
    for opt in _OPTIMIZERS:
        if rest.endswith("-" + opt):
            return data, rest.removesuffix("-" + opt), opt
    raise AssertionError(arg)  # cells() spells every argument


def get_config(arg: str | None = None) -> dict[str, Any]:
    """The config of cell ``arg`` (:func:`cells`): every value the source
    fixes, over the default config."""
    data, model, optimizer = _key(arg)
    lr, lr_g = _LR[optimizer]
    cfg: dict[str, Any] = {
        "dataset": data,
        "model": model,
        "epochs": 200,
        "batch_size": 128,
        "schedule": "piecewise",
        "decay_epochs": [60, 120, 160],
        "decay_factor": 0.2,
        "warmup_epochs": 0,
        "normalization": "train_stats",
        "augment": True,
        "pad": 4,
        "pad_mode": "reflect",
        "flip": True,
        "keep_prob": None,
        "bn_decay": 0.9,
        "labels": "paper",
        "optimizer": optimizer,
        "lr": lr,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "eval_every": 1000,
    }
    if optimizer == "sgd":
        cfg |= {"bias_decay": 5e-4, "gamma_decay": 5e-4, "beta_decay": 5e-4}
    else:
        cfg |= {
            "lr_manifold": lr_g,
            "manifold_decay": 0.0,
            "bias_decay": 0.0,
            "gamma_decay": 0.0,
            "beta_decay": 0.0,
        }
    if optimizer == "cayley-adam":
        cfg |= {"b1": 0.9, "b2": 0.99, "eps": 1e-8}
    return default.over(cfg)


def describe(arg: str) -> str:
    """One line: the cell and its source."""
    data, model, opt = _key(arg)
    source = (
        "the README's command"
        if model == "wrn-28-10"
        else "the README's flags; no published command"
    )
    return (
        f"Li, Fuxin & Todorovic 2020, {data}, {model}, {_NAMES[opt]} ({source}; "
        "no published results table)"
    )
