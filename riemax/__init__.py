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
    adams,
    adamsrt,
    scale_by_adams,
    scale_by_sgdmrt,
    sgdmrt,
)
from riemax._cayley import (
    ScaleByCayleyAdamState,
    ScaleByCayleySgdState,
    cayley_adam,
    cayley_sgd,
    scale_by_cayley_adam,
    scale_by_cayley_sgd,
)
from riemax._enorm import apply_enorm, enorm_cycle
from riemax._geometry import (
    Geometry,
    ManifoldMomentumState,
    SphereGeometry,
    geometry,
    manifold_momentum,
    manifold_project,
    manifold_retract,
)
from riemax._grassmann import (
    SphericalAdamState,
    TransportedMomentumState,
    clip_tangent_norm,
    exp_map_update,
    grassmann_project,
    spherical_adam,
    transported_momentum,
)
from riemax._hybrid import hybrid
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
from riemax._msign import msign
from riemax._muon import (
    ScaleByHypersphericalDescentState,
    ScaleByManifoldMuonState,
    hyperspherical_descent,
    manifold_muon,
    scale_by_hyperspherical_descent,
    scale_by_manifold_muon,
)
from riemax._nero import ScaleByNeroState, nero, nero_project, scale_by_nero
from riemax._nnx import kernel_chain
from riemax._ortho import ortho_penalty, orthogonality_loss, unit_init
from riemax._rotational import (
    RotationalState,
    center_units,
    equilibrium_rate,
    rotational,
)
from riemax._sgdg import (
    ScaleByAdamgState,
    ScaleBySgdgState,
    adamg,
    scale_by_adamg,
    scale_by_sgdg,
    sgdg,
)
from riemax._start import START_METHODS, to_manifold
from riemax._stiefel import StiefelGeometry, qr_retraction
from riemax._version import __version__

#: Names of earlier releases: each still works and warns once when it is used.
_DEPRECATED = {
    "sgdg_update": "scale_by_sgdg",
    "adamg_update": "scale_by_adamg",
    "SgdgUpdateState": "ScaleBySgdgState",
    "AdamgUpdateState": "ScaleByAdamgState",
    "AdamSState": "ScaleByAdamsState",
    "SgdMRTState": "ScaleBySgdmrtState",
}
_warned: set[str] = set()


def __getattr__(name: str):
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        if name not in _warned:
            _warned.add(name)
            import warnings

            warnings.warn(
                f"riemax.{name} is deprecated and will be removed in a future "
                f"release; use riemax.{new}.",
                DeprecationWarning,
                stacklevel=2,
            )
        return globals()[new]
    raise AttributeError(f"module 'riemax' has no attribute {name!r}")


__all__ = [
    "EUCLIDEAN",
    "Geometry",
    "MANIFOLD",
    "ManifoldMomentumState",
    "RotationalState",
    "START_METHODS",
    "ScaleByAdamgState",
    "ScaleByAdampState",
    "ScaleByAdamsState",
    "ScaleByCayleyAdamState",
    "ScaleByCayleySgdState",
    "ScaleByHypersphericalDescentState",
    "ScaleByManifoldMuonState",
    "ScaleByNeroState",
    "ScaleBySgdgState",
    "ScaleBySgdmrtState",
    "ScaleBySgdpState",
    "SphereGeometry",
    "SphericalAdamState",
    "StiefelGeometry",
    "TransportedMomentumState",
    "__version__",
    "adamg",
    "adamp",
    "adams",
    "adamsrt",
    "apply_enorm",
    "cayley_adam",
    "cayley_sgd",
    "center_units",
    "check_labels",
    "clip_tangent_norm",
    "diagnostics",
    "enorm_cycle",
    "equilibrium_rate",
    "exp_map_update",
    "geometry",
    "grassmann_project",
    "hybrid",
    "hyperspherical_descent",
    "kernel_chain",
    "label_report",
    "labels_by_invariance",
    "labels_by_regex",
    "labels_by_rule",
    "labels_from_model",
    "manifold_momentum",
    "manifold_muon",
    "manifold_project",
    "manifold_retract",
    "msign",
    "nero",
    "nero_project",
    "ortho_penalty",
    "orthogonality_loss",
    "qr_retraction",
    "rotational",
    "scale_by_adamg",
    "scale_by_adamp",
    "scale_by_adams",
    "scale_by_cayley_adam",
    "scale_by_cayley_sgd",
    "scale_by_hyperspherical_descent",
    "scale_by_manifold_muon",
    "scale_by_nero",
    "scale_by_sgdg",
    "scale_by_sgdmrt",
    "scale_by_sgdp",
    "sgdg",
    "sgdmrt",
    "sgdp",
    "sphere",
    "spherical_adam",
    "to_manifold",
    "transported_momentum",
    "unit_init",
]
