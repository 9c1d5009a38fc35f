"""What the model families share: the papers' TensorFlow (RBN-TF) and PyTorch
(SRT, ENorm) initialisers and BatchNorms, the bias-free convolution of every
net, and the one builder of the stages of a residual net (:func:`build_stages`,
used by the wide ResNet and the post-activation ResNet), in Flax NNX."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

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


INITS = {"rbn": rbn_init, "torch": torch_default_init}


def kernel_init(init: str) -> Initializer:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {sorted(INITS)}")
    return INITS[init]()


def rbn_bn(
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


def torch_bn(
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


TORCH_PAD1 = (
    (1, 1),
    (1, 1),
)  # PyTorch ``padding=1`` (Flax "SAME" differs at stride 2)


# --------------------------------------------------------------------------------------
# Convolutions and stages
# --------------------------------------------------------------------------------------


def conv(
    in_ch: int,
    out_ch: int,
    size: int,
    *,
    init: Initializer,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
) -> nnx.Conv:
    """A bias-free ``size x size`` convolution (every conv of the papers' nets
    but the classifier's of ``vgg16-srt``)."""
    return nnx.Conv(
        in_ch,
        out_ch,
        (size, size),
        strides=stride,
        padding=padding,
        use_bias=False,
        kernel_init=init,
        rngs=rngs,
    )


def build_stages(
    block: Callable[[int, int, int], nnx.Module],
    in_channels: int,
    stages: Sequence[tuple[int, int]],
    blocks_per_stage: int,
) -> tuple[list[nnx.List], int]:
    """The stages of a residual net: for each ``(width, stride)`` of ``stages``,
    ``blocks_per_stage`` blocks ``block(in_channels, width, stride)``, the first
    of which takes the stride and the change of width, the others stride 1.

    Returns:
      The stages (an ``nnx.List`` of blocks each) and the width of the last one.
    """
    built, channels = [], in_channels
    for width, stride in stages:
        blocks = []
        for i in range(blocks_per_stage):
            blocks.append(block(channels, width, stride if i == 0 else 1))
            channels = width
        built.append(nnx.List(blocks))
    return built, channels


def run_stages(x: jax.Array, stages: Sequence[nnx.List]) -> jax.Array:
    """``x`` through every block of every stage, in order."""
    for stage in stages:
        for block in stage:
            x = block(x)
    return x
