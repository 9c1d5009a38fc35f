"""Flax NNX models of the three source papers, in one place.

Every model takes NHWC inputs (Flax layout) and returns logits. Train/eval mode is
switched with ``model.train()`` / ``model.eval()`` (BatchNorm batch vs. running
statistics, dropout on/off).

Parameter paths are readable and follow the papers' naming, because the papers' manifold
rule (:func:`riemax.labels_by_rule`) is syntactic: a kernel is eligible for the
manifold iff its path contains ``conv`` and it is undercomplete. Hence:

- conv kernels live in modules named ``conv``, ``conv0``, ``conv1``, ... ;
- the 1x1 shortcut of the wide ResNet is named ``projection`` (so RBN's rule excludes
  it), the 1x1 shortcut of the post-activation ResNet is ``shortcut_conv``;
- dense layers are ``fc``, ``fc0``, ``fc1``, ``fc_00``, ... ; BatchNorms ``bn*``.

Models:

- :class:`VGG` -- RBN-TF VGG-N (conv-BN(no scale)-ReLU, FC512-BN-ReLU x2, FC), or SRT's
  ``vgg16`` (BN with scale, single Linear classifier) via ``fc_bn=False`` plus the SRT
  BatchNorm/init options (registry name ``vgg16-srt``). ``vgg-small``: stages of
  ``convs_per_stage`` convs of each of ``widths`` and a single Linear classifier
  (the offline digits model; any input of at least ``2**len(widths)`` pixels).
- :class:`WideResNet` -- RBN-TF pre-activation WRN-d-k.
- :class:`ResNet` -- SRT post-activation ResNet-20 / ResNet-18 (option-B shortcut).
- :class:`EnormFC`, :class:`EnormConv` -- the ENorm paper's bias-free FC and fully
  convolutional CIFAR-10 models (including the padded 1x1 conv quirk).

Every model takes ``bn_momentum`` (running-average decay, default the paper's) and
``bn_axis_name`` (average the batch statistics over a ``pmap`` axis: synchronised
BatchNorm) keyword arguments.

Use :func:`build_model` for the registry and :func:`param_shapes` to get the parameter
shape tree of any registered model without allocating it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "EnormConv",
    "EnormFC",
    "ResNet",
    "VGG",
    "WideResNet",
    "build_model",
    "check_name",
    "count_params",
    "default_bn_decay",
    "model_names",
    "param_shapes",
    "rbn_init",
    "torch_bias_init",
    "torch_default_init",
]

Initializer = Callable[..., jax.Array]

# --------------------------------------------------------------------------------------
# Initialisers
# --------------------------------------------------------------------------------------


def _fan_in(shape: Sequence[int]) -> int:
    """Fan-in of a Flax kernel: all axes but the last (``(in, out)`` or HWIO)."""
    return math.prod(shape[:-1])


def rbn_init(factor: float = 2.0) -> Initializer:
    """RBN-TF's ``variance_scaling_initializer()``: TF truncated normal (resampled
    outside +-2 std) with std ``sqrt(1.3 * factor / fan_in)``.

    Unlike ``jax.nn.initializers.variance_scaling(..., "truncated_normal")`` the std is
    *not* corrected for the truncation, exactly as in TF's contrib initializer.
    """

    def init(key, shape, dtype=jnp.float32):
        std = math.sqrt(1.3 * factor / _fan_in(shape))
        return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

    return init


def torch_default_init() -> Initializer:
    """PyTorch's default Conv/Linear weight init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
    (``kaiming_uniform_(a=sqrt(5))``)."""
    return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default bias init for a layer with the given fan-in."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def kaiming_normal_init() -> Initializer:
    """PyTorch's ``kaiming_normal_`` (fan_in, ReLU gain): ``N(0, 2/fan_in)``."""
    return jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")


_INITS = {"rbn": rbn_init, "torch": torch_default_init}


def _kernel_init(init: str) -> Initializer:
    if init not in _INITS:
        raise ValueError(f"unknown init {init!r}; valid: {sorted(_INITS)}")
    return _INITS[init]()


