"""Parity of every optimizer family with its float64 NumPy reference
(``tests/reference/``), and with optax where a family reduces to an optax
optimizer.

* SGD-G/Adam-G and their chains: 20 steps on a conv and a dense kernel, gradients
  evaluated at each iterate, clip active on some units and not others.
  Tolerances from the contract: 1e-12 with exact geometry (``unit_eps=0``) in
  float64, 1e-6 with the original's ``unit_eps=1e-8``, 1e-5 in float32.
* AdamS/AdamSRT/SGD-MRT: 20 steps on every leaf, 1e-12 in float64, 1e-5 in
  float32.
* SGDP/AdamP (with the branch the projection test takes on every step), Nero and
  the rotational wrapper: see their section.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    LEAF_SHAPES,
    SHAPES,
    GradientField,
    adamg_chain,
    cycling_gradient,
    fewer_by_default,
    init_params,
    max_abs_diff,
    run_reference,
    run_riemax,
    sgdg_chain,
    unit_norms,
    x64,
)
from reference import adamp as adamp_ref
from reference import grassmann as grassmann_ref
from reference import nero as nero_ref
from reference import rotational as rotational_ref
from reference import srt as srt_ref

import riemax
from riemax import _adamp_step as _adamp
from riemax import _gram as _numerics

STEPS = 20


# ============================================================= SGD-G / Adam-G


def sphere_cases():
    for omega in (0.0, 0.1):
        for clip in (0.1, None):
            yield pytest.param(
                lambda ueps, omega=omega, clip=clip: sgdg_chain(
                    0.2, 0.9, grad_clip=clip, omega=omega, unit_eps=ueps
                ),
                lambda ueps, omega=omega, clip=clip: (
                    lambda n, w: grassmann_ref.SGDG(
                        w, 0.2, 0.9, grad_clip=clip, omega=omega, eps=ueps
                    )
                ),
                id=f"sgdg_chain-omega{omega}-clip{clip}",
            )
            yield pytest.param(
                lambda ueps, omega=omega, clip=clip: adamg_chain(
                    0.05, grad_clip=clip, omega=omega, unit_eps=ueps
                ),
                lambda ueps, omega=omega, clip=clip: (
                    lambda n, w: grassmann_ref.AdamG(
                        w, 0.05, grad_clip=clip, omega=omega, unit_eps=ueps
                    )
                ),
                id=f"adamg_chain-omega{omega}-clip{clip}",
            )
            yield pytest.param(
                lambda ueps, omega=omega, clip=clip: riemax.sgdg(
                    0.2, 0.9, grad_clip=clip, omega=omega, unit_eps=ueps
                ),
                lambda ueps, omega=omega, clip=clip: (
                    lambda n, w: grassmann_ref.SGDG(
                        w, 0.2, 0.9, grad_clip=clip, omega=omega, eps=ueps
                    )
                ),
                id=f"sgdg-omega{omega}-clip{clip}",
            )
            yield pytest.param(
                lambda ueps, omega=omega, clip=clip: riemax.adamg(
                    0.05, grad_clip=clip, omega=omega, unit_eps=ueps
                ),
                lambda ueps, omega=omega, clip=clip: (
                    lambda n, w: grassmann_ref.AdamG(
                        w, 0.05, grad_clip=clip, omega=omega, unit_eps=ueps
                    )
                ),
                id=f"adamg-omega{omega}-clip{clip}",
            )


def _field_for(request):
    # Unclipped, the unit-scale field turns units by several radians per step (a
    # chaotic regime where rounding and the 1e-8 epsilons are amplified): exact
    # geometry in float64 is checked there; the other comparisons use gradients
    # of a realistic size when clipping is off.
    clipped = "clipNone" not in request.node.callspec.id
    exact = "1e-12" in request.node.callspec.id
    return GradientField(SHAPES, STEPS, scale=1.0 if clipped or exact else 0.05)


def sphere_cases_float64():
    """Every case exactly (unit_eps 0, 1e-12) and with the originals' epsilons
    (1e-8, 1e-6); the latter by default at the published setting only."""
    for unit_eps, tol in [(0.0, 1e-12), (1e-8, 1e-6)]:
        for c in sphere_cases():
            slow = unit_eps and "omega0.1-clip0.1" not in c.id
            yield pytest.param(
                *c.values,
                unit_eps,
                tol,
                id=f"{unit_eps}-{tol}-{c.id}",
                marks=pytest.mark.slow if slow else (),
            )


@pytest.mark.parametrize(
    "make_tx, make_ref, unit_eps, tol", list(sphere_cases_float64())
)
def test_sphere_optimizers_float64(make_tx, make_ref, unit_eps, tol, request):
    p0 = init_params(0)
    field = _field_for(request)
    with x64():
        got, _ = run_riemax(make_tx(unit_eps), p0, field, STEPS, np.float64)
    want = run_reference(make_ref(unit_eps), p0, field, STEPS)
    assert max_abs_diff(got, want) <= tol
    # The comparison is meaningful: the trajectory moved well away from the start.
    assert max_abs_diff(want, p0) > 0.1


# float32 by default at the published setting and at the unclipped, unpenalised one
@pytest.mark.parametrize(
    "make_tx, make_ref",
    fewer_by_default(sphere_cases(), ["omega0.1-clip0.1", "omega0.0-clipNone"]),
)
def test_sphere_optimizers_float32(make_tx, make_ref, request):
    p0 = {k: v.astype(np.float32).astype(np.float64) for k, v in init_params(0).items()}
    field = _field_for(request)
    got, _ = run_riemax(make_tx(1e-8), p0, field, STEPS, np.float32)
    want = run_reference(make_ref(1e-8), p0, field, STEPS)
    assert max_abs_diff(got, want) <= 1e-5


def test_schedule_parity_float64():
    """A piecewise-constant schedule is read at the step count, as the original."""
    sched = optax.piecewise_constant_schedule(0.2, {5: 0.2, 12: 0.2})
    p0 = init_params(4)
    field = GradientField(SHAPES, STEPS)
    with x64():
        got, _ = run_riemax(
            riemax.sgdg(sched, unit_eps=0.0), p0, field, STEPS, np.float64
        )
        lrs = [float(sched(k)) for k in range(STEPS)]
    assert lrs[4] == 0.2 and lrs[5] != 0.2
    want = run_reference(
        lambda n, w: grassmann_ref.SGDG(w, None, eps=0.0),
        p0,
        field,
        STEPS,
        lr_at=lrs.__getitem__,
    )
    assert max_abs_diff(got, want) <= 1e-12


def test_hybrid_parity_with_nesterov_companion():
    """hybrid(sgdg, L2 + Nesterov SGD) = SGD-G on kernels + TF momentum elsewhere."""
    shapes = {"conv": (3, 3, 4, 8), "bias": (8,), "fc": (8, 3)}
    p0 = init_params(5, shapes)
    p0["fc"] = np.random.default_rng(9).standard_normal((8, 3))
    field = GradientField(shapes, STEPS)
    labels = {"conv": "manifold", "bias": "euclidean", "fc": "euclidean"}
    tx = riemax.hybrid(
        riemax.sgdg(0.2, unit_eps=0.0),
        optax.chain(
            optax.add_decayed_weights(5e-4), optax.sgd(0.01, 0.9, nesterov=True)
        ),
        labels,
    )
    with x64():
        got, _ = run_riemax(tx, p0, field, STEPS, np.float64)

    def make(name, w):
        if name == "conv":
            return grassmann_ref.SGDG(w, 0.2, eps=0.0)
        return grassmann_ref.NesterovSGD(w, 0.01, 0.9, weight_decay=5e-4)

    want = run_reference(make, p0, field, STEPS)
    assert max_abs_diff(got, want) <= 1e-12


@pytest.mark.parametrize(
    "fused, chain",
    [
        (
            lambda: riemax.sgdg(0.2, unit_eps=1e-8),
            lambda: sgdg_chain(0.2, unit_eps=1e-8),
        ),
        (
            lambda: riemax.sgdg(0.2, grad_clip=None, unit_eps=0.0),
            lambda: sgdg_chain(0.2, grad_clip=None, unit_eps=0.0),
        ),
        (
            lambda: riemax.adamg(0.05, unit_eps=1e-8),
            lambda: adamg_chain(0.05, unit_eps=1e-8),
        ),
        (
            lambda: riemax.adamg(0.05, grad_clip=None, unit_eps=0.0),
            lambda: adamg_chain(0.05, grad_clip=None, unit_eps=0.0),
        ),
    ],
)
def test_fused_step_equals_the_chain_with_zero_and_radial_units(fused, chain):
    """The one-pass steps agree with the chains of transforms, edge units included."""
    p0 = init_params(6)
    p0["conv"][..., 0] = 0.0  # zero-norm unit: Euclidean step
    field = GradientField(SHAPES, STEPS, scale=0.05)  # realistic steps (see above)
    radial = field.r["dense"]
    for k in range(STEPS):  # a purely radial gradient on one dense unit
        radial[k][:, 1] = 0.0
    with x64():
        a, _ = run_riemax(fused(), p0, field, STEPS, np.float64)
        b, _ = run_riemax(chain(), p0, field, STEPS, np.float64)
    assert max_abs_diff(a, b) <= 1e-12
    assert max_abs_diff(a, p0) > 0.1


# ================================================== AdamS / AdamSRT / SGD-MRT


def srt_cases():
    for wd in (0.0, 5e-4):
        for name, tx, mk in (
            (
                "adamsrt",
                riemax.adamsrt,
                lambda w, wd, ax: srt_ref.AdamSRT(
                    w, 1e-2, 0.9, 0.99, weight_decay=wd, channel_axes=ax, rt=True
                ),
            ),
            (
                "adams",
                riemax.adams,
                lambda w, wd, ax: srt_ref.AdamSRT(
                    w, 1e-2, 0.9, 0.99, weight_decay=wd, channel_axes=ax, rt=False
                ),
            ),
        ):
            for axes in ((-1,), (), None):
                yield pytest.param(
                    lambda tx=tx, wd=wd, axes=axes: tx(
                        1e-2, 0.9, 0.99, weight_decay=wd, channel_axes=axes
                    ),
                    lambda mk=mk, wd=wd, axes=axes: lambda n, w: mk(w, wd, axes),
                    id=f"{name}-wd{wd}-axes{axes}",
                )
        for axes in ((-1,), (), None):
            yield pytest.param(
                lambda wd=wd, axes=axes: riemax.sgdmrt(
                    0.1, 0.9, weight_decay=wd, channel_axes=axes
                ),
                lambda wd=wd, axes=axes: (
                    lambda n, w: srt_ref.SGDMRT(
                        w, 0.1, 0.9, weight_decay=wd, channel_axes=axes
                    )
                ),
                id=f"sgdmrt-wd{wd}-axes{axes}",
            )


@pytest.mark.parametrize("make_tx, make_ref", list(srt_cases()))
def test_group_optimizers_float64(make_tx, make_ref):
    p0 = init_params(2, LEAF_SHAPES, on_sphere=False)
    field = GradientField(LEAF_SHAPES, STEPS)
    with x64():
        got, _ = run_riemax(make_tx(), p0, field, STEPS, np.float64)
    want = run_reference(make_ref(), p0, field, STEPS)
    assert max_abs_diff(got, want) <= 1e-12
    assert max_abs_diff(want, p0) > 1e-2


@pytest.mark.parametrize(
    "make_tx, make_ref", fewer_by_default(srt_cases(), ["wd0.0005"])
)
def test_group_optimizers_float32(make_tx, make_ref):
    p0 = init_params(2, LEAF_SHAPES, on_sphere=False)
    p0 = {k: v.astype(np.float32).astype(np.float64) for k, v in p0.items()}
    field = GradientField(LEAF_SHAPES, STEPS)
    got, _ = run_riemax(make_tx(), p0, field, STEPS, np.float32)
    want = run_reference(make_ref(), p0, field, STEPS)
    assert max_abs_diff(got, want) <= 1e-5


def test_elementwise_groups_reduce_to_optax():
    """channel_axes=None is Adam / momentum SGD with coupled L2 (to 1e-7)."""
    p0 = init_params(3, LEAF_SHAPES, on_sphere=False)
    field = GradientField(LEAF_SHAPES, STEPS)
    pairs = [
        (
            riemax.adamsrt(1e-2, weight_decay=1e-3, channel_axes=None),
            optax.chain(optax.add_decayed_weights(1e-3), optax.adam(1e-2)),
        ),
        (
            riemax.sgdmrt(0.1, 0.9, weight_decay=1e-3, channel_axes=None),
            optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, 0.9)),
        ),
    ]
    for ours, theirs in pairs:
        a, _ = run_riemax(ours, p0, field, STEPS, np.float32)
        b, _ = run_riemax(theirs, p0, field, STEPS, np.float32)
        assert max_abs_diff(a, b) <= 1e-6


# ================================================= SGDP/AdamP, Nero, rotational
# Against the float64 references of docs/algorithms.md#sgdp-and-adamp, #nero and
# #rotational-wrapper (tests/reference/adamp.py, nero.py and rotational.py): 12
# steps of a gradient that cycles through the kinds that fire each branch of the
# SGDP/AdamP projection test, each side taking its gradients at its own iterate;
# 1e-10 in float64.

KERNELS = ("conv", "dense")
PAIR_STEPS = 12
PARITY = 1e-10
BRANCH_NAMES = {
    _adamp.NO_PROJECTION: "none",
    _adamp.CHANNEL: "channel",
    _adamp.LAYER: "layer",
}


def initial(seed=0):
    return init_params(seed, LEAF_SHAPES, on_sphere=False)


def run_pair(
    tx, make_ref, params0, steps=PAIR_STEPS, grad=cycling_gradient, on_step=None
):
    """Runs riemax (jitted, float64) and the reference side by side.

    Each side takes its gradients at its own iterate. ``on_step(grads, state,
    params)`` is called before every riemax step. Returns both final params, the
    reference optimizers and, per step, the reference's branch per leaf (SGDP and
    AdamP).
    """
    params = {k: jnp.asarray(v) for k, v in params0.items()}
    state = jax.jit(tx.init)(params)
    refs = {k: make_ref(k, v) for k, v in params0.items()}
    theirs = {k: np.asarray(v, np.float64) for k, v in params0.items()}
    step = jax.jit(tx.update)
    branches = []
    for k in range(steps):
        grads = {n: jnp.asarray(grad(k, params[n])) for n in params}
        if on_step is not None:
            on_step(grads, state, params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        theirs = {n: refs[n].step(theirs[n], grad(k, theirs[n])) for n in theirs}
        branches.append({n: getattr(refs[n], "branch", None) for n in refs})
    return params, theirs, refs, branches


# ---------------------------------------------------------------- SGDP / AdamP

ADAMP_CASES = [
    dict(nesterov=False, weight_decay=0.0),
    dict(nesterov=False, weight_decay=0.1),
    dict(nesterov=True, weight_decay=0.1),
    dict(nesterov=True, weight_decay=0.0, b1=0.8, b2=0.99, delta=0.2, wd_ratio=0.3),
]
SGDP_CASES = [
    dict(momentum=0.9, nesterov=False, weight_decay=0.0),
    dict(momentum=0.9, nesterov=False, weight_decay=1e-2, dampening=0.1),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.5, nesterov=True, weight_decay=0.0, delta=0.2, wd_ratio=0.5),
]


@functools.cache
def _adamp_branches(lr, kwargs):
    """The per-leaf branch (and update) of the leaf function the AdamP step uses,
    for the state before a step."""
    kw = dict(kwargs)

    @jax.jit
    def branches(grads, state, params):
        count = optax.safe_increment(state.count)
        out = {}
        for n in params:
            update, _, _, branch = _numerics.run(_adamp.adamp_leaf(
                grads[n], state.mu[n], state.nu[n], params[n], lr=lr, count=count,
                b1=kw.get("b1", 0.9), b2=kw.get("b2", 0.999), eps=1e-8,
                weight_decay=kw["weight_decay"], delta=kw.get("delta", 0.1),
                wd_ratio=kw.get("wd_ratio", 0.1), nesterov=kw["nesterov"],
                mode=_adamp.TEST,
            ))  # fmt: skip
            out[n] = (update, branch)
        return out

    return branches


@functools.cache
def _sgdp_branches(lr, kwargs):
    kw = dict(kwargs)

    @jax.jit
    def branches(grads, state, params):
        out = {}
        for n in params:
            update, _, branch = _numerics.run(_adamp.sgdp_leaf(
                grads[n], state.trace[n], params[n], lr=lr,
                momentum=kw["momentum"], dampening=kw.get("dampening", 0.0),
                weight_decay=kw["weight_decay"], nesterov=kw["nesterov"], eps=1e-8,
                delta=kw.get("delta", 0.1), wd_ratio=kw.get("wd_ratio", 0.1),
                mode=_adamp.TEST,
            ))  # fmt: skip
            out[n] = (update, branch)
        return out

    return branches


def _recorder(tx, branches_fn):
    """An ``on_step`` hook recording, per step, the branch per leaf of the leaf
    function the step runs, after checking that it gives the step's update."""
    update = jax.jit(tx.update)
    seen = []

    def hook(grads, state, params):
        got = branches_fn(grads, state, params)
        updates, _ = update(grads, state, params)
        for n in params:
            np.testing.assert_allclose(got[n][0], updates[n], rtol=1e-13, atol=1e-16)
        seen.append({n: BRANCH_NAMES[int(got[n][1])] for n in params})

    return hook, seen


