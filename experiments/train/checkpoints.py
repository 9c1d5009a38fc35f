"""The workdir of a run: refusing another config, orbax checkpoints (the latest
readable one restored, a corrupted one moved aside)."""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax

from experiments import config as config_lib
from experiments import console
from experiments.config import ConfigError

CHECKPOINTS = "checkpoints"
BEST = "best_checkpoint"
CORRUPT = "corrupt_checkpoints"
OUTPUTS = (
    "config.json",
    "labels.txt",
    "metrics.jsonl",
    "result.json",
    CHECKPOINTS,
    BEST,
    CORRUPT,
    "tensorboard",
)

status = console.status


def check_workdir(workdir: str, cfg: dict[str, Any], overwrite: bool) -> None:
    """Refuses a workdir that holds a run of another config (unless ``overwrite``,
    which removes this runner's outputs). A config that only raises ``steps``
    (or ``epochs``) extends the run: it resumes and trains on."""
    path = os.path.join(workdir, "config.json")
    leftovers = [n for n in OUTPUTS if os.path.exists(os.path.join(workdir, n))]
    if overwrite:
        if jax.process_index() == 0:
            for name in leftovers:
                p = os.path.join(workdir, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        return
    if not os.path.exists(path):
        if CHECKPOINTS in leftovers or "metrics.jsonl" in leftovers:
            raise ConfigError(
                f"{workdir} holds checkpoints or metrics but no config.json; pass "
                "--overwrite to start afresh, or use another --workdir"
            )
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} ({e}); pass --overwrite") from None
    new = json.loads(json.dumps(cfg))
    extending = config_lib.extension(saved, new)
    if extending:
        status(extending)
        return
    diff = config_lib.differing_keys(saved, new)
    if diff:

        def short(v):
            s = json.dumps(v)
            return s if len(s) <= 40 else s[:37] + "..."

        changes = ", ".join(
            f"{k} ({short(saved.get(k))} -> {short(new.get(k))})" for k in diff
        )
        raise ConfigError(
            f"{workdir} holds a run with a different config: {changes}; pass "
            "--overwrite to start afresh, or use another --workdir"
        )


def manager(path: str, max_to_keep: int | None):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(path),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def restore_latest(workdir: str, target: Any, max_to_keep: int):
    """The manager and the newest readable checkpoint (``(step, tree)`` or
    ``(None, None)``). Unreadable checkpoints are moved to ``corrupt_checkpoints/``
    (nothing earlier is lost) and the previous one is tried."""
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, CHECKPOINTS)
    while True:
        mngr = manager(path, max_to_keep)
        steps = sorted(mngr.all_steps(), reverse=True)
        if not steps:
            return mngr, None, None
        step = steps[0]
        try:
            tree = mngr.restore(step, args=ocp.args.StandardRestore(target))
            return mngr, step, tree
        except Exception as e:  # noqa: BLE001 - any failure means unreadable
            mngr.close()
            first = str(e).splitlines()[0][:200] if str(e) else ""
            dest = os.path.join(workdir, CORRUPT, f"{step}-{int(time.time())}")
            if jax.process_index() == 0:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.move(os.path.join(path, str(step)), dest)
            earlier = steps[1] if len(steps) > 1 else None
            status(
                f"WARNING: checkpoint {step} is unreadable ({type(e).__name__}: "
                f"{first}); moved it to {dest}; "
                + (
                    f"falling back to checkpoint {earlier}"
                    if earlier is not None
                    else "no earlier checkpoint: starting from scratch"
                )
            )
            if earlier is None:
                return manager(path, max_to_keep), None, None


def load_checkpoint(workdir: str, step: int | None = None) -> dict[str, Any]:
    """The saved train state of a run (``step, params, batch_stats, opt_state``)
    as plain dicts and numpy arrays (restored without a target: use it to read
    parameters). ``step=None``: the latest checkpoint."""
    import orbax.checkpoint as ocp

    mngr = manager(os.path.join(workdir, CHECKPOINTS), None)
    step = mngr.latest_step() if step is None else step
    if step is None:
        mngr.close()
        raise FileNotFoundError(f"no checkpoint in {workdir}")
    tree = mngr.restore(step, args=ocp.args.StandardRestore())
    mngr.close()
    return tree["state"]
