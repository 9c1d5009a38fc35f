"""Structural label detection: which kernels feed a BatchNorm, read off a traced
forward pass of a Flax (NNX or Linen) model.

The one place that reads JAX's traced programs (jaxprs). The NNX layer calls are
wrapped with :func:`riemax._nnx.wrapped_calls`; Linen modules are intercepted with
``flax.linen.intercept_methods``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from riemax._labels import (
    EUCLIDEAN,
    MANIFOLD,
    _flatten,
    _label_from_lookup,
    _shape,
)
from riemax._nnx import module_paths, wrapped_calls


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


def _nnx_wrappers(recorder: _Recorder, paths: dict[int, str]) -> dict[type, Any]:
    """``cls -> make(original)`` for the NNX layer, BatchNorm and other norm classes:
    each wrapped ``__call__`` tags its input (and a layer its output)."""
    from flax import nnx

    def layer(kind):
        def make(original):
            def __call__(self, x, *args, **kwargs):
                name = paths.get(id(self), "?")
                x = recorder.module_input(x, name, kind)
                y = original(self, x, *args, **kwargs)
                return recorder.layer_output(y, name, kind)

            return __call__

        return make

    def batchnorm(original):
        def __call__(self, x, use_running_average=None, *args, **kwargs):
            ura = self.use_running_average
            if use_running_average is not None:
                ura = use_running_average
            problem = _batchnorm_problem(self.axis, jnp.ndim(x), ura)
            x = recorder.module_input(x, paths.get(id(self), "?"), "BatchNorm", problem)
            return original(self, x, use_running_average, *args, **kwargs)

        return __call__

    def described(kind):
        def make(original):
            def __call__(self, x, *args, **kwargs):
                x = recorder.module_input(x, paths.get(id(self), "?"), kind)
                return original(self, x, *args, **kwargs)

            return __call__

        return make

    wrappers: dict[type, Any] = {getattr(nnx, k): layer(k) for k in _NNX_LAYERS}
    wrappers[nnx.BatchNorm] = batchnorm
    for kind in _NNX_DESCRIBED[1:]:
        cls = getattr(nnx, kind, None)
        if cls is not None:
            wrappers[cls] = described(kind)
    return wrappers


def _traced(forward: Any, *args: Any) -> Any:
    """``jax.make_jaxpr(forward)(*args)``; a failure of the model's own call is
    reported with the shape of the input it was given."""
    try:
        return jax.make_jaxpr(forward)(*args)
    except Exception as err:
        raise ValueError(
            "riemax.labels_from_model: the call failed while tracing the model "
            "with an input of shape "
            f"{jax.tree.map(lambda a: tuple(getattr(a, 'shape', ())), args[1])}: "
            f"{type(err).__name__}: "
            f"{err}".strip()
        ) from err


def _trace_nnx(model: Any, sample_input: Any, call_kwargs: dict[str, Any]):
    """Traces ``model(sample_input)`` on a clone; returns jaxpr, recorder, invars."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    state = nnx.as_pure(state)
    names = [name for name, _ in _flatten(state)]
    recorder = _Recorder()
    paths: dict[int, str] = {}
    # NNX objects among the call's arguments (an ``nnx.Rngs`` for dropout) are
    # traced on clones too: their state enters the trace as inputs.
    nodes = {k: v for k, v in call_kwargs.items() if nnx.graph.is_graph_node(v)}
    plain = {k: v for k, v in call_kwargs.items() if k not in nodes}
    node_def, node_state = nnx.split(nodes) if nodes else (None, None)
    node_state = nnx.as_pure(node_state) if nodes else None

    def forward(state, x, node_state):
        clone = nnx.merge(graphdef, state)
        paths.update(module_paths(clone))
        extra = nnx.merge(node_def, node_state) if nodes else {}
        return clone(x, **plain, **extra)

    with wrapped_calls(_nnx_wrappers(recorder, paths)):
        closed = _traced(forward, state, sample_input, node_state)
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

    closed = _traced(forward, variables, sample_input)
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
