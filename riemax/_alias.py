"""placeholder"""
def adamg(*a, **k):
    raise NotImplementedError


def adams(*a, **k):
    raise NotImplementedError


def adamsrt(*a, **k):
    raise NotImplementedError


def hybrid(*a, **k):
    raise NotImplementedError


def sgdg(*a, **k):
    raise NotImplementedError


def sgdmrt(*a, **k):
    raise NotImplementedError


