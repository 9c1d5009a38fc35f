"""The shape of a lowered riemax step: its control flow does not grow with the
number of leaves, and a data-dependent decision stays on the device.

Every optimizer makes its robust-path decision once per step for the whole
tree, so the number of conditionals and loops in the lowered update is the same
for one ResNet-20 kernel as for twenty. Lowering only (no XLA compile), so the
checks are cheap; the SGDP/AdamP projection test is also run once, with
implicit host transfers disallowed.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import LEAF_SHAPES, OPTIMIZERS, cycling_gradient, init_params
from jax.extend import core as jex_core

import riemax
from benchmarks._common import fused_loops
from experiments import models
from experiments import optimizers as experiments_optimizers

#: The largest ResNet-20 kernel (a 3x3 conv, 64 -> 64 channels).
KERNEL = (3, 3, 64, 64)

CONTROL_FLOW = re.compile(r"stablehlo\.(case|if|while)\b")


def _params(count):
    rng = np.random.default_rng(0)
    out = {}
    for i in range(count):
        w = rng.standard_normal(KERNEL).astype(np.float32)
        w /= np.linalg.norm(w.reshape(-1, KERNEL[-1]), axis=0)
        out[f"conv{i:02d}"] = jnp.asarray(w)
    return out


def lowered_update(tx, count):
    params = _params(count)
    state = tx.init(params)

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step).lower(params, state, params).as_text()


def control_flow(text):
    return len(CONTROL_FLOW.findall(text))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_control_flow_does_not_grow_with_leaves(name):
    opt = OPTIMIZERS[name]
    one = control_flow(lowered_update(opt.make(), 1))
    twenty = control_flow(lowered_update(opt.make(), 20))
    assert twenty == one, (name, one, twenty)
    # The robust path is one decision per step, not per leaf.
    assert one <= 4, (name, one)


@pytest.mark.parametrize(
    "make",
    [
        lambda: riemax.sgdg(0.1, omega=0.1),
        lambda: riemax.adamg(0.05, omega=0.1),
        lambda: optax.chain(
            riemax.grassmann_project(),
            riemax.clip_tangent_norm(0.1),
            optax.scale_by_learning_rate(0.1),
            riemax.transported_momentum(0.9),
            riemax.exp_map_update(),
        ),
    ],
    ids=["sgdg-omega", "adamg-omega", "sgdg-chain"],
)
def test_aliases_and_chains_do_not_grow_either(make):
    assert control_flow(lowered_update(make(), 1)) == control_flow(
        lowered_update(make(), 20)
    )


def test_the_count_sees_a_conditional_per_leaf():
    """The test above can fail: a transform that branches per leaf is caught."""

    def per_leaf(g, w):
        return jax.lax.cond(jnp.all(g > 0), lambda: g, lambda: -g)

    tx = optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda u, s, p=None: (jax.tree.map(per_leaf, u, p), s),
    )
    assert control_flow(lowered_update(tx, 20)) == 20 * control_flow(
        lowered_update(tx, 1)
    )


CALLBACK_OR_IO = ("callback", "infeed", "outfeed", "print", "host", "io_")


def _primitives(jaxpr):
    """Every primitive name in a closed jaxpr, sub-jaxprs (cond, pjit, loops)
    included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    names |= _primitives(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    names |= _primitives(sub)
    return names


@pytest.mark.parametrize("name", ["adamp", "sgdp", "sgdp-nesterov"])
def test_projection_test_runs_on_device(name):
    """The jitted step has no callback or host transfer in its program, and runs
    with implicit transfers disallowed."""
    tx = OPTIMIZERS[name].make()
    params = {
        k: jnp.asarray(v, jnp.float32)
        for k, v in init_params(0, LEAF_SHAPES, on_sphere=False).items()
    }
    grads = {
        k: jnp.asarray(cycling_gradient(0, v), jnp.float32) for k, v in params.items()
    }
    state = tx.init(params)

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    names = _primitives(jax.make_jaxpr(step)(grads, state, params).jaxpr)
    assert "reduce_max" in names or "max" in names  # the test itself is there
    assert not [n for n in names if any(bad in n for bad in CALLBACK_OR_IO)], names
    jitted = jax.jit(step)
    jax.block_until_ready(jitted(grads, state, params))
    with jax.transfer_guard("disallow"):
        out = jax.block_until_ready(jitted(grads, state, params))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out[0]))