def _check_branches(ours, theirs):
    """Same branch on every step and leaf; on each kernel the channel view, the
    layer view and no projection all occur."""
    assert ours == theirs
    for n in KERNELS:
        assert {step[n] for step in theirs} == {"channel", "layer", "none"}, n
    assert {step["bias"] for step in theirs} == {"none"}


@pytest.mark.parametrize("case", ADAMP_CASES, ids=str)
def test_adamp_matches_reference_and_its_branches(case):
    lr = 1e-2
    with x64():
        tx = riemax.adamp(lr, **case)
        hook, seen = _recorder(tx, _adamp_branches(lr, tuple(sorted(case.items()))))
        ours, theirs, _, branches = run_pair(
            tx, lambda n, w: adamp_ref.AdamP(w, lr, **case), initial(), on_step=hook
        )
    assert max_abs_diff(ours, theirs) < PARITY
    _check_branches(seen, branches)


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_adamp_and_sgdp_directions_formed_inside_the_blocked_sums(monkeypatch, name):
    """The direction AdamP and SGDP project is formed from the moments inside
    the per-unit sums: here the CPU loop over row blocks (blocks of 5 rows, a
    remainder of 1 on the conv kernel) sums it, and the steps match the float64
    reference as on the one-reduction path."""
    from riemax import _sums

    monkeypatch.setattr(_sums, "FUSED_MAX_ELEMENTS", 0)
    monkeypatch.setattr(_sums, "CPU_BLOCK_ELEMENTS", 40)
    case = dict(nesterov=True, weight_decay=0.1 if name == "adamp" else 1e-2)
    lr = 1e-2 if name == "adamp" else 0.1
    with x64():
        if name == "adamp":
            tx = riemax.adamp(lr, **case)
            ref = adamp_ref.AdamP
        else:
            tx = riemax.sgdp(lr, momentum=0.9, **case)
            ref = functools.partial(adamp_ref.SGDP, momentum=0.9)
        ours, theirs, _, _ = run_pair(
            tx, lambda n, w: ref(w, lr, **case), initial(), steps=6
        )
    assert max_abs_diff(ours, theirs) < PARITY


