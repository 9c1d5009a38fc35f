"""Shared fixtures and settings of the test suite.

* XLA's most expensive optimizations are off for the whole session and its
  subprocesses (tiny programs compile several times faster); checks of compiled
  programs turn them on with ``helpers.full_compile``.
* pytest-xdist's ``-n auto`` worker count, and compiled programs released after
  every module.
* hypothesis: a deterministic profile without deadlines (compilation times vary)
  and without shrinking.
"""

from __future__ import annotations

import gc
import os

# Subprocesses (the runner's CLI, the notebooks' kernels) compile the same way.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import fast_compile as _fast_compile  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402

# No shrinking: a failing example is reported as generated (shrinking a jitted
# optimizer step can take minutes).
settings.register_profile(
    "riemax",
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.load_profile("riemax")


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker more than the cores (the notebook kernels and the
    runner's subprocesses leave a worker waiting), at most 4."""
    return min(4, (os.cpu_count() or 1) + 1)


@pytest.fixture(autouse=True, scope="session")
def _fast_compile_everywhere():
    """The suite's programs are tiny and each is compiled a few times at most:
    XLA's expensive optimisation passes would cost more than they save. Checks of
    the compiled program itself use ``helpers.full_compile``."""
    with _fast_compile():
        yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module: a long session
    otherwise holds thousands of executables, and XLA:CPU has crashed compiling
    the next one in such a process."""
    yield
    jax.clear_caches()
    gc.collect()
