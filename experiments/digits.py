r"""Offline main job: train a small conv-BN net on scikit-learn's real 8x8 digits.

``load_digits`` ships inside scikit-learn (1797 real 8x8 grayscale digits), so this job
runs anywhere without a download. The split is fixed (``split_seed``; 1437 train / 360
test, stratified). The model is a narrow VGG-like stack of 3x3 conv -> BN (no scale)
-> ReLU with a 2x2 max-pool after each stage and a linear classifier
(:class:`experiments.models.VGG` with ``stages``).

The optimizer is the papers' hybrid: kernels selected by
:func:`riemax.labels_by_rule` go to a riemax optimizer (``sgdg``, ``adamg``,
``adamsrt``, ``adams``, ``sgdmrt``), every other parameter to Nesterov SGD with coupled
L2 weight decay on the Euclidean kernels (RBN-TF). ``optimizer="sgd"`` is RBN-TF's
baseline: Nesterov SGD on everything, all parameters decayed. For ``sgdg``/``adamg``
the manifold kernels are re-initialised to unit-norm units (the model's truncated
normal, normalised per unit: the same distribution as RBN-TF's unit initialiser).

Outputs in ``workdir``: ``config.json`` (the resolved config), ``metrics.jsonl`` (one
JSON object per log/eval step: ``step, split, loss, accuracy, lr, lr_manifold`` and, for
the kernels that the rule selects, ``manifold_norm_mean/min/max`` (per-unit norms),
``manifold_update_norm`` and ``manifold_angle_mean`` (mean per-unit angle moved in the
last step, radians)), and orbax checkpoints in ``checkpoints/`` (``max_to_keep``). A run
whose workdir already holds a checkpoint resumes from the latest one; the data order is
a function of ``(seed, step)``, so an interrupted and resumed run ends with exactly the
parameters of an uninterrupted one.

Run::

  python -m experiments.digits --workdir runs/digits --optimizer sgdg --steps 300
"""

from __future__ import annotations

import argparse
import functools
import json
import logging as std_logging
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

import riemax
from experiments.models import VGG

OPTIMIZERS = ("sgd", "sgdg", "adamg", "adamsrt", "adams", "sgdmrt")

# (Euclidean lr, manifold lr) per optimizer; RBN's CIFAR ratios for sgdg/adamg, SRT's
# manifold learning rates for the others.
DEFAULT_LEARNING_RATES = {
    "sgd": (0.1, None),
    "sgdg": (0.01, 0.2),
    "adamg": (0.01, 0.05),
    "adamsrt": (0.01, 1e-3),
    "adams": (0.01, 1e-3),
    "sgdmrt": (0.01, 0.1),
}

DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 0,  # model init and data order
    "split_seed": 0,  # train/test split (fixed across runs)
    "test_size": 360,
    "optimizer": "sgdg",
    "steps": 300,
    "batch_size": 64,
    # model: stages of (n_convs, width); input 8x8x1, a 2x2 pool after each stage
    "widths": (32, 64),
    "convs_per_stage": 2,
    # optimization
    "lr": None,  # Euclidean lr; None: DEFAULT_LEARNING_RATES[optimizer][0]
    "lr_manifold": None,  # None: DEFAULT_LEARNING_RATES[optimizer][1]
    "lr_decay_steps": (),  # RBN piecewise-constant: lr * factor^#{s: step > s}
    "lr_decay_factor": 0.2,
    "momentum": 0.9,  # Euclidean Nesterov momentum, and SGD-G / SGD-MRT momentum
    "weight_decay": 5e-4,  # coupled L2 on the Euclidean half
    "decay_all": None,  # None: True for sgd (RBN baseline), else kernels only
    "weight_decay_manifold": 0.0,  # adamsrt / adams / sgdmrt only
    "grad_clip": 0.1,  # sgdg / adamg
    "omega": 0.1,  # sgdg / adamg orthogonality term
    "label_pattern": "conv",  # riemax.labels_by_rule(params, pattern)
    "renormalize_manifold": None,  # None: True for sgdg / adamg
    # bookkeeping
    "log_every": 25,
    "eval_every": 100,
    "checkpoint_every": 100,
    "max_to_keep": 2,
    # stop this process after this many steps, without final eval or checkpoint
    # (simulates a preemption; None: run to ``steps``)
    "halt_after_steps": None,
}


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fills defaults and ``None``-derived values; rejects unknown keys and names."""
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(
            f"unknown config keys {unknown}; valid keys: {sorted(DEFAULT_CONFIG)}"
        )
    cfg = {**DEFAULT_CONFIG, **config}
    name = cfg["optimizer"]
    if name not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
        )
    lr_e, lr_g = DEFAULT_LEARNING_RATES[name]
    if cfg["lr"] is None:
        cfg["lr"] = lr_e
    if cfg["lr_manifold"] is None:
        cfg["lr_manifold"] = lr_g
    if cfg["decay_all"] is None:
        cfg["decay_all"] = name == "sgd"
    if cfg["renormalize_manifold"] is None:
        cfg["renormalize_manifold"] = name in ("sgdg", "adamg")
    cfg["widths"] = [int(w) for w in cfg["widths"]]
    cfg["lr_decay_steps"] = [int(s) for s in cfg["lr_decay_steps"]]
    return cfg


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def load_data(split_seed: int = 0, test_size: int = 360) -> dict[str, np.ndarray]:
    """The digits as NHWC float32 images (standardised with train statistics)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=split_seed, stratify=y
    )
    mean, std = x_train.mean(), x_train.std()
    return {
        "x_train": ((x_train - mean) / std)[..., None],
        "y_train": y_train,
        "x_test": ((x_test - mean) / std)[..., None],
        "y_test": y_test,
    }


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """Indices of the batch for 0-based ``step``: a fresh permutation per epoch,
    seeded by ``(seed, epoch)``, remainder dropped. Depends only on its arguments."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} > number of examples {n}")
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[i * batch_size : (i + 1) * batch_size]


# --------------------------------------------------------------------------------------
# Model and optimizer
# --------------------------------------------------------------------------------------


def make_model(cfg: dict[str, Any], rngs: nnx.Rngs) -> VGG:
    stages = tuple((cfg["convs_per_stage"], w) for w in cfg["widths"])
    return VGG(None, 10, stages=stages, fc_bn=False, input_shape=(8, 8, 1), rngs=rngs)


def _is_kernel(path, _) -> bool:
    return getattr(path[-1], "key", None) == "kernel"


def _kernel_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(_is_kernel, params)


def _schedule(lr: float, decay_steps: list[int], factor: float) -> optax.Schedule:
    def schedule(count):
        n = (
            sum((count > s).astype(jnp.int32) for s in decay_steps)
            if decay_steps
            else 0
        )
        return lr * factor**n

    return schedule


def make_optimizer(cfg: dict[str, Any], labels: Any) -> optax.GradientTransformation:
    """The hybrid optimizer of the config (``labels``: manifold/euclidean tree)."""
    name = cfg["optimizer"]
    lr_e = _schedule(cfg["lr"], cfg["lr_decay_steps"], cfg["lr_decay_factor"])
    decay_mask = None if cfg["decay_all"] else _kernel_mask
    euclidean = optax.chain(
        optax.add_decayed_weights(cfg["weight_decay"], mask=decay_mask),
        optax.sgd(lr_e, momentum=cfg["momentum"], nesterov=True),
    )
    if name == "sgd":
        return euclidean
    lr_g = _schedule(cfg["lr_manifold"], cfg["lr_decay_steps"], cfg["lr_decay_factor"])
    wd_g = cfg["weight_decay_manifold"]
    manifold: dict[str, Callable[[], optax.GradientTransformation]] = {
        "sgdg": lambda: riemax.sgdg(
            lr_g,
            momentum=cfg["momentum"],
            grad_clip=cfg["grad_clip"],
            omega=cfg["omega"],
        ),
        "adamg": lambda: riemax.adamg(
            lr_g, grad_clip=cfg["grad_clip"], omega=cfg["omega"]
        ),
        "adamsrt": lambda: riemax.adamsrt(lr_g, weight_decay=wd_g),
        "adams": lambda: riemax.adams(lr_g, weight_decay=wd_g),
        "sgdmrt": lambda: riemax.sgdmrt(
            lr_g, momentum=cfg["momentum"], weight_decay=wd_g
        ),
    }
    return riemax.hybrid(manifold[name](), euclidean, labels)


def _unit_norms(w: jax.Array) -> jax.Array:
    """Per-unit norms ``||w[..., j]||`` (all axes but the last)."""
    return jnp.sqrt(jnp.sum(jnp.square(w.reshape(-1, w.shape[-1])), axis=0))


def _renormalize(params: Any, labels: Any, unit_eps: float = 1e-8) -> Any:
    """RBN's ``unit``: ``w / (||w|| + eps)`` per unit, on the manifold leaves only."""

    def one(w, label):
        if label != riemax.MANIFOLD:
            return w
        return w / (_unit_norms(w) + unit_eps)

    return jax.tree.map(one, params, labels)


