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

Nothing here imports JAX: the command line checks its flags before loading it.
"""

from __future__ import annotations

import logging
import sys
import time

_START = time.time()
_VERBOSITY = 0


def set_verbosity(level: int) -> None:
    """Sets what the console shows (see the module docstring)."""
    global _VERBOSITY
    _VERBOSITY = int(level)
    python_level = {-1: logging.WARNING, 0: logging.WARNING, 1: logging.INFO}.get(
        _VERBOSITY, logging.DEBUG if _VERBOSITY > 1 else logging.WARNING
    )
    for name in ("", "absl", "jax", "orbax", "flax"):
        logging.getLogger(name).setLevel(python_level)
    if "absl.logging" in sys.modules or _VERBOSITY > 0:
        from absl import logging as absl_logging

        # absl counts its own levels (warning -1, info 0, debug 1): by name.
        absl_logging.set_verbosity(logging.getLevelName(python_level).lower())


def verbosity() -> int:
    return _VERBOSITY


def _main_process() -> bool:
    jax = sys.modules.get("jax")  # not imported yet: a single process
    return jax is None or jax.process_index() == 0


def line(msg: str) -> str:
    """``msg`` stamped with the runner's clock."""
    return f"[{time.time() - _START:7.1f}s] {msg}"


def status(msg: str, *, level: int = 0) -> None:
    """One progress line on stderr (process 0 only), shown at ``verbosity >=
    level``."""
    if _VERBOSITY >= level and _main_process():
        print(line(msg), file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    """A warning line, shown at every verbosity."""
    if _main_process():
        print(line(f"WARNING: {msg}"), file=sys.stderr, flush=True)
