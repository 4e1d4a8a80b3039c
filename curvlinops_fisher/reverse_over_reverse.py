r"""Reverse-over-reverse linearization: models with an op that has no forward mode.

Some operations have no forward-mode derivative in PyTorch (``nn.EmbeddingBag``'s
``_embedding_bag``, custom ``torch.autograd.Function`` classes without ``jvp``).
For a model with one, the Jacobian-vector product is computed as the VJP of a VJP:
:math:`\mathbf{u} \mapsto \mathbf{J}^\top\mathbf{u}` is linear in
:math:`\mathbf{u}`, so its VJP with cotangent :math:`\mathbf{v}` at any point
(zero) is :math:`\mathbf{J}\mathbf{v}`. This needs a differentiable backward pass;
where that is missing too, :class:`~curvlinops_fisher.errors.UnsupportedOperationError`
names the operation and the layer. :func:`curvlinops_fisher.core.linearize` switches
to this path on the first product that fails in forward mode and keeps the
diagnosis on the model function.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.func import vjp, vmap
from torch.nn import Module
from torch.overrides import TorchFunctionMode

from curvlinops_fisher.data import ModelInput
from curvlinops_fisher.errors import UnsupportedOperationError
from curvlinops_fisher.linearization import Linearization, ModelFunction

#: PyTorch's messages for an operation without forward-mode derivative: a built-in
#: operator (its name in group 1) or a custom ``autograd.Function`` without ``jvp``.
_NO_FORWARD_AD = re.compile(
    r"Trying to use forward AD with (\S+) that does not support it"
    r"|You must implement the jvp function for custom autograd\.Function"
)
#: PyTorch's messages for a backward pass that cannot be differentiated.
_NO_DOUBLE_BACKWARD = re.compile(
    r"the derivative for '?([^' ]+)'? is not implemented"
    r"|trying to differentiate twice a function that was marked with"
    r"|appears to not have been used in the graph"
    r"|does not require grad and does not have a grad_fn"
)
#: What to do about an operation's layer, by operation (ends the error message).
_HINTS = {
    "_embedding_bag": (
        " nn.EmbeddingBag works in modes 'sum' and 'mean' without max_norm and "
        "scale_grad_by_freq; otherwise use nn.Embedding followed by the reduction."
    ),
}


@dataclass
class ForwardADFailure:
    """Why a model function's products do not use forward mode.

    Attributes:
        op: The operation without forward-mode derivative (PyTorch's name, or the
            class of a custom ``torch.autograd.Function``).
        layer: The module that ran it, e.g. ``"'0' (EmbeddingBag)"``; ``None`` if
            unknown (a model function that is not a module).
        message: PyTorch's error message.
        checked: Whether reverse-over-reverse passed :func:`_check_adjoint`.
    """

    op: str
    layer: str | None
    message: str
    checked: bool = False

    def where(self) -> str:
        """The operation and its layer, for messages."""
        return self.op if self.layer is None else f"{self.op} in layer {self.layer}"


def missing_forward_ad(error: BaseException) -> re.Match[str] | None:
    """Whether ``error`` is PyTorch's for an operation without forward-mode AD."""
    return _NO_FORWARD_AD.search(str(error))


def diagnose_forward_ad_failure(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    V: tuple[Tensor, ...],
    error: BaseException,
) -> ForwardADFailure:
    """Name the operation without forward-mode derivative and the layer that ran it.

    Runs the forward pass with the first column's tangent again (dual numbers, no
    autograd) under module hooks that keep the stack of running modules: the
    innermost one when the error is raised ran the operation. Only on the failure
    path, once per model function.

    Args:
        model_function: ``f(param_values, X)``; a layer is named only if it has a
            ``model`` (:class:`~curvlinops_fisher.model_function.ModuleFunction`).
        params: Parameter values.
        X: Batch input.
        V: Columns with a leading axis.
        error: The error of the forward-mode product.

    Returns:
        The diagnosis.
    """

    def dual_forward() -> None:
        with torch.no_grad(), forward_ad.dual_level():
            duals = tuple(
                forward_ad.make_dual(p.detach(), v[0]) for p, v in zip(params, V)
            )
            model_function(duals, X)

    model = getattr(model_function, "model", None)
    layer, dual_error = None, None
    if isinstance(model, Module):
        layer, dual_error = _running_layer(model, dual_forward)
    return ForwardADFailure(_operation_name(dual_error or error), layer, str(error))


def _running_layer(
    model: Module, run: Callable[[], None]
) -> tuple[str | None, BaseException | None]:
    """The innermost module of ``model`` running when ``run()`` raises, and the error.

    Returns:
        ``(layer, error)``, both ``None`` if ``run()`` does not raise.
    """
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    running: list[Module] = []

    def enter(module: Module, args: object) -> None:
        running.append(module)

    def leave(module: Module, args: object, output: object) -> None:
        running.pop()

    handles = [
        hook
        for module in model.modules()
        for hook in (
            module.register_forward_pre_hook(enter),
            module.register_forward_hook(leave),
        )
    ]
    try:
        run()
    except RuntimeError as error:
        if not running:
            return None, error
        module = running[-1]
        name = names.get(id(module), "")
        kind = type(module).__name__
        return (f"'{name}' ({kind})" if name else f"the model itself ({kind})"), error
    finally:
        for hook in handles:
            hook.remove()
    return None, None


