"""The runner's console: one clock for every line, and how much is shown.

Every human-readable line goes to stderr as ``[  12.3s] message``, the seconds
since the runner started (this module's import), whichever part of the runner
writes it; stdout carries only the result (one JSON line). The training loop
draws a progress bar on a terminal and writes its lines above it.

``verbosity`` (``--verbosity``):

- ``-1``: warnings and errors only;
- ``0`` (default): the runner's progress lines; the libraries' own log lines
  (absl, orbax, jax) below WARNING stay out of the console;
- ``1``: also the resolved config in full and the libraries' INFO lines;
- ``2``: also their DEBUG lines.

The verbosity is kept as the level of the standard logger ``experiments.console``
(:func:`set_verbosity` sets it; no state of this module's own).

Nothing here imports JAX: the command line checks its flags before loading it.
"""

from __future__ import annotations

import logging
import sys
import time

# The runner's clock: the time this module was first imported (a constant).
_START = time.time()
#: The logger whose level holds the verbosity (no module state of our own).
LOGGER = "experiments.console"
# verbosity -> the level of LOGGER; a line shown at verbosity >= v is logged at
# the level of v (warnings: WARNING).
_LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG, 2: logging.DEBUG - 5}


def _level(verbosity: int) -> int:
    return _LEVELS[max(-1, min(2, int(verbosity)))]


def set_verbosity(level: int) -> None:
    """Sets what the console shows (see the module docstring)."""
    logging.getLogger(LOGGER).setLevel(_level(level))
    python_level = {-1: logging.WARNING, 0: logging.WARNING, 1: logging.INFO}.get(
        level, logging.DEBUG if level > 1 else logging.WARNING
    )
    for name in ("", "absl", "jax", "orbax", "flax"):
        logging.getLogger(name).setLevel(python_level)
    if "absl.logging" in sys.modules or level > 0:
        from absl import logging as absl_logging

        # absl counts its own levels (warning -1, info 0, debug 1): by name.
        absl_logging.set_verbosity(logging.getLevelName(python_level).lower())


def verbosity() -> int:
    """The verbosity last set (0 before any :func:`set_verbosity`)."""
    level = logging.getLogger(LOGGER).level
    if level == logging.NOTSET:
        return 0
    return max((v for v, lv in _LEVELS.items() if lv >= level), default=2)


def _main_process() -> bool:
    # A single process until jax.distributed is initialised (asking jax for the
    # process index earlier would start its backend, which must come after).
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return True
    return jax.process_index() == 0


def line(msg: str) -> str:
    """``msg`` stamped with the runner's clock."""
    return f"[{time.time() - _START:7.1f}s] {msg}"


def status(msg: str, *, level: int = 0) -> None:
    """One progress line on stderr (process 0 only), shown at ``verbosity >=
    level``."""
    if verbosity() >= level and _main_process():
        print(line(msg), file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    """A warning line, shown at every verbosity."""
    if _main_process():
        print(line(f"WARNING: {msg}"), file=sys.stderr, flush=True)
