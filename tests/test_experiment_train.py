"""End-to-end runs of the experiments' training loop (experiments/train.py) on tiny
models: every dataset kind, resume (in-process and a killed subprocess), the
``--task=test/plot/compare`` tasks, refused and failing runs.

XLA's most expensive optimizations are disabled for this module (compile time
dominates these runs); subprocesses get the same through the environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import TINY_RUN, fewer_by_default

from experiments import cifar, compare, data, digits, train
from experiments.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = TINY_RUN
TINY_FLAGS = [
    "--widths=4,8",
    "--convs_per_stage=1",
    "--batch_size=16",
    "--log_every=2",
]
TIMING = {"step_time_s", "images_per_s"}


def subprocess_env(**extra):
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    return env | extra


def metrics(workdir, drop_timing=True):
    records = train.read_metrics(str(workdir))
    if drop_timing:
        records = [{k: v for k, v in r.items() if k not in TIMING} for r in records]
    return records


def assert_same_params(a, b, **tol):
    chex.assert_trees_all_close(
        train.load_checkpoint(str(a))["params"],
        train.load_checkpoint(str(b))["params"],
        **(tol or {"rtol": 0, "atol": 0}),
    )


# --------------------------------------------------------------------------------------
# Every dataset kind, every optimizer
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer",
    fewer_by_default(
        ["sgd", "sgdg", "adamg", "adams", "adamsrt"], ["sgd", "sgdg", "adamsrt"]
    ),
)
def test_digits_runs_with_each_optimizer(optimizer, tmp_path):
    result = digits.train_and_evaluate(TINY | {"optimizer": optimizer}, str(tmp_path))
    assert result["step"] == 4 and not result["halted"]
    assert np.isfinite(result["test_loss"]) and 0 <= result["test_error"] <= 1
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["optimizer"] == optimizer and config["lr"] > 0
    assert "manifold" in (tmp_path / "labels.txt").read_text()
    records = metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in records] == [
        (2, "train"),
        (4, "train"),
        (4, "test"),
    ]
    last = records[1]
    for key in ("loss", "error", "lr", "norm_manifold_mean", "angle_manifold_mean"):
        assert np.isfinite(last[key]), key
    if optimizer in ("sgdg", "adamg"):  # unit-norm units, hybrids log both rates
        assert last["norm_manifold_min"] == pytest.approx(1.0, abs=1e-5)
        assert last["norm_manifold_max"] == pytest.approx(1.0, abs=1e-5)
        assert last["lr_manifold"] > last["lr"]


@pytest.mark.parametrize("optimizer", ["sgdmrt", "adam", "adamw"])
def test_remaining_optimizers_take_finite_steps(optimizer, tmp_path):
    cfg = TINY | {"optimizer": optimizer, "steps": 2, "eval_every": 2}
    result = digits.train_and_evaluate(cfg, str(tmp_path))
    assert np.isfinite(result["train_loss"]) and np.isfinite(result["test_loss"])


@pytest.mark.parametrize(
    "optimizer",
    fewer_by_default(
        ["adamp", "sgdp", "nero", "rotational-adamw", "rotational-sgdm"],
        ["adamp", "nero", "rotational-sgdm"],
    ),
)
def test_scale_invariance_optimizers_of_the_field(optimizer, tmp_path):
    """AdamP/SGDP, Nero and the rotational wrapper by name, with their papers'
    settings: Nero keeps every kernel unit centred at norm 1, the wrapper keeps
    the norms of the units it rotates (the structural manifold kernels here)."""
    result = digits.train_and_evaluate(TINY | {"optimizer": optimizer}, str(tmp_path))
    assert result["step"] == 4 and np.isfinite(result["test_loss"])
    config = json.loads((tmp_path / "config.json").read_text())
    defaults = {
        "adamp": (1e-3, 0.01),
        "sgdp": (0.1, 1e-5),
        "nero": (0.01, 0.0),
        "rotational-adamw": (0.05, 0.01),
        "rotational-sgdm": (0.5, 1e-4),
    }
    assert (config["lr"], config["weight_decay"]) == defaults[optimizer]
    first, last = metrics(tmp_path)[:2]
    for key in ("loss", "norm_manifold_mean", "angle_manifold_mean"):
        assert np.isfinite(last[key]), key
    if optimizer == "nero":
        assert last["norm_manifold_min"] == pytest.approx(1.0, abs=1e-5)
        assert last["norm_manifold_max"] == pytest.approx(1.0, abs=1e-5)
    if optimizer.startswith("rotational"):
        assert config["manifold_decay"] == 0.0
        for key in ("norm_manifold_min", "norm_manifold_max", "norm_manifold_mean"):
            assert last[key] == pytest.approx(first[key], rel=1e-5), key
        assert last["angle_manifold_mean"] > 0


@pytest.mark.parametrize("name", sorted(data.TFDS_DATASETS))
def test_tfds_datasets_end_to_end_on_mock_data(name, tmp_path):
    """tfds.data_source on mocked ArrayRecord (no TensorFlow), uint8 images,
    on-device augmentation and normalization, the dataset's class count."""
    cfg = TINY | {"dataset": name, "model": "vgg-small", "batch_size": 8}
    with tfds.testing.mock_data(num_examples=24):
        result = train.train_and_evaluate(cfg, str(tmp_path))
    assert result["step"] == 4 and np.isfinite(result["test_loss"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_classes"] == data.TFDS_DATASETS[name][0]
    assert config["augment"] is (name != "svhn_cropped")
    assert config["num_train"] == (48 if name == "svhn_cropped" else 24)  # +extra


def _write_npz(path, *, channels=False, dtype=np.uint8, n=40, classes=3):
    rng = np.random.default_rng(0)
    shape = (12, 12, 2) if channels else (12, 12)
    x = rng.integers(0, 255, (n, *shape)).astype(dtype)
    y = rng.integers(0, classes, n)
    np.savez(path, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])


def test_npz_end_to_end(tmp_path):
    path = tmp_path / "mine.npz"
    _write_npz(path, classes=3)
    cfg = TINY | {"dataset": f"npz:{path}", "batch_size": 8, "epochs": None}
    result = train.train_and_evaluate(cfg, str(tmp_path / "run"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["num_classes"] == 3 and config["input_shape"] == [12, 12, 1]
    assert np.isfinite(result["test_loss"])


def test_malformed_npz_names_the_key_or_shape(tmp_path):
    x = np.zeros((10, 8, 8), np.float32)
    cases = {
        "missing": ({"x_train": x, "y_train": np.zeros(10), "x_test": x}, "y_test"),
        "labels": (
            {"x_train": x, "y_train": np.zeros(9), "x_test": x, "y_test": np.zeros(10)},
            "y_train has shape (9,); expected (10,)",
        ),
        "rank": (
            {
                "x_train": np.zeros(10),
                "y_train": np.zeros(10),
                "x_test": x,
                "y_test": np.zeros(10),
            },
            "x_train has shape (10,)",
        ),
        "float_labels": (
            {
                "x_train": x,
                "y_train": np.full(10, 0.5),
                "x_test": x,
                "y_test": np.zeros(10),
            },
            "integer labels",
        ),
        "image_sizes": (
            {
                "x_train": x,
                "y_train": np.zeros(10),
                "x_test": np.zeros((10, 9, 9)),
                "y_test": np.zeros(10),
            },
            "x_test images are (9, 9, 1)",
        ),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(
            data.DataError, match=message.replace("(", r"\(").replace(")", r"\)")
        ):
            data.load_npz(str(path))
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(data.DataError, match="not an .npz file"):
        data.load_npz(str(tmp_path / "text.npz"))


def test_missing_tfds_data_gives_the_prepare_command(tmp_path, capsys):
    empty = tmp_path / "tfds"
    with pytest.raises(SystemExit) as exit_:
        cifar.main(
            [
                "--workdir",
                str(tmp_path / "w"),
                "--dataset=cifar100",
                f"--data_dir={empty}",
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"not prepared in {empty}" in err
    assert (
        f"python -m experiments.cifar --task=prepare --dataset=cifar100 "
        f"--data_dir={empty}" in err
    )
    assert not (tmp_path / "w").exists()


def test_batches_and_augmentation_are_functions_of_seed_and_step():
    order = data.BatchOrder(100, 16, seed=3)
    a = order(17)
    np.testing.assert_array_equal(a, data.BatchOrder(100, 16, seed=3)(17))
    assert not np.array_equal(a, data.BatchOrder(100, 16, seed=4)(17))
    epoch = np.concatenate([order(s) for s in range(6)])
    assert len(np.unique(epoch)) == 96  # no repeats within an epoch

    x = jax.numpy.asarray(np.random.default_rng(0).random((8, 6, 6, 2)), "float32")
    key = jax.random.key(5)
    kw = {"pad": 2, "pad_mode": "reflect", "crop": 6, "flip": True}
    whole = data.augment(x, key, **kw)
    # the second half of the batch on its own (as one of 2 devices would see it)
    half = data.augment(x[4:], key, offset=4, global_batch=8, **kw)
    np.testing.assert_array_equal(whole[4:], half)
    zero = data.augment(x, key, **(kw | {"pad_mode": "zero"}))
    assert whole.shape == zero.shape == x.shape and not np.allclose(whole, x)


# --------------------------------------------------------------------------------------
# Runs that survive
# --------------------------------------------------------------------------------------


def test_resume_after_halt_matches_uninterrupted_run(tmp_path):
    cfg = TINY | {"optimizer": "sgdg", "steps": 8, "eval_every": 4}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    digits.train_and_evaluate(cfg, str(straight))
    first = digits.train_and_evaluate(cfg | {"halt_after_steps": 6}, str(resumed))
    assert first["halted"] and first["step"] == 6
    second = digits.train_and_evaluate(cfg, str(resumed))
    assert second["resumed_from"] == 4 and second["step"] == 8
    assert metrics(resumed) == metrics(straight)  # rewritten, not duplicated
    assert_same_params(straight, resumed)
    again = digits.train_and_evaluate(cfg, str(resumed))
    assert again["resumed_from"] == 8 and again["test_error"] == second["test_error"]
    assert metrics(resumed) == metrics(straight)


def test_run_that_died_before_its_first_checkpoint_leaves_no_duplicates(tmp_path):
    cfg = TINY | {"steps": 8, "eval_every": 4, "checkpoint_every": 4}
    digits.train_and_evaluate(cfg | {"halt_after_steps": 3}, str(tmp_path))
    assert [r["step"] for r in metrics(tmp_path)] == [2]
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(
        tmp_path / "checkpoints"
    )
    digits.train_and_evaluate(cfg, str(tmp_path))
    steps = [(r["step"], r["split"]) for r in metrics(tmp_path)]
    assert len(steps) == len(set(steps)) and steps[0] == (2, "train")


def test_killed_subprocess_resumes_to_the_same_metrics_and_params(tmp_path):
    """A real ``python -m experiments.digits`` killed (SIGKILL) mid-run, then the
    same command resumed, ends where an uninterrupted run ends."""
    steps, every = 300, 10
    flags = TINY_FLAGS + [
        f"--steps={steps}",
        f"--checkpoint_every={every}",
        "--eval_every=100",
        "--progress=false",
    ]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "experiments.digits", "--workdir", str(killed), *flags]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True
    )
    first_line = proc.stderr.readline()
    ckpts = killed / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline:
        done = (
            [int(s) for s in os.listdir(ckpts) if s.isdigit()] if ckpts.exists() else []
        )
        if done and max(done) >= 3 * every:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "result.json").exists()  # it was killed mid-run
    # the CLI says what it does at once, before jax is even imported
    assert "resolving the config" in first_line
    assert float(first_line.split("s]")[0].strip("[ ")) < 2.0

    cfg = TINY | {"steps": steps, "checkpoint_every": every, "eval_every": 100}
    resumed = digits.train_and_evaluate(cfg, str(killed))
    assert resumed["resumed_from"] >= 3 * every and resumed["step"] == steps
    straight = tmp_path / "straight"
    expected = digits.train_and_evaluate(cfg, str(straight))
    assert resumed["test_error"] == expected["test_error"]
    assert metrics(killed) == metrics(straight)
    assert_same_params(killed, straight)


def test_task_test_reproduces_the_final_test_error(tmp_path, capsys):
    cfg = TINY | {"steps": 8, "bn_recalibrate": 2}
    result = digits.train_and_evaluate(cfg, str(tmp_path))
    for load in (tmp_path, tmp_path / "checkpoints" / "8"):
        out = cifar.main(["--task=test", f"--load={load}"])
        assert out["step"] == 8
        assert out["test_error"] == result["test_error"]
        assert out["test_loss"] == pytest.approx(result["test_loss"], rel=1e-6)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["test_error"] == result["test_error"]
    with pytest.raises(SystemExit):
        cifar.main(["--task=test", f"--load={tmp_path / 'checkpoints' / '5'}"])


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    cfg = TINY | {"steps": 8}
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    digits.train_and_evaluate(cfg, str(straight))
    digits.train_and_evaluate(cfg, str(broken))
    latest = broken / "checkpoints" / "8"
    files = [os.path.join(d, f) for d, _, fs in os.walk(latest) for f in fs]
    assert files
    for f in files:
        with open(f, "wb") as fh:
            fh.write(b"\x00garbage")
    capsys.readouterr()
    result = digits.train_and_evaluate(cfg, str(broken))
    err = capsys.readouterr().err
    assert "checkpoint 8 is unreadable" in err and "falling back to checkpoint 4" in err
    assert result["resumed_from"] == 4 and result["step"] == 8
    assert os.listdir(broken / "corrupt_checkpoints")  # kept for inspection
    assert (broken / "checkpoints" / "4").exists()
    assert metrics(broken) == metrics(straight)
    assert_same_params(straight, broken)


# --------------------------------------------------------------------------------------
# Runs that refuse to go wrong
# --------------------------------------------------------------------------------------


def test_changed_config_is_refused_naming_the_keys(tmp_path):
    digits.train_and_evaluate(TINY, str(tmp_path))
    saved = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"lr_manifold \(0.2 -> 0.3\), optimizer"):
        digits.train_and_evaluate(
            TINY | {"optimizer": "adamg", "lr_manifold": 0.3}, str(tmp_path)
        )
    assert (tmp_path / "config.json").read_text() == saved
    fresh = digits.train_and_evaluate(
        TINY | {"optimizer": "adamg"}, str(tmp_path), overwrite=True
    )
    assert fresh["resumed_from"] is None and fresh["step"] == 4
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"] == "adamg"


def test_non_finite_loss_stops_with_exit_1(tmp_path, capsys):
    argv = [
        "--workdir",
        str(tmp_path),
        *TINY_FLAGS,
        "--steps=6",
        "--optimizer=sgd",
        "--lr=1e30",
        "--progress=false",
    ]
    with pytest.raises(SystemExit) as exit_:
        digits.main(argv)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the training loss became") and "at step" in err


def test_digits_cli_is_the_shared_runner(tmp_path, capsys):
    out = digits.main(
        [
            "--workdir",
            str(tmp_path),
            "--optimizer",
            "adamg",
            "--steps",
            "4",
            "--batch-size",
            "16",
            "--widths=4,8",
            "--convs-per-stage=1",
            "--log-every=2",
            "--progress=false",
        ]
    )
    assert out["step"] == 4
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["dataset"], config["optimizer"], config["lr_manifold"]) == (
        "digits",
        "adamg",
        0.05,
    )
    assert config["lr"] == 0.01  # from the optimizer table
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4


# --------------------------------------------------------------------------------------
# Options: validation split, best checkpoint, recalibration, labels, ENorm
# --------------------------------------------------------------------------------------


def test_select_best_recalibration_and_invariance_labels(tmp_path):
    cfg = TINY | {
        "steps": 8,
        "eval_every": 2,
        "val_size": 100,
        "select_best": True,
        "bn_recalibrate": 2,
        "labels": "invariance",
        "tensorboard": True,
    }
    result = digits.train_and_evaluate(cfg, str(tmp_path))
    assert result["best_step"] in (2, 4, 6, 8)
    assert 0 <= result["best_test_error"] <= 1 and "val_error" in result
    splits = {r["split"] for r in metrics(tmp_path)}
    assert splits == {"train", "test", "val", "test_best"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_train"], config["num_val"]) == (1437 - 100, 100)
    assert "invariant" in (tmp_path / "labels.txt").read_text()
    assert os.listdir(tmp_path / "tensorboard")


def _labels(cfg):
    _, _, trainer = train.prepare_run(cfg)
    return jax.tree_util.tree_flatten_with_path(trainer.labels)[0]


def test_paper_labels_follow_the_optimizer_family():
    cfg = TINY | {"labels": "paper", "widths": [16, 8]}
    conv0 = ("conv", 0, "kernel")

    def label_of(labels, path):
        for p, label in labels:
            if tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p) == path:
                return label

    # RBN's rule: conv and fan-in > fan-out: the 3x3x1 -> 16 stem stays Euclidean
    rbn = _labels(cfg)
    assert label_of(rbn, conv0) == "euclidean"
    assert label_of(rbn, ("conv", 1, "kernel")) == "manifold"
    # SRT's rule: every conv kernel; structural: every kernel that feeds a BN
    assert label_of(_labels(cfg | {"optimizer": "adamsrt"}), conv0) == "manifold"
    assert label_of(_labels(cfg | {"labels": "structural"}), conv0) == "manifold"


def test_enorm_on_a_chain_and_a_clear_error_otherwise(tmp_path):
    cfg = TINY | {
        "model": "enorm-fc",
        "n_layers": 3,
        "optimizer": "sgd",
        "nesterov": False,
        "steps": 2,
        "eval_every": 2,
    }
    plain = digits.train_and_evaluate(cfg, str(tmp_path / "plain"))
    balanced = digits.train_and_evaluate(cfg | {"enorm": 1.0}, str(tmp_path / "enorm"))
    assert np.isfinite(balanced["test_loss"])
    assert balanced["train_loss"] != plain["train_loss"]  # the cycles changed weights
    with pytest.raises(
        ConfigError, match="enorm needs a model whose kernels form a chain"
    ):
        digits.train_and_evaluate(TINY | {"enorm": 1.0}, str(tmp_path / "vgg"))
    assert not (tmp_path / "vgg").exists()


# --------------------------------------------------------------------------------------
# Plot and compare
# --------------------------------------------------------------------------------------


def test_plot_draws_several_runs(tmp_path):
    for name in ("a", "b"):
        digits.train_and_evaluate(
            TINY | {"steps": 2, "eval_every": 2}, str(tmp_path / name)
        )
    out = cifar.main(
        [
            "--task=plot",
            "--runs",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            f"--out={tmp_path / 'ab.png'}",
        ]
    )
    png = (tmp_path / "ab.png").read_bytes()
    assert out["plot"].endswith("ab.png") and png[:4] == b"\x89PNG" and len(png) > 5000


def test_compare_chooses_the_learning_rate_on_validation_only(tmp_path, monkeypatch):
    """Synthetic runs whose test error is best at another multiplier than their
    validation error: the table must follow validation."""

    def fake(cfg, workdir):
        val = abs(cfg["lr"] / 0.1 - 2.0) if cfg["optimizer"] == "sgd" else 0.5
        test = 0.1 if cfg["lr"] == 0.1 else 0.9
        return {"val_error": val / 10 + cfg["seed"] * 1e-3, "test_error": test}

    monkeypatch.setattr(train, "train_and_evaluate", fake)
    out = compare.compare(
        TINY | {"val_size": 50},
        str(tmp_path),
        optimizers=["sgd"],
        seeds=3,
        lr_grid=[1.0, 2.0],
        command="python -m experiments.cifar --task=compare",
    )
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert rows[0]["chosen"]["mult"] == 2.0 and rows[0]["chosen"]["lr"] == 0.2
    assert "| sgd | 0.2 (x2) |" in out["table"] and "90.00" in out["table"]
    with pytest.raises(ConfigError, match="give --val_size"):
        compare.compare(TINY, str(tmp_path), optimizers=["sgd"], seeds=1, lr_grid=[1])
    with pytest.raises(ConfigError, match="drop --lr"):
        compare.compare(
            TINY | {"val_size": 5, "lr": 0.1},
            str(tmp_path),
            optimizers=["sgd"],
            seeds=1,
            lr_grid=[1],
        )


def test_compare_runs_for_real(tmp_path):
    result = cifar.main(
        [
            "--task=compare",
            "--dataset=digits",
            f"--workdir={tmp_path}",
            *TINY_FLAGS,
            "--steps=2",
            "--eval_every=2",
            "--val_size=50",
            "--optimizers=sgd",
            "--seeds=1",
            "--lr_grid=1",
            "--progress=false",
        ]
    )
    table = result["table"]
    assert table.count("\n| sgd | 0.1 (x1) |") == 1 and "Reproduce:" in table
    assert (tmp_path / "sgd" / "lr1" / "seed0" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------
# Several devices (8 fake CPU devices, in a subprocess)
# --------------------------------------------------------------------------------------

MULTI_DEVICE = r"""
import json, sys
import chex, jax
sys.path.insert(0, "tests")
from helpers import fast_compile
from experiments import digits, train
from experiments.config import ConfigError
assert jax.local_device_count() == 8
tmp = sys.argv[1]
cfg = dict(steps=6, batch_size=16, widths=[4, 8], convs_per_stage=1, log_every=2,
           eval_every=6, checkpoint_every=6, progress=False, optimizer="sgdg")
out = {}
with fast_compile():
    for name, extra in [("one", {"num_devices": 1}), ("pmap", {}),
                        ("sharded", {"parallel": "sharded"}),
                        ("towers", {"bn_per_device": True})]:
        r = digits.train_and_evaluate(cfg | extra, f"{tmp}/{name}")
        out[name] = r["test_loss"]
    one = train.load_checkpoint(f"{tmp}/one")
    for name in ("pmap", "sharded"):
        chex.assert_trees_all_close(
            train.load_checkpoint(f"{tmp}/{name}")["params"], one["params"],
            rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(
            train.load_checkpoint(f"{tmp}/{name}")["batch_stats"], one["batch_stats"],
            rtol=1e-5, atol=1e-6)
    towers = train.load_checkpoint(f"{tmp}/towers")["params"]
    diff = max(float(abs(a - b).max()) for a, b in
               zip(jax.tree.leaves(towers), jax.tree.leaves(one["params"])))
    out["towers_differ"] = diff > 1e-4
    for bad in ({"batch_size": 12}, {"batch_size": 16, "eval_batch_size": 12}):
        try:
            digits.train_and_evaluate(cfg | bad, f"{tmp}/bad")
        except ConfigError as e:
            out.setdefault("errors", []).append(str(e))
print("RESULT " + json.dumps(out))
"""


def test_pmap_and_sharded_runs_equal_a_one_device_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE, str(tmp_path)],
        cwd=ROOT,
        env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[0][7:])
    assert out["towers_differ"]  # per-device BatchNorm is a different computation
    assert out["errors"] == [
        "batch_size 12 does not divide over 8 devices (1 process(es) x 8 local); "
        "use a multiple of 8",
        "eval_batch_size 12 does not divide over 8 devices (1 process(es) x 8 "
        "local); use a multiple of 8",
    ]
    assert not (tmp_path / "bad").exists()


