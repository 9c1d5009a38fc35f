"""Tests for riemax._labels: rule, regex, structural and numerical labels, report."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import label_models as lm
import numpy as np
import optax
import pytest
from flax import nnx

import riemax
from riemax._labels import check_labels

M, E = riemax.MANIFOLD, riemax.EUCLIDEAN


def flat(tree):
    return {
        riemax._tree.path_str(p): v
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def expected_labels(template, expected, column):
    """Every leaf euclidean except the listed kernels (column 0/1 of the case)."""
    out = {name: E for name in flat(template)}
    out.update({name: pair[column] for name, pair in expected.items()})
    return out


def routing_tx():
    """Manifold leaves frozen, Euclidean leaves moved: shows where each leaf went."""
    return {M: optax.set_to_zero(), E: optax.sgd(0.1)}


# ---------------------------------------------------------------------------
# 1. The papers' rule
# ---------------------------------------------------------------------------


def test_rule_reproduces_wrn_28_10_split():
    params = lm.wrn_param_shapes(28, 10)
    labels = flat(riemax.labels_by_rule(params))
    # Cho & Lee (docs/algorithms.md#manifold-parameters): stem on; every 3x3 conv on except group2/block0/conv1
    # [3,3,16,160] (144 < 160); 1x1 projections, BN and classifier off.
    convs = [p for p in labels if re.search(r"conv\d?/kernel$", p)]
    expected_on = {"stem/conv/kernel"} | set(convs)
    expected_on -= {"group2/block0/conv1/kernel"}
    assert {p for p, lab in labels.items() if lab == M} == expected_on
    assert len(expected_on) == 24  # 1 stem + 3 groups x 4 blocks x 2 convs - 1
    assert labels["group2/block0/conv1/kernel"] == E
    assert labels["stem/conv/kernel"] == M
    assert all(labels[p] == E for p in labels if "projection" in p)
    assert labels["classifier/kernel"] == E and labels["bn/scale"] == E


def test_rule_details_and_weight_name():
    params = {
        "conv": {"weight": jnp.zeros((8, 4)), "kernel": jnp.zeros((2, 4))},
        "conv1d": {"kernel": jnp.zeros((4,))},
    }
    labels, why = riemax.labels_by_rule(params, return_details=True)
    assert labels == {
        "conv": {"weight": M, "kernel": E},
        "conv1d": {"kernel": E},
    }
    assert why["conv/weight"] == "rule: 'conv' & fan_in 8 > fan_out 4"
    assert "fan_in 2 <= fan_out 4" in why["conv/kernel"]
    assert why["conv1d/kernel"] == "rule: not a kernel"


class ConvHead(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Linear(8, 4, rngs=rngs)  # 'conv' in path, 8 > 4
        self.head = nnx.Linear(4, 2, rngs=rngs)  # no 'conv'

    def __call__(self, x):
        return self.head(self.conv(x))


def test_rule_callable_inside_nnx_optimizer():
    model = ConvHead(nnx.Rngs(0))
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    tx = optax.partition(routing_tx(), riemax.labels_by_rule)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 8))) ** 2))(model)
    optimizer.update(model, grads)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(after["conv"]["kernel"], before["conv"]["kernel"])
    assert not np.allclose(after["head"]["kernel"], before["head"]["kernel"])


# ---------------------------------------------------------------------------
# 2. Regex rules
# ---------------------------------------------------------------------------

REGEX_PARAMS = {
    "block": {
        "conv1": {"kernel": jnp.zeros((3, 3, 4, 4))},
        "conv2": {"kernel": jnp.zeros((3, 3, 4, 4))},
        "bn": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)},
    },
    "head": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)},
}


def test_regex_first_match_wins():
    rules = [
        (r"conv2/kernel", E),  # before the general conv rule: wins for conv2
        (r"conv\d/kernel$", M),
        (r".*", E),
    ]
    labels, why = riemax.labels_by_regex(REGEX_PARAMS, rules, return_details=True)
    assert labels["block"]["conv1"]["kernel"] == M
    assert labels["block"]["conv2"]["kernel"] == E
    assert labels["head"]["kernel"] == E and labels["block"]["bn"]["scale"] == E
    assert why["block/conv2/kernel"] == "regex #0 'conv2/kernel'"
    assert why["head/bias"] == "regex #2 '.*'"


def test_regex_uncovered_lists_every_path():
    with pytest.raises(ValueError) as err:
        riemax.labels_by_regex(REGEX_PARAMS, [(r"kernel$", M)])
    message = str(err.value)
    for path in ("block/bn/bias", "block/bn/scale", "head/bias"):
        assert path in message
    assert "conv1/kernel" not in message


@pytest.mark.parametrize("bad", ["sphere", 1, None])
def test_regex_rejects_unknown_label(bad):
    with pytest.raises(ValueError, match="label"):
        riemax.labels_by_regex(REGEX_PARAMS, [(r".*", bad)])


def test_regex_as_partition_callable():
    label_fn = functools.partial(
        riemax.labels_by_regex, rules=[(r"conv\d/kernel$", M), (r".*", E)]
    )
    tx = optax.partition(routing_tx(), label_fn)
    state = tx.init(REGEX_PARAMS)
    grads = jax.tree.map(jnp.ones_like, REGEX_PARAMS)
    updates, _ = tx.update(grads, state, REGEX_PARAMS)
    assert float(jnp.abs(updates["block"]["conv1"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(updates["head"]["kernel"]).min()) > 0.0


# ---------------------------------------------------------------------------
# check_labels
# ---------------------------------------------------------------------------


def test_check_labels_names_missing_extra_and_bad_paths():
    params = {"a": {"kernel": jnp.zeros((2, 2))}, "b": jnp.zeros(2)}
    with pytest.raises(ValueError) as err:
        check_labels(params, {"a": {"kernel": M}, "c": E})
    assert "no label for: b" in str(err.value)
    assert "unknown paths: c" in str(err.value)
    with pytest.raises(ValueError, match=r"a/kernel='sphere'"):
        check_labels(params, {"a": {"kernel": "sphere"}, "b": E})
    with pytest.raises(ValueError, match="not 'manifold'"):
        check_labels(params, "rest")


def test_check_labels_resolves_callables_strings_and_nnx_state():
    model = lm.ConvBN(nnx.Rngs(0))
    wrapped = nnx.state(model, nnx.Param)  # Param-wrapped leaves (nnx init)
    pure = nnx.as_pure(wrapped)  # plain arrays (nnx update)
    plain_dict = nnx.to_pure_dict(pure)
    labels = riemax.labels_by_rule(plain_dict)
    for params in (wrapped, pure, plain_dict):
        resolved = check_labels(params, labels)
        assert jax.tree.structure(resolved) == jax.tree.structure(
            jax.tree.map(lambda _: 0, params)
        )
        assert flat(resolved) == flat(labels)
        assert flat(check_labels(params, riemax.labels_by_rule)) == flat(labels)
    assert set(flat(check_labels(pure, E)).values()) == {E}


# ---------------------------------------------------------------------------
# 3 & 4. Structural and numerical detection on hand-derived cases
# ---------------------------------------------------------------------------


@functools.cache
def nnx_results(name):
    """(template, structural labels, details, numerical labels, details)."""
    case = lm.NNX_CASES[name]
    model = case.model(nnx.Rngs(0))
    x = jnp.zeros(case.input_shape)
    structural, s_why = riemax.labels_from_model(model, x, return_details=True)
    loss_fn, params = lm.nnx_loss(model)
    out_shape = nnx.eval_shape(lambda m: m(x), model).shape
    batch = lm.batch_for(case.input_shape, out_shape)
    numerical, n_why = riemax.labels_by_invariance(
        loss_fn, params, batch, return_details=True
    )
    return params, structural, s_why, numerical, n_why


@functools.cache
def linen_results(name):
    module, _ = lm.LINEN_CASES[name]
    x = jax.random.normal(jax.random.key(1), lm.IMAGE)
    variables = module.init(jax.random.key(0), x, train=True)
    structural, s_why = riemax.labels_from_model(
        module, x, params=variables, return_details=True, train=True
    )
    loss_fn, params = lm.linen_loss(module, variables)
    out_shape = jax.eval_shape(lambda v: module.apply(v, x, train=False), variables)
    batch = lm.batch_for(lm.IMAGE, out_shape.shape)
    numerical, n_why = riemax.labels_by_invariance(
        loss_fn, params, batch, return_details=True
    )
    return params, structural, s_why, numerical, n_why


@pytest.mark.parametrize("name", sorted(lm.NNX_CASES))
def test_structural_nnx(name):
    params, structural, why, _, _ = nnx_results(name)
    expected = expected_labels(params, lm.NNX_CASES[name].expected, 0)
    assert flat(structural) == expected, {p: why[p] for p in expected}


@pytest.mark.parametrize("name", sorted(lm.NNX_CASES))
def test_numerical_nnx(name):
    params, _, _, numerical, why = nnx_results(name)
    expected = expected_labels(params, lm.NNX_CASES[name].expected, 1)
    assert flat(numerical) == expected, {p: why[p]["reason"] for p in expected}


@pytest.mark.parametrize("name", sorted(lm.LINEN_CASES))
def test_structural_linen(name):
    params, structural, why, _, _ = linen_results(name)
    expected = expected_labels(params, lm.LINEN_CASES[name][1], 0)
    assert flat(structural) == expected, why


@pytest.mark.parametrize("name", sorted(lm.LINEN_CASES))
def test_numerical_linen(name):
    params, _, _, numerical, why = linen_results(name)
    expected = expected_labels(params, lm.LINEN_CASES[name][1], 1)
    assert flat(numerical) == expected, {p: why[p]["reason"] for p in expected}


@pytest.mark.parametrize(
    "results, name",
    [(nnx_results, n) for n in sorted(lm.NNX_CASES)]
    + [(linen_results, n) for n in sorted(lm.LINEN_CASES)],
)
def test_structural_never_labels_a_non_invariant_kernel(results, name):
    _, structural, s_why, numerical, n_why = results(name)
    numerical = flat(numerical)
    for path, label in flat(structural).items():
        if label == M:
            assert numerical[path] == M, (path, s_why[path], n_why[path])


def test_structural_reasons():
    _, _, why, _, _ = nnx_results("preact_wrn")
    assert why["block0/conv1/kernel"] == "feeds BatchNorm block0/bn2"
    assert "BatchNorm block0/bn1" in why["stem/kernel"]
    assert "add" in why["stem/kernel"]  # also the identity shortcut
    assert "residual sum" in why["block1/projection/kernel"]
    assert why["block0/bn1/scale"] == "not a kernel (ndim < 2)"
    assert nnx_results("conv_reshape_bn")[2]["conv/kernel"] == (
        "feeds BatchNorm bn via reshape"
    )
    assert "relu" in nnx_results("conv_relu_bn")[2]["conv/kernel"]
    assert "LayerNorm ln" in nnx_results("dense_ln")[2]["fc/kernel"]


def test_numerical_details_and_layernorm_reason():
    _, _, _, _, why = nnx_results("dense_ln")
    ln = why["fc/kernel"]
    assert ln["whole_cosine"] <= ln["tolerance"] < ln["max_cosine"]
    assert "whole tensor, not per unit" in ln["reason"]
    _, _, _, _, why = nnx_results("conv_bn")
    assert why["conv/kernel"]["max_cosine"] < 1e-4
    assert why["conv/kernel"]["max_loss_change"] < 1e-4
    assert why["conv/kernel"]["reason"].startswith("invariant:")
    assert why["bn/scale"] == {"reason": "not a kernel (ndim < 2)"}


class SharedConv(nnx.Module):
    """One conv called twice: once into a BN, once into ReLU -> head."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        a = self.bn(self.conv(x))
        b = nnx.relu(self.conv(x))
        return self.head((a + b).mean((1, 2)))


