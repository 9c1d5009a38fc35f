"""The notebooks run top to bottom, and the committed copies read well without running.

Each notebook is executed in memory (the files are never written) by a Jupyter kernel
running this interpreter, with ``RIEMAX_NOTEBOOK_SMALL=1``: its parameters cell then
picks short runs. A cell that raises fails the test.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "riemax-notebook-test"


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
    """A kernel spec that runs ipykernel on this interpreter, in SMALL mode."""
    kernels = tmp_path_factory.mktemp("kernels")
    (kernels / KERNEL).mkdir()
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "riemax notebook test",
        "language": "python",
        "env": {"RIEMAX_NOTEBOOK_SMALL": "1", "PYTHONPATH": path},
    }
    (kernels / KERNEL / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(kernels)])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_small_mode(path, kernel_specs):
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "RIEMAX_NOTEBOOK_SMALL" in first.source, "the parameters cell comes first"
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    client = NotebookClient(
        nb, km=km, timeout=300, resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if one fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_its_outputs_and_stays_small(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "run every cell"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert path.stat().st_size < 300_000


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_percentages_are_plotted_on_a_linear_axis(path):
    """An axis labelled in % is linear: a log axis makes equal differences in
    error look unequal."""
    import re

    cells = nbformat.read(path, as_version=4).cells
    source = "\n".join(c.source for c in cells if c.cell_type == "code")
    # Every .set(...) call, arguments joined across lines.
    for call in re.findall(r"\.set\((.*?)\)\s*$", source, flags=re.S | re.M):
        if "%" in call:
            assert "log" not in call, (path.name, call)
