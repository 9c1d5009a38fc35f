"""The runner's command line as a new user meets it: which flag sets which
learning rate, wrong values reported before JAX is loaded, one clock on the
console, and a finished run extended by a rerun with more steps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from experiments import cifar, digits, train
from experiments.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = [
    "--schedule=constant",
    "--warmup_epochs=0",
    "--widths=4,8",
    "--convs_per_stage=1",
    "--batch_size=16",
    "--log_every=2",
    "--eval_every=4",
    "--checkpoint_every=4",
    "--progress=false",
]


def env():
    out = dict(os.environ, PYTHONPATH=ROOT)
    out.pop("XLA_FLAGS", None)
    return out


# --------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------


def test_help_says_which_flag_sets_which_learning_rate(capsys):
    with pytest.raises(SystemExit):
        cifar.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "--lr V learning rate of every parameter, except the manifold kernels" in (
        text
    )
    assert (
        "hybrids with two rates only (see 'learning rates' below): learning rate "
        "of the manifold kernels (--lr does not " in text
    )
    assert (
        "--learnRateG V = --lr_manifold (the manifold kernels of the hybrids with "
        "two rates)" in text
    )
    assert (
        "sgdg, adamg: --lr (--learnRate): the Euclidean half only (Nesterov SGD on "
        "biases, BatchNorm, classifier and kernels off the manifold); --lr_manifold "
        "(--learnRateG): the manifold kernels" in text
    )
    assert "sgd, adam, adamw, adamp, sgdp, nero: --lr: every parameter" in text
    assert (
        "manifold-muon, hyperspherical: --lr: the Euclidean half only (AdamW on "
        "biases, BatchNorm and kernels off the manifold); --lr_manifold: the "
        "manifold kernels" in text
    )
    assert "--warmup_epochs" in text and "cosine" in text


# --------------------------------------------------------------------------------------
# Wrong values: one line, exit 2, before JAX is imported
# --------------------------------------------------------------------------------------

BAD_FLAGS = {
    "--lr=-1": "lr must be in (0, inf), got -1",
    "--optimizer=rmsprop": "unknown optimizer 'rmsprop'",
    "--model=resnet50": "unknown model 'resnet50'",
    "--steps=abc": "--steps: could not convert string to float: 'abc'",
    "--batch_size=0": "batch_size must be in [1, inf), got 0",
    "--schedule=exp": "unknown schedule 'exp'",
    "--warmup_epochs=-1": "warmup_epochs must be in [0, inf), got -1",
    "--dataset=mnist": "unknown dataset 'mnist'",
    "--labels=magic": "unknown labels 'magic'",
    "--n_iter=0": "--n_iter must be >= 1",
    "--task=compare --lr_grid=1,x --val_size=10": "--lr_grid must be comma-separated",
    "--task=compare --optimizers=sgd,rmsprop --val_size=10": "unknown optimizer",
}

CHECK_FLAGS = r"""
import json, sys, time
t0 = time.time()
from experiments import cifar
out = []
for flags in json.loads(sys.argv[1]):
    try:
        cifar.main(["--workdir", sys.argv[2], "--dataset=digits", *flags.split()])
        out.append(None)
    except SystemExit as e:
        out.append(e.code)
print("RESULT " + json.dumps({"codes": out, "jax": "jax" in sys.modules,
                              "flax": "flax" in sys.modules,
                              "seconds": time.time() - t0}))
