"""The one source of riemax's version (pyproject.toml reads it too)."""

__version__ = "0.2.0"
