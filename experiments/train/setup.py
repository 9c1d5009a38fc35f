"""From a config to a run: the data of a config (:func:`load_data`), the data,
the resolved config and the compiled trainer (:func:`prepare_run`), and the
manifold split measured on data (:func:`invariance_labels`)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import riemax
from experiments import config as config_lib
from experiments import console
from experiments import data as data_lib
from experiments.train.devices import Devices, init_multihost
from experiments.train.steps import Trainer, build_trainer, cross_entropy

status = console.status


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


def prepare_run(
    config: dict[str, Any], multihost: dict[str, Any] | None = None
) -> tuple[dict, data_lib.Dataset, Trainer]:
    """Resolves the config (a resolved one stays as it is), loads the data and
    builds the trainer; raises :class:`ConfigError` /
    :class:`experiments.data.DataError` on bad input. ``multihost``: the
    arguments of ``jax.distributed.initialize`` for a ``multihost`` config."""
    cfg = config_lib.resolve(config)
    if cfg["multihost"]:
        init_multihost(**(multihost or {}))
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


def invariance_labels(trainer: Trainer, dataset: data_lib.Dataset) -> None:
    """``labels=invariance``: the manifold split measured on the first batch at
    the initial parameters (:func:`riemax.labels_by_invariance`), set on the
    trainer."""
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
        return cross_entropy(net(batch[0]), batch[1]).mean()

    labels, why = riemax.labels_by_invariance(
        loss_fn, params, (x, y), return_details=True
    )
    trainer.set_labels(labels, why)
