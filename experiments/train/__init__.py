r"""The experiments' one training loop: :func:`train_and_evaluate`, by concern:

- :mod:`~experiments.train.loop` -- :func:`train_and_evaluate` itself;
- :mod:`~experiments.train.setup` -- the data, the resolved config and the trainer
  of a config (:func:`prepare_run`);
- :mod:`~experiments.train.steps` -- the compiled steps of a config (:class:`Trainer`);
- :mod:`~experiments.train.devices` -- the device layout (:class:`Devices`);
- :mod:`~experiments.train.checkpoints` -- the workdir and its orbax checkpoints;
- :mod:`~experiments.train.metrics` -- ``metrics.jsonl``;
- :mod:`~experiments.train.evaluation` -- ``--task=test``.

One call trains one config (:mod:`experiments.config`) in one workdir:

1. resolve and check the config, load the data, build the model, the labels and
   the optimizer, and check the workdir -- all before anything is written, so
   that every mistake is one clear error and the workdir stays as it was;
2. write ``config.json`` (the resolved config) and ``labels.txt`` (the manifold
   split, :func:`riemax.label_report`), restore the latest readable checkpoint
   (a corrupted one is moved to ``corrupt_checkpoints/`` and the previous one is
   used, with a message), drop the ``metrics.jsonl`` lines logged after it;
3. train: every step (forward, backward, optimizer, ENorm, measurements) is one
   ``jax.pmap`` (default; gradients and, unless ``bn_per_device``, BatchNorm
   statistics averaged over the devices) or one ``jax.jit`` over a 1-D
   ``NamedSharding`` mesh (``parallel=sharded``). The data of a step, its
   augmentation and its dropout are functions of ``(seed, step)``; crops and
   flips are drawn per example for the global batch, so they do not depend on the
   device layout, dropout masks do (pmap draws them per device);
4. log one JSON line per ``log_every`` steps (train) and per evaluation (test,
   val), checkpoint every ``checkpoint_every`` steps and at the end, stop with
   :class:`TrainingDiverged` when the loss is not finite, and warn (a
   ``"warning"`` line; with ``stop_diverged``, stop) when the run is going
   nowhere (:mod:`experiments.monitor`).

Metrics (``metrics.jsonl``): ``step, epoch, split, loss, error`` (train: means over
the steps since the previous line), ``lr`` (and ``lr_manifold``) of the last
update, per-group kernel norms ``norm_{manifold,euclidean}_{mean,min,max}`` and
angular steps ``angle_{manifold,euclidean}_{mean,max}`` (radians per step) from
:mod:`riemax.diagnostics`, ``step_time_s`` and ``images_per_s``.
"""

from __future__ import annotations

from experiments.console import status
from experiments.monitor import TrainingDiverged
from experiments.train.checkpoints import (
    BEST,
    CHECKPOINTS,
    CORRUPT,
    OUTPUTS,
    check_workdir,
    load_checkpoint,
    restore_latest,
)
from experiments.train.devices import AXIS, Devices, init_multihost
from experiments.train.evaluation import evaluate_checkpoint, find_run
from experiments.train.loop import train_and_evaluate
from experiments.train.metrics import (
    MetricsWriter,
    read_metrics,
    truncate_metrics,
)
from experiments.train.setup import invariance_labels, load_data, prepare_run
from experiments.train.steps import (
    Trainer,
    build_trainer,
    measurements,
    model_kwargs,
)

__all__ = [
    "AXIS",
    "BEST",
    "CHECKPOINTS",
    "CORRUPT",
    "OUTPUTS",
    "Devices",
    "MetricsWriter",
    "Trainer",
    "TrainingDiverged",
    "build_trainer",
    "check_workdir",
    "evaluate_checkpoint",
    "find_run",
    "init_multihost",
    "invariance_labels",
    "load_checkpoint",
    "load_data",
    "measurements",
    "model_kwargs",
    "prepare_run",
    "read_metrics",
    "restore_latest",
    "status",
    "train_and_evaluate",
    "truncate_metrics",
]