def test_shared_layer_needs_every_call_to_feed_a_batchnorm():
    labels, why = riemax.labels_from_model(
        SharedConv(nnx.Rngs(0)), jnp.zeros(lm.IMAGE), return_details=True
    )
    assert labels["conv"]["kernel"] == E
    assert "relu" in why["conv/kernel"]


def test_eval_mode_batchnorm_is_not_invariant():
    model = lm.ConvBN(nnx.Rngs(0))
    model.eval()
    labels, why = riemax.labels_from_model(
        model, jnp.zeros(lm.IMAGE), return_details=True
    )
    assert labels["conv"]["kernel"] == E
    assert "running averages" in why["conv/kernel"]


def test_structural_is_abstract_and_leaves_the_model_untouched():
    model = lm.Residual(nnx.Rngs(0))
    snapshot = jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model)))
    calls = {cls: cls.__call__ for cls in (nnx.Conv, nnx.Linear, nnx.BatchNorm)}
    sds = jax.ShapeDtypeStruct(lm.IMAGE, jnp.float32)  # no data: nothing can run
    labels = riemax.labels_from_model(model, sds)
    assert labels["conv0"]["kernel"] == M
    after = nnx.as_pure(nnx.state(model))  # params, batch stats, rng counters
    assert jax.tree.structure(after) == jax.tree.structure(snapshot)
    for a, b in zip(jax.tree.leaves(snapshot), jax.tree.leaves(after), strict=False):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert {cls: cls.__call__ for cls in calls} == calls