def compiled_update(tx, count):
    """The optimized HLO text of the compiled update of ``count`` ResNet-20
    kernels (all of one shape)."""
    params = _params(count)
    state = tx.init(params)

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step).lower(params, state, params).compile().as_text()


def compiled_loops(text):
    """The number of fused loops (XLA fusions, in every branch) of a compiled
    program."""
    return fused_loops(text)[0]


def distinct_loops(text):
    """The number of different fused loops of a compiled program (what the
    compiler generates code for)."""
    return fused_loops(text)[1]


#: Compiled loops per kernel on XLA's CPU backend (measured: 4, 5 and 8; optax's
#: Nesterov SGD has 2), with room for a fusion decision of another XLA version.
#: Each per-kernel loop costs compile time (about 5-10 ms on CPU) and, on small
#: kernels, a launch per step.
LOOPS_PER_KERNEL = {
    "sgdg": (lambda: riemax.sgdg(0.2, omega=0.0), 5),
    "adamg": (lambda: riemax.adamg(0.05, omega=0.0), 6),
    "sgdg-omega": (lambda: riemax.sgdg(0.2, omega=0.1), 10),
}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="counts XLA:CPU fusions")
@pytest.mark.parametrize("name", sorted(LOOPS_PER_KERNEL))
def test_compiled_loops_per_kernel(name):
    """Each kernel adds a few fused loops to the compiled step (its sums, its
    writes, its matmuls); the per-unit math and the robust path's branches are
    compiled once per step, whatever the number of kernels. Kernels of one
    shape share their compiled loops, as optax's do: the compiler generates
    code for no new loop when a kernel of a shape already present is added."""
    make, bound = LOOPS_PER_KERNEL[name]
    two, five = compiled_update(make(), 2), compiled_update(make(), 5)
    per_kernel = (compiled_loops(five) - compiled_loops(two)) / 3
    assert per_kernel <= bound, (name, per_kernel)
    assert distinct_loops(five) <= distinct_loops(two), name
    sgd = optax.sgd(0.1, 0.9, nesterov=True)
    two, five = compiled_update(sgd, 2), compiled_update(sgd, 5)
    baseline = (compiled_loops(five) - compiled_loops(two)) / 3
    assert baseline >= 1  # the count sees per-kernel loops at all


#: The sphere optimizers that share the resolution machinery in other ways
#: (a centred array, a materialised direction, a first-step radius).
SHARED_LOOPS = ("adamsrt", "adamp", "nero", "rotational")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="counts XLA:CPU fusions")
@pytest.mark.parametrize("name", SHARED_LOOPS)
def test_same_shaped_kernels_share_compiled_loops(name):
    """Three more kernels of a shape already present add at most three
    different loops in all (one is a concatenation whose operand count grows);
    a loop that slices a leaf's coefficients at a constant offset would add
    three or four per kernel."""
    make = {
        "adamsrt": lambda: riemax.adamsrt(1e-3),
        "adamp": lambda: riemax.adamp(1e-3),
        "nero": lambda: riemax.nero(0.01),
        "rotational": lambda: riemax.rotational(optax.adamw(1e-3), 0.01),
    }[name]
    two, five = compiled_update(make(), 2), compiled_update(make(), 5)
    assert distinct_loops(five) - distinct_loops(two) <= 3, name
    assert compiled_loops(five) > compiled_loops(two)  # the kernels are there


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="reads XLA:CPU fusions")
def test_parts_handed_back_to_per_unit_math_are_not_copied():
    """On the ResNet-20 tree Nero's per-neuron math takes back the leaves' parts
    of a flat per-unit array of more leaves; each leaf reads its parts at a
    run-time offset. Handed back to per-unit math they must be read as slices
    of their flat array, not copied one by one and concatenated again (which
    the run-time offsets would otherwise force on XLA)."""
    rng = np.random.default_rng(0)
    shapes = models.param_shapes("resnet20", 10)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes
    )
    tx = riemax.nero(0.01)
    state = tx.init(params)

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    text = jax.jit(step).lower(params, state, params).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    copies = set(re.findall(r"%([\w.\-]*dynamic-slice[\w.\-]*) = ", entry))
    joins = [
        set(re.findall(r"%([\w.\-]+)", line.split("concatenate(")[1].split(")")[0]))
        for line in entry.splitlines()
        if " concatenate(" in line
    ]
    assert copies, "the leaves read their parts at run-time offsets"
    assert not [j for j in joins if j and j <= copies], joins


