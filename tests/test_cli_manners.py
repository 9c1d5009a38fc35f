"""The runner behaves as a command-line tool: a closed pipe ends it quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_reader_that_closes_the_pipe_early_ends_the_listing_quietly():
    """``--list_presets | head -1``: status 0 and no traceback on stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.cifar", "--list_presets"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    status = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    assert first.startswith(b"rbn-"), first
    assert status == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
