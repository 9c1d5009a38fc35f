"""The runner's tasks other than one training run: several seeds
(``--n_iter``), ``--task=test``, ``compare``, ``plot`` and ``prepare``.

Each takes the parsed flags and a config; JAX is imported only by the tasks that
compute (the flags and the config are checked before).
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

from experiments import console
from experiments.keys import DEFAULT_CONFIG, RESUMABLE_KEYS, ConfigError

say = console.status


#: The cache's folder in a workdir (``--compile_cache=auto``).
COMPILE_CACHE = "compile_cache"


def compile_cache(args: argparse.Namespace) -> str | None:
    """Points JAX's persistent compilation cache where ``--compile_cache`` says
    and returns that folder (None: off). ``auto``: ``$JAX_COMPILATION_CACHE_DIR``
    where set, else ``WORKDIR/compile_cache``. JAX stores the programs that took
    at least its threshold to compile (1 s by default): the train and
    evaluation steps, not the small ones."""
    choice = getattr(args, "compile_cache", None) or "auto"
    path = None
    if choice == "auto":
        path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (
            None if args.workdir is None else os.path.join(args.workdir, COMPILE_CACHE)
        )
    elif choice != "none":
        path = choice
    if path is not None:
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(
                f"--compile_cache={choice}: {path} exists and is not a directory; "
                "pass a directory, or none"
            )
    import jax  # imports jax (seconds)
    from jax.experimental.compilation_cache import compilation_cache

    if jax.config.jax_compilation_cache_dir != path:
        # The cache opens its folder once per process: another run in this
        # process (the tests, a notebook) has to reopen it.
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
    return path


def train_seeds(
    cfg: dict[str, Any],
    args: argparse.Namespace,
    multihost: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``train_and_evaluate`` of a resolved config, or of ``--n_iter`` seeds
    (``seed``, ``seed + 1``, ... in ``WORKDIR/seed_K``) with the median, mean and
    std of their test errors."""
    from experiments import train  # imports jax (seconds)

    compile_cache(args)

    def run(config, workdir):
        return train.train_and_evaluate(
            config, workdir, overwrite=args.overwrite, multihost=multihost
        )

    if args.n_iter == 1:
        return run(cfg, args.workdir)
    seed0 = cfg["seed"]
    results = []
    for k in range(args.n_iter):
        sub = os.path.join(args.workdir, f"seed_{seed0 + k}")
        say(f"run {k + 1}/{args.n_iter}: seed {seed0 + k} in {sub}")
        results.append(run(cfg | {"seed": seed0 + k}, sub))
    summary: dict = {"runs": results}
    for key in ("test_error", "best_test_error"):
        values = [r[key] for r in results if key in r]
        if values:
            summary[f"{key}_median"] = statistics.median(values)
            summary[f"{key}_mean"] = statistics.fmean(values)
            summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def compare(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    """``--task=compare``: the optimizers of ``--optimizers`` over ``--lr_grid``
    and ``--seeds`` (:mod:`experiments.compare`), each resolved on its own."""
    if args.workdir is None:
        raise ConfigError("--workdir is required to compare")
    names = [x for x in args.optimizers.split(",") if x]
    try:
        grid = [float(x) for x in args.lr_grid.split(",") if x]
    except ValueError:
        raise ConfigError(
            f"--lr_grid must be comma-separated numbers, got {args.lr_grid!r}"
        ) from None
    from experiments import compare as compare_lib

    compare_lib.check_arguments(names, args.seeds, grid, cfg)
    compile_cache(args)
    return compare_lib.compare(
        cfg,
        args.workdir,
        optimizers=names,
        seeds=args.seeds,
        lr_grid=grid,
        command=args.command,
    )


def test(args: argparse.Namespace, given: dict[str, Any]) -> dict[str, Any]:
    """``--task=test``: the test error of a checkpoint with its saved config;
    of the flags, only those of the machine (devices, data dir, evaluation
    batch) apply."""
    if args.load is None:
        raise ConfigError("--task=test needs --load=WORKDIR_OR_CHECKPOINT")
    from experiments import train

    machine = {k: v for k, v in given.items() if k in RESUMABLE_KEYS}
    return train.evaluate_checkpoint(args.load, machine)


def plot(args: argparse.Namespace) -> dict[str, Any]:
    """``--task=plot``: the curves of ``--runs`` in one PNG."""
    if not args.runs:
        raise ConfigError("--task=plot needs --runs DIR [DIR ...]")
    from experiments import plots

    out = args.out or os.path.join(args.workdir or ".", "runs.png")
    return {"plot": plots.plot_runs(args.runs, out)}


def prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """``--task=prepare``: the tfds dataset as ArrayRecord files (downloads;
    needs TensorFlow)."""
    from experiments import data

    name = cfg.get("dataset", DEFAULT_CONFIG["dataset"])
    say(f"preparing {name} as ArrayRecord (downloads; needs TensorFlow)")
    where = data.prepare(name, cfg.get("data_dir"))
    say(f"prepared in {where}")
    return {"prepared": name, "data_dir": where}
