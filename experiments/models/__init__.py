"""Flax NNX models of the three source papers: one family per file, one registry.

Every model takes NHWC inputs (Flax layout) and returns logits. Train/eval mode is
switched with ``model.train()`` / ``model.eval()`` (BatchNorm batch vs. running
statistics, dropout on/off).

Parameter paths are readable and follow the papers' naming, because the papers'
manifold rule (:func:`riemax.labels_by_rule`) is syntactic: a kernel is eligible
for the manifold iff its path contains ``conv`` and it is undercomplete. Hence:

- conv kernels live in modules named ``conv``, ``conv0``, ``conv1``, ... ;
- the 1x1 shortcut of the wide ResNet is named ``projection`` (so RBN's rule
  excludes it), the 1x1 shortcut of the post-activation ResNet is
  ``shortcut_conv``;
- dense layers are ``fc``, ``fc0``, ``fc1``, ``fc_00``, ... ; BatchNorms ``bn*``.

Families (each file holds its modules and a ``build(name, num_classes, *, rngs,
input_shape, **kw)``):

- :mod:`~experiments.models.vgg` -- RBN-TF VGG-N (conv-BN(no scale)-ReLU,
  FC512-BN-ReLU x2, FC), SRT's ``vgg16`` (``vgg16-srt``) and ``vgg-small``
  (stages of ``convs_per_stage`` convs of each of ``widths`` and one Linear
  classifier: the offline jobs' model);
- :mod:`~experiments.models.wrn` -- RBN-TF pre-activation WRN-d-k;
- :mod:`~experiments.models.resnet` -- SRT post-activation ResNet-20 / ResNet-18;
- :mod:`~experiments.models.enorm` -- the ENorm paper's bias-free FC and fully
  convolutional CIFAR-10 models (including the padded 1x1 conv quirk);
- :mod:`~experiments.models.mlp` -- the 3-layer MLP of Bernstein's "Modular
  Manifolds" experiment (flattened input -> 128 -> 64 -> classes, ReLU; ``mlp``
  without biases as the original, ``mlp-bias`` with them; no BatchNorm);
- :mod:`~experiments.models._layers` -- the initialisers and BatchNorms they share.

Every model takes ``bn_momentum`` (running-average decay, default the paper's)
and ``bn_axis_name`` (average the batch statistics over a ``pmap`` axis:
synchronised BatchNorm) keyword arguments.

This module is light: the names, their checks and default BatchNorm decays are
read without importing JAX or Flax (the config checks run before JAX is
loaded); a family is imported when one of its models is built. Adding a model
is one line in :data:`REGISTRY` (and a family file for a new family).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Sequence
from typing import Any

#: name -> (family module, default BatchNorm running-average decay): 0.99 for the
#: RBN-TF models, 0.9 for the PyTorch ones (SRT's ResNets and VGG-16, ENorm's).
REGISTRY: dict[str, tuple[str, float]] = {
    "vgg11": ("vgg", 0.99),
    "vgg13": ("vgg", 0.99),
    "vgg16": ("vgg", 0.99),
    "vgg19": ("vgg", 0.99),
    "vgg16-srt": ("vgg", 0.9),
    "vgg-small": ("vgg", 0.99),
    "vgg-small-gap": ("vgg", 0.99),
    "wrn-16-4": ("wrn", 0.99),
    "wrn-22-8": ("wrn", 0.99),
    "wrn-28-10": ("wrn", 0.99),
    "wrn-40-10": ("wrn", 0.99),
    "resnet20": ("resnet", 0.9),
    "resnet18": ("resnet", 0.9),
    "enorm-fc": ("enorm", 0.9),
    "enorm-conv": ("enorm", 0.9),
    "mlp": ("mlp", 0.9),
    "mlp-bias": ("mlp", 0.9),
}
_WRN = re.compile(r"wrn-(\d+)-(\d+)")
DEFAULT_INPUT_SHAPE = (32, 32, 3)

# Public names of the family files, importable from here.
_EXPORTS = {
    "VGG": "vgg",
    "WideBlock": "wrn",
    "WideResNet": "wrn",
    "BasicBlock": "resnet",
    "ResNet": "resnet",
    "EnormFC": "enorm",
    "EnormConv": "enorm",
    "MLP": "mlp",
    "rbn_init": "_layers",
    "torch_default_init": "_layers",
    "torch_bias_init": "_layers",
    "kaiming_normal_init": "_layers",
}

__all__ = sorted(
    [
        *_EXPORTS,
        "REGISTRY",
        "build_model",
        "check_name",
        "count_params",
        "default_bn_decay",
        "model_names",
        "param_shapes",
    ]
)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_names() -> list[str]:
    """The registered model names (any ``wrn-D-K`` with ``D = 6n + 4`` also works)."""
    return list(REGISTRY)


def _entry(name: str) -> tuple[str, float]:
    if name in REGISTRY:
        return REGISTRY[name]
    match = _WRN.fullmatch(str(name))
    if match and int(match.group(1)) >= 10 and (int(match.group(1)) - 4) % 6 == 0:
        return REGISTRY["wrn-28-10"]
    raise ValueError(
        f"unknown model {name!r}; valid names: {', '.join(model_names())} "
        "(or any wrn-D-K with D = 6n + 4)"
    )


def check_name(name: str) -> None:
    """Raises ``ValueError`` listing the valid names if ``name`` is not a model."""
    _entry(name)


def default_bn_decay(name: str) -> float:
    """The BatchNorm running-average decay the model ``name`` uses by default."""
    return _entry(name)[1]


def build_model(
    name: str,
    num_classes: int,
    *,
    rngs: Any,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    **kwargs: Any,
) -> Any:
    """Builds a registered model.

    Args:
      name: One of :func:`model_names` (e.g. ``"wrn-28-10"``, ``"vgg13"``,
        ``"resnet20"``, ``"enorm-conv"``), or any ``"wrn-D-K"``.
      num_classes: Number of logits.
      rngs: Flax NNX random streams.
      input_shape: ``(H, W, C)`` of one example (fixes input channels and, for
        VGG and the FC model, the flattened size).
      **kwargs: Forwarded to the model class (e.g. ``dropout=0.3``).

    Returns:
      The NNX module, in train mode.

    Raises:
      ValueError: For an unknown name (the message lists the valid ones).
    """
    family = importlib.import_module(f"{__name__}.{_entry(name)[0]}")
    return family.build(
        name, num_classes, rngs=rngs, input_shape=tuple(input_shape), **kwargs
    )


def param_shapes(
    name: str,
    num_classes: int,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    **kwargs: Any,
) -> dict:
    """The parameter tree of a registered model as ``jax.ShapeDtypeStruct`` leaves.

    Uses :func:`flax.nnx.eval_shape`: nothing is allocated, so this is cheap even
    for WRN-40-10. The result is a plain nested dict (``nnx.Param`` only, no
    BatchNorm statistics), suitable for :func:`riemax.labels_by_rule`.
    """
    from flax import nnx

    check_name(name)
    abstract = nnx.eval_shape(
        lambda: build_model(
            name, num_classes, rngs=nnx.Rngs(0), input_shape=input_shape, **kwargs
        )
    )
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def count_params(tree: Any) -> int:
    """Total number of elements of the array (or ShapeDtypeStruct) leaves of a tree."""
    import jax

    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