def _rbn_bn(
    num_features: int,
    *,
    use_scale: bool,
    rngs: nnx.Rngs,
    momentum: float | None = None,
    axis_name: str | None = None,
) -> nnx.BatchNorm:
    """RBN-TF BatchNorm: decay 0.99, eps 1e-5, beta always, gamma iff ``use_scale``.

    ``momentum`` overrides the running-average decay; ``axis_name`` averages the
    batch statistics over that mapped axis (synchronised BatchNorm under pmap).
    """
    return nnx.BatchNorm(
        num_features,
        momentum=0.99 if momentum is None else momentum,
        epsilon=1e-5,
        use_scale=use_scale,
        axis_name=axis_name,
        rngs=rngs,
    )


def _torch_bn(
    num_features: int,
    *,
    rngs: nnx.Rngs,
    momentum: float | None = None,
    axis_name: str | None = None,
) -> nnx.BatchNorm:
    """PyTorch ``BatchNorm2d`` defaults: momentum 0.1 (= Flax decay 0.9), eps 1e-5.

    (PyTorch updates the running variance with the unbiased batch variance; Flax uses
    the biased one. Irrelevant for training, tiny difference in eval mode.)
    """
    return nnx.BatchNorm(
        num_features,
        momentum=0.9 if momentum is None else momentum,
        epsilon=1e-5,
        axis_name=axis_name,
        rngs=rngs,
    )


_TORCH_PAD1 = (
    (1, 1),
    (1, 1),
)  # PyTorch ``padding=1`` (Flax "SAME" differs at stride 2)


# --------------------------------------------------------------------------------------
# VGG (RBN-TF vgg11/13/16/19; SRT vgg16)
# --------------------------------------------------------------------------------------

_VGG_CONVS = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
_VGG_WIDTHS = (64, 128, 256, 512, 512)


