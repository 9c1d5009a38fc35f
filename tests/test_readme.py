"""The README's code blocks are claims: run them."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import (
    SHAPES,
    GradientField,
    init_params,
    max_abs_diff,
    run_reference,
    run_riemax,
    unit_norms,
    x64,
)
from reference import grassmann as ref

import riemax
from riemax import diagnostics

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_trains_and_keeps_conv_units_on_the_sphere():
    quickstart = python_blocks()[0]
    assert len([line for line in quickstart.splitlines() if line.strip()]) <= 20
    scope: dict = {}
    exec(compile(quickstart, "README quickstart", "exec"), scope)
    losses = [float(v) for v in scope["losses"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    kernel = np.asarray(scope["model"].conv.kernel[...])
    norms = np.sqrt((kernel.reshape(-1, kernel.shape[-1]) ** 2).sum(0))
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    # The report snippet runs on the quickstart's model.
    exec(compile(python_blocks()[1], "README report", "exec"), scope)


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    (test_cmd,) = [b for b in blocks if '".[test]"' in b]
    assert test_cmd.split("&&")[-1].strip() in ci
    assert '-e ".[test]"' in ci


# "Compose your own": the hand-built chains are what the README says they are.


def block_with(marker):
    (block,) = [b for b in python_blocks() if marker in b]
    return block


@pytest.fixture(scope="module")
def composed():
    """The quickstart, then the two "Compose your own" blocks, in one scope."""
    scope: dict = {}
    exec(compile(python_blocks()[0], "README quickstart", "exec"), scope)
    exec(compile(block_with("def sgdg_by_hand"), "README sgdg_by_hand", "exec"), scope)
    exec(compile(block_with("def adamg_capped"), "README adamg_capped", "exec"), scope)
    return scope


def apply_step(tx):
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def leaves64(tree):
    return [np.asarray(v, np.float64) for v in jax.tree.leaves(tree)]


def test_hand_composed_sgdg_trains_the_quickstart_model(composed):
    model, train_step = composed["model"], composed["train_step"]
    optimizer = nnx.Optimizer(model, composed["tx"], wrt=nnx.Param)
    x, y = composed["x"], composed["y"]
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(3)]
    assert np.all(np.isfinite(losses))
    kernel = np.asarray(model.conv.kernel[...])
    norms = np.sqrt((kernel.reshape(-1, kernel.shape[-1]) ** 2).sum(0))
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


@pytest.mark.parametrize("on_sphere", [True, False])
def test_sgdg_by_hand_equals_riemax_sgdg_in_float64(composed, on_sphere):
    params0 = init_params(0, on_sphere=on_sphere)
    field = GradientField(SHAPES, steps=10)  # clips some units and not others
    with x64():
        got, _ = run_riemax(
            composed["sgdg_by_hand"](0.2), params0, field, 10, jnp.float64
        )
        want, _ = run_riemax(riemax.sgdg(0.2), params0, field, 10, jnp.float64)
    assert max_abs_diff(got, want) < 1e-12
    # the chain did move: ten steps of up to 0.2 rad per unit
    assert max_abs_diff(got, params0) > 1e-2


def test_readme_multi_transform_equals_riemax_hybrid(composed):
    """The routed optimizer of the block against the named one, on the quickstart
    model's parameters, with random gradients, for ten steps."""
    labels = composed["labels"]
    euclidean = optax.sgd(0.01, momentum=0.9, nesterov=True)
    named = riemax.hybrid(riemax.sgdg(0.2), euclidean, labels)
    by_hand = optax.multi_transform(
        {"manifold": composed["sgdg_by_hand"](0.2), "euclidean": euclidean}, labels
    )
    rng = np.random.default_rng(0)
    with x64():
        params = jax.tree.map(
            lambda v: jnp.asarray(v, jnp.float64),
            nnx.as_pure(nnx.state(composed["model"], nnx.Param)),
        )
        run = {"named": [named, params], "by_hand": [by_hand, params]}
        for entry in run.values():
            entry.append(entry[0].init(params))
            entry[0] = jax.jit(apply_step(entry[0]))
        for _ in range(10):
            grads = jax.tree.map(
                lambda v: jnp.asarray(rng.standard_normal(v.shape)), params
            )
            for entry in run.values():
                step, p, state = entry
                entry[1:] = step(grads, state, p)
        got, want = leaves64(run["by_hand"][1]), leaves64(run["named"][1])
    assert len(got) == len(want) == len(leaves64(params))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


