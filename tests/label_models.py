"""Tiny Flax models with hand-derived manifold/Euclidean answers for test_labels.

Each case lists, for every kernel, ``(structural, numerical)``: the label that
``labels_from_model`` must give (conservative: only a kernel whose output goes
straight, or through shape-only ops, into a BatchNorm) and the one that
``labels_by_invariance`` must give (true per-unit scale invariance of the loss,
BatchNorm in training mode). Every leaf not listed is Euclidean for both.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

M, E = "manifold", "euclidean"
IMAGE = (8, 6, 6, 3)  # N, H, W, C
VECTOR = (16, 5)  # N, features


def _bias() -> Any:
    """A non-zero bias initialiser: with a zero bias, conv+bias -> ReLU -> BN
    would be invariant at init and the hand-derived answer would not hold."""
    return nnx.initializers.normal(0.5)


class ConvBN(nnx.Module):
    """Bias-free conv -> BN -> ReLU -> head."""

    def __init__(self, rngs, bias=False):
        kw = {"bias_init": _bias()} if bias else {}
        self.conv = nnx.Conv(3, 8, (3, 3), use_bias=bias, rngs=rngs, **kw)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))


class ConvBiasBN(ConvBN):
    """Conv with bias -> BN: BN's mean subtraction removes the bias."""

    def __init__(self, rngs):
        super().__init__(rngs, bias=True)


class ConvReluBN(nnx.Module):
    """Conv -> ReLU -> BN; invariant iff the conv has no bias (ReLU is
    positively homogeneous), never detected structurally."""

    def __init__(self, rngs, bias=False):
        kw = {"bias_init": _bias()} if bias else {}
        self.conv = nnx.Conv(3, 8, (3, 3), use_bias=bias, rngs=rngs, **kw)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.bn(nnx.relu(self.conv(x))).mean((1, 2)))


class ConvBiasReluBN(ConvReluBN):
    def __init__(self, rngs):
        super().__init__(rngs, bias=True)


class Residual(nnx.Module):
    """conv0 -> bn0 -> ReLU = h; bn1(conv1(h) + h): conv1 feeds a residual sum."""

    def __init__(self, rngs):
        self.conv0 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn0 = nnx.BatchNorm(8, rngs=rngs)
        self.conv1 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn0(self.conv0(x)))
        h = nnx.relu(self.bn1(self.conv1(h) + h))
        return self.head(h.mean((1, 2)))


class DenseBN(nnx.Module):
    """Dense (with bias) -> BN -> ReLU -> head."""

    def __init__(self, rngs):
        self.fc = nnx.Linear(5, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.fc(x))))


class ConvReshapeBN(nnx.Module):
    """conv -> reshape (N*H*W, C) -> BN -> reshape back: the same units."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        y = self.conv(x)
        z = self.bn(y.reshape(-1, y.shape[-1])).reshape(y.shape)
        return self.head(nnx.relu(z).mean((1, 2)))


class ConvFlattenBN(nnx.Module):
    """conv -> flatten (N, H*W*C) -> BN over H*W*C features: invariant per unit
    (each feature of unit j scales by the same factor), but the unit axis is no
    longer BN's feature axis, so structural detection must stay conservative."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(6 * 6 * 4, rngs=rngs)
        self.head = nnx.Linear(6 * 6 * 4, 2, rngs=rngs)

    def __call__(self, x):
        y = self.conv(x)
        return self.head(nnx.relu(self.bn(y.reshape(y.shape[0], -1))))


class DenseLN(nnx.Module):
    """Dense -> LayerNorm: invariant to scaling the whole kernel, not per unit."""

    def __init__(self, rngs):
        self.fc = nnx.Linear(5, 8, use_bias=False, rngs=rngs)
        self.ln = nnx.LayerNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.ln(self.fc(x))))


class TiedDenseBN(nnx.Module):
    """fc -> BN, but fc's kernel is reused (tied) by the output layer."""

    def __init__(self, rngs):
        self.fc = nnx.Linear(5, 8, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.fc(x))) @ self.fc.kernel[...].T