class VGG(nnx.Module):
    """VGG-N: stages of 3x3 conv (no bias) -> BN -> ReLU, 2x2 max-pool after each stage.

    RBN-TF style (the default): BN without scale (beta only), decay 0.99, eps 1e-5;
    optional dropout after each pool; flatten -> FC512 (no bias) -> BN -> ReLU -> FC512
    (no bias) -> BN -> ReLU -> FC ``num_classes`` (bias); TF variance-scaling init.

    SRT ``vgg16`` (``fc_bn=False, bn_scale=True, bn_momentum=0.9, init="torch",
    padding="torch"``): BN with scale, flatten -> single Linear (bias), PyTorch init.

    Args:
      depth: 11, 13, 16 or 19 (``None`` if ``stages`` is given).
      num_classes: Number of logits.
      fc_bn: RBN classifier (FC-BN-ReLU x2, FC) if True, a single Linear if False.
      dropout: Drop rate after each pool (RBN ``1 - keep_prob``); ``None``: none.
      input_shape: ``(H, W, C)`` of one example; fixes the flattened FC input size.
      stages: Optional ``((n_convs, width), ...)`` replacing the depth's configuration
        (used for small models, e.g. on 8x8 digits).
      fc_width: Width of the two hidden FC layers (``fc_bn=True``).
      bn_scale: Whether the BatchNorms have a learned scale gamma.
      bn_momentum: BatchNorm running-average decay (Flax convention).
      bn_axis_name: Mapped axis over which BatchNorm averages its batch statistics
        (synchronised BatchNorm under ``jax.pmap``); ``None``: local statistics.
      init: ``"rbn"`` (TF variance scaling) or ``"torch"`` (PyTorch defaults).
      padding: ``"same"`` (TF SAME) or ``"torch"`` (explicit padding 1).
      rngs: Flax NNX random streams.
    """

    def __init__(
        self,
        depth: int | None,
        num_classes: int,
        *,
        fc_bn: bool = True,
        dropout: float | None = None,
        input_shape: Sequence[int] = (32, 32, 3),
        stages: Sequence[tuple[int, int]] | None = None,
        fc_width: int = 512,
        bn_scale: bool = False,
        bn_momentum: float = 0.99,
        bn_axis_name: str | None = None,
        init: str = "rbn",
        padding: str = "same",
        rngs: nnx.Rngs,
    ):
        if (depth is None) == (stages is None):
            raise ValueError("give exactly one of depth and stages")
        if stages is None:
            if depth not in _VGG_CONVS:
                raise ValueError(f"VGG depth must be one of {sorted(_VGG_CONVS)}")
            stages = tuple(zip(_VGG_CONVS[depth], _VGG_WIDTHS, strict=True))
        height, width, channels = input_shape
        kinit = _kernel_init(init)
        if padding not in ("same", "torch"):
            raise ValueError(f"padding must be 'same' or 'torch', got {padding!r}")
        pad = "SAME" if padding == "same" else _TORCH_PAD1

        def bn(n):
            return nnx.BatchNorm(
                n,
                momentum=bn_momentum,
                epsilon=1e-5,
                use_scale=bn_scale,
                axis_name=bn_axis_name,
                rngs=rngs,
            )

        convs, bns, pool_after = [], [], []
        for n_convs, out in stages:
            for _ in range(n_convs):
                convs.append(
                    nnx.Conv(
                        channels,
                        out,
                        (3, 3),
                        padding=pad,
                        use_bias=False,
                        kernel_init=kinit,
                        rngs=rngs,
                    )
                )
                bns.append(bn(out))
                channels = out
            pool_after.append(len(convs) - 1)
            height, width = height // 2, width // 2
        if height == 0 or width == 0:
            raise ValueError(
                f"input {tuple(input_shape)} too small for {len(stages)} pools"
            )
        self.conv = nnx.List(convs)
        self.bn = nnx.List(bns)
        self.pool_after = tuple(pool_after)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        flat = height * width * channels
        self.fc_bn = fc_bn
        if fc_bn:
            self.fc0 = nnx.Linear(
                flat, fc_width, use_bias=False, kernel_init=kinit, rngs=rngs
            )
            self.fc0_bn = bn(fc_width)
            self.fc1 = nnx.Linear(
                fc_width, fc_width, use_bias=False, kernel_init=kinit, rngs=rngs
            )
            self.fc1_bn = bn(fc_width)
            flat = fc_width
        bias_init = torch_bias_init(flat) if init == "torch" else nnx.initializers.zeros
        self.fc = nnx.Linear(
            flat, num_classes, kernel_init=kinit, bias_init=bias_init, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (conv, bn) in enumerate(zip(self.conv, self.bn, strict=True)):
            x = nnx.relu(bn(conv(x)))
            if i in self.pool_after:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
                if self.dropout is not None:
                    x = self.dropout(x)
        x = x.reshape(x.shape[0], -1)
        if self.fc_bn:
            x = nnx.relu(self.fc0_bn(self.fc0(x)))
            x = nnx.relu(self.fc1_bn(self.fc1(x)))
        return self.fc(x)


# --------------------------------------------------------------------------------------
# Wide ResNet (RBN-TF, pre-activation)
# --------------------------------------------------------------------------------------


class WideBlock(nnx.Module):
    """Pre-activation block: ``a = ReLU(BN(x))``, branch
    ``conv1(drop(ReLU(BN(conv0(a)))))`` plus ``projection(a)`` (1x1, no bias) if the
    width or stride changes, else plus ``x``."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        *,
        dropout: float | None,
        rngs: nnx.Rngs,
        bn_momentum: float | None = None,
        bn_axis_name: str | None = None,
    ):
        kinit = rbn_init()
        bn = {"momentum": bn_momentum, "axis_name": bn_axis_name}
        self.bn0 = _rbn_bn(in_ch, use_scale=True, rngs=rngs, **bn)
        self.conv0 = nnx.Conv(
            in_ch,
            out_ch,
            (3, 3),
            strides=stride,
            use_bias=False,
            kernel_init=kinit,
            rngs=rngs,
        )
        self.bn1 = _rbn_bn(out_ch, use_scale=True, rngs=rngs, **bn)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        self.conv1 = nnx.Conv(
            out_ch, out_ch, (3, 3), use_bias=False, kernel_init=kinit, rngs=rngs
        )
        if in_ch != out_ch or stride != 1:
            self.projection = nnx.Conv(
                in_ch,
                out_ch,
                (1, 1),
                strides=stride,
                use_bias=False,
                kernel_init=kinit,
                rngs=rngs,
            )
        else:
            self.projection = None

    def __call__(self, x: jax.Array) -> jax.Array:
        a = nnx.relu(self.bn0(x))
        h = nnx.relu(self.bn1(self.conv0(a)))
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.conv1(h)
        shortcut = x if self.projection is None else self.projection(a)
        return h + shortcut


class WideResNet(nnx.Module):
    """Pre-activation WRN-``depth``-``width`` (RBN-TF; docs/algorithms.md).

    Stem ``conv`` (3x3, ``in_channels`` -> 16, no bias); groups ``group2``, ``group3``,
    ``group4`` of ``(depth - 4) / 6`` :class:`WideBlock` each (widths 16k, 32k, 64k,
    first-block strides 1, 2, 2); head ``bn`` -> ReLU -> global average pool -> ``fc``
    (with bias). BN has gamma and beta (decay 0.99, eps 1e-5); TF variance-scaling init.
    ``dropout`` (= 1 - keep_prob) sits only between the two convs of each block.
    """

    def __init__(
        self,
        depth: int,
        width: int,
        num_classes: int,
        *,
        dropout: float | None = None,
        in_channels: int = 3,
        bn_momentum: float | None = None,
        bn_axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        kinit = rbn_init()
        self.conv = nnx.Conv(
            in_channels, 16, (3, 3), use_bias=False, kernel_init=kinit, rngs=rngs
        )
        channels = 16
        for group, (out, stride) in enumerate(
            [(16 * width, 1), (32 * width, 2), (64 * width, 2)], start=2
        ):
            blocks = []
            for i in range(n):
                blocks.append(
                    WideBlock(
                        channels,
                        out,
                        stride if i == 0 else 1,
                        dropout=dropout,
                        rngs=rngs,
                        bn_momentum=bn_momentum,
                        bn_axis_name=bn_axis_name,
                    )
                )
                channels = out
            setattr(self, f"group{group}", nnx.List(blocks))
        self.bn = _rbn_bn(
            channels,
            use_scale=True,
            rngs=rngs,
            momentum=bn_momentum,
            axis_name=bn_axis_name,
        )
        self.fc = nnx.Linear(channels, num_classes, kernel_init=kinit, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        for group in (self.group2, self.group3, self.group4):
            for block in group:
                x = block(x)
        x = nnx.relu(self.bn(x))
        return self.fc(x.mean(axis=(1, 2)))


# --------------------------------------------------------------------------------------
# Post-activation ResNet (SRT resnet20 / resnet18)
# --------------------------------------------------------------------------------------


class BasicBlock(nnx.Module):
    """Post-activation block ``ReLU(BN(conv1(ReLU(BN(conv0(x))))) + shortcut(x))``;
    shortcut = identity or ``shortcut_bn(shortcut_conv(x))`` (1x1, option B)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        *,
        rngs: nnx.Rngs,
        bn_momentum: float | None = None,
        bn_axis_name: str | None = None,
    ):
        kinit = torch_default_init()
        bn = {"momentum": bn_momentum, "axis_name": bn_axis_name}
        self.conv0 = nnx.Conv(
            in_ch,
            out_ch,
            (3, 3),
            strides=stride,
            padding=_TORCH_PAD1,
            use_bias=False,
            kernel_init=kinit,
            rngs=rngs,
        )
        self.bn0 = _torch_bn(out_ch, rngs=rngs, **bn)
        self.conv1 = nnx.Conv(
            out_ch,
            out_ch,
            (3, 3),
            padding=_TORCH_PAD1,
            use_bias=False,
            kernel_init=kinit,
            rngs=rngs,
        )
        self.bn1 = _torch_bn(out_ch, rngs=rngs, **bn)
        if in_ch != out_ch or stride != 1:
            self.shortcut_conv = nnx.Conv(
                in_ch,
                out_ch,
                (1, 1),
                strides=stride,
                padding="VALID",
                use_bias=False,
                kernel_init=kinit,
                rngs=rngs,
            )
            self.shortcut_bn = _torch_bn(out_ch, rngs=rngs, **bn)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn0(self.conv0(x)))
        h = self.bn1(self.conv1(h))
        if self.shortcut_conv is not None:
            x = self.shortcut_bn(self.shortcut_conv(x))
        return nnx.relu(h + x)


