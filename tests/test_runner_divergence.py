"""A run that is going nowhere says so: the loss watch, the warning on the
console and in ``metrics.jsonl``, ``stop_diverged``, and ``--task=compare``
marking diverged runs and choosing among the runs that trained."""

from __future__ import annotations

import json
import math

import pytest

from experiments import compare, digits, monitor, train

# A tiny digits run whose first epoch is 10 steps (160 images of batch 16).
SMALL = {
    "dataset": "digits",
    "widths": [4, 8],
    "convs_per_stage": 1,
    "train_size": 160,
    "batch_size": 16,
    "steps": 20,
    "log_every": 5,
    "eval_every": 20,
    "checkpoint_every": 10,
    "progress": False,
}
# SGD-G with an absurd manifold rate: every step throws the unit-norm kernels to
# random directions, so the loss stays finite and at chance.
LOST = SMALL | {"optimizer": "sgdg", "lr_manifold": 1e3}


def records(workdir, split):
    return [r for r in train.read_metrics(str(workdir)) if r["split"] == split]


# --------------------------------------------------------------------------------------
# The watch itself
# --------------------------------------------------------------------------------------


def test_watch_fires_at_chance_after_the_first_epoch_only():
    watch = monitor.LossWatch(num_classes=10, steps_per_epoch=10)
    assert watch.check(5, 2.4) == []  # before the end of epoch 1: no verdict
    (alert,) = watch.check(10, 2.31)
    assert alert.kind == "chance" and alert.threshold == pytest.approx(math.log(10))
    assert "ln 10 = 2.303" in alert.message and "step 10 (epoch 1)" in alert.message
    assert watch.check(15, 2.5) == []  # once per run
    learning = monitor.LossWatch(num_classes=10, steps_per_epoch=10)
    assert learning.check(10, 2.0) == [] and learning.check(20, 2.4) == []


def test_watch_fires_when_the_loss_grows_tenfold():
    watch = monitor.LossWatch(num_classes=4, steps_per_epoch=100)
    assert watch.check(1, 1.0) == []
    assert watch.check(2, 9.9) == []
    (alert,) = watch.check(3, 10.0)
    assert alert.kind == "grown" and "grown 10.0x" in alert.message
    assert watch.diverged is alert


def test_watch_resumes_from_the_metrics_lines():
    watch = monitor.LossWatch(num_classes=10, steps_per_epoch=10)
    lines = []
    for step, loss in ((5, 1.0), (10, 2.4), (15, 11.0)):
        lines.append({"step": step, "split": "train", "loss": loss})
        lines += [a.record(10) for a in watch.check(step, loss)]
    assert [a.kind for a in watch.warnings] == ["chance", "grown"]
    again = monitor.LossWatch(num_classes=10, steps_per_epoch=10)
    again.restore(lines)
    assert [a.kind for a in again.warnings] == [a.kind for a in watch.warnings]
    assert again.check(20, 50.0) == []  # both already fired


# --------------------------------------------------------------------------------------
# A run forced to go nowhere
# --------------------------------------------------------------------------------------


def test_a_run_at_chance_warns_on_the_console_and_in_the_metrics(tmp_path, capsys):
    result = digits.train_and_evaluate(LOST, str(tmp_path))
    err = capsys.readouterr().err
    assert result["diverged"] == "chance" and result["diverged_at"] == 10
    assert not result["stopped_early"] and result["step"] == 20
    assert "WARNING: step 10 (epoch 1): the training loss" in err
    assert "DIVERGED (chance, step 10)" in err
    (warning,) = records(tmp_path, "warning")
    assert warning["kind"] == "chance" and warning["step"] == 10
    assert warning["loss"] >= math.log(10)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["diverged"] == "chance"


def test_stop_diverged_stops_the_run_with_exit_1_and_stays_stopped(tmp_path, capsys):
    argv = [
        f"--workdir={tmp_path}",
        "--widths=4,8",
        "--convs_per_stage=1",
        "--train_size=160",
        "--batch_size=16",
        "--steps=40",
        "--log_every=5",
        "--eval_every=20",
        "--checkpoint_every=10",
        "--progress=false",
        "--lr_manifold=1e3",
        "--stop_diverged",
    ]
    for _ in range(2):  # the rerun resumes at the stop and stops again
        with pytest.raises(SystemExit) as exit_:
            digits.main(argv)
        assert exit_.value.code == 1
        out, err = capsys.readouterr()
        result = json.loads(out.strip().splitlines()[-1])
        assert result["stopped_early"] and result["step"] == 10
        assert (
            err.strip()
            .splitlines()[-1]
            .startswith("error: stopped early (stop_diverged): step 10 (epoch 1)")
        )
    assert [r["step"] for r in records(tmp_path, "train")] == [5, 10]
    # Without the option the same workdir trains on to the end.
    out = digits.main([a for a in argv if a != "--stop_diverged"])
    assert out["step"] == 40 and out["diverged"] == "chance"
    assert len(records(tmp_path, "warning")) == 1


# --------------------------------------------------------------------------------------
# --task=compare
# --------------------------------------------------------------------------------------


def test_compare_never_picks_a_diverged_learning_rate(tmp_path, monkeypatch):
    """Synthetic runs: the lowest validation error belongs to a multiplier with
    a diverged seed; the choice falls on the best multiplier that trained, and an
    optimizer that diverged everywhere is marked so."""

    def fake(cfg, workdir):
        assert cfg["stop_diverged"] is True  # compare stops diverged runs early
        mult = cfg["lr"] / 0.1 if cfg["optimizer"] == "sgd" else 8.0
        if mult == 4.0 and cfg["seed"] == 1:
            return {"val_error": 0.01, "test_error": 0.01, "diverged": "grown"}
        if mult == 8.0:
            raise train.TrainingDiverged("the training loss became nan at step 3")
        return {"val_error": 0.3 / mult, "test_error": 0.2}

    monkeypatch.setattr(train, "train_and_evaluate", fake)
    out = compare.compare(
        SMALL | {"val_size": 50},
        str(tmp_path),
        optimizers=["sgd", "adam"],
        seeds=2,
        lr_grid=[1.0, 2.0, 4.0, 8.0],
    )
    table = out["table"]
    assert "| sgd | 0.2 (x2) |" in table and "| x4 (1/2), x8 (2/2) |" in table
    assert "| adam | diverged at every learning rate |" in table
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert rows[0]["chosen"]["mult"] == 2.0 and rows[1]["chosen"] is None
    assert rows[0]["grid"][3]["diverged"] == ["non-finite", "non-finite"]
