r"""The experiments' one training loop: :func:`train_and_evaluate`.

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
   :class:`TrainingDiverged` when the loss is not finite.

Metrics (``metrics.jsonl``): ``step, epoch, split, loss, error`` (train: means over
the steps since the previous line), ``lr`` (and ``lr_manifold``) of the last
update, per-group kernel norms ``norm_{manifold,euclidean}_{mean,min,max}`` and
angular steps ``angle_{manifold,euclidean}_{mean,max}`` (radians per step) from
:mod:`riemax.diagnostics`, ``step_time_s`` and ``images_per_s``.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import riemax
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models, optimizers
from experiments.config import ConfigError

AXIS = "batch"  # the pmap axis
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


class TrainingDiverged(RuntimeError):
    """The training loss became non-finite."""


# --------------------------------------------------------------------------------------
# Status lines
# --------------------------------------------------------------------------------------

_T0 = time.time()


def status(msg: str) -> None:
    """One human-readable line on stderr, with the seconds since start."""
    if jax.process_index() == 0:
        print(f"[{time.time() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Measurements: the one place that calls riemax.diagnostics
# --------------------------------------------------------------------------------------


def measurements(old: Any, new: Any, labels: Any) -> dict[str, jax.Array]:
    """Per-group unit norms and angles moved in the last step (inside jit)."""
    from riemax import diagnostics

    norms = diagnostics.summary(diagnostics.unit_norms(new), labels, "norm_")
    angles = diagnostics.summary(diagnostics.angles_moved(old, new), labels, "angle_")
    out = {k: v for k, v in norms.items() if k.count("_") == 2}
    out |= {
        k: v for k, v in angles.items() if k.count("_") == 2 and not k.endswith("min")
    }
    return out


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------


class Devices:
    """The device layout of a run: ``pmap`` over the local devices or ``jit`` on a
    1-D mesh of all devices; in a multi-process run each process feeds its rows of
    every global batch."""

    def __init__(self, mode: str, num_devices: int | None):
        self.mode = mode
        local = jax.local_devices()
        if num_devices is not None:
            if num_devices > len(local):
                raise ConfigError(
                    f"num_devices {num_devices} > {len(local)} local devices"
                )
            if jax.process_count() > 1 and num_devices != len(local):
                raise ConfigError("num_devices must use every local device multihost")
            local = local[:num_devices]
        self.local = local
        self.n_local = len(local)
        self.n_proc = jax.process_count()
        self.proc = jax.process_index()
        self.n_global = self.n_local * self.n_proc
        if mode == "pmap":
            self.mesh = jax.sharding.Mesh(np.array(local), (AXIS,))
            self.batch_sharding = jax.sharding.NamedSharding(
                self.mesh, jax.sharding.PartitionSpec(AXIS)
            )
        else:
            devices = jax.devices() if self.n_proc > 1 else local
            self.mesh = jax.sharding.Mesh(np.array(devices), ("data",))
            self.batch_sharding = jax.sharding.NamedSharding(
                self.mesh, jax.sharding.PartitionSpec("data")
            )
            self.replicated = jax.sharding.NamedSharding(
                self.mesh, jax.sharding.PartitionSpec()
            )

    def describe(self) -> str:
        kind = self.local[0].platform
        procs = f"{self.n_proc} processes x " if self.n_proc > 1 else ""
        return f"{self.mode} over {procs}{self.n_local} local {kind} device(s)"

    def check_divides(self, n: int, key: str) -> None:
        if n % self.n_global:
            raise ConfigError(
                f"{key} {n} does not divide over {self.n_global} devices "
                f"({self.n_proc} process(es) x {self.n_local} local); use a "
                f"multiple of {self.n_global}"
            )

    def rows(self, n: int) -> slice:
        """This process's rows of a global batch of ``n``."""
        per = n // self.n_proc
        return slice(self.proc * per, (self.proc + 1) * per)

    def put_batch(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
        """This process's rows onto its devices (pmap: a leading device axis)."""
        out = []
        for a in arrays:
            if self.mode == "pmap":
                a = a.reshape(self.n_local, -1, *a.shape[1:])
                out.append(jax.device_put(a, self.batch_sharding))
            else:
                out.append(
                    jax.make_array_from_process_local_data(self.batch_sharding, a)
                )
        return tuple(out)

    def put_state(self, host: Any) -> Any:
        if self.mode == "pmap":

            def rep(x):
                x = np.asarray(x)
                return jax.device_put(
                    np.broadcast_to(x, (self.n_local, *x.shape)), self.batch_sharding
                )

            return jax.tree.map(rep, host)

        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(
                x.shape, self.replicated, lambda i: x[i]
            )

        return jax.tree.map(put, host)

    def get(self, tree: Any) -> Any:
        """Host numpy copy of replicated values (device 0's)."""

        def one(x):
            local = np.asarray(x.addressable_data(0))
            return local[0] if self.mode == "pmap" else local

        return jax.tree.map(one, tree)


# --------------------------------------------------------------------------------------
# Model, labels, optimizer and steps of a config
# --------------------------------------------------------------------------------------


def model_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    name = cfg["model"]
    kw: dict[str, Any] = {}
    if cfg["keep_prob"] is not None and cfg["keep_prob"] < 1:
        if not name.startswith(("vgg", "wrn")):
            raise ConfigError(f"keep_prob: model {name} has no dropout")
        kw["dropout"] = 1.0 - cfg["keep_prob"]
    if cfg["bn_decay"] is not None:
        kw["bn_momentum"] = cfg["bn_decay"]
    if name == "vgg-small":
        kw["widths"] = tuple(cfg["widths"])
        kw["convs_per_stage"] = cfg["convs_per_stage"]
    if name == "enorm-fc":
        kw["n_layers"] = cfg["n_layers"] or 15
    return kw


def _paper_labels(params: Any, rule: str) -> tuple[Any, dict[str, str]]:
    if rule == "ndim":  # every tensor with at least two axes
        labels = jax.tree.map(
            lambda p: riemax.MANIFOLD if p.ndim >= 2 else riemax.EUCLIDEAN, params
        )
        why = {
            "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): (
                "rule: at least two axes"
                if p.ndim >= 2
                else "rule: fewer than two axes"
            )
            for path, p in jax.tree_util.tree_flatten_with_path(params)[0]
        }
        return labels, why
    if rule == "srt":
        return riemax.labels_by_regex(
            params,
            [(r"conv[^/]*(/\d+)?/kernel$", riemax.MANIFOLD), (".*", riemax.EUCLIDEAN)],
            return_details=True,
        )
    return riemax.labels_by_rule(params, "conv", return_details=True)


