"""Smoke tests of benchmarks/: each script's ``main(["--smoke"])`` runs in-process
(tiny trees and models, one repetition) and returns printed markdown tables whose
ratios are finite. Nothing about speed is asserted.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

import pytest

# benchmarks/ and experiments/ are not installed packages: make the repository root
# importable under plain ``pytest`` too.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# compile_memory and scaling time the same steps as optimizer_step and
# train_step: their smoke runs are in the slow run.
SCRIPTS = (
    "headline",
    "optimizer_step",
    "stiefel",
    "train_step",
    pytest.param("compile_memory", marks=pytest.mark.slow),
    pytest.param("scaling", marks=pytest.mark.slow),
    "input_pipeline",
    # N devices against one: a child process with 2 forced host devices.
    pytest.param("devices", marks=pytest.mark.slow),
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_prints_tables_with_finite_ratios(script, capsys):
    module = importlib.import_module(f"benchmarks.{script}")
    tables = module.main(["--smoke"])
    out = capsys.readouterr().out

    assert tables
    for table in tables:
        assert table.rows, table.title
        assert table.ratios, table.title
        assert all(math.isfinite(r) and r > 0 for r in table.ratios), table.ratios
        assert all(len(row) == len(table.headers) for row in table.rows)
        assert table.markdown() in out
    # The header names the machine and the measured revision.
    assert "os.cpu_count()" in out and "backend" in out and "riemax: commit" in out


def test_common_helpers():
    from benchmarks import _common

    assert _common.fmt(1234.5) == "1234"
    assert _common.fmt(0.012345) == "0.0123"
    table = _common.Table("t", ["a", "b"])
    table.add(["x", 1.5], 1.5)
    assert "| x | 1.50 |" in table.markdown()
    a, b, r2 = __import__("benchmarks.scaling").scaling.fit_line([1, 2, 3], [3, 5, 7])
    assert (round(a, 6), round(b, 6), round(r2, 6)) == (1.0, 2.0, 1.0)


def test_optimizer_steps_alternate_the_gradient_sign():
    """The optimizer-only benchmarks time the step training runs: with one fixed
    gradient a kernel's units turn parallel to it within a few steps (then the
    sphere optimizers take their nearly-radial path every step); with the sign
    alternating they stay near where they started."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import riemax
    from benchmarks._common import Stepper, candidate_rows
    from benchmarks.optimizer_step import make_steppers
    from experiments.models import param_shapes

    shapes = param_shapes("wrn-10-1", 10)
    labels = riemax.labels_by_rule(shapes)
    rows = candidate_rows(omega_zero=False, whole_tree=False, names=("adamg",))
    (alternating,) = make_steppers(shapes, rows)
    grads, negated = alternating.cycle[0][0], alternating.cycle[1][0]
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(negated)[0]), -np.asarray(jax.tree.leaves(grads)[0])
    )
    params, opt_state = alternating.state
    copy = jax.tree.map(jnp.copy, (params, opt_state))
    fixed = Stepper("fixed", alternating.fn, copy, (grads,))

    def most_radial(stepper):
        cos2 = []
        for w, g, lab in zip(
            jax.tree.leaves(stepper.state[0]),
            jax.tree.leaves(grads),
            jax.tree.leaves(labels),
            strict=True,
        ):
            if lab != riemax.MANIFOLD:
                continue
            w = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
            g = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
            dots = (w * g).sum(0) ** 2 / ((w * w).sum(0) * (g * g).sum(0))
            cos2.append(dots.max())
        return max(cos2)

    start = most_radial(alternating)
    alternating.run(30)
    fixed.run(30)
    assert alternating.steps == 30
    assert most_radial(alternating) < max(0.5, 1.5 * start)
    assert most_radial(fixed) > 0.9


def test_compile_times_are_measured_without_the_persistent_cache(
    tmp_path, compile_cache_hits
):
    """Where the persistent compilation cache is on (the test suite, a user's
    JAX_COMPILATION_CACHE_DIR), a program compiled once loads from it in a
    later compile: the benchmarks' compile times would then be load times.
    Inside ``compiled_afresh`` XLA compiles it; on leaving, the cache is back."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.compilation_cache import compilation_cache

    from benchmarks._common import compiled_afresh

    hits = compile_cache_hits

    def program():
        # A function of its own each time: nothing compiled in memory to reuse.
        # (A NumPy argument: no other program is compiled on the way.)
        x = np.ones(7, np.float32)
        return jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.25).lower(x).compile()

    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    program()
    jax.clear_caches()
    program()
    assert len(hits) == 1, "the cache is not in use: the test shows nothing"
    jax.clear_caches()
    with compiled_afresh():
        program()
    assert len(hits) == 1, "compiled_afresh loaded the program from the cache"
    assert jax.config.jax_enable_compilation_cache
    jax.clear_caches()
    program()
    assert len(hits) == 2, "the cache is not back after compiled_afresh"


def test_headline_parts_and_rows_reported_as_measured(capsys):
    """``--part optimizer`` measures the optimizer-only rows alone; each row goes
    to standard error as soon as it is measured (a run stopped by a time limit
    keeps what it measured), the same line as in the final table."""
    from benchmarks import headline

    (table,) = headline.main(["--smoke", "--part", "optimizer"])
    err = capsys.readouterr().err
    assert table.rows and all(
        r[0].startswith("optimizer-only step:") for r in table.rows
    )
    for i in range(len(table.rows)):
        assert f"headline: {table.row_markdown(i)}\n" in err
    assert "headline: done in" in err
    with pytest.raises(SystemExit) as e:
        headline.main(["--smoke", "--part", "update"])
    assert e.value.code == 2
    assert "invalid choice: 'update'" in capsys.readouterr().err
