"""Configs as code: every file here has a ``get_config()`` that returns a config
(a flat dict over the keys of :data:`experiments.keys.KEYS`).

- ``default.py``: the default config (what a command line without ``--config``
  runs: every key at the table's default, the rest derived when it is resolved);
- ``smoke.py``: four steps of a tiny model on the offline digits;
- ``rbn.py``, ``srt.py``, ``enorm.py``: the three papers' published settings,
  one config per cell of their tables, chosen by the argument of
  ``get_config(arg)``; each file's docstring names its source (the paper, its
  table, the repository's README or hyper-parameter file);
- ``cayley.py`` (Li, Fuxin & Todorovic 2020: Cayley SGD/Adam on CIFAR WRN/VGG)
  and ``muon.py`` (Bernstein 2025: manifold Muon, hyperspherical descent and
  AdamW on a CIFAR-10 MLP): the recipes of the field's Stiefel and sphere
  optimizers, in the same form; no results table ships with either, so their
  cells are not presets (``--config=cayley:ARG``, ``--config=muon:ARG``).

``--config`` names one (:func:`load`): a file, with ``:ARG`` for the papers'
(``experiments/configs/rbn.py:cifar10-wrn-28-10-sgdg``, or any ``.py`` file of
your own with a ``get_config()``), the name of a file here (``default``,
``smoke``, ``rbn:cifar10-wrn-28-10-sgdg``) or a preset name
(``rbn-cifar10-wrn-28-10-sgdg``: ``FAMILY-ARG``, as ``--preset`` and
``--list_presets`` spell them). The command line's flags override its values.

Nothing here imports JAX: the command line checks its flags before loading it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
from typing import Any

from experiments.keys import ConfigError

#: The papers' config files, whose cells are the presets ``FAMILY-ARG``.
FAMILIES = ("rbn", "srt", "enorm")

_HERE = os.path.dirname(os.path.abspath(__file__))


def _family(name: str):
    return importlib.import_module(f"experiments.configs.{name}")


def names() -> list[str]:
    """The presets (``FAMILY-ARG``) of the papers' config files, in the order of
    their tables."""
    return [f"{f}-{arg}" for f in FAMILIES for arg in _family(f).cells()]


def _split(name: str) -> tuple[str, str]:
    family, _, arg = name.partition("-")
    if family not in FAMILIES or name not in names():
        raise ConfigError(
            f"unknown preset {name!r}; valid presets (--list_presets): "
            + ", ".join(names())
        )
    return family, arg


def get(name: str) -> dict[str, Any]:
    """A fresh copy of the preset's config.

    Raises:
      ConfigError: for an unknown name (the message lists the valid ones).
    """
    family, arg = _split(name)
    return _family(family).get_config(arg)


def describe(name: str) -> str:
    """The preset in one line: its cell, its source, the published result."""
    family, arg = _split(name)
    return _family(family).describe(arg)


def srt_name(data: str, model: str, optimizer: str) -> str:
    """The preset that SRT's ``training.py --dataloader=D --model=M
    --optimizer=O`` runs."""
    return "srt-" + _family("srt").cell_of(data, model, optimizer)


def enorm_name(model_type: str) -> str:
    """The preset that ENorm's ``main.py --model-type=T`` runs (its ``--enorm``
    is a flag over it)."""
    return "enorm-" + _family("enorm").cell_of(model_type)


def _files() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([_HERE]))


def _from_path(path: str):
    """The module of a config file: one of this package's by its name, any other
    loaded from its path (without touching ``sys.path``)."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ConfigError(f"--config: no file {path}")
    if os.path.dirname(full) == _HERE:
        return _family(os.path.basename(full)[: -len(".py")])
    spec = importlib.util.spec_from_file_location(
        "experiments_config_" + os.path.basename(full)[: -len(".py")], full
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(spec: str) -> tuple[dict[str, Any], str]:
    """The config that ``--config=spec`` names, and a line that describes it.

    Raises:
      ConfigError: a file or name that does not exist (listing the valid ones),
        a file without ``get_config``, an argument the file does not take.
    """
    file, sep, arg = spec.partition(".py:") if ".py:" in spec else (spec, "", "")
    if sep or spec.endswith(".py"):
        module = _from_path(file + ".py" if sep else spec)
    elif "-" in spec and spec.partition("-")[0] in FAMILIES:
        family, arg = _split(spec)
        module = _family(family)
    else:
        name, _, arg = spec.partition(":")
        if name not in _files():
            raise ConfigError(
                f"unknown --config {spec!r}: give a config file (PATH.py or "
                f"PATH.py:ARG), one of {', '.join(_files())} (NAME or NAME:ARG), "
                "or a preset (--list_presets)"
            )
        module = _family(name)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"--config {spec}: the file has no get_config()")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except TypeError as e:  # an argument that get_config does not take
        raise ConfigError(f"--config {spec}: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(
            f"--config {spec}: get_config() returned a {type(config).__name__}, "
            "not a dict of config keys"
        )
    if arg and hasattr(module, "describe"):
        about = module.describe(arg)
    else:
        about = (module.__doc__ or spec).strip().splitlines()[0]
    return config, about