def test_structural_restores_classes_when_the_forward_fails():
    calls = {cls: cls.__call__ for cls in (nnx.Conv, nnx.Linear, nnx.BatchNorm)}
    with pytest.raises(Exception):  # noqa: B017 (whatever the shape error is)
        riemax.labels_from_model(lm.ConvBN(nnx.Rngs(0)), jnp.zeros((2, 6, 6, 5)))
    assert {cls: cls.__call__ for cls in calls} == calls


def test_structural_labels_drive_nnx_optimizer_and_plain_optax():
    model = lm.Residual(nnx.Rngs(0))
    x = jnp.ones(lm.IMAGE)
    labels = riemax.labels_from_model(model, x)
    as_fn = riemax.labels_from_model(model, x, as_callable=True)
    pure = nnx.as_pure(nnx.state(model, nnx.Param))
    as_dict = riemax.labels_from_model(model, x, params=nnx.to_pure_dict(pure))
    assert flat(labels) == flat(as_dict) == flat(as_fn(pure))
    assert flat(labels)["conv0/kernel"] == M and flat(labels)["conv1/kernel"] == E

    # Plain optax on the pure params (tree labels) and on a dict (callable).
    grads = jax.tree.map(jnp.ones_like, pure)
    for params, lab in ((pure, labels), (nnx.to_pure_dict(pure), as_fn)):
        tx = optax.partition(routing_tx(), lab)
        g = grads if params is pure else nnx.to_pure_dict(grads)
        updates, _ = tx.update(g, tx.init(params), params)
        assert float(jnp.abs(updates["conv0"]["kernel"]).max()) == 0.0
        assert float(jnp.abs(updates["conv1"]["kernel"]).min()) > 0.0

    # Inside nnx.Optimizer, with the tree and with the callable.
    for lab in (labels, as_fn):
        model = lm.Residual(nnx.Rngs(0))
        before = nnx.as_pure(nnx.state(model, nnx.Param))
        optimizer = nnx.Optimizer(
            model, optax.partition(routing_tx(), lab), wrt=nnx.Param
        )
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        optimizer.update(model, grads)
        after = nnx.as_pure(nnx.state(model, nnx.Param))
        for path, label in flat(labels).items():
            same = np.array_equal(flat(before)[path], flat(after)[path])
            assert same == (label == M), path