def _manifold_measurements(old: Any, new: Any, labels: Any) -> dict[str, jax.Array]:
    """Per-unit norms, update norm and mean angle moved, over the manifold leaves."""
    pairs = [
        (w0, w1)
        for w0, w1, label in zip(
            jax.tree.leaves(old),
            jax.tree.leaves(new),
            jax.tree.leaves(labels),
            strict=True,
        )
        if label == riemax.MANIFOLD
    ]
    if not pairs:
        return {}
    norms = jnp.concatenate([_unit_norms(w1) for _, w1 in pairs])
    update_sq = sum(jnp.sum(jnp.square(w1 - w0)) for w0, w1 in pairs)
    angles = []
    for w0, w1 in pairs:
        u0 = w0 / jnp.maximum(_unit_norms(w0), 1e-30)
        u1 = w1 / jnp.maximum(_unit_norms(w1), 1e-30)
        chord = _unit_norms(u1 - u0)
        angles.append(2.0 * jnp.arcsin(jnp.clip(chord / 2.0, 0.0, 1.0)))
    return {
        "manifold_norm_mean": norms.mean(),
        "manifold_norm_min": norms.min(),
        "manifold_norm_max": norms.max(),
        "manifold_update_norm": jnp.sqrt(update_sq),
        "manifold_angle_mean": jnp.concatenate(angles).mean(),
    }


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


class Trainer(NamedTuple):
    """Labels, state initialiser and jitted steps of one config (cached, so that a
    rerun with the same config reuses the compilation)."""

    rule_labels: Any
    init_state: Callable[[], dict[str, Any]]
    train_step: Callable[..., tuple[dict[str, Any], dict[str, jax.Array]]]
    eval_step: Callable[..., dict[str, jax.Array]]


# Config keys that do not change what is compiled.
_BOOKKEEPING = frozenset(
    {
        "steps",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "max_to_keep",
        "halt_after_steps",
    }
)


def build_trainer(cfg: dict[str, Any]) -> Trainer:
    """Model, labels, optimizer and the jitted init/train/eval steps of a resolved
    config. Cached on the config (minus bookkeeping keys)."""
    key = json.dumps(
        {k: v for k, v in cfg.items() if k not in _BOOKKEEPING}, sort_keys=True
    )
    return _build_trainer(key)