def _stored_kernel_sized(text, shape):
    """Instructions of the compiled entry computation that store an f32 array
    with as many elements as ``shape`` and are not among the program's outputs
    (the new params and state)."""
    entry = text[text.index("\nENTRY") :]
    lines = entry.splitlines()
    root = next(line for line in lines if "ROOT" in line)
    returned = set(re.findall(r"%([\w.\-]+)", root.split("tuple(", 1)[1]))
    size = int(np.prod(shape))
    stored = []
    for line in lines:
        m = re.match(r"\s*%([\w.\-]+) = f32\[([\d,]*)\]\S* ([\w\-]+)\(", line)
        if not m or m.group(1) in returned:
            continue
        if m.group(3) in ("parameter", "bitcast", "get-tuple-element", "copy"):
            continue
        dims = [int(x) for x in m.group(2).split(",") if x]
        if int(np.prod(dims)) == size:
            stored.append(m.group(1))
    return stored


@pytest.mark.parametrize(
    "name", ["sgdp", "adamp", "nero", "rotational", "adamsrt", "adamsrt-runner"]
)
def test_no_kernel_sized_temporary_in_the_sums(monkeypatch, name):
    """Arrays the optimizers compute before their per-unit sums (SGDP's and
    AdamP's direction, Nero's new point, the rotational wrapper's shifted
    direction, AdamSRT's decayed gradient) are formed inside the summing loops,
    the CPU blocked loop
    included: the compiled step stores no array of the kernel's size besides the
    new params and state (a stored one is page-faulted in on every step by
    XLA:CPU when large)."""
    from riemax import _sums

    monkeypatch.setattr(_sums, "FUSED_MAX_ELEMENTS", 0)
    monkeypatch.setattr(_sums, "CPU_BLOCK_ELEMENTS", 256)
    shape = (3, 3, 16, 32)
    w = riemax.center_units(jax.random.normal(jax.random.key(0), shape))
    g = jax.random.normal(jax.random.key(1), shape)
    tx = {
        "sgdp": lambda: riemax.sgdp(0.1, 0.9, nesterov=True),
        "adamp": lambda: riemax.adamp(1e-3, nesterov=True),
        "nero": lambda: riemax.nero(0.01),
        "rotational": lambda: riemax.rotational(optax.trace(0.9), 0.05),
        "adamsrt": lambda: riemax.adamsrt(1e-3, weight_decay=5e-4),
        # The runner's AdamSRT with its coupled L2 (one decay for every leaf).
        "adamsrt-runner": lambda: experiments_optimizers.build(
            "adamsrt",
            experiments_optimizers.resolve_hyper("adamsrt", {}),
            riemax.MANIFOLD,
            decay=5e-4,
        ),
    }[name]()

    def step(w, state, g):
        updates, state = tx.update(g, state, w)
        return optax.apply_updates(w, updates), state

    text = jax.jit(step).lower(w, tx.init(w), g).compile().as_text()
    assert _stored_kernel_sized(text, shape) == []
