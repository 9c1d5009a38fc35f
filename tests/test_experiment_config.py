"""Config, presets, the optimizer table and the command line of experiments/.

The expected numbers below are copied from the papers' recipes
(docs/algorithms.md#cho-and-lee-recipes, #roburin-et-al-recipes, #stock-et-al-recipes) and from the papers' README command lines, not
from the code under test.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cifar, configs, optimizers
from experiments import config as config_lib
from experiments.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolved(name, n_train=50000, image_shape=(32, 32, 3)):
    cfg = config_lib.resolve(configs.get(name))
    return config_lib.derive(cfg, n_train=n_train, image_shape=image_shape)


def lr_at(cfg, key, count):
    schedule = optimizers.schedule_of(cfg, cfg[key])
    return float(schedule(jnp.asarray(count)))


# --------------------------------------------------------------------------------------
# Cho & Lee (docs/algorithms.md#cho-and-lee-recipes)
# --------------------------------------------------------------------------------------

# | data | method | eta_e | eta_g | omega | nu | weight decay | keep_prob |
RBN_TABLE = {
    ("cifar", "sgd"): (0.1, None, None, None, "all", 0.7),
    ("cifar", "sgdg"): (0.01, 0.2, 0.1, 0.1, "W", 0.7),
    ("cifar", "adamg"): (0.01, 0.05, 0.1, 0.1, "W", 0.7),
    ("svhn", "sgd"): (0.01, None, None, None, "all", 0.6),
    ("svhn", "sgdg"): (0.001, 0.02, 0.1, 0.1, "W", 0.6),
    ("svhn", "adamg"): (0.001, 0.005, 0.1, 0.1, "W", 0.6),
}
RBN_CELLS = {
    "cifar10": ["vgg13", "vgg19", "wrn-28-10", "wrn-40-10"],
    "cifar100": ["vgg13", "vgg19", "wrn-28-10", "wrn-40-10"],
    "svhn": ["vgg13", "vgg19", "wrn-16-4", "wrn-22-8"],
}


@pytest.mark.parametrize(
    "data,model,opt",
    [
        (d, m, o)
        for d, ms in RBN_CELLS.items()
        for m in ms
        for o in ("sgd", "sgdg", "adamg")
    ],
)
def test_rbn_presets_resolve_to_the_published_numbers(data, model, opt):
    svhn = data == "svhn"
    n = 604388 if svhn else 50000
    cfg = resolved(f"rbn-{data}-{model}-{opt}", n_train=n)
    lr, lr_g, omega, clip, decayed, keep = RBN_TABLE[("svhn" if svhn else "cifar", opt)]
    assert cfg["dataset"] == ("svhn_cropped" if svhn else data)
    assert cfg["model"] == model
    assert cfg["batch_size"] == 128
    assert cfg["lr"] == lr and cfg["lr_manifold"] == lr_g
    assert cfg["omega"] == omega and cfg["grad_clip"] == clip
    assert cfg["momentum"] == 0.9 and cfg["nesterov"] is True
    assert cfg["weight_decay"] == 5e-4
    rest = 5e-4 if decayed == "all" else 0.0
    assert (cfg["bias_decay"], cfg["gamma_decay"], cfg["beta_decay"]) == (rest,) * 3
    if opt != "sgd":
        assert cfg["manifold_decay"] == 0.0 and cfg["unit_init"] is True
    if opt == "adamg":
        assert (cfg["b1"], cfg["b2"], cfg["eps"]) == (0.9, 0.99, 1e-8)
    # VGG: no keep_prob in the README example -> no dropout
    assert cfg["keep_prob"] == (keep if model.startswith("wrn") else None)
    assert cfg["labels"] == "paper" and cfg["bn_decay"] == 0.99
    assert cfg["schedule"] == "piecewise" and cfg["eval_every"] == 1000
    if svhn:
        assert cfg["train_split"] == "train+extra"
        assert cfg["decay_steps"] == [283306, 566613]
        assert cfg["steps"] == 755485 and cfg["decay_factor"] == 0.1
        assert cfg["normalization"] == "scale" and cfg["augment"] is False
    else:
        assert cfg["decay_steps"] == [23437, 46875, 62500]
        assert cfg["steps"] == 78125 and cfg["decay_factor"] == 0.2
        assert cfg["normalization"] == "train_stats" and cfg["augment"] is True
        assert (cfg["pad"], cfg["pad_mode"], cfg["flip"]) == (4, "reflect", True)


def test_rbn_piecewise_schedule_uses_strict_greater_than():
    cfg = resolved("rbn-cifar10-wrn-28-10-sgdg")
    for key, base in (("lr", 0.01), ("lr_manifold", 0.2)):
        assert lr_at(cfg, key, 0) == pytest.approx(base)
        assert lr_at(cfg, key, 23437) == pytest.approx(base)  # step > 23437 decays
        assert lr_at(cfg, key, 23438) == pytest.approx(base * 0.2)
        assert lr_at(cfg, key, 46876) == pytest.approx(base * 0.04)
        assert lr_at(cfg, key, 62501) == pytest.approx(base * 0.008)


# --------------------------------------------------------------------------------------
# Roburin et al. (docs/algorithms.md#roburin-et-al-recipes): the best_hyper_parameters table as published
# --------------------------------------------------------------------------------------

SRT_TABLE = """
| cifar10 / resnet18 | lr 0.1, μ 0.9, wd 2.5e-4 | lr 0.1, μ 0.9, wd 2.5e-4 | lr 1e-3, β=(0.9,0.999), wd 7.8125e-6 | lr 1e-3, β=(0.9,0.99), wd 6.25e-5 | lr 0.01, β=(0.9,0.99), wd 5e-4 | lr 1e-3, β=(0.9,0.99), wd 1.5625e-5 | lr 1e-3, β=(0.9,0.99), wd 7.8125e-6 |
| cifar10 / resnet20 | lr 0.1, μ 0.9, wd 2.5e-4 | lr 0.1, μ 0.9, wd 3.125e-5 | lr 1e-3, β=(0.9,0.99), wd 5e-4 | lr 1e-3, β=(0.9,0.99), wd *absent → AdamW default 0.01* | lr 0.01, β=(0.9,0.99), wd 5e-4 | lr 1e-3, β=(0.9,0.99), wd 5e-4 | lr 1e-3, β=(0.9,0.99), wd 7.8125e-6 |
| cifar10 / vgg16 | lr 0.1, μ 0.9, wd 2.5e-4 | lr 0.1, μ 0.9, wd 6.25e-5 | lr 1e-3, β=(0.9,0.999), wd 3.125e-5 | lr 1e-3, β=(0.9,0.999), wd 2.5e-4 | lr 0.01, β=(0.9,0.999), wd 5e-4 | lr 1e-3, β=(0.9,0.999), wd 3.125e-5 | lr 1e-3, β=(0.9,0.999), wd 1.5625e-5 |
| cifar100 / resnet18 | lr 0.1, μ 0.9, wd 5e-4 | lr 0.1, μ 0.9, wd 5e-4 | lr 1e-3, β=(0.9,0.999), wd 1.25e-4 | lr 1e-3, β=(0.9,0.99), wd 1.25e-4 | lr 0.01, β=(0.9,0.99), wd 5e-4 | lr 1e-3, β=(0.9,0.99), wd 1.25e-4 | lr 1e-3, β=(0.9,0.999), wd 0 |
| cifar100 / vgg16 | lr 0.1, μ 0.9, wd 5e-4 | lr 0.1, μ 0.9, wd 1.25e-4 | lr 1e-3, β=(0.9,0.99), wd 6.25e-5 | lr 1e-3, β=(0.9,0.99), wd 1.5625e-5 | lr 0.01, β=(0.9,0.99), wd 5e-4 | lr 1e-3, β=(0.9,0.99), wd 6.25e-5 | lr 1e-3, β=(0.9,0.99), wd 7.8125e-6 |
| svhn / resnet18 | lr 0.1, μ 0.9, wd 5e-4 | lr 0.1, μ 0.9, wd 5e-4 | lr 1e-3, β=(0.9,0.999), wd 0 | lr 1e-3, β=(0.9,0.999), wd 7.8125e-6 | lr 0.01, β=(0.9,0.99), wd 5e-4 | lr 1e-3, β=(0.9,0.99), wd 3.125e-5 | lr 1e-3, β=(0.9,0.999), wd 7.8125e-6 |
| svhn / vgg16 | lr 0.1, μ 0.9, wd 5e-4 | lr 0.1, μ 0.9, wd 3.125e-5 | lr 1e-3, β=(0.9,0.99), wd 0 | lr 1e-3, β=(0.9,0.99), wd 3.125e-5 | lr 0.01, β=(0.9,0.99), wd 5e-4 | lr 1e-3, β=(0.9,0.99), wd 7.8125e-6 | lr 1e-3, β=(0.9,0.999), wd 2.5e-4 |
"""
SRT_COLUMNS = ("sgd", "sgdmrt", "adam", "adamw", "adamg", "adams", "adamsrt")
SRT_MODELS = {"resnet18": "resnet18", "resnet20": "resnet20", "vgg16": "vgg16-srt"}


def _srt_cells():
    for line in SRT_TABLE.strip().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        data, model = (x.strip() for x in cells[0].split("/"))
        for opt, text in zip(SRT_COLUMNS, cells[1:], strict=True):
            lr = float(re.search(r"lr ([\d.e-]+)", text).group(1))
            wd = float(re.search(r"([\d.e-]+)\*?$", text.rstrip("*")).group(1))
            beta = re.search(r"β=\(([\d.]+),([\d.]+)\)", text)
            mom = re.search(r"μ ([\d.]+)", text)
            yield data, model, opt, lr, wd, beta, mom


@pytest.mark.parametrize(
    "cell", list(_srt_cells()), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}"
)
def test_srt_presets_resolve_to_best_hyper_parameters(cell):
    data, model, opt, lr, wd, beta, mom = cell
    if (
        opt == "adamg"
    ):  # a different algorithm (docs/algorithms.md#the-adamg-baseline-of-the-original-code): no preset
        with pytest.raises(ValueError, match="different algorithm"):
            configs.srt_name(data, model, opt)
        assert not any(
            n.startswith(f"srt-{data}-{model}-adamg") for n in configs.names()
        )
        return
    n = {"svhn": 73257}.get(data, 50000)
    cfg = resolved(configs.srt_name(data, model, opt), n_train=n - math.floor(0.05 * n))
    assert cfg["model"] == SRT_MODELS[model] and cfg["optimizer"] == opt
    assert cfg["lr"] == lr
    for key in ("weight_decay", "manifold_decay", "bias_decay", "gamma_decay"):
        assert cfg[key] == wd, key
    assert cfg["beta_decay"] == wd
    if beta:
        assert (cfg["b1"], cfg["b2"]) == (float(beta.group(1)), float(beta.group(2)))
        assert cfg["eps"] == 1e-8
    else:
        assert cfg["momentum"] == float(mom.group(1))
        if opt == "sgd":
            assert cfg["nesterov"] is False  # torch.optim.SGD, no Nesterov
    assert cfg["epochs"] == 405 and cfg["batch_size"] == 128
    assert cfg["schedule"] == "multistep" and cfg["decay_factor"] == 0.1
    assert cfg["decay_epochs"] == [135, 225, 315]
    assert cfg["val_size"] == 0.05 and cfg["select_best"] is True
    assert cfg["labels"] == "paper"
    if data == "svhn":
        assert cfg["train_split"] == "train" and cfg["normalization"] == "scale"
        assert cfg["augment"] is False
    else:
        assert cfg["normalization"] == "fixed" and cfg["pad_mode"] == "zero"
        assert cfg["augment"] is True and cfg["pad"] == 4


def test_srt_normalization_and_multistep_per_epoch():
    c10 = resolved("srt-cifar10-resnet20-adamsrt", n_train=47500)
    assert c10["norm_mean"] == [0.4914, 0.4822, 0.4465]
    assert c10["norm_std"] == [0.2470, 0.2435, 0.2616]
    c100 = resolved("srt-cifar100-resnet18-sgd", n_train=47500)
    assert c100["norm_mean"] == [0.5071, 0.4867, 0.4408]
    assert c100["norm_std"] == [0.2675, 0.2565, 0.2761]
    spe = c10["steps_per_epoch"]
    assert spe == 47500 // 128
    # epochs 0-134: lr, 135-224: lr/10, 225-314: lr/100, 315-404: lr/1000
    for epoch, factor in [(0, 1), (134, 1), (135, 0.1), (224, 0.1), (225, 1e-2)]:
        assert lr_at(c10, "lr", epoch * spe) == pytest.approx(1e-3 * factor)
    assert lr_at(c10, "lr", 315 * spe) == pytest.approx(1e-6)
    assert lr_at(c10, "lr", 135 * spe - 1) == pytest.approx(1e-3)
    assert c10["steps"] == math.floor(405 * 47500 / 128)


# --------------------------------------------------------------------------------------
# ENorm (docs/algorithms.md#stock-et-al-recipes)
# --------------------------------------------------------------------------------------

# | model | ENorm c | epochs | eta_0 | weight decay | momentum |
ENORM_TABLE = {
    "enorm-cifar10-fc-baseline": ("enorm-fc", 0.0, 60, 0.1, 1e-3, 0.0),
    "enorm-cifar10-fc-c1.2": ("enorm-fc", 1.2, 60, 0.1, 1e-3, 0.0),
    "enorm-cifar10-conv-baseline": ("enorm-conv", 0.0, 128, 0.05, 1e-3, 0.9),
    "enorm-cifar10-conv-c1.1": ("enorm-conv", 1.1, 128, 0.05, 1e-3, 0.9),
}


@pytest.mark.parametrize("name", sorted(ENORM_TABLE))
def test_enorm_presets_resolve_to_the_readme_commands(name):
    model, c, epochs, lr, wd, mom = ENORM_TABLE[name]
    cfg = resolved(name, n_train=40960)
    assert (cfg["model"], cfg["enorm"], cfg["epochs"], cfg["lr"]) == (
        model,
        c,
        epochs,
        lr,
    )
    assert cfg["momentum"] == mom and cfg["nesterov"] is False
    for key in ("weight_decay", "bias_decay", "gamma_decay", "beta_decay"):
        assert cfg[key] == wd
    assert cfg["batch_size"] == 256 and cfg["train_size"] == 40960
    assert cfg["norm_mean"] == [0.4914, 0.4822, 0.4465]
    assert cfg["norm_std"] == [0.2023, 0.1994, 0.2010]
    assert cfg["schedule"] == "linear"
    spe = cfg["steps_per_epoch"]
    assert spe == 160
    for e in (0, 1, epochs // 2, epochs - 1):
        assert lr_at(cfg, "lr", e * spe) == pytest.approx(lr * (epochs - e) / epochs)
    if model == "enorm-fc":
        assert cfg["n_layers"] == 15 and cfg["augment"] is False
    else:  # random crop 28 (pad 2) + flip; center crop 28 at test
        assert (cfg["crop"], cfg["pad"], cfg["flip"]) == (28, 2, True)
        assert cfg["input_shape"] == [28, 28, 3]


def test_every_preset_resolves_and_is_described():
    assert len(configs.names()) == 36 + 42 + 4
    for name in configs.names():
        config_lib.resolve(configs.get(name))
        assert configs.describe(name)
    with pytest.raises(ValueError, match="valid presets.*rbn-cifar10-wrn-28-10-sgdg"):
        configs.get("rbn-cifar10-resnet50-sgd")


# --------------------------------------------------------------------------------------
# The papers' command lines (README text of the three repositories)
# --------------------------------------------------------------------------------------

RBN_COMMANDS = {
    "rbn-cifar10-wrn-28-10-sgd": "--model=resnet --depth=28 --widen_factor=10 --optimizer=sgd --learnRate=0.1 --weightDecay=0.0005 --biasDecay=0.0005 --gammaDecay=0.0005 --betaDecay=0.0005 --keep_prob=0.7 --data=cifar10",
    "rbn-cifar10-wrn-28-10-sgdg": "--model=resnet --depth=28 --widen_factor=10 --optimizer=sgdg --grassmann=True --learnRate=0.01 --learnRateG=0.2 --omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 --keep_prob=0.7 --data=cifar10",
    "rbn-cifar10-wrn-28-10-adamg": "--model=resnet --depth=28 --widen_factor=10 --optimizer=adamg --grassmann=True --learnRate=0.01 --learnRateG=0.05 --omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 --keep_prob=0.7 --data=cifar10",
    "rbn-cifar100-wrn-28-10-sgd": "--model=resnet --depth=28 --widen_factor=10 --optimizer=sgd --learnRate=0.1 --weightDecay=0.0005 --biasDecay=0.0005 --gammaDecay=0.0005 --betaDecay=0.0005 --keep_prob=0.7 --data=cifar100",
    "rbn-cifar100-wrn-28-10-sgdg": "--model=resnet --depth=28 --widen_factor=10 --optimizer=sgdg --grassmann=True --learnRate=0.01 --learnRateG=0.2 --omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 --keep_prob=0.7 --data=cifar100",
    "rbn-cifar100-wrn-28-10-adamg": "--model=resnet --depth=28 --widen_factor=10 --optimizer=adamg --grassmann=True --learnRate=0.01 --learnRateG=0.05 --omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 --keep_prob=0.7 --data=cifar100",
    "rbn-svhn-wrn-22-8-sgd": "--model=resnet --depth=22 --widen_factor=8 --optimizer=sgd --learnRate=0.01 --weightDecay=0.0005 --biasDecay=0.0005 --gammaDecay=0.0005 --betaDecay=0.0005 --keep_prob=0.6 --learnRateDecay=0.1 --data=svhn",
    "rbn-svhn-wrn-22-8-sgdg": "--model=resnet --depth=22 --widen_factor=8 --optimizer=sgdg --grassmann=True --learnRate=0.001 --learnRateG=0.02 --omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 --keep_prob=0.6 --learnRateDecay=0.1 --data=svhn",
    "rbn-svhn-wrn-22-8-adamg": "--model=resnet --depth=22 --widen_factor=8 --optimizer=adamg --grassmann=True --learnRate=0.001 --learnRateG=0.005 --omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 --keep_prob=0.6 --learnRateDecay=0.1 --data=svhn",
    "rbn-cifar100-wrn-40-10-adamg": "--model=resnet --depth=40 --widen_factor=10 --optimizer=adamg --grassmann=True --learnRate=0.01 --learnRateG=0.05 --omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 --keep_prob=0.7 --data=cifar100 --vali_batch_size=200 --num_gpus=2",
    "rbn-cifar100-vgg19-adamg": "--model=vgg19 --optimizer=adamg --grassmann=True --learnRate=0.01 --learnRateG=0.05 --omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 --data=cifar100",
}
RBN_TEST_COMMAND = "--model=resnet --depth=40 --widen_factor=10  --data=cifar100 --task=test --load=./logs/resnet_train_cifar100/model.ckpt-78124"
SRT_COMMAND = "--optimizer=adamsrt --model=resnet18 --dataloader=cifar100"
ENORM_COMMANDS = {
    "enorm-cifar10-fc-baseline": "--dataset cifar10 --model-type linear --n-layers 15 --enorm 0 --epochs 60 --lr 0.1 --weight-decay 1e-3 --momentum 0 --n-iter 5",
    "enorm-cifar10-fc-c1.2": "--dataset cifar10 --model-type linear --n-layers 15 --enorm 1.2 --epochs 60 --lr 0.1 --weight-decay 1e-3 --momentum 0 --n-iter 5",
    "enorm-cifar10-conv-baseline": "--dataset cifar10 --model-type conv --enorm 0 --epochs 128 --lr 0.05 --weight-decay 1e-3 --momentum 0.9 --n-iter 5",
    "enorm-cifar10-conv-c1.1": "--dataset cifar10 --model-type conv --enorm 1.1 --epochs 128 --lr 0.05 --weight-decay 1e-3 --momentum 0.9 --n-iter 5",
}


def parse(command):
    args = cifar.build_parser().parse_args(shlex.split(command))
    given, preset = cifar.config_from_args(args)
    return args, config_lib.resolve(cifar.merge(given, preset))


@pytest.mark.parametrize("preset", sorted(RBN_COMMANDS))
def test_rbn_command_lines_run_as_written(preset):
    _, cfg = parse(RBN_COMMANDS[preset])
    diff = config_lib.differing_keys(config_lib.resolve(configs.get(preset)), cfg)
    # The SGD command has no --grassmann (RBN's switch for the manifold rule),
    # which only changes the measured groups of a plain-SGD run.
    assert diff == (["labels"] if preset.endswith("-sgd") else [])
    if "num_gpus" in RBN_COMMANDS[preset]:
        assert (cfg["num_devices"], cfg["eval_batch_size"]) == (2, 200)


def test_srt_and_enorm_command_lines_run_as_written():
    _, cfg = parse(SRT_COMMAND)
    assert cfg == config_lib.resolve(configs.get("srt-cifar100-resnet18-adamsrt"))
    for preset, command in ENORM_COMMANDS.items():
        args, cfg = parse(command)
        assert args.n_iter == 5
        assert cfg == config_lib.resolve(configs.get(preset)), preset
    args, cfg = parse(RBN_TEST_COMMAND)
    assert args.task == "test" and args.load.endswith("model.ckpt-78124")
    assert cfg["model"] == "wrn-40-10" and cfg["dataset"] == "cifar100"


def test_dash_and_underscore_spellings_parse_alike():
    _, a = parse("--dataset=digits --lr-manifold 0.03 --batch-size 32 --log-every 5")
    _, b = parse("--dataset=digits --lr_manifold=0.03 --batch_size=32 --log_every=5")
    assert a == b and (a["lr_manifold"], a["batch_size"], a["log_every"]) == (
        0.03,
        32,
        5,
    )


def test_weight_decay_of_a_one_decay_preset_sets_every_group():
    _, cfg = parse("--preset=srt-cifar10-resnet20-sgd --weight_decay=1e-4")
    assert cfg["bias_decay"] == cfg["gamma_decay"] == cfg["manifold_decay"] == 1e-4
    _, cfg = parse("--preset=rbn-cifar10-wrn-28-10-sgdg --weightDecay=1e-4")
    assert cfg["weight_decay"] == 1e-4 and cfg["bias_decay"] == 0.0


# --------------------------------------------------------------------------------------
# The optimizer table
# --------------------------------------------------------------------------------------


def test_optimizer_table_defaults_and_validation():
    assert optimizers.names() == [
        "sgd",
        "sgdg",
        "adamg",
        "adams",
        "adamsrt",
        "sgdmrt",
        "adam",
        "adamw",
        "adamp",
        "sgdp",
        "nero",
        "rotational-adamw",
        "rotational-sgdm",
        "cayley-sgd",
        "cayley-adam",
        "manifold-muon",
        "hyperspherical",
    ]
    # the defaults of the AdamP and Nero papers (docs/algorithms.md#sgdp-and-adamp, #nero)
    assert optimizers.resolve_hyper("adamp", {}) == {
        "lr": 1e-3,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "delta": 0.1,
        "wd_ratio": 0.1,
        "nesterov": False,
    }
    assert optimizers.resolve_hyper("nero", {}) == {"lr": 0.01, "b2": 0.999}
    assert set(optimizers.group_decays("nero", {}).values()) == {0.0}
    help_text = config_lib.KEYS["optimizer"][1]
    assert all(name in help_text for name in optimizers.names())
    assert optimizers.resolve_hyper("sgdg", {"lr_manifold": 0.3}) == {
        "lr": 0.01,
        "momentum": 0.9,
        "grad_clip": 0.1,
        "omega": 0.1,
        "lr_manifold": 0.3,
        "nesterov": True,
    }
    with pytest.raises(ValueError, match="omega does not apply to optimizer 'adam'"):
        optimizers.resolve_hyper("adam", {"omega": 0.1})
    with pytest.raises(ValueError, match="valid optimizers: sgd, sgdg"):
        optimizers.lookup("rmsprop")
    with pytest.raises(ValueError, match="manifold_decay must be 0"):
        optimizers.group_decays("sgdg", {"manifold_decay": 1e-4})
    decays = optimizers.group_decays("sgdg", {})
    assert decays == {
        "manifold": 0.0,
        "kernel": 5e-4,
        "bias": 0.0,
        "gamma": 0.0,
        "beta": 0.0,
    }
    assert optimizers.group_decays("adamw", {})["bias"] == 0.01


def test_adding_an_optimizer_is_one_entry(monkeypatch):
    import optax

    entry = optimizers.OptimizerEntry(
        "lion",
        lambda lr, *, b1: optax.lion(lr, b1=b1, weight_decay=0.0),
        {"b1": 0.9},
        lr=1e-4,
    )
    monkeypatch.setitem(optimizers.OPTIMIZERS, "lion", entry)
    cfg = config_lib.resolve({"dataset": "digits", "optimizer": "lion"})
    assert (cfg["lr"], cfg["b1"]) == (1e-4, 0.9)
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "bn": {"bias": jnp.ones(4)}}
    labels = {"conv": {"kernel": "manifold"}, "bn": {"bias": "euclidean"}}
    tx = optimizers.build("lion", {"lr": 1e-4, "b1": 0.9}, labels)
    updates, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_allclose(updates["bn"]["bias"], -1e-4 * np.ones(4), rtol=1e-6)


def test_hybrid_builds_match_the_papers_halves():
    """sgdg = hybrid(riemax.sgdg, Nesterov SGD) with coupled L2 on the Euclidean
    kernels only; adamsrt's companion is Adam (element-wise) with the same lr."""
    import optax

    import riemax

    rng = np.random.default_rng(0)
    params = {
        "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32)},
        "fc": {
            "kernel": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(3), jnp.float32),
        },
    }
    grads = jax_tree_map(lambda p: 0.1 * jnp.ones_like(p), params)
    labels = {
        "conv": {"kernel": "manifold"},
        "fc": {"kernel": "euclidean", "bias": "euclidean"},
    }
    groups = optimizers.param_groups(params, labels, set())
    assert groups == {
        "conv": {"kernel": "manifold"},
        "fc": {"kernel": "kernel", "bias": "bias"},
    }
    decay = optimizers.decay_tree(groups, optimizers.group_decays("sgdg", {}))
    hyper = optimizers.resolve_hyper("sgdg", {})
    tx = optimizers.build("sgdg", hyper, labels, decay=decay)
    got, _ = tx.update(grads, tx.init(params), params)
    ref_tx = riemax.hybrid(
        riemax.sgdg(0.2, 0.9, 0.1, 0.1),
        optax.sgd(0.01, momentum=0.9, nesterov=True),
        labels,
    )
    g = {
        **grads,
        "fc": {
            **grads["fc"],
            "kernel": grads["fc"]["kernel"] + 5e-4 * params["fc"]["kernel"],
        },
    }
    want, _ = ref_tx.update(g, ref_tx.init(params), params)
    for a, b in zip(jax_leaves(got), jax_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)

    tx = optimizers.build("adamsrt", optimizers.resolve_hyper("adamsrt", {}), labels)
    got, _ = tx.update(grads, tx.init(params), params)
    adam = optax.adam(1e-3)
    want, _ = adam.update(grads["fc"], adam.init(params["fc"]), params["fc"])
    np.testing.assert_allclose(got["fc"]["bias"], want["bias"], rtol=1e-6)


