"""Configs as code (experiments/configs/) and the command line that names them.

The central test: every preset and a list of old command lines (the papers' own
flag names included) resolve to exactly the configs that the runner resolved
before it moved to config files, ``experiments/main.py`` and
``experiments/flags.py``. Those configs are stored in
``tests/reference/resolved_configs.json``: they were written by the code of
commit daad970 (``experiments/presets.py`` and ``experiments/cifar.py``), each
as a shared base with the keys that differ from it.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import subprocess
import sys

import pytest

from experiments import config as config_lib
from experiments import configs, flags
from experiments.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = json.loads(
    (ROOT / "tests" / "reference" / "resolved_configs.json").read_text()
)
PROGS = {
    "cifar": "python -m experiments.cifar",
    "digits": "python -m experiments.digits",
}
PROG_DEFAULTS = {"cifar": None, "digits": {"dataset": "digits"}}


def before(diff: dict) -> dict:
    """A stored config: the base with the keys of ``diff`` replaced."""
    return GOLDEN["base"] | diff


def command(prog: str, line: str):
    """The arguments and the resolved config of a command line, on the path
    ``experiments.main`` takes."""
    args = flags.build_parser(PROGS[prog], PROG_DEFAULTS[prog]).parse_args(
        shlex.split(line)
    )
    _, spec, config = flags.command_config(args, PROG_DEFAULTS[prog])
    return args, spec, config_lib.resolve(config)


def test_the_presets_are_those_of_before():
    assert sorted(configs.names()) == sorted(GOLDEN["presets"])
    assert len(configs.names()) == 36 + 42 + 4


@pytest.mark.parametrize("name", sorted(GOLDEN["presets"]))
def test_every_preset_resolves_as_before_by_every_spelling(name):
    expected = before(GOLDEN["presets"][name])
    family, arg = name.split("-", 1)
    spellings = {
        "get": configs.get(name),
        "file": configs.load(f"experiments/configs/{family}.py:{arg}")[0],
        "name": configs.load(f"{family}:{arg}")[0],
    }
    for how, cfg in spellings.items():
        assert config_lib.resolve(cfg) == expected, how
    for line in (f"--preset={name}", f"--config={name}"):
        _, spec, cfg = command("cifar", line)
        assert spec == name and cfg == expected, line
    # A resolved config resolves to itself (main resolves once and hands it on).
    assert config_lib.resolve(expected) == expected


@pytest.mark.parametrize(
    "prog,line,old", GOLDEN["commands"], ids=[c[1][:60] for c in GOLDEN["commands"]]
)
def test_old_command_lines_resolve_as_before(prog, line, old):
    args, spec, cfg = command(prog, line)
    assert spec == old["preset"]
    assert (args.task, args.workdir, args.n_iter, args.load) == (
        old["task"],
        old["workdir"],
        old["n_iter"],
        old["load"],
    )
    expected = before(old["config"])
    assert config_lib.differing_keys(cfg, expected) == [] and cfg == expected
    assert config_lib.resolve(cfg) == cfg


def test_config_files_name_their_source_and_start_from_the_default():
    default = configs.load("experiments/configs/default.py")[0]
    assert set(default) == set(config_lib.KEYS)
    for family, source in (
        ("rbn", "RBN-TF repository's README"),
        ("srt", "best_hyper_parameters.py"),
        ("enorm", "ENorm repository's README"),
    ):
        module = configs._family(family)
        assert source in " ".join(module.__doc__.split()), family
        for arg in module.cells():
            assert set(module.get_config(arg)) == set(config_lib.KEYS)
    # --config is a base: flags override it, a one-decay config passes a given
    # weight_decay to every group (as --preset did).
    _, _, cfg = command(
        "cifar", "--config=experiments/configs/srt.py:cifar10-resnet20-sgd --lr=0.05"
    )
    assert (cfg["lr"], cfg["weight_decay"]) == (0.05, 2.5e-4)
    _, _, cfg = command(
        "cifar", "--config=srt:cifar10-resnet20-sgd --weight_decay=1e-4"
    )
    assert cfg["bias_decay"] == cfg["manifold_decay"] == 1e-4


def test_a_config_file_of_ones_own(tmp_path):
    mine = tmp_path / "mine.py"
    mine.write_text(
        '"""My digits run."""\n'
        "from experiments.configs import default\n\n\n"
        "def get_config(width='8'):\n"
        "    return default.get_config() | {'dataset': 'digits', "
        "'widths': [4, int(width)]}\n"
    )
    cfg, about = configs.load(str(mine))
    assert about == "My digits run." and cfg["widths"] == [4, 8]
    _, spec, resolved = command("digits", f"--config={mine}:16 --steps=3")
    assert spec == f"{mine}:16"
    assert (resolved["widths"], resolved["steps"]) == ([4, 16], 3)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nope", "unknown --config 'nope'"),
        ("rbn-cifar10-resnet50-sgd", "valid presets (--list_presets): rbn-cifar10"),
        ("rbn", "rbn.py takes a cell DATA-MODEL-OPTIMIZER, got None"),
        ("rbn:cifar10-wrn-28-10", "valid: cifar10-vgg13-sgd"),
        ("experiments/configs/missing.py", "no file experiments/configs/missing.py"),
        ("default:x", "--config default:x:"),
    ],
)
def test_bad_config_specs_are_one_clear_error(spec, message):
    with pytest.raises(ConfigError) as e:
        configs.load(spec)
    assert message in str(e.value)


def test_conflicting_config_flags_are_refused():
    parser = flags.build_parser()
    for line, message in (
        ("--config=smoke --preset=rbn-cifar10-wrn-28-10-sgdg", "both given"),
        ("--config=smoke --dataloader=cifar10", "implies a preset"),
        ("--preset=nope", "unknown preset 'nope'"),
    ):
        with pytest.raises(ConfigError, match=message):
            flags.config_from_args(parser.parse_args(shlex.split(line)))


def test_main_runs_the_smoke_config_with_jax_loaded_only_after_the_flags(tmp_path):
    """``python -m experiments.main --config=...``: a bad flag is refused before
    JAX is imported, the smoke config trains (4 steps) and writes its metrics."""
    code = (
        "import sys\n"
        "from experiments import main\n"
        "try:\n"
        "    main.main(['--config=smoke', '--workdir', sys.argv[1], '--lr=-1'])\n"
        "except SystemExit as e:\n"
        "    print('EXIT', e.code, 'jax' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "bad")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "EXIT 2 False" in proc.stdout, proc.stderr
    from helpers import fast_compile

    from experiments import main

    with fast_compile():
        result = main.main(
            [
                f"--config={ROOT}/experiments/configs/smoke.py",
                "--workdir",
                str(tmp_path),
            ]
        )
    assert result["step"] == 4 and result["test_error"] <= 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["split"] for x in lines][-1] == "test"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["widths"] == [4, 8] and saved["dataset"] == "digits"
