r"""Chains of layers behind a custom ``forward``, found with :mod:`torch.fx`.

Most models are not an ``nn.Sequential`` but a class whose ``forward`` calls its
layers one after the other (``self.head(self.features(x))``, or a loop over a
``ModuleList``, with a ``view`` or ``torch.relu`` in between). :func:`traced_calls`
traces such a ``forward`` once, symbolically, and returns its calls when they form a
chain that :mod:`curvlinops_fisher.sequential` can linearize in closed form: each
operation takes the previous one's output and nothing else (no residual connection,
no second input), and each is

- a call of a supported layer (see :mod:`curvlinops_fisher.sequential`),
- ``torch.relu`` / ``tanh`` / ``sigmoid`` or their ``torch.nn.functional`` or method
  forms, ``F.leaky_relu``, ``F.gelu``, ``F.silu``, ``F.max_pool*d``, ``F.avg_pool*d``
  and ``F.adaptive_avg_pool*d``, all with constant arguments,
- a reshape that keeps the order of the elements (``view``, ``reshape``,
  ``flatten``, ``unflatten``, ``squeeze``, ``unsqueeze``, ``contiguous``, and the
  ``torch`` functions of the same names), with sizes that are constants or read
  from the input's shape (``x.view(x.size(0), -1)``).

Only models made of supported layers and plain containers are traced at all (a
class of ``torch.nn`` other than those, or a module with parameters or buffers of its
own, stops the search before tracing). Tracing runs ``forward`` once on symbolic
values; attributes it sets are restored afterwards.

What the trace bakes in is guarded before every product: the classes' ``forward``
functions, the plain attributes of every traced-through module (flags such as
``self.use_relu`` or ``training`` that ``forward`` may branch on) and the children of
every container. A change to any of them sends products back to the AD path, which
runs the model's ``forward`` itself. A ``forward`` that reads a global variable is
beyond these guards; switch the closed form off with
``curvlinops_fisher.core.SEQUENTIAL_CHAIN_PRODUCTS = False`` for such a model.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn import Module
from torch.nn import functional as F

from curvlinops_fisher.sequential import (
    AVERAGE_POOLINGS,
    BATCH_NORMS,
    CLOSED_FORM_ACTIVATIONS,
    CONVOLUTIONS,
    ELEMENTWISE_ACTIVATIONS,
    MAX_POOLINGS,
    PASS_THROUGH,
    Call,
    ChainNotApplicable,
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

TracedCalls = tuple[
    list[Call], list[tuple[Module, type[Module]]], tuple[Callable[[], bool], ...]
]


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


def _same(a: Any, b: Any) -> bool:
    """Identity, or equal values of the same plain type (equal ints need not be one object)."""
    return a is b or (type(a) is type(b) and type(a) in (int, float, str) and a == b)


def _trace(model: Module) -> fx.Graph:
    """Trace ``model.forward`` symbolically and restore the attributes it set."""
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fx.Tracer().trace(model)
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


def _graph_calls(model: Module, graph: fx.Graph) -> list[Call]:
    """The chain of calls of a traced graph (raises :class:`_NotAChain`)."""
    calls: list[Call] = []
    current: fx.Node | None = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise _NotAChain("more than one input")
            current = node
        elif node.op == "output":
            if node.args != (current,):
                raise _NotAChain("the output is not the last operation's")
        elif current is not None and _is_shape_node(node, current):
            continue  # evaluated by the reshape that uses it
        elif not _uses_only(node, current):
            raise _NotAChain(f"{node} does not take the previous output alone")
        elif node.op == "call_module":
            if len(node.args) != 1 or node.kwargs:
                raise _NotAChain(f"{node} has further arguments")
            calls.append((node.target, model.get_submodule(node.target)))
            current = node
        else:
            calls.append(_function_call(node, current))
            current = node
    return calls


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


def traced_calls(model: Module) -> TracedCalls | None:
    """The chain of calls of ``model.forward``, or ``None`` (see the module).

    Args:
        model: The model.

    Returns:
        The calls in order (``(qualified name, module)`` for layers, including
        modules made up for activation functions, and reshape functions), every
        module of the model with its type, and the guards of what the trace baked
        in; or ``None`` if the model does not trace to a supported chain.
    """
    if not isinstance(model, Module) or not _traceable(model):
        return None
    try:
        graph = _trace(model)
        calls = _graph_calls(model, graph)
    except Exception:  # not traceable, or not a chain: the AD path handles it
        return None
    modules = [(m, type(m)) for m in model.modules()]
    traced_through = [m for m, cls in modules if cls not in SUPPORTED_LAYERS]
    snapshot = [
        (m, type(m).forward, _plain_attributes(m), tuple(m._modules.items()))
        for m in traced_through
    ]

    def unchanged() -> bool:
        for module, forward, attributes, children in snapshot:
            if type(module).forward is not forward:
                return False
            if tuple(module._modules.items()) != children:
                return False
            current = _plain_attributes(module)
            if current.keys() != attributes.keys() or not all(
                _same(current[k], v) for k, v in attributes.items()
            ):
                return False
        return True

    return calls, modules, (unchanged,)