def test_srt_with_one_decay_adds_it_inside_the_step():
    """AdamS/AdamSRT with one coupled decay on every leaf, which the runner
    gives to the step itself: the state keeps the structure of the decay in
    front, and the updates are those of the decay in front. (That the decayed
    gradient is then not stored: test_lowering.py,
    test_no_kernel_sized_temporary_in_the_sums[adamsrt-runner].)"""
    import jax
    import optax

    import riemax
    from experiments.optimizers.groups import add_decay

    params = {
        "conv": {"kernel": jnp.arange(24.0).reshape(2, 3, 4) / 10 - 1},
        "fc": {"bias": jnp.linspace(-1.0, 1.0, 4)},
    }
    labels = {"conv": {"kernel": "manifold"}, "fc": {"bias": "euclidean"}}
    decay = jax.tree.map(lambda _: 5e-4, params)
    for name in ("adams", "adamsrt"):
        hyper = optimizers.resolve_hyper(name, {})
        tx = optimizers.build(name, hyper, labels, decay=decay)
        entry = optimizers.lookup(name)
        fargs = {k: hyper[k] for k in entry.hyper}
        front = optax.chain(
            add_decay(decay),
            riemax.hybrid(
                entry.factory(hyper["lr"], **fargs),
                entry.factory(hyper["lr"], **fargs, channel_axes=None),
                labels,
            ),
        )
        state, ref_state = tx.init(params), front.init(params)
        assert jax.tree.structure(state) == jax.tree.structure(ref_state)
        assert isinstance(state[0], optax.EmptyState)
        p, q = params, params
        for k in range(3):
            grads = jax.tree.map(lambda x, k=k: jnp.cos(x * (k + 2)), p)
            u, state = tx.update(grads, state, p)
            v, ref_state = front.update(grads, ref_state, q)
            p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def jax_tree_map(fn, tree):
    import jax

    return jax.tree.map(fn, tree)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# --------------------------------------------------------------------------------------
