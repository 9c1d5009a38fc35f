"""The README's code blocks are claims: run them."""

from __future__ import annotations

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_trains_and_keeps_conv_units_on_the_sphere():
    quickstart = python_blocks()[0]
    assert len([line for line in quickstart.splitlines() if line.strip()]) <= 20
    scope: dict = {}
    exec(compile(quickstart, "README quickstart", "exec"), scope)
    losses = [float(v) for v in scope["losses"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    kernel = np.asarray(scope["model"].conv.kernel[...])
    norms = np.sqrt((kernel.reshape(-1, kernel.shape[-1]) ** 2).sum(0))
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    # The report snippet runs on the quickstart's model.
    exec(compile(python_blocks()[1], "README report", "exec"), scope)


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    (test_cmd,) = [b for b in blocks if '".[test]"' in b]
    assert test_cmd.split("&&")[-1].strip() in ci
    assert '-e ".[test]"' in ci
