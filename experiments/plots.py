"""Train loss and test error of several runs in one figure (``--task=plot``).

Reads each run's ``metrics.jsonl`` (and ``config.json`` for the legend) and draws
the training loss (log scale) and the test error in % (linear scale; the
validation error dashed, where the run has a validation split) against epochs,
one colour per run, each line labelled with the run's folder, optimizer,
learning rate(s) and seed, like the papers' figures.
"""

from __future__ import annotations

import json
import os
from typing import Any

from experiments.config import ConfigError


def _read(run: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        raise ConfigError(f"--runs {run}: no metrics.jsonl there")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    cfg: dict[str, Any] = {}
    if os.path.exists(os.path.join(run, "config.json")):
        with open(os.path.join(run, "config.json")) as f:
            cfg = json.load(f)
    return records, cfg


def _x(rows: list[dict[str, Any]]) -> list[float]:
    return [r.get("epoch", r["step"]) for r in rows]


def label(run: str, cfg: dict[str, Any]) -> str:
    """``folder (optimizer, lr 0.01 / manifold 0.2, seed 0)`` from a run's config."""
    name = os.path.basename(os.path.normpath(run))
    parts = []
    if cfg.get("optimizer"):
        parts.append(cfg["optimizer"])
    if cfg.get("lr") is not None:
        lr = f"lr {cfg['lr']:g}"
        if cfg.get("lr_manifold") is not None:
            lr += f" / manifold {cfg['lr_manifold']:g}"
        parts.append(lr)
    if cfg.get("seed") is not None:
        parts.append(f"seed {cfg['seed']}")
    return f"{name} ({', '.join(parts)})" if parts else name


def plot_runs(runs: list[str], out: str) -> str:
    """Draws the runs into ``out`` (PNG) and returns its path."""
    loaded = [(run, *_read(run)) for run in runs]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    for run, records, cfg in loaded:
        name = label(run, cfg)
        train = [r for r in records if r.get("split") == "train"]
        test = [r for r in records if r.get("split") == "test"]
        val = [r for r in records if r.get("split") == "val"]
        (line,) = ax_loss.plot(_x(train), [r["loss"] for r in train], label=name)
        color = line.get_color()
        ax_err.plot(
            _x(test),
            [100 * r["error"] for r in test],
            marker=".",
            color=color,
            label=f"{name}: test",
        )
        if val:
            ax_err.plot(
                _x(val),
                [100 * r["error"] for r in val],
                ls="--",
                color=color,
                label=f"{name}: validation",
            )
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax_err.set(xlabel="epoch", ylabel="error (%)", yscale="linear")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
