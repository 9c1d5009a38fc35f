"""Smoke run of the runner's loop-overhead benchmark: the runner's train step and
the hand-written NNX + optax step run on the same model, optimizer and batch, and
their ratio is finite (nothing about speed is asserted). It compiles two train
steps (about a minute on a busy 2-core machine), so it is in the slow run."""

from __future__ import annotations

import math

import pytest

from benchmarks import loop_overhead


@pytest.mark.slow
def test_loop_overhead_smoke(capsys):
    (table,) = loop_overhead.main(["--smoke"])
    out = capsys.readouterr().out
    assert len(table.rows) == 1 and table.markdown() in out
    assert all(math.isfinite(r) and r > 0 for r in table.ratios), table.ratios
