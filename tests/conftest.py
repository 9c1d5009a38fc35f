"""Shared fixtures and settings of the test suite.

* ``fast_compile``: XLA's most expensive optimizations off for one module (tiny
  models compile several times faster); use it with
  ``pytestmark = pytest.mark.usefixtures("fast_compile")``.
* hypothesis: a deterministic profile without deadlines (compilation times vary)
  and without shrinking.
"""

from __future__ import annotations

import pytest
from helpers import fast_compile as _fast_compile
from hypothesis import Phase, settings

# No shrinking: a failing example is reported as generated (shrinking a jitted
# optimizer step can take minutes).
settings.register_profile(
    "riemax",
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.load_profile("riemax")


@pytest.fixture(scope="module")
def fast_compile():
    with _fast_compile():
        yield