def _operation_name(error: BaseException) -> str:
    """The operation PyTorch's forward-mode ``error`` is about.

    The operator's name from the message, else the custom ``autograd.Function``
    whose (missing) ``jvp`` raised it, found in the traceback.
    """
    match = missing_forward_ad(error)
    if match is not None and match.group(1):
        return match.group(1)
    for frame, _ in traceback.walk_tb(error.__traceback__):
        function = getattr(type(frame.f_locals.get("ctx")), "_forward_cls", None)
        if function is not None:
            return f"autograd.Function {function.__qualname__}"
    return "an operation"


def linearize_reverse_over_reverse(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    V: tuple[Tensor, ...],
    failure: ForwardADFailure | None = None,
) -> Linearization:
    r"""Jacobian-vector products as the VJP of the VJP (no forward mode needed).

    The VJP :math:`\mathbf{u} \mapsto \mathbf{J}^\top \mathbf{u}` is linear in
    :math:`\mathbf{u}`, so its own VJP with cotangent :math:`\mathbf{v}` is
    :math:`(\mathbf{J}^\top)^\top \mathbf{v} = \mathbf{J}\mathbf{v}`, at any
    :math:`\mathbf{u}` (here :math:`\mathbf{0}`). Cost: one recorded forward pass,
    one backward pass that records its own graph, and the backward pass of that
    graph batched over the ``K`` columns (``vmap``); then the VJP of the
    cotangents as in :func:`~curvlinops_fisher.linearization.linearize_columns`. Exact: the same derivatives as
    forward mode, by reverse mode only, for models with an operation that has no
    forward-mode derivative.

    Operations whose backward pass PyTorch cannot differentiate run as exact
    compositions of operations that it can (:class:`_TwiceDifferentiableOps`). On
    the first product of a model function the result is checked against the
    adjoint identity (:func:`_check_adjoint`): PyTorch silently drops the
    derivative of a ``@once_differentiable`` backward under ``torch.func``.

    Args:
        model_function: ``f(param_values, X)``.
        params: Parameter values.
        X: Batch input.
        V: Columns with a leading axis, ``V[i]`` of shape ``(K, *params[i].shape)``.
        failure: The forward-mode failure that led here (names the operation in
            errors; records the adjoint check).

    Returns:
        See :func:`linearize`.

    Raises:
        UnsupportedOperationError: If the backward pass cannot be differentiated.
    """

    def forward(param_values: tuple[Tensor, ...]) -> Tensor:
        with _TwiceDifferentiableOps():
            return model_function(param_values, X)

    # (no_grad: see linearize_columns)
    with torch.no_grad():
        output, vjp_fn = vjp(forward, params)
        try:
            _, transposed_vjp_fn = vjp(vjp_fn, torch.zeros_like(output))
            JV = vmap(lambda v: transposed_vjp_fn((v,))[0])(V)
        except RuntimeError as error:
            if _NO_DOUBLE_BACKWARD.search(str(error)) is None:
                raise
            raise _unsupported_operation(
                failure, str(error).strip().rstrip(".")
            ) from error
        if failure is None or not failure.checked:
            _check_adjoint(vjp_fn, V, JV, failure)

    def backward(cotangents: Tensor, out: tuple[Tensor, ...]) -> None:
        with torch.no_grad():
            (result,) = vmap(vjp_fn)(cotangents)
            for acc, r in zip(out, result):
                acc.add_(r)

    return output, JV, backward


def _check_adjoint(
    vjp_fn: Callable[[Tensor], tuple[tuple[Tensor, ...]]],
    V: tuple[Tensor, ...],
    JV: Tensor,
    failure: ForwardADFailure | None,
) -> None:
    r"""Check the adjoint identity of the VJP of the VJP for a random vector.

    :math:`\langle \mathbf{u}, \mathbf{J}\mathbf{v}_k \rangle = \langle
    \mathbf{J}^\top \mathbf{u}, \mathbf{v}_k \rangle` for every column. The right
    side takes the first-order VJP only. A part of the VJP of the VJP that PyTorch
    silently drops makes the sides differ for almost every :math:`\mathbf{u}`.
    Tolerance: :math:`\sqrt{\epsilon}` times the Cauchy-Schwarz bound of both
    sides. :math:`\mathbf{u}` comes from a private generator (the global RNG is
    untouched). Sets ``failure.checked`` if it holds.

    Raises:
        UnsupportedOperationError: If it does not hold.
    """
    generator = torch.Generator(device=JV.device).manual_seed(0)
    u = torch.randn(JV.shape[1:], generator=generator, dtype=JV.dtype, device=JV.device)
    (JTu,) = vjp_fn(u)
    lhs = JV.flatten(1) @ u.flatten()
    rhs = sum(v.flatten(1) @ g.flatten() for v, g in zip(V, JTu))
    V_norms = torch.stack([v.flatten(1).norm(dim=1) for v in V]).norm(dim=0)
    JTu_norm = torch.stack([g.norm() for g in JTu]).norm()
    bound = JV.flatten(1).norm(dim=1) * u.norm() + V_norms * JTu_norm
    if bool(((lhs - rhs).abs() > torch.finfo(JV.dtype).eps ** 0.5 * bound).any()):
        raise _unsupported_operation(
            failure,
            "PyTorch silently drops the derivative of its backward pass, e.g. of a "
            "@once_differentiable backward: <u, J v> != <J^T u, v> for a random u",
        )
    if failure is not None:
        failure.checked = True