def _batchnorm_paths(model: nnx.Module) -> set[str]:
    return {
        "/".join(str(k) for k in path)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.BatchNorm)
    }


def _cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), y
    )


class Trainer:
    """Everything compiled for one config and device layout (cached, so that a
    resumed run in the same process reuses the compilations)."""

    def __init__(self, cfg: dict[str, Any], norm: tuple[list, list], dev: Devices):
        self.cfg, self.dev = cfg, dev
        self.entry = optimizers.lookup(cfg["optimizer"])
        shape = tuple(cfg["input_shape"])
        kw = model_kwargs(cfg)
        name, classes = cfg["model"], cfg["num_classes"]
        synced = dev.mode == "pmap" and not cfg["bn_per_device"]

        def build(seed=0, **extra):
            return models.build_model(
                name,
                classes,
                rngs=nnx.Rngs(seed),
                input_shape=shape,
                **(kw | extra),
            )

        self.build = build
        abstract = nnx.eval_shape(build)
        sample = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
        try:
            jax.eval_shape(lambda: build()(jnp.zeros((2, *shape))))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model {name} on {shape} inputs: {e}") from None
        self.graphdef, abs_params, abs_stats, self.abs_rest = nnx.split(
            abstract, nnx.Param, nnx.BatchStat, ...
        )
        self.abs_params = nnx.to_pure_dict(abs_params)
        axis = {"bn_axis_name": AXIS} if synced else {}
        self.train_graphdef = nnx.split(nnx.eval_shape(lambda: build(**axis)))[0]
        self.recal_graphdef = nnx.split(
            nnx.eval_shape(lambda: build(**axis, bn_momentum=0.0))
        )[0]
        self.bn_paths = _batchnorm_paths(abstract)

        # labels
        mode = cfg["labels"]
        if mode == "paper":
            self.labels, self.why = _paper_labels(
                self.abs_params, self.entry.paper_labels
            )
        elif mode == "structural":
            self.labels, self.why = riemax.labels_from_model(
                abstract, sample, params=self.abs_params, return_details=True
            )
        else:  # invariance: measured on the first batch at init (set_labels)
            self.labels, self.why = None, {}
        self.norm_mean = np.asarray(norm[0], np.float32)
        self.norm_std = np.asarray(norm[1], np.float32)

        # ENorm chain (checked now: a model whose kernels do not chain is an error)
        self.enorm_paths: list[str] = []
        if cfg["enorm"]:
            self.enorm_paths = riemax.kernel_chain(abstract, jnp.zeros((1, *shape)))
            try:
                jax.eval_shape(
                    lambda p: riemax.apply_enorm(
                        p, optax.EmptyState(), self.enorm_paths, c=cfg["enorm"]
                    ),
                    self.abs_params,
                )
            except ValueError as e:
                raise ConfigError(
                    f"enorm needs a model whose kernels form a chain; {name}: {e}"
                ) from None

        def schedule(base):
            return optimizers.make_schedule(
                base,
                cfg["schedule"],
                decay_steps=tuple(cfg["decay_steps"]),
                decay_epochs=tuple(cfg["decay_epochs"]),
                decay_factor=cfg["decay_factor"],
                steps_per_epoch=cfg["steps_per_epoch"],
                epochs=cfg["epochs"],
            )

        self.schedule = schedule
        self.hyper = {k: cfg[k] for k in self.entry.config_keys}
        if self.labels is not None:
            self._finish()

    def set_labels(self, labels, why) -> None:
        self.labels, self.why = labels, why
        self._finish()

    def _finish(self) -> None:
        cfg = self.cfg
        groups = optimizers.param_groups(self.abs_params, self.labels, self.bn_paths)
        self.groups = groups
        decays = {
            "manifold": cfg["manifold_decay"],
            "kernel": cfg["weight_decay"],
            "bias": cfg["bias_decay"],
            "gamma": cfg["gamma_decay"],
            "beta": cfg["beta_decay"],
        }
        self.tx = optimizers.build(
            cfg["optimizer"],
            self.hyper,
            self.labels,
            schedule=self.schedule,
            decay=optimizers.decay_tree(groups, decays),
        )
        self.lr_fns = {"lr": self.schedule(self.hyper["lr"])}
        if self.hyper.get("lr_manifold") is not None:
            self.lr_fns["lr_manifold"] = self.schedule(self.hyper["lr_manifold"])
        self._init = self._make_init()
        self._compile()

    # ---- state

    def _make_init(self):
        cfg, labels, tx = self.cfg, self.labels, self.tx

        def init(seed):
            model = self.build(jax.random.key(seed))
            _, params, stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
            params = nnx.to_pure_dict(params)
            if cfg["unit_init"]:
                params = jax.tree.map(
                    lambda w, lab: (
                        riemax.sphere.unit(w) if lab == riemax.MANIFOLD else w
                    ),
                    params,
                    labels,
                )
            if self.entry.init_params is not None:
                params = self.entry.init_params(params, labels)
            return {
                "step": jnp.zeros([], jnp.int32),
                "rng": jax.random.key_data(jax.random.key(seed)),
                "params": params,
                "batch_stats": nnx.to_pure_dict(stats),
                "opt_state": tx.init(params),
            }

        return jax.jit(init)

    def init_host_state(self) -> dict[str, Any]:
        """The initial train state as host numpy arrays (the jitted init takes the
        seed as an argument: one compilation per trainer). ``rng`` is the key data
        of the run's base key, from which every step's augmentation and dropout
        keys are folded."""
        seed = jnp.asarray(self.cfg["seed"], jnp.int32)
        return jax.device_get(self._init(seed))

    def rest_state(self):
        """The non-parameter, non-statistics state (dropout RNG streams), built
        inside the traced steps: its values are reseeded per step anyway."""

        def fill(x):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.key(0)
            return jnp.zeros(x.shape, x.dtype)

        return jax.tree.map(fill, self.abs_rest)

    # ---- preprocessing on device

    def preprocess(self, x, key, train: bool, offset=0, global_batch=None):
        cfg = self.cfg
        x = x.astype(jnp.float32)
        side = tuple(cfg["input_shape"][:2])
        if train and cfg["augment"]:
            x = data_lib.augment(
                x,
                key,
                pad=cfg["pad"],
                pad_mode=cfg["pad_mode"],
                crop=side,
                flip=cfg["flip"],
                offset=offset,
                global_batch=global_batch,
            )
        else:
            x = data_lib.center_crop(x, side)
        return (x - self.norm_mean) / self.norm_std

    # ---- compiled steps

    def _compile(self) -> None:
        cfg, dev, labels = self.cfg, self.dev, self.labels
        tx = self.tx
        pmap = dev.mode == "pmap"
        global_batch = cfg["batch_size"]
        local_batch = global_batch // dev.n_global
        process_offset = dev.proc * (global_batch // dev.n_proc)
        train_graphdef, graphdef = self.train_graphdef, self.graphdef
        lr_fns = self.lr_fns
        enorm_paths, c = self.enorm_paths, cfg["enorm"]

        def train_step(state, x, y):
            step = state["step"]
            key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
            k_aug, k_drop = jax.random.split(key)
            if pmap:
                index = jax.lax.axis_index(AXIS)
                offset = process_offset + index * local_batch
                k_drop = jax.random.fold_in(
                    k_drop, process_offset // max(local_batch, 1) + index
                )
            else:
                offset = 0
            x = self.preprocess(x, k_aug, True, offset, global_batch)

            def loss_fn(params):
                net = nnx.merge(
                    train_graphdef, params, state["batch_stats"], self.rest_state()
                )
                nnx.reseed(net, default=k_drop)
                net.train()
                logits = net(x)
                loss = _cross_entropy(logits, y).mean()
                new_stats = nnx.to_pure_dict(nnx.state(net, nnx.BatchStat))
                return loss, (logits, new_stats)

            (loss, (logits, new_stats)), grads = jax.value_and_grad(
                loss_fn, has_aux=True
            )(state["params"])
            error = jnp.mean(logits.argmax(-1) != y)
            if pmap:
                grads = jax.lax.pmean(grads, AXIS)
                loss, error = jax.lax.pmean((loss, error), AXIS)
                if cfg["bn_per_device"]:
                    new_stats = jax.lax.pmean(new_stats, AXIS)
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            if enorm_paths:
                params, opt_state = riemax.apply_enorm(
                    params, opt_state, enorm_paths, c=c
                )
            metrics = {"loss": loss, "error": error}
            metrics |= {k: f(step) for k, f in lr_fns.items()}
            metrics |= measurements(state["params"], params, labels)
            new_state = {
                "step": step + 1,
                "rng": state["rng"],
                "params": params,
                "batch_stats": new_stats,
                "opt_state": opt_state,
            }
            return new_state, metrics

        def eval_step(params, stats, x, y, mask):
            net = nnx.merge(graphdef, params, stats, self.rest_state())
            net.eval()
            logits = net(self.preprocess(x, None, False))
            losses = _cross_entropy(logits, y)
            wrong = (logits.argmax(-1) != y).astype(jnp.float32)
            sums = jnp.stack(
                [jnp.sum(losses * mask), jnp.sum(wrong * mask), jnp.sum(mask)]
            )
            return jax.lax.psum(sums, AXIS) if pmap else sums

        recal_graphdef = self.recal_graphdef

        def recal_step(params, stats, x):
            net = nnx.merge(recal_graphdef, params, stats, self.rest_state())
            net.train()
            net.set_attributes(deterministic=True, raise_if_not_found=False)
            net(self.preprocess(x, None, False))
            return nnx.to_pure_dict(nnx.state(net, nnx.BatchStat))

        if pmap:
            # Multi-process: pmap maps over the local devices and its collectives
            # span every process's devices (which it needs devices=None for).
            devices = dev.local if dev.n_proc == 1 else None
            pmap_ = functools.partial(jax.pmap, axis_name=AXIS, devices=devices)
            self.train_step = pmap_(train_step, donate_argnums=(0,))
            self.eval_step = pmap_(eval_step)
            self.recal_step = pmap_(recal_step)
        else:
            rep, bat = dev.replicated, dev.batch_sharding
            self.train_step = jax.jit(
                train_step,
                in_shardings=(rep, bat, bat),
                out_shardings=(rep, rep),
                donate_argnums=(0,),
            )
            self.eval_step = jax.jit(
                eval_step, in_shardings=(rep, rep, bat, bat, bat), out_shardings=rep
            )
            self.recal_step = jax.jit(
                recal_step, in_shardings=(rep, rep, bat), out_shardings=rep
            )

    # ---- evaluation

    def evaluate(self, params, stats, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Loss and error over all of ``(x, y)`` (the last batch padded and
        masked), with ``eval_batch_size`` examples per call."""
        size = self.cfg["eval_batch_size"]
        totals = None
        for start in range(0, len(y), size):
            xb, yb = x[start : start + size], y[start : start + size]
            mask = np.ones(size, np.float32)
            if len(yb) < size:
                pad = size - len(yb)
                mask[len(yb) :] = 0
                xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
                yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
            rows = self.dev.rows(size)
            sums = self.eval_step(
                params, stats, *self.dev.put_batch(xb[rows], yb[rows], mask[rows])
            )
            totals = sums if totals is None else totals + sums
        loss, wrong, count = self.dev.get(totals).tolist()
        return {"loss": loss / count, "error": wrong / count}

    def recalibrated_stats(self, params, stats, train_x, at_step: int):
        """BatchNorm statistics averaged over ``bn_recalibrate`` training batches
        (unaugmented), drawn by ``(seed, step)``."""
        n = self.cfg["bn_recalibrate"]
        batch = self.cfg["batch_size"]
        rng = np.random.default_rng([self.cfg["seed"], 104729, at_step])
        total = None
        for _ in range(n):
            idx = np.sort(rng.choice(len(train_x), batch, replace=False))
            xb = train_x[idx][self.dev.rows(batch)]
            new = self.recal_step(params, stats, *self.dev.put_batch(xb))
            total = new if total is None else jax.tree.map(jnp.add, total, new)
        return jax.tree.map(lambda t: t / n, total)


@functools.lru_cache(maxsize=16)
def _cached_trainer(key: str, norm: str, mode: str, num_devices: int | None) -> Trainer:
    cfg = json.loads(key)
    return Trainer(cfg, tuple(json.loads(norm)), Devices(mode, num_devices))


_NOT_COMPILED = frozenset(
    {
        "steps",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "max_to_keep",
        "halt_after_steps",
        "progress",
        "tensorboard",
        "select_best",
        "data_dir",
        "eval_batch_size",
        "bn_recalibrate",
        "val_size",
        "train_size",
        "split_seed",
        "seed",
        "test_size",
        "num_train",
        "num_val",
        "num_test",
    }
)


def build_trainer(cfg: dict[str, Any], norm) -> Trainer:
    key = json.dumps(
        {k: v for k, v in cfg.items() if k not in _NOT_COMPILED}, sort_keys=True
    )
    if cfg["labels"] == "invariance":  # labels depend on the data: no cache
        return Trainer(cfg, norm, Devices(cfg["parallel"], cfg["num_devices"]))
    trainer = copy.copy(
        _cached_trainer(key, json.dumps(norm), cfg["parallel"], cfg["num_devices"])
    )
    trainer.cfg = cfg  # the same compiled values; bookkeeping values of this run
    return trainer


# --------------------------------------------------------------------------------------
# Data of a config
# --------------------------------------------------------------------------------------


def load_data(cfg: dict[str, Any]) -> tuple[data_lib.Dataset, tuple[list, list]]:
    """The config's splits and its normalization (mean, std in pixel units)."""
    where = cfg["dataset"]
    status(f"loading data: {where}")
    dataset = data_lib.load(
        cfg["dataset"],
        data_dir=cfg["data_dir"],
        train_split=cfg["train_split"] or "train",
        split_seed=cfg["split_seed"],
        test_size=cfg["test_size"] or 360,
        log=status,
    )
    val = cfg["val_size"]
    if 0 < val < 1:
        val = int(math.floor(val * len(dataset.y_train)))
    dataset = data_lib.carve(
        dataset,
        val_size=val,
        train_size=cfg["train_size"],
        split_seed=cfg["split_seed"],
    )
    channels = dataset.image_shape[-1]
    if cfg["normalization"] == "train_stats":
        mean, std = data_lib.channel_stats(dataset.x_train)
        std = [s if s > 0 else 1.0 for s in std]
    elif cfg["normalization"] == "scale":
        mean, std = [0.0] * channels, [dataset.pixel_max] * channels
    else:
        scale = dataset.pixel_max
        mean = [m * scale for m in cfg["norm_mean"]] * (
            channels // len(cfg["norm_mean"])
        )
        std = [s * scale for s in cfg["norm_std"]] * (channels // len(cfg["norm_std"]))
    return dataset, (mean, std)


def prepare_run(config: dict[str, Any]) -> tuple[dict, data_lib.Dataset, Trainer]:
    """Resolves the config, loads the data and builds the trainer; raises
    :class:`ConfigError` / :class:`experiments.data.DataError` on bad input."""
    cfg = config_lib.resolve(config)
    if cfg["multihost"]:
        init_multihost()
    dataset, norm = load_data(cfg)
    cfg = config_lib.derive(
        cfg, n_train=len(dataset.y_train), image_shape=dataset.image_shape
    )
    cfg["num_classes"] = dataset.num_classes
    cfg["num_val"] = 0 if dataset.y_val is None else len(dataset.y_val)
    cfg["num_test"] = len(dataset.y_test)
    dev = Devices(cfg["parallel"], cfg["num_devices"])
    dev.check_divides(cfg["batch_size"], "batch_size")
    if cfg["eval_batch_size"] is None:
        n_eval = max(cfg["num_test"], cfg["num_val"])
        cfg["eval_batch_size"] = (
            math.ceil(min(1000, n_eval) / dev.n_global) * dev.n_global
        )
    dev.check_divides(cfg["eval_batch_size"], "eval_batch_size")
    status(
        f"data: {cfg['num_train']} train / {cfg['num_val']} val / {cfg['num_test']} "
        f"test images {tuple(dataset.image_shape)}, {cfg['num_classes']} classes; "
        f"{cfg['steps']} steps of {cfg['batch_size']} ({cfg['steps_per_epoch']} per "
        f"epoch); {dev.describe()}"
    )
    status(f"building {cfg['model']} and the {cfg['optimizer']} optimizer")
    trainer = build_trainer(cfg, norm)
    return cfg, dataset, trainer


_MULTIHOST_ARGS: dict[str, Any] = {}


def init_multihost(**kwargs: Any) -> None:
    """``jax.distributed.initialize`` once (CPU collectives through gloo)."""
    kwargs = kwargs or _MULTIHOST_ARGS
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})


# --------------------------------------------------------------------------------------
# Workdir, checkpoints, metrics
# --------------------------------------------------------------------------------------


def check_workdir(workdir: str, cfg: dict[str, Any], overwrite: bool) -> None:
    """Refuses a workdir that holds a run of another config (unless ``overwrite``,
    which removes this runner's outputs)."""
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


def _manager(path: str, max_to_keep: int | None):
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
        mngr = _manager(path, max_to_keep)
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
                return _manager(path, max_to_keep), None, None


def load_checkpoint(workdir: str, step: int | None = None) -> dict[str, Any]:
    """The saved train state of a run (``step, params, batch_stats, opt_state``)
    as plain dicts and numpy arrays (restored without a target: use it to read
    parameters). ``step=None``: the latest checkpoint."""
    import orbax.checkpoint as ocp

    mngr = _manager(os.path.join(workdir, CHECKPOINTS), None)
    step = mngr.latest_step() if step is None else step
    if step is None:
        mngr.close()
        raise FileNotFoundError(f"no checkpoint in {workdir}")
    tree = mngr.restore(step, args=ocp.args.StandardRestore())
    mngr.close()
    return tree["state"]


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


def _write_json(path: str, obj: Any) -> None:
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _to_float(tree: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in tree.items()}


def train_and_evaluate(
    config: dict[str, Any], workdir: str, *, overwrite: bool = False
) -> dict[str, Any]:
    """Trains one config in ``workdir`` (resuming from its latest checkpoint).

    Args:
      config: Overrides of :data:`experiments.config.DEFAULT_CONFIG`.
      workdir: Output directory: ``config.json``, ``labels.txt``,
        ``metrics.jsonl``, ``result.json``, ``checkpoints/``.
      overwrite: Remove this runner's outputs from ``workdir`` first.

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
    cfg, dataset, trainer = prepare_run(config)
    check_workdir(workdir, cfg, overwrite)

    # Labels measured on data need the initial parameters.
    if trainer.labels is None:
        status("measuring the manifold split on the first batch (labels=invariance)")
        _invariance_labels(trainer, dataset)
    host_state = trainer.init_host_state()
    report = riemax.label_report(
        host_state["params"], trainer.labels, details=trainer.why
    )
    status(f"manifold split ({cfg['labels']} labels):\n" + report)

    # ---- touch the workdir
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, "config.json"), cfg)
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
        _manager(os.path.join(workdir, BEST), None) if cfg["select_best"] else None
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

    bar = tqdm(
        total=total,
        initial=start,
        unit="step",
        disable=None if cfg["progress"] else True,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def say(msg):
        if bar.disable:
            status(msg)
        else:
            bar.write(msg, file=sys.stderr)

    window: list[dict[str, jax.Array]] = []
    last_train: dict[str, float] = {}
    first_step_s = None
    t_window = time.time()
    steps_in_window = 0
    images_per_s = None
    step = start
    halted = False
    batches = data_lib.prefetch(produce, range(start, total))
    try:
        if start < total:
            status("compiling the train step (runs with the first step)")
        for step in range(start + 1, total + 1):
            if halt_at is not None and step - 1 >= halt_at:
                halted = True
                step -= 1
                break
            xb, yb = next(batches)
            state, metrics = trainer.train_step(state, xb, yb)
            if first_step_s is None:
                jax.block_until_ready(metrics)
                first_step_s = time.time() - t_start
                status(f"first step done ({first_step_s:.1f}s since start); training")
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
                    status(
                        f"step {step}/{total} train loss {record['loss']:.4f} "
                        f"error {record['error']:.4f}"
                        + (f" ({images_per_s:.0f} img/s)" if images_per_s else "")
                    )
                window, t_window, steps_in_window = [], time.time(), 0
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
        else:
            step = max(start, total)
    finally:
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
    _write_json(os.path.join(workdir, "result.json"), result)
    status(
        f"done: step {step}, test error {result['test_error']:.4f}"
        + (
            f", best-val test error {result['best_test_error']:.4f}"
            if "best_test_error" in result
            else ""
        )
    )
    return result


def _invariance_labels(trainer: Trainer, dataset: data_lib.Dataset) -> None:
    cfg = trainer.cfg
    # The params only need the model's own init for the measurement.
    graphdef = trainer.graphdef

    @jax.jit
    def init(seed):
        model = trainer.build(jax.random.key(seed))
        _, params, stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    params, stats = init(jnp.asarray(cfg["seed"], jnp.int32))
    idx = data_lib.BatchOrder(len(dataset.y_train), cfg["batch_size"], cfg["seed"])(0)
    x = trainer.preprocess(jnp.asarray(dataset.x_train[idx]), None, False)
    y = jnp.asarray(dataset.y_train[idx])

    def loss_fn(p, batch):
        net = nnx.merge(graphdef, p, stats, trainer.rest_state())
        net.train()
        net.set_attributes(deterministic=True, raise_if_not_found=False)
        return _cross_entropy(net(batch[0]), batch[1]).mean()

    labels, why = riemax.labels_by_invariance(
        loss_fn, params, (x, y), return_details=True
    )
    trainer.set_labels(labels, why)


# --------------------------------------------------------------------------------------
# --task=test
# --------------------------------------------------------------------------------------


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
        _invariance_labels(trainer, dataset)
    target = {"state": trainer.init_host_state(), "best": np.array([np.inf, -1.0])}
    mngr = _manager(os.path.join(workdir, CHECKPOINTS), None)
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
