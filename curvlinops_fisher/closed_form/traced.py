"""The front end of custom ``forward`` methods: chains and residual graphs by :mod:`torch.fx`.

:func:`traced_calls` traces ``forward`` once, symbolically, and returns its calls
when every operation takes one earlier value (a supported layer, an activation or
pooling function with constant arguments, a reshape that keeps the element order)
or adds two (a residual connection), and no value is read after an in-place change
of it or of an alias of it (:func:`_check_values`). Only models made of supported
layers and plain containers are traced at all. What the trace baked in is guarded
before every product (:func:`_state_guard`, built on
:mod:`curvlinops_fisher.state_snapshot`); ``docs/performance.md`` lists what
qualifies and what the guard covers.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn import Module
from torch.nn import functional as F

from curvlinops_fisher.closed_form.protocol import (
    ADD,
    Call,
    CallGraph,
    ChainNotApplicable,
)
from curvlinops_fisher.closed_form.rules import (
    AVERAGE_POOLINGS,
    BATCH_NORMS,
    CLOSED_FORM_ACTIVATIONS,
    CONVOLUTIONS,
    ELEMENTWISE_ACTIVATIONS,
    MAX_POOLINGS,
    PASS_THROUGH,
)
from curvlinops_fisher.state_snapshot import (
    Uncoverable,
    class_functions,
    class_state,
    classes_below,
    code_references,
    guard_of,
    references_state,
    snapshot,
)

#: Layer types a chain may call (traced as leaves).
SUPPORTED_LAYERS: frozenset[type[Module]] = frozenset(
    {
        nn.Linear,
        nn.Flatten,
        *CONVOLUTIONS,
        *BATCH_NORMS,
        *MAX_POOLINGS,
        *AVERAGE_POOLINGS,
        *CLOSED_FORM_ACTIVATIONS,
        *ELEMENTWISE_ACTIVATIONS,
        *PASS_THROUGH,
    }
)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: Reshapes that keep the elements' order, as methods and as ``torch`` functions.
_RESHAPE_METHODS = frozenset(
    {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous"}
)
_RESHAPE_FUNCTIONS = frozenset(
    {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
)


class _NotAChain(Exception):
    """The traced graph is not a supported chain."""


def _max_pooling(cls: type[Module]) -> Callable[..., Module]:
    """``F.max_pool*d``'s arguments (after the input) -> the module computing the same."""

    def make(
        kernel_size: Any,
        stride: Any = None,
        padding: Any = 0,
        dilation: Any = 1,
        ceil_mode: bool = False,
        return_indices: bool = False,
    ) -> Module:
        if return_indices:
            raise _NotAChain("max-pooling that returns indices")
        return cls(kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)

    return make


