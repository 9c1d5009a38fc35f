"""Optimizer-step time vs parameter count (WRN-28-k, k = 1, 2, 4, 8, 10).

The optimizer-only step of :mod:`benchmarks.optimizer_step` (``tx.update`` +
``optax.apply_updates``, donated buffers, random gradients of alternating sign) on
the WRN-28-k parameter trees (``experiments.models.param_shapes``, from 0.37M to 36.5M
parameters). Rows: the ``sgdg`` and ``adamg`` hybrids with ``omega=0`` and with the
default ``omega=0.1``, and the optax baselines ``optax.sgd(0.1, momentum=0.9,
nesterov=True)`` and ``optax.adam(1e-3)`` on the whole tree. The rows of one width are
timed interleaved (ABBA) in the same process; widths one after the other.

Printed: per width the time, time per parameter and ratio to the baseline; per row a
least-squares fit ``time = a + b * params`` (slope ``b`` in ns/param, R^2) and the
exponent ``e`` of ``time ~ params^e`` (log-log fit). An element-wise optimizer is
linear (``e`` -> 1 once the per-leaf overhead is amortised). The orthogonality penalty
costs ``4 n out^2`` FLOPs per ``n x out`` kernel, and in a WRN-28-k both ``n`` and
``out`` grow with ``k``: it scales like ``params^1.5``, which the ``gram GFLOP``
column shows.

Run::

  python -m benchmarks.scaling [--smoke] [--reps 5] [--widths 1,2,4,8,10]

``--smoke``: WRN-10-1 and WRN-10-2, rows ``sgd (optax)`` and ``sgdg (hybrid)`` only.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence

import numpy as np

import riemax
from benchmarks._common import (
    OptRow,
    Table,
    baseline_rows,
    candidate_rows,
    check_finite,
    machine_header,
    parse_args,
    print_tables,
    time_interleaved,
)
from benchmarks.optimizer_step import gram_gflop, make_steppers
from experiments.models import count_params, param_shapes

DEFAULT_WIDTHS = "1,2,4,8,10"
DEFAULT_DEPTH = 28
SMOKE_WIDTHS = "1,2"
SMOKE_DEPTH = 10


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``: returns ``(a, b, R^2)``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    return float(a), float(b), r2


def rows(smoke: bool = False) -> list[OptRow]:
    """All six rows; with ``smoke`` only ``sgd (optax)`` and ``sgdg (hybrid)`` (the
    other rows run in :mod:`benchmarks.optimizer_step`'s smoke already)."""
    if smoke:
        return baseline_rows(("sgd",)) + candidate_rows(
            omega_zero=False, whole_tree=False, names=("sgdg",)
        )
    return baseline_rows() + candidate_rows(
        omega_zero=True, whole_tree=False, names=("sgdg", "adamg")
    )


def main(argv: Sequence[str] | None = None) -> list[Table]:
    def extra(p):
        p.add_argument(
            "--widths", default=None, help=f"k values (default {DEFAULT_WIDTHS})"
        )
        p.add_argument("--depth", type=int, default=None, help="WRN depth (default 28)")

    args = parse_args(argv, __doc__, reps=5, extra=extra)
    widths = [
        int(k)
        for k in (
            args.widths or (SMOKE_WIDTHS if args.smoke else DEFAULT_WIDTHS)
        ).split(",")
    ]
    depth = args.depth or (SMOKE_DEPTH if args.smoke else DEFAULT_DEPTH)
    min_rep_s = 0.0 if args.smoke else 0.25
    print(
        machine_header(
            "benchmarks.scaling",
            {
                "models": ",".join(f"wrn-{depth}-{k}" for k in widths),
                "reps": args.reps,
                "smoke": args.smoke,
            },
        ),
        flush=True,
    )
    opt_rows = rows(args.smoke)
    sizes: list[int] = []
    gflops: list[float] = []
    times: dict[str, list[float]] = {r.name: [] for r in opt_rows}
    for k in widths:
        model = f"wrn-{depth}-{k}"
        shapes = param_shapes(model, 10)
        sizes.append(count_params(shapes))
        gflops.append(gram_gflop(shapes, riemax.labels_by_rule(shapes)))
        print(f"{model}: {sizes[-1]:,} params", flush=True)
        steppers = make_steppers(shapes, opt_rows)
        time_interleaved(
            steppers, reps=args.reps, warmup=args.warmup, min_rep_s=min_rep_s
        )
        check_finite(steppers)
        for s in steppers:
            times[s.name].append(s.median)
        del steppers
        gc.collect()

    per_size = Table(
        f"Optimizer step vs size, WRN-{depth}-k",
        [
            "row",
            "k",
            "params (M)",
            "gram GFLOP",
            "ms/step",
            "ns/param",
            "baseline ms",
            "ratio",
        ],
    )
    for row in opt_rows:
        base = times[f"{row.baseline} (optax)"]
        for i, k in enumerate(widths):
            t = times[row.name][i]
            ratio = t / base[i]
            per_size.add(
                [
                    row.name,
                    k,
                    sizes[i] / 1e6,
                    gflops[i],
                    t * 1e3,
                    t / sizes[i] * 1e9,
                    base[i] * 1e3,
                    ratio,
                ],
                ratio,
            )
    per_size.notes.append(
        f"Median of {args.reps} interleaved reps per width; gram GFLOP = FLOPs of the "
        "orthogonality penalty's Gram matmuls (only for omega > 0 rows)."
    )

    fits = Table(
        f"Linear fit of time vs params, WRN-{depth}-k, k in {widths}",
        [
            "row",
            "slope ns/param",
            "intercept ms",
            "R^2",
            "log-log exponent",
            "ns/param at largest",
        ],
    )
    for row in opt_rows:
        a, b, r2 = fit_line(sizes, times[row.name])
        if len(sizes) > 1:
            exponent = fit_line(np.log(sizes), np.log(times[row.name]))[1]
        else:
            exponent = math.nan
        per_param = times[row.name][-1] / sizes[-1] * 1e9
        # The checked number is the time per parameter: a fitted slope can come out
        # negative from timing noise at the tiny sizes of the smoke run.
        fits.add([row.name, b * 1e9, a * 1e3, r2, exponent, per_param], per_param)
    fits.notes.append(
        "Fits over the widths above, time in seconds vs parameter count; "
        "exponent = slope of log(time) vs log(params)."
    )
    tables = [per_size, fits]
    print_tables(tables)
    return tables


if __name__ == "__main__":
    main()
