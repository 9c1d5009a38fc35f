r"""Offline main job: a short real training run on scikit-learn's 8x8 digits.

``load_digits`` ships inside scikit-learn (1797 real 8x8 grayscale digits), so this
job runs anywhere without a download. It is :mod:`experiments.main` with
``--dataset=digits``: the same training loop, options, outputs and resume
behaviour, with the digits recipe (stratified 1437/360 split by ``split_seed``,
``vgg-small``: two stages of two 3x3 conv -> BN -> ReLU with widths 32, 64 and a
linear classifier, batch 64, 300 steps, a warm-up over the first epoch and
cosine decay, structural labels; the paper's rule for the optimizers that keep
the weights on a manifold).

Run::

  python -m experiments.digits --workdir runs/digits --optimizer sgdg --steps 300

``python -m experiments.digits --help`` lists every option with its default.
"""

from __future__ import annotations

from typing import Any

from experiments import main as main_lib

PROG = "python -m experiments.digits"


def _digits() -> dict[str, Any]:
    return {"dataset": "digits"}


def train_and_evaluate(config: dict[str, Any], workdir: str, **kwargs: Any) -> dict:
    """:func:`experiments.train.train_and_evaluate` with ``dataset="digits"``."""
    from experiments import train

    return train.train_and_evaluate(_digits() | dict(config), workdir, **kwargs)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """:func:`experiments.main.main` with the digits dataset under the flags."""
    return main_lib.main(argv, PROG, _digits())


if __name__ == "__main__":
    main_lib.run_as_command(main)
