r"""``python -m experiments.cifar``: the runner's command line
(:mod:`experiments.main`) under the name that the papers' command lines use.

Every flag of the runner and every flag name of the papers' own command lines
is accepted (``python -m experiments.cifar --help``); ``--list_presets`` lists
the papers' published configurations. Examples::

  # Cho & Lee's SGD-G on WRN-28-10 / CIFAR-10, data-parallel over every GPU
  python -m experiments.cifar --preset=rbn-cifar10-wrn-28-10-sgdg --workdir=runs/wrn

  # the paper's own command line, as written
  python -m experiments.cifar --workdir=runs/wrn --model=resnet --depth=28 \
      --widen_factor=10 --optimizer=sgdg --grassmann=True --learnRate=0.01 \
      --learnRateG=0.2 --omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 \
      --keep_prob=0.7 --data=cifar10

  # evaluate a checkpoint; compare optimizers; plot runs; prepare tfds data
  python -m experiments.cifar --task=test --load=runs/wrn
  python -m experiments.cifar --task=compare --dataset=digits --workdir=runs/cmp \
      --optimizers=sgd,sgdg,adamg --val_size=300 --train_size=300
  python -m experiments.cifar --task=plot --runs runs/a runs/b --out=runs/ab.png
  python -m experiments.cifar --task=prepare --dataset=cifar10
"""

from __future__ import annotations

from typing import Any

from experiments import main as main_lib
from experiments.flags import ALIASES, build_parser, config_from_args, merge

PROG = "python -m experiments.cifar"

__all__ = ["ALIASES", "PROG", "build_parser", "config_from_args", "main", "merge"]


def main(
    argv: list[str] | None = None, prog: str = PROG, defaults: dict | None = None
) -> dict[str, Any] | None:
    """:func:`experiments.main.main` under this name."""
    return main_lib.main(argv, prog, defaults)


if __name__ == "__main__":
    main_lib.run_as_command(main)
