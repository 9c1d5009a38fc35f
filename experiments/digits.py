r"""Offline main job: a short real training run on scikit-learn's 8x8 digits.

``load_digits`` ships inside scikit-learn (1797 real 8x8 grayscale digits), so this
job runs anywhere without a download. It is :mod:`experiments.cifar` with
``--dataset=digits``: the same training loop, options, outputs and resume
behaviour, with the digits defaults (stratified 1437/360 split by ``split_seed``,
``vgg-small``: two stages of two 3x3 conv -> BN -> ReLU with widths 32, 64 and a
linear classifier, batch 64, 300 steps, constant learning rates, structural
labels).

Run::

  python -m experiments.digits --workdir runs/digits --optimizer sgdg --steps 300

``python -m experiments.digits --help`` lists every option with its default.
"""

from __future__ import annotations

import os
import sys
from typing import Any

if __package__ in (None, ""):  # run as ``python experiments/digits.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DIGITS = {"dataset": "digits"}


def train_and_evaluate(config: dict[str, Any], workdir: str, **kwargs: Any) -> dict:
    """:func:`experiments.train.train_and_evaluate` with ``dataset="digits"``."""
    from experiments import train

    return train.train_and_evaluate(DIGITS | dict(config), workdir, **kwargs)


def main(argv: list[str] | None = None) -> dict | None:
    from experiments import cifar

    return cifar.main(argv, prog="python -m experiments.digits", defaults=DIGITS)


if __name__ == "__main__":
    main()
