"""Optimizer-only step of the Stiefel optimizers (Cayley SGD, Cayley Adam,
manifold Muon) next to optax's SGD and riemax's SGD-G, on real parameter trees.

One step is ``tx.update(grads, state, params)`` followed by
``optax.apply_updates``, jitted with the params and optimizer-state buffers
donated; the gradients are a fixed random tree whose sign alternates from step
to step (as in :mod:`benchmarks.optimizer_step`). Every row is the optimizer as
the runner builds it (``experiments/optimizers/``: the table's default rates, its
companion and weight decay, its own manifold split, a constant learning rate),
with its own copy of the parameters put on its manifold first:

- ``sgd (optax)``: ``optax.sgd(0.1, momentum=0.9, nesterov=True)`` on every
  leaf, the baseline of every ratio;
- ``sgdg (hybrid)``: SGD-G (omega 0.1) on RBN's manifold kernels (``conv``,
  fan-in > fan-out, unit-norm units), Nesterov SGD with L2 elsewhere;
- ``cayley-sgd`` / ``cayley-adam (hybrid)``: on the Cayley authors' kernels
  (``conv``, fan-in >= fan-out, orthonormalised by QR), Nesterov SGD with L2
  elsewhere;
- ``manifold-muon (hybrid)``: on every kernel (Bernstein's rule, put on the
  manifold by the matrix sign), AdamW elsewhere.

All rows of a model are timed interleaved in one process (see
:mod:`benchmarks._common`): ``ms/step`` is the median over repetitions, the
ratios are medians over medians, and the range is that of the per-repetition
ratios to ``sgd``. A manifold-Muon step runs 100 dual-ascent iterations of 10
matrix-sign iterations on every kernel (about ``4000 n p^2`` FLOPs for an
``n x p`` kernel, ``p <= n``): on the WRN-28-10 tree that is about 87 TFLOP,
minutes per step on a 2-core CPU. So only the models of ``--muon_models`` time
it interleaved; those of ``--muon_once`` time one whole-tree step after its
compilation (not interleaved); those of ``--muon_estimate`` time one step on
their largest kernel alone and extrapolate the whole tree by FLOPs (the rate of
that kernel applied to the tree's total: a lower bound where the smaller
kernels run at a lower rate); the others leave it out. The table gives the
FLOPs in every case.

Run::

  python -m benchmarks.stiefel [--smoke] [--reps 5] [--models resnet20,wrn-28-10]
      [--muon_models resnet20] [--muon_once MODELS] [--muon_estimate wrn-28-10]
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import riemax
from benchmarks._common import (
    BASELINE_DESCRIPTION,
    Stepper,
    Table,
    all_finite,
    alternating,
    baseline_tx,
    check_finite,
    compiled_afresh,
    machine_header,
    make_optimizer_step,
    parse_args,
    print_tables,
    random_params_and_grads,
    time_interleaved,
)
from experiments import optimizers as optimizer_table
from experiments.models import count_params, param_shapes

DEFAULT_MODELS = "resnet20,wrn-28-10"
SMOKE_MODELS = "vgg-small"
#: ``--smoke``: the smallest tree with every kind of leaf (two conv kernels, a
#: dense kernel, BatchNorm and a bias), so that each row compiles quickly.
SMOKE_MODEL_KW = {"widths": (8, 8), "convs_per_stage": 1}


def labels_of(name: str, shapes: Any) -> Any:
    """The manifold split the runner gives ``name`` with ``--labels=paper``."""
    rule = optimizer_table.lookup(name).paper_labels
    if rule == "stiefel":
        return riemax.labels_by_rule(shapes, "conv", fan="tall")
    if rule == "kernels":
        return riemax.labels_by_rule(shapes, "", fan="any")
    return riemax.labels_by_rule(shapes)


def table_tx(name: str, labels: Any) -> Any:
    """``name`` as the runner builds it, at the table's defaults (constant rates),
    with its default weight decays on the Euclidean kernels."""
    decays = optimizer_table.group_decays(name, {})
    groups = jax.tree.map(
        lambda lab: "manifold" if lab == riemax.MANIFOLD else "kernel", labels
    )
    decay = optimizer_table.decay_tree(groups, decays)
    hyper = optimizer_table.resolve_hyper(name, {})
    return optimizer_table.build(name, hyper, labels, decay=decay)


def start_params(name: str, params: Any, labels: Any) -> Any:
    """Each row's own copy of the parameters, on its manifold (the runner's
    start projection; unit-norm units for SGD-G are already there)."""
    own = jax.tree.map(jnp.copy, params)
    start = optimizer_table.lookup(name).start
    if start is None:
        return own
    return jax.jit(lambda p: riemax.to_manifold(p, start, labels))(own)


def make_row(name: str, shapes: Any, seed: int = 0) -> tuple[Stepper, int]:
    """The stepper of one row and its number of manifold kernels."""
    # Unit-norm units on RBN's kernels, as random_params_and_grads draws them.
    params, grads = random_params_and_grads(shapes, riemax.labels_by_rule(shapes), seed)
    if name == "sgd":
        tx, own, n_manifold, title = baseline_tx("sgd"), params, 0, "sgd (optax)"
    else:
        labels = labels_of(name, shapes)
        tx = table_tx(name, labels)
        own = start_params(name, params, labels)
        n_manifold = sum(1 for x in jax.tree.leaves(labels) if x == riemax.MANIFOLD)
        title = f"{name} (hybrid)"
    even, odd = alternating(grads)
    stepper = Stepper(
        title, make_optimizer_step(tx), (own, tx.init(own)), (even,), alternate=(odd,)
    )
    return stepper, n_manifold


def kernels_of(shapes: Any) -> list[Any]:
    """The leaves with at least two axes (manifold Muon's rule: every kernel)."""
    return [s for s in jax.tree.leaves(shapes) if len(s.shape) >= 2]


def muon_gflop(shapes: Any, dual_steps: int = 100, msign_steps: int = 10) -> float:
    """GFLOPs of the matrix products of one manifold-Muon step on every kernel
    (per matrix sign iteration on a wide ``p x n`` view: ``x x^T``, ``y s``,
    ``y x``)."""
    total = 0
    for s in jax.tree.leaves(shapes):
        if len(s.shape) < 2:
            continue
        n, p = math.prod(s.shape[:-1]), s.shape[-1]
        n, p = max(n, p), min(n, p)
        per_sign = msign_steps * (2 * p * p * n * 2 + 2 * p**3)
        total += (dual_steps + 1) * per_sign
    return total / 1e9


def muon_kernel_row(shapes: Any) -> tuple[str, float, float, float]:
    """One manifold-Muon step (the table's factory at its default rate) on the
    largest kernel of ``shapes`` alone, timed once after its compilation: its
    shape, seconds, compile seconds and GFLOPs."""
    big = max(kernels_of(shapes), key=lambda s: muon_gflop([s]))
    labels = {"w": riemax.MANIFOLD}
    params, grads = random_params_and_grads({"w": big}, {"w": riemax.EUCLIDEAN}, 1)
    tx = table_tx("manifold-muon", labels)
    own = start_params("manifold-muon", params, labels)
    return (
        "x".join(map(str, big.shape)),
        *_one_step(tx, own, grads),
        muon_gflop([big]),
    )


def _one_step(tx: Any, params: Any, grads: Any) -> tuple[float, float]:
    """Seconds of one optimizer step (compiled ahead, then run once) and of its
    compilation."""
    step = make_optimizer_step(tx)
    state = (params, tx.init(params))
    with compiled_afresh():
        start = time.perf_counter()
        compiled = step.lower(state, grads).compile()
        compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(state, grads))
    seconds = time.perf_counter() - start
    if not all_finite(out):
        raise FloatingPointError("non-finite manifold-Muon step")
    return seconds, compile_s


