"""What is compiled for one config: the model, its labels and optimizer, and the
jitted (or pmapped) train, evaluation and BatchNorm-recalibration steps
(:class:`Trainer`), cached per compiled config (:func:`build_trainer`)."""

from __future__ import annotations

import copy
import functools
import json
import math
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
from experiments.train.devices import AXIS, Devices

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
    if name in ("vgg-small", "vgg-small-gap"):
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
    if rule == "stiefel":  # the Cayley authors' rule: conv, fan-in >= fan-out
        return riemax.labels_by_rule(params, "conv", fan="tall", return_details=True)
    if rule == "kernels":  # Bernstein's: every weight matrix on the manifold
        return riemax.labels_by_rule(params, "", fan="any", return_details=True)
    return riemax.labels_by_rule(params, "conv", return_details=True)


def _tall_only(params: Any, labels: Any, why: dict[str, str]):
    """The labels with every manifold kernel whose matrix view
    ``w.reshape(-1, out)`` is wide (fan-in < fan-out) moved to the Euclidean
    half, and the reason added to ``why`` (orthonormal units need a tall
    matrix)."""
    why = dict(why)

    def one(path, p, label):
        if label != riemax.MANIFOLD:
            return label
        fan_in = math.prod(p.shape[:-1]) if p.ndim >= 2 else 0
        if p.ndim >= 2 and fan_in >= p.shape[-1]:
            return label
        where = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        why[where] = (
            f"wide (fan-in {fan_in} < fan-out {p.shape[-1] if p.ndim else 0}): "
            "its units cannot be orthonormal, kept Euclidean"
        )
        return riemax.EUCLIDEAN

    labels = jax.tree_util.tree_map_with_path(one, params, labels)
    return labels, why


def _batchnorm_paths(model: nnx.Module) -> set[str]:
    return {
        "/".join(str(k) for k in path)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.BatchNorm)
    }


def cross_entropy(logits, y):
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

        self.schedule = functools.partial(optimizers.schedule_of, cfg)
        self.hyper = {k: cfg[k] for k in self.entry.config_keys}
        if self.labels is not None:
            self._finish()

    def set_labels(self, labels, why) -> None:
        self.labels, self.why = labels, why
        self._finish()

    def _finish(self) -> None:
        cfg = self.cfg
        if self.entry.fan == "tall":
            self.labels, self.why = _tall_only(self.abs_params, self.labels, self.why)
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
            rebuild_at=(
                optimizers.decay_counts(cfg) if self.entry.reset_at_decay else ()
            ),
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
            if self.entry.start is not None:
                # Once, before the optimizer state: a resumed run restores its
                # params over this state and is not projected again.
                params = riemax.to_manifold(params, self.entry.start, labels)
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
                loss = cross_entropy(logits, y).mean()
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
            losses = cross_entropy(logits, y)
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


def build_trainer(cfg: dict[str, Any], norm) -> Trainer:
    # A schedule that depends on the run's length is compiled with it.
    free = config_lib.NOT_COMPILED
    if cfg["schedule"] in optimizers.LENGTH_DEPENDENT:
        free = free - {"steps"}
    key = json.dumps({k: v for k, v in cfg.items() if k not in free}, sort_keys=True)
    if cfg["labels"] == "invariance":  # labels depend on the data: no cache
        return Trainer(cfg, norm, Devices(cfg["parallel"], cfg["num_devices"]))
    trainer = copy.copy(
        _cached_trainer(key, json.dumps(norm), cfg["parallel"], cfg["num_devices"])
    )
    trainer.cfg = cfg  # the same compiled values; bookkeeping values of this run
    return trainer