@functools.lru_cache(maxsize=8)
def _build_trainer(key: str) -> Trainer:
    cfg = json.loads(key)
    # Labels and the optimizer only need shapes; the state is built in one jit.
    abstract = nnx.eval_shape(lambda: make_model(cfg, nnx.Rngs(cfg["seed"])))
    graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    rule_labels = riemax.labels_by_rule(
        nnx.to_pure_dict(abstract_params), cfg["label_pattern"]
    )
    tx = make_optimizer(cfg, rule_labels)

    def init_state():
        _, params, batch_stats = nnx.split(
            make_model(cfg, nnx.Rngs(cfg["seed"])), nnx.Param, nnx.BatchStat
        )
        params = nnx.to_pure_dict(params)
        if cfg["renormalize_manifold"]:
            params = _renormalize(params, rule_labels)
        return {
            "step": jnp.zeros([], jnp.int32),
            "params": params,
            "batch_stats": nnx.to_pure_dict(batch_stats),
            "opt_state": tx.init(params),
        }

    def loss_and_stats(params, batch_stats, x, y, train):
        net = nnx.merge(graphdef, params, batch_stats)
        net.train() if train else net.eval()
        logits = net(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        accuracy = (logits.argmax(-1) == y).mean()
        new_stats = nnx.to_pure_dict(nnx.state(net, nnx.BatchStat))
        return loss, (accuracy, new_stats)

    @jax.jit
    def train_step(state, x, y):
        grad_fn = jax.value_and_grad(loss_and_stats, has_aux=True)
        (loss, (accuracy, new_stats)), grads = grad_fn(
            state["params"], state["batch_stats"], x, y, True
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "accuracy": accuracy}
        metrics |= _manifold_measurements(state["params"], params, rule_labels)
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "batch_stats": new_stats,
            "opt_state": opt_state,
        }
        return new_state, metrics

    @jax.jit
    def eval_step(params, batch_stats, x, y):
        loss, (accuracy, _) = loss_and_stats(params, batch_stats, x, y, False)
        return {"loss": loss, "accuracy": accuracy}

    return Trainer(rule_labels, init_state, train_step, eval_step)


