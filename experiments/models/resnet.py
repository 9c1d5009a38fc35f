"""SRT's post-activation CIFAR ResNets (registry names ``resnet20``, ``resnet18``)."""

from __future__ import annotations

import jax
from flax import nnx

from experiments.models._layers import (
    TORCH_PAD1,
    build_stages,
    conv,
    run_stages,
    torch_bias_init,
    torch_bn,
    torch_default_init,
)


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
        pad = {"init": kinit, "rngs": rngs, "padding": TORCH_PAD1}
        self.conv0 = conv(in_ch, out_ch, 3, stride=stride, **pad)
        self.bn0 = torch_bn(out_ch, rngs=rngs, **bn)
        self.conv1 = conv(out_ch, out_ch, 3, **pad)
        self.bn1 = torch_bn(out_ch, rngs=rngs, **bn)
        if in_ch != out_ch or stride != 1:
            self.shortcut_conv = conv(
                in_ch, out_ch, 1, stride=stride, init=kinit, rngs=rngs, padding="VALID"
            )
            self.shortcut_bn = torch_bn(out_ch, rngs=rngs, **bn)
        else:
            self.shortcut_conv = self.shortcut_bn = None

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
        self.conv = conv(
            in_channels,
            stem,
            3,
            init=torch_default_init(),
            rngs=rngs,
            padding=TORCH_PAD1,
        )
        self.bn = torch_bn(stem, rngs=rngs, **bn)

        def block(in_ch, out_ch, stride):
            return BasicBlock(
                in_ch,
                out_ch,
                stride,
                rngs=rngs,
                bn_momentum=bn_momentum,
                bn_axis_name=bn_axis_name,
            )

        built, channels = build_stages(block, stem, stages, n_blocks)
        self.num_stages = len(built)
        for s, stage in enumerate(built, start=1):
            setattr(self, f"layer{s}", stage)
        self.fc = nnx.Linear(
            channels,
            num_classes,
            kernel_init=torch_default_init(),
            bias_init=torch_bias_init(channels),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.conv(x)))
        stages = [getattr(self, f"layer{s}") for s in range(1, self.num_stages + 1)]
        x = run_stages(x, stages)
        return self.fc(x.mean(axis=(1, 2)))


def build(name: str, num_classes: int, *, rngs, input_shape, **kw) -> ResNet:
    """``resnet20`` or ``resnet18``."""
    depth = int(name.removeprefix("resnet"))
    return ResNet(depth, num_classes, in_channels=input_shape[-1], rngs=rngs, **kw)
