"""The test registry (``tests/helpers.py``) and the runner's table
(``experiments/optimizers/``) agree: they name the same riemax optimizers, the
runner's hyper-parameters are arguments of the registry's factories, and with the
same values both build the same transformation."""

from __future__ import annotations

import inspect

import jax
import numpy as np
import optax
import pytest
from helpers import OPTIMIZERS

import riemax
from experiments import optimizers as runner

#: The runner's Euclidean baselines: plain optax, not riemax optimizers.
BASELINES = {"sgd", "adam", "adamw"}
#: The decay of the entries that take a per-leaf decay tree (the same on every
#: leaf, so that it is one ``weight_decay`` argument of the riemax factory).
WEIGHT_DECAY = 1e-2
RIEMAX_ENTRIES = sorted(set(runner.OPTIMIZERS) - BASELINES)


def _is_riemax(factory):
    return getattr(riemax, factory.__name__, None) is factory


#: The entries whose registry factory is a test-side composition (the rotational
#: wrapper around an optax transformation, at an equilibrium rate); the others'
#: is a riemax optimizer itself.
COMPOSED = sorted(
    {o.runner_name for o in OPTIMIZERS.values() if not _is_riemax(o.factory)}
)
DIRECT = sorted(set(RIEMAX_ENTRIES) - set(COMPOSED))


def test_both_tables_name_the_same_riemax_optimizers():
    in_runner = set(runner.OPTIMIZERS)
    in_registry = {o.runner_name for o in OPTIMIZERS.values()}
    assert in_runner - BASELINES == in_registry, (
        sorted(in_runner - BASELINES - in_registry),  # missing from the registry
        sorted(in_registry - in_runner),  # missing from the runner's table
    )
    assert BASELINES <= in_runner
    for name in BASELINES:
        assert not hasattr(riemax, name), name


def _arguments(entry, factory):
    """The arguments of the runner's factory (its default hyper-parameters) and
    the same values as arguments of the registry's factory."""
    runner_kwargs = dict(entry.hyper)
    kwargs = dict(entry.hyper)
    if "decay" in inspect.signature(entry.factory).parameters:
        runner_kwargs["decay"] = {"conv": WEIGHT_DECAY, "fc": WEIGHT_DECAY}
        kwargs["weight_decay"] = WEIGHT_DECAY
    accepted = inspect.signature(factory).parameters
    assert set(kwargs) <= set(accepted), sorted(set(kwargs) - set(accepted))
    lr = entry.lr if entry.lr_manifold is None else entry.lr_manifold
    return lr, runner_kwargs, kwargs


def _bound(function, *args, **kwargs):
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@pytest.mark.parametrize("name", DIRECT)
def test_runner_calls_the_registry_factory_with_the_same_arguments(name, monkeypatch):
    """Where the registry's factory is a riemax optimizer, the runner's factory
    calls that same function once, with the same arguments (nothing is
    compiled)."""
    entry = runner.OPTIMIZERS[name]
    factories = {o.factory for o in OPTIMIZERS.values() if o.runner_name == name}
    assert factories and all(map(_is_riemax, factories)), (name, factories)
    for factory in factories:
        lr, runner_kwargs, kwargs = _arguments(entry, factory)
        calls = []

        def spy(*args, factory=factory, **kw):
            calls.append(_bound(factory, *args, **kw))
            return factory(*args, **kw)

        monkeypatch.setattr(riemax, factory.__name__, spy)
        entry.factory(lr, **runner_kwargs)
        monkeypatch.undo()
        assert calls == [_bound(factory, lr, **kwargs)], (name, calls)


def _tree(seed, centred=False):
    """A tiny conv and dense kernel (NumPy: nothing runs outside the one compiled
    program of each entry); ``centred`` units have zero mean, as the rotational
    wrapper wants them."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in {"conv": (3, 3, 2, 4), "fc": (6, 3)}.items():
        w = rng.standard_normal(shape).astype(np.float32)
        if centred:
            w -= w.mean(axis=tuple(range(w.ndim - 1)), keepdims=True)
        out[name] = w
    return out


@pytest.mark.parametrize("name", COMPOSED)
def test_runner_and_registry_build_the_same_transformation(name):
    """Where the registry composes the optimizer itself, two steps on a tiny tree
    (one compiled program per entry) give the same params, and they moved."""
    entry = runner.OPTIMIZERS[name]
    factories = {o.factory for o in OPTIMIZERS.values() if o.runner_name == name}
    params = _tree(0, centred=True)
    grads = [_tree(1), _tree(2)]
    for factory in factories:
        lr, runner_kwargs, kwargs = _arguments(entry, factory)
        txs = entry.factory(lr, **runner_kwargs), factory(lr, **kwargs)

        @jax.jit
        def runs(params, grads, txs=txs):
            out = []
            for tx in txs:
                p, state = params, tx.init(params)
                for g in grads:
                    updates, state = tx.update(g, state, p)
                    p = optax.apply_updates(p, updates)
                out.append(p)
            return out

        theirs, ours = runs(params, grads)
        for n in params:
            np.testing.assert_allclose(ours[n], theirs[n], rtol=1e-6, atol=1e-7)
        assert (
            max(np.max(np.abs(np.asarray(ours[n]) - params[n])) for n in params) > 1e-4
        )
