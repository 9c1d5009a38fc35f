"""Compile time of the jitted train step and optimizer-state memory, riemax vs optax.

Compile time: wall time of ``jax.jit(train_step).lower(...)`` (tracing + lowering to
StableHLO) and of ``.compile()`` (XLA) for the train step of
:func:`benchmarks.train_step.make_train_step` (the one every train-step row uses),
lowered on abstract inputs (nothing allocated). Models: ResNet-20 and WRN-16-4 at
batch 128. Rows: the four hybrids (``riemax.labels_by_rule`` labels; Euclidean half
``add_decayed_weights(5e-4)`` + Nesterov SGD) against ``optax.sgd(0.1, momentum=0.9,
nesterov=True)`` (SGD-like rows) or ``optax.adam(1e-3)`` (Adam-like rows) on the whole
tree. ``jax.clear_caches()`` before every lowering; repetitions interleaved (ABBA),
median reported.

Each row also counts the fused loops of the compiled step (XLA fusions, every
branch included) and how many of them differ: loops that differ only in their
names compile to one kernel, and on CPU compile time follows that second count.

Memory: total bytes of the optimizer state's arrays (``sum(x.nbytes)``, from
``jax.eval_shape(tx.init, shapes)``, nothing allocated) on the WRN-28-10 and ResNet-20
parameter trees:

- ``<opt> on manifold kernels``: the riemax optimizer alone on the kernels that
  ``labels_by_rule`` selects, vs its Euclidean counterpart on the same kernels
  (``optax.sgd(momentum=0.9)`` for SGD-G / SGD-MRT, ``optax.adam`` for Adam-G /
  AdamSRT). Expected: SGD-G = one momentum buffer + a few scalars (ratio ~1); Adam-G =
  one full first moment + one second moment per unit (ratio ~1/2).
- ``<opt> (hybrid)`` on the whole tree vs the baseline on the whole tree.

Run::

  python -m benchmarks.compile_memory [--smoke] [--reps 2] [--batch 128]

``--smoke``: WRN-10-1 for both parts, compile rows ``sgd`` and ``sgdg`` only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import jax
import optax

import riemax
from benchmarks._common import (
    BASELINE_OF,
    Table,
    baseline_rows,
    baseline_tx,
    candidate_rows,
    compiled_afresh,
    fused_loops,
    machine_header,
    manifold_tx,
    parse_args,
    print_tables,
    tree_arrays,
    tree_bytes,
)
from benchmarks.train_step import (
    CIFAR_INPUT,
    NUM_CLASSES,
    abstract_model,
    make_train_step,
)
from experiments.models import count_params, param_shapes

COMPILE_MODELS = ("resnet20", "wrn-16-4")
MEMORY_MODELS = ("wrn-28-10", "resnet20")
SMOKE_MODELS = ("wrn-10-1",)
MiB = 2**20


def compile_table(model: str, batch: int, reps: int, smoke: bool = False) -> Table:
    graphdef, params, stats, _ = abstract_model(model)
    labels = riemax.labels_by_rule(params)
    x = jax.ShapeDtypeStruct((batch, *CIFAR_INPUT), jax.numpy.float32)
    y = jax.ShapeDtypeStruct((batch,), jax.numpy.int32)
    if smoke:  # the other train steps compile in benchmarks.train_step's smoke
        bases = baseline_rows(("sgd",))
        cands = candidate_rows(omega_zero=False, whole_tree=False, names=("sgdg",))
    else:
        bases = baseline_rows()
        cands = candidate_rows(omega_zero=False, whole_tree=False)
    rows = bases + cands
    lower_s = {r.name: [] for r in rows}
    compile_s = {r.name: [] for r in rows}
    loops: dict[str, tuple[int, int]] = {}
    print(f"{model}: compiling {len(rows)} train steps x {reps} reps", flush=True)
    for rep in range(reps):
        for row in rows if rep % 2 == 0 else rows[::-1]:
            jax.clear_caches()
            tx = row.build(labels)
            state = (params, stats, jax.eval_shape(tx.init, params))
            fn = jax.jit(make_train_step(graphdef, tx), donate_argnums=0)
            with compiled_afresh():
                t0 = time.perf_counter()
                lowered = fn.lower(state, x, y)
                t1 = time.perf_counter()
                compiled = lowered.compile()
                t2 = time.perf_counter()
            loops[row.name] = fused_loops(compiled.as_text())
            lower_s[row.name].append(t1 - t0)
            compile_s[row.name].append(t2 - t1)
            print(
                f"  {row.name}: lower {t1 - t0:.2f}s, compile {t2 - t1:.2f}s",
                flush=True,
            )
    jax.clear_caches()

    table = Table(
        f"Compile time of the train step, {model} ({count_params(params) / 1e6:.2f}M "
        f"params), batch {batch}",
        [
            "row",
            "lower s",
            "compile s",
            "total s",
            "baseline",
            "baseline total s",
            "ratio (total)",
            "ratio (compile)",
            "fused loops",
            "kernels",
        ],
    )
    base_name = {r.baseline: r.name for r in bases}
    for row in rows:
        lo = statistics.median(lower_s[row.name])
        co = statistics.median(compile_s[row.name])
        if row in bases:
            table.add([row.name, lo, co, lo + co, "-", "-", "-", "-", *loops[row.name]])
            continue
        b = base_name[row.baseline]
        blo, bco = statistics.median(lower_s[b]), statistics.median(compile_s[b])
        ratio = (lo + co) / (blo + bco)
        cells = [row.name, lo, co, lo + co, b, blo + bco, ratio, co / bco]
        table.add([*cells, *loops[row.name]], ratio)
    table.notes.append(
        f"Median of {reps} interleaved reps, jax.clear_caches() before each lowering. "
        "Fused loops: XLA fusions in the compiled step, every branch included; "
        "kernels: how many of them differ (equal ones compile to one kernel, and "
        "on CPU compile time follows this count)."
    )
    return table


def _manifold_only(shapes, labels):
    """The manifold leaves of ``shapes`` as a flat dict."""
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {
        jax.tree_util.keystr(path): leaf
        for (path, leaf), lab in zip(flat, jax.tree.leaves(labels), strict=True)
        if lab == riemax.MANIFOLD
    }


def memory_table(model: str) -> Table:
    shapes = param_shapes(model, NUM_CLASSES)
    labels = riemax.labels_by_rule(shapes)
    kernels = _manifold_only(shapes, labels)
    units = sum(s.shape[-1] for s in kernels.values())
    table = Table(
        f"Optimizer-state memory, {model} ({count_params(shapes) / 1e6:.2f}M params = "
        f"{tree_bytes(shapes) / MiB:.1f} MiB; manifold: {len(kernels)} kernels, "
        f"{count_params(kernels) / 1e6:.2f}M params, {units} units)",
        [
            "row",
            "state MiB",
            "state bytes",
            "arrays",
            "baseline",
            "baseline MiB",
            "baseline bytes",
            "ratio",
            "difference bytes",
        ],
    )

    def state_of(tx, tree):
        return jax.eval_shape(tx.init, tree)

    def add(name, tx, base_name, base_tx, tree):
        s, b = state_of(tx, tree), state_of(base_tx, tree)
        sb, bb = tree_bytes(s), tree_bytes(b)
        table.add(
            [
                name,
                sb / MiB,
                sb,
                tree_arrays(s),
                base_name,
                bb / MiB,
                bb,
                sb / bb,
                sb - bb,
            ],
            sb / bb,
        )

    euclid = {"sgd": optax.sgd(0.1, momentum=0.9), "adam": optax.adam(1e-3)}
    euclid_name = {"sgd": "optax.sgd(momentum=0.9)", "adam": "optax.adam"}
    for name in ("sgdg", "adamg", "adamsrt", "sgdmrt"):
        kind = BASELINE_OF[name]
        add(
            f"{name} on manifold kernels",
            manifold_tx(name),
            f"{euclid_name[kind]} on the same",
            euclid[kind],
            kernels,
        )
    for row in candidate_rows(omega_zero=False, whole_tree=False):
        add(
            f"{row.name}, whole tree",
            row.build(labels),
            f"{row.baseline} (optax), whole tree",
            baseline_tx(row.baseline),
            shapes,
        )
    table.notes.append(
        "Bytes of every array leaf of the state (float32 buffers, int32 counts)."
    )
    return table


def main(argv: Sequence[str] | None = None) -> list[Table]:
    def extra(p):
        p.add_argument("--batch", type=int, default=None, help="batch (default 128)")

    args = parse_args(argv, __doc__, reps=2, extra=extra)
    batch = args.batch or (4 if args.smoke else 128)
    compile_models = SMOKE_MODELS if args.smoke else COMPILE_MODELS
    memory_models = SMOKE_MODELS if args.smoke else MEMORY_MODELS
    print(
        machine_header(
            "benchmarks.compile_memory",
            {
                "compile": ",".join(compile_models),
                "memory": ",".join(memory_models),
                "batch": batch,
                "reps": args.reps,
                "smoke": args.smoke,
            },
        ),
        flush=True,
    )
    tables = [memory_table(m) for m in memory_models]
    tables += [compile_table(m, batch, args.reps, args.smoke) for m in compile_models]
    print_tables(tables)
    return tables


if __name__ == "__main__":
    main()
