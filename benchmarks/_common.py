"""Shared pieces of the benchmarks: optimizers, parameter trees, interleaved timing,
markdown tables and the machine header.

Timing protocol (:func:`time_interleaved`): every candidate and its baseline live in
the same process, each with its own jitted step and its own (donated) state. After
warm-up (the first call compiles) each stepper is calibrated to run ``inner``
consecutive steps per repetition (so that one repetition lasts at least
``min_rep_s``), then the repetitions are *interleaved*: repetition ``r`` runs every
stepper once, in forward order for even ``r`` and in reverse order for odd ``r``
(ABBA...), so slow drifts of the machine's load hit candidates and baselines alike.
The reported time is the median over repetitions of the per-step time; the ratio is
``median(candidate) / median(baseline)``, and the per-repetition ratios (candidate
and baseline measured next to each other) give its min..max range.

Absolute times depend on the machine; only the ratios are meant to be compared.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import riemax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# experiments/ is not an installed package: make the repository root importable.
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# --------------------------------------------------------------------------------------
# Optimizers (the papers' hybrids and the optax baselines)
# --------------------------------------------------------------------------------------

# Manifold learning rates: RBN's CIFAR values for sgdg/adamg, SRT's for the others
# (the same as experiments/digits.py). They do not change the cost of a step.
MANIFOLD_LR = {
    "sgdg": 0.2,
    "adamg": 0.05,
    "adamsrt": 1e-3,
    "adams": 1e-3,
    "sgdmrt": 0.1,
}
EUCLIDEAN_LR = 0.01
WEIGHT_DECAY = 5e-4
BASELINE_SGD_LR = 0.1
BASELINE_ADAM_LR = 1e-3

#: Which optax baseline each riemax optimizer is compared with.
BASELINE_OF = {
    "sgdg": "sgd",
    "sgdmrt": "sgd",
    "adamg": "adam",
    "adamsrt": "adam",
    "adams": "adam",
}


def manifold_tx(name: str, omega: float | None = None) -> optax.GradientTransformation:
    """The riemax optimizer ``name`` with its paper's learning rate.

    ``omega`` (``sgdg``/``adamg`` only) overrides the orthogonality weight (``None``:
    riemax's default, 0.1).
    """
    lr = MANIFOLD_LR[name]
    kw = {} if omega is None else {"omega": omega}
    if name == "sgdg":
        return riemax.sgdg(lr, momentum=0.9, **kw)
    if name == "adamg":
        return riemax.adamg(lr, **kw)
    if kw:
        raise ValueError(f"omega only applies to sgdg/adamg, not {name}")
    if name == "adamsrt":
        return riemax.adamsrt(lr, weight_decay=WEIGHT_DECAY)
    if name == "adams":
        return riemax.adams(lr, weight_decay=WEIGHT_DECAY)
    if name == "sgdmrt":
        return riemax.sgdmrt(lr, momentum=0.9, weight_decay=WEIGHT_DECAY)
    raise ValueError(f"unknown riemax optimizer {name!r}")


def euclidean_tx() -> optax.GradientTransformation:
    """The Euclidean half of the hybrids: coupled L2, then Nesterov SGD (RBN-TF)."""
    return optax.chain(
        optax.add_decayed_weights(WEIGHT_DECAY),
        optax.sgd(EUCLIDEAN_LR, momentum=0.9, nesterov=True),
    )


def hybrid_tx(
    name: str, labels: Any, omega: float | None = None
) -> optax.GradientTransformation:
    """``riemax.hybrid(manifold_tx(name), euclidean_tx(), labels)``."""
    return riemax.hybrid(manifold_tx(name, omega), euclidean_tx(), labels)


def baseline_tx(kind: str) -> optax.GradientTransformation:
    """``"sgd"``: Nesterov momentum SGD, ``"adam"``: Adam; both on the whole tree."""
    if kind == "sgd":
        return optax.sgd(BASELINE_SGD_LR, momentum=0.9, nesterov=True)
    if kind == "adam":
        return optax.adam(BASELINE_ADAM_LR)
    raise ValueError(f"unknown baseline {kind!r}")


BASELINE_DESCRIPTION = {
    "sgd": f"optax.sgd({BASELINE_SGD_LR}, momentum=0.9, nesterov=True)",
    "adam": f"optax.adam({BASELINE_ADAM_LR})",
}


@dataclass(frozen=True)
class OptRow:
    """One candidate row: a display name, the baseline kind and a builder
    ``labels -> GradientTransformation``."""

    name: str
    baseline: str
    build: Callable[[Any], optax.GradientTransformation]


def candidate_rows(
    *, omega_zero: bool = True, whole_tree: bool = True, names: Sequence[str] = ()
) -> list[OptRow]:
    """The riemax rows: each optimizer in its hybrid, ``sgdg``/``adamg`` also with
    ``omega=0``, the SRT ones also on the whole tree."""
    names = tuple(names) or ("sgdg", "adamg", "adamsrt", "sgdmrt")
    rows = []
    for name in names:
        base = BASELINE_OF[name]
        rows.append(
            OptRow(f"{name} (hybrid)", base, lambda lab, n=name: hybrid_tx(n, lab))
        )
        if omega_zero and name in ("sgdg", "adamg"):
            rows.append(
                OptRow(
                    f"{name} omega=0 (hybrid)",
                    base,
                    lambda lab, n=name: hybrid_tx(n, lab, omega=0.0),
                )
            )
        if whole_tree and name in ("adamsrt", "sgdmrt", "adams"):
            rows.append(
                OptRow(f"{name} (whole tree)", base, lambda lab, n=name: manifold_tx(n))
            )
    return rows


def baseline_rows(kinds: Sequence[str] = ("sgd", "adam")) -> list[OptRow]:
    return [OptRow(f"{k} (optax)", k, lambda lab, k=k: baseline_tx(k)) for k in kinds]


# --------------------------------------------------------------------------------------
# Parameter trees
# --------------------------------------------------------------------------------------


def manifold_mask(labels: Any) -> Any:
    return jax.tree.map(lambda lab: lab == riemax.MANIFOLD, labels)


def unit_normalize(w: jax.Array) -> jax.Array:
    """``w`` with every unit ``w[..., j]`` scaled to norm one."""
    norms = jnp.sqrt(jnp.sum(jnp.square(w.reshape(-1, w.shape[-1])), axis=0))
    return w / (norms + 1e-8)


def normalize_manifold(params: Any, labels: Any) -> Any:
    """Manifold kernels scaled to unit-norm units (RBN's initialisation for
    ``sgdg``/``adamg``); other leaves unchanged."""
    return jax.tree.map(
        lambda w, lab: unit_normalize(w) if lab == riemax.MANIFOLD else w,
        params,
        labels,
    )


def random_params_and_grads(shapes: Any, labels: Any, seed: int = 0) -> tuple[Any, Any]:
    """Random parameters (manifold kernels with unit-norm units) and gradients with
    the structure of ``shapes`` (a tree of ``jax.ShapeDtypeStruct``).

    Drawn with NumPy: ``jax.random`` under jit compiles slowly for many leaves."""
    rng = np.random.default_rng(seed)

    def param(s, lab):
        w = rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.05)
        if lab == riemax.MANIFOLD:
            flat = w.reshape(-1, s.shape[-1])
            w = w / (np.sqrt(np.einsum("ij,ij->j", flat, flat)) + np.float32(1e-8))
        return jnp.asarray(w, s.dtype)

    def grad(s):
        g = rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.01)
        return jnp.asarray(g, s.dtype)

    return jax.tree.map(param, shapes, labels), jax.tree.map(grad, shapes)


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves (arrays or ``jax.ShapeDtypeStruct``)."""
    return sum(
        math.prod(x.shape) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
        if hasattr(x, "shape") and hasattr(x, "dtype")
    )


def tree_arrays(tree: Any) -> int:
    return sum(1 for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def all_finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def make_optimizer_step(tx: optax.GradientTransformation) -> Callable:
    """The optimizer-only step ``((params, opt_state), grads) -> ((params,
    opt_state), None)``: ``tx.update`` then ``optax.apply_updates``, jitted with the
    params/state buffers donated."""

    def step(state, grads):
        params, opt_state = state
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    return jax.jit(step, donate_argnums=0)


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


class Stepper:
    """A jitted ``fn(state, *consts) -> (state, aux)`` with its own state.

    ``run(n)`` performs ``n`` steps (the state is threaded and donated) and returns
    the wall time per step, waiting for the results.
    """

    def __init__(self, name: str, fn: Callable, state: Any, consts: Sequence[Any] = ()):
        self.name = name
        self.fn = fn
        self.state = state
        self.consts = tuple(consts)
        self.aux: Any = None
        self.inner = 1
        self.times: list[float] = []

    def run(self, n: int = 1) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.state, self.aux = self.fn(self.state, *self.consts)
        jax.block_until_ready((self.state, self.aux))
        return (time.perf_counter() - start) / n

    def finite(self) -> bool:
        return all_finite((self.state, self.aux))

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def time_interleaved(
    steppers: Sequence[Stepper],
    *,
    reps: int,
    warmup: int = 1,
    min_rep_s: float = 0.0,
    max_inner: int = 200,
    log: Callable[[str], None] | None = print,
) -> None:
    """Fills ``stepper.times`` (seconds per step, one entry per repetition).

    Warm-up runs ``warmup`` single steps per stepper (the first one compiles), then
    one more to calibrate ``inner`` (steps per repetition, so that a repetition lasts
    at least ``min_rep_s``), then ``reps`` interleaved repetitions in ABBA order.
    """
    for s in steppers:
        start = time.perf_counter()
        for _ in range(max(warmup, 1)):
            s.run(1)
        t = s.run(1) if min_rep_s > 0 else 0.0
        s.inner = max(1, min(max_inner, math.ceil(min_rep_s / t))) if t > 0 else 1
        if log:
            log(
                f"  warm-up {s.name}: {time.perf_counter() - start:.1f}s "
                f"(incl. compile), inner={s.inner}"
            )
    for r in range(reps):
        order = list(steppers) if r % 2 == 0 else list(reversed(steppers))
        for s in order:
            s.times.append(s.run(s.inner))


def ratio_range(cand: Stepper, base: Stepper) -> tuple[float, float]:
    """Min and max of the per-repetition ratios ``cand.times[r] / base.times[r]``."""
    per_rep = [c / b for c, b in zip(cand.times, base.times, strict=True)]
    return min(per_rep), max(per_rep)


# --------------------------------------------------------------------------------------
# Tables and header
# --------------------------------------------------------------------------------------


@dataclass
class Table:
    """A markdown table; ``ratios`` are the finite-checked numbers of the table
    (candidate / baseline), ``notes`` are printed under it."""

    title: str
    headers: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Sequence[Any], ratio: float | None = None) -> None:
        self.rows.append(list(row))
        if ratio is not None:
            self.ratios.append(float(ratio))

    def markdown(self) -> str:
        def cell(x: Any) -> str:
            if isinstance(x, float):
                return fmt(x)
            return str(x)

        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(cell(x) for x in row) + " |")
        if self.notes:
            lines.append("")
            lines.extend(self.notes)
        return "\n".join(lines)