@pytest.mark.parametrize("case", SGDP_CASES, ids=str)
def test_sgdp_matches_reference_and_its_branches(case):
    lr = 0.1
    with x64():
        tx = riemax.sgdp(lr, **case)
        hook, seen = _recorder(tx, _sgdp_branches(lr, tuple(sorted(case.items()))))
        ours, theirs, _, branches = run_pair(
            tx, lambda n, w: adamp_ref.SGDP(w, lr, **case), initial(), on_step=hook
        )
    assert max_abs_diff(ours, theirs) < PARITY
    _check_branches(seen, branches)


LABELS = {"conv": "manifold", "dense": "euclidean", "bias": "euclidean"}


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_scale_invariant_labels_replace_the_test(name):
    """With labels, "manifold" kernels are projected per unit every step and the
    others never, whatever the gradient; the trajectory matches the reference
    with the test forced the same way."""
    modes = {"conv": "channel", "dense": "none", "bias": "none"}
    with x64():
        if name == "adamp":
            tx = riemax.adamp(1e-2, weight_decay=0.1, scale_invariant=LABELS)

            def make(n, w):
                return adamp_ref.AdamP(w, 1e-2, weight_decay=0.1, mode=modes[n])
        else:
            tx = riemax.sgdp(
                0.1, momentum=0.9, weight_decay=1e-2, scale_invariant=LABELS
            )

            def make(n, w):
                return adamp_ref.SGDP(
                    w, 0.1, momentum=0.9, weight_decay=1e-2, mode=modes[n]
                )

        ours, theirs, _, _ = run_pair(tx, make, initial())
        assert max_abs_diff(ours, theirs) < PARITY
        # ... and it differs from the per-step test (which fires on "dense").
        plain = {"adamp": riemax.adamp(1e-2, weight_decay=0.1),
                 "sgdp": riemax.sgdp(0.1, momentum=0.9, weight_decay=1e-2)}[name]  # fmt: skip
        tested, _, _, _ = run_pair(plain, make, initial())
        assert float(np.max(np.abs(tested["dense"] - ours["dense"]))) > 1e-6
        # A callable gives the same as the tree.
        call = {"adamp": riemax.adamp(1e-2, weight_decay=0.1,
                                      scale_invariant=lambda p: LABELS),
                "sgdp": riemax.sgdp(0.1, momentum=0.9, weight_decay=1e-2,
                                    scale_invariant=lambda p: LABELS)}[name]  # fmt: skip
        again, _, _, _ = run_pair(call, make, initial(), steps=3)
        short, _, _, _ = run_pair(tx, make, initial(), steps=3)
        assert max_abs_diff(again, short) == 0


