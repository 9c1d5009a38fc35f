"""Experiments and models that use :mod:`riemax` (not part of the library)."""