_RESNET_CONFIGS = {
    # depth: (stem width, ((width, stride), ...), blocks per stage)
    20: (16, ((16, 1), (32, 2), (64, 2)), 3),
    18: (64, ((64, 1), (128, 2), (256, 2), (512, 2)), 2),
}


class ResNet(nnx.Module):
    """SRT's post-activation CIFAR ResNet-20 / ResNet-18 (docs/algorithms.md).

    Stem ``conv`` 3x3 (no bias) -> ``bn`` -> ReLU; stages ``layer1``, ``layer2``, ...
    of :class:`BasicBlock`; global average pool (= SRT's AvgPool 8 / 4 at 32x32 input)
    -> ``fc`` (with bias). PyTorch default init and BatchNorm settings; no dropout.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        *,
        in_channels: int = 3,
        bn_momentum: float | None = None,
        bn_axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        bn = {"momentum": bn_momentum, "axis_name": bn_axis_name}
        if depth not in _RESNET_CONFIGS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNET_CONFIGS)}")
        stem, stages, n_blocks = _RESNET_CONFIGS[depth]
        self.conv = nnx.Conv(
            in_channels,
            stem,
            (3, 3),
            padding=_TORCH_PAD1,
            use_bias=False,
            kernel_init=torch_default_init(),
            rngs=rngs,
        )
        self.bn = _torch_bn(stem, rngs=rngs, **bn)
        channels = stem
        self.num_stages = len(stages)
        for s, (out, stride) in enumerate(stages, start=1):
            blocks = []
            for i in range(n_blocks):
                blocks.append(
                    BasicBlock(
                        channels,
                        out,
                        stride if i == 0 else 1,
                        rngs=rngs,
                        bn_momentum=bn_momentum,
                        bn_axis_name=bn_axis_name,
                    )
                )
                channels = out
            setattr(self, f"layer{s}", nnx.List(blocks))
        self.fc = nnx.Linear(
            channels,
            num_classes,
            kernel_init=torch_default_init(),
            bias_init=torch_bias_init(channels),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.conv(x)))
        for s in range(1, self.num_stages + 1):
            for block in getattr(self, f"layer{s}"):
                x = block(x)
        return self.fc(x.mean(axis=(1, 2)))


# --------------------------------------------------------------------------------------
# ENorm models (Stock et al. 2019)
# --------------------------------------------------------------------------------------


class EnormFC(nnx.Module):
    """ENorm's bias-free MLP: ``fc_00`` (in -> hidden), ``n_layers - 2`` x (hidden ->
    hidden), last (hidden -> num_classes); ``bn_XX`` -> ReLU after every hidden layer.

    Inputs are flattened. Kaiming-normal init, PyTorch BatchNorm defaults. The layer
    names are zero-padded so that sorted paths follow the chain order (ENorm needs the
    ordered kernel chain).
    """

    def __init__(
        self,
        n_layers: int = 15,
        *,
        num_classes: int = 10,
        in_features: int = 3072,
        hidden: int = 500,
        bn_momentum: float | None = None,
        bn_axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        bn = {"momentum": bn_momentum, "axis_name": bn_axis_name}
        if n_layers < 2:
            raise ValueError(f"n_layers must be >= 2, got {n_layers}")
        self.n_layers = n_layers
        kinit = kaiming_normal_init()
        for i in range(n_layers):
            fan_in = in_features if i == 0 else hidden
            out = hidden if i < n_layers - 1 else num_classes
            setattr(
                self,
                f"fc_{i:02d}",
                nnx.Linear(fan_in, out, use_bias=False, kernel_init=kinit, rngs=rngs),
            )
            if i < n_layers - 1:
                setattr(self, f"bn_{i:02d}", _torch_bn(out, rngs=rngs, **bn))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i in range(self.n_layers):
            x = getattr(self, f"fc_{i:02d}")(x)
            if i < self.n_layers - 1:
                x = nnx.relu(getattr(self, f"bn_{i:02d}")(x))
        return x


class EnormConv(nnx.Module):
    """ENorm's fully convolutional CIFAR-10 model (Gitman & Ginsburg style), no biases.

    ``conv1..conv3`` (3x3, 128; BN ``bn1`` after conv3), max-pool 3/2 pad 1,
    ``conv4..conv6`` (3x3, 256; ``bn2`` after conv6), max-pool 3/2 pad 1, ``conv7``
    (3x3, 320), ``conv8`` (1x1, 320), ``conv9`` (1x1, 10, **padding 1**), ReLU, avg-pool
    5/5. Every conv but conv3/conv6 is followed by ReLU directly. The padded 1x1 conv
    turns 7x7 into 9x9 and the 5x5 average pool keeps only the top-left window: a quirk
    of the original, kept. The spatial output must be 1x1 (e.g. 28x28 crops, as in the
    original); anything else raises. Kaiming-normal init, PyTorch BatchNorm defaults.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        bn_momentum: float | None = None,
        bn_axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        kinit = kaiming_normal_init()
        bn = {"momentum": bn_momentum, "axis_name": bn_axis_name}
        spec = [
            (in_channels, 128, 3, 1),
            (128, 128, 3, 1),
            (128, 128, 3, 1),
            (128, 256, 3, 1),
            (256, 256, 3, 1),
            (256, 256, 3, 1),
            (256, 320, 3, 1),
            (320, 320, 1, 0),
            (320, num_classes, 1, 1),
        ]
        for i, (cin, cout, k, p) in enumerate(spec, start=1):
            setattr(
                self,
                f"conv{i}",
                nnx.Conv(
                    cin,
                    cout,
                    (k, k),
                    padding=((p, p), (p, p)),
                    use_bias=False,
                    kernel_init=kinit,
                    rngs=rngs,
                ),
            )
        self.bn1 = _torch_bn(128, rngs=rngs, **bn)
        self.bn2 = _torch_bn(256, rngs=rngs, **bn)

    def __call__(self, x: jax.Array) -> jax.Array:
        def pool(h):
            return nnx.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = pool(nnx.relu(self.bn1(self.conv3(x))))
        x = nnx.relu(self.conv4(x))
        x = nnx.relu(self.conv5(x))
        x = pool(nnx.relu(self.bn2(self.conv6(x))))
        x = nnx.relu(self.conv7(x))
        x = nnx.relu(self.conv8(x))
        x = nnx.relu(self.conv9(x))
        x = nnx.avg_pool(x, (5, 5), strides=(5, 5))
        if x.shape[1:3] != (1, 1):
            raise ValueError(
                f"EnormConv needs inputs that pool to 1x1 (e.g. 28x28); got spatial "
                f"{x.shape[1:3]} before the classifier view"
            )
        return x.reshape(x.shape[0], x.shape[-1])


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