def test_adamp_and_sgdp_reduce_to_optax_on_one_dimensional_leaves():
    """A leaf with one axis takes the plain step: AdamW, and momentum SGD.

    (AdamP's Nesterov form keeps Adam's bias correction 1 - b1**t for the whole
    step, unlike optax's NAdam, so it is compared with the reference only.)
    """
    with x64():
        b = {"bias": jnp.asarray(initial()["bias"])}
        pairs = [
            (riemax.adamp(1e-2, weight_decay=0.1), optax.adamw(1e-2, weight_decay=0.1)),
            (riemax.adamp(1e-2), optax.adam(1e-2)),
            (riemax.sgdp(0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)),
            (riemax.sgdp(0.1, momentum=0.9, nesterov=True),
             optax.sgd(0.1, momentum=0.9, nesterov=True)),
        ]  # fmt: skip
        for ours_tx, optax_tx in pairs:
            p, q = b, b
            s, t = ours_tx.init(p), optax_tx.init(q)
            for k in range(5):
                g = {"bias": jnp.asarray(cycling_gradient(k, p["bias"]))}
                u, s = ours_tx.update(g, s, p)
                v, t = optax_tx.update(g, t, q)
                p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
            np.testing.assert_allclose(p["bias"], q["bias"], rtol=1e-13, atol=1e-15)


