"""Small image classification sets written as ``npz:`` files, for checking that the
runner's recipes train on data nobody tuned them for.

Three sets of different image sizes, channel counts and class counts, all made
here with NumPy (deterministic in their seed, no download):

- ``digits28``: scikit-learn's 8x8 digits drawn again at 28x28 in grey, each copy
  randomly shifted, scaled and rotated, with pixel noise (10 classes; the shape of
  the MNIST-like data a new user brings).
- ``shapes32``: 32x32 colour images of a bright disc, square, triangle or cross
  of random colour, size and place on a dark noisy background of random colour
  (4 classes).
- ``gratings16``: 16x16 grey sinusoidal gratings of 5 orientations x 4 spatial
  frequencies with random phase and noise (20 classes).

:func:`write_sets` writes them as ``.npz`` files with ``x_train, y_train,
x_test, y_test`` (uint8 images, int labels), the format of ``--dataset=npz:PATH``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np

#: name -> (image shape, number of classes)
SETS: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits28": ((28, 28, 1), 10),
    "shapes32": ((32, 32, 3), 4),
    "gratings16": ((16, 16, 1), 20),
}


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _warp(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``image`` (h, w) in [0, 1] resampled bilinearly onto a ``size`` square
    through a random rotation (+-15 degrees), scale (0.8-1.1 of the frame) and
    shift (+-2 pixels)."""
    h, w = image.shape
    angle = math.radians(rng.uniform(-15, 15))
    scale = rng.uniform(0.8, 1.1) * size / max(h, w)
    shift = rng.uniform(-2, 2, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy = cx = (size - 1) / 2
    u, v = yy - cy - shift[0], xx - cx - shift[1]
    cos, sin = math.cos(angle), math.sin(angle)
    sy = (cos * u - sin * v) / scale + (h - 1) / 2
    sx = (sin * u + cos * v) / scale + (w - 1) / 2
    y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
    fy, fx = sy - y0, sx - x0
    padded = np.pad(image, 1)

    def at(yi, xi):
        yi, xi = np.clip(yi + 1, 0, h + 1), np.clip(xi + 1, 0, w + 1)
        return padded[yi, xi]

    return (
        at(y0, x0) * (1 - fy) * (1 - fx)
        + at(y0 + 1, x0) * fy * (1 - fx)
        + at(y0, x0 + 1) * (1 - fy) * fx
        + at(y0 + 1, x0 + 1) * fy * fx
    )


def digits28(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    base = digits.images / 16.0
    pick = rng.integers(0, len(base), n)
    x = np.stack([_warp(base[i], 28, rng) for i in pick])
    x = np.clip(x + rng.normal(0, 0.08, x.shape), 0, 1)
    return _to_uint8(x[..., None]), digits.target[pick].astype(np.int64)


def _shape_mask(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    radius = rng.uniform(0.25, 0.4) * size
    cy, cx = rng.uniform(radius + 1, size - radius - 1, size=2)
    u, v = yy - cy, xx - cx
    if kind == 0:  # disc
        return u**2 + v**2 <= radius**2
    if kind == 1:  # square
        return (np.abs(u) <= 0.8 * radius) & (np.abs(v) <= 0.8 * radius)
    if kind == 2:  # triangle, apex up
        return (u <= 0.8 * radius) & (np.abs(v) <= (u + radius) * 0.6)
    bar = 0.3 * radius  # cross
    return ((np.abs(u) <= bar) & (np.abs(v) <= radius)) | (
        (np.abs(v) <= bar) & (np.abs(u) <= radius)
    )


def shapes32(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 4, n)
    x = np.empty((n, 32, 32, 3))
    for i, kind in enumerate(y):
        # a bright shape of any colour on a dark background of any colour
        fg, bg = rng.uniform(0.55, 1, 3), rng.uniform(0, 0.45, 3)
        mask = _shape_mask(int(kind), 32, rng)[..., None]
        x[i] = np.where(mask, fg, bg) + rng.normal(0, 0.06, (32, 32, 3))
    return _to_uint8(np.clip(x, 0, 1)), y.astype(np.int64)


def gratings16(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 20, n)
    angles = np.pi * (y // 4) / 5 + rng.normal(0, 0.05, n)
    freqs = np.array([1.0, 1.6, 2.4, 3.4])[y % 4] * 2 * np.pi / 16
    phase = rng.uniform(0, 2 * np.pi, n)
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float64)
    along = np.cos(angles)[:, None, None] * xx + np.sin(angles)[:, None, None] * yy
    x = 0.5 + 0.35 * np.sin(freqs[:, None, None] * along + phase[:, None, None])
    x = x + rng.normal(0, 0.12, x.shape)
    return _to_uint8(np.clip(x, 0, 1)[..., None]), y.astype(np.int64)


MAKERS: dict[str, Callable[[int, np.random.Generator], tuple]] = {
    "digits28": digits28,
    "shapes32": shapes32,
    "gratings16": gratings16,
}


def write_set(name: str, path: str, n_train: int, n_test: int, seed: int = 0) -> str:
    """Writes set ``name`` with ``n_train`` + ``n_test`` images to ``path``."""
    if name not in MAKERS:
        raise ValueError(f"unknown set {name!r}; valid: {', '.join(MAKERS)}")
    rng = np.random.default_rng([seed, list(MAKERS).index(name)])
    x, y = MAKERS[name](n_train + n_test, rng)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(
        path,
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_test=x[n_train:],
        y_test=y[n_train:],
    )
    return path


def write_sets(
    folder: str,
    n_train: int = 2000,
    n_test: int = 500,
    names: tuple[str, ...] = tuple(SETS),
    seed: int = 0,
) -> dict[str, str]:
    """Writes every set in ``names`` to ``folder/NAME.npz``; returns the paths."""
    paths = {}
    for name in names:
        path = os.path.join(folder, f"{name}.npz")
        paths[name] = write_set(name, path, n_train, n_test, seed)
    return paths
