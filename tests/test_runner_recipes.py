"""Recipes that survive new data: warm-up and cosine decay on every learning rate
of every optimizer of the runner's table, the recipe of the datasets without a
paper preset, and the image sets of ``benchmarks.recipes`` (a smoke run by
default; the full measurement, every optimizer on three sets ending well below
chance, is marked slow)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import riemax
from benchmarks import image_sets, recipes
from experiments import config as config_lib
from experiments import configs, optimizers

PARAMS = {
    "conv": {"kernel": jnp.linspace(-1.0, 1.0, 3 * 3 * 2 * 4).reshape(3, 3, 2, 4)},
    "fc": {
        "kernel": jnp.linspace(0.5, -0.5, 8 * 3).reshape(8, 3),
        "bias": jnp.linspace(-0.1, 0.1, 3),
    },
}
LABELS = {
    "conv": {"kernel": riemax.MANIFOLD},
    "fc": {"kernel": riemax.EUCLIDEAN, "bias": riemax.EUCLIDEAN},
}
GRADS = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, PARAMS)


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------


def values(schedule, counts):
    return [float(schedule(jnp.asarray(c))) for c in counts]


def test_warmup_then_cosine_to_zero():
    s = optimizers.make_schedule(0.4, "cosine", total_steps=104, warmup_steps=4)
    got = values(s, [0, 1, 3, 4, 54, 103])
    want = [0.1, 0.2, 0.4, 0.4, 0.2, 0.4 * 0.5 * (1 + math.cos(math.pi * 99 / 100))]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_warmup_keeps_the_papers_decay_points():
    s = optimizers.make_schedule(
        1.0, "piecewise", decay_steps=(5,), decay_factor=0.1, warmup_steps=4
    )
    np.testing.assert_allclose(
        values(s, [0, 2, 3, 5, 6]), [0.25, 0.75, 1.0, 1.0, 0.1], rtol=1e-6
    )
    plain = optimizers.make_schedule(
        1.0, "multistep", decay_epochs=(2,), decay_factor=0.5
    )
    assert values(plain, [0, 1, 2]) == [1.0, 1.0, 0.5]  # steps_per_epoch 1


# One optimizer of each way of building in the default run (two rates of a
# hybrid; one rate, per unit and element-wise; the rotational wrapper; decay
# inside the step); the others in the slow run.
BY_DEFAULT = ("sgdg", "adamsrt", "rotational-sgdm", "adamp")


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=() if n in BY_DEFAULT else pytest.mark.slow)
        for n in optimizers.names()
    ],
)
def test_every_rate_of_every_optimizer_follows_the_schedule(name):
    """The first update under warm-up (W = 4) equals the update of the same
    optimizer built with every base rate divided by 4: the schedule reaches the
    manifold and the Euclidean halves alike."""
    hyper = optimizers.resolve_hyper(name, {})
    groups = optimizers.param_groups(PARAMS, LABELS, set())
    decay = optimizers.decay_tree(groups, optimizers.group_decays(name, {}))

    entry = optimizers.lookup(name)

    def first_update(schedule):
        tx = optimizers.build(name, hyper, LABELS, schedule=schedule, decay=decay)
        params = PARAMS
        if entry.init_params is not None:
            params = entry.init_params(params, LABELS)
        updates, _ = tx.update(GRADS, tx.init(params), params)
        return updates

    @jax.jit  # one program for the three builds
    def updates():
        warm = first_update(
            lambda base: optimizers.make_schedule(
                base, "cosine", total_steps=20, warmup_steps=4
            )
        )
        return warm, first_update(lambda base: base / 4), first_update(lambda b: b)

    warm, quarter, full = updates()
    for a, b in zip(jax.tree.leaves(warm), jax.tree.leaves(quarter), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-8)
    moved = [float(jnp.abs(u).max()) for u in jax.tree.leaves(full)]
    assert all(m > 0 for m in moved), moved


# --------------------------------------------------------------------------------------
# The recipe of data without a paper preset
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["npz:mine.npz", "digits"])
def test_new_data_gets_the_recipe(dataset):
    cfg = config_lib.resolve({"dataset": dataset, "optimizer": "rotational-sgdm"})
    assert (cfg["schedule"], cfg["warmup_epochs"], cfg["bn_decay"]) == (
        "cosine",
        1,
        0.9,
    )
    assert (cfg["lr"], cfg["weight_decay"]) == (0.5, 1e-4)  # the table's rates
    derived = config_lib.derive(cfg, n_train=1200, image_shape=(28, 28, 1))
    assert derived["warmup_steps"] == derived["steps_per_epoch"]
    mine = config_lib.resolve({"dataset": dataset, "lr": 0.3, "schedule": "constant"})
    assert (mine["lr"], mine["schedule"]) == (0.3, "constant")  # flags win


def test_the_papers_presets_keep_their_schedules():
    for name in ("rbn-cifar10-wrn-28-10-sgdg", "srt-cifar10-resnet20-sgd"):
        cfg = config_lib.resolve(configs.get(name))
        assert cfg["warmup_epochs"] == 0 and cfg["schedule"] != "cosine"
    cifar = config_lib.resolve({"dataset": "cifar10", "optimizer": "sgd"})
    assert (cifar["bn_decay"], cifar["schedule"]) == (0.99, "piecewise")


def test_runs_saved_before_the_recipe_keys_resume():
    """A config.json written before ``warmup_epochs`` existed ran without one."""
    saved = config_lib.resolve({"dataset": "cifar10"})
    old = {k: v for k, v in saved.items() if k != "warmup_epochs"}
    assert config_lib.differing_keys(old, saved) == []
    digits = config_lib.resolve({"dataset": "digits"})  # the recipe's warm-up
    assert config_lib.differing_keys(old | {"dataset": "digits"}, digits) != []


# --------------------------------------------------------------------------------------
# The image sets and the benchmark
# --------------------------------------------------------------------------------------


def test_image_sets_have_their_shapes_and_classes(tmp_path):
    paths = image_sets.write_sets(str(tmp_path), n_train=60, n_test=20)
    for name, path in paths.items():
        shape, classes = image_sets.SETS[name]
        with np.load(path) as f:
            assert f["x_train"].shape == (60, *shape) and f["x_test"].shape == (
                20,
                *shape,
            )
            assert f["x_train"].dtype == np.uint8
            labels = np.concatenate([f["y_train"], f["y_test"]])
            assert labels.min() >= 0 and labels.max() < classes
            assert len(np.unique(labels)) > classes // 2
    again = image_sets.write_sets(str(tmp_path / "again"), n_train=60, n_test=20)
    with np.load(paths["shapes32"]) as a, np.load(again["shapes32"]) as b:
        np.testing.assert_array_equal(a["x_train"], b["x_train"])  # deterministic


def test_recipes_benchmark_smoke(tmp_path, capsys):
    (table,) = recipes.main(
        ["--smoke", f"--workdir={tmp_path}", "--optimizers=sgd", "--sets=gratings16"]
    )
    out = capsys.readouterr().out
    assert table.rows[0][0] == "sgd" and len(table.ratios) == 1
    assert math.isfinite(table.ratios[0]) and "chance 95" in out


@pytest.mark.slow
def test_every_optimizer_trains_well_below_chance_on_three_image_sets(tmp_path):
    """The measurement of experiments/README.md at a smaller size: every
    optimizer of the table, at the recipe, on each of the three sets."""
    (table,) = recipes.main([f"--workdir={tmp_path}", "--train=1200", "--test=400"])
    bad = [
        (row[0], cell)
        for row, ratios in zip(
            table.rows,
            np.reshape(table.ratios, (len(table.rows), -1)),
            strict=True,
        )
        for cell, r in zip(row[1:], ratios, strict=True)
        if not r < 0.5 or "diverged" in cell
    ]
    assert not bad, bad