# ------------------------------------------------------------------------- Nero


@pytest.mark.parametrize("constraints", [True, False])
def test_nero_project_then_nero_matches_reference(constraints):
    """nero_project, then Nero: float64 parity, with a neuron of zero gradient on
    one step (the original's 0/0 -> 0) and on conv, dense and 1-D leaves."""

    def grad(k, w):
        g = cycling_gradient(k, w)
        if k == 4:
            g = np.array(g)
            g[..., 1] = 0.0
        return g

    with x64():
        p0 = initial(3)
        if constraints:
            projected = jax.jit(riemax.nero_project)(
                {k: jnp.asarray(v) for k, v in p0.items()}
            )
            want = {k: nero_ref.nero_project(v) for k, v in p0.items()}
            assert max_abs_diff(projected, want) < 1e-14
            p0 = {k: np.asarray(v) for k, v in projected.items()}
        tx = riemax.nero(0.01, constraints=constraints)
        ours, theirs, refs, _ = run_pair(
            tx,
            lambda n, w: nero_ref.Nero(w, 0.01, constraints=constraints),
            p0,
            grad=grad,
        )
        state = jax.jit(tx.init)({k: jnp.asarray(v) for k, v in p0.items()})
        for n in p0:
            np.testing.assert_allclose(state.scale[n], refs[n].scale, rtol=1e-14)
        ours = {k: np.asarray(v) for k, v in ours.items()}
    assert max_abs_diff(ours, theirs) < PARITY
    if constraints:
        for n in KERNELS:
            np.testing.assert_allclose(unit_norms(ours[n]), 1.0, atol=1e-14)
            np.testing.assert_allclose(
                np.sum(ours[n], axis=tuple(range(ours[n].ndim - 1))), 0.0, atol=1e-13
            )


