r"""Label trees that route parameters to the manifold or the Euclidean optimizer.

A kernel ``W`` whose output units ``W[..., j]`` each feed a BatchNorm (with batch
statistics) is scale-invariant per unit,

.. math::

  L(w_1, \ldots, \alpha_j w_j, \ldots) = L(w_1, \ldots, w_j, \ldots)
  \quad \forall \alpha_j > 0,

so it can be optimized on the sphere; every other parameter is optimized by a
Euclidean optimizer. :func:`riemax.hybrid` routes leaves by a *label tree* (or a
function ``params -> label tree``) whose leaves are :data:`MANIFOLD` or
:data:`EUCLIDEAN`. This module builds such labels four ways:

* :func:`labels_by_rule`: the papers' syntactic rule (name contains ``conv`` and the
  kernel is undercomplete);
* :func:`labels_by_regex`: ordered ``(regex, label)`` rules over ``/``-joined paths;
* :func:`labels_from_model`: structural detection by tracing one forward pass of a
  Flax (NNX or Linen) model abstractly;
* :func:`labels_by_invariance`: numerical detection by measuring the invariance.

:func:`label_report` prints which parameter went where and why.

Flax is imported lazily: the module itself depends only on jax, optax and numpy.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from riemax._numerics import acc_dtype, unit_axes
from riemax._tree import path_str

MANIFOLD = "manifold"
EUCLIDEAN = "euclidean"
_LABEL_VALUES = (MANIFOLD, EUCLIDEAN)
_KERNEL_NAMES = ("kernel", "weight")


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _flatten(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` with ``/``-joined paths (a trailing ``.value`` dropped)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(path_str(path), leaf) for path, leaf in leaves]


def _is_label(value: Any) -> bool:
    return isinstance(value, str) and value in _LABEL_VALUES


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", ()))


def _label_from_lookup(lookup: Mapping[str, str], source: str) -> Callable[[Any], Any]:
    """A label function that maps every leaf of ``params`` to ``lookup[path]``."""

    def label_fn(params: Any) -> Any:
        missing: list[str] = []

        def one(path, _):
            name = path_str(path)
            if name not in lookup:
                missing.append(name)
                return EUCLIDEAN
            return lookup[name]

        labels = jax.tree_util.tree_map_with_path(one, params)
        if missing:
            raise ValueError(
                f"{source} has no label for these parameter paths: "
                + ", ".join(missing)
            )
        return labels

    return label_fn


def check_labels(params: Any, labels: Any) -> Any:
    """Validates labels against params and returns them with the params' structure.

    Accepts a label tree (a plain nested dict, an ``nnx.State`` — pure or with
    ``Variable``-wrapped leaves —, any pytree whose ``/``-joined paths match the
    params' paths), a single label for every leaf, or a callable
    ``params -> label tree``. Paths are compared with a trailing ``.value`` key
    dropped, so an ``nnx.State`` of ``Param`` objects matches a pure tree.

    Args:
      params: The parameter tree.
      labels: A label tree, a single label, or a callable returning a label tree.

    Returns:
      A tree with exactly the structure of ``params`` whose leaves are
      ``"manifold"`` or ``"euclidean"``.

    Raises:
      ValueError: naming every parameter path without a label, every label path
        that is not a parameter, and every label that is not ``"manifold"`` or
        ``"euclidean"``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from riemax._labels import check_labels
      >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 8, 4))}, "b": jnp.zeros(4)}
      >>> check_labels(params, {"conv": {"kernel": "manifold"}, "b": "euclidean"})
      {'b': 'euclidean', 'conv': {'kernel': 'manifold'}}
      >>> check_labels(params, {"conv": {"kernel": "manifold"}})
      Traceback (most recent call last):
        ...
      ValueError: labels do not match the parameters: no label for: b
    """
    if callable(labels):
        labels = labels(params)
    param_items = _flatten(params)
    if isinstance(labels, str):
        if not _is_label(labels):
            raise ValueError(f"label {labels!r} is not {MANIFOLD!r} or {EUCLIDEAN!r}")
        return jax.tree.map(lambda _: labels, params)
    label_items = _flatten(labels)
    lookup = dict(label_items)
    param_paths = [name for name, _ in param_items]
    known = set(param_paths)
    problems = []
    missing = [name for name in param_paths if name not in lookup]
    if missing:
        problems.append("no label for: " + ", ".join(missing))
    extra = [name for name, _ in label_items if name not in known]
    if extra:
        problems.append("labels for unknown paths: " + ", ".join(extra))
    bad = [f"{name}={value!r}" for name, value in label_items if not _is_label(value)]
    if bad:
        problems.append(
            f"labels must be {MANIFOLD!r} or {EUCLIDEAN!r}, got: " + ", ".join(bad)
        )
    if problems:
        raise ValueError("labels do not match the parameters: " + "; ".join(problems))
    return jax.tree_util.tree_map_with_path(
        lambda path, _: lookup[path_str(path)], params
    )


# ---------------------------------------------------------------------------
# 1. The papers' rule
# ---------------------------------------------------------------------------


def _rule(name: str, shape: tuple[int, ...], pattern: str) -> tuple[str, str]:
    last = name.rsplit("/", 1)[-1]
    if last not in _KERNEL_NAMES or len(shape) < 2:
        return EUCLIDEAN, "rule: not a kernel"
    if pattern not in name:
        return EUCLIDEAN, f"rule: {pattern!r} not in path"
    fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
    if fan_in > fan_out:
        return MANIFOLD, f"rule: {pattern!r} & fan_in {fan_in} > fan_out {fan_out}"
    return EUCLIDEAN, f"rule: fan_in {fan_in} <= fan_out {fan_out} (not undercomplete)"


def labels_by_rule(
    params: Any, pattern: str = "conv", *, return_details: bool = False
) -> Any:
    r"""Labels kernels by the papers' syntactic rule (Cho & Lee, 2017).

    A leaf goes to the manifold iff its ``/``-joined path contains ``pattern``, its
    last path key is ``kernel`` (or ``weight``), it has at least two axes, and it is
    undercomplete,

    .. math::

      \textstyle\prod_{i < d} \mathrm{shape}_i > \mathrm{shape}_{d}
      \quad (\text{fan-in} > \text{fan-out, strict}).

    This reproduces the original split exactly (for a WRN-28-10 the first conv of
    the second group, ``[3, 3, 16, 160]``, stays Euclidean), but it is *syntactic*:
    it also puts on the sphere convs that feed a residual sum, which are not
    scale-invariant. Use :func:`labels_from_model` to select by structure.

    The function takes only ``params`` besides its defaults, so it can be passed
    directly as the labels of :func:`optax.partition` / :func:`riemax.hybrid`,
    including inside ``nnx.Optimizer`` (``Param``-wrapped leaves at init and plain
    arrays at update spell the same paths).

    Args:
      params: The parameter tree (arrays, ``jax.ShapeDtypeStruct`` or anything with
        a ``shape``; ``nnx.State`` works).
      pattern: Substring that the path must contain.
      return_details: If true, also return a dict ``path -> reason`` for
        :func:`label_report`.

    Returns:
      A label tree with the structure of ``params`` (and the details if asked).

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> params = {
      ...     "conv0": {"kernel": jnp.zeros((3, 3, 16, 32))},
      ...     "projection": {"kernel": jnp.zeros((1, 1, 16, 32))},
      ...     "fc": {"kernel": jnp.zeros((64, 10)), "bias": jnp.zeros(10)},
      ... }
      >>> labels = riemax.labels_by_rule(params)
      >>> labels["conv0"], labels["projection"], labels["fc"]["kernel"]
      ({'kernel': 'manifold'}, {'kernel': 'euclidean'}, 'euclidean')
      >>> import optax
      >>> tx = optax.partition(
      ...     {"manifold": optax.sgd(0.1), "euclidean": optax.adam(1e-3)},
      ...     riemax.labels_by_rule)
      >>> state = tx.init(params)

    References:
      Cho and Lee, `Riemannian approach to batch normalization
      <https://arxiv.org/abs/1709.09603>`_, 2017
    """
    details: dict[str, str] = {}

    def one(path, leaf):
        name = path_str(path)
        label, details[name] = _rule(name, _shape(leaf), pattern)
        return label

    labels = jax.tree_util.tree_map_with_path(one, params)
    return (labels, details) if return_details else labels


# ---------------------------------------------------------------------------
# 2. Regex rules
# ---------------------------------------------------------------------------


def labels_by_regex(
    params: Any,
    rules: Sequence[tuple[str, str]] | Mapping[str, str],
    *,
    return_details: bool = False,
) -> Any:
    r"""Labels parameters by ordered ``(regex, label)`` rules; the first match wins.

    Each rule's regex is matched with :func:`re.search` against the ``/``-joined
    parameter path (e.g. ``"group2/block0/conv1/kernel"``). Every parameter must be
    covered by some rule: end with a catch-all such as ``(".*", "euclidean")`` to
    route the rest explicitly.

    Args:
      params: The parameter tree.
      rules: An ordered sequence of ``(regex, label)`` pairs (or an ordered mapping
        ``regex -> label``); each label is ``"manifold"`` or ``"euclidean"``.
      return_details: If true, also return a dict ``path -> reason`` naming the
        rule that matched, for :func:`label_report`.

    Returns:
      A label tree with the structure of ``params`` (and the details if asked).

    Raises:
      ValueError: if a label is not ``"manifold"``/``"euclidean"``, or if some
        parameters are covered by no rule (all their paths are listed).

    Examples:
      >>> import functools, jax.numpy as jnp, riemax
      >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 4, 8)), "bias": jnp.zeros(8)},
      ...           "head": {"kernel": jnp.zeros((8, 2))}}
      >>> rules = [(r"conv/kernel$", "manifold"), (r".*", "euclidean")]
      >>> labels = riemax.labels_by_regex(params, rules)
      >>> labels["conv"], labels["head"]
      ({'bias': 'euclidean', 'kernel': 'manifold'}, {'kernel': 'euclidean'})
      >>> label_fn = functools.partial(riemax.labels_by_regex, rules=rules)
      >>> riemax.labels_by_regex(params, [(r"kernel", "manifold")])
      Traceback (most recent call last):
        ...
      ValueError: no rule covers these parameters: conv/bias
    """
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    compiled = []
    for i, rule in enumerate(items):
        try:
            regex, label = rule
        except (TypeError, ValueError):
            raise ValueError(
                f"rule #{i} must be a (regex, label) pair, got {rule!r}"
            ) from None
        if not _is_label(label):
            raise ValueError(
                f"rule #{i} ({regex!r}) has label {label!r}; "
                f"use {MANIFOLD!r} or {EUCLIDEAN!r}"
            )
        compiled.append((re.compile(regex), label, regex))

    details: dict[str, str] = {}
    uncovered: list[str] = []

    def one(path, _):
        name = path_str(path)
        for i, (rx, label, regex) in enumerate(compiled):
            if rx.search(name):
                details[name] = f"regex #{i} {regex!r}"
                return label
        uncovered.append(name)
        return EUCLIDEAN

    labels = jax.tree_util.tree_map_with_path(one, params)
    if uncovered:
        raise ValueError("no rule covers these parameters: " + ", ".join(uncovered))
    return (labels, details) if return_details else labels


# ---------------------------------------------------------------------------
# 3. Structural detection (Flax NNX and Linen)
# ---------------------------------------------------------------------------


class _Call(NamedTuple):
    """One recorded module call: its tag in the jaxpr and what it was."""

    tag: str
    module: str  # the module's path, "/"-joined (parameter-path prefix)
    kind: str  # "Conv", "Linear", "Dense", "BatchNorm", "LayerNorm", ...
    problem: str | None = None  # for BatchNorm: why it does not normalize units


class _Recorder:
    """Tags layer outputs and module inputs with ``checkpoint_name`` markers.

    ``checkpoint_name`` is an identity with a name that stays in the jaxpr, so one
    abstract trace tells exactly which operations consume each layer's output.
    """

    def __init__(self) -> None:
        self.prefix = f"riemax_labels_{id(self):x}"
        self.outputs: list[_Call] = []  # layer outputs
        self.inputs: dict[str, _Call] = {}  # tag -> module whose input it is

    def _tag(self, x: Any, tag: str) -> Any:
        from jax.ad_checkpoint import checkpoint_name

        return checkpoint_name(x, tag) if isinstance(x, jax.Array) else x

    def layer_output(self, y: Any, module: str, kind: str) -> Any:
        call = _Call(f"{self.prefix}/out/{len(self.outputs)}", module, kind)
        self.outputs.append(call)
        return self._tag(y, call.tag)

    def module_input(
        self, x: Any, module: str, kind: str, problem: str | None = None
    ) -> Any:
        call = _Call(f"{self.prefix}/in/{len(self.inputs)}", module, kind, problem)
        self.inputs[call.tag] = call
        return self._tag(x, call.tag)


def _batchnorm_problem(axis: Any, ndim: int, use_running_average: Any) -> str | None:
    """Why a BatchNorm call does not normalize each unit with batch statistics."""
    if use_running_average:
        return "uses running averages (eval mode); trace the model in training mode"
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    if tuple(int(a) % ndim for a in axes) != (ndim - 1,):
        return f"normalizes axis {axis}, not the last (unit) axis"
    return None


_NNX_LAYERS = ("Conv", "Linear")
_NNX_DESCRIBED = ("BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm", "Dropout")


@contextlib.contextmanager
def _nnx_patched(recorder: _Recorder, paths: dict[int, str]) -> Iterator[None]:
    """Temporarily wraps ``__call__`` of the NNX layer and norm classes."""
    from flax import nnx

    def layer_call(original, kind):
        def __call__(self, x, *args, **kwargs):
            name = paths.get(id(self), "?")
            x = recorder.module_input(x, name, kind)
            y = original(self, x, *args, **kwargs)
            return recorder.layer_output(y, name, kind)

        return __call__

    def batchnorm_call(original):
        def __call__(self, x, use_running_average=None, *args, **kwargs):
            ura = self.use_running_average
            if use_running_average is not None:
                ura = use_running_average
            problem = _batchnorm_problem(self.axis, jnp.ndim(x), ura)
            x = recorder.module_input(x, paths.get(id(self), "?"), "BatchNorm", problem)
            return original(self, x, use_running_average, *args, **kwargs)

        return __call__

    def input_call(original, kind):
        def __call__(self, x, *args, **kwargs):
            x = recorder.module_input(x, paths.get(id(self), "?"), kind)
            return original(self, x, *args, **kwargs)

        return __call__

    patches = {}
    for kind in _NNX_LAYERS:
        cls = getattr(nnx, kind)
        patches[cls] = layer_call(cls.__call__, kind)
    patches[nnx.BatchNorm] = batchnorm_call(nnx.BatchNorm.__call__)
    for kind in _NNX_DESCRIBED[1:]:
        cls = getattr(nnx, kind, None)
        if cls is not None:
            patches[cls] = input_call(cls.__call__, kind)
    originals = {cls: cls.__dict__.get("__call__") for cls in patches}
    try:
        for cls, call in patches.items():
            cls.__call__ = call
        yield
    finally:
        for cls, call in originals.items():
            if call is None:  # inherited: remove the patch, not shadow the parent
                del cls.__call__
            else:
                cls.__call__ = call


def _trace_nnx(model: Any, sample_input: Any, call_kwargs: dict[str, Any]):
    """Traces ``model(sample_input)`` on a clone; returns jaxpr, recorder, invars."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    state = nnx.as_pure(state)
    names = [name for name, _ in _flatten(state)]
    recorder = _Recorder()
    paths: dict[int, str] = {}

    def forward(state, x):
        clone = nnx.merge(graphdef, state)
        for path, node in nnx.iter_graph(clone):
            if isinstance(node, nnx.Module):
                paths.setdefault(id(node), "/".join(map(str, path)))
        return clone(x, **call_kwargs)

    with _nnx_patched(recorder, paths):
        closed = jax.make_jaxpr(forward)(state, sample_input)
    invars = dict(zip(names, closed.jaxpr.invars[: len(names)], strict=False))
    return closed.jaxpr, recorder, invars


