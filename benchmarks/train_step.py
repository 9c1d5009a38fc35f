"""Full training step: riemax hybrids vs Nesterov SGD, and ENorm vs momentum SGD.

One step (:func:`make_train_step`, used by every row and by
:mod:`benchmarks.compile_memory`): forward of the Flax NNX net in train mode (BatchNorm
batch statistics, updated running averages), softmax cross-entropy, backward,
``tx.update`` + ``optax.apply_updates`` and, for the ENorm row, ``riemax.apply_enorm``
right after. Jitted with the state (params, BN statistics, optimizer state) donated;
one fixed random CIFAR-shaped batch (``N x 32 x 32 x 3``, 10 classes). Parameters are
drawn with NumPy from the shapes of ``experiments.models.build_model`` (He-normal
kernels, see :func:`fill`) instead of the models' initialisers, which only costs
start-up time.

Tables:

- WRN-16-4 and ResNet-20 at batch 128: ``<opt> (hybrid)`` (same hybrids as
  :mod:`benchmarks.optimizer_step`: manifold = ``riemax.labels_by_rule``, Euclidean =
  ``add_decayed_weights(5e-4)`` + Nesterov SGD) for ``sgdg``, ``adamg``,
  ``adamsrt``, ``sgdmrt``, each against ``optax.sgd(0.1, momentum=0.9,
  nesterov=True)`` on every parameter. ``sgdg``/``adamg`` start from unit-norm
  manifold kernels (RBN).
- ENorm: the ENorm paper's fully convolutional CIFAR-10 model (``enorm-conv``, 28x28
  crops as in the paper, batch 128): ``optax.sgd(0.1, momentum=0.9)`` followed by
  ``riemax.apply_enorm`` on its nine convs (``riemax.kernel_chain`` in call order:
  3 -> 128 -> 128 -> 128 -> 256 -> 256 -> 256 -> 320 -> 320 -> 10, a genuine chain of
  matching widths; momentum buffers rescaled too), against the same step without
  ENorm. The ResNets are not used for ENorm: their call order is not a chain
  (residual sums, 1x1 shortcuts), and a sub-chain would only measure a few kernels.

Rows of a table are timed interleaved in one process; a WRN-16-4 step at batch 128
takes seconds on a CPU, hence few repetitions by default.

Run::

  python -m benchmarks.train_step [--smoke] [--reps 3] [--batch 128]
      [--models wrn-16-4,resnet20,enorm]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import riemax
from benchmarks._common import (
    Stepper,
    Table,
    baseline_tx,
    candidate_rows,
    check_finite,
    machine_header,
    normalize_manifold,
    parse_args,
    print_tables,
    ratio_range,
    time_interleaved,
)
from experiments.models import build_model, count_params

DEFAULT_MODELS = "wrn-16-4,resnet20,enorm"
SMOKE_MODELS = "wrn-10-1,enorm"
ENORM_MODEL = "enorm-conv"
ENORM_INPUT = (28, 28, 3)
CIFAR_INPUT = (32, 32, 3)
NUM_CLASSES = 10
ENORM_SGD_LR = 0.1


def make_train_step(
    graphdef: Any, tx: optax.GradientTransformation, enorm_paths: Sequence[str] = ()
) -> Callable:
    """The (unjitted) train step ``(state, x, y) -> (state, loss)`` with
    ``state = (params, batch_stats, opt_state)`` as pure dicts."""

    def loss_fn(params, batch_stats, x, y):
        net = nnx.merge(graphdef, params, batch_stats)
        net.train()
        logits = net(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, nnx.to_pure_dict(nnx.state(net, nnx.BatchStat))

    def train_step(state, x, y):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if enorm_paths:
            params, opt_state = riemax.apply_enorm(params, opt_state, enorm_paths)
        return (params, batch_stats, opt_state), loss

    return train_step


def abstract_model(name: str, input_shape: Sequence[int] = CIFAR_INPUT):
    """``(graphdef, params, batch_stats, model)`` of a registered model, built with
    ``nnx.eval_shape``: ``jax.ShapeDtypeStruct`` leaves, nothing allocated."""
    model = nnx.eval_shape(
        lambda: build_model(
            name, NUM_CLASSES, rngs=nnx.Rngs(0), input_shape=input_shape
        )
    )
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats), model


def fill(tree: Any, seed: int = 0) -> Any:
    """Concrete values for an abstract params/BN-statistics tree, drawn with NumPy:
    kernels ``N(0, 2 / fan_in)`` (He), BN ``scale``/``var`` ones, everything else
    (biases, BN offsets and means) zeros. Same statistics as the models' own
    initialisers up to the truncation, which does not matter for timing; much
    cheaper than running them (each op compiles on first use)."""
    rng = np.random.default_rng(seed)

    def one(path, s):
        key = getattr(path[-1], "key", None)
        if key == "kernel":
            fan_in = math.prod(s.shape[:-1])
            w = rng.standard_normal(s.shape, dtype=np.float32)
            return jnp.asarray(w * np.float32(math.sqrt(2.0 / fan_in)), s.dtype)
        if key in ("scale", "var"):
            return jnp.ones(s.shape, s.dtype)
        return jnp.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(one, tree)


def init_model(name: str, input_shape: Sequence[int], seed: int = 0):
    """``(graphdef, params, batch_stats, abstract model)`` with :func:`fill`-ed
    values."""
    graphdef, params, stats, model = abstract_model(name, input_shape)
    return graphdef, fill(params, seed), fill(stats, seed + 1), model


def random_batch(batch: int, input_shape: Sequence[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, *input_shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)
    return x, y


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def train_stepper(
    name: str,
    graphdef: Any,
    params: Any,
    stats: Any,
    tx: optax.GradientTransformation,
    batch: tuple[Any, Any],
    enorm_paths: Sequence[str] = (),
) -> Stepper:
    own = _copy(params)
    state = (own, _copy(stats), tx.init(own))
    fn = jax.jit(make_train_step(graphdef, tx, enorm_paths), donate_argnums=0)
    return Stepper(name, fn, state, batch)


def _table(title: str, steppers: list[Stepper], base: Stepper, reps: int) -> Table:
    table = Table(
        title,
        [
            "row",
            "s/step",
            "baseline",
            "baseline s",
            "ratio",
            "per-rep ratio range",
            "ratio of fastest reps",
        ],
    )
    for s in steppers:
        if s is base:
            continue
        lo, hi = ratio_range(s, base)
        ratio = s.median / base.median
        fastest = min(s.times) / min(base.times)
        table.add(
            [
                s.name,
                s.median,
                base.name,
                base.median,
                ratio,
                f"{lo:.2f}..{hi:.2f}",
                fastest,
            ],
            ratio,
        )
    losses = ", ".join(f"{s.name}: {float(s.aux):.3f}" for s in steppers)
    table.notes.append(
        f"Median of {reps} interleaved reps; load on the machine only adds time, so "
        "the ratio of the fastest reps is the least noisy estimate. Loss after the "
        f"last step: {losses}."
    )
    return table


def bench_resnet(model: str, batch: int, reps: int, warmup: int) -> Table:
    graphdef, params, stats, _ = init_model(model, CIFAR_INPUT)
    labels = riemax.labels_by_rule(params)
    data = random_batch(batch, CIFAR_INPUT)
    base = train_stepper(
        "sgd (optax)", graphdef, params, stats, baseline_tx("sgd"), data
    )
    steppers = [base]
    for row in candidate_rows(omega_zero=False, whole_tree=False):
        start = params
        if row.name.startswith(("sgdg", "adamg")):
            start = normalize_manifold(params, labels)
        steppers.append(
            train_stepper(row.name, graphdef, start, stats, row.build(labels), data)
        )
    print(f"{model}: {count_params(params):,} params, batch {batch}", flush=True)
    time_interleaved(steppers, reps=reps, warmup=warmup)
    check_finite(steppers)
    table = _table(
        f"Train step, {model} ({count_params(params) / 1e6:.2f}M params), "
        f"batch {batch}x{'x'.join(map(str, CIFAR_INPUT))}",
        steppers,
        base,
        reps,
    )
    table.notes.append(
        "Baseline: optax.sgd(0.1, momentum=0.9, nesterov=True) on every parameter."
    )
    return table


def bench_enorm(batch: int, reps: int, warmup: int) -> Table:
    graphdef, params, stats, model = init_model(ENORM_MODEL, ENORM_INPUT)
    paths = riemax.kernel_chain(model, jnp.zeros((1, *ENORM_INPUT)))
    data = random_batch(batch, ENORM_INPUT)
    tx = optax.sgd(ENORM_SGD_LR, momentum=0.9)
    base = train_stepper("sgd momentum (optax)", graphdef, params, stats, tx, data)
    enorm = train_stepper(
        "sgd momentum + apply_enorm", graphdef, params, stats, tx, data, paths
    )
    print(f"{ENORM_MODEL}: {count_params(params):,} params, batch {batch}", flush=True)
    time_interleaved([base, enorm], reps=reps, warmup=warmup)
    check_finite([base, enorm])
    table = _table(
        f"Train step with ENorm, {ENORM_MODEL} ({count_params(params) / 1e6:.2f}M "
        f"params), batch {batch}x{'x'.join(map(str, ENORM_INPUT))}",
        [base, enorm],
        base,
        reps,
    )
    chain = " -> ".join(p.split("/")[0] for p in paths)
    table.notes.append(
        f"Both: optax.sgd({ENORM_SGD_LR}, momentum=0.9). ENorm chain "
        f"({len(paths)} kernels, call order): {chain}."
    )
    return table


def main(argv: Sequence[str] | None = None) -> list[Table]:
    def extra(p):
        p.add_argument("--batch", type=int, default=None, help="batch (default 128)")
        p.add_argument(
            "--models",
            default=None,
            help=f"comma-separated names and/or 'enorm' (default {DEFAULT_MODELS})",
        )

    args = parse_args(argv, __doc__, reps=3, extra=extra)
    batch = args.batch or (4 if args.smoke else 128)
    models = (args.models or (SMOKE_MODELS if args.smoke else DEFAULT_MODELS)).split(
        ","
    )
    print(
        machine_header(
            "benchmarks.train_step",
            {
                "models": ",".join(models),
                "batch": batch,
                "reps": args.reps,
                "smoke": args.smoke,
            },
        ),
        flush=True,
    )
    tables = []
    for m in models:
        if m == "enorm":
            tables.append(bench_enorm(batch, args.reps, args.warmup))
        else:
            tables.append(bench_resnet(m, batch, args.reps, args.warmup))
    print_tables(tables)
    return tables


if __name__ == "__main__":
    main()