# ------------------------------------------------------------------ rotational

INNERS = {
    "adam": (optax.scale_by_adam, rotational_ref.AdamDirection),
    "sgdm": (
        lambda: optax.trace(0.9),
        lambda w: rotational_ref.MomentumDirection(w, 0.9),
    ),
    "lion": (optax.scale_by_lion, rotational_ref.LionDirection),
}


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize(
    "zero_mean, centre",
    [
        (True, True),
        (False, False),
        pytest.param(True, False, marks=pytest.mark.slow),
        pytest.param(False, True, marks=pytest.mark.slow),
    ],
)
def test_rotational_matches_reference(inner, zero_mean, centre):
    make_inner, make_direction = INNERS[inner]
    rate = 0.05
    with x64():
        p0 = {k: v for k, v in initial(5).items() if k in KERNELS}
        if centre:
            p0 = {
                k: np.asarray(v)
                for k, v in jax.jit(riemax.center_units)(
                    {k: jnp.asarray(v) for k, v in p0.items()}
                ).items()
            }
            want = {
                k: rotational_ref.center_units(v)
                for k, v in initial(5).items()
                if k in KERNELS
            }
            assert max_abs_diff(p0, want) < 1e-13
        tx = riemax.rotational(make_inner(), rate, zero_mean=zero_mean)
        ours, theirs, refs, _ = run_pair(
            tx,
            lambda n, w: rotational_ref.Rotational(
                w, make_direction(w), rate, zero_mean=zero_mean
            ),
            p0,
        )
    assert max_abs_diff(ours, theirs) < PARITY
    for n in ours:
        np.testing.assert_allclose(unit_norms(ours[n]), refs[n].r.ravel(), rtol=1e-13)


