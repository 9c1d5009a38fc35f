"""riemax: Riemannian optimization of batch-normalized networks for optax.

A kernel whose output feeds a BatchNorm is scale-invariant per output unit: the loss
depends only on the direction of each slice ``W[..., j]``. riemax optimizes such
units on the unit sphere with composable :class:`optax.GradientTransformation`\\ s.
"""

from riemax import _sphere as sphere
from riemax import diagnostics
from riemax._adamp import (
    ScaleByAdampState,
    ScaleBySgdpState,
    adamp,
    scale_by_adamp,
    scale_by_sgdp,
    sgdp,
)
from riemax._adamsrt import (
    ScaleByAdamsState,
    ScaleBySgdmrtState,
    scale_by_adams,
    scale_by_sgdmrt,
)
from riemax._alias import adamg, adams, adamsrt, hybrid, sgdg, sgdmrt
from riemax._enorm import apply_enorm, enorm_cycle, kernel_chain
from riemax._grassmann import (
    SphericalAdamState,
    TransportedMomentumState,
    clip_tangent_norm,
    exp_map_update,
    grassmann_project,
    ortho_penalty,
    orthogonality_loss,
    spherical_adam,
    transported_momentum,
    unit_init,
)
from riemax._labels import (
    EUCLIDEAN,
    MANIFOLD,
    check_labels,
    label_report,
    labels_by_regex,
    labels_by_rule,
)
from riemax._labels_numerical import labels_by_invariance
from riemax._labels_structural import labels_from_model
from riemax._nero import ScaleByNeroState, nero, nero_project, scale_by_nero
from riemax._rotational import (
    RotationalState,
    center_units,
    equilibrium_rate,
    rotational,
)
from riemax._sgdg_adamg import (
    ScaleByAdamgState,
    ScaleBySgdgState,
    scale_by_adamg,
    scale_by_sgdg,
)
from riemax._version import __version__

# Earlier names, kept as aliases.
sgdg_update = scale_by_sgdg
adamg_update = scale_by_adamg
SgdgUpdateState = ScaleBySgdgState
AdamgUpdateState = ScaleByAdamgState
AdamSState = ScaleByAdamsState
SgdMRTState = ScaleBySgdmrtState

__all__ = [
    "AdamSState",
    "AdamgUpdateState",
    "EUCLIDEAN",
    "MANIFOLD",
    "RotationalState",
    "ScaleByAdamgState",
    "ScaleByAdampState",
    "ScaleByAdamsState",
    "ScaleByNeroState",
    "ScaleBySgdgState",
    "ScaleBySgdmrtState",
    "ScaleBySgdpState",
    "SgdMRTState",
    "SgdgUpdateState",
    "SphericalAdamState",
    "TransportedMomentumState",
    "__version__",
    "adamg",
    "adamg_update",
    "adamp",
    "adams",
    "adamsrt",
    "apply_enorm",
    "center_units",
    "check_labels",
    "clip_tangent_norm",
    "diagnostics",
    "enorm_cycle",
    "equilibrium_rate",
    "exp_map_update",
    "grassmann_project",
    "hybrid",
    "kernel_chain",
    "label_report",
    "labels_by_invariance",
    "labels_by_regex",
    "labels_by_rule",
    "labels_from_model",
    "nero",
    "nero_project",
    "ortho_penalty",
    "orthogonality_loss",
    "rotational",
    "scale_by_adamg",
    "scale_by_adamp",
    "scale_by_adams",
    "scale_by_nero",
    "scale_by_sgdg",
    "scale_by_sgdmrt",
    "scale_by_sgdp",
    "sgdg",
    "sgdg_update",
    "sgdmrt",
    "sgdp",
    "sphere",
    "spherical_adam",
    "transported_momentum",
    "unit_init",
]
