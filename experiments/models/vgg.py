"""VGG: RBN-TF's VGG-N, SRT's ``vgg16``, the small ``vgg-small`` of the
offline jobs and ``vgg-small-gap``, the same with global average pooling before
its classifier (the recipe for new data; registry names ``vgg11``, ``vgg13``,
``vgg16``, ``vgg19``, ``vgg16-srt``, ``vgg-small``, ``vgg-small-gap``)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from experiments.models._layers import TORCH_PAD1, kernel_init, torch_bias_init

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
      global_pool: Average the last stage over height and width before the
        classifier (its input is then the last width, whatever the image size)
        instead of flattening it.
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
        global_pool: bool = False,
        rngs: nnx.Rngs,
    ):
        if (depth is None) == (stages is None):
            raise ValueError("give exactly one of depth and stages")
        if stages is None:
            if depth not in _VGG_CONVS:
                raise ValueError(f"VGG depth must be one of {sorted(_VGG_CONVS)}")
            stages = tuple(zip(_VGG_CONVS[depth], _VGG_WIDTHS, strict=True))
        height, width, channels = input_shape
        kinit = kernel_init(init)
        if padding not in ("same", "torch"):
            raise ValueError(f"padding must be 'same' or 'torch', got {padding!r}")
        pad = "SAME" if padding == "same" else TORCH_PAD1

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
        self.global_pool = global_pool
        flat = channels if global_pool else height * width * channels
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
        x = x.mean(axis=(1, 2)) if self.global_pool else x.reshape(x.shape[0], -1)
        if self.fc_bn:
            x = nnx.relu(self.fc0_bn(self.fc0(x)))
            x = nnx.relu(self.fc1_bn(self.fc1(x)))
        return self.fc(x)


def build(name: str, num_classes: int, *, rngs, input_shape, **kw) -> VGG:
    """The registered VGG ``name`` (see the module docstring)."""
    if name in ("vgg-small", "vgg-small-gap"):
        widths = kw.pop("widths", (32, 64))
        per_stage = kw.pop("convs_per_stage", 2)
        stages = tuple((per_stage, int(w)) for w in widths)
        return VGG(
            None,
            num_classes,
            stages=stages,
            fc_bn=False,
            global_pool=name == "vgg-small-gap",
            input_shape=input_shape,
            rngs=rngs,
            **kw,
        )
    if name == "vgg16-srt":
        srt = dict(
            fc_bn=False, bn_scale=True, bn_momentum=0.9, init="torch", padding="torch"
        )
        return VGG(16, num_classes, input_shape=input_shape, rngs=rngs, **(srt | kw))
    depth = int(name.removeprefix("vgg"))
    return VGG(depth, num_classes, input_shape=input_shape, rngs=rngs, **kw)