def _careful_passes(monkeypatch):
    """A counter of the steps whose nearly-radial (or nearly constant) branch
    runs: it sums the combinations directly."""
    taken = [0]
    careful = _numerics._careful_sums

    def counted(requests):
        jax.debug.callback(lambda: taken.__setitem__(0, taken[0] + 1))
        return careful(requests)

    monkeypatch.setattr(_numerics, "_careful_sums", counted)
    return taken


def _float32_steps(tx, ref, p0, grads):
    """``tx``'s float32 steps on the kernel ``p0`` and the float64 reference
    ``ref``'s, with the same gradients: both final kernels in float64."""
    params = jnp.asarray(p0, jnp.float32)
    state = tx.init(params)
    step = jax.jit(tx.update)
    theirs = p0
    for g in grads:
        updates, state = step(jnp.asarray(g, jnp.float32), state, params)
        params = optax.apply_updates(params, updates)
        theirs = ref.step(theirs, g)
    return np.asarray(params, np.float64), theirs


def _direction_with_a_large_mean(steps):
    """Float32 rotational steps (momentum-SGD direction) on a centred kernel whose
    gradients have a per-unit mean of about two thirds of their squared norm, and
    the float64 reference's steps."""
    rng = np.random.default_rng(3)
    shape = (3, 3, 8, 6)
    p0 = rotational_ref.center_units(rng.standard_normal(shape))
    grads = [1.0 + 0.7 * rng.standard_normal(shape) for _ in range(steps)]
    tx = riemax.rotational(optax.trace(0.9), 0.05)
    ref = rotational_ref.Rotational(p0, rotational_ref.MomentumDirection(p0, 0.9), 0.05)
    return _float32_steps(tx, ref, p0, grads)


def test_rotational_direction_with_a_large_mean_takes_one_pass(monkeypatch):
    # Without the shift the Gram identity's centred norm keeps about a third of
    # |u|^2 on every unit: each step would sum the centred direction again.
    taken = _careful_passes(monkeypatch)
    ours, theirs = _direction_with_a_large_mean(3)
    assert taken[0] == 0
    np.testing.assert_allclose(ours, theirs, atol=2e-6)
    monkeypatch.setattr(
        riemax._rotational,
        "_shift",
        lambda u, axes: jnp.zeros_like(jnp.sum(u, axis=axes, keepdims=True)),
    )
    ours, theirs = _direction_with_a_large_mean(3)
    assert taken[0] == 3
    np.testing.assert_allclose(ours, theirs, atol=2e-6)


