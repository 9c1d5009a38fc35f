"""Shared fixtures and settings of the test suite.

* XLA's most expensive optimizations are off for the whole session and its
  subprocesses (tiny programs compile several times faster); checks of compiled
  programs turn them on with ``helpers.full_compile``.
* pytest-xdist's ``-n auto`` worker count, and compiled programs released after
  every module.
* One compilation cache on disk for every worker of a run (and every subprocess):
  a program that several tests or workers build (the same optimizer step on the
  same shapes) is compiled once.
* hypothesis: a deterministic profile without deadlines (compilation times vary)
  and without shrinking.
"""

from __future__ import annotations

import gc
import getpass
import os
import tempfile

# Subprocesses (the runner's CLI, the notebooks' kernels) compile the same way.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Compiled programs are shared through a cache on disk. Its keys include the
# program, the compile options and the versions of jax and XLA, so a stale entry
# is never used for a different program.
try:
    _user = getpass.getuser()
except (KeyError, OSError):  # no user name in this environment
    _user = str(os.getuid()) if hasattr(os, "getuid") else "user"
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"riemax-tests-jax-cache-{_user}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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


@pytest.fixture
def compile_cache_hits():
    """The list of JAX's persistent-cache hits during the test (one entry per
    program read from the cache), with every program stored (no compile-time
    threshold). The suite's cache folder and threshold are restored after, and
    the cache reopened there."""
    from jax import monitoring
    from jax.experimental.compilation_cache import compilation_cache

    hits: list[str] = []

    def listen(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    suite_cache = jax.config.jax_compilation_cache_dir
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    monitoring.register_event_listener(listen)
    try:
        yield hits
    finally:
        monitoring.unregister_event_listener(listen)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", suite_cache)
