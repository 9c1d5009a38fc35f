"""Tests of experiments/models.py: the registry, parameter counts, BatchNorm and
dropout placement (the training loop is tested in test_experiment_train.py, the
config and presets in test_experiment_config.py).

Compile time dominates on CPU, so the module runs with XLA's most expensive
optimizations disabled (restored afterwards) and uses tiny inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import riemax
from experiments import models

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


# Parameter counts: WRN-28-10 from the paper (36.5M), ResNet-20 from the measured
# notes (0.27M), the other WRNs from Zagoruyko & Komodakis (2016, table 1).
PUBLISHED_COUNTS = {
    "wrn-28-10": 36.5e6,
    "wrn-16-4": 2.7e6,
    "wrn-22-8": 17.2e6,
    "wrn-40-10": 55.8e6,
    "resnet20": 0.27e6,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_published_parameter_counts(name):
    count = models.count_params(models.param_shapes(name, 10))
    # the published figures are rounded to 0.1M (0.01M for ResNet-20)
    assert count == pytest.approx(PUBLISHED_COUNTS[name], rel=2e-2)


def _conv(k, cin, cout):
    return k * k * cin * cout


def test_counts_follow_the_spec_architectures():
    """Counts written out from the layer lists of docs/algorithms.md#roburin-et-al-models, #stock-et-al-models."""
    # SRT resnet18: stem 3x3x3->64 + BN; 4 stages x 2 BasicBlocks; option-B 1x1
    # shortcut + BN where the width or stride changes; Linear(512, 10).
    n = _conv(3, 3, 64) + 2 * 64
    cin = 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            n += _conv(3, cin, width) + _conv(3, width, width) + 4 * width
            if block == 0 and cin != width:
                n += _conv(1, cin, width) + 2 * width
            cin = width
    n += 512 * 10 + 10
    assert models.count_params(models.param_shapes("resnet18", 10)) == n
    # SRT vgg16: 13 x (3x3 conv, no bias, BN with scale), single Linear(512, 10)
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    n = sum(_conv(3, a, b) + 2 * b for a, b in zip([3, *widths], widths, strict=False))
    assert models.count_params(models.param_shapes("vgg16-srt", 10)) == n + 5130
    # ENorm FC: 3072 -> 500, 13 x 500 -> 500, 500 -> 10, no biases, BN after hidden
    n = 3072 * 500 + 13 * 500 * 500 + 500 * 10 + 14 * 2 * 500
    assert models.count_params(models.param_shapes("enorm-fc", 10)) == n
    # ENorm conv: 9 bias-free convs, BN after conv3 (128) and conv6 (256)
    convs = [
        (3, 3, 128),
        (3, 128, 128),
        (3, 128, 128),
        (3, 128, 256),
        (3, 256, 256),
        (3, 256, 256),
        (3, 256, 320),
        (1, 320, 320),
        (1, 320, 10),
    ]
    n = sum(_conv(*c) for c in convs) + 2 * (128 + 256)
    shapes = models.param_shapes("enorm-conv", 10, (28, 28, 3))
    assert models.count_params(shapes) == n


def test_batchnorm_and_dropout_placement():
    """Which kernels feed a BatchNorm directly (structural labels), which
    BatchNorms have a scale, and where dropout sits."""
    sample = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

    def feeds_bn(name, **kw):
        model = nnx.eval_shape(
            lambda: models.build_model(name, 10, rngs=nnx.Rngs(0), **kw)
        )
        labels = riemax.labels_from_model(model, sample)
        flat = jax.tree_util.tree_flatten_with_path(labels)[0]
        return model, {
            "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
            for p, lab in flat
            if lab == "manifold"
        }

    # post-activation ResNet: every conv (incl. the 1x1 shortcut) is followed by BN
    model, manifold = feeds_bn("resnet20")
    convs = {p for p in _kernel_paths(model) if "conv" in p}
    assert manifold == convs and len(convs) == 1 + 18 + 2
    # pre-activation WRN: only the first conv of each block feeds a BN directly,
    # and the stem (k > 1: the first block's shortcut is a projection of the
    # activated input); dropout only between the two convs of a block, BN with
    # gamma and beta
    model, manifold = feeds_bn("wrn-16-4", dropout=0.3)
    blocks = {f"group{g}/{i}/conv0/kernel" for g in (2, 3, 4) for i in (0, 1)}
    assert manifold == blocks | {"conv/kernel"}
    assert isinstance(model.group3[1].dropout, nnx.Dropout)
    assert model.bn.scale is not None
    # RBN VGG: BN without gamma; dropout after the pools only if asked
    vgg = nnx.eval_shape(lambda: models.build_model("vgg13", 10, rngs=nnx.Rngs(0)))
    assert vgg.bn[0].scale is None and vgg.dropout is None and vgg.fc_bn
    # default BatchNorm decays: 0.99 (RBN-TF models), 0.9 (PyTorch ones)
    assert models.default_bn_decay("wrn-28-10") == 0.99
    assert models.default_bn_decay("resnet18") == 0.9
    assert models.default_bn_decay("vgg16-srt") == 0.9


def _kernel_paths(model):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
        for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if len(leaf.shape) >= 2
    }
