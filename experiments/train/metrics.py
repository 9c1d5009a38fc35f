"""``metrics.jsonl`` (one JSON line per log step and per evaluation), its
truncation on resume, and the optional TensorBoard scalars."""

from __future__ import annotations

import json
import os
from typing import Any

import jax


def truncate_metrics(path: str, last_step: int) -> None:
    """Keeps the lines logged up to ``last_step`` (so a resumed run appends
    exactly the lines an uninterrupted run would have)."""
    if not os.path.exists(path) or jax.process_index() != 0:
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError):
            continue  # a line cut by a kill
    with open(path, "w") as f:
        f.writelines(kept)


class MetricsWriter:
    def __init__(self, workdir: str, tensorboard: bool):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.main = jax.process_index() == 0
        self.tb = None
        if tensorboard and self.main:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "split", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str, obj: Any) -> None:
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