def _trace_linen(
    module: Any, sample_input: Any, variables: Any, call_kwargs: dict[str, Any]
):
    """Traces ``module.apply(variables, sample_input)`` with intercepted methods."""
    import flax.linen as nn

    layers = {nn.Conv: "Conv", nn.Dense: "Dense"}
    described = {
        getattr(nn, kind): kind for kind in _NNX_DESCRIBED[1:] if hasattr(nn, kind)
    }
    recorder = _Recorder()

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not args:
            return next_fun(*args, **kwargs)
        name = "/".join(map(str, mod.path))
        x, rest = args[0], args[1:]
        if type(mod) in layers:
            x = recorder.module_input(x, name, layers[type(mod)])
            y = next_fun(x, *rest, **kwargs)
            return recorder.layer_output(y, name, layers[type(mod)])
        if type(mod) is nn.BatchNorm:
            ura = kwargs.get("use_running_average", rest[0] if rest else None)
            if ura is None:
                ura = mod.use_running_average
            problem = _batchnorm_problem(mod.axis, jnp.ndim(x), ura)
            x = recorder.module_input(x, name, "BatchNorm", problem)
        elif type(mod) in described:
            x = recorder.module_input(x, name, described[type(mod)])
        return next_fun(x, *rest, **kwargs)

    call_kwargs = {k: v for k, v in call_kwargs.items() if k != "mutable"}

    def forward(variables, x):
        with nn.intercept_methods(interceptor):
            out, _ = module.apply(variables, x, mutable=True, **call_kwargs)
        return out

    closed = jax.make_jaxpr(forward)(variables, sample_input)
    invars = {}
    for (name, _), var in zip(_flatten(variables), closed.jaxpr.invars, strict=False):
        if name.startswith("params/"):
            invars[name[len("params/") :]] = var
    return closed.jaxpr, recorder, invars


