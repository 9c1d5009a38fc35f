"""Shared pieces of the benchmarks: optimizers (from the experiments' one table,
:mod:`experiments.optimizers`), parameter trees, interleaved timing, markdown
tables and the machine header.

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
import contextlib
import hashlib
import math
import os
import platform
import re
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

from experiments import optimizers as optimizer_table  # noqa: E402

# --------------------------------------------------------------------------------------
# Optimizers: built from the experiments' one table (experiments/optimizers/)
# --------------------------------------------------------------------------------------

# The learning rates are the table's defaults (RBN's CIFAR values for sgdg/adamg,
# SRT's for the others); they do not change the cost of a step.
WEIGHT_DECAY = optimizer_table.WEIGHT_DECAY

#: Which optax baseline each riemax optimizer is compared with.
BASELINE_OF = {
    "sgdg": "sgd",
    "sgdmrt": "sgd",
    "adamg": "adam",
    "adamsrt": "adam",
    "adams": "adam",
    "adamp": "adam",
    "sgdp": "sgd",
    "nero": "sgd",
    "rotational-adamw": "adam",
    "rotational-sgdm": "sgd",
}

#: The other scale-invariance optimizers, timed as the experiments build them.
FIELD = ("adamp", "sgdp", "nero", "rotational-adamw", "rotational-sgdm")


def _hyper(name: str, omega: float | None = None) -> dict[str, Any]:
    entry = optimizer_table.lookup(name)
    if omega is not None and "omega" not in entry.hyper:
        raise ValueError(f"omega only applies to sgdg/adamg, not {name}")
    return optimizer_table.resolve_hyper(name, {"omega": omega})


def manifold_tx(name: str, omega: float | None = None) -> optax.GradientTransformation:
    """The table's transformation of ``name`` for its main group, at its default
    (manifold) learning rate, with coupled L2 ``5e-4`` in front for the optimizers
    that decay their main group (the SRT family).

    ``omega`` (``sgdg``/``adamg`` only) overrides the orthogonality weight (``None``:
    the table's default, 0.1).
    """
    entry = optimizer_table.lookup(name)
    hyper = _hyper(name, omega)
    lr = hyper["lr_manifold"] if entry.companion == "nesterov_sgd" else hyper["lr"]
    fargs = {k: hyper[k] for k in entry.hyper}
    if entry.decay == "inside":  # the decay inside the step, as users write it
        return entry.factory(lr, **fargs, weight_decay=WEIGHT_DECAY)
    tx = entry.factory(lr, **fargs)
    if entry.sphere:
        return tx
    return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), tx)


def hybrid_tx(
    name: str, labels: Any, omega: float | None = None
) -> optax.GradientTransformation:
    """``name`` exactly as the experiments build it (:func:`optimizer_table.build`)
    with the table's defaults: the manifold leaves get the riemax optimizer, the
    others its companion (Nesterov SGD for sgdg/adamg, the same algorithm element
    by element for the SRT family), with coupled L2 ``5e-4`` on every Euclidean
    leaf (and on the manifold leaves where the table decays them)."""
    decays = optimizer_table.group_decays(name, {})
    decay = jax.tree.map(
        lambda lab: decays["manifold"] if lab == riemax.MANIFOLD else WEIGHT_DECAY,
        labels,
    )
    return optimizer_table.build(name, _hyper(name, omega), labels, decay=decay)


def baseline_tx(kind: str) -> optax.GradientTransformation:
    """``"sgd"``: Nesterov momentum SGD, ``"adam"``: Adam; both on the whole tree,
    from the table at its default learning rate, without weight decay."""
    if kind not in ("sgd", "adam"):
        raise ValueError(f"unknown baseline {kind!r}")
    entry = optimizer_table.lookup(kind)
    hyper = optimizer_table.resolve_hyper(kind, {})
    return entry.factory(hyper["lr"], **{k: hyper[k] for k in entry.hyper})


BASELINE_DESCRIPTION = {
    "sgd": f"optax.sgd({optimizer_table.OPTIMIZERS['sgd'].lr}, momentum=0.9, "
    "nesterov=True)",
    "adam": f"optax.adam({optimizer_table.OPTIMIZERS['adam'].lr})",
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
        if optimizer_table.lookup(name).companion == "none":
            rows.append(
                OptRow(
                    f"{name} (whole tree)", base, lambda lab, n=name: hybrid_tx(n, lab)
                )
            )
            continue
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


@jax.jit
def _unit_leaves(leaves: list[jax.Array]) -> list[jax.Array]:
    return [riemax.sphere.unit(w) for w in leaves]


def normalize_manifold(params: Any, labels: Any) -> Any:
    """Manifold kernels with unit-norm units (``riemax.sphere.unit``, RBN's
    initialisation for ``sgdg``/``adamg``); other leaves unchanged. One jitted
    call for all kernels."""
    flat, treedef = jax.tree.flatten(params)
    flat_labels = treedef.flatten_up_to(labels)
    picked = [i for i, lab in enumerate(flat_labels) if lab == riemax.MANIFOLD]
    units = _unit_leaves([flat[i] for i in picked]) if picked else []
    for i, w in zip(picked, units, strict=True):
        flat[i] = w
    return jax.tree.unflatten(treedef, flat)


def random_params_and_grads(shapes: Any, labels: Any, seed: int = 0) -> tuple[Any, Any]:
    """Random parameters (manifold kernels with unit-norm units) and gradients with
    the structure of ``shapes`` (a tree of ``jax.ShapeDtypeStruct``).

    Drawn with NumPy: ``jax.random`` under jit compiles slowly for many leaves."""
    rng = np.random.default_rng(seed)

    def param(s):
        w = rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.05)
        return jnp.asarray(w, s.dtype)

    def grad(s):
        g = rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.01)
        return jnp.asarray(g, s.dtype)

    params = normalize_manifold(jax.tree.map(param, shapes), labels)
    return params, jax.tree.map(grad, shapes)


def alternating(grads: Any) -> tuple[Any, Any]:
    """``(grads, -grads)``, the gradients of even and odd optimizer-only steps.

    One fixed gradient turns every unit towards it: after 10-20 steps of the
    paper's learning rates a kernel's units are nearly parallel to their
    gradients, a state training never reaches (a batch-normalised layer's
    gradient is orthogonal to its weights), and the sphere optimizers then take
    their careful path for nearly radial gradients on every step. With the sign
    alternating the parameters stay near their start, and the step timed is the
    one training runs."""
    return grads, jax.tree.map(jnp.negative, grads)


def fused_loops(text: str) -> tuple[int, int]:
    """``(fusions, kernels)`` of a compiled program's optimized HLO ``text``: its
    fused loops (XLA fusions, every branch included) and how many of them are
    different. Fusions whose computations are equal but for their names compile
    to one kernel, so the second count is what XLA generates code for (on CPU,
    compile time follows it)."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?(%[\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(1)
            bodies[current] = []
        elif current is not None and line.strip() != "}":
            body = line.split(", metadata=")[0]
            bodies[current].append(re.sub(r"%[\w.\-]+", "%", body).strip())
    called = re.findall(r" fusion\(.*?calls=(%[\w.\-]+)", text)
    return len(called), len({"\n".join(bodies[c]) for c in called})


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


@contextlib.contextmanager
def compiled_afresh():
    """Inside, jitted functions compile with XLA, not from JAX's persistent
    compilation cache (which ``JAX_COMPILATION_CACHE_DIR`` turns on, as the test
    suite and the experiment runner do): a compile time measured there is a
    compile. The cache's setting is restored on leaving."""
    from jax.experimental.compilation_cache import compilation_cache

    was = jax.config.jax_enable_compilation_cache
    # JAX decides once per process whether the cache is used: reset it so
    # that the setting is read again, here and on leaving.
    compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        compilation_cache.reset_cache()


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
    the wall time per step, waiting for the results. With ``alternate``, every
    other step gets those arguments instead of ``consts`` (same shapes, so the
    same compiled program).
    """

    def __init__(
        self,
        name: str,
        fn: Callable,
        state: Any,
        consts: Sequence[Any] = (),
        alternate: Sequence[Any] | None = None,
    ):
        self.name = name
        self.fn = fn
        self.state = state
        self.consts = tuple(consts)
        self.cycle = (
            (self.consts,) if alternate is None else (self.consts, tuple(alternate))
        )
        self.steps = 0
        self.aux: Any = None
        self.inner = 1
        self.times: list[float] = []

    def run(self, n: int = 1) -> float:
        start = time.perf_counter()
        for _ in range(n):
            consts = self.cycle[self.steps % len(self.cycle)]
            self.state, self.aux = self.fn(self.state, *consts)
            self.steps += 1
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

    def row_markdown(self, i: int) -> str:
        """Row ``i`` as a markdown line."""
        cells = (fmt(x) if isinstance(x, float) else str(x) for x in self.rows[i])
        return "| " + " | ".join(cells) + " |"

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        lines.extend(self.row_markdown(i) for i in range(len(self.rows)))
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
