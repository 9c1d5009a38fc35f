"""Equi-normalization (ENorm) of consecutive layers. (placeholder, being written)"""


def enorm_cycle(*args, **kwargs):
    raise NotImplementedError


def apply_enorm(*args, **kwargs):
    raise NotImplementedError


def kernel_chain(*args, **kwargs):
    raise NotImplementedError
