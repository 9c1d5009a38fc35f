"""Datasets of the experiments: in-memory arrays, deterministic batches, and the
on-device preprocessing (augmentation, normalization) of the jitted steps.

Datasets (``--dataset``):

- ``cifar10``, ``cifar100``, ``svhn_cropped``: read with ``tfds.data_source`` from
  ArrayRecord files (no TensorFlow needed), once, into host memory (uint8; the
  50k CIFAR images take 150 MB, SVHN train+extra 1.9 GB). Prepare them once with
  ``python -m experiments.cifar --task=prepare --dataset=NAME`` (needs the
  ``[prepare]`` extra, i.e. TensorFlow).
- ``digits``: scikit-learn's bundled 8x8 digits (offline), split 1437/360.
- ``npz:PATH``: a user's arrays ``x_train, y_train, x_test, y_test`` (uint8 or
  float images, NHWC or NHW; integer labels).

Batches: the indices of the batch of 0-based ``step`` are a function of ``(seed,
step)`` only (one permutation per epoch, seeded by ``(seed, epoch)``, remainder
dropped), so a resumed run sees exactly the batches of an uninterrupted one. The
images travel to the devices as stored (uint8 for the tfds datasets); random crops
and flips (keyed by ``(seed, step)``, drawn for the whole global batch, so the
result does not depend on the number of devices) and the normalization run inside
the jitted step.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

TFDS_DATASETS = {
    # name: (num_classes, test split)
    "cifar10": (10, "test"),
    "cifar100": (100, "test"),
    "svhn_cropped": (10, "test"),
}
DATASETS = ("digits", *TFDS_DATASETS, "npz:PATH")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """A dataset that cannot be loaded (the message says what to do)."""


@dataclasses.dataclass
class Dataset:
    """In-memory splits (``x`` NHWC, uint8 or float32; ``y`` int32)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def pixel_max(self) -> float:
        """255 for uint8 images, 1 for float ones (the unit of ``scale``)."""
        return 255.0 if self.x_train.dtype == np.uint8 else 1.0


def check_name(name: str) -> None:
    if name in TFDS_DATASETS or name == "digits":
        return
    if name.startswith("npz:") and len(name) > 4:
        return
    raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")


def default_data_dir() -> str:
    """tfds's default data directory (``$TFDS_DATA_DIR`` or ~/tensorflow_datasets)."""
    return os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


def prepare_command(name: str, data_dir: str) -> str:
    return (
        f"python -m experiments.cifar --task=prepare --dataset={name} "
        f"--data_dir={data_dir}"
    )


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load(
    name: str,
    *,
    data_dir: str | None = None,
    train_split: str = "train",
    split_seed: int = 0,
    test_size: int = 360,
    log: Callable[[str], None] = lambda s: None,
) -> Dataset:
    """Loads a dataset into memory (train and test splits)."""
    check_name(name)
    if name == "digits":
        return load_digits(split_seed, test_size)
    if name.startswith("npz:"):
        return load_npz(name[4:])
    return load_tfds(name, train_split, data_dir or default_data_dir(), log=log)