DEFAULT_INPUT_SHAPE = (32, 32, 3)


def _vgg(depth: int) -> Callable[..., nnx.Module]:
    def build(num_classes, *, rngs, input_shape=DEFAULT_INPUT_SHAPE, **kw):
        return VGG(depth, num_classes, input_shape=input_shape, rngs=rngs, **kw)

    return build


def _vgg_small(
    num_classes,
    *,
    rngs,
    input_shape=DEFAULT_INPUT_SHAPE,
    widths=(32, 64),
    convs_per_stage=2,
    **kw,
):
    stages = tuple((convs_per_stage, int(w)) for w in widths)
    return VGG(
        None,
        num_classes,
        stages=stages,
        fc_bn=False,
        input_shape=input_shape,
        rngs=rngs,
        **kw,
    )


def _vgg16_srt(num_classes, *, rngs, input_shape=DEFAULT_INPUT_SHAPE, **kw):
    kw = (
        dict(fc_bn=False, bn_scale=True, bn_momentum=0.9, init="torch", padding="torch")
        | kw
    )
    return VGG(16, num_classes, input_shape=input_shape, rngs=rngs, **kw)


def _wrn(depth: int, width: int) -> Callable[..., nnx.Module]:
    def build(num_classes, *, rngs, input_shape=DEFAULT_INPUT_SHAPE, **kw):
        return WideResNet(
            depth, width, num_classes, in_channels=input_shape[-1], rngs=rngs, **kw
        )

    return build