def _unsupported_operation(
    failure: ForwardADFailure | None, detail: str
) -> UnsupportedOperationError:
    """The error for an operation with neither forward mode nor double backward."""
    op = failure.op if failure is not None else "an operation"
    where = failure.where() if failure is not None else op
    return UnsupportedOperationError(
        f"The model's {where} has no forward-mode derivative, and the backward pass "
        f"cannot be differentiated either ({detail}), so curvature products cannot "
        "compute Jacobian-vector products: neither by forward mode nor as the VJP of "
        "the VJP. Give the operation a forward-mode derivative (for a custom "
        "torch.autograd.Function: a jvp staticmethod) or a backward pass built from "
        "differentiable operations (without @once_differentiable), or replace the "
        "layer by operations that have one." + _HINTS.get(op, ""),
        op,
        failure.layer if failure is not None else None,
    )


class _TwiceDifferentiableOps(TorchFunctionMode):
    """Exact compositions for functions whose backward PyTorch cannot differentiate.

    ``F.embedding_bag`` (modes ``sum`` and ``mean``): its backward
    ``_embedding_bag_backward`` has no derivative in PyTorch, so the VJP of its VJP
    fails. Under this mode it runs as :func:`_embedding_bag_composed` (a row
    lookup and a sum per bag), the same function built from operations whose
    backward passes are differentiable. Every other call runs unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func is torch.nn.functional.embedding_bag:
            composed = _embedding_bag_composed(*args, **kwargs)
            if composed is not None:
                return composed
        return func(*args, **kwargs)


def _embedding_bag_composed(
    input: Tensor,
    weight: Tensor,
    offsets: Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> Tensor | None:
    r"""``F.embedding_bag`` from a row lookup and a sum per bag (same arguments).

    Bag :math:`b` of indices :math:`I_b` (entries equal to ``padding_idx`` left out)
    gives :math:`\sum_{i \in I_b} s_i \mathbf{W}_{x_i}` (mode ``sum``, per-sample
    weights :math:`s_i`, default 1) or that sum over :math:`|I_b|` (mode ``mean``;
    empty bags give zeros). ``sparse`` only changes the layout of PyTorch's
    gradient, not the function.

    Returns:
        The bags' embeddings ``(num_bags, D)``, or ``None`` where this composition
        does not apply (mode ``max``, ``max_norm`` renormalizes the weight in
        place, ``scale_grad_by_freq`` changes the gradient, or inputs PyTorch
        rejects): the caller then runs PyTorch's function.
    """
    if (
        mode not in ("sum", "mean")
        or max_norm is not None
        or scale_grad_by_freq
        or input.is_floating_point()
        or input.dim() not in (1, 2)
        or (input.dim() == 2) != (offsets is None)
        or (per_sample_weights is not None and mode != "sum")
    ):
        return None
    if input.dim() == 2:
        num_bags, length = input.shape
        bags = torch.arange(num_bags, device=input.device).repeat_interleave(length)
        keep = torch.ones(input.numel(), dtype=torch.bool, device=input.device)
    else:
        starts = offsets[:-1] if include_last_offset else offsets
        num_bags = starts.numel()
        positions = torch.arange(input.numel(), device=input.device)
        bags = torch.bucketize(positions, starts, right=True) - 1
        keep = bags >= 0
        if include_last_offset:
            keep &= positions < offsets[-1]
        bags = bags.clamp(min=0)
    input = input.flatten()
    if padding_idx is not None:
        keep &= input != padding_idx % weight.shape[0]
    rows = weight.index_select(0, input)
    scale = keep.to(weight.dtype)
    if per_sample_weights is not None:
        scale = scale * per_sample_weights.flatten()
    if per_sample_weights is not None or not bool(keep.all()):
        rows = rows * scale.unsqueeze(-1)
    out = rows.new_zeros(num_bags, weight.shape[1]).index_add(0, bags, rows)
    if mode == "mean":
        sizes = scale.new_zeros(num_bags).index_add(0, bags, keep.to(weight.dtype))
        out = out / sizes.clamp(min=1).unsqueeze(-1)
    return out
