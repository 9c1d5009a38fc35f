"""A fair comparison of optimizers (``--task=compare``).

For each optimizer, each multiplier of its default learning rate(s) in
``lr_grid`` (both rates of a hybrid are scaled together) and each seed, one run of
the base config trains on the training split minus a validation split carved
from it (``val_size``; the test split is never used to choose). The multiplier
with the lowest median validation error is the optimizer's; the table reports
the median (over seeds) test error of the runs at that learning rate, with the
per-seed values, and the command that reproduces it. Every run is an ordinary
workdir under ``workdir/OPTIMIZER/lrMULT/seedS`` (an interrupted comparison
resumes where it stopped).

A run that diverged (a non-finite loss, or a divergence warning of
:mod:`experiments.monitor`: training loss still at chance after its first epoch,
or grown 10x) is stopped there (``stop_diverged``, unless the command line sets
it), and a multiplier with a diverged seed is never chosen: the learning rate is
picked among the multipliers whose runs all trained, and the table names the
diverged ones. An optimizer that diverged at every multiplier is marked so.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

from experiments import config as config_lib
from experiments import optimizers as opt_lib
from experiments.config import ConfigError


def compare(
    cfg: dict[str, Any],
    workdir: str,
    *,
    optimizers: list[str],
    seeds: int,
    lr_grid: list[float],
    command: str | None = None,
) -> dict[str, Any]:
    from experiments import train

    check_arguments(optimizers, seeds, lr_grid, cfg)
    base = {k: v for k, v in cfg.items() if k != "optimizer"} | {"progress": False}
    if base.get("stop_diverged") is None:
        base["stop_diverged"] = True
    resolved = config_lib.resolve(base | {"optimizer": optimizers[0]})
    if not resolved["val_size"]:
        raise ConfigError(
            "compare chooses the learning rate on a validation split carved from "
            "train: give --val_size (examples, or a fraction)"
        )

    rows = []
    for name in optimizers:
        entry = opt_lib.lookup(name)
        defaults = opt_lib.resolve_hyper(name, {})
        by_mult = []
        for mult in lr_grid:
            lrs = {"lr": defaults["lr"] * mult}
            if entry.lr_manifold is not None:
                lrs["lr_manifold"] = defaults["lr_manifold"] * mult
            runs = []
            for seed in range(seeds):
                sub = os.path.join(workdir, name, f"lr{mult:g}", f"seed{seed}")
                train.status(f"compare: {name} lr x{mult:g} seed {seed} in {sub}")
                runs.append(
                    _run(train, base | {"optimizer": name, "seed": seed} | lrs, sub)
                )
            by_mult.append(
                {
                    "mult": mult,
                    **lrs,
                    "val_errors": [r.get("val_error") for r in runs],
                    "test_errors": [r.get("test_error") for r in runs],
                    "diverged": [r.get("diverged") for r in runs],
                }
            )
        trained = [m for m in by_mult if not any(m["diverged"])]
        best = (
            min(trained, key=lambda m: statistics.median(m["val_errors"]))
            if trained
            else None
        )
        rows.append({"optimizer": name, "grid": by_mult, "chosen": best})

    table = _markdown(rows, resolved, seeds, lr_grid, command)
    result = {"rows": rows, "table": table, "command": command}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "compare.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(workdir, "compare.md"), "w") as f:
        f.write(table + "\n")
    train.status("comparison:\n" + table)
    return {"table": table, "compare_json": os.path.join(workdir, "compare.json")}


def check_arguments(
    optimizers: list[str], seeds: int, lr_grid: list[float], cfg: dict[str, Any]
) -> None:
    """Raises :class:`ConfigError` for a bad grid (no JAX needed)."""
    if not optimizers:
        raise ConfigError("--optimizers is empty")
    for name in optimizers:
        if name not in opt_lib.OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {name!r}; valid optimizers: "
                + ", ".join(opt_lib.OPTIMIZERS)
            )
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if not lr_grid or min(lr_grid) <= 0:
        raise ConfigError(f"--lr_grid needs positive multipliers, got {lr_grid}")
    given = sorted(k for k in opt_lib.HYPER_KEYS if cfg.get(k) is not None)
    if given:
        raise ConfigError(
            "compare runs each optimizer at its default hyper-parameters times "
            f"--lr_grid; drop {', '.join('--' + k for k in given)}"
        )


def _run(train, cfg: dict[str, Any], workdir: str) -> dict[str, Any]:
    """One run of the grid; a non-finite loss marks it diverged instead of
    ending the comparison."""
    try:
        return train.train_and_evaluate(cfg, workdir)
    except train.TrainingDiverged as e:
        train.status(f"compare: diverged ({e})")
        return {"diverged": "non-finite", "warning": str(e)}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _diverged(grid: list[dict[str, Any]]) -> str:
    """``x4 (3/3 seeds), x2 (1/3)``: the multipliers with diverged runs."""
    parts = []
    for m in grid:
        n = sum(1 for d in m["diverged"] if d)
        if n:
            parts.append(f"x{m['mult']:g} ({n}/{len(m['diverged'])})")
    return ", ".join(parts) or "none"


def _markdown(rows, cfg, seeds, grid, command) -> str:
    lines = [
        f"| optimizer | lr (best on val) | median val error % | median test error % "
        f"({seeds} seed{'' if seeds == 1 else 's'}) | test error % per seed | "
        "diverged (seeds) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = row["chosen"]
        diverged = _diverged(row["grid"])
        if c is None:
            lines.append(
                f"| {row['optimizer']} | diverged at every learning rate | - | - | "
                f"- | {diverged} |"
            )
            continue
        lr = f"{c['lr']:g}"
        if "lr_manifold" in c:
            lr += f" / manifold {c['lr_manifold']:g}"
        lines.append(
            f"| {row['optimizer']} | {lr} (x{c['mult']:g}) | "
            f"{_pct(statistics.median(c['val_errors']))} | "
            f"{_pct(statistics.median(c['test_errors']))} | "
            + ", ".join(_pct(e) for e in c["test_errors"])
            + f" | {diverged} |"
        )
    lines.append("")
    lines.append(
        f"{cfg['dataset']}, model {cfg['model']}, {cfg.get('steps') or ''} steps of "
        f"{cfg['batch_size']}, train_size {cfg['train_size']}, val_size "
        f"{cfg['val_size']} (carved from train), learning-rate multipliers "
        f"{', '.join(f'{g:g}' for g in grid)} of each optimizer's defaults."
    )
    if command:
        lines.append(f"Reproduce: `{command}`")
    return "\n".join(lines)
