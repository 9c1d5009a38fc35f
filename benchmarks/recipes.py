"""Does the runner's default recipe train every optimizer on data nobody tuned it
for? Final test error of each optimizer of the table on three image sets.

The three sets of :mod:`benchmarks.image_sets` (28x28 grey digits, 10 classes;
32x32 colour shapes, 4 classes; 16x16 grey gratings, 20 classes) are written as
``npz:`` files, and every optimizer of the runner's table trains on each with
nothing but ``--dataset=npz:PATH --optimizer=NAME``: the recipe for data
without a paper preset (``experiments/config.py``, ``DATASET_DEFAULTS["npz"]``:
``vgg-small-gap``, batch 128, 10 epochs, linear warm-up over the first epoch
then cosine decay on every learning rate, BatchNorm decay 0.9, the table's
learning rates). Each cell is the final test error in %; chance is
``1 - 1/K``. A run that the runner flags as diverged (training loss at chance
after its first epoch, or grown 10x) is marked. The ratio of a cell is its error
over chance: well below 1 means the optimizer trained.

Every run is an ordinary workdir under ``--workdir``: an interrupted benchmark
resumes where it stopped, and a finished cell is read back from its
``result.json`` (use a fresh ``--workdir`` after changing the recipe).

Run::

  python -m benchmarks.recipes [--smoke] [--workdir runs/recipes]
      [--optimizers sgd,sgdg,...] [--sets digits28,shapes32,gratings16]
      [--train 2000] [--test 500]
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence

from benchmarks import image_sets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # experiments/ is not an installed package
    sys.path.insert(0, REPO)


def _parse(argv: Sequence[str] | None):
    import argparse

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="tiny sets, 4 steps")
    p.add_argument("--workdir", default=os.path.join("runs", "recipes"))
    p.add_argument("--optimizers", default=None, help="default: the whole table")
    p.add_argument("--sets", default=",".join(image_sets.SETS))
    p.add_argument("--train", type=int, default=2000, help="training images per set")
    p.add_argument("--test", type=int, default=500, help="test images per set")
    return p.parse_args(list(argv) if argv is not None else None)


def run_cell(path: str, optimizer: str, workdir: str, extra: dict | None = None):
    """One run at the recipe's defaults: ``(test error, diverged kind or None,
    seconds)``; a non-finite loss counts as diverged at chance."""
    from experiments import train

    done = os.path.join(workdir, "result.json")
    if os.path.exists(done):  # a finished cell is read back, not run again
        with open(done) as f:
            result = json.load(f)
        return result["test_error"], result.get("diverged"), result["wall_time_s"]
    cfg = {"dataset": f"npz:{path}", "optimizer": optimizer, "progress": False}
    t0 = time.time()
    try:
        result = train.train_and_evaluate(cfg | (extra or {}), workdir)
    except train.TrainingDiverged:
        return math.nan, "non-finite", time.time() - t0
    return result["test_error"], result.get("diverged"), time.time() - t0


def main(argv: Sequence[str] | None = None):
    from benchmarks._common import Table, machine_header, print_tables
    from experiments import optimizers

    args = _parse(argv)
    names = args.optimizers.split(",") if args.optimizers else optimizers.names()
    sets = [s for s in args.sets.split(",") if s]
    n_train, n_test = (64, 32) if args.smoke else (args.train, args.test)
    extra = {}
    if args.smoke:
        extra = {"steps": 4, "batch_size": 16, "log_every": 2, "checkpoint_every": 4}
    paths = image_sets.write_sets(
        os.path.join(args.workdir, "data"), n_train, n_test, tuple(sets)
    )
    headers = ["optimizer"]
    for s in sets:
        (h, w, c), k = image_sets.SETS[s]
        chance = 100 * (1 - 1 / k)
        headers.append(f"{s} ({h}x{w}x{c}, {k} classes; chance {chance:.0f})")
    table = Table(
        f"Test error % at the default recipe ({n_train} train / {n_test} test "
        "images per set)",
        headers,
    )
    seconds = 0.0
    for name in names:
        row = [name]
        for s in sets:
            k = image_sets.SETS[s][1]
            error, diverged, took = run_cell(
                paths[s], name, os.path.join(args.workdir, s, name), extra
            )
            seconds += took
            chance = 1 - 1 / k
            cell = "nan" if math.isnan(error) else f"{100 * error:.1f}"
            row.append(cell + (f" (diverged: {diverged})" if diverged else ""))
            table.ratios.append(1.0 if math.isnan(error) else error / chance)
        table.add(row)
    table.notes.append(
        f"{len(names) * len(sets)} runs, {seconds / 60:.1f} min of training in all. "
        "Ratio error/chance per cell: " + ", ".join(f"{r:.2f}" for r in table.ratios)
    )
    print(machine_header("Default recipe on new data", {"workdir": args.workdir}))
    print_tables([table])
    return [table]


if __name__ == "__main__":
    main()