MULTIHOST = r"""
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from experiments import digits
port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
digits.main(["--workdir", workdir, "--multihost=true",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={pid}", "--steps=4", "--widths=4,8",
             "--convs_per_stage=1", "--batch_size=16", "--log_every=2",
             "--eval_every=4", "--checkpoint_every=4", "--progress=false"])
assert jax.device_count() == 4 and jax.process_count() == 2
print("PROCESS", pid, "OK")
"""


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_form_one_data_parallel_run(tmp_path):
    """Two processes x 2 CPU devices joined by jax.distributed (gloo), each
    feeding its half of every batch, end with the parameters of a one-device
    run of the same config."""
    port = _free_port()
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                MULTIHOST,
                str(port),
                str(pid),
                str(tmp_path / "mh"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0 and f"PROCESS {pid} OK" in out, err[-3000:]
    cfg = TINY | {"steps": 4}
    digits.train_and_evaluate(cfg, str(tmp_path / "one"))
    assert_same_params(tmp_path / "mh", tmp_path / "one", rtol=1e-5, atol=1e-6)
    assert metrics(tmp_path / "mh")[-1]["split"] == "test"


def test_each_process_feeds_its_rows_of_every_batch():
    """The fast part of the multi-host test: the row split of a global batch."""
    dev = train.Devices("pmap", None)
    dev.n_proc, dev.proc, dev.n_global = 2, 1, 2 * dev.n_local
    assert dev.rows(16) == slice(8, 16)
    with pytest.raises(
        ConfigError, match=r"does not divide over 2 devices \(2 process"
    ):
        dev.check_divides(15, "batch_size")


def test_n_iter_runs_consecutive_seeds_and_summarises(tmp_path):
    out = digits.main(
        [
            "--workdir",
            str(tmp_path),
            *TINY_FLAGS,
            "--steps=4",
            "--eval_every=4",
            "--checkpoint_every=4",
            "--n-iter",
            "2",
            "--seed=3",
            "--progress=false",
        ]
    )
    assert [r["step"] for r in out["runs"]] == [4, 4]
    assert sorted(os.listdir(tmp_path)) == ["seed_3", "seed_4"]
    errors = [r["test_error"] for r in out["runs"]]
    assert out["test_error_median"] == pytest.approx(np.median(errors))
    seeds = {
        json.loads((tmp_path / d / "config.json").read_text())["seed"]
        for d in ("seed_3", "seed_4")
    }
    assert seeds == {3, 4}


def test_prepare_needs_tensorflow_and_a_tfds_dataset(capsys):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: preparing would download")
    for dataset, message in (
        ("cifar10", "pip install -e '.[prepare]'"),
        ("digits", "needs no preparation"),
    ):
        with pytest.raises(SystemExit) as exit_:
            cifar.main(["--task=prepare", f"--dataset={dataset}"])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_channel_stats_accumulate_in_chunks():
    x = np.random.default_rng(0).integers(0, 256, (300, 4, 4, 3)).astype(np.uint8)
    mean, std = data.channel_stats(x, chunk=7)
    flat = x.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-9)
