"""The runner's train step against a hand-written Flax NNX + optax step on the
same model, optimizer and batch: what the runner's loop costs on top.

The runner's step (``experiments.train``: ``Trainer.train_step``, one
``jax.pmap`` over one device, or ``jax.jit`` with ``--parallel=sharded``) does
what a training step must (normalisation, forward in train mode, cross-entropy,
backward, ``tx.update``, ``optax.apply_updates``, the new BatchNorm statistics)
and, for its logs, the loss, the error, the learning rates and the per-unit
norms and angles of :mod:`riemax.diagnostics`. The hand-written step is the
plain functional NNX loop: ``nnx.split`` once, then a ``jax.jit`` of
``nnx.merge`` -> ``jax.value_and_grad`` of the mean cross-entropy ->
``tx.update`` -> ``optax.apply_updates``, with the state donated. Both use the
runner's own model (``trainer.build``) and optimizer (``trainer.tx``: the
same labels, schedule and weight decay) on one fixed batch, normalised the same
way; they are timed interleaved in one process (:func:`_common.time_interleaved`)
and the ratio is runner / hand-written (target: at most 1.05).

Rows: the recipe for new data (``vgg-small-gap`` on 32x32x3, batch 128) and the
digits job (``vgg-small`` on 8x8, batch 64, where a step is short and any
per-step overhead shows), each with ``sgdg`` (two learning rates, unit-norm
manifold kernels) and ``sgd``.

Run::

  python -m benchmarks.loop_overhead [--smoke] [--reps 7]
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import image_sets
from benchmarks._common import (
    Stepper,
    Table,
    check_finite,
    machine_header,
    parse_args,
    print_tables,
    time_interleaved,
)


def hand_written_step(trainer, host_state):
    """The plain NNX + optax step on the runner's model and optimizer, and its
    initial state ``(params, batch_stats, opt_state)`` (the runner's values)."""
    model = trainer.build(0)
    graphdef, _, _, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    tx = trainer.tx

    def step(state, x, y):
        params, stats, opt_state = state

        def loss_fn(p):
            net = nnx.merge(graphdef, p, stats, rest)
            net.train()
            logits = net(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, nnx.to_pure_dict(nnx.state(net, nnx.BatchStat))

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, new_stats, opt_state), loss

    state = jax.device_put(
        (host_state["params"], host_state["batch_stats"], host_state["opt_state"])
    )
    return jax.jit(step, donate_argnums=(0,)), state


def rows(smoke: bool, folder: str) -> list[tuple[str, dict]]:
    shapes = image_sets.write_set(
        "shapes32", os.path.join(folder, "shapes32.npz"), 256, 64
    )
    batch = 16 if smoke else 128
    out = []
    for opt in ("sgdg", "sgd"):
        base = {"optimizer": opt, "progress": False, "steps": 10}
        out.append(
            (
                f"vgg-small-gap 32x32x3, batch {batch}, {opt}",
                base | {"dataset": f"npz:{shapes}", "batch_size": batch},
            )
        )
        out.append(
            (
                f"vgg-small 8x8x1 (digits), batch {16 if smoke else 64}, {opt}",
                base | {"dataset": "digits", "batch_size": 16 if smoke else 64},
            )
        )
    if smoke:
        for _, cfg in out:
            cfg |= {"widths": [4, 8], "convs_per_stage": 1}
        return out[:1]
    return out


def main(argv: Sequence[str] | None = None):
    from experiments import train

    args = parse_args(argv, __doc__.split("\n\n")[0], reps=7)
    table = Table(
        "Runner's train step / hand-written NNX + optax step (same model, optimizer, "
        "batch)",
        ["model, batch, optimizer", "runner ms", "hand-written ms", "ratio"],
    )
    with tempfile.TemporaryDirectory() as folder:
        for title, cfg_in in rows(args.smoke, folder):
            cfg, dataset, trainer = train.prepare_run(cfg_in)
            host = trainer.init_host_state()
            dev = trainer.dev
            idx = np.arange(cfg["batch_size"])
            xb, yb = dataset.x_train[idx], dataset.y_train[idx]
            runner = Stepper(
                "runner", trainer.train_step, dev.put_state(host), dev.put_batch(xb, yb)
            )
            x = (xb.astype(np.float32) - trainer.norm_mean) / trainer.norm_std
            step, state = hand_written_step(trainer, host)
            plain = Stepper(
                "hand-written", step, state, (jnp.asarray(x), jnp.asarray(yb))
            )
            steppers = [runner, plain]
            time_interleaved(
                steppers,
                reps=args.reps,
                warmup=args.warmup,
                min_rep_s=0.0 if args.smoke else 0.5,
            )
            check_finite(steppers)
            ratio = runner.median / plain.median
            table.add([title, 1e3 * runner.median, 1e3 * plain.median, ratio], ratio)
    table.notes.append(
        "Medians over interleaved repetitions; the runner's step also computes "
        "its logged values (loss, error, learning rates, per-unit norms and "
        "angles) and runs under jax.pmap over one device."
    )
    print(machine_header("Loop overhead", {"reps": args.reps}))
    print_tables([table])
    return [table]


if __name__ == "__main__":
    main()