def bench_model(
    model: str,
    reps: int,
    warmup: int,
    min_rep_s: float,
    muon: set[str],
    smoke: bool = False,
) -> Table:
    """``muon``: how manifold Muon is timed, any of ``"interleaved"``, ``"once"``
    and ``"estimate"`` (none: left out)."""
    shapes = param_shapes(model, 10, **(SMOKE_MODEL_KW if smoke else {}))
    names = ["sgd", "sgdg", "cayley-sgd", "cayley-adam"]
    if "interleaved" in muon:
        names.append("manifold-muon")
    print(f"{model}: {count_params(shapes):,} params, rows {', '.join(names)}")
    built = [make_row(n, shapes) for n in names]
    steppers = [s for s, _ in built]
    kernels = {s.name: k for s, k in built}
    time_interleaved(steppers, reps=reps, warmup=warmup, min_rep_s=min_rep_s)
    check_finite(steppers)
    base, sgdg = steppers[0], steppers[1]

    table = Table(
        f"Stiefel optimizer step, {model} ({count_params(shapes) / 1e6:.2f}M params)",
        [
            "row",
            "manifold kernels",
            "ms/step",
            "ratio to sgd",
            "per-rep range",
            "ratio to sgdg",
        ],
    )
    for s in steppers:
        ratio = s.median / base.median
        per_rep = [c / b for c, b in zip(s.times, base.times, strict=True)]
        table.add(
            [
                s.name,
                kernels[s.name],
                s.median * 1e3,
                ratio,
                f"{min(per_rep):.2f}..{max(per_rep):.2f}",
                s.median / sgdg.median,
            ],
            None if s is base else ratio,
        )
    if "once" in muon:
        labels = labels_of("manifold-muon", shapes)
        n_manifold = sum(1 for x in jax.tree.leaves(labels) if x == riemax.MANIFOLD)
        params, grads = random_params_and_grads(
            shapes, riemax.labels_by_rule(shapes), 0
        )
        once, compiled = _one_step(
            table_tx("manifold-muon", labels),
            start_params("manifold-muon", params, labels),
            grads,
        )
        table.add(
            [
                f"manifold-muon (hybrid): 1 step after compiling ({compiled:.0f} s), "
                "not interleaved",
                n_manifold,
                once * 1e3,
                once / base.median,
                "-",
                once / sgdg.median,
            ],
            once / base.median,
        )
    if "estimate" in muon:
        shape, once, compiled, gflop = muon_kernel_row(shapes)
        rate = gflop / once
        whole = muon_gflop(shapes) / rate
        table.add(
            [
                f"manifold-muon, one {shape} kernel alone: 1 step after compiling "
                f"({compiled:.0f} s), not interleaved ({rate:.0f} GFLOP/s)",
                1,
                once * 1e3,
                once / base.median,
                "-",
                once / sgdg.median,
            ]
        )
        table.add(
            [
                "manifold-muon (hybrid), whole tree: ESTIMATED from that kernel's "
                "GFLOP/s (not measured)",
                sum(1 for x in kernels_of(shapes)),
                whole * 1e3,
                whole / base.median,
                "-",
                whole / sgdg.median,
            ]
        )
    table.notes += [
        f"sgd = {BASELINE_DESCRIPTION['sgd']} on every leaf. Median of {reps} "
        f"interleaved reps ({', '.join(f'{s.name}: {s.inner}' for s in steppers)} "
        "steps per rep). Cayley rows at the table's constant rates (the runner "
        "also resets their state at each decay of a step schedule: one select per "
        "state element at the decay steps, not timed here).",
        f"manifold Muon: {muon_gflop(shapes):.0f} GFLOP of matrix products per step "
        "(100 dual-ascent iterations x 10 matrix-sign iterations per kernel)"
        + ("" if muon else "; not timed (--muon_models)")
        + ".",
    ]
    return table


