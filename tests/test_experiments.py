"""Smoke tests for experiments/: the model registry and the digits main job.

Compile time dominates on CPU, so the module runs with XLA's most expensive
optimizations disabled (restored afterwards) and uses tiny models and a few steps.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import fast_compile

import riemax
from experiments import digits, models

# Small model/step settings shared by the digits tests.
TINY = {
    "steps": 4,
    "batch_size": 16,
    "widths": (4, 8),
    "convs_per_stage": 1,
    "log_every": 2,
    "eval_every": 4,
    "checkpoint_every": 4,
}


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    with fast_compile():
        yield


# --------------------------------------------------------------------------------------
# models.py
# --------------------------------------------------------------------------------------


def _input_shape(name: str) -> tuple[int, int, int]:
    return (28, 28, 3) if name == "enorm-conv" else (32, 32, 3)


@pytest.mark.parametrize("name", models.model_names())
def test_registry_builds_abstractly(name):
    """Every registered model builds without allocating and outputs (N, 10)."""
    shape = _input_shape(name)

    def build_and_forward():
        model = models.build_model(name, 10, rngs=nnx.Rngs(0), input_shape=shape)
        return nnx.state(model, nnx.Param), model(jnp.zeros((2, *shape)))

    params, out = nnx.eval_shape(build_and_forward)
    assert out.shape == (2, 10)
    expected = models.param_shapes(name, 10, shape) if name == "resnet20" else None
    leaves = jax.tree.leaves(nnx.to_pure_dict(params))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    if expected is not None:
        assert jax.tree.map(lambda x: x.shape, expected) == jax.tree.map(
            lambda x: x.shape, nnx.to_pure_dict(params)
        )


# One small instance of every model class (the full-size ones are shape-checked
# above): name -> (builder, input shape).
SMALL_MODELS = {
    "vgg-rbn": (
        lambda rngs: models.VGG(
            None,
            10,
            stages=((1, 8), (2, 16)),
            fc_width=32,
            dropout=0.3,
            input_shape=(8, 8, 3),
            rngs=rngs,
        ),
        (8, 8, 3),
    ),
    "vgg-srt": (
        lambda rngs: models.VGG(
            None,
            10,
            stages=((1, 8), (1, 16)),
            fc_bn=False,
            bn_scale=True,
            bn_momentum=0.9,
            init="torch",
            padding="torch",
            input_shape=(8, 8, 3),
            rngs=rngs,
        ),
        (8, 8, 3),
    ),
    "wrn-10-2": (
        lambda rngs: models.build_model(
            "wrn-10-2", 10, dropout=0.3, input_shape=(8, 8, 3), rngs=rngs
        ),
        (8, 8, 3),
    ),
    "resnet20": (
        lambda rngs: models.build_model(
            "resnet20", 10, input_shape=(8, 8, 3), rngs=rngs
        ),
        (8, 8, 3),
    ),
    "enorm-fc": (
        lambda rngs: models.build_model(
            "enorm-fc", 10, n_layers=4, hidden=32, input_shape=(4, 4, 3), rngs=rngs
        ),
        (4, 4, 3),
    ),
    "enorm-conv": (
        lambda rngs: models.build_model(
            "enorm-conv", 10, input_shape=(12, 12, 3), rngs=rngs
        ),
        (12, 12, 3),
    ),
}


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_forward_is_finite(name):
    """One jitted build + train-mode + eval-mode forward at a tiny input."""
    build, shape = SMALL_MODELS[name]

    @jax.jit
    def run(x):
        model = build(nnx.Rngs(0))
        y_train = model(x)
        model.eval()  # BatchNorm running averages, dropout off
        return y_train, model(x)

    x = jax.random.normal(jax.random.key(1), (3, *shape))
    y_train, y_eval = run(x)
    assert y_train.shape == y_eval.shape == (3, 10)
    assert jnp.isfinite(y_train).all() and jnp.isfinite(y_eval).all()
    assert not jnp.allclose(y_train, y_eval)  # the two modes differ


def test_vgg_srt_and_small_stages():
    srt = models.param_shapes("vgg16-srt", 10)
    rbn = models.param_shapes("vgg16", 10)
    assert "scale" in srt["bn"][0] and "scale" not in rbn["bn"][0]
    assert "fc0" in rbn and "fc0" not in srt
    assert len(srt["conv"]) == len(rbn["conv"]) == 13
    small = nnx.eval_shape(
        lambda: models.VGG(
            None,
            10,
            stages=((2, 8), (1, 16)),
            fc_bn=False,
            input_shape=(8, 8, 1),
            rngs=nnx.Rngs(0),
        )
    )
    assert small.fc.kernel.shape == (2 * 2 * 16, 10)


def test_wrn_28_10_param_count_and_rule_labels():
    tree = models.param_shapes("wrn-28-10", 10)
    assert models.count_params(tree) == pytest.approx(36.5e6, rel=2e-3)
    assert tree["group2"][0]["conv0"]["kernel"].shape == (3, 3, 16, 160)
    labels = riemax.labels_by_rule(tree)
    assert labels["group2"][0]["conv0"]["kernel"] == "euclidean"  # 144 < 160
    assert labels["conv"]["kernel"] == "manifold"  # stem, 27 > 16
    assert labels["group2"][0]["conv1"]["kernel"] == "manifold"
    assert labels["group3"][0]["conv0"]["kernel"] == "manifold"
    assert labels["group2"][0]["projection"]["kernel"] == "euclidean"
    assert labels["fc"]["kernel"] == "euclidean"
    n_manifold = sum(label == "manifold" for label in jax.tree.leaves(labels))
    assert n_manifold == 1 + 3 * 4 * 2 - 1  # stem + all block convs but one


def test_enorm_models_have_no_biases_and_padded_quirk():
    fc = models.param_shapes("enorm-fc", 10)
    conv = models.param_shapes("enorm-conv", 10, (28, 28, 3))
    assert [k for k in fc if k.startswith("fc_")] == [f"fc_{i:02d}" for i in range(15)]
    assert fc["fc_00"]["kernel"].shape == (3072, 500)
    assert fc["fc_14"]["kernel"].shape == (500, 10)
    for tree in (fc, conv):
        paths = [
            jax.tree_util.keystr(p)
            for p, _ in jax.tree_util.tree_leaves_with_path(tree)
        ]
        assert not any("fc" in p and "bias" in p for p in paths)
        assert not any("conv" in p and "bias" in p for p in paths)
    assert conv["conv9"]["kernel"].shape == (1, 1, 320, 10)
    with pytest.raises(ValueError, match="1x1"):
        nnx.eval_shape(
            lambda: models.EnormConv(rngs=nnx.Rngs(0))(jnp.zeros((1, 32, 32, 3)))
        )


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="wrn-28-10") as err:
        models.build_model("resnet-50", 10, rngs=nnx.Rngs(0))
    assert "vgg16" in str(err.value) and "enorm-conv" in str(err.value)
    with pytest.raises(ValueError, match="valid names"):
        models.param_shapes("nope", 10)


# --------------------------------------------------------------------------------------
# digits.py
# --------------------------------------------------------------------------------------


def _read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_data_split_and_batches_are_deterministic():
    data = digits.load_data()
    assert data["x_train"].shape == (1437, 8, 8, 1)
    assert data["x_test"].shape == (360, 8, 8, 1)
    a = digits.batch_indices(3, 40, 1437, 64)
    np.testing.assert_array_equal(a, digits.batch_indices(3, 40, 1437, 64))
    assert not np.array_equal(a, digits.batch_indices(4, 40, 1437, 64))
    epoch = np.concatenate([digits.batch_indices(0, s, 1437, 64) for s in range(22)])
    assert len(np.unique(epoch)) == 22 * 64  # no repeats within an epoch


@pytest.mark.parametrize("optimizer", digits.OPTIMIZERS)
def test_train_and_evaluate_smoke(optimizer, tmp_path):
    workdir = str(tmp_path)
    result = digits.train_and_evaluate({**TINY, "optimizer": optimizer}, workdir)
    assert result["step"] == 4 and not result["halted"]
    assert np.isfinite(result["test_loss"]) and 0.0 <= result["test_accuracy"] <= 1.0

    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    assert config["optimizer"] == optimizer and config["lr"] is not None

    records = _read_metrics(workdir)
    assert [(r["step"], r["split"]) for r in records] == [
        (2, "train"),
        (4, "train"),
        (4, "test"),
    ]
    for r in records:
        for key in ("loss", "accuracy", "lr"):
            assert np.isfinite(r[key]), (key, r)
    train = records[-2]
    assert np.isfinite(train["manifold_norm_mean"]) and train["manifold_norm_max"] > 0
    if optimizer in ("sgdg", "adamg"):  # kernels stay on the unit sphere
        assert train["manifold_norm_min"] == pytest.approx(1.0, abs=1e-5)
        assert train["manifold_norm_max"] == pytest.approx(1.0, abs=1e-5)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    config = {**TINY, "optimizer": "sgdg", "steps": 6, "checkpoint_every": 3}
    straight = str(tmp_path / "straight")
    digits.train_and_evaluate(config, straight)

    resumed = str(tmp_path / "resumed")
    first = digits.train_and_evaluate({**config, "halt_after_steps": 4}, resumed)
    assert first["halted"] and first["step"] == 4  # "killed" after step 4
    second = digits.train_and_evaluate(config, resumed)
    assert second["resumed_from"] == 3 and second["step"] == 6

    # metrics after the restored checkpoint were rewritten, not duplicated
    assert [r["step"] for r in _read_metrics(resumed) if r["split"] == "train"] == [
        2,
        4,
        6,
    ]
    a, b = digits.load_checkpoint(straight), digits.load_checkpoint(resumed)
    assert int(a["step"]) == int(b["step"]) == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # a finished run restarted in the same workdir does no more steps
    again = digits.train_and_evaluate(config, resumed)
    assert again["resumed_from"] == 6 and again["step"] == 6
    assert again["test_accuracy"] == second["test_accuracy"]


def test_unknown_optimizer_and_config_key_raise(tmp_path):
    with pytest.raises(ValueError, match="valid optimizers: sgd, sgdg, adamg"):
        digits.train_and_evaluate({"optimizer": "rmsprop"}, str(tmp_path))
    with pytest.raises(ValueError, match="valid keys"):
        digits.train_and_evaluate({"stpes": 3}, str(tmp_path))


def test_main_is_thin(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake(config, workdir):
        seen.update(config=config, workdir=workdir)
        return {"step": config["steps"], "test_accuracy": 0.5}

    monkeypatch.setattr(digits, "train_and_evaluate", fake)
    digits.main(
        [
            "--workdir",
            str(tmp_path),
            "--optimizer",
            "adamg",
            "--steps",
            "7",
            "--batch-size",
            "16",
            "--lr-manifold",
            "0.03",
        ]
    )
    assert seen["workdir"] == str(tmp_path)
    config = digits.resolve_config(seen["config"])  # every key is a config key
    assert (config["optimizer"], config["steps"], config["batch_size"]) == (
        "adamg",
        7,
        16,
    )
    assert (config["lr"], config["lr_manifold"]) == (0.01, 0.03)  # lr from defaults
    assert json.loads(capsys.readouterr().out)["step"] == 7
    with pytest.raises(SystemExit):  # argparse lists the valid choices
        digits.main(["--workdir", str(tmp_path), "--optimizer", "rmsprop"])
