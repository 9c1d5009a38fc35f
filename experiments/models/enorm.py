"""The ENorm paper's bias-free models (registry names ``enorm-fc``,
``enorm-conv``)."""

from __future__ import annotations

import math

import jax
from flax import nnx

from experiments.models._layers import kaiming_normal_init, torch_bn


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
                setattr(self, f"bn_{i:02d}", torch_bn(out, rngs=rngs, **bn))

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
        self.bn1 = torch_bn(128, rngs=rngs, **bn)
        self.bn2 = torch_bn(256, rngs=rngs, **bn)

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


def build(name: str, num_classes: int, *, rngs, input_shape, **kw) -> nnx.Module:
    """``enorm-fc`` (inputs flattened) or ``enorm-conv``."""
    if name == "enorm-fc":
        return EnormFC(
            num_classes=num_classes, in_features=math.prod(input_shape), rngs=rngs, **kw
        )
    return EnormConv(
        num_classes=num_classes, in_channels=input_shape[-1], rngs=rngs, **kw
    )
