r"""The runner's entry point, in the shape of the Flax examples: the flags, one
resolved config, then :func:`experiments.train.train_and_evaluate`.

A config is code (:mod:`experiments.configs`: ``get_config()`` in a file);
``--config`` names one and every flag overrides its values::

  python -m experiments.main --workdir=runs/wrn \
      --config=experiments/configs/rbn.py:cifar10-wrn-28-10-sgdg
  python -m experiments.main --config=smoke --workdir=/tmp/smoke --steps=8

``python -m experiments.cifar`` is this command under the name of the papers'
command lines (which run as written), ``python -m experiments.digits`` the same
on the offline digits; ``--help`` lists every flag, ``--list_presets`` the
papers' configs.

Tasks: ``train`` (default; resumes from the latest checkpoint in ``--workdir``),
``test``, ``compare``, ``plot``, ``prepare``. Bad input stops with one line and
exit status 2 before the workdir is touched (and before JAX is loaded); a
non-finite loss, or a run stopped by ``--stop_diverged``, with status 1.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Any

# Light modules only (no jax): the flags are checked before JAX is imported.
from experiments import config as config_lib
from experiments import configs, console, flags, monitor, tasks

PROG = "python -m experiments.main"

# The values of the one-line config summary, in this order.
_SUMMARY_KEYS = (
    "dataset",
    "model",
    "optimizer",
    "lr",
    "lr_manifold",
    "schedule",
    "warmup_epochs",
    "batch_size",
    "steps",
    "epochs",
    "seed",
)


def main(
    argv: list[str] | None = None, prog: str = PROG, defaults: dict | None = None
) -> dict[str, Any] | None:
    """Parses ``argv`` and runs the task; returns its result (also printed as one
    JSON line on stdout). ``defaults`` are the program's own config values
    (``experiments.digits``: the digits dataset), under the flags. Exits with
    status 2 on bad input, 1 on divergence, 130 when interrupted."""
    args = flags.build_parser(prog, defaults).parse_args(argv)
    args.command = shlex.join(
        [*prog.split(), *(sys.argv[1:] if argv is None else argv)]
    )
    if args.list_presets:
        for name in configs.names():
            print(f"{name:36s} {configs.describe(name)}")
        return None
    console.set_verbosity(args.verbosity)
    console.status(f"task {args.task}: resolving the config")
    try:
        result = _run(args, defaults)
    except ValueError as e:  # ConfigError, DataError: bad input
        if not _is_input_error(e):
            raise
        _fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        _fail(
            "interrupted; rerun the same command to resume from the last checkpoint",
            130,
        )
    except monitor.TrainingDiverged as e:
        _fail(f"error: {e}", 1)
    if result is not None:
        print(json.dumps(result, sort_keys=True, default=str), flush=True)
        stopped = [r for r in result.get("runs", [result]) if r.get("stopped_early")]
        if stopped:
            _fail(f"error: stopped early (stop_diverged): {stopped[0]['warning']}", 1)
    return result


def _run(args, defaults: dict | None) -> dict[str, Any] | None:
    given, spec, config = flags.command_config(args, defaults)
    if args.task == "prepare":
        return tasks.prepare(config)
    if args.task == "plot":
        return tasks.plot(args)
    if args.task == "test":
        return tasks.test(args, given)
    if spec:
        console.status(f"config {spec}: {configs.load(spec)[1]}")
    # The one resolution of the run: every value is checked here, before JAX
    # is imported (seconds), and train_and_evaluate gets the resolved config.
    resolved = config_lib.resolve(config)
    console.status(
        "config: "
        + ", ".join(f"{k} {resolved[k]}" for k in _SUMMARY_KEYS if resolved.get(k))
        + " (the rest: --verbosity=1, and config.json)"
    )
    console.status(
        "resolved config:\n" + json.dumps(resolved, indent=1, sort_keys=True), level=1
    )
    if args.task == "compare":  # each optimizer's runs are resolved on their own
        return tasks.compare(args, config)
    if args.workdir is None:
        raise config_lib.ConfigError("--workdir is required to train")
    if args.n_iter < 1:
        raise config_lib.ConfigError("--n_iter must be >= 1")
    multihost = None
    if resolved["multihost"]:
        multihost = {
            "coordinator_address": args.coordinator_address,
            "num_processes": args.num_processes,
            "process_id": args.process_id,
        }
    return tasks.train_seeds(resolved, args, multihost)


def _is_input_error(e: Exception) -> bool:
    from experiments.data import DataError

    return isinstance(e, (config_lib.ConfigError, DataError))


def _fail(message: str, status: int) -> None:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(status) from None


def run_as_command(entry=main) -> None:
    """``entry()`` as a command-line tool: a reader that closes the pipe early
    (``--list_presets | head -3``) ends the program quietly, with status 0."""
    try:
        entry()
        sys.stdout.flush()
    except BrokenPipeError:
        # Further writes to the closed pipe (at interpreter exit) go nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    run_as_command()
