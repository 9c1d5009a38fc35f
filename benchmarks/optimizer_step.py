"""Optimizer-only step: riemax hybrids vs optax, on real parameter trees.

One step is ``tx.update(grads, state, params)`` followed by ``optax.apply_updates``,
jitted with the params and optimizer-state buffers donated; the gradients are a fixed
random tree whose sign alternates from step to step (see
:func:`benchmarks._common.alternating`). Trees: WRN-28-10 (36.5M parameters) and
ResNet-20 (0.27M), built from
``experiments.models.param_shapes`` and filled with random values (manifold kernels on
the unit sphere, as RBN initialises them).

Rows (labels: ``riemax.labels_by_rule`` tree), every optimizer as the experiments
build it (``experiments/optimizers/``), at the table's learning rates:

- ``<opt> (hybrid)``: ``sgdg``/``adamg`` on the manifold kernels with Nesterov SGD
  and L2 ``5e-4`` elsewhere; ``adamsrt``/``sgdmrt`` per unit on the manifold kernels
  and element-wise elsewhere, L2 everywhere; ``rotational-adamw``/``-sgdm``: the
  rotational wrapper on the manifold kernels, AdamW / momentum SGD elsewhere;
- ``sgdg``/``adamg omega=0 (hybrid)``: the same without the orthogonality penalty
  (two Gram matmuls per manifold kernel, ``4 n out^2`` FLOPs for an ``n x out``
  kernel: the ``gram GFLOP`` note gives the total);
- ``<opt> (whole tree)``: ``adamsrt``/``sgdmrt`` per unit on every leaf; ``adamp``,
  ``sgdp`` and ``nero`` (which choose per leaf themselves) on every leaf.

Baselines, on the whole tree: ``optax.sgd(0.1, momentum=0.9, nesterov=True)`` for
the SGD-like rows, ``optax.adam(1e-3)`` for the Adam-like ones. All rows of a model
are timed interleaved in one process (see :mod:`benchmarks._common`).

Run::

  python -m benchmarks.optimizer_step [--smoke] [--reps 7] [--models wrn-28-10,resnet20]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

import riemax
from benchmarks._common import (
    BASELINE_DESCRIPTION,
    FIELD,
    Stepper,
    Table,
    alternating,
    baseline_rows,
    candidate_rows,
    check_finite,
    machine_header,
    make_optimizer_step,
    parse_args,
    print_tables,
    random_params_and_grads,
    ratio_range,
    time_interleaved,
)
from experiments.models import count_params, param_shapes

DEFAULT_MODELS = "wrn-28-10,resnet20"
SMOKE_MODELS = "wrn-10-1"


def gram_gflop(shapes, labels) -> float:
    """FLOPs of the orthogonality penalty's two Gram matmuls, all manifold kernels."""
    total = 0
    for s, lab in zip(jax.tree.leaves(shapes), jax.tree.leaves(labels), strict=True):
        if lab == riemax.MANIFOLD:
            out = s.shape[-1]
            total += 4 * (math.prod(s.shape) // out) * out * out
    return total / 1e9


def make_steppers(shapes, rows, seed: int = 0) -> list[Stepper]:
    """One optimizer-step :class:`Stepper` per row, each with its own copy of the
    same random parameters and the shared gradients, their sign alternating."""
    labels = riemax.labels_by_rule(shapes)
    params, grads = random_params_and_grads(shapes, labels, seed)
    even, odd = alternating(grads)
    steppers = []
    for row in rows:
        tx = row.build(labels)
        own = jax.tree.map(jnp.copy, params)
        state = (own, tx.init(own))
        steppers.append(
            Stepper(row.name, make_optimizer_step(tx), state, (even,), alternate=(odd,))
        )
    return steppers


def bench_model(
    model: str, reps: int, warmup: int, min_rep_s: float, smoke: bool = False
) -> Table:
    shapes = param_shapes(model, 10)
    labels = riemax.labels_by_rule(shapes)
    n_manifold = sum(1 for x in jax.tree.leaves(labels) if x == riemax.MANIFOLD)
    bases = baseline_rows()
    if smoke:  # each kind of row once: a hybrid, a whole-tree one and a wrapper
        cands = candidate_rows(
            omega_zero=False, whole_tree=False, names=("sgdg",)
        ) + candidate_rows(names=("adamp", "rotational-sgdm"))
    else:
        cands = candidate_rows() + candidate_rows(names=FIELD)
    print(f"{model}: {count_params(shapes):,} params, {len(bases) + len(cands)} rows")
    steppers = make_steppers(shapes, bases + cands)
    time_interleaved(steppers, reps=reps, warmup=warmup, min_rep_s=min_rep_s)
    check_finite(steppers)
    by_name = {s.name: s for s in steppers}
    base_of = {row.baseline: by_name[row.name] for row in bases}

    table = Table(
        f"Optimizer step, {model} ({count_params(shapes) / 1e6:.2f}M params, "
        f"{n_manifold} manifold kernels)",
        ["row", "ms/step", "baseline", "baseline ms", "ratio", "per-rep ratio range"],
    )
    for row in cands:
        cand, base = by_name[row.name], base_of[row.baseline]
        lo, hi = ratio_range(cand, base)
        ratio = cand.median / base.median
        table.add(
            [
                row.name,
                cand.median * 1e3,
                f"{row.baseline} (optax)",
                base.median * 1e3,
                ratio,
                f"{lo:.2f}..{hi:.2f}",
            ],
            ratio,
        )
    table.notes += [
        f"Baselines on the whole tree: sgd = {BASELINE_DESCRIPTION['sgd']}, "
        f"adam = {BASELINE_DESCRIPTION['adam']}. Median of {reps} interleaved reps "
        f"({', '.join(f'{s.name}: {s.inner}' for s in steppers)} steps per rep).",
        f"Orthogonality penalty (omega > 0): {gram_gflop(shapes, labels):.2f} GFLOP "
        "of Gram matmuls per step.",
    ]
    return table


def main(argv: Sequence[str] | None = None) -> list[Table]:
    args = parse_args(
        argv,
        __doc__,
        reps=7,
        extra=lambda p: p.add_argument(
            "--models", default=None, help=f"comma-separated (default {DEFAULT_MODELS})"
        ),
    )
    models = (args.models or (SMOKE_MODELS if args.smoke else DEFAULT_MODELS)).split(
        ","
    )
    min_rep_s = 0.0 if args.smoke else 0.25
    print(
        machine_header(
            "benchmarks.optimizer_step",
            {"models": ",".join(models), "reps": args.reps, "smoke": args.smoke},
        ),
        flush=True,
    )
    tables = [
        bench_model(m, args.reps, args.warmup, min_rep_s, args.smoke) for m in models
    ]
    print_tables(tables)
    return tables


if __name__ == "__main__":
    main()