class PreActBlock(nnx.Module):
    """Pre-activation WRN block: BN-ReLU-conv1-BN-ReLU-conv2 (+ shortcut)."""

    def __init__(self, cin, cout, rngs):
        self.bn1 = nnx.BatchNorm(cin, rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.projection = (
            nnx.Conv(cin, cout, (1, 1), use_bias=False, rngs=rngs)
            if cin != cout
            else None
        )

    def __call__(self, x):
        a = nnx.relu(self.bn1(x))
        h = self.conv2(nnx.relu(self.bn2(self.conv1(a))))
        return h + (self.projection(a) if self.projection is not None else x)


class PreActWRN(nnx.Module):
    """stem -> identity block -> projection block -> BN-ReLU-pool-head.

    The stem output feeds block0's BN *and* its identity shortcut: Euclidean.
    """

    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.block0 = PreActBlock(4, 4, rngs)
        self.block1 = PreActBlock(4, 8, rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        h = self.block1(self.block0(self.stem(x)))
        return self.head(nnx.relu(self.bn(h)).mean((1, 2)))


class PostActResNet(nnx.Module):
    """stem-BN-ReLU, then a BasicBlock with a conv1x1-BN projection shortcut."""

    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(4, rngs=rngs)
        self.conv1 = nnx.Conv(4, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, rngs=rngs)
        self.shortcut = nnx.Conv(4, 8, (1, 1), strides=2, use_bias=False, rngs=rngs)
        self.shortcut_bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem_bn(self.stem(x)))
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = nnx.relu(self.bn2(self.conv2(h)) + self.shortcut_bn(self.shortcut(x)))
        return self.head(h.mean((1, 2)))


class VGG(nnx.Module):
    """[conv-BN-ReLU] x2, pool, conv-BN-ReLU, pool, flatten, fc-BN-ReLU, head."""

    def __init__(self, rngs):
        def conv(i, o):
            return nnx.Conv(i, o, (3, 3), use_bias=False, rngs=rngs)

        self.conv0, self.bn0 = conv(3, 4), nnx.BatchNorm(4, use_scale=False, rngs=rngs)
        self.conv1, self.bn1 = conv(4, 4), nnx.BatchNorm(4, use_scale=False, rngs=rngs)
        self.conv2, self.bn2 = conv(4, 8), nnx.BatchNorm(8, use_scale=False, rngs=rngs)
        self.fc = nnx.Linear(8 * 2 * 2, 8, use_bias=False, rngs=rngs)
        self.fc_bn = nnx.BatchNorm(8, use_scale=False, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        def pool(h):
            return nnx.max_pool(h, (2, 2), strides=(2, 2))

        h = nnx.relu(self.bn0(self.conv0(x)))
        h = pool(nnx.relu(self.bn1(self.conv1(h))))
        h = pool(nnx.relu(self.bn2(self.conv2(h))))
        h = nnx.relu(self.fc_bn(self.fc(h.reshape(h.shape[0], -1))))
        return self.head(h)


class Case(NamedTuple):
    model: type
    input_shape: tuple[int, ...]
    expected: dict[str, tuple[str, str]]  # kernel path -> (structural, numerical)


NNX_CASES = {
    "conv_bn": Case(ConvBN, IMAGE, {"conv/kernel": (M, M), "head/kernel": (E, E)}),
    "conv_bias_bn": Case(ConvBiasBN, IMAGE, {"conv/kernel": (M, M)}),
    "conv_bias_relu_bn": Case(ConvBiasReluBN, IMAGE, {"conv/kernel": (E, E)}),
    "conv_relu_bn": Case(ConvReluBN, IMAGE, {"conv/kernel": (E, M)}),
    "residual": Case(Residual, IMAGE, {"conv0/kernel": (M, M), "conv1/kernel": (E, E)}),
    "dense_bn": Case(DenseBN, VECTOR, {"fc/kernel": (M, M), "head/kernel": (E, E)}),
    "conv_reshape_bn": Case(ConvReshapeBN, IMAGE, {"conv/kernel": (M, M)}),
    "conv_flatten_bn": Case(ConvFlattenBN, IMAGE, {"conv/kernel": (E, M)}),
    "dense_ln": Case(DenseLN, VECTOR, {"fc/kernel": (E, E)}),
    "tied_dense_bn": Case(TiedDenseBN, VECTOR, {"fc/kernel": (E, E)}),
    "preact_wrn": Case(
        PreActWRN,
        IMAGE,
        {
            "stem/kernel": (E, E),
            "block0/conv1/kernel": (M, M),
            "block0/conv2/kernel": (E, E),
            "block1/conv1/kernel": (M, M),
            "block1/conv2/kernel": (E, E),
            "block1/projection/kernel": (E, E),
        },
    ),
    "postact_resnet": Case(
        PostActResNet,
        IMAGE,
        {
            "stem/kernel": (M, M),
            "conv1/kernel": (M, M),
            "conv2/kernel": (M, M),
            "shortcut/kernel": (M, M),
        },
    ),
    "vgg": Case(
        VGG,
        (8, 8, 8, 3),
        {
            "conv0/kernel": (M, M),
            "conv1/kernel": (M, M),
            "conv2/kernel": (M, M),
            "fc/kernel": (M, M),
            "head/kernel": (E, E),
        },
    ),
}


def nnx_loss(model: nnx.Module, out_dim: int = 2):
    """``(loss_fn, params, batch)`` for numerical detection (BN in train mode)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)  # fresh Variables at merge: BN may update them

    def loss_fn(params, batch):
        out = nnx.merge(graphdef, params, rest)(batch["x"])
        return jnp.mean((out - batch["y"]) ** 2)

    return loss_fn, nnx.as_pure(params)


def batch_for(input_shape, out_shape, seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    return {
        "x": jax.random.normal(kx, input_shape),
        "y": jax.random.normal(ky, out_shape),
    }


# --- Linen -----------------------------------------------------------------


class LinenConvBN(nn.Module):
    bias: bool = False
    relu_first: bool = False

    @nn.compact
    def __call__(self, x, train: bool = True):
        bias_init = nn.initializers.normal(0.5)  # non-zero: see _bias
        y = nn.Conv(8, (3, 3), use_bias=self.bias, bias_init=bias_init)(x)
        if self.relu_first:
            y = nn.relu(y)
        y = nn.BatchNorm(use_running_average=not train)(y)
        if not self.relu_first:
            y = nn.relu(y)
        return nn.Dense(2)(y.mean((1, 2)))


class LinenResidualDenseBN(nn.Module):
    """Dense -> BN; conv -> BN -> ReLU (h) -> conv + h."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        h = nn.relu(
            nn.BatchNorm(use_running_average=not train)(
                nn.Conv(8, (3, 3), use_bias=False, name="conv0")(x)
            )
        )
        h = nn.Conv(8, (3, 3), use_bias=False, name="conv1")(h) + h
        # Flatten, not a spatial mean: a mean shrinks the pre-BN variance so much
        # that BatchNorm's epsilon visibly breaks the invariance (eps / var ~ 1e-2).
        h = nn.Dense(8, name="fc")(h.reshape(h.shape[0], -1))
        h = nn.relu(nn.BatchNorm(use_running_average=not train)(h))
        return nn.Dense(2, name="head")(h)


class LinenBasicBlock(nn.Module):
    """Post-activation BasicBlock with a conv1x1-BN projection shortcut."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        def bn(name):
            return nn.BatchNorm(use_running_average=not train, name=name)

        def conv(name, size, strides=1):
            return nn.Conv(8, size, strides=strides, use_bias=False, name=name)

        h = nn.relu(bn("bn1")(conv("conv1", (3, 3), 2)(x)))
        h = bn("bn2")(conv("conv2", (3, 3))(h))
        s = bn("shortcut_bn")(conv("shortcut", (1, 1), 2)(x))
        return nn.Dense(2, name="head")(nn.relu(h + s).mean((1, 2)))


LINEN_CASES = {
    "conv_bn": (LinenConvBN(), {"Conv_0/kernel": (M, M), "Dense_0/kernel": (E, E)}),
    "conv_bias_bn": (LinenConvBN(bias=True), {"Conv_0/kernel": (M, M)}),
    "conv_bias_relu_bn": (
        LinenConvBN(bias=True, relu_first=True),
        {"Conv_0/kernel": (E, E)},
    ),
    "conv_relu_bn": (LinenConvBN(relu_first=True), {"Conv_0/kernel": (E, M)}),
    "residual_dense_bn": (
        LinenResidualDenseBN(),
        {
            "conv0/kernel": (M, M),
            "conv1/kernel": (E, E),
            "fc/kernel": (M, M),
            "head/kernel": (E, E),
        },
    ),
    "basic_block": (
        LinenBasicBlock(),
        {
            "conv1/kernel": (M, M),
            "conv2/kernel": (M, M),
            "shortcut/kernel": (M, M),
            "head/kernel": (E, E),
        },
    ),
}


def linen_loss(module: nn.Module, variables: Any):
    """``(loss_fn, params)`` for a Linen module, BN with batch statistics."""
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(params, batch):
        out, _ = module.apply(
            {"params": params, **rest}, batch["x"], train=True, mutable=["batch_stats"]
        )
        return jnp.mean((out - batch["y"]) ** 2)

    return loss_fn, variables["params"]


def wrn_param_shapes(depth: int = 28, k: int = 10, num_classes: int = 10):
    """Parameter-shape tree of a pre-activation WRN-depth-k, Flax-style names."""
    n = (depth - 4) // 6

    def sds(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    def bn(c):
        return {"scale": sds(c), "bias": sds(c)}

    params: dict[str, Any] = {"stem": {"conv": {"kernel": sds(3, 3, 3, 16)}}}
    cin = 16
    for g, width in zip((2, 3, 4), (16 * k, 32 * k, 64 * k), strict=False):
        group = {}
        for i in range(n):
            block = {
                "bn1": bn(cin),
                "conv1": {"kernel": sds(3, 3, cin, width)},
                "bn2": bn(width),
                "conv2": {"kernel": sds(3, 3, width, width)},
            }
            if cin != width:
                block["projection"] = {"kernel": sds(1, 1, cin, width)}
            group[f"block{i}"] = block
            cin = width
        params[f"group{g}"] = group
    params["bn"] = bn(cin)
    params["classifier"] = {"kernel": sds(cin, num_classes), "bias": sds(num_classes)}
    return params
