"""placeholder"""
def AdamSState(*a, **k):
    raise NotImplementedError


def ClipTangentNormState(*a, **k):
    raise NotImplementedError


def ExpMapUpdateState(*a, **k):
    raise NotImplementedError


def GrassmannProjectState(*a, **k):
    raise NotImplementedError


def OrthoPenaltyState(*a, **k):
    raise NotImplementedError


def SgdMRTState(*a, **k):
    raise NotImplementedError


def SphericalAdamState(*a, **k):
    raise NotImplementedError


def TransportedMomentumState(*a, **k):
    raise NotImplementedError


def clip_tangent_norm(*a, **k):
    raise NotImplementedError


def exp_map_update(*a, **k):
    raise NotImplementedError


def grassmann_project(*a, **k):
    raise NotImplementedError


def ortho_penalty(*a, **k):
    raise NotImplementedError


def orthogonality_loss(*a, **k):
    raise NotImplementedError


def scale_by_adams(*a, **k):
    raise NotImplementedError


def scale_by_sgdmrt(*a, **k):
    raise NotImplementedError


def spherical_adam(*a, **k):
    raise NotImplementedError


def transported_momentum(*a, **k):
    raise NotImplementedError


def unit_init(*a, **k):
    raise NotImplementedError


