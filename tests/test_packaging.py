"""The package a user installs: typed, licensed, versioned from one place."""

from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys
import tomllib

import riemax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mypy_passes_on_the_typed_package(tmp_path):
    """riemax ships py.typed, so its annotations must hold under a type checker."""
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (ROOT / "riemax" / "py.typed").exists()


def test_license_and_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0"  # an SPDX expression, not a table
    assert meta["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert not any(c.startswith("License ::") for c in meta["classifiers"])
    assert "Typing :: Typed" in meta["classifiers"]
    assert {"Homepage", "Changelog"} <= set(meta["urls"])
    assert (ROOT / "CHANGELOG.md").read_text().count(f"## {riemax.__version__}") == 1


def test_version_has_one_source():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "riemax._version.__version__"
    }
    assert importlib.metadata.version("riemax") == riemax.__version__
