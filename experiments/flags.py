"""The runner's flags, and the config they make: :func:`build_parser`,
:func:`config_from_args` (the values the flags give, and the config file they
start from) and :func:`merge` (the file's config under the flags).

Every config key is a flag (``--key`` and ``--key-with-dashes``; ``none`` means
derive it), and the papers' own command lines run as written: RBN-TF's
(``--learnRate``, ``--model=resnet --depth=28 --widen_factor=10``,
``--grassmann=True``, ...), SRT's (``--dataloader``) and ENorm's
(``--model-type``). Nothing here imports JAX: the flags are checked before JAX
is loaded.
"""

from __future__ import annotations

import argparse
import json
import textwrap

from experiments import configs, optimizers
from experiments.configs import default
from experiments.keys import KEYS, ConfigError

TASKS = ("train", "test", "compare", "plot", "prepare")
DESCRIPTION = (
    "The papers' CIFAR-10/100 and SVHN runs (and the offline digits job, and "
    "your own npz arrays) on one training loop."
)

# The papers' flag names (RBN-TF train.py, SRT training.py, ENorm main.py) that
# map one-to-one onto config keys.
ALIASES = {
    "learnRate": "lr",
    "learnRateG": "lr_manifold",
    "weightDecay": "weight_decay",
    "biasDecay": "bias_decay",
    "gammaDecay": "gamma_decay",
    "betaDecay": "beta_decay",
    "learnRateDecay": "decay_factor",
    "vali_batch_size": "eval_batch_size",
    "num_gpus": "num_devices",
    "max_epoch": "epochs",
}
_DATA_NAMES = {"svhn": "svhn_cropped"}


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "t", "yes", "y", "on"):
        return True
    if low in ("0", "false", "f", "no", "n", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _number(text: str, integer: bool):
    value = float(text)
    if integer:
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {text!r}")
        return int(value)
    return int(value) if text.strip().lstrip("-").isdigit() else value


def parse_value(key: str, text: str):
    """A config value from its command-line text (``none`` is ``None``), parsed
    as the key's kind in :data:`experiments.config.KEYS`."""
    if text.strip().lower() in ("none", "null"):
        return None
    kind = KEYS[key].kind
    try:
        if kind == "bool":
            return _bool(text)
        if kind == "list":
            parts = [p for p in text.replace(" ", "").split(",") if p]
            return [_number(p, False) for p in parts]
        if kind == "int":
            return _number(text, True)
        if kind == "str":
            return text
        if kind == "int|epoch":
            return text if text == "epoch" else _number(text, True)
        return _number(text, False)
    except ValueError as e:
        raise ConfigError(f"--{key}: {e}") from None


# --------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------


class _Formatter(
    argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter
):
    def _get_help_string(self, action):
        text = action.help or ""
        if "[default:" in text or action.default is None:
            return text  # config options show their own (derived) defaults
        return super()._get_help_string(action)


def _epilog() -> str:
    aliases = (
        "Aliases of the papers' flags: "
        + ", ".join(f"--{a} (--{k})" for a, k in ALIASES.items())
        + ", --data (--dataset), --dataloader (SRT: its preset), --model-type "
        "(ENorm: its preset), --depth/--widen_factor (--model=resnet), "
        "--grassmann=True (--labels=paper)."
    )
    rates = "\n".join(
        textwrap.fill(line, 88, initial_indent="  ", subsequent_indent="      ")
        for line in optimizers.learning_rate_help()
    )
    return (
        "learning rates (which flag sets which parameters' rate; --schedule and\n"
        "--warmup_epochs apply to every rate):\n"
        + rates
        + "\n\n"
        + textwrap.fill(
            "Config options: a value 'none' means derive it (dataset, optimizer "
            "table or data). " + aliases,
            88,
        )
    )


def build_parser(
    prog: str = "python -m experiments.main", defaults: dict | None = None
) -> argparse.ArgumentParser:
    """The runner's flags: the run's (task, workdir, ``--config``, ...), one per
    config key (its help and default from :data:`experiments.keys.KEYS`), and
    the papers' own flag names. ``defaults`` are the program's own defaults
    (``experiments.digits``: the digits dataset), shown by ``--help``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=DESCRIPTION,
        epilog=_epilog(),
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    run = p.add_argument_group("run")
    run.add_argument("--task", default="train", choices=TASKS, help="what to do")
    run.add_argument(
        "--workdir", default=None, help="output directory (train, compare)"
    )
    run.add_argument(
        "--config",
        default=None,
        help="a config file (PATH.py, or PATH.py:ARG for the papers' "
        "experiments/configs/rbn.py, srt.py, enorm.py), a file of "
        "experiments/configs by name (default, smoke, rbn:ARG) or a preset; "
        "the flags override its values (default: experiments/configs/default.py)",
    )
    run.add_argument(
        "--preset", default=None, help="a paper preset (see --list_presets)"
    )
    run.add_argument(
        "--list_presets", action="store_true", help="list the presets and exit"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the run already in --workdir and start afresh",
    )
    run.add_argument(
        "--load", default=None, help="--task=test: a workdir or checkpoint"
    )
    run.add_argument("--runs", nargs="+", default=None, help="--task=plot: run dirs")
    run.add_argument("--out", default=None, help="--task=plot: PNG path")
    run.add_argument(
        "--n_iter", "--n-iter", type=int, default=1, help="train seeds seed..seed+N-1"
    )
    run.add_argument(
        "--compile_cache",
        "--compile-cache",
        default="auto",
        metavar="DIR",
        help="JAX's persistent compilation cache, so that a resumed or repeated "
        "run (another seed, --task=compare) reuses the compiled train step: auto "
        "(WORKDIR/compile_cache, or $JAX_COMPILATION_CACHE_DIR where set), a "
        "directory, or none",
    )
    run.add_argument(
        "--verbosity",
        type=int,
        default=0,
        choices=(-1, 0, 1, 2),
        help="-1: warnings only; 0: progress lines; 1: also the full config, the "
        "full manifold split and the libraries' INFO logs; 2: their DEBUG logs",
    )
    cmp_ = p.add_argument_group("compare")
    cmp_.add_argument(
        "--optimizers", default="sgd,sgdg,adamg", help="comma-separated optimizers"
    )
    cmp_.add_argument("--seeds", type=int, default=3, help="seeds per optimizer")
    cmp_.add_argument(
        "--lr_grid",
        default="0.25,0.5,1,2,4",
        help="multipliers of each optimizer's learning rate(s)",
    )
    multi = p.add_argument_group("multi-host (with --multihost=true)")
    multi.add_argument("--coordinator_address", default=None, help="host:port")
    multi.add_argument("--num_processes", type=int, default=None)
    multi.add_argument("--process_id", type=int, default=None)

    conf = p.add_argument_group("config (every value is saved in config.json)")
    for key, entry in KEYS.items():
        default, text = entry.default, entry.help
        names = [f"--{key}"]
        if "_" in key:
            names.append(f"--{key.replace('_', '-')}")
        default = (defaults or {}).get(key, default)
        shown = "derived" if default is None else json.dumps(default)
        kw = {"nargs": "?", "const": "true"} if entry.kind == "bool" else {}
        conf.add_argument(
            *names,
            dest=f"cfg_{key}",
            default=None,
            metavar="V",
            help=f"{text} [default: {shown}]",
            **kw,
        )
    paper = p.add_argument_group("the papers' flag names")
    for alias, key in ALIASES.items():
        paper.add_argument(
            f"--{alias}",
            dest=f"alias_{alias}",
            default=None,
            metavar="V",
            help=f"= --{key}"
            + (
                " (the manifold kernels of the hybrids with two rates)"
                if key == "lr_manifold"
                else ""
            )
            + (
                " (not the manifold kernels of the hybrids with two rates)"
                if key == "lr"
                else ""
            ),
        )
    paper.add_argument(
        "--data",
        dest="alias_data",
        default=None,
        metavar="V",
        help="= --dataset (svhn: svhn_cropped)",
    )
    paper.add_argument(
        "--dataloader",
        dest="alias_dataloader",
        default=None,
        metavar="V",
        help="SRT: dataset, and its preset for --model/--optimizer",
    )
    paper.add_argument(
        "--model-type",
        "--model_type",
        dest="alias_model_type",
        default=None,
        metavar="V",
        help="ENorm: linear or conv preset",
    )
    paper.add_argument(
        "--depth",
        dest="alias_depth",
        default=None,
        type=int,
        help="RBN: --model=resnet depth",
    )
    paper.add_argument(
        "--widen_factor",
        dest="alias_widen",
        default=None,
        type=int,
        help="RBN: --model=resnet width",
    )
    paper.add_argument(
        "--grassmann",
        dest="alias_grassmann",
        default=None,
        metavar="V",
        help="RBN: True means --labels=paper",
    )
    return p


def config_from_args(args: argparse.Namespace) -> tuple[dict, str | None]:
    """The config values that the flags give, and the config file (a
    :func:`experiments.configs.load` spec) that they start from: ``--config``,
    ``--preset``, or the preset implied by the papers' ``--dataloader`` (SRT)
    and ``--model-type`` (ENorm); ``None`` for the default config."""
    given: dict = {}
    for key in KEYS:
        text = getattr(args, f"cfg_{key}")
        if text is not None:
            given[key] = parse_value(key, text)
    for alias, key in ALIASES.items():
        text = getattr(args, f"alias_{alias}")
        if text is not None:
            if key in given:
                raise ConfigError(f"--{alias} and --{key} both given")
            given[key] = parse_value(key, text)
    if args.alias_data is not None:
        if "dataset" in given:
            raise ConfigError("--data and --dataset both given")
        given["dataset"] = _DATA_NAMES.get(args.alias_data, args.alias_data)
    if args.alias_grassmann is not None:
        if parse_value("unit_init", args.alias_grassmann):
            given.setdefault("labels", "paper")
    model = given.get("model")
    if model == "resnet" and args.alias_dataloader is None:
        if args.alias_depth is None or args.alias_widen is None:
            raise ConfigError("--model=resnet needs --depth and --widen_factor")
        given["model"] = f"wrn-{args.alias_depth}-{args.alias_widen}"
    elif args.alias_depth is not None or args.alias_widen is not None:
        raise ConfigError("--depth/--widen_factor go with --model=resnet")

    if args.config and args.preset:
        raise ConfigError("--config and --preset both given; keep one")
    if args.preset:
        configs.describe(args.preset)  # an unknown preset lists the valid ones
    spec = args.config or args.preset
    if args.alias_dataloader is not None:
        if spec:
            raise ConfigError("--dataloader implies a preset; drop --preset/--config")
        data = _DATA_NAMES.get(args.alias_dataloader, args.alias_dataloader)
        spec = configs.srt_name(
            data, given.pop("model", "resnet18"), given.pop("optimizer", "adamsrt")
        )
    if args.alias_model_type is not None:
        if spec:
            raise ConfigError("--model-type implies a preset; drop --preset/--config")
        spec = configs.enorm_name(args.alias_model_type)
    return given, spec


def merge(given: dict, spec: str | None) -> dict:
    """The config that the flags ``given`` make over the config file ``spec``
    (:func:`experiments.configs.load`; ``None``: the default config). Over a
    config whose groups are all decayed like the kernels (SRT, ENorm: one weight
    decay for every parameter), a given ``weight_decay`` sets the groups not
    given too."""
    base = configs.load(spec)[0] if spec else default.get_config()
    groups = ("manifold_decay", "bias_decay", "gamma_decay", "beta_decay")
    decay = base.get("weight_decay")
    if (
        "weight_decay" in given
        and decay is not None
        and all(base.get(g) == decay for g in groups)
    ):
        for g in groups:
            given.setdefault(g, given["weight_decay"])
    return base | given


def command_config(
    args: argparse.Namespace, defaults: dict | None = None
) -> tuple[dict, str | None, dict]:
    """What a command line asks for: the values its flags give (over the
    program's ``defaults``), the config file it starts from, and the config they
    make (:func:`merge`; not resolved yet)."""
    given, spec = config_from_args(args)
    given = (defaults or {}) | given
    return given, spec, merge(given, spec)