"""


def test_wrong_flag_values_are_reported_before_jax_is_imported(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", CHECK_FLAGS, json.dumps(list(BAD_FLAGS)), str(workdir)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[7:])
    assert result["codes"] == [2] * len(BAD_FLAGS), proc.stderr
    assert not result["jax"] and not result["flax"]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == len(BAD_FLAGS)
    for error, expected in zip(errors, BAD_FLAGS.values(), strict=True):
        assert expected in error, (error, expected)
    assert "Traceback" not in proc.stderr and not workdir.exists()


def test_time_to_a_flag_error_is_the_interpreter_start():
    """``python -m experiments.cifar --lr=-1`` answers in well under the time to
    import JAX alone (about 1.3 s on an idle 2-core machine; this one is busy)."""
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cifar", "--workdir=x", "--lr=-1"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.time() - t0
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1] == "error: lr must be in (0, inf), got -1"
    )
    assert seconds < 15, seconds


# --------------------------------------------------------------------------------------
# One clock, one progress display; extending a finished run
# --------------------------------------------------------------------------------------


def clock(err):
    return [float(m) for m in re.findall(r"^\[\s*([0-9.]+)s\] ", err, flags=re.M)]


def test_one_clock_and_a_finished_run_extended_by_more_steps(tmp_path, capsys):
    run, straight = tmp_path / "run", tmp_path / "straight"
    out = digits.main([f"--workdir={run}", "--steps=4", *TINY_FLAGS])
    err = capsys.readouterr().err
    times = clock(err)
    assert len(times) >= 8 and times == sorted(times), err  # never backwards
    assert "INFO" not in err and "resolved config:\n" not in err
    assert "config: dataset digits, model vgg-small, optimizer sgdg" in err
    assert out["step"] == 4 and out["first_step_s"] > 0
    assert re.search(
        r"done: step 4, test error [0-9.]+; first step [0-9.]+s after", err
    )

    # More steps, same everything else: the run resumes and trains on.
    out = digits.main([f"--workdir={run}", "--steps=8", "--verbosity=1", *TINY_FLAGS])
    err = capsys.readouterr().err
    assert out["resumed_from"] == 4 and out["step"] == 8
    assert "extending the run from 4 to 8 steps" in err
    assert "resolved config:\n" in err  # --verbosity=1 shows it in full
    assert json.loads((run / "config.json").read_text())["steps"] == 8
    digits.main([f"--workdir={straight}", "--steps=8", *TINY_FLAGS])
    capsys.readouterr()
    # ... ending with the lines of a run that was 8 steps long from the start.
    assert metrics(run) == metrics(straight)

    # Anything else is still refused, naming the keys; so is a shorter run.
    cfg = {
        "dataset": "digits",
        "schedule": "constant",
        "warmup_epochs": 0,
        "widths": [4, 8],
        "convs_per_stage": 1,
        "batch_size": 16,
        "log_every": 2,
        "eval_every": 4,
        "checkpoint_every": 4,
        "progress": False,
    }
    with pytest.raises(ConfigError, match=r"different config: lr \(0.01 -> 0.02\)"):
        digits.train_and_evaluate(cfg | {"steps": 12, "lr": 0.02}, str(run))
    with pytest.raises(ConfigError, match="extended, not shortened"):
        digits.train_and_evaluate(cfg | {"steps": 6}, str(run))


@pytest.mark.slow  # the fast variant: the constant-schedule extension above
def test_extending_a_cosine_run_says_the_schedule_is_stretched(tmp_path, capsys):
    cfg = {
        "dataset": "digits",
        "widths": [4, 8],
        "convs_per_stage": 1,
        "batch_size": 16,
        "steps": 2,
        "log_every": 2,
        "eval_every": 2,
        "checkpoint_every": 2,
        "progress": False,
    }
    digits.train_and_evaluate(cfg, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["schedule"] == "cosine"
    capsys.readouterr()
    out = digits.train_and_evaluate(cfg | {"steps": 4}, str(tmp_path))
    err = capsys.readouterr().err
    assert out["resumed_from"] == 2 and out["step"] == 4
    assert "extending the run from 2 to 4 steps (its warm-up, capped at the" in err
    assert "its cosine schedule is stretched to the new length" in err


def metrics(workdir):
    timing = {"step_time_s", "images_per_s"}
    return [
        {k: v for k, v in r.items() if k not in timing}
        for r in train.read_metrics(str(workdir))
    ]


# --------------------------------------------------------------------------------------
# --task=plot: every line says which run it is
# --------------------------------------------------------------------------------------


def test_plot_labels_every_line_and_draws_validation(tmp_path, monkeypatch):
    from experiments import plots

    runs = []
    for opt, lr, seed in (("sgd", {"lr": 0.1}, 0), ("sgdg", {"lr": 0.01}, 1)):
        if opt == "sgdg":
            lr["lr_manifold"] = 0.2
        run = tmp_path / opt / "lr1" / f"seed{seed}"  # compare's layout
        run.mkdir(parents=True)
        (run / "config.json").write_text(
            json.dumps({"optimizer": opt, "seed": seed} | lr)
        )
        lines = [
            {"step": s, "epoch": s / 10, "split": split, "loss": 1 / s, "error": 0.1}
            for s in (10, 20)
            for split in ("train", "test", "val")
        ]
        (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
        runs.append(str(run))
    drawn = {}
    import matplotlib.figure

    real = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        for ax in fig.axes:
            drawn[ax.get_ylabel()] = (
                [t.get_text() for t in ax.get_legend().get_texts()],
                ax.get_yscale(),
            )
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    plots.plot_runs(runs, str(tmp_path / "runs.png"))
    labels, scale = drawn["error (%)"]
    assert scale == "linear" and labels == [
        "seed0 (sgd, lr 0.1, seed 0): test",
        "seed0 (sgd, lr 0.1, seed 0): validation",
        "seed1 (sgdg, lr 0.01 / manifold 0.2, seed 1): test",
        "seed1 (sgdg, lr 0.01 / manifold 0.2, seed 1): validation",
    ]
    assert drawn["training loss"][0][0] == "seed0 (sgd, lr 0.1, seed 0)"


# --------------------------------------------------------------------------------------
# The compilation cache of a workdir
# --------------------------------------------------------------------------------------


def test_a_rerun_reads_its_compiled_programs_from_the_workdir(
    tmp_path, capsys, monkeypatch, compile_cache_hits
):
    import argparse

    import jax

    from experiments import tasks

    # Every program is stored (compile_cache_hits): the tiny model compiles
    # faster than JAX's threshold for storing one.
    hits = compile_cache_hits
    run, off = tmp_path / "run", tmp_path / "off"
    # The suite's own cache (conftest) is JAX_COMPILATION_CACHE_DIR: without it,
    # --compile_cache=auto puts the cache in the workdir.
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    jax.clear_caches()  # what earlier tests compiled in this process
    digits.main([f"--workdir={run}", "--steps=4", *TINY_FLAGS])
    cache = run / tasks.COMPILE_CACHE
    assert any(n.startswith("jit_") for n in os.listdir(cache))
    # As in a new process: nothing compiled is left in memory.
    jax.clear_caches()
    del hits[:]
    capsys.readouterr()
    digits.main([f"--workdir={run}", "--steps=4", "--overwrite", *TINY_FLAGS])
    assert hits, "the rerun compiled everything again"
    err = capsys.readouterr().err
    assert "first step done: loaded from the compilation cache and run in" in err
    jax.clear_caches()
    del hits[:]
    out = digits.main(
        [f"--workdir={off}", "--steps=4", "--compile_cache=none", *TINY_FLAGS]
    )
    assert out["step"] == 4 and not hits
    assert "first step done: compiled and run in" in capsys.readouterr().err
    assert not (off / tasks.COMPILE_CACHE).exists()
    assert jax.config.jax_compilation_cache_dir is None
    # A cache the user set up for JAX is the one auto uses.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    args = argparse.Namespace(workdir=str(run), compile_cache="auto")
    assert tasks.compile_cache(args) == str(tmp_path / "mine")
    capsys.readouterr()

    # A file where the cache's folder should be: one line, status 2, no run.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        digits.main(
            [f"--workdir={tmp_path / 'x'}", f"--compile_cache={blocker}", *TINY_FLAGS]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: --compile_cache=") and "not a directory" in last
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()
