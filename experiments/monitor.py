"""Signs that a run is going nowhere, read from its logged training loss.

A run whose loss becomes non-finite stops at once (``TrainingDiverged``, exit
status 1). Two slower failures let the loss stay finite while nothing is
learned, and :class:`LossWatch` reports them:

- ``chance``: at the first log line at or after the end of the first epoch
  (``steps_per_epoch``) and after at least :data:`CHANCE_MIN_STEPS` steps, the
  training loss of the last epoch's steps (those of the logged window, at most
  one epoch of them) is still at or above the loss of a uniform guess,
  ``ln(num_classes)``. The floor matters where an epoch is one or two steps
  (a small data set at a large batch: digits at batch 1024): the loss logged at
  step 1 is that of the initial parameters, at chance whatever the optimizer,
  and no verdict is given before a run has taken some steps;
- ``grown``: a logged training loss is at least ``growth`` (10) times the first
  logged one.

Each fires at most once per run. The caller prints the message, writes the
warning into ``metrics.jsonl`` (``split: "warning"``), and stops the run if
``stop_diverged`` is set. Logged values are means over ``log_every`` steps, and
the watch reads them back from ``metrics.jsonl`` when a run resumes, so a
resumed run warns exactly where an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

WARNING_SPLIT = "warning"


class TrainingDiverged(RuntimeError):
    """The training loss became non-finite."""


GROWTH = 10.0
#: The chance test waits for at least this many steps, however short an epoch.
CHANCE_MIN_STEPS = 10


@dataclasses.dataclass(frozen=True)
class Alert:
    """One sign of a run going nowhere."""

    step: int
    kind: str  # "chance" or "grown"
    loss: float
    threshold: float
    message: str

    def record(self, steps_per_epoch: int) -> dict[str, Any]:
        """The line of ``metrics.jsonl``."""
        return {
            "step": self.step,
            "epoch": self.step / steps_per_epoch,
            "split": WARNING_SPLIT,
            "kind": self.kind,
            "loss": self.loss,
            "threshold": self.threshold,
            "message": self.message,
        }


class LossWatch:
    """Checks each logged training loss of one run (see the module docstring).

    Args:
      num_classes: Classes of the data (chance loss ``ln(num_classes)``).
      steps_per_epoch: Steps of one epoch.
      growth: Factor over the first logged loss that counts as blown up.
      min_steps: The chance test's floor (:data:`CHANCE_MIN_STEPS`).
    """

    def __init__(
        self,
        num_classes: int,
        steps_per_epoch: int,
        growth: float = GROWTH,
        min_steps: int = CHANCE_MIN_STEPS,
    ):
        self.chance = math.log(num_classes)
        self.steps_per_epoch = steps_per_epoch
        #: The step from which the chance test gives its verdict.
        self.chance_at = max(steps_per_epoch, min_steps)
        self.growth = growth
        self.start: float | None = None
        self.epoch_checked = False
        self.warnings: list[Alert] = []

    def restore(self, records: Iterable[Mapping[str, Any]]) -> None:
        """The state after the lines of ``metrics.jsonl`` that a resumed run keeps."""
        for r in records:
            if r.get("split") == "train":
                if self.start is None:
                    self.start = float(r["loss"])
                if r["step"] >= self.chance_at:
                    self.epoch_checked = True
            elif r.get("split") == WARNING_SPLIT:
                self.warnings.append(
                    Alert(
                        int(r["step"]),
                        r["kind"],
                        float(r["loss"]),
                        float(r["threshold"]),
                        r["message"],
                    )
                )

    @property
    def diverged(self) -> Alert | None:
        """The first warning of the run, if any."""
        return self.warnings[0] if self.warnings else None

    def check(self, step: int, loss: float, recent: float | None = None) -> list[Alert]:
        """The new warnings raised by the training loss logged at ``step``
        (``loss``: the logged mean; ``recent``: the mean over the window's last
        epoch of steps, for the chance test; default ``loss``)."""
        recent = loss if recent is None else recent
        fired = {w.kind for w in self.warnings}
        new = []
        if self.start is None:
            self.start = loss
        elif "grown" not in fired and loss >= self.growth * self.start:
            threshold = self.growth * self.start
            new.append(
                Alert(
                    step,
                    "grown",
                    loss,
                    threshold,
                    f"step {step}: the training loss {loss:.4g} has grown "
                    f"{loss / self.start:.1f}x from its first logged value "
                    f"{self.start:.4g}; this run is diverging: lower the learning "
                    "rate(s) or add warm-up (--warmup_epochs)",
                )
            )
        if not self.epoch_checked and step >= self.chance_at:
            self.epoch_checked = True
            if "chance" not in fired and recent >= self.chance:
                epochs = step / self.steps_per_epoch
                new.append(
                    Alert(
                        step,
                        "chance",
                        recent,
                        self.chance,
                        f"step {step} (epoch {epochs:.3g}): the training loss "
                        f"{recent:.4g} is still at or above chance (ln "
                        f"{round(math.exp(self.chance))} = {self.chance:.4g}); "
                        "this run is not learning: lower the learning rate(s), "
                        "add warm-up (--warmup_epochs) or check the labels",
                    )
                )
        self.warnings.extend(new)
        return new