def fmt(x: float) -> str:
    """Three significant digits, plain notation where readable."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    if 1e-3 <= abs(x) < 1e5:
        digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
        return f"{x:.{digits}f}"
    return f"{x:.3g}"


def print_tables(tables: Sequence[Table]) -> None:
    for t in tables:
        print()
        print(t.markdown())
    print(flush=True)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def riemax_source_digest() -> str:
    """sha256 (12 hex) of the riemax package's ``.py`` sources as imported: pins the
    exact code measured even with uncommitted changes."""
    root = os.path.dirname(riemax.__file__)
    h = hashlib.sha256()
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            h.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]


def cpu_model() -> str:
    proc = platform.processor()
    if proc:
        return proc
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine_header(title: str, config: dict[str, Any] | None = None) -> str:
    """Title, machine, library versions and the measured riemax revision."""
    import flax

    commit = _git("log", "-1", "--format=%h") or "unknown"
    dirty = _git("status", "--porcelain", "--", "riemax")
    devices = ", ".join(str(d) for d in jax.devices())
    lines = [
        f"## {title}",
        "",
        f"- machine: platform.processor()={platform.processor()!r} ({cpu_model()}), "
        f"{platform.machine()}, os.cpu_count()={os.cpu_count()}",
        f"- jax {jax.__version__}, backend {jax.default_backend()}, "
        f"devices [{devices}]; "
        f"optax {optax.__version__}, flax {flax.__version__}, numpy {np.__version__}",
        f"- riemax: commit {commit}"
        + (" + uncommitted changes in riemax/" if dirty else "")
        + f", source sha256 {riemax_source_digest()}",
    ]
    if config:
        lines.append("- config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    return "\n".join(lines)


def parse_args(
    argv: Sequence[str] | None,
    description: str,
    *,
    reps: int,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, one repetition: correctness only (finite outputs, ratios)",
    )
    parser.add_argument(
        "--reps", type=int, default=None, help=f"timed repetitions (default {reps})"
    )
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per row")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.reps is None:
        args.reps = 1 if args.smoke else reps
    return args


def check_finite(steppers: Sequence[Stepper]) -> None:
    bad = [s.name for s in steppers if not s.finite()]
    if bad:
        raise FloatingPointError(f"non-finite state or outputs after the steps: {bad}")