def _checkpoint_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def load_checkpoint(workdir: str, step: int | None = None) -> dict[str, Any]:
    """The raw saved state (``step, params, batch_stats, opt_state``) of a run.

    Restored without a target, so containers come back as plain dicts/lists (use
    it to read parameters; :func:`train_and_evaluate` restores with a target).
    ``step=None``: the latest checkpoint.
    """
    mngr = _checkpoint_manager(workdir, max_to_keep=None)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}")
    state = mngr.restore(step, args=ocp.args.StandardRestore())
    mngr.close()
    return state


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drops lines logged after ``last_step`` (after the restored checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(kept)


def _to_python(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def train_and_evaluate(config: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Trains the digits model and returns the final metrics.

    Args:
      config: Overrides of :data:`DEFAULT_CONFIG` (unknown keys raise ``ValueError``).
      workdir: Output directory (config, metrics, checkpoints). If it holds a
        checkpoint, training resumes from the latest one.

    Returns:
      A dict with ``step``, ``resumed_from`` (the restored step or ``None``),
      ``halted`` (True if ``halt_after_steps`` stopped the run early), and, if the run
      finished, ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``,
      ``wall_time_s`` and the manifold measurements of the last step.
    """
    cfg = resolve_config(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    t_start = time.time()

    data = load_data(cfg["split_seed"], cfg["test_size"])
    n_train = len(data["y_train"])

    trainer = build_trainer(cfg)
    train_step, eval_step = trainer.train_step, trainer.eval_step
    state = trainer.init_state()

    mngr = _checkpoint_manager(workdir, cfg["max_to_keep"])
    resumed_from = mngr.latest_step()
    if resumed_from is not None:
        state = mngr.restore(resumed_from, args=ocp.args.StandardRestore(state))
        _truncate_metrics(metrics_path, resumed_from)
        logging.info("resumed from step %d", resumed_from)
    step = int(state["step"])

    lr_e = _schedule(cfg["lr"], cfg["lr_decay_steps"], cfg["lr_decay_factor"])
    lr_g = (
        _schedule(cfg["lr_manifold"], cfg["lr_decay_steps"], cfg["lr_decay_factor"])
        if cfg["lr_manifold"] is not None
        else None
    )

    def evaluate() -> dict[str, float]:
        m = eval_step(
            state["params"], state["batch_stats"], data["x_test"], data["y_test"]
        )
        return _to_python(m)

    def lrs(at_step: int) -> dict[str, float]:
        # the update that produced ``at_step`` used the schedule at count at_step - 1
        count = jnp.asarray(max(at_step - 1, 0))
        out = {"lr": float(lr_e(count))}
        if lr_g is not None:
            out["lr_manifold"] = float(lr_g(count))
        return out

    def write(record: dict[str, Any]) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    halt_at = None
    if cfg["halt_after_steps"] is not None:
        halt_at = step + cfg["halt_after_steps"]
    window: list[dict[str, jax.Array]] = []
    last_train: dict[str, Any] = {}
    while step < cfg["steps"]:
        if halt_at is not None and step >= halt_at:
            mngr.wait_until_finished()
            mngr.close()
            return {"step": step, "resumed_from": resumed_from, "halted": True}
        idx = batch_indices(cfg["seed"], step, n_train, cfg["batch_size"])
        state, metrics = train_step(state, data["x_train"][idx], data["y_train"][idx])
        step += 1
        window.append(metrics)
        final = step == cfg["steps"]
        if step % cfg["log_every"] == 0 or final:
            window = jax.device_get(window)
            mean = {k: np.mean([m[k] for m in window]) for k in window[0]}
            last = _to_python(window[-1])
            # loss/accuracy averaged over the window; measurements of the last step
            last_train = _to_python(mean) | {
                k: v for k, v in last.items() if k.startswith("manifold_")
            }
            window = []
            write({"step": step, "split": "train", **last_train, **lrs(step)})
            logging.info(
                "step %d train loss %.4f acc %.4f",
                step,
                last_train["loss"],
                last_train["accuracy"],
            )
        if step % cfg["eval_every"] == 0 or final:
            test = evaluate()
            write({"step": step, "split": "test", **test, **lrs(step)})
            logging.info(
                "step %d test loss %.4f acc %.4f", step, test["loss"], test["accuracy"]
            )
        if step % cfg["checkpoint_every"] == 0 or final:
            mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    mngr.close()

    test = evaluate()
    result: dict[str, Any] = {
        "step": step,
        "resumed_from": resumed_from,
        "halted": False,
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "wall_time_s": time.time() - t_start,
    }
    if last_train:
        result["train_loss"] = last_train["loss"]
        result["train_accuracy"] = last_train["accuracy"]
        result |= {k: v for k, v in last_train.items() if k.startswith("manifold_")}
    return result


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.digits", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--optimizer", default=DEFAULT_CONFIG["optimizer"], choices=OPTIMIZERS
    )
    p.add_argument("--steps", type=int, default=DEFAULT_CONFIG["steps"])
    p.add_argument("--batch-size", type=int, default=DEFAULT_CONFIG["batch_size"])
    p.add_argument("--seed", type=int, default=DEFAULT_CONFIG["seed"])
    p.add_argument("--lr", type=float, default=None, help="Euclidean learning rate")
    p.add_argument("--lr-manifold", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=DEFAULT_CONFIG["weight_decay"])
    p.add_argument("--log-every", type=int, default=DEFAULT_CONFIG["log_every"])
    p.add_argument("--eval-every", type=int, default=DEFAULT_CONFIG["eval_every"])
    p.add_argument(
        "--checkpoint-every", type=int, default=DEFAULT_CONFIG["checkpoint_every"]
    )
    return p.parse_args(argv)


def _drop_orbax_info(record: std_logging.LogRecord) -> bool:
    """Keeps our progress lines, drops orbax's INFO chatter."""
    return "orbax" not in record.pathname or record.levelno >= std_logging.WARNING


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.set_verbosity(logging.INFO)
    std_logging.getLogger("absl").addFilter(_drop_orbax_info)
    config = {
        "optimizer": args.optimizer,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "lr": args.lr,
        "lr_manifold": args.lr_manifold,
        "weight_decay": args.weight_decay,
        "log_every": args.log_every,
        "eval_every": args.eval_every,
        "checkpoint_every": args.checkpoint_every,
    }
    result = train_and_evaluate(config, args.workdir)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