_HINTS = {
    "add": "add (e.g. a residual sum)",
    "add_any": "add (e.g. a residual sum)",
    "sub": "sub",
    "max": "max (e.g. ReLU)",
    "mul": "mul (e.g. a gate or scale)",
    "concatenate": "concatenate",
    "reduce_window_max": "max-pool",
    "reduce_window_sum": "sum/avg-pool",
    "dot_general": "a matmul",
}


def _jaxpr_analysis(jaxpr: Any, recorder: _Recorder, invars: dict[str, Any]):
    """Decides, from the traced jaxpr, which layer kernels feed a BatchNorm only.

    Returns ``{kernel path: (label, reason)}`` for every called Conv/Linear layer.
    """
    from jax.extend.core import Var

    eqns = jaxpr.eqns
    consumers: dict[Any, list[int]] = {}
    for i, eqn in enumerate(eqns):
        for v in eqn.invars:
            if isinstance(v, Var):
                consumers.setdefault(v, []).append(i)
    model_outputs = {v for v in jaxpr.outvars if isinstance(v, Var)}
    tag_eqns = {
        eqn.params["name"]: i
        for i, eqn in enumerate(eqns)
        if eqn.primitive.name == "name"
        and str(eqn.params.get("name", "")).startswith(recorder.prefix)
    }
    own_tags = set(tag_eqns.values())

    def describe(i: int) -> str:
        eqn = eqns[i]
        name = eqn.primitive.name
        if name == "name" and eqn.params["name"] in recorder.inputs:
            call = recorder.inputs[eqn.params["name"]]
            return f"{call.kind} {call.module}"
        if name in ("pjit", "jit") and "name" in eqn.params:
            return f"{name} {eqn.params['name']}"
        if name.startswith("custom_") and "call_jaxpr" in eqn.params:
            try:
                info = eqn.params["call_jaxpr"].jaxpr.debug_info.func_src_info
                return f"{info.split()[0]} ({name})"
            except AttributeError:
                pass
        return _HINTS.get(name, name)

    def keeps_units(eqn: Any, v: Any, units: int) -> bool:
        """Shape-only ops that leave unit j's values on last-axis index j."""
        if len(eqn.outvars) != 1 or list(eqn.invars) != [v]:
            return False
        shape_in, shape_out = v.aval.shape, eqn.outvars[0].aval.shape
        if not (shape_in and shape_out and shape_in[-1] == shape_out[-1] == units):
            return False
        if math.prod(shape_in) != math.prod(shape_out):
            return False
        name = eqn.primitive.name
        if name == "reshape":  # row-major with an equal last axis: j stays j
            return eqn.params.get("dimensions") is None
        if name == "broadcast_in_dim":
            dims = tuple(eqn.params["broadcast_dimensions"])
            return bool(dims) and dims[-1] == len(shape_out) - 1
        if name == "transpose":
            return tuple(eqn.params["permutation"])[-1] == len(shape_in) - 1
        if name == "convert_element_type":
            return jnp.issubdtype(eqn.params["new_dtype"], jnp.floating)
        return name in ("squeeze", "copy", "copy_p", "name")

    def follow(call: _Call, units: int) -> tuple[bool, str]:
        """Follows one layer output to its single consumer chain."""
        v = eqns[tag_eqns[call.tag]].outvars[0]
        if not v.aval.shape or v.aval.shape[-1] != units:
            return False, "output's last axis is not the kernel's units"
        via: list[str] = []
        while True:
            users = sorted(set(consumers.get(v, [])))
            if v in model_outputs:
                return False, "output is returned by the model"
            if not users:
                return False, "output is not used"
            if len(users) > 1:
                what = " and by ".join(describe(i) for i in users)
                return False, f"output used by {what}"
            eqn = eqns[users[0]]
            tag = eqn.params.get("name") if eqn.primitive.name == "name" else None
            if tag in recorder.inputs:
                use = recorder.inputs[tag]
                if use.kind != "BatchNorm":
                    return False, f"output feeds {use.kind} {use.module}, not BatchNorm"
                if use.problem:
                    return False, f"BatchNorm {use.module} {use.problem}"
                suffix = f" via {', '.join(via)}" if via else ""
                return True, f"feeds BatchNorm {use.module}{suffix}"
            if keeps_units(eqn, v, units):
                via.append(eqn.primitive.name)
                v = eqn.outvars[0]
                continue
            return False, f"output goes through {describe(users[0])} before BatchNorm"

    def kernel_used_elsewhere(var: Any, own: set[int]) -> str | None:
        """Why the kernel reaches anything but its own layers' outputs, if it does."""
        seen, stack = {var}, [var]
        while stack:
            v = stack.pop()
            if v in model_outputs:
                return "kernel is returned by the model"
            for i in consumers.get(v, []):
                if i in own:
                    continue
                if i in own_tags:
                    return f"kernel also used by {describe(i)}"
                for out in eqns[i].outvars:
                    if isinstance(out, Var) and out not in seen:
                        seen.add(out)
                        stack.append(out)
        return None

    calls: dict[str, list[_Call]] = {}
    for call in recorder.outputs:
        calls.setdefault(call.module, []).append(call)

    result: dict[str, tuple[str, str]] = {}
    for module, module_calls in calls.items():
        kernel_path = f"{module}/kernel"
        var = invars.get(kernel_path)
        if var is None:
            result[kernel_path] = (EUCLIDEAN, "kernel not found among the parameters")
            continue
        units = var.aval.shape[-1] if var.aval.shape else -1
        reasons = []
        ok = True
        for call in module_calls:
            if call.tag not in tag_eqns:
                ok, why = False, "called inside a nested transform (scan/jit/remat)"
            else:
                ok_call, why = follow(call, units)
                ok = ok and ok_call
            if not ok:
                reasons = [why]
                break
            if why not in reasons:
                reasons.append(why)
        if ok:
            own = {tag_eqns[call.tag] for call in module_calls}
            problem = kernel_used_elsewhere(var, own)
            if problem:
                ok, reasons = False, [problem]
        result[kernel_path] = (MANIFOLD if ok else EUCLIDEAN, "; ".join(reasons))
    return result