#: Functions and the module that computes the same (constant arguments): elementwise
#: activations and pooling. ``F.avg_pool*d`` and ``F.adaptive_avg_pool*d`` take their
#: modules' arguments in the modules' order.
_LAYER_FUNCTIONS: dict[Any, Callable[..., Module]] = {
    F.max_pool1d: _max_pooling(nn.MaxPool1d),
    F.max_pool2d: _max_pooling(nn.MaxPool2d),
    F.max_pool3d: _max_pooling(nn.MaxPool3d),
    F.avg_pool1d: nn.AvgPool1d,
    F.avg_pool2d: nn.AvgPool2d,
    F.avg_pool3d: nn.AvgPool3d,
    F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d,
    F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
    F.adaptive_avg_pool3d: nn.AdaptiveAvgPool3d,
    torch.relu: lambda inplace=False: nn.ReLU(),
    F.relu: lambda inplace=False: nn.ReLU(),
    torch.tanh: nn.Tanh,
    F.tanh: nn.Tanh,
    torch.sigmoid: nn.Sigmoid,
    F.sigmoid: nn.Sigmoid,
    F.leaky_relu: lambda negative_slope=0.01, inplace=False: nn.LeakyReLU(
        negative_slope
    ),
    F.gelu: lambda approximate="none": nn.GELU(approximate),
    F.silu: lambda inplace=False: nn.SiLU(),
}
_ACTIVATION_METHODS: dict[str, Callable[[], Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
#: Entries of a module's ``__dict__`` that are not plain attributes.
_INTERNAL = frozenset(
    {
        "_parameters",
        "_buffers",
        "_modules",
        "_non_persistent_buffers_set",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_is_full_backward_hook",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    }
)


def _traceable(model: Module) -> bool:
    """Whether ``model`` consists of supported layers and plain containers only."""
    for module in model.modules():
        cls = type(module)
        if cls in SUPPORTED_LAYERS or cls in _CONTAINERS:
            continue
        if cls.__module__.startswith("torch."):
            return False  # a PyTorch layer the chain does not know
        if module._parameters or module._buffers:
            return False  # a custom module with tensors of its own
    return True


def _plain_attributes(module: Module) -> dict[str, Any]:
    return {k: v for k, v in module.__dict__.items() if k not in _INTERNAL}


#: Augmented assignments and the functions their graph nodes record.
_AUGMENTED = {
    "__iadd__": operator.iadd,
    "__isub__": operator.isub,
    "__imul__": operator.imul,
    "__itruediv__": operator.itruediv,
    "__ifloordiv__": operator.ifloordiv,
    "__imod__": operator.imod,
    "__ipow__": operator.ipow,
    "__imatmul__": operator.imatmul,
    "__iand__": operator.iand,
    "__ior__": operator.ior,
    "__ixor__": operator.ixor,
    "__ilshift__": operator.ilshift,
    "__irshift__": operator.irshift,
}


class _AugmentedProxy(fx.Proxy):
    """A proxy that records ``h += t`` as ``operator.iadd`` (not as ``h + t``).

    :mod:`torch.fx`'s own proxies have no in-place operators, so Python runs
    ``h = h + t`` for ``h += t``; on a tensor the model changes ``h`` in place, and
    another name that still refers to it sees the change. The recorded
    ``operator.i*`` node lets the in-place check see it too.
    """


def _augmented(function: Callable[[Any, Any], Any]) -> Callable[..., fx.Proxy]:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", function, (self, other), {})

    return method


for _name, _function in _AUGMENTED.items():
    setattr(_AugmentedProxy, _name, _augmented(_function))


class _Tracer(fx.Tracer):
    """:class:`torch.fx.Tracer` whose proxies record augmented assignments."""

    def proxy(self, node: fx.Node) -> fx.Proxy:  # noqa: D102
        return _AugmentedProxy(node, self)


def _trace(model: Module) -> fx.Graph:
    """Trace ``model.forward`` symbolically and restore the attributes it set."""
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _Tracer().trace(model)
    finally:
        for module, attributes in saved:
            for key in set(module.__dict__) - set(attributes):
                del module.__dict__[key]
            module.__dict__.update(attributes)


def _shape_value(node: Any, current: fx.Node, h: Tensor) -> Any:
    """Evaluate an argument of a reshape: constants, and sizes of the input ``h``."""
    if isinstance(node, (list, tuple)):
        return type(node)(_shape_value(a, current, h) for a in node)
    if not isinstance(node, fx.Node):
        return node
    if node is current:
        return h
    args = [_shape_value(a, current, h) for a in node.args]
    if node.op == "call_method" and node.target == "size":
        return args[0].size(*args[1:])
    if node.op == "call_function" and node.target is getattr and args[1] == "shape":
        return args[0].shape
    if node.op == "call_function" and node.target is operator.getitem:
        return args[0][args[1]]
    # unreachable: _is_shape_node admitted only the forms above
    raise ChainNotApplicable(f"unsupported shape argument {node}")  # pragma: no cover


def _shape_base(node: fx.Node) -> fx.Node | None:
    """The value whose sizes ``node`` reads (``size()``, ``.shape``, indexing them)."""
    if node.op == "call_method" and node.target == "size" and not node.kwargs:
        return node.args[0]
    if node.op == "call_function" and node.target is getattr:
        return node.args[0] if node.args[1] == "shape" else None
    if node.op == "call_function" and node.target is operator.getitem:
        base = node.args[0]
        return _shape_base(base) if isinstance(base, fx.Node) else None
    return None


def _is_shape_node(node: fx.Node, current: fx.Node) -> bool:
    """Whether ``node`` only reads sizes of ``current`` (or of such a node)."""

    def reads_shape_of(arg: Any) -> bool:
        return arg is current or (
            isinstance(arg, fx.Node) and _is_shape_node(arg, current)
        )

    if node.op == "call_method" and node.target == "size":
        return node.args[0] is current and not node.kwargs
    if node.op == "call_function" and node.target is getattr:
        return node.args[0] is current and node.args[1] == "shape"
    if node.op == "call_function" and node.target is operator.getitem:
        base = node.args[0]
        return isinstance(base, fx.Node) and _is_shape_node(base, current)
    return False


def _uses_only(node: fx.Node, current: fx.Node) -> bool:
    """Whether ``node``'s tensor inputs are ``current`` (first) and shapes of it."""
    inputs = node.all_input_nodes
    if not inputs or node.args[:1] != (current,):
        return False
    return all(n is current or _is_shape_node(n, current) for n in inputs)


def _reshape(node: fx.Node, current: fx.Node) -> Callable[[Tensor], Tensor]:
    method = node.op == "call_method"
    target = node.target
    args, kwargs = node.args[1:], dict(node.kwargs)

    def reshape(h: Tensor) -> Tensor:
        values = _shape_value(args, current, h)
        keywords = {k: _shape_value(v, current, h) for k, v in kwargs.items()}
        if method:
            return getattr(h, target)(*values, **keywords)
        return target(h, *values, **keywords)

    return reshape


def _graph_calls(
    model: Module, graph: fx.Graph
) -> tuple[list[Call], list[tuple[int, ...]]]:
    """The calls of a traced graph and the values each reads (raises :class:`_NotAChain`).

    Values: 0 is the input, ``j + 1`` the output of call ``j`` (see
    :class:`~curvlinops_fisher.closed_form.protocol.CallGraph`).
    """
    calls: list[Call] = []
    sources: list[tuple[int, ...]] = []
    in_place: list[bool] = []
    aliases: list[bool] = []
    value_of: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            if value_of:
                raise _NotAChain("more than one input")
            value_of[node] = 0
            continue
        if node.op == "output":
            if node.args != (node.args[0],) or value_of.get(node.args[0]) != len(calls):
                raise _NotAChain("the output is not the last operation's")
            continue
        if _shape_base(node) is not None:
            continue  # evaluated by the reshape that uses it
        if _is_add(node):
            if not all(a in value_of for a in node.args):
                raise _NotAChain(f"{node} adds something other than two values")
            calls.append(ADD)
            sources.append(tuple(value_of[a] for a in node.args))
            augmented = node.target is operator.iadd  # ``a += b`` changes ``a``
            in_place.append(augmented)
            aliases.append(augmented)
        else:
            base = node.args[0] if node.args else None
            if base not in value_of or not _uses_only(node, base):
                raise _NotAChain(f"{node} does not take one earlier value alone")
            if node.op == "call_module":
                if len(node.args) != 1 or node.kwargs:
                    raise _NotAChain(f"{node} has further arguments")
                module = model.get_submodule(node.target)
                calls.append((node.target, module))
                changes = bool(getattr(module, "inplace", False))
                passes = isinstance(module, (*PASS_THROUGH, nn.Flatten))
                in_place.append(changes)
                aliases.append(changes or passes)
            else:
                calls.append(_function_call(node, base))
                changes = _in_place_argument(node)
                in_place.append(changes)
                aliases.append(changes or not isinstance(calls[-1], tuple))
            sources.append((value_of[base],))
        value_of[node] = len(calls)
    _check_values(sources, in_place, aliases)
    return calls, sources


def _check_values(
    sources: list[tuple[int, ...]], in_place: list[bool], aliases: list[bool]
) -> None:
    """Every value is used, and no value is read after it was changed in place.

    Values that may share memory form one alias class: a call whose output may be
    its (first) input itself or a view of it (a reshape, a pass-through layer, an
    in-place operation) joins its output to its input's class. An in-place call
    ``i`` changes every value of its input's class that exists when it runs (the
    values ``0 .. i``); the model computes what a graph of the values says only if
    no later call reads one of them, and the input (value 0, the caller's data)
    is never changed.

    Raises:
        _NotAChain: If a value is unused, or an in-place change is visible.
    """
    reads: dict[int, int] = {}
    for values in sources:
        for v in values:
            reads[v] = reads.get(v, 0) + 1
    if set(reads) != set(range(len(sources))):  # the last value is the output
        raise _NotAChain("an operation's output is not used")
    root = list(range(len(sources) + 1))

    def find(v: int) -> int:
        while root[v] != v:
            v = root[v]
        return v

    for i, values in enumerate(sources):
        if aliases[i]:
            root[i + 1] = find(values[0])
    for i, values in enumerate(sources):
        if not in_place[i]:
            continue
        changed = find(values[0])
        if changed == find(0):
            raise _NotAChain("an in-place operation on the model's input")
        for later in sources[i + 1 :]:
            if any(v <= i and find(v) == changed for v in later):
                raise _NotAChain("a value is read after an in-place change")


def _is_add(node: fx.Node) -> bool:
    """Whether ``node`` is ``a + b`` (or ``a += b``) of two tensors, without ``alpha``."""
    function = node.op == "call_function" and node.target in (
        operator.add,
        operator.iadd,
        torch.add,
    )
    method = node.op == "call_method" and node.target == "add"
    return (
        (function or method)
        and len(node.args) == 2
        and not node.kwargs
        and all(isinstance(a, fx.Node) for a in node.args)
    )


def _in_place_argument(node: fx.Node) -> bool:
    """Whether a function call passes ``inplace=True`` (by keyword or position)."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # a builtin without a signature: no inplace
        return False
    return bool(bound.arguments.get("inplace", False))


def _function_call(node: fx.Node, current: fx.Node) -> Call:
    """The call of a function or method node: an activation or a reshape."""
    constant_args = not any(
        isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())
    )
    if node.op == "call_method" and node.target in _RESHAPE_METHODS:
        return _reshape(node, current)
    if node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS:
        return _reshape(node, current)
    if constant_args and node.op == "call_function":
        factory = _LAYER_FUNCTIONS.get(node.target)
        if factory is not None:
            return ("", factory(*node.args[1:], **node.kwargs))
    if constant_args and node.op == "call_method" and len(node.args) == 1:
        factory = _ACTIVATION_METHODS.get(node.target)
        if factory is not None:
            return ("", factory())
    raise _NotAChain(f"unsupported operation {node}")


def traced_calls(model: Module) -> CallGraph | None:
    """The graph of calls of ``model.forward``, or ``None`` (see the module).

    Args:
        model: The model.

    Returns:
        The calls in order (``(qualified name, module)`` for layers, including
        modules made up for activation and pooling functions, reshape functions and
        :data:`~curvlinops_fisher.closed_form.protocol.ADD`), every module of the
        model with its type, the guard of what the trace baked in, and the values
        each call reads; or ``None`` if the model does not trace to a supported
        graph.
    """
    if not isinstance(model, Module) or not _traceable(model):
        return None
    try:
        graph = _trace(model)
        calls, sources = _graph_calls(model, graph)
    except Exception:  # not traceable, or not a chain: the AD path handles it
        return None
    modules = [(m, type(m)) for m in model.modules()]
    try:
        guard = _state_guard(model, modules)
    except Uncoverable:  # forward may read state no snapshot describes
        return None
    return CallGraph(calls, modules, (guard,), sources)


def _state_guard(
    model: Module, modules: list[tuple[Module, type[Module]]]
) -> Callable[[], bool]:
    """A guard that is true while nothing the trace of ``model`` read has changed.

    It covers, for every module the trace went through (not the supported layers,
    whose steps read their attributes at product time): its class and the class's
    ``forward``, its plain attributes deeply (containers, configuration objects),
    the attributes of its class and its bases below ``nn.Module``, the globals and
    closure variables the functions of those classes refer to (and of the helper
    functions they reach), and its children. For every module: the ``inplace``
    flags (the in-place check read them).

    Raises:
        Uncoverable: If some of that state cannot be snapshot (see
            :mod:`curvlinops_fisher.state_snapshot`).
    """
    traced_through = [m for m, cls in modules if cls not in SUPPORTED_LAYERS]
    classes = classes_below([type(m) for m in traced_through], Module)
    references = code_references(class_functions(classes))
    in_place_flags = [
        m for m, _ in modules if isinstance(getattr(m, "inplace", None), bool)
    ]

    def state() -> tuple:
        return (
            tuple(m.inplace for m in in_place_flags),
            tuple(
                (type(m), type(m).forward, tuple(m._modules.items()))
                for m in traced_through
            ),
            snapshot([_plain_attributes(m) for m in traced_through]),
            class_state(classes),
            references_state(references),
        )

    return guard_of(state)