def _resnet(depth: int) -> Callable[..., nnx.Module]:
    def build(num_classes, *, rngs, input_shape=DEFAULT_INPUT_SHAPE, **kw):
        return ResNet(depth, num_classes, in_channels=input_shape[-1], rngs=rngs, **kw)

    return build


def _enorm_fc(num_classes, *, rngs, input_shape=DEFAULT_INPUT_SHAPE, **kw):
    return EnormFC(
        num_classes=num_classes, in_features=math.prod(input_shape), rngs=rngs, **kw
    )


def _enorm_conv(num_classes, *, rngs, input_shape=DEFAULT_INPUT_SHAPE, **kw):
    return EnormConv(
        num_classes=num_classes, in_channels=input_shape[-1], rngs=rngs, **kw
    )


_REGISTRY: dict[str, Callable[..., nnx.Module]] = {
    **{f"vgg{d}": _vgg(d) for d in sorted(_VGG_CONVS)},
    "vgg16-srt": _vgg16_srt,
    "vgg-small": _vgg_small,
    **{f"wrn-{d}-{k}": _wrn(d, k) for d, k in [(16, 4), (22, 8), (28, 10), (40, 10)]},
    "resnet20": _resnet(20),
    "resnet18": _resnet(18),
    "enorm-fc": _enorm_fc,
    "enorm-conv": _enorm_conv,
}
_WRN_PATTERN = re.compile(r"wrn-(\d+)-(\d+)")


