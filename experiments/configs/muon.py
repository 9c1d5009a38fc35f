"""Bernstein 2025, *Modular Manifolds* (Thinking Machines Lab): the MLP
experiment with manifold Muon, hyperspherical descent and its AdamW baseline.

Source: the original's ``src/main.py`` (thinking-machines-lab/manifolds; no
results table ships with the code, the post shows curves only). The argument is
``cifar10-mlp-OPTIMIZER``, OPTIMIZER ``manifold-muon``, ``hyperspherical`` or
``adamw``::

  python -m experiments.main --workdir=runs/mlp-muon \
      --config=experiments/configs/muon.py:cifar10-mlp-manifold-muon
  python -m experiments.main --workdir=runs/mlp-muon-mine \
      --config=muon:cifar10-mlp-manifold-muon --dataset=npz:mine.npz

Every config: CIFAR-10 flattened (normalised per channel with the training
set's statistics, which are the original's constants; no augmentation) into
the bias-free MLP 3072 -> 128 -> 64 -> 10 (``mlp``), every weight matrix on the
manifold (``labels=paper``: every kernel, put there once at init), batch 1024,
5 epochs, learning rate 0.1 decayed linearly to 0 over the run step by step
(``schedule=linear_steps``: ``0.1 (1 - t / T)`` at update ``t`` of ``T``), seed
42; no momentum and no weight decay. The baseline is AdamW at the same 0.1 with
the same decay and weight decay 0 (the original's ``--wd`` default). The run
has ``floor(5 N / 1024)`` steps (244 on CIFAR-10) where the original counts
partial batches (245).

On a small set an epoch of batch 1024 is one or two steps (digits: 1437
training images, 7 steps in all): the step-by-step linear decay still ends at
0 at the last step, and the divergence monitor waits for 10 steps before it
judges a loss at chance (:mod:`experiments.monitor`).
"""

from __future__ import annotations

from typing import Any

from experiments.configs import default

_OPTIMIZERS = ("manifold-muon", "hyperspherical", "adamw")
_NAMES = {
    "manifold-muon": "manifold Muon",
    "hyperspherical": "hyperspherical descent",
    "adamw": "AdamW",
}


def cells() -> list[str]:
    """Every argument this file takes."""
    return [f"cifar10-mlp-{opt}" for opt in _OPTIMIZERS]


def _key(arg: str | None) -> str:
    arg = default.check_cell("muon.py", "cifar10-mlp-OPTIMIZER", arg, cells())
    return arg.removeprefix("cifar10-mlp-")


def get_config(arg: str | None = None) -> dict[str, Any]:
    """The config of ``arg`` (one of :func:`cells`): the default config with
    every value of the original's ``src/main.py``."""
    optimizer = _key(arg)
    cfg: dict[str, Any] = {
        "dataset": "cifar10",
        "model": "mlp",
        "normalization": "train_stats",
        "augment": False,
        "optimizer": optimizer,
        "batch_size": 1024,
        "epochs": 5,
        "schedule": "linear_steps",
        "warmup_epochs": 0,
        "decay_epochs": [],
        "labels": "paper",
        "seed": 42,
        "eval_every": "epoch",
        "log_every": 5,
        "checkpoint_every": 50,
    }
    if optimizer == "adamw":
        cfg |= {"lr": 0.1, "weight_decay": 0.0}
    else:
        cfg |= {"lr_manifold": 0.1}
    return default.over(cfg)


def describe(arg: str) -> str:
    """One line: the config and its source."""
    optimizer = _key(arg)
    return (
        f"Bernstein 2025, cifar10, 3-layer bias-free MLP, {_NAMES[optimizer]} "
        "(src/main.py; no published results table)"
    )
