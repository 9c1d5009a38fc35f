"""Input pipeline vs train step: can the loader keep the accelerator busy?

The experiments keep the dataset in host memory as uint8 (``experiments.data``):
each step gathers its batch with NumPy (the indices are a function of ``(seed,
step)``) and puts it on the devices, in a background thread two steps ahead of the
device (``experiments.data.prefetch``); random crops, flips and the normalization run
inside the jitted step. This script measures, in images per second:

- ``loader``: gather + ``device_put`` of one batch, waited for, in the main thread;
- ``loader via prefetch``: the same batches consumed from the prefetch thread;
- ``train step <model>``: the experiments' own jitted step (``experiments.train``:
  augmentation, forward, backward, the optimizer from the table, the measurements)
  fed with batches already on the device;
- optionally ``tfds decode`` (``--tfds NAME``): reading a prepared tfds split from
  ArrayRecord into memory (done once per run, before training).

The ratio column is ``loader images/s / train-step images/s``: above 1 the loader is
not what the device waits for (and the prefetch thread overlaps it with the step
anyway). The arrays are random CIFAR-shaped uint8 images (the loader's cost depends
only on their size).

Run::

  python -m benchmarks.input_pipeline [--smoke] [--models wrn-16-4,resnet20]
      [--batch 128] [--optimizer sgdg] [--steps 200] [--tfds cifar10 --data_dir DIR]

(the train step runs ``steps // 4`` steps per repetition).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import jax
import numpy as np

from benchmarks._common import Table, machine_header, parse_args, print_tables
from experiments import config as config_lib
from experiments import data, train

DEFAULT_MODELS = "wrn-16-4,resnet20"
SMOKE_MODELS = "vgg-small"
IMAGE = (32, 32, 3)


def _trainer(model: str, batch: int, n: int, optimizer: str, smoke: bool):
    extra = {"widths": [4, 8], "convs_per_stage": 1} if model == "vgg-small" else {}
    cfg = config_lib.resolve(
        {
            "dataset": "cifar10",
            "model": model,
            "optimizer": optimizer,
            "batch_size": batch,
            "steps": 10,
            **extra,
        }
    )
    cfg = config_lib.derive(cfg, n_train=n, image_shape=IMAGE)
    cfg |= {"num_classes": 10, "num_val": 0, "num_test": 0}
    dev = train.Devices(cfg["parallel"], cfg["num_devices"])
    dev.check_divides(batch, "batch")
    cfg["eval_batch_size"] = dev.n_global
    norm = ([125.0] * 3, [63.0] * 3)
    return train.Trainer(cfg, norm, dev)


def _median_rate(fn, steps: int, reps: int, batch: int) -> float:
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(steps)
        rates.append(batch * steps / (time.perf_counter() - start))
    return statistics.median(rates)


def measure(
    models: Sequence[str],
    *,
    batch: int,
    n: int,
    steps: int,
    reps: int,
    optimizer: str,
    smoke: bool,
    tfds_name: str | None = None,
    data_dir: str | None = None,
) -> Table:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, *IMAGE), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int32)
    order = data.BatchOrder(n, batch, seed=0)
    dev = train.Devices("pmap", None)

    def produce(step):
        idx = order(step)[dev.rows(batch)]
        return dev.put_batch(x[idx], y[idx])

    def loader(k):
        for s in range(k):
            jax.block_until_ready(produce(s))

    def prefetched(k):
        for item in data.prefetch(produce, range(k)):
            jax.block_until_ready(item)

    loader(2)  # first transfers
    rows = []
    loader_rate = _median_rate(loader, steps, reps, batch)
    rows.append(("loader (gather + device_put)", loader_rate))
    rows.append(("loader via prefetch", _median_rate(prefetched, steps, reps, batch)))
    if tfds_name:
        start = time.perf_counter()
        ds = data.load(tfds_name, data_dir=data_dir)
        rate = len(ds.y_train) / (time.perf_counter() - start)
        rows.append((f"tfds decode {tfds_name} train (once per run)", rate))

    table = Table(
        f"Input pipeline vs train step, batch {batch} (images/s)",
        ["what", "images/s", "loader / this"],
    )
    for name, rate in rows:
        table.add([name, rate, "-"])
    for model in models:
        trainer = _trainer(model, batch, n, optimizer, smoke)
        state = trainer.dev.put_state(trainer.init_host_state())
        xb, yb = produce(0)
        holder = {"state": state}

        def step(k, trainer=trainer, xb=xb, yb=yb, holder=holder):
            for _ in range(k):
                holder["state"], m = trainer.train_step(holder["state"], xb, yb)
            jax.block_until_ready(m)

        step(2)  # compile and warm up
        rate = _median_rate(step, max(1, steps // 4), reps, batch)
        table.add(
            [
                f"train step {model} ({optimizer}, augmentation on device)",
                rate,
                loader_rate / rate,
            ],
            loader_rate / rate,
        )
    table.notes.append(
        "Random uint8 CIFAR-shaped images in host memory, "
        f"{n} examples; median of {reps} repetitions. "
        "loader / train step > 1: the loader is faster than the step."
    )
    return table


def main(argv: Sequence[str] | None = None) -> list[Table]:
    def extra(p):
        p.add_argument("--models", default=None, help=f"default {DEFAULT_MODELS}")
        p.add_argument("--batch", type=int, default=None, help="default 128")
        p.add_argument("--optimizer", default="sgdg", help="from the table")
        p.add_argument("--tfds", default=None, help="also time decoding this dataset")
        p.add_argument("--data_dir", default=None, help="tfds data dir")
        p.add_argument(
            "--steps", type=int, default=None, help="loader steps per rep (200)"
        )

    args = parse_args(argv, __doc__, reps=5, extra=extra)
    models = (args.models or (SMOKE_MODELS if args.smoke else DEFAULT_MODELS)).split(
        ","
    )
    batch = args.batch or (16 if args.smoke else 128)
    n = 1024 if args.smoke else 50000
    steps = args.steps or (8 if args.smoke else 200)
    config = {"batch": batch, "examples": n, "optimizer": args.optimizer}
    print(machine_header("Input pipeline vs train step", config), flush=True)
    tables = [
        measure(
            models,
            batch=batch,
            n=n,
            steps=steps,
            reps=args.reps,
            optimizer=args.optimizer,
            smoke=args.smoke,
            tfds_name=args.tfds,
            data_dir=args.data_dir,
        )
    ]
    print_tables(tables)
    return tables


if __name__ == "__main__":
    main()
