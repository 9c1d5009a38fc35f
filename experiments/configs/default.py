"""The default config: what a command line without ``--config`` runs.

Every key of the table (:data:`experiments.keys.KEYS`) at its default: CIFAR-10
and SGD-G, everything else derived when the config is resolved, from the
dataset's recipe (:data:`experiments.config.DATASET_DEFAULTS`: WRN-28-10 and
Cho & Lee's schedule on CIFAR and SVHN; the recipe for new data on ``npz:``
files and digits), from the optimizer table (learning rates, momenta, weight
decays) and from the data (steps, decay steps). The papers' configs
(``rbn.py``, ``srt.py``, ``enorm.py``) start from it.

  python -m experiments.main --config=experiments/configs/default.py \
      --workdir=runs/wrn --optimizer=adamg
"""

from __future__ import annotations

import copy
from typing import Any

from experiments.keys import DEFAULT_CONFIG, ConfigError


def get_config() -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else v for k, v in DEFAULT_CONFIG.items()}


def over(values: dict[str, Any]) -> dict[str, Any]:
    """The default config with ``values`` over it, as a fresh copy (no list is
    shared with the tables it came from)."""
    return copy.deepcopy(get_config() | values)


def check_cell(owner: str, form: str, arg: str | None, cells: list[str]) -> str:
    """``arg`` if it is one of a preset file's ``cells``; else a ConfigError that
    names the file (``owner``), the form of its arguments and every valid one."""
    if arg not in cells:
        raise ConfigError(
            f"{owner} takes {form}, got {arg!r}; valid: " + ", ".join(cells)
        )
    return arg
