"""riemax: Riemannian optimization of batch-normalized networks for optax.

A kernel whose output feeds a BatchNorm is scale-invariant per output unit: the loss
depends only on the direction of each slice ``W[..., j]``. riemax optimizes such
units on the unit sphere with composable :class:`optax.GradientTransformation`\\ s.
"""

from riemax import _sphere as sphere
from riemax import diagnostics
from riemax._alias import adamg, adams, adamsrt, hybrid, sgdg, sgdmrt
from riemax._enorm import apply_enorm, enorm_cycle, kernel_chain
from riemax._fused import AdamgUpdateState, SgdgUpdateState, adamg_update, sgdg_update
from riemax._labels import (
    EUCLIDEAN,
    MANIFOLD,
    label_report,
    labels_by_invariance,
    labels_by_regex,
    labels_by_rule,
    labels_from_model,
)
from riemax._transforms import (
    AdamSState,
    SgdMRTState,
    SphericalAdamState,
    TransportedMomentumState,
    clip_tangent_norm,
    exp_map_update,
    grassmann_project,
    ortho_penalty,
    orthogonality_loss,
    scale_by_adams,
    scale_by_sgdmrt,
    spherical_adam,
    transported_momentum,
    unit_init,
)

__version__ = "0.1.0"

__all__ = [
    "AdamSState",
    "AdamgUpdateState",
    "EUCLIDEAN",
    "MANIFOLD",
    "SgdMRTState",
    "SgdgUpdateState",
    "SphericalAdamState",
    "TransportedMomentumState",
    "adamg",
    "adamg_update",
    "adams",
    "adamsrt",
    "apply_enorm",
    "clip_tangent_norm",
    "diagnostics",
    "enorm_cycle",
    "exp_map_update",
    "grassmann_project",
    "hybrid",
    "kernel_chain",
    "label_report",
    "labels_by_invariance",
    "labels_by_regex",
    "labels_by_rule",
    "labels_from_model",
    "ortho_penalty",
    "orthogonality_loss",
    "scale_by_adams",
    "scale_by_sgdmrt",
    "sgdg",
    "sgdg_update",
    "sgdmrt",
    "sphere",
    "spherical_adam",
    "transported_momentum",
    "unit_init",
]
