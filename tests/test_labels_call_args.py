"""Structural labels on models whose call takes more than the input: the CNN
of Flax's MNIST example, whose ``__call__`` takes ``rngs`` for dropout."""

from __future__ import annotations

from functools import partial

import jax.numpy as jnp
import pytest
from flax import nnx

import riemax


class CNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(32, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.025)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(64, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=0.025)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x, rngs: nnx.Rngs | None = None):
        x = self.avg_pool(
            nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs)))
        )
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
        return self.linear2(x)


def test_labels_from_model_passes_rngs_through_and_names_a_wrong_input():
    model = CNN(rngs=nnx.Rngs(0))
    rngs = nnx.Rngs(1)
    before = int(rngs.default.count[...])
    labels = riemax.labels_from_model(model, jnp.ones((2, 28, 28, 1)), rngs=rngs)
    # conv2 feeds its BatchNorm directly; conv1 goes through dropout first.
    assert labels["conv2"]["kernel"] == riemax.MANIFOLD
    assert labels["conv1"]["kernel"] == riemax.EUCLIDEAN
    assert labels["linear1"]["kernel"] == riemax.EUCLIDEAN
    assert int(rngs.default.count[...]) == before  # traced on a clone
    with pytest.raises(ValueError) as err:
        riemax.labels_from_model(model, jnp.ones((2, 32, 32, 3)), rngs=rngs)
    message = str(err.value)
    assert "while tracing the model" in message
    assert "(2, 32, 32, 3)" in message