def model_names() -> list[str]:
    """The registered model names (any ``wrn-D-K`` with ``D = 6n + 4`` also works)."""
    return list(_REGISTRY)


def _lookup(name: str) -> Callable[..., nnx.Module]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    match = _WRN_PATTERN.fullmatch(name)
    if match:
        return _wrn(int(match.group(1)), int(match.group(2)))
    raise ValueError(
        f"unknown model {name!r}; valid names: {', '.join(model_names())} "
        "(or any wrn-D-K with D = 6n + 4)"
    )


def default_bn_decay(name: str) -> float:
    """The BatchNorm running-average decay a model uses by default: 0.99 for the
    RBN-TF models (VGG-N, WRN, ``vgg-small``), 0.9 for the PyTorch ones (SRT's
    ResNets and ``vgg16-srt``, ENorm's models)."""
    _lookup(name)
    if name == "vgg16-srt" or name.startswith(("resnet", "enorm")):
        return 0.9
    return 0.99


def check_name(name: str) -> None:
    """Raises ``ValueError`` listing the valid names if ``name`` is not a model."""
    _lookup(name)


def build_model(
    name: str,
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    **kwargs: Any,
) -> nnx.Module:
    """Builds a registered model.

    Args:
      name: One of :func:`model_names` (e.g. ``"wrn-28-10"``, ``"vgg13"``,
        ``"resnet20"``, ``"enorm-conv"``), or any ``"wrn-D-K"``.
      num_classes: Number of logits.
      rngs: Flax NNX random streams.
      input_shape: ``(H, W, C)`` of one example (fixes input channels and, for VGG and
        the FC model, the flattened size).
      **kwargs: Forwarded to the model class (e.g. ``dropout=0.3``).

    Returns:
      The NNX module, in train mode.

    Raises:
      ValueError: For an unknown name (the message lists the valid ones).
    """
    return _lookup(name)(
        num_classes, rngs=rngs, input_shape=tuple(input_shape), **kwargs
    )


def param_shapes(
    name: str,
    num_classes: int,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    **kwargs: Any,
) -> dict:
    """The parameter tree of a registered model as ``jax.ShapeDtypeStruct`` leaves.

    Uses :func:`flax.nnx.eval_shape`: nothing is allocated, so this is cheap even for
    WRN-40-10. The result is a plain nested dict (``nnx.Param`` only, no BatchNorm
    statistics), suitable for :func:`riemax.labels_by_rule`.
    """
    builder = _lookup(name)
    abstract = nnx.eval_shape(
        lambda: builder(
            num_classes, rngs=nnx.Rngs(0), input_shape=tuple(input_shape), **kwargs
        )
    )
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def count_params(tree: Any) -> int:
    """Total number of elements of the array (or ShapeDtypeStruct) leaves of a tree."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