# Config validation and the command line
# --------------------------------------------------------------------------------------

BAD = [
    ({"optimizer": "rmsprop"}, "valid values: sgd, sgdg, adamg"),
    ({"model": "resnet50"}, "valid names: vgg11"),
    ({"dataset": "mnist"}, "valid datasets: digits, cifar10"),
    ({"lr": -1.0}, "lr must be in"),
    ({"lr": float("nan")}, "lr must be finite"),
    ({"lr_manifold": float("nan")}, "lr_manifold must be finite"),
    ({"batch_size": 0}, "batch_size must be in"),
    ({"log_every": 0}, "log_every must be in"),
    ({"momentum": 1.0}, "momentum must be in"),
    ({"stpes": 3}, "unknown config key"),
    ({"omega": 0.1, "optimizer": "adam"}, "omega does not apply"),
    ({"checkpoint_every": 30, "log_every": 25}, "multiple of log_every"),
    ({"select_best": True}, "select_best needs a validation split"),
    ({"bn_per_device": True, "parallel": "sharded"}, "bn_per_device needs"),
    ({"keep_prob": 0.0}, "keep_prob must be in"),
    ({"labels": "magic"}, "valid values: structural, paper, invariance"),
    ({"normalization": "fixed"}, "fixed normalization needs norm_mean"),
    ({"decay_epochs": [3, 1]}, "decay_epochs must be increasing"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m for _, m in BAD])