def labels_from_model(
    model: Any,
    sample_input: Any,
    *,
    params: Any = None,
    as_callable: bool = False,
    return_details: bool = False,
    **call_kwargs: Any,
) -> Any:
    r"""Labels the kernels whose every output unit feeds a BatchNorm, by structure.

    Traces one forward pass ``model(sample_input, **call_kwargs)`` *abstractly*
    (:func:`jax.make_jaxpr`; no FLOPs) with the ``__call__`` of the Conv/Linear
    (Linen: exactly ``nn.Conv``/``nn.Dense``) and BatchNorm classes wrapped to tag
    their inputs and outputs, then reads the data flow of the traced program. A
    kernel is labelled ``"manifold"`` iff, at every call of its layer,

    * the layer output is consumed by exactly one operation, which is the input of
      a ``BatchNorm`` that normalizes the last (unit) axis with batch statistics,
      or a chain of shape-only operations (reshape, squeeze, transpose/broadcast
      that keep the unit axis last and the element count, dtype casts) ending at
      such a BatchNorm; the layer's bias is allowed (BatchNorm removes it); and
    * the kernel is used by nothing but its layer.

    Everything else is ``"euclidean"``: an activation, a residual sum, dropout,
    pooling or LayerNorm before the BatchNorm; an output also used elsewhere (e.g.
    the stem conv of a pre-activation ResNet that also feeds an identity
    shortcut); layers called inside nested transforms (``nnx.scan``,
    ``jax.checkpoint``, inner ``jit``); subclasses whose ``__call__`` does not end
    in the stock one. The detection is conservative: some invariant kernels
    (conv → ReLU → BN) are left Euclidean, but a non-invariant kernel is never put
    on the manifold. Use :func:`labels_by_invariance` to measure invariance.

    Trace the model as it is trained (BatchNorm in training mode, e.g. pass
    ``train=True`` for Linen); a BatchNorm that uses running averages is not
    scale-invariant and gives ``"euclidean"``. The model is not modified: NNX is
    traced on a clone (``nnx.split``/``nnx.merge``), so parameters, batch
    statistics and RNG counters are untouched. The wrapping of the NNX classes is
    undone on exit; do not trace other NNX models concurrently from other threads.

    **NNX.** The label tree has the structure of
    ``nnx.as_pure(nnx.state(model, nnx.Param))``; this tree works as the labels of
    :func:`optax.partition`/:func:`riemax.hybrid` inside
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and with the pure params tree in
    plain optax. For any other container (a ``to_pure_dict()`` dict, a
    ``Variable``-wrapped state), pass ``params=that_tree`` to get labels with its
    structure, or ``as_callable=True`` to get a function ``params -> labels`` that
    looks every leaf up by path.

    **Linen.** Pass the variables, ``labels_from_model(module, x,
    params=variables, train=True)``; the labels have the structure of
    ``variables["params"]``.

    Args:
      model: An ``nnx.Module`` or a ``flax.linen.Module``.
      sample_input: One input (arrays or ``jax.ShapeDtypeStruct``; a pytree is
        passed as a single argument).
      params: NNX: optional tree whose structure the labels should have. Linen:
        the variables (``{"params": ..., "batch_stats": ...}``) or params.
      as_callable: Return a label function (path lookup) instead of a tree.
      return_details: Also return a dict ``path -> reason`` for
        :func:`label_report`.
      **call_kwargs: Keyword arguments of the forward call (e.g. ``train=True``).

    Returns:
      A label tree (or a label function), and the details if asked.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
      ...         self.bn = nnx.BatchNorm(8, rngs=rngs)
      ...         self.head = nnx.Linear(8, 10, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.head(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))
      >>> model = Net(nnx.Rngs(0))
      >>> labels, why = riemax.labels_from_model(
      ...     model, jnp.zeros((2, 8, 8, 3)), return_details=True)
      >>> labels["conv"]["kernel"], labels["head"]["kernel"]
      ('manifold', 'euclidean')
      >>> why["conv/kernel"], why["head/kernel"]
      ('feeds BatchNorm bn', 'output is returned by the model')
      >>> import optax
      >>> tx = optax.partition(
      ...     {"manifold": optax.sgd(0.1), "euclidean": optax.adam(1e-3)}, labels)
      >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    """
    import flax.linen as nn
    from flax import nnx

    if isinstance(model, nnx.Module):
        jaxpr, recorder, invars = _trace_nnx(model, sample_input, call_kwargs)
        template = params
        if template is None:
            template = nnx.as_pure(nnx.state(model, nnx.Param))
    elif isinstance(model, nn.Module):
        if params is None:
            raise ValueError(
                "labels_from_model needs params=variables for a Linen module"
            )
        variables = params if "params" in params else {"params": params}
        jaxpr, recorder, invars = _trace_linen(
            model, sample_input, variables, call_kwargs
        )
        template = variables["params"]
    else:
        raise TypeError(
            f"expected an nnx.Module or flax.linen.Module, got {type(model).__name__}"
        )

    decided = _jaxpr_analysis(jaxpr, recorder, invars)
    lookup: dict[str, str] = {}
    details: dict[str, str] = {}
    for name, leaf in _flatten(template):
        if name in decided:
            lookup[name], details[name] = decided[name]
        else:
            lookup[name] = EUCLIDEAN
            details[name] = (
                "not a kernel (ndim < 2)"
                if len(_shape(leaf)) < 2
                else "not the kernel of a Conv/Linear layer"
            )
    label_fn = _label_from_lookup(lookup, "labels_from_model")
    labels = label_fn if as_callable else label_fn(template)
    return (labels, details) if return_details else labels


