"""The multilayer perceptron of Bernstein's "Modular Manifolds" experiment
(registry names ``mlp``, without biases as in the original, and ``mlp-bias``).

The original (thinking-machines-lab/manifolds, ``src/main.py``) flattens a CIFAR
image and runs ``fc1`` 3072 -> 128, ReLU, ``fc2`` 128 -> 64, ReLU, ``fc3`` 64 ->
10, with ``bias=False`` and PyTorch's default initialisation; every weight
matrix is then a point of the manifold of its optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx

from experiments.models._layers import torch_bias_init, torch_default_init


class MLP(nnx.Module):
    """Flatten, then ``fc1`` ... ``fcN`` (Linear, PyTorch's default init) with a
    ReLU between them.

    The input may have any shape: it is flattened to ``prod(input_shape)``
    features (3072 on CIFAR's 32x32x3, 784 on 28x28x1 digits).

    Args:
      num_classes: Number of logits.
      input_shape: ``(H, W, C)`` of one example.
      hidden: Widths of the hidden layers (the original's ``(128, 64)``).
      use_bias: Biases on every layer (the original has none).
      bn_momentum, bn_axis_name: Accepted and unused (no BatchNorm), so that the
        runner passes every model the same keywords.
      rngs: Flax NNX random streams.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        input_shape: Sequence[int] = (32, 32, 3),
        hidden: Sequence[int] = (128, 64),
        use_bias: bool = False,
        bn_momentum: float | None = None,
        bn_axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        del bn_momentum, bn_axis_name
        widths = [math.prod(input_shape), *hidden, num_classes]
        layers = []
        for fan_in, out in zip(widths[:-1], widths[1:], strict=True):
            layers.append(
                nnx.Linear(
                    fan_in,
                    out,
                    use_bias=use_bias,
                    kernel_init=torch_default_init(),
                    bias_init=torch_bias_init(fan_in),
                    rngs=rngs,
                )
            )
        # fc1, fc2, ...: the original's names (and what labels_by_rule reads).
        self.n_layers = len(layers)
        for i, layer in enumerate(layers):
            setattr(self, f"fc{i + 1}", layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i in range(self.n_layers):
            x = getattr(self, f"fc{i + 1}")(x)
            if i < self.n_layers - 1:
                x = nnx.relu(x)
        return x


def build(name: str, num_classes: int, *, rngs, input_shape, **kw) -> MLP:
    """The registered MLP ``name`` (see the module docstring)."""
    if name not in ("mlp", "mlp-bias"):
        raise ValueError(f"unknown MLP {name!r}")
    return MLP(
        num_classes,
        input_shape=input_shape,
        use_bias=name == "mlp-bias",
        rngs=rngs,
        **kw,
    )