def test_linen_labels_drive_plain_optax():
    module, _ = lm.LINEN_CASES["residual_dense_bn"]
    x = jnp.ones(lm.IMAGE)
    variables = module.init(jax.random.key(0), x, train=True)
    labels = riemax.labels_from_model(module, x, params=variables, train=True)
    assert jax.tree.structure(labels) == jax.tree.structure(
        jax.tree.map(lambda _: 0, variables["params"])
    )
    params = variables["params"]
    tx = optax.partition(routing_tx(), labels)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert float(jnp.abs(updates["conv0"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(updates["head"]["kernel"]).min()) > 0.0
    with pytest.raises(ValueError, match="params=variables"):
        riemax.labels_from_model(module, x)


def test_invariance_low_precision_and_bad_alphas():
    def loss_fn(params, x):
        y = x @ params["w"]
        y = (y - y.mean(0)) / jnp.sqrt(y.var(0) + 1e-5)
        return jnp.mean(jnp.tanh(y @ params["head"]) ** 2) + params["b"].sum()

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w": jax.random.normal(k1, (5, 4)).astype(jnp.bfloat16),
        "head": jax.random.normal(k2, (4, 3)),
        "b": jnp.ones(3),
    }
    x = jax.random.normal(k3, (16, 5))
    labels, why = riemax.labels_by_invariance(loss_fn, params, x, return_details=True)
    assert labels == {"w": M, "head": E, "b": E}
    assert why["w"]["tolerance"] == pytest.approx(1e-3)  # measured in float32
    with pytest.raises(ValueError, match="alphas"):
        riemax.labels_by_invariance(loss_fn, params, x, alphas=(0.5, -1.0))


def test_near_invariant_batchnorm_is_not_reported_as_layernorm():
    """Dense -> BatchNorm with pre-BN variances ~3e-3: BN's epsilon (1e-5) breaks
    the invariance at the ~1e-2 level, per unit and as a whole alike; LayerNorm is
    invariant as a whole and not per unit. The reasons tell the two apart."""

    def bn_loss(params, x):
        y = x @ params["w"]
        y = (y - y.mean(0)) / jnp.sqrt(y.var(0) + 1e-5)
        return jnp.mean((jnp.tanh(y) - 0.3) ** 2)

    def ln_loss(params, x):
        y = x @ params["w"]
        y = (y - y.mean(1, keepdims=True)) / jnp.sqrt(y.var(1, keepdims=True) + 1e-5)
        return jnp.mean((jnp.tanh(y) - 0.3) ** 2)

    k1, k2 = jax.random.split(jax.random.key(3))
    w = jax.random.normal(k1, (6, 5))
    x = jax.random.normal(k2, (64, 6))
    scale = float(jnp.sqrt(3e-3 / (x @ w).var(0).mean()))  # pre-BN variance ~3e-3
    _, near = riemax.labels_by_invariance(
        bn_loss, {"w": w * scale}, x, return_details=True
    )
    near = near["w"]
    assert near["max_cosine"] > near["tolerance"]  # invariance visibly broken
    assert "nearly invariant per unit" in near["reason"], near
    assert "whole tensor" not in near["reason"]
    labels, ok = riemax.labels_by_invariance(
        bn_loss, {"w": w * scale}, x, rtol=30 * near["tolerance"], return_details=True
    )
    assert labels == {"w": M}  # a larger rtol accepts it, as the reason says
    _, ln = riemax.labels_by_invariance(ln_loss, {"w": w}, x, return_details=True)
    assert "whole tensor, not per unit" in ln["w"]["reason"]


# ---------------------------------------------------------------------------
# 5. Report
# ---------------------------------------------------------------------------


def test_report_rows_reasons_and_counts():
    params = lm.wrn_param_shapes(28, 10)
    labels, why = riemax.labels_by_rule(params, return_details=True)
    report = riemax.label_report(params, labels, details=why)
    lines = report.splitlines()
    assert lines[0].split() == ["path", "shape", "label", "why"]
    row = next(line for line in lines if line.startswith("group2/block0/conv1/kernel"))
    assert "(3, 3, 16, 160)" in row and E in row and "fan_in 144 <= fan_out 160" in row
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(params))
    footer = {line.split(":")[0]: line for line in lines[-2:]}
    assert "24 leaves (24 kernels)" in footer[M]
    m_size = int(footer[M].split(", ")[1].split()[0].replace(",", ""))
    e_size = int(footer[E].split(", ")[1].split()[0].replace(",", ""))
    assert m_size + e_size == n_params
    assert len(lines) == 1 + len(jax.tree.leaves(params)) + 2


