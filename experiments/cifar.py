r"""Command line of the experiments: the papers' CIFAR-10/100 and SVHN runs (and the
offline digits job, and a user's npz arrays) on one training loop.

Run ``python -m experiments.cifar --help`` for every option with its default, and
``--list_presets`` for the papers' published configurations. Examples::

  # Cho & Lee's SGD-G on WRN-28-10 / CIFAR-10, data-parallel over every GPU
  python -m experiments.cifar --preset=rbn-cifar10-wrn-28-10-sgdg --workdir=runs/wrn

  # the paper's own command line, as written
  python -m experiments.cifar --workdir=runs/wrn --model=resnet --depth=28 \
      --widen_factor=10 --optimizer=sgdg --grassmann=True --learnRate=0.01 \
      --learnRateG=0.2 --omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 \
      --keep_prob=0.7 --data=cifar10

  # evaluate a checkpoint; compare optimizers; plot runs; prepare tfds data
  python -m experiments.cifar --task=test --load=runs/wrn
  python -m experiments.cifar --task=compare --dataset=digits --workdir=runs/cmp \
      --optimizers=sgd,sgdg,adamg --val_size=300 --train_size=300
  python -m experiments.cifar --task=plot --runs runs/a runs/b --out=runs/ab.png
  python -m experiments.cifar --task=prepare --dataset=cifar10

Tasks: ``train`` (default; resumes from the latest checkpoint in ``--workdir``),
``test``, ``compare``, ``plot``, ``prepare``. Bad input stops with one line and
exit status 2 before the workdir is touched; a non-finite loss stops with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import textwrap

if __package__ in (None, ""):  # run as ``python experiments/cifar.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Light modules only (no jax): the flags are checked before JAX is imported.
from experiments import config as config_lib  # noqa: E402
from experiments import console, monitor, optimizers, presets  # noqa: E402

TASKS = ("train", "test", "compare", "plot", "prepare")

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

say = console.status


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
    kind = config_lib.KEYS[key].kind
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
        raise config_lib.ConfigError(f"--{key}: {e}") from None


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
    prog: str = "python -m experiments.cifar", defaults: dict | None = None
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
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
    for key, entry in config_lib.KEYS.items():
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
            + (" (the manifold kernels of sgdg/adamg)" if key == "lr_manifold" else "")
            + (" (not the manifold kernels of sgdg/adamg)" if key == "lr" else ""),
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
    """The config overrides of the command line, and the preset it implies."""
    given: dict = {}
    for key in config_lib.KEYS:
        text = getattr(args, f"cfg_{key}")
        if text is not None:
            given[key] = parse_value(key, text)
    for alias, key in ALIASES.items():
        text = getattr(args, f"alias_{alias}")
        if text is not None:
            if key in given:
                raise config_lib.ConfigError(f"--{alias} and --{key} both given")
            given[key] = parse_value(key, text)
    if args.alias_data is not None:
        if "dataset" in given:
            raise config_lib.ConfigError("--data and --dataset both given")
        given["dataset"] = _DATA_NAMES.get(args.alias_data, args.alias_data)
    if args.alias_grassmann is not None:
        if parse_value("unit_init", args.alias_grassmann):
            given.setdefault("labels", "paper")
    model = given.get("model")
    if model == "resnet" and args.alias_dataloader is None:
        if args.alias_depth is None or args.alias_widen is None:
            raise config_lib.ConfigError(
                "--model=resnet needs --depth and --widen_factor"
            )
        given["model"] = f"wrn-{args.alias_depth}-{args.alias_widen}"
    elif args.alias_depth is not None or args.alias_widen is not None:
        raise config_lib.ConfigError("--depth/--widen_factor go with --model=resnet")

    preset = args.preset
    if args.alias_dataloader is not None:
        if preset:
            raise config_lib.ConfigError("--dataloader implies a preset; drop --preset")
        data = _DATA_NAMES.get(args.alias_dataloader, args.alias_dataloader)
        try:
            preset = presets.srt_name(
                data, given.pop("model", "resnet18"), given.pop("optimizer", "adamsrt")
            )
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from None
    if args.alias_model_type is not None:
        if preset:
            raise config_lib.ConfigError("--model-type implies a preset; drop --preset")
        try:
            preset = presets.enorm_name(args.alias_model_type, given.get("enorm", 0.0))
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from None
    return given, preset


def merge(given: dict, preset: str | None) -> dict:
    """Preset values under the command line's. With a preset whose groups are all
    decayed like the kernels (SRT, ENorm: one weight decay for every parameter), a
    given ``weight_decay`` sets the groups not given too."""
    if preset is None:
        return dict(given)
    try:
        base = presets.get(preset)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    groups = ("manifold_decay", "bias_decay", "gamma_decay", "beta_decay")
    if "weight_decay" in given and all(
        base.get(g) == base.get("weight_decay") for g in groups
    ):
        for g in groups:
            given.setdefault(g, given["weight_decay"])
    return base | given


# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------


def _train(cfg: dict, args) -> dict:
    from experiments import train

    if args.n_iter == 1:
        return train.train_and_evaluate(cfg, args.workdir, overwrite=args.overwrite)
    seed0 = cfg.get("seed", 0)
    results = []
    for k in range(args.n_iter):
        sub = os.path.join(args.workdir, f"seed_{seed0 + k}")
        say(f"run {k + 1}/{args.n_iter}: seed {seed0 + k} in {sub}")
        results.append(
            train.train_and_evaluate(
                cfg | {"seed": seed0 + k}, sub, overwrite=args.overwrite
            )
        )
    summary: dict = {"runs": results}
    for key in ("test_error", "best_test_error"):
        values = [r[key] for r in results if key in r]
        if values:
            summary[f"{key}_median"] = statistics.median(values)
            summary[f"{key}_mean"] = statistics.fmean(values)
            summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def main(
    argv: list[str] | None = None,
    prog: str = "python -m experiments.cifar",
    defaults: dict | None = None,
) -> dict | None:
    """Parses ``argv`` and runs the task; returns its result (also printed as one
    JSON line on stdout). Exits with status 2 on bad input, 1 on divergence."""
    parser = build_parser(prog, defaults)
    args = parser.parse_args(argv)
    args.command = shlex.join(
        [*prog.split(), *(sys.argv[1:] if argv is None else argv)]
    )
    if args.list_presets:
        for name in presets.names():
            print(f"{name:36s} {presets.describe(name)}")
        return None
    console.set_verbosity(args.verbosity)
    say(f"task {args.task}: resolving the config")
    try:
        given, preset = config_from_args(args)
        if defaults:
            given = defaults | given
        cfg = merge(given, preset)
        result = _run(args, cfg, preset)
    except (config_lib.ConfigError, ValueError) as e:
        if not _is_input_error(e):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(
            "interrupted; rerun the same command to resume from the last checkpoint",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(130) from None
    except monitor.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if result is not None:
        print(json.dumps(result, sort_keys=True, default=str), flush=True)
        stopped = [r for r in result.get("runs", [result]) if r.get("stopped_early")]
        if stopped:
            print(
                f"error: stopped early (stop_diverged): {stopped[0]['warning']}",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1)
    return result


def _is_input_error(e: Exception) -> bool:
    from experiments.data import DataError

    return isinstance(e, (config_lib.ConfigError, DataError))


def _run(args, cfg: dict, preset: str | None):
    if args.task == "prepare":
        from experiments import data

        name = cfg.get("dataset", config_lib.DEFAULT_CONFIG["dataset"])
        say(f"preparing {name} as ArrayRecord (downloads; needs TensorFlow)")
        where = data.prepare(name, cfg.get("data_dir"))
        say(f"prepared in {where}")
        return {"prepared": name, "data_dir": where}
    if args.task == "plot":
        from experiments import plots

        if not args.runs:
            raise config_lib.ConfigError("--task=plot needs --runs DIR [DIR ...]")
        out = args.out or os.path.join(args.workdir or ".", "runs.png")
        return {"plot": plots.plot_runs(args.runs, out)}
    if args.task == "test":
        from experiments import train

        if args.load is None:
            raise config_lib.ConfigError(
                "--task=test needs --load=WORKDIR_OR_CHECKPOINT"
            )
        machine = {k: v for k, v in cfg.items() if k in config_lib.RESUMABLE_KEYS}
        return train.evaluate_checkpoint(args.load, machine)
    if preset:
        say(f"preset {preset}: {presets.describe(preset)}")
    # Every value is checked here, before JAX is imported (seconds): a wrong flag
    # is reported at once.
    resolved = config_lib.resolve(cfg)
    say(
        "config: "
        + ", ".join(f"{k} {resolved[k]}" for k in _SUMMARY_KEYS if resolved.get(k))
        + " (the rest: --verbosity=1, and config.json)"
    )
    say("resolved config:\n" + json.dumps(resolved, indent=1, sort_keys=True), level=1)
    if args.task == "compare":
        if args.workdir is None:
            raise config_lib.ConfigError("--workdir is required to compare")
        names = [x for x in args.optimizers.split(",") if x]
        try:
            grid = [float(x) for x in args.lr_grid.split(",") if x]
        except ValueError:
            raise config_lib.ConfigError(
                f"--lr_grid must be comma-separated numbers, got {args.lr_grid!r}"
            ) from None
        from experiments import compare

        compare.check_arguments(names, args.seeds, grid, cfg)
        return compare.compare(
            cfg,
            args.workdir,
            optimizers=names,
            seeds=args.seeds,
            lr_grid=grid,
            command=args.command,
        )
    if args.workdir is None:
        raise config_lib.ConfigError("--workdir is required to train")
    if args.n_iter < 1:
        raise config_lib.ConfigError("--n_iter must be >= 1")
    from experiments import train  # imports jax (seconds)

    if resolved["multihost"]:
        train.MULTIHOST_ARGS.update(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    return _train(cfg, args)


# The values of the one-line config summary, in this order.
_SUMMARY_KEYS = (
    "dataset",
    "model",
    "optimizer",
    "lr",
    "lr_manifold",
    "schedule",
    "warmup_epochs",
    "batch_size",
    "steps",
    "epochs",
    "seed",
)


def _run_as_command() -> None:
    """``main()`` as a command-line tool: a reader that closes the pipe early
    (``--list_presets | head -3``) ends the program quietly, with status 0."""
    try:
        main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Further writes to the closed pipe (at interpreter exit) go nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    _run_as_command()
