"""RBN-TF's pre-activation wide ResNet WRN-d-k (registry names ``wrn-D-K``)."""

from __future__ import annotations

import re

import jax
from flax import nnx

from experiments.models._layers import build_stages, conv, rbn_bn, rbn_init, run_stages


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
        self.bn0 = rbn_bn(in_ch, use_scale=True, rngs=rngs, **bn)
        self.conv0 = conv(in_ch, out_ch, 3, stride=stride, init=kinit, rngs=rngs)
        self.bn1 = rbn_bn(out_ch, use_scale=True, rngs=rngs, **bn)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        self.conv1 = conv(out_ch, out_ch, 3, init=kinit, rngs=rngs)
        changes = in_ch != out_ch or stride != 1
        self.projection = (
            conv(in_ch, out_ch, 1, stride=stride, init=kinit, rngs=rngs)
            if changes
            else None
        )

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
        self.conv = conv(in_channels, 16, 3, init=kinit, rngs=rngs)

        def block(in_ch, out_ch, stride):
            return WideBlock(
                in_ch,
                out_ch,
                stride,
                dropout=dropout,
                rngs=rngs,
                bn_momentum=bn_momentum,
                bn_axis_name=bn_axis_name,
            )

        widths = [(16 * width, 1), (32 * width, 2), (64 * width, 2)]
        stages, channels = build_stages(block, 16, widths, n)
        self.group2, self.group3, self.group4 = stages
        self.bn = rbn_bn(
            channels,
            use_scale=True,
            rngs=rngs,
            momentum=bn_momentum,
            axis_name=bn_axis_name,
        )
        self.fc = nnx.Linear(channels, num_classes, kernel_init=kinit, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = run_stages(self.conv(x), (self.group2, self.group3, self.group4))
        x = nnx.relu(self.bn(x))
        return self.fc(x.mean(axis=(1, 2)))


NAME = re.compile(r"wrn-(\d+)-(\d+)")


def build(name: str, num_classes: int, *, rngs, input_shape, **kw) -> WideResNet:
    """``wrn-D-K``: depth ``D`` (6n + 4), width factor ``K``."""
    depth, width = (int(g) for g in NAME.fullmatch(name).groups())
    return WideResNet(
        depth, width, num_classes, in_channels=input_shape[-1], rngs=rngs, **kw
    )