def test_report_says_layernorm_is_invariant_only_as_a_whole():
    params, structural, s_why, numerical, n_why = nnx_results("dense_ln")
    report = riemax.label_report(params, numerical, details=n_why)
    row = next(line for line in report.splitlines() if line.startswith("fc/kernel"))
    assert E in row and "whole tensor, not per unit" in row and "LayerNorm" in row
    report = riemax.label_report(params, structural, details=s_why)
    assert "feeds LayerNorm ln, not BatchNorm" in report


def test_report_validates_labels():
    params = {"a": jnp.zeros((2, 2))}
    with pytest.raises(ValueError, match="no label for: a"):
        riemax.label_report(params, {})


# ---------------------------------------------------------------------------
# End to end: structural labels -> riemax.hybrid(sgdg, sgd) in nnx.Optimizer
# ---------------------------------------------------------------------------


def unit_norms(kernel):
    kernel = np.asarray(kernel, np.float64)
    return np.sqrt(np.sum(kernel**2, axis=tuple(range(kernel.ndim - 1))))


def test_end_to_end_hybrid_sgdg_keeps_exactly_the_labelled_kernels_on_the_sphere():
    model = lm.Residual(nnx.Rngs(0))
    batch = lm.batch_for(lm.IMAGE, (lm.IMAGE[0], 2))
    labels = riemax.labels_from_model(model, batch["x"])
    kernels = {p: lab for p, lab in flat(labels).items() if p.endswith("kernel")}
    assert kernels == {"conv0/kernel": M, "conv1/kernel": E, "head/kernel": E}
    tx = riemax.hybrid(
        riemax.sgdg(0.1), optax.sgd(0.1, momentum=0.9, nesterov=True), labels
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(model):
            return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    params = flat(nnx.as_pure(nnx.state(model, nnx.Param)))
    for path in kernels:  # nobody starts on the sphere
        assert not np.allclose(unit_norms(params[path]), 1.0, atol=1e-5), path
    for _ in range(3):
        loss = step(model, optimizer, batch)
    assert np.isfinite(float(loss))
    params = flat(nnx.as_pure(nnx.state(model, nnx.Param)))
    for path, label in kernels.items():
        on_sphere = np.allclose(unit_norms(params[path]), 1.0, rtol=0, atol=1e-5)
        assert on_sphere == (label == M), (path, unit_norms(params[path]))
