"""N devices against one: what the runner's data-parallel step computes, measured.

The runner's train step (``experiments.train``: one ``jax.pmap`` over the local
devices, or one ``jax.jit`` on a 1-D mesh with ``--parallel=sharded``) on N CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set by this
script for a child process) against the same step on one device: the same
config, the same initial state, the same batches. Three figures per mode:

- **one step** from the same state (the one-device state copied onto the N
  devices before every step): the largest difference of a parameter, a
  BatchNorm statistic or the loss after that step, relative to the largest
  magnitude of its leaf (max over the leaves and over the first ``--steps``
  steps). This is the summation order of the reductions (the global batch is
  split, and the per-device gradients and BatchNorm moments are averaged).
- **after K steps**: the two runs trained apart for ``--steps`` steps, the same
  relative difference of their parameters; the per-step differences compound.
- **a full run**: ``train_and_evaluate`` of the digits recipe for ``--run_steps``
  steps on one device and on N; the final test loss and error of each.

Run::

  python -m benchmarks.devices [--smoke] [--devices 2] [--steps 20]
      [--run_steps 300] [--modes pmap,sharded]

The ratio of a row is the one-step gap over float32's epsilon.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The model and batch of the step comparison: the digits recipe's model and
#: batch (``vgg-small``, widths 32, 64; batch 64), or a tiny one with --smoke.
FULL = {"dataset": "digits", "progress": False}
SMOKE = FULL | {"widths": [4, 8], "convs_per_stage": 1, "batch_size": 16}


def _gap(a: Any, b: Any) -> float:
    """max over the leaves of ``max|a - b| / max|a|`` (a leaf of zeros: absolute)."""
    import jax
    import numpy as np

    gaps = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = float(np.abs(x).max()) if x.size else 0.0
        gaps.append(float(np.abs(x - y).max()) / (scale or 1.0) if x.size else 0.0)
    return max(gaps)


def step_gaps(config: dict[str, Any], n: int, steps: int) -> dict[str, float]:
    """In a process with at least ``n`` local devices: the one-step and the
    after-``steps`` gaps (see the module docstring) of ``config`` on ``n``
    devices against one."""
    import jax
    import numpy as np

    from experiments import data, train

    _, dataset, one = train.prepare_run(config | {"num_devices": 1})
    cfg, _, many = train.prepare_run(config | {"num_devices": n})
    order = data.BatchOrder(len(dataset.y_train), cfg["batch_size"], cfg["seed"])
    host = one.init_host_state()
    s1, sn = one.dev.put_state(host), many.dev.put_state(host)
    worst = {"params": 0.0, "batch_stats": 0.0, "loss": 0.0}
    for step in range(steps):
        idx = order(step)
        x, y = dataset.x_train[idx], dataset.y_train[idx]
        same = many.dev.put_state(one.dev.get(s1))
        s1, m1 = one.train_step(s1, *one.dev.put_batch(x, y))
        same, m_same = many.train_step(same, *many.dev.put_batch(x, y))
        sn, _ = many.train_step(sn, *many.dev.put_batch(x, y))
        a, b = one.dev.get(s1), many.dev.get(same)
        for key in ("params", "batch_stats"):
            worst[key] = max(worst[key], _gap(a[key], b[key]))
        loss = (np.float64(one.dev.get(m1)["loss"]), many.dev.get(m_same)["loss"])
        worst["loss"] = max(worst["loss"], _gap(*loss))
    apart = _gap(one.dev.get(s1)["params"], many.dev.get(sn)["params"])
    eps = float(jax.numpy.finfo(jax.numpy.float32).eps)
    return {f"step_{k}": v for k, v in worst.items()} | {"apart": apart, "eps": eps}


def full_runs(config: dict[str, Any], n: int, workdir: str) -> dict[str, Any]:
    """``train_and_evaluate`` of ``config`` on one device and on ``n``."""
    from experiments import train

    out = {}
    for k in (1, n):
        r = train.train_and_evaluate(
            config | {"num_devices": k}, os.path.join(workdir, f"d{k}")
        )
        out[k] = {key: r[key] for key in ("test_loss", "test_error", "train_loss")}
    return out


def _child(args: argparse.Namespace) -> None:
    base = SMOKE if args.smoke else FULL
    results: dict[str, Any] = {}
    for mode in args.modes.split(","):
        config = base | {"parallel": mode}
        results[mode] = step_gaps(config, args.devices, args.steps)
        if args.run_steps:
            with tempfile.TemporaryDirectory() as tmp:
                results[mode]["runs"] = full_runs(
                    config | {"steps": args.run_steps}, args.devices, tmp
                )
    print("RESULT " + json.dumps(results), flush=True)


def run_child(argv: Sequence[str], devices: int, timeout: float = 3600) -> dict:
    """This script's measurement in a child process with ``devices`` forced
    host devices; its result."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.devices", "--child", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"the child failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps")
    p.add_argument("--devices", type=int, default=2, help="N forced host devices")
    p.add_argument("--steps", type=int, default=None, help="compared steps (20)")
    p.add_argument(
        "--run_steps", type=int, default=None, help="full-run steps (300; 0: none)"
    )
    p.add_argument("--modes", default="pmap,sharded")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.steps is None:
        args.steps = 3 if args.smoke else 20
    if args.run_steps is None:
        args.run_steps = 0 if args.smoke else 300
    return args


def main(argv: Sequence[str] | None = None):
    args = _parse(argv)
    if args.child:
        return _child(args)
    from benchmarks import _common

    forwarded = [f"--steps={args.steps}", f"--run_steps={args.run_steps}"]
    forwarded += [f"--modes={args.modes}", f"--devices={args.devices}"]
    results = run_child(forwarded + (["--smoke"] if args.smoke else []), args.devices)
    n = args.devices
    model = "widths 4, 8; batch 16" if args.smoke else "vgg-small; batch 64"
    print(_common.machine_header(f"{n} devices against one (digits, {model})"))
    table = _common.Table(
        f"Largest relative difference, {n} devices vs 1",
        [
            "mode",
            f"one step: params (max of {args.steps})",
            "one step: BatchNorm stats",
            "one step: loss",
            f"params after {args.steps} steps apart",
            "one step / float32 eps",
        ],
    )
    for mode, r in results.items():
        ratio = r["step_params"] / r["eps"]
        table.add(
            [
                mode,
                f"{r['step_params']:.2e}",
                f"{r['step_batch_stats']:.2e}",
                f"{r['step_loss']:.2e}",
                f"{r['apart']:.2e}",
                f"{ratio:.1f}",
            ],
            max(ratio, 1e-9),
        )
        if "runs" in r:
            one, many = r["runs"]["1"], r["runs"][str(n)]
            table.notes.append(
                f"{mode}, {args.run_steps} steps: test loss {one['test_loss']:.4f} "
                f"(1 device) vs {many['test_loss']:.4f} ({n}); test error "
                f"{100 * one['test_error']:.2f} % vs {100 * many['test_error']:.2f} %"
                f"; last training loss {one['train_loss']:.4f} vs "
                f"{many['train_loss']:.4f}"
            )
    _common.print_tables([table])
    return [table]


if __name__ == "__main__":
    main()
