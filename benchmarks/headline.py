"""The headline figures of riemax's cost, on whatever backend JAX runs on.

One Markdown table per run, every row timed side by side with its optax
counterpart in the same process:

- **train step** (forward, backward, update; batch ``--batch`` of CIFAR-shaped
  input, float32): optax Nesterov SGD on every parameter against the hybrids of
  riemax's SGD-G and Adam-G at the paper's ``omega = 0.1`` (manifold kernels
  from ``riemax.labels_by_rule``, Nesterov SGD with L2 ``5e-4`` on the rest, as
  the experiments build them): ms per step, images per second, ratio, and the
  compile time of the jitted step with its ratio;
- **optimizer only** (``tx.update`` + ``optax.apply_updates`` on the model's
  parameter tree, random gradients whose sign alternates from step to step,
  ``omega = 0``): every sphere optimizer
  against its optax counterpart (Nesterov SGD or Adam), as the ratio of the
  medians of interleaved repetitions, with the range of the per-repetition
  ratios.

Run::

  python -m benchmarks.headline [--model resnet20|wrn-28-10|...] [--batch 128]
      [--reps 7] [--part all|train|optimizer] [--smoke]

``--smoke`` runs a tiny model and batch, one repetition and a few rows (what the
tests run): it checks that everything runs, nothing about speed. ``--part``
measures the train-step rows or the optimizer-only rows alone. While it runs,
each compile and each row, as soon as it is measured, goes to standard error:
a run stopped part-way (a time limit on a lent GPU) keeps what it measured.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence

import jax

import riemax
from benchmarks._common import (
    BASELINE_DESCRIPTION,
    FIELD,
    OptRow,
    Table,
    baseline_rows,
    baseline_tx,
    candidate_rows,
    check_finite,
    compiled_afresh,
    hybrid_tx,
    machine_header,
    normalize_manifold,
    parse_args,
    print_tables,
    time_interleaved,
)
from benchmarks.optimizer_step import make_steppers
from benchmarks.train_step import (
    CIFAR_INPUT,
    init_model,
    random_batch,
    train_stepper,
)
from experiments.models import check_name, count_params, param_shapes

SMOKE_MODEL = "wrn-10-1"
SMOKE_BATCH = 8

#: The sphere optimizers of the optimizer-only table, each as the experiments
#: build it (SGD-G and Adam-G as hybrids, at omega = 0).
SPHERE_ROWS = ("sgdg", "adamg", "adamsrt", "sgdmrt", *FIELD)


#: What ``--smoke`` keeps: one train-step row and two optimizer-only rows (a
#: hybrid and a whole-tree optimizer), enough to run every code path.
SMOKE_SPHERE_ROWS = ("sgdg", "adamp")


def log(line: str) -> None:
    """Progress, each line as soon as it is known (standard error)."""
    print("headline:", line, file=sys.stderr, flush=True)


PARTS = ("all", "train", "optimizer")


def _train_rows(labels, smoke: bool = False) -> list[tuple[str, object]]:
    rows = [
        ("optax Nesterov SGD", baseline_tx("sgd")),
        ("SGD-G hybrid (omega 0.1)", hybrid_tx("sgdg", labels, omega=0.1)),
        ("Adam-G hybrid (omega 0.1)", hybrid_tx("adamg", labels, omega=0.1)),
    ]
    return rows[:2] if smoke else rows


def _add_timed_row(
    table: Table, what: str, optax_cell: str, riemax_cell: str, cand, base
) -> None:
    """A row whose ratio is the median of the per-repetition ratios."""
    per_rep = [c / b for c, b in zip(cand.times, base.times, strict=True)]
    ratio = statistics.median(per_rep)
    range_cell = f"{min(per_rep):.2f}..{max(per_rep):.2f}"
    _add_row(table, [what, optax_cell, riemax_cell, ratio, range_cell], ratio)


def _add_row(table: Table, row: list, ratio: float) -> None:
    table.add(row, ratio)
    log(table.row_markdown(-1))


def train_rows(
    table: Table, model: str, batch: int, reps: int, warmup: int, smoke: bool = False
) -> None:
    """Train-step time and compile time, riemax hybrids against optax."""
    graphdef, params, stats, _ = init_model(model, CIFAR_INPUT)
    labels = riemax.labels_by_rule(params)
    data = random_batch(batch, CIFAR_INPUT)
    steppers, compile_s, lower_s = [], {}, {}
    for name, tx in _train_rows(labels, smoke):
        start = (
            params if name.startswith("optax") else normalize_manifold(params, labels)
        )
        stepper = train_stepper(name, graphdef, start, stats, tx, data)
        with compiled_afresh():
            t0 = time.perf_counter()
            lowered = stepper.fn.lower(stepper.state, *stepper.consts)
            t1 = time.perf_counter()
            stepper.fn = lowered.compile()
            compile_s[name] = time.perf_counter() - t0
        lower_s[name] = t1 - t0
        log(
            f"train step, {name}: compiled in {compile_s[name]:.1f} s "
            f"(tracing and lowering {lower_s[name]:.1f} s)"
        )
        steppers.append(stepper)
    log(f"train step: timing {len(steppers)} rows, {reps} interleaved repetitions")
    time_interleaved(steppers, reps=reps, warmup=warmup, log=None)
    check_finite(steppers)
    base = steppers[0]
    for s in steppers[1:]:
        _add_timed_row(
            table,
            f"train step: {s.name} vs {base.name}",
            f"{base.median * 1e3:.3g} ms ({batch / base.median:,.0f} img/s)",
            f"{s.median * 1e3:.3g} ms ({batch / s.median:,.0f} img/s)",
            s,
            base,
        )
        c_ratio = compile_s[s.name] / compile_s[base.name]
        _add_row(
            table,
            [
                "compile of that train step (of which tracing and lowering)",
                f"{compile_s[base.name]:.3g} s ({lower_s[base.name]:.2g} s)",
                f"{compile_s[s.name]:.3g} s ({lower_s[s.name]:.2g} s)",
                c_ratio,
                "one compile each",
            ],
            c_ratio,
        )


def optimizer_rows(
    table: Table,
    model: str,
    reps: int,
    warmup: int,
    min_rep_s: float,
    smoke: bool = False,
) -> None:
    """Optimizer-only step of every sphere optimizer (omega 0) against optax."""
    shapes = param_shapes(model, 10)
    cands: list[OptRow] = []
    for name in SMOKE_SPHERE_ROWS if smoke else SPHERE_ROWS:
        rows = candidate_rows(whole_tree=False, names=(name,))
        if name in ("sgdg", "adamg"):
            rows = [r for r in rows if "omega=0" in r.name]
        cands += rows
    bases = baseline_rows(sorted({row.baseline for row in cands}))
    steppers = make_steppers(shapes, bases + cands)
    log(
        f"optimizer only: compiling and timing {len(steppers)} rows, "
        f"{reps} interleaved repetitions"
    )
    time_interleaved(
        steppers, reps=reps, warmup=warmup, min_rep_s=min_rep_s, log=_warmed_up
    )
    check_finite(steppers)
    by_name = {s.name: s for s in steppers}
    base_of = {row.baseline: by_name[row.name] for row in bases}
    for row in cands:
        cand, base = by_name[row.name], base_of[row.baseline]
        _add_timed_row(
            table,
            f"optimizer-only step: {row.name}",
            f"{base.median * 1e3:.3g} ms ({row.baseline})",
            f"{cand.median * 1e3:.3g} ms",
            cand,
            base,
        )


def _warmed_up(line: str) -> None:
    log("optimizer only:" + line)


def main(argv: Sequence[str] | None = None) -> list[Table]:
    def extra(parser):
        parser.add_argument(
            "--model",
            default=None,
            help="model whose train step and parameter tree are timed, e.g. "
            "resnet20 or wrn-28-10 (default resnet20; wrn-10-1 with --smoke)",
        )
        parser.add_argument(
            "--batch", type=int, default=None, help="batch size (default 128)"
        )
        parser.add_argument(
            "--part",
            choices=PARTS,
            default="all",
            help="which rows: all (default), the train step's or the "
            "optimizer-only ones",
        )

    args = parse_args(argv, __doc__, reps=7, extra=extra)
    model = args.model or (SMOKE_MODEL if args.smoke else "resnet20")
    batch = args.batch or (SMOKE_BATCH if args.smoke else 128)
    if batch < 1 or args.reps < 1:
        raise SystemExit("benchmarks.headline: --batch and --reps must be positive")
    try:
        check_name(model)
    except ValueError as err:
        raise SystemExit(f"benchmarks.headline: {err}") from None
    print(
        machine_header(
            "benchmarks.headline",
            {
                "model": model,
                "batch": batch,
                "reps": args.reps,
                "part": args.part,
                "smoke": args.smoke,
            },
        ),
        flush=True,
    )
    min_rep_s = 0.0 if args.smoke else 0.25
    shapes = param_shapes(model, 10)
    table = Table(
        f"riemax against optax: {model} ({count_params(shapes) / 1e6:.2f}M params), "
        f"batch {batch}, {jax.default_backend()} ({jax.devices()[0].device_kind})",
        ["what", "optax", "riemax", "ratio", "per-rep ratio range"],
    )
    start = time.perf_counter()
    if args.part in ("all", "train"):
        train_rows(table, model, batch, args.reps, args.warmup, args.smoke)
    if args.part in ("all", "optimizer"):
        optimizer_rows(table, model, args.reps, args.warmup, min_rep_s, args.smoke)
    log(f"done in {time.perf_counter() - start:.0f} s")
    table.notes += [
        f"Train step: forward, backward and update, float32, CIFAR-shaped input; "
        f"baseline {BASELINE_DESCRIPTION['sgd']} on every parameter; riemax hybrids "
        "as the experiments build them (manifold kernels from riemax.labels_by_rule, "
        "Nesterov SGD with L2 5e-4 elsewhere). Optimizer-only: tx.update + "
        "optax.apply_updates on the model's parameter tree, random gradients of "
        "alternating sign, "
        f"omega = 0; counterparts sgd = {BASELINE_DESCRIPTION['sgd']}, adam = "
        f"{BASELINE_DESCRIPTION['adam']}.",
        f"Ratios: median over {args.reps} interleaved repetitions of riemax's time "
        "over optax's in the same repetition. Compile: wall time from the jitted "
        "train step to its executable (tracing, lowering to StableHLO and XLA's "
        "compile; the first two in parentheses), once per row in this process, "
        "without JAX's persistent compilation cache.",
    ]
    print_tables([table])
    return [table]


if __name__ == "__main__":
    main()