def main(argv: Sequence[str] | None = None) -> list[Table]:
    def extra(p):
        p.add_argument(
            "--models", default=None, help=f"comma-separated (default {DEFAULT_MODELS})"
        )
        p.add_argument(
            "--muon_models",
            default=None,
            help="models whose manifold-Muon row is timed interleaved (default "
            "resnet20; the smoke model with --smoke)",
        )
        p.add_argument(
            "--muon_once",
            default="",
            help="models whose manifold-Muon step is timed once, after its compilation",
        )
        p.add_argument(
            "--muon_estimate",
            default=None,
            help="models whose manifold-Muon step is estimated from one step on "
            "their largest kernel (default wrn-28-10; the smoke model with --smoke)",
        )

    args = parse_args(argv, __doc__, reps=5, extra=extra)
    models = (args.models or (SMOKE_MODELS if args.smoke else DEFAULT_MODELS)).split(
        ","
    )
    interleaved = args.muon_models
    if interleaved is None:
        interleaved = SMOKE_MODELS if args.smoke else "resnet20"
    interleaved = set(filter(None, interleaved.split(",")))
    once = set(filter(None, args.muon_once.split(",")))
    estimate = args.muon_estimate
    if estimate is None:
        estimate = SMOKE_MODELS if args.smoke else "wrn-28-10"
    estimate = set(filter(None, estimate.split(",")))
    min_rep_s = 0.0 if args.smoke else 0.25
    print(
        machine_header(
            "benchmarks.stiefel",
            {
                "models": ",".join(models),
                "muon interleaved": ",".join(sorted(interleaved)) or "-",
                "muon once": ",".join(sorted(once)) or "-",
                "muon estimate": ",".join(sorted(estimate)) or "-",
                "reps": args.reps,
                "smoke": args.smoke,
            },
        ),
        flush=True,
    )
    tables = []
    for m in models:
        muon = {
            kind
            for kind, where in (
                ("interleaved", interleaved),
                ("once", once),
                ("estimate", estimate),
            )
            if m in where
        }
        tables.append(
            bench_model(m, args.reps, args.warmup, min_rep_s, muon, args.smoke)
        )
    print_tables(tables)
    return tables


if __name__ == "__main__":
    main()