# ---------------------------------------------------------------------------
# 4. Numerical detection
# ---------------------------------------------------------------------------


def _tolerance(dtype: Any) -> float:
    r"""Default relative tolerance of the invariance tests for ``dtype``.

    :math:`\max(\sqrt{\epsilon_\mathrm{dtype}}, 10^{-3})`: the square root of the
    machine epsilon covers the rounding of a loss and its gradient, and the floor
    covers BatchNorm's own :math:`\varepsilon` (1e-5), which breaks the invariance
    by a relative :math:`\varepsilon/\sigma^2` for a pre-BN variance
    :math:`\sigma^2`.
    """
    return max(float(jnp.finfo(dtype).eps) ** 0.5, 1e-3)


def _unit_stats(g: jax.Array, w: jax.Array) -> tuple[jax.Array, ...]:
    """Per-unit ``<g_j, w_j>``, ``|g_j|^2`` and ``|w_j|^2`` (all axes but the last)."""
    axes = unit_axes(w.ndim)
    return (
        jnp.sum(g * w, axis=axes),
        jnp.sum(g * g, axis=axes),
        jnp.sum(w * w, axis=axes),
    )


def labels_by_invariance(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    alphas: Sequence[float] = (0.5, 2.0),
    rtol: float | None = None,
    seed: int = 0,
    return_details: bool = False,
) -> Any:
    r"""Labels each kernel by measuring whether the loss is invariant per unit.

    For every floating leaf ``w`` with at least two axes (units ``w_j = w[..., j]``)
    and ``g = \nabla_w L``, it measures

    .. math::

      c = \max_j \frac{|\langle g_j, w_j\rangle|}{\|g_j\| \|w_j\|}, \qquad
      \delta = \max_{s} \frac{|L(s \odot w) - L(w)|}{|L(w)|},

    where the scalings ``s`` are every ``alpha`` applied to all units at once and,
    for every ``alpha``, per-unit random factors
    :math:`\alpha^{u_j}, u_j \sim U[-1, 1]` (so that invariance to scaling each
    unit separately is tested, not only invariance to scaling the whole tensor:
    Dense → LayerNorm is invariant to the latter only). The leaf is
    ``"manifold"`` iff :math:`c \le` ``rtol`` and :math:`\delta \le` ``rtol`` (and
    its gradient is not identically zero). Other leaves are ``"euclidean"``.

    Run it once, outside the training step, on a representative batch, with
    BatchNorm in training mode (batch statistics) inside ``loss_fn``. It costs one
    gradient and ``2 * len(alphas)`` extra losses per kernel, evaluated one after
    the other by :func:`jax.lax.map` over a table of per-leaf factors (two
    compilations in all, whatever the number of kernels). Leaves in
    bfloat16/float16 are measured in float32. A positively homogeneous activation
    between a bias-free layer and its BatchNorm (ReLU) keeps the invariance, so
    this detects more than :func:`labels_from_model`.

    For an NNX model, split off everything but the params *as pure arrays*, so
    that the BatchNorm statistics can be updated inside the traced loss::

      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      rest = nnx.as_pure(rest)
      def loss_fn(params, batch):
          logits = nnx.merge(graphdef, params, rest)(batch["x"])
          return optax.softmax_cross_entropy_with_integer_labels(
              logits, batch["y"]).mean()
      labels = riemax.labels_by_invariance(loss_fn, nnx.as_pure(params), batch)

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: The parameter tree (a pure ``nnx.State`` works).
      batch: The batch passed to ``loss_fn``.
      alphas: Positive scale factors to test.
      rtol: Relative tolerance of both tests; by default
        :math:`\max(\sqrt{\epsilon}, 10^{-3})` for the (promoted) dtype of each
        leaf. Raise it if the pre-BatchNorm activations have a tiny variance.
      seed: Seed of the per-unit random factors.
      return_details: If true, also return a dict ``path -> details`` with the
        measured ``max_cosine`` (:math:`c`), ``whole_cosine`` (the same for the
        whole tensor), ``max_loss_change`` (:math:`\delta`), ``tolerance`` and a
        ``reason`` string, for :func:`label_report`.

    Returns:
      A label tree with the structure of ``params`` (and the details if asked).

    Examples:
      >>> import jax, jax.numpy as jnp, riemax
      >>> def loss_fn(params, x):
      ...     y = x @ params["w"]
      ...     y = (y - y.mean(0)) / jnp.sqrt(y.var(0) + 1e-5)  # BatchNorm
      ...     return jnp.mean(jnp.tanh(y @ params["head"]) ** 2)
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params = {"w": jax.random.normal(k1, (5, 4)),
      ...           "head": jax.random.normal(k2, (4, 3))}
      >>> riemax.labels_by_invariance(loss_fn, params, jax.random.normal(k3, (16, 5)))
      {'head': 'euclidean', 'w': 'manifold'}
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [path_str(path) for path, _ in flat]
    leaves = []
    for _, leaf in flat:
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            leaf = leaf.astype(acc_dtype(leaf.dtype))
        leaves.append(leaf)
    tested = [
        i
        for i, leaf in enumerate(leaves)
        if leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    alphas_np = np.asarray(alphas, dtype=np.float64)
    if alphas_np.ndim != 1 or not np.all((alphas_np > 0) & np.isfinite(alphas_np)):
        raise ValueError(f"alphas must be positive numbers, got {alphas!r}")
    log_alphas = np.log(alphas_np)
    # One test row per (kernel, scaling): factors are 1 on every other leaf, so
    # a single compiled loss is mapped over all rows.
    rng = np.random.default_rng(seed)
    n_rows = 2 * len(log_alphas)
    factors: list[np.ndarray | None] = [None] * len(leaves)
    for k, i in enumerate(tested):
        units = leaves[i].shape[-1]
        u = rng.uniform(-1.0, 1.0, size=(len(log_alphas), units))
        logs = log_alphas[:, None]
        rows = np.exp(np.concatenate([np.broadcast_to(logs, u.shape), logs * u]))
        f = np.ones((n_rows * len(tested), units))
        f[k * n_rows : (k + 1) * n_rows] = rows
        factors[i] = f.astype(leaves[i].dtype)

    def loss_of(leaves, batch):
        return loss_fn(jax.tree_util.tree_unflatten(treedef, leaves), batch)

    @jax.jit
    def measure(leaves, factors, batch):
        loss, grads = jax.value_and_grad(loss_of)(leaves, batch)
        stats = [
            None if f is None else _unit_stats(g, w)
            for f, g, w in zip(factors, grads, leaves, strict=False)
        ]

        def scaled_loss(fs):
            scaled = [
                w if f is None else w * f for w, f in zip(leaves, fs, strict=True)
            ]
            return loss_of(scaled, batch)

        if not tested:
            return loss, stats, jnp.zeros((0,), loss.dtype)
        return loss, stats, jax.lax.map(scaled_loss, factors)

    loss, stats, all_losses = jax.device_get(measure(leaves, factors, batch))
    loss = float(loss)
    labels, details = [], {}
    n_uniform = len(log_alphas)
    for i, (name, leaf) in enumerate(zip(names, leaves, strict=False)):
        if factors[i] is None:
            labels.append(EUCLIDEAN)
            why = (
                "not floating point"
                if not jnp.issubdtype(leaf.dtype, jnp.floating)
                else "not a kernel (ndim < 2)"
            )
            details[name] = {"reason": why}
            continue
        inner, g2, w2 = (np.asarray(a, np.float64) for a in stats[i])
        k = tested.index(i)
        losses = np.asarray(all_losses, np.float64)[k * n_rows : (k + 1) * n_rows]
        tol = _tolerance(leaf.dtype) if rtol is None else float(rtol)
        denom = np.sqrt(g2 * w2)
        cos = np.where(denom > 0, np.abs(inner) / np.where(denom > 0, denom, 1), 0.0)
        whole_denom = np.sqrt(g2.sum() * w2.sum())
        whole = abs(inner.sum()) / whole_denom if whole_denom > 0 else 0.0
        change = np.abs(losses - loss) / max(abs(loss), np.finfo(np.float64).tiny)
        max_cos, max_change = float(cos.max()), float(change.max())
        uniform_change = float(change[:n_uniform].max())
        measured = f"max|<g,w>|/(|g||w|)={max_cos:.1e}, max|dL|/|L|={max_change:.1e}"
        finite = np.all(np.isfinite([loss, *inner, *g2, *losses]))
        if not finite:
            label, why = EUCLIDEAN, "loss or gradient not finite"
        elif not np.any(g2 > 0):
            label, why = EUCLIDEAN, "zero gradient on this batch: cannot tell"
        elif max_cos <= tol and max_change <= tol:
            label, why = MANIFOLD, f"invariant: {measured}"
        elif whole <= tol and uniform_change <= tol:
            label, why = (
                EUCLIDEAN,
                (
                    "invariant only as a whole tensor, not per unit (e.g. LayerNorm): "
                    + measured
                ),
            )
        else:
            label, why = EUCLIDEAN, f"not invariant: {measured}"
        labels.append(label)
        details[name] = {
            "reason": why,
            "max_cosine": max_cos,
            "whole_cosine": float(whole),
            "max_loss_change": max_change,
            "tolerance": tol,
        }
    tree = jax.tree_util.tree_unflatten(treedef, labels)
    return (tree, details) if return_details else tree


# ---------------------------------------------------------------------------
# 5. Report
# ---------------------------------------------------------------------------


def label_report(
    params: Any, labels: Any, *, details: Mapping[str, Any] | None = None
) -> str:
    """Returns a table of every parameter's path, shape, label and reason.

    Args:
      params: The parameter tree.
      labels: A label tree or label function (anything :func:`riemax.hybrid`
        accepts); it is validated against ``params``.
      details: Optional ``path -> reason`` mapping, as returned by any label
        builder called with ``return_details=True``; a value may be a string or a
        dict with a ``"reason"`` key (:func:`labels_by_invariance`).

    Returns:
      The table as a string, with counts of leaves, kernels (leaves with at least
      two axes) and scalar parameters on each side at the bottom.

    Examples:
      >>> import jax.numpy as jnp, riemax
      >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 16, 32))},
      ...           "fc": {"kernel": jnp.zeros((32, 10)), "bias": jnp.zeros(10)}}
      >>> labels, why = riemax.labels_by_rule(params, return_details=True)
      >>> print(riemax.label_report(params, labels, details=why))
      path         shape           label      why
      conv/kernel  (3, 3, 16, 32)  manifold   rule: 'conv' & fan_in 144 > fan_out 32
      fc/bias      (10,)           euclidean  rule: not a kernel
      fc/kernel    (32, 10)        euclidean  rule: 'conv' not in path
      manifold: 1 leaves (1 kernels), 4,608 parameters
      euclidean: 2 leaves (1 kernels), 330 parameters
    """
    resolved = dict(_flatten(check_labels(params, labels)))
    details = details or {}
    rows = [("path", "shape", "label", "why")]
    counts = {label: [0, 0, 0] for label in _LABEL_VALUES}
    for name, leaf in _flatten(params):
        shape = _shape(leaf)
        label = resolved[name]
        why = details.get(name, "")
        if isinstance(why, Mapping):
            why = why.get("reason", "")
        rows.append((name, str(shape), label, str(why)))
        counts[label][0] += 1
        counts[label][1] += len(shape) >= 2
        counts[label][2] += math.prod(shape)
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    lines = [
        "  ".join(
            cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)
        )
        + "  "
        + row[3]
        for row in rows
    ]
    lines = [line.rstrip() for line in lines]
    for label, (leaves, kernels, size) in counts.items():
        lines.append(
            f"{label}: {leaves} leaves ({kernels} kernels), {size:,} parameters"
        )
    return "\n".join(lines)