def load_digits(split_seed: int = 0, test_size: int = 360) -> Dataset:
    """scikit-learn's 1797 real 8x8 digits, values in [0, 1], stratified split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int32)
    if not 10 <= test_size <= len(y) - 10:
        raise DataError(f"test_size must be in [10, {len(y) - 10}], got {test_size}")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=split_seed, stratify=y
    )
    return Dataset("digits", x_train, y_train, x_test, y_test, 10)


def load_npz(path: str) -> Dataset:
    """A user's ``.npz`` file: ``x_train, y_train, x_test, y_test``."""
    if not os.path.isfile(path):
        raise DataError(f"npz file {path!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz file (np.savez writes a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                found = ", ".join(f.files) or "none"
                raise DataError(
                    f"{path}: missing key(s) {', '.join(missing)} (an npz dataset "
                    f"needs {', '.join(NPZ_KEYS)}; found {found})"
                )
            arrays = {k: f[k] for k in NPZ_KEYS}
    except DataError:
        raise
    except Exception as e:  # not a zip, pickled objects, truncated file, ...
        raise DataError(f"{path}: not a readable .npz file ({e})") from None

    def images(key):
        x = arrays[key]
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or min(x.shape) == 0:
            raise DataError(
                f"{path}: {key} has shape {arrays[key].shape}; expected images "
                "(N, H, W, C) or (N, H, W) with N, H, W, C > 0"
            )
        if x.dtype == np.uint8:
            return x
        if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(
            x.dtype, np.integer
        ):
            raise DataError(f"{path}: {key} has dtype {x.dtype}; expected numbers")
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise DataError(f"{path}: {key} contains non-finite values")
        return x

    def labels(key, n, xkey):
        y = arrays[key]
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or len(y) != n:
            raise DataError(
                f"{path}: {key} has shape {arrays[key].shape}; expected ({n},), one "
                f"integer label per image of {xkey}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            if np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
                y = y.astype(np.int64)
            else:
                raise DataError(
                    f"{path}: {key} must hold integer labels, got {y.dtype}"
                )
        if len(y) and y.min() < 0:
            raise DataError(f"{path}: {key} has negative labels")
        return y.astype(np.int32)

    x_train, x_test = images("x_train"), images("x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{path}: x_train images are {x_train.shape[1:]} but x_test images are "
            f"{x_test.shape[1:]}"
        )
    if x_train.dtype != x_test.dtype:
        x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
    y_train = labels("y_train", len(x_train), "x_train")
    y_test = labels("y_test", len(x_test), "x_test")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if num_classes < 2:
        raise DataError(f"{path}: labels must span at least 2 classes")
    return Dataset(f"npz:{path}", x_train, y_train, x_test, y_test, num_classes)


def _open_source(name: str, split: str, data_dir: str):
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # missing, TFRecord-only, or a bad split name
        cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
        fmt = str(getattr(builder.info, "file_format", "")).lower()
        where = builder.data_dir
    except Exception:  # noqa: BLE001 - any failure here means "not usable"
        prepared, fmt, where = False, "", os.path.join(data_dir, name)
    if prepared and "array_record" not in fmt:
        raise DataError(
            f"{name} is prepared in {where} as {fmt or 'another format'}, which "
            "cannot be read without TensorFlow; prepare it as ArrayRecord in another "
            f"data dir: {prepare_command(name, data_dir + '_array_record')}"
        )
    if prepared:
        raise DataError(f"cannot read split {split!r} of {name} in {where} ({cause})")
    raise DataError(
        f"dataset {name} is not prepared in {data_dir} (looked for {where}); "
        f"prepare it once with: {prepare_command(name, data_dir)}"
    )


def _read_all(source, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Every record of a data source into preallocated uint8/int32 arrays, read
    (and decoded) ``chunk`` records at a time."""
    n = len(source)
    x = y = None
    for start in range(0, n, chunk):
        keys = list(range(start, min(n, start + chunk)))
        try:
            records = source.__getitems__(keys)
        except (TypeError, AttributeError):  # data sources without __getitems__
            records = [source[i] for i in keys]
        for i, r in zip(keys, records, strict=True):
            image = np.asarray(r["image"], np.uint8)
            if x is None:
                x = np.empty((n, *image.shape), np.uint8)
                y = np.empty(n, np.int32)
            x[i], y[i] = image, int(r["label"])
    if x is None:
        raise DataError("the data source is empty")
    return x, y


def load_tfds(
    name: str, train_split: str, data_dir: str, *, log=lambda s: None
) -> Dataset:
    """A tfds dataset read from ArrayRecord into memory (no TensorFlow)."""
    num_classes, test_split = TFDS_DATASETS[name]

    def read(split):
        parts = [_open_source(name, s.strip(), data_dir) for s in split.split("+")]
        log(f"reading {name} {split} ({sum(len(p) for p in parts)} images) into memory")
        xs, ys = zip(*(_read_all(p) for p in parts), strict=True)
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = read(train_split)
    x_test, y_test = read(test_split)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes)


def carve(
    data: Dataset, *, val_size: int, train_size: int | None, split_seed: int
) -> Dataset:
    """Holds ``val_size`` random training examples out as validation (seeded by
    ``split_seed``; the test split is never touched), then keeps the first
    ``train_size`` of the rest (in stored order when ``val_size`` is 0)."""
    x, y = data.x_train, data.y_train
    n = len(y)
    if val_size >= n:
        raise DataError(f"val_size {val_size} leaves no training examples (of {n})")
    x_val = y_val = None
    if val_size:
        perm = np.random.default_rng([split_seed, 7919]).permutation(n)
        val, rest = np.sort(perm[:val_size]), perm[val_size:]
        x_val, y_val = x[val], y[val]
        x, y = x[rest], y[rest]
    if train_size is not None:
        if train_size > len(y):
            raise DataError(
                f"train_size {train_size} > {len(y)} training examples available"
            )
        x, y = x[:train_size], y[:train_size]
    return dataclasses.replace(data, x_train=x, y_train=y, x_val=x_val, y_val=y_val)


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and (biased) std over all images and pixels, accumulated
    in float64 a chunk of images at a time (SVHN train+extra is 1.9 GB of uint8)."""
    total = np.zeros(x.shape[-1])
    squares = np.zeros(x.shape[-1])
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].reshape(-1, x.shape[-1]).astype(np.float64)
        total += part.sum(0)
        squares += np.square(part).sum(0)
    count = x.size // x.shape[-1]
    mean = total / count
    var = np.maximum(squares / count - np.square(mean), 0.0)
    return mean.tolist(), np.sqrt(var).tolist()


# --------------------------------------------------------------------------------------
# Preparing (TensorFlow needed, in the [prepare] extra)
# --------------------------------------------------------------------------------------


def prepare(name: str, data_dir: str | None) -> str:
    """Downloads ``name`` and writes it as ArrayRecord under ``data_dir``."""
    if name not in TFDS_DATASETS:
        raise DataError(
            f"--task=prepare is for the tfds datasets ({', '.join(TFDS_DATASETS)}); "
            f"{name!r} needs no preparation"
        )
    data_dir = data_dir or default_data_dir()
    try:
        import tensorflow  # noqa: F401 - tfds's builders need it to prepare
    except ImportError:
        raise DataError(
            "preparing tfds data needs TensorFlow: pip install -e '.[prepare]' "
            "(tensorflow-cpu; only for this step, training does not import it)"
        ) from None
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    return builder.data_dir


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


class BatchOrder:
    """The global batch indices of every step: a fresh permutation of the ``n``
    examples per epoch, seeded by ``(seed, epoch)``, remainder dropped."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise DataError(f"batch_size {batch_size} > {n} training examples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    def __call__(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]


def prefetch(
    produce: Callable[[int], Any], steps: Sequence[int], depth: int = 2
) -> Iterator[Any]:
    """``produce(step)`` for each step, computed ``depth`` steps ahead in a thread
    (gathering the host batch and starting its transfer overlap the device step).
    Exceptions of ``produce`` are re-raised in the caller."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for s in steps:
                if stop.is_set():
                    return
                q.put((s, produce(s), None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((None, None, e))
        q.put((None, None, StopIteration()))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            _, item, err = q.get()
            if isinstance(err, StopIteration):
                return
            if err is not None:
                raise err
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass


# --------------------------------------------------------------------------------------
# On-device preprocessing (called inside the jitted steps)
# --------------------------------------------------------------------------------------


def augment(
    x,
    key,
    *,
    pad: int,
    pad_mode: str,
    crop: int | tuple[int, int],
    flip: bool,
    offset: Any = 0,
    global_batch: int | None = None,
):
    """Random ``crop`` window (``(height, width)`` or a side) of the ``pad``-padded
    images and a random horizontal flip (p = 1/2), on float images ``x`` of shape
    (B, H, W, C).

    The random draws are made for all ``global_batch`` examples of the step and
    rows ``offset : offset + B`` are used, so each example gets the same crop and
    flip whatever the number of devices sharing the batch."""
    import jax
    import jax.numpy as jnp

    b, h, w, c = x.shape
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    total = global_batch or b
    k_crop, k_flip = jax.random.split(key)
    high = jnp.asarray([2 * pad + h - ch + 1, 2 * pad + w - cw + 1])
    ij = jax.random.randint(k_crop, (total, 2), 0, high)
    flips = jax.random.bernoulli(k_flip, 0.5, (total,))
    if total != b:
        ij = jax.lax.dynamic_slice_in_dim(ij, offset, b, 0)
        flips = jax.lax.dynamic_slice_in_dim(flips, offset, b, 0)
    if pad:
        mode = "reflect" if pad_mode == "reflect" else "constant"
        x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (ch, cw, c)))(
        x, ij
    )
    if flip:
        x = jnp.where(flips[:, None, None, None], x[:, :, ::-1], x)
    return x


def center_crop(x, crop: int | tuple[int, int]):
    """The central ``crop`` window (``(height, width)`` or a side) of each image."""
    h, w = x.shape[1:3]
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    i, j = max(h - ch, 0) // 2, max(w - cw, 0) // 2
    return x[:, i : i + ch, j : j + cw]