class CappedAdamG(ref.AdamG):
    """Float64 reference: Adam-G without gradient clip or orthogonality term whose
    step is clipped per unit, with ``m`` carried by exact parallel transport along
    the step taken (docs/algorithms.md#parallel-transport)."""

    def __init__(self, w, lr, max_angle, carry_m=True):
        super().__init__(w, lr, grad_clip=None, omega=0.0)
        self.max_angle, self.carry_m = max_angle, carry_m

    def step(self, w, g, lr=None):
        y, w_norm = ref.unit(w, self.ueps)
        h = w_norm * ref.proj(y, g)  # the gradient at unit(w)
        self.m = self.b1 * self.m + (1 - self.b1) * h
        self.v = self.b2 * self.v + (1 - self.b2) * ref.dot(h, h)
        alpha = np.sqrt(1 - self.p2) / (1 - self.p1)
        delta = ref.clip(
            (self.m / np.sqrt(self.v + self.eps)) * (-alpha * lr), self.max_angle
        )
        if self.carry_m:
            self.m = ref.transport(y, self.m, delta, self.ueps)
        self.p1 *= self.b1
        self.p2 *= self.b2
        return ref.expmap(y, delta, self.ueps)


def test_adamg_capped_without_cap_is_riemax_adamg(composed):
    schedule = composed["schedule"]
    params0 = init_params(1)
    field = GradientField(SHAPES, steps=10, seed=2)
    with x64():
        got, _ = run_riemax(
            composed["adamg_capped"](schedule, None), params0, field, 10, jnp.float64
        )
        want, _ = run_riemax(
            riemax.adamg(schedule, grad_clip=None, omega=0.0),
            params0,
            field,
            10,
            jnp.float64,
        )
    # riemax.adamg carries m exactly along the step it takes; the composed chain,
    # which does not know the step when it stores m, restores the norm of m's
    # projection. The two agree up to the originals' unit_eps (1e-8).
    assert max_abs_diff(got, want) < 1e-7


def test_adamg_capped_caps_every_step_and_matches_a_reference(composed):
    schedule, cap = composed["schedule"], 0.02
    params0 = init_params(2)
    field = GradientField(SHAPES, steps=12, seed=3)
    tx = composed["adamg_capped"](schedule, max_angle=cap)
    with x64():
        params = {k: jnp.asarray(v) for k, v in params0.items()}
        state = tx.init(params)

        @jax.jit
        def step(grads, state, params):
            new, state = apply_step(tx)(grads, state, params)
            largest = diagnostics.summary(diagnostics.angles_moved(params, new))["max"]
            return new, state, largest

        largest = []
        for k in range(12):
            grads = {n: jnp.asarray(g) for n, g in field(k, params).items()}
            params, state, moved = step(grads, state, params)
            largest.append(float(moved))
        got = {k: np.asarray(v) for k, v in params.items()}
    # Adam-G's first step is lr = 0.05 rad per unit: the cap binds (up to the
    # 1e-8 in the exp map's direction), and it is never exceeded
    assert max(largest) <= cap + 1e-12 and largest[0] >= cap * (1 - 1e-6)
    for w in got.values():
        np.testing.assert_allclose(unit_norms(w), 1.0, atol=1e-7)

    def reference(carry_m):
        return run_reference(
            lambda n, w: CappedAdamG(w, None, cap, carry_m),
            params0,
            field,
            12,
            lr_at=lambda k: float(schedule(k)),
        )

    assert max_abs_diff(got, reference(True)) < 1e-6  # unit_eps terms, as test_parity
    # the check can tell: with m left untransported the run ends ~1e-3 away
    assert max_abs_diff(got, reference(False)) > 1e-4


def test_where_things_live_names_every_module_and_only_existing_files():
    text = README.read_text()
    section = text[text.index("## Where things live") :]
    section = section[: section.index("\n## ", 3)]
    named = set(re.findall(r"`(?:riemax/)?(_?[a-z_]+\.py)`", section))
    package = README.parent / "riemax"
    modules = {p.name for p in package.glob("*.py")} - {"__init__.py"}
    assert modules <= named, sorted(modules - named)
    assert named <= modules | {"helpers.py"}, sorted(named - modules)


def test_field_examples_run_and_keep_their_claims():
    """The AdamP/SGDP, Nero and rotational examples of the README run as written."""
    scope: dict = {}
    exec(compile(block_with("riemax.adamp(1e-3"), "README adamp", "exec"), scope)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(scope["params"]))
    scope = {}
    exec(compile(block_with("riemax.nero_project"), "README nero", "exec"), scope)
    kernel = np.asarray(scope["params"]["kernel"]).reshape(-1, 32)
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(kernel.mean(axis=0), 0.0, atol=1e-6)
    scope = {}
    exec(compile(block_with("riemax.rotational("), "README rotational", "exec"), scope)
    assert round(float(scope["rate"]), 4) == 0.0073  # the comment's figure
    before = np.asarray(
        scope["riemax"].center_units(
            {"conv": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 16, 32))}}
        )["conv"]["kernel"]
    )
    after = np.asarray(scope["params"]["conv"]["kernel"])
    np.testing.assert_allclose(
        np.linalg.norm(after.reshape(-1, 32), axis=0),
        np.linalg.norm(before.reshape(-1, 32), axis=0),
        rtol=1e-5,
    )
    assert jnp.isfinite(scope["params"]["head"]["kernel"]).all()
