"""The training loop: :func:`train_and_evaluate` (see the package docstring);
:mod:`~experiments.train.setup` turns its config into data and a trainer."""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

import riemax
from experiments import console, monitor
from experiments import data as data_lib
from experiments.train.checkpoints import (
    BEST,
    check_workdir,
    manager,
    restore_latest,
)
from experiments.train.metrics import (
    MetricsWriter,
    read_metrics,
    truncate_metrics,
    write_json,
)
from experiments.train.setup import invariance_labels, prepare_run

TrainingDiverged = monitor.TrainingDiverged
status = console.status  # one clock for the whole runner (experiments.console)


class _CacheHits:
    """Counts the programs read from JAX's persistent compilation cache from
    its creation until :meth:`stop` (which returns the count)."""

    def __init__(self):
        from jax import monitoring

        self.count = 0
        self._monitoring = monitoring
        monitoring.register_event_listener(self._listen)
        self._on = True

    def _listen(self, event: str, **kwargs: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.count += 1

    def stop(self) -> int:
        if self._on:
            self._monitoring.unregister_event_listener(self._listen)
            self._on = False
        return self.count


def train_and_evaluate(
    config: dict[str, Any],
    workdir: str,
    *,
    overwrite: bool = False,
    multihost: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains one config in ``workdir`` (resuming from its latest checkpoint).

    Args:
      config: A config (:mod:`experiments.configs`; keys left out take their
        defaults), resolved (:func:`experiments.config.resolve`, as the command
        line passes it) or not.
      workdir: Output directory: ``config.json``, ``labels.txt``,
        ``metrics.jsonl``, ``result.json``, ``checkpoints/``.
      overwrite: Remove this runner's outputs from ``workdir`` first.
      multihost: For a ``multihost`` config, the arguments of
        ``jax.distributed.initialize`` (``coordinator_address``,
        ``num_processes``, ``process_id``; ``None``: auto-detected).

    Returns:
      ``step``, ``resumed_from``, ``halted`` and, for a finished run,
      ``test_loss``, ``test_error``, ``train_loss``, ``train_error`` (the last
      logged window), ``val_error`` (with a validation split), ``best_step``,
      ``best_val_error``, ``best_test_error`` (with ``select_best``),
      ``wall_time_s``, ``first_step_s``, ``images_per_s``.

    Raises:
      ConfigError, experiments.data.DataError: bad input, before the workdir is
        touched.
      TrainingDiverged: the loss became non-finite.
    """
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    t_start = time.time()
    cfg, dataset, trainer = prepare_run(config, multihost)
    check_workdir(workdir, cfg, overwrite)

    # Labels measured on data need the initial parameters.
    if trainer.labels is None:
        status("measuring the manifold split on the first batch (labels=invariance)")
        invariance_labels(trainer, dataset)
    host_state = trainer.init_host_state()
    report = riemax.label_report(
        host_state["params"], trainer.labels, details=trainer.why
    )
    summary = [x for x in report.splitlines() if x.startswith(("manifold:", "eucl"))]
    status(
        f"manifold split ({cfg['labels']} labels; labels.txt): " + "; ".join(summary)
    )
    status("manifold split in full:\n" + report, level=1)

    # ---- touch the workdir
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), cfg)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "labels.txt"), "w") as f:
            f.write(report + "\n")
    target = {"state": host_state, "best": np.array([np.inf, -1.0])}
    mngr, resumed_from, restored = restore_latest(workdir, target, cfg["max_to_keep"])
    if restored is not None:
        host_state, best = restored["state"], restored["best"]
        status(f"resumed from checkpoint {resumed_from}")
    else:
        best = target["best"]
    best_error, best_step = float(best[0]), int(best[1])
    start = int(host_state["step"])
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    truncate_metrics(metrics_path, start)
    best_mngr = (
        manager(os.path.join(workdir, BEST), None) if cfg["select_best"] else None
    )
    if best_mngr is not None:
        for s in best_mngr.all_steps():
            if s != best_step:
                best_mngr.delete(s)

    dev = trainer.dev
    state = dev.put_state(host_state)
    writer = MetricsWriter(workdir, cfg["tensorboard"])
    order = data_lib.BatchOrder(len(dataset.y_train), cfg["batch_size"], cfg["seed"])
    total = cfg["steps"]
    halt_at = (
        None if cfg["halt_after_steps"] is None else start + cfg["halt_after_steps"]
    )
    spe = cfg["steps_per_epoch"]

    def produce(step):
        idx = order(step)[dev.rows(cfg["batch_size"])]
        return dev.put_batch(dataset.x_train[idx], dataset.y_train[idx])

    evaluated: dict[int, dict[str, dict[str, float]]] = {}

    def evaluate_now(step):
        if step in evaluated:
            return evaluated[step]
        params, stats = state["params"], state["batch_stats"]
        if cfg["bn_recalibrate"]:
            stats = trainer.recalibrated_stats(params, stats, dataset.x_train, step)
        out = {"test": trainer.evaluate(params, stats, dataset.x_test, dataset.y_test)}
        if dataset.y_val is not None:
            out["val"] = trainer.evaluate(params, stats, dataset.x_val, dataset.y_val)
        evaluated.clear()
        evaluated[step] = out
        return out

    def save(step):
        tree = {"state": dev.get(state), "best": np.array([best_error, best_step])}
        mngr.save(step, args=ocp.args.StandardSave(tree))
        if best_mngr is not None:
            for s in best_mngr.all_steps():
                if s < best_step:
                    best_mngr.delete(s)

    watch = monitor.LossWatch(cfg["num_classes"], spe)
    if start and os.path.exists(metrics_path):
        watch.restore(r for r in read_metrics(workdir) if r["step"] <= start)

    # One display: the bar (on a terminal) counts steps and shows the loss; every
    # line carries the runner's clock (experiments.console), none of the bar's.
    bar = tqdm(
        total=total,
        initial=start,
        unit="step",
        disable=None if cfg["progress"] and console.verbosity() >= 0 else True,
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{rate_fmt}{postfix}]",
    )

    def say(msg, warning=False):
        if bar.disable:
            (console.warn if warning else status)(msg)
        elif jax.process_index() == 0:
            line = console.line(f"WARNING: {msg}" if warning else msg)
            bar.write(line, file=sys.stderr)

    window: list[dict[str, jax.Array]] = []
    last_train: dict[str, float] = {}
    first_step_s = None
    t_window = time.time()
    steps_in_window = 0
    images_per_s = None
    step = start
    halted = stopped = False
    if cfg["stop_diverged"] and watch.diverged is not None:
        stopped, total = True, start  # resumed after stopping: stop again
        say(f"{watch.diverged.message} (stopped, stop_diverged)", warning=True)
    batches = data_lib.prefetch(produce, range(start, total))
    loaded = _CacheHits()
    try:
        if start < total:
            status("compiling the train step (runs with the first step)")
        for step in range(start + 1, total + 1):
            if halt_at is not None and step - 1 >= halt_at:
                halted = True
                step -= 1
                break
            xb, yb = next(batches)
            t_step = time.time()
            state, metrics = trainer.train_step(state, xb, yb)
            if first_step_s is None:
                jax.block_until_ready(metrics)
                first_step_s = time.time() - t_start
                took = time.time() - t_step
                how = (
                    "loaded from the compilation cache" if loaded.stop() else "compiled"
                )
                say(
                    f"first step done: {how} and run in {took:.1f}s, "
                    f"{first_step_s:.1f}s after this run started; training"
                )
                t_window, steps_in_window = time.time(), 0
            else:
                steps_in_window += 1
            window.append(metrics)
            final = step == total
            if step % cfg["log_every"] == 0 or final:
                host = dev.get(window)
                losses = [float(m["loss"]) for m in host]
                bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
                if bad:
                    at = step - len(host) + 1 + bad[0]
                    raise TrainingDiverged(
                        f"the training loss became {losses[bad[0]]} at step {at} "
                        f"(lr {float(host[bad[0]]['lr']):.3g}); lower the learning "
                        "rate(s) or check the data. The last checkpoint is kept."
                    )
                elapsed = time.time() - t_window
                record: dict[str, Any] = {
                    "step": step,
                    "epoch": step / spe,
                    "split": "train",
                    "loss": float(np.mean(losses)),
                    "error": float(np.mean([m["error"] for m in host])),
                }
                record |= {
                    k: float(v)
                    for k, v in host[-1].items()
                    if k not in ("loss", "error")
                }
                if steps_in_window:
                    step_time = elapsed / steps_in_window
                    images_per_s = cfg["batch_size"] / step_time
                    record |= {"step_time_s": step_time, "images_per_s": images_per_s}
                writer.write(record)
                last_train = record
                bar.update(step - bar.n)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    img_s=f"{images_per_s:.0f}" if images_per_s else "-",
                )
                if bar.disable:
                    say(
                        f"step {step}/{total} train loss {record['loss']:.4f} "
                        f"error {record['error']:.4f}"
                        + (f" ({images_per_s:.0f} img/s)" if images_per_s else "")
                    )
                window, t_window, steps_in_window = [], time.time(), 0
                recent = float(np.mean(losses[-spe:]))
                for alert in watch.check(step, record["loss"], recent):
                    writer.write(alert.record(spe))
                    say(alert.message, warning=True)
                if cfg["stop_diverged"] and watch.diverged is not None:
                    stopped = final = True
                    say(f"stopping at step {step} (stop_diverged)")
            if step % cfg["eval_every"] == 0 or final:
                results = evaluate_now(step)
                for split, m in results.items():
                    writer.write(
                        {"step": step, "epoch": step / spe, "split": split, **m}
                    )
                    loss, err = m["loss"], m["error"]
                    say(f"step {step} {split} loss {loss:.4f} error {err:.4f}")
                if best_mngr is not None and results["val"]["error"] < best_error:
                    best_error, best_step = results["val"]["error"], step
                    for s in best_mngr.all_steps():
                        if s >= step:
                            best_mngr.delete(s)
                    best_mngr.save(step, args=ocp.args.StandardSave(dev.get(state)))
                t_window = time.time()
            if step % cfg["checkpoint_every"] == 0 or final:
                save(step)
            if stopped:
                break
        else:
            step = max(start, total)
    finally:
        loaded.stop()
        batches.close()
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
        if best_mngr is not None:
            best_mngr.wait_until_finished()

    result: dict[str, Any] = {
        "step": step,
        "resumed_from": resumed_from,
        "halted": halted,
    }
    if watch.diverged is not None:
        result |= {
            "diverged": watch.diverged.kind,
            "diverged_at": watch.diverged.step,
            "warning": watch.diverged.message,
            "stopped_early": stopped,
        }
    if halted:
        writer.close()
        return result
    test = evaluate_now(step)
    result |= {
        "test_loss": test["test"]["loss"],
        "test_error": test["test"]["error"],
        "wall_time_s": time.time() - t_start,
        "first_step_s": first_step_s,
        "images_per_s": images_per_s,
    }
    if "val" in test:
        result["val_error"] = test["val"]["error"]
    if last_train:
        result["train_loss"] = last_train["loss"]
        result["train_error"] = last_train["error"]
    if best_mngr is not None and best_step >= 0:
        best_state = best_mngr.restore(
            best_step, args=ocp.args.StandardRestore(host_state)
        )
        best_dev = dev.put_state(best_state)
        m = trainer.evaluate(
            best_dev["params"], best_dev["batch_stats"], dataset.x_test, dataset.y_test
        )
        result |= {
            "best_step": best_step,
            "best_val_error": best_error,
            "best_test_error": m["error"],
        }
        records = read_metrics(workdir) if jax.process_index() == 0 else []
        if not any(r["split"] == "test_best" for r in records):
            writer.write(
                {
                    "step": step,
                    "epoch": step / spe,
                    "split": "test_best",
                    "best_step": best_step,
                    **m,
                }
            )
    if best_mngr is not None:
        best_mngr.close()
    writer.close()
    write_json(os.path.join(workdir, "result.json"), result)
    status(
        f"{'stopped' if stopped else 'done'}: step {step}, test error "
        f"{result['test_error']:.4f}; "
        + (
            f"first step {first_step_s:.1f}s after the start, "
            if first_step_s is not None
            else "no step left to train, "
        )
        + f"{result['wall_time_s']:.0f}s in all"
        + (
            f", best-val test error {result['best_test_error']:.4f}"
            if "best_test_error" in result
            else ""
        )
        + (
            f"; DIVERGED ({watch.diverged.kind}, step {watch.diverged.step})"
            if watch.diverged is not None
            else ""
        )
    )
    return result
