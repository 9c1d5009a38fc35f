"""``--task=test``: the test error of a saved checkpoint with its saved config."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from experiments import config as config_lib
from experiments import console
from experiments.config import ConfigError
from experiments.train.checkpoints import CHECKPOINTS, manager
from experiments.train.setup import invariance_labels, prepare_run

status = console.status


def find_run(path: str) -> tuple[str, int | None]:
    """``(workdir, step)`` of a ``--load`` path: a workdir (latest checkpoint), its
    ``checkpoints/`` folder, or one ``checkpoints/STEP`` folder."""
    path = os.path.abspath(path.rstrip("/"))
    step = None
    base = os.path.basename(path)
    if base.isdigit() and os.path.basename(os.path.dirname(path)) == CHECKPOINTS:
        step, path = int(base), os.path.dirname(os.path.dirname(path))
    elif base == CHECKPOINTS:
        path = os.path.dirname(path)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(
            f"--load {path}: no config.json there; give a run's workdir, its "
            "checkpoints/ folder or one checkpoints/STEP folder"
        )
    return path, step


def evaluate_checkpoint(load: str, overrides: dict[str, Any] | None = None) -> dict:
    """Test loss and error of a saved checkpoint (``--task=test --load``)."""
    import orbax.checkpoint as ocp

    workdir, step = find_run(load)
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    # The saved config, minus what belongs to the machine it ran on (devices,
    # data dir, evaluation batch): those come from this call.
    keys = set(config_lib.KEYS) - config_lib.RESUMABLE_KEYS | {"data_dir"}
    cfg_in = {k: v for k, v in saved.items() if k in keys} | (overrides or {})
    cfg_in["progress"] = False
    cfg, dataset, trainer = prepare_run(cfg_in)
    if trainer.labels is None:
        invariance_labels(trainer, dataset)
    target = {"state": trainer.init_host_state(), "best": np.array([np.inf, -1.0])}
    mngr = manager(os.path.join(workdir, CHECKPOINTS), None)
    steps = mngr.all_steps()
    step = max(steps) if step is None and steps else step
    if step is None or step not in steps:
        raise ConfigError(f"--load: no checkpoint {step} in {workdir}/{CHECKPOINTS}")
    status(f"evaluating checkpoint {step} of {workdir}")
    tree = mngr.restore(step, args=ocp.args.StandardRestore(target))
    mngr.close()
    state = trainer.dev.put_state(tree["state"])
    stats = state["batch_stats"]
    if cfg["bn_recalibrate"]:
        stats = trainer.recalibrated_stats(
            state["params"], stats, dataset.x_train, step
        )
    m = trainer.evaluate(state["params"], stats, dataset.x_test, dataset.y_test)
    return {"step": step, "test_loss": m["loss"], "test_error": m["error"]}
