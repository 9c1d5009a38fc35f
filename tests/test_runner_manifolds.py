"""The runner's Stiefel and sphere optimizers, which keep the weights themselves
on a manifold (Cayley SGD/Adam, manifold Muon, hyperspherical descent): the
start projection of the optimizer table (applied once at init, never again on
resume), a few steps on digits, their configs (``cayley.py``, ``muon.py``), the
step-by-step linear schedule, the state reset at a decay, the MLP, and the
divergence monitor on data whose epoch is one step."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TINY_RUN

import riemax
from experiments import config as config_lib
from experiments import configs, digits, models, monitor, optimizers, train
from riemax import diagnostics

TINY = TINY_RUN | {"checkpoint_every": 2}
#: The optimizers with a start projection, and its method.
STARTS = {
    "cayley-sgd": "qr",
    "cayley-adam": "qr",
    "manifold-muon": "msign",
    "hyperspherical": "normalize",
}
#: Each one's run (the resume test reuses its compiled trainer). Cayley Adam
#: decays after update 2 (floor(0.025 * 1437 / 16) = 2): it is rebuilt before
#: update 3.
RUNS = {name: TINY | {"optimizer": name} for name in STARTS}
RUNS["cayley-adam"] |= {"schedule": "piecewise", "decay_epochs": [0.025]}


def by_path(tree):
    """``{"conv/0/kernel": leaf}`` (a checkpoint spells list indices as strings)."""
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def manifold_kernels(params, labels):
    labels = by_path(labels)
    return {
        path: np.asarray(w, np.float64)
        for path, w in by_path(params).items()
        if labels[path] == riemax.MANIFOLD
    }


def nnx_params(model):
    """The model's own initial parameters, as the trainer's init splits them."""
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def distance_to_manifold(name, w):
    """0 on the optimizer's manifold: orthonormal units (tall kernels) for the
    Stiefel ones, norm 1 as a whole for hyperspherical descent."""
    if STARTS[name] == "normalize":
        return abs(np.linalg.norm(w) - 1.0)
    return float(diagnostics.orthogonality_error(jnp.asarray(w, jnp.float32)))


def test_the_table_names_each_start_rule_and_rates():
    for name, method in STARTS.items():
        entry = optimizers.lookup(name)
        assert entry.start == method and entry.lr_manifold is not None
        assert entry.default_labels == "paper" and entry.fixed_norm
    assert optimizers.lookup("cayley-sgd").fan == "tall"
    assert optimizers.resolve_hyper("cayley-sgd", {}) == {
        "lr": 0.1,
        "momentum": 0.9,
        "lr_manifold": 0.8,
        "nesterov": True,
    }
    assert optimizers.resolve_hyper("manifold-muon", {})["lr_manifold"] == 0.1
    cfg = config_lib.resolve({"dataset": "digits", "optimizer": "hyperspherical"})
    assert (cfg["labels"], cfg["weight_decay"], cfg["manifold_decay"]) == (
        "paper",
        0.0,
        0.0,
    )
    assert config_lib.resolve({"dataset": "digits"})["labels"] == "structural"


@pytest.mark.parametrize("name", sorted(STARTS))
def test_start_projection_then_finite_steps_on_digits(name, tmp_path):
    """Init puts every manifold kernel on the manifold (it was not there); four
    steps on digits stay finite and on it; both rates are logged."""
    cfg, _, trainer = train.prepare_run(RUNS[name])
    state = trainer.init_host_state()
    labels = trainer.labels
    started = manifold_kernels(state["params"], labels)
    raw = manifold_kernels(
        nnx_params(trainer.build(jax.random.key(cfg["seed"]))), labels
    )
    assert started and started.keys() == raw.keys()
    for path, w in started.items():
        assert distance_to_manifold(name, w) < 1e-5, path
        assert distance_to_manifold(name, raw[path]) > 1e-2, path

    result = digits.train_and_evaluate(RUNS[name], str(tmp_path))
    assert result["step"] == 4 and np.isfinite(result["test_loss"])
    last = [r for r in train.read_metrics(str(tmp_path)) if r["split"] == "train"][-1]
    for key in ("loss", "lr", "lr_manifold", "angle_manifold_mean"):
        assert np.isfinite(last[key]), key
    assert last["lr_manifold"] > last["lr"]
    final = manifold_kernels(train.load_checkpoint(str(tmp_path))["params"], labels)
    for path, w in final.items():
        # The Cayley loop's 5 fixed-point iterations leave ~1e-4 after 4 steps
        # at the manifold rate 0.8 (until the QR every 101 steps).
        assert distance_to_manifold(name, w) < 1e-3, path
        assert np.max(np.abs(w - started[path])) > 0, path


@pytest.mark.parametrize("name", ["cayley-adam", "manifold-muon"])
def test_a_resumed_run_is_not_projected_again(name, tmp_path):
    """Halted after 2 steps and resumed, the run ends with the parameters of an
    uninterrupted one, bit for bit (Cayley Adam rebuilt after the resume); the
    start projection of the halted kernels is not the kernels themselves, so a
    second projection at resume would have shown."""
    cfg = RUNS[name]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    digits.train_and_evaluate(cfg, str(straight))
    first = digits.train_and_evaluate(cfg | {"halt_after_steps": 2}, str(resumed))
    assert first["halted"] and first["step"] == 2
    halted = train.load_checkpoint(str(resumed))["params"]
    second = digits.train_and_evaluate(cfg, str(resumed))
    assert second["resumed_from"] == 2 and second["step"] == 4
    chex.assert_trees_all_close(
        train.load_checkpoint(str(straight))["params"],
        train.load_checkpoint(str(resumed))["params"],
        rtol=0,
        atol=0,
    )
    _, _, trainer = train.prepare_run(cfg)
    if name == "cayley-adam":
        assert optimizers.decay_counts(trainer.cfg) == [3]
        opt_state = trainer.init_host_state()["opt_state"]
        assert type(opt_state).__name__ == "RebuiltState"
    labels = by_path(trainer.labels)
    flat = by_path(halted)
    kernels = {k: flat[k] for k, lab in labels.items() if lab == riemax.MANIFOLD}
    again = riemax.to_manifold(kernels, STARTS[name])
    assert max(float(np.max(np.abs(again[k] - w))) for k, w in kernels.items()) > 0


def test_cayley_moves_wide_kernels_to_the_euclidean_half():
    """Orthonormal units need a tall kernel: under any labels mode a wide manifold
    kernel (digits' first conv, 9 inputs for 16 units) becomes Euclidean."""
    cfg = TINY | {"widths": [16, 8], "optimizer": "cayley-sgd", "labels": "structural"}
    _, _, trainer = train.prepare_run(cfg)
    assert trainer.labels["conv"][0]["kernel"] == riemax.EUCLIDEAN
    assert trainer.labels["conv"][1]["kernel"] == riemax.MANIFOLD
    assert "fan-in 9 < fan-out 16" in trainer.why["conv/0/kernel"]


# --------------------------------------------------------------------------------------
# Schedules and the state reset at a decay
# --------------------------------------------------------------------------------------


def test_linear_steps_schedule_decays_to_zero_over_any_length():
    for total in (7, 244):
        f = optimizers.make_schedule(0.1, "linear_steps", total_steps=total)
        got = [float(f(t)) for t in (0, 1, total - 1, total)]
        want = [0.1, 0.1 * (1 - 1 / total), 0.1 / total, 0.0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_decay_counts_are_the_first_decayed_updates():
    cfg = {"schedule": "piecewise", "decay_steps": [5, 9], "decay_epochs": []}
    assert optimizers.decay_counts(cfg) == [6, 10]
    f = optimizers.make_schedule(1.0, "piecewise", decay_steps=(5, 9))
    assert float(f(5)) == 1.0 and float(f(6)) < 1.0
    cfg = {"schedule": "multistep", "decay_epochs": [2], "steps_per_epoch": 3}
    assert optimizers.decay_counts(cfg) == [6]
    assert optimizers.decay_counts({"schedule": "cosine"}) == []


def test_rebuilt_optimizer_restarts_its_state_on_the_run_schedule():
    """Nesterov SGD rebuilt before update 2: its momentum starts afresh there,
    while the learning rate goes on with the schedule of the run's count."""
    hyper = {"lr": 1.0, "momentum": 0.9, "nesterov": False}

    def schedule(base):  # halved from update 2 on (strict > 1)
        return optimizers.make_schedule(
            base, "piecewise", decay_steps=(1,), decay_factor=0.5
        )

    tx = optimizers.build(
        "sgd", hyper, {"w": riemax.EUCLIDEAN}, schedule=schedule, rebuild_at=[2]
    )
    assert isinstance(tx, optax.GradientTransformation)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    steps = []
    for _ in range(3):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        steps.append(float(updates["w"]))
    # 1, then 1 + 0.9 at the same rate, then a fresh trace (1) at the decayed 0.5.
    np.testing.assert_allclose(steps, [-1.0, -1.9, -0.5], rtol=1e-6)


# --------------------------------------------------------------------------------------
# Configs and the MLP
# --------------------------------------------------------------------------------------


def test_the_recipe_files_name_their_sources_and_resolve():
    for family, sources in (
        ("cayley", ("Li, Fuxin & Todorovic, ICLR 2020", "the authors' README")),
        ("muon", ("Bernstein 2025", "src/main.py")),
    ):
        module = configs._family(family)
        text = " ".join(module.__doc__.split())
        assert all(source in text for source in sources), family
        for arg in module.cells():
            config = module.get_config(arg)
            assert set(config) == set(config_lib.KEYS)
            cfg = config_lib.resolve(config)
            assert cfg["labels"] == "paper"
    cfg = config_lib.resolve(configs.load("cayley:cifar10-wrn-28-10-cayley-sgd")[0])
    assert (cfg["lr"], cfg["lr_manifold"], cfg["decay_epochs"]) == (
        0.1,
        0.8,
        [60, 120, 160],
    )
    cfg = config_lib.resolve(configs.load("muon:cifar10-mlp-manifold-muon")[0])
    assert (cfg["model"], cfg["batch_size"], cfg["epochs"], cfg["seed"]) == (
        "mlp",
        1024,
        5,
        42,
    )
    assert (cfg["schedule"], cfg["lr_manifold"]) == ("linear_steps", 0.1)


def test_the_mlp_recipe_on_digits_sized_data():
    """At batch 1024 an epoch of digits is one step: the run has 7 steps, the
    learning rate ends at 0 on the last one, and the monitor gives no verdict
    before 10 steps."""
    cfg = config_lib.resolve(
        configs.load("muon:cifar10-mlp-adamw")[0] | {"dataset": "digits"}
    )
    cfg = config_lib.derive(cfg, n_train=1437, image_shape=(8, 8, 1))
    assert (cfg["steps_per_epoch"], cfg["steps"], cfg["warmup_steps"]) == (1, 7, 0)
    f = optimizers.schedule_of(cfg, 0.1)
    assert float(f(0)) == pytest.approx(0.1) and float(f(7)) == 0.0
    assert float(f(6)) == pytest.approx(0.1 / 7)
    watch = monitor.LossWatch(num_classes=10, steps_per_epoch=1)
    assert [watch.check(s, 2.4) for s in (1, 2, 5, 9)] == [[], [], [], []]
    (alert,) = watch.check(10, 2.4)
    assert alert.kind == "chance" and "step 10 (epoch 10)" in alert.message
    again = monitor.LossWatch(num_classes=10, steps_per_epoch=1)
    again.restore([{"step": 5, "split": "train", "loss": 2.4}])
    assert again.check(10, 2.4)  # not judged yet at step 5: judged at 10


def test_mlp_flattens_any_input_and_has_no_biases_by_default():
    for shape, n_in in (((32, 32, 3), 3072), ((28, 28, 1), 784)):
        shapes = models.param_shapes("mlp", 10, shape)
        assert jax.tree.map(lambda s: s.shape, shapes) == {
            "fc1": {"kernel": (n_in, 128)},
            "fc2": {"kernel": (128, 64)},
            "fc3": {"kernel": (64, 10)},
        }
    with_bias = models.param_shapes("mlp-bias", 4, (8, 8, 1))
    assert with_bias["fc3"]["bias"].shape == (4,)
    from flax import nnx

    net = models.build_model("mlp", 10, rngs=nnx.Rngs(0), input_shape=(28, 28, 1))
    assert net(jnp.ones((2, 28, 28, 1))).shape == (2, 10)


def test_help_names_the_new_rates_and_starts():
    lines = optimizers.learning_rate_help()
    assert (
        "cayley-sgd, cayley-adam: --lr (--learnRate): the Euclidean half only "
        "(Nesterov SGD on biases, BatchNorm, classifier and kernels off the "
        "manifold); --lr_manifold (--learnRateG): the manifold kernels, put on "
        "their manifold once at init (orthonormal units by QR)" in lines
    )
    (muon,) = [x for x in lines if x.startswith("manifold-muon, hyperspherical:")]
    assert "AdamW" in muon and "manifold-muon: the matrix sign" in muon
    assert json.dumps(optimizers.names()).count("cayley") == 2