def test_bad_values_are_rejected_naming_the_key(bad, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_lib.resolve({"dataset": "digits"} | bad)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    workdir = tmp_path / "run"
    for argv in (
        ["--lr", "-1"],
        ["--batch_size", "0"],
        ["--log-every", "0"],
        ["--optimizer", "rmsprop"],
        ["--preset", "nope"],
        ["--learnRate", "0.1", "--lr", "0.2"],
        ["--model=resnet", "--depth=28"],
        ["--dataset", f"npz:{tmp_path / 'missing.npz'}"],
        ["--steps", "abc"],
    ):
        with pytest.raises(SystemExit) as exit_:
            cifar.main(["--workdir", str(workdir), "--dataset", "digits", *argv])
        assert exit_.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and "Traceback" not in "".join(err), argv
    assert not workdir.exists()


def test_help_shows_defaults_and_list_presets(capsys):
    with pytest.raises(SystemExit):
        cifar.main(["--help"])
    out = capsys.readouterr().out
    assert '[default: "sgdg"]' in out and "[default: 0.0]" in out
    assert "--learnRateG" in out and "(default: train)" in out
    cifar.main(["--list_presets"])
    out = capsys.readouterr().out
    assert "rbn-cifar10-wrn-28-10-sgdg" in out and "3.85 % test error" in out


def test_script_mode_help_starts_without_jax():
    """``experiments/cifar.py`` runs by its path from the repository root (as
    ``runpy`` runs it), and ``--help`` does not import jax (the first lines print
    at once)."""
    code = (
        "import runpy, sys; sys.argv = ['experiments/cifar.py', '--help'];\n"
        "try:\n    runpy.run_path('experiments/cifar.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('JAX_IMPORTED', 'jax' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "--preset" in out.stdout and "JAX_IMPORTED False" in out.stdout, out.stderr


def test_differing_keys_ignore_resumable_ones():
    a = config_lib.resolve({"dataset": "digits"})
    b = dict(a, lr=0.5, num_devices=2, progress=False)
    assert config_lib.differing_keys(a, b) == ["lr"]
    assert json.loads(json.dumps(a)) == a  # config.json round-trips


def test_cli_process_bad_input_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.digits",
            "--workdir",
            str(tmp_path / "w"),
            "--lr",
            "nan",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: lr must be finite, got nan"
    assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()