def _nero_steps(p0, steps=3):
    """Float32 Nero steps (constraints on) on one kernel with Gaussian gradients,
    and the float64 reference's steps."""
    rng = np.random.default_rng(4)
    # Both sides start from the same float32 values.
    p0 = np.asarray(p0, np.float32).astype(np.float64)
    grads = [
        rng.standard_normal(p0.shape).astype(np.float32).astype(np.float64)
        for _ in range(steps)
    ]
    return _float32_steps(riemax.nero(0.01), nero_ref.Nero(p0, 0.01), p0, grads)


def test_nero_centres_and_normalises_from_one_pass(monkeypatch):
    """Nero's new point: mean and centred norm from the sums of w and g (one
    pass); where that identity cancels (a unit far from centred, as before the
    first projection) the step sums the centred point directly."""
    taken = _careful_passes(monkeypatch)
    rng = np.random.default_rng(5)
    projected = nero_ref.nero_project(rng.standard_normal((3, 3, 4, 5)))
    ours, theirs = _nero_steps(projected)
    assert taken[0] == 0
    np.testing.assert_allclose(ours, theirs, atol=3e-7)  # elements up to 0.6
    # Units with a mean 30 times their spread: the first step's centred norm
    # keeps about 1/900 of |q|^2, and only that step takes the direct sums. The
    # float32 q itself is rounded on the scale of its mean: 30 times coarser
    # than on the centred point's.
    off_centre = 3.0 + 0.1 * rng.standard_normal((3, 3, 4, 5))
    ours, theirs = _nero_steps(off_centre)
    assert taken[0] == 1
    np.testing.assert_allclose(ours, theirs, atol=3e-6)


def test_rotational_schedule_rate_matches_reference():
    def sched(count):
        return 0.1 * 0.8**count

    with x64():
        p0 = {"conv": initial(6)["conv"]}
        tx = riemax.rotational(optax.scale_by_adam(), sched)
        params = {k: jnp.asarray(v) for k, v in p0.items()}
        state = tx.init(params)
        r = rotational_ref.Rotational(
            p0["conv"], rotational_ref.AdamDirection(p0["conv"]), None
        )
        theirs = p0["conv"]
        step = jax.jit(tx.update)
        for k in range(PAIR_STEPS):
            g = {"conv": jnp.asarray(cycling_gradient(k, params["conv"]))}
            updates, state = step(g, state, params)
            params = optax.apply_updates(params, updates)
            theirs = r.step(theirs, cycling_gradient(k, theirs), rate=float(sched(k)))
    np.testing.assert_allclose(params["conv"], theirs, atol=PARITY)


def test_equilibrium_rates_are_the_papers_formulas():
    cases = [
        ("adamw", 1e-3, 0.05, {}),
        ("adamw", 0.05, 0.01, {"b1": 0.8}),
        ("sgdm", 0.5, 1e-4, {"momentum": 0.9}),
        ("sgdm", 0.1, 5e-4, {}),
        ("lion", 1e-4, 1.0, {}),
        ("lion", 3e-4, 0.1, {"b1": 0.95, "b2": 0.98}),
    ]
    for inner, lr, wd, kw in cases:
        want = rotational_ref.equilibrium_rate(inner, lr, wd, **kw)
        got = riemax.equilibrium_rate(inner, lr, wd, **kw)
        assert isinstance(got, float)
        assert got == pytest.approx(want, rel=1e-15)
        sched = riemax.equilibrium_rate(inner, lambda c: lr * 0.5**c, wd, **kw)
        assert float(sched(2)) == pytest.approx(
            rotational_ref.equilibrium_rate(inner, lr * 0.25, wd, **kw), rel=1e-6
        )
        traced = jax.jit(lambda a: riemax.equilibrium_rate(inner, a, wd, **kw))(lr)
        assert float(traced) == pytest.approx(want, rel=1e-6)
    # The closed forms, once by hand: AdamW at b1 = 0.9 is sqrt(lr wd / 9.5).
    assert riemax.equilibrium_rate("adamw", 1e-3, 0.05) == pytest.approx(
        math.sqrt(1e-3 * 0.05 / 9.5), rel=1e-14
    )
    with pytest.raises(ValueError, match="'adamw', 'sgdm', 'lion', got 'adam'"):
        riemax.equilibrium_rate("adam", 1e-3, 0.1)
