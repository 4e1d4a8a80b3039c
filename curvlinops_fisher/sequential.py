r"""Closed-form linearization of ``nn.Sequential`` chains of linear layers.

For a model that is an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise
activations (an MLP), the Jacobian-vector and vector-Jacobian products of a product
are written out layer by layer instead of being derived by forward-mode and reverse
AD. For a linear layer :math:`\mathbf{z} = \mathbf{x}\mathbf{W}^\top + \mathbf{b}`
and an activation :math:`\mathbf{h} = \sigma(\mathbf{z})`, with ``K`` tangent
columns :math:`\dot{\mathbf{x}}_k` and parameter directions
:math:`(\dot{\mathbf{W}}_k, \dot{\mathbf{b}}_k)`:

.. math::
    \dot{\mathbf{z}}_k = \dot{\mathbf{x}}_k \mathbf{W}^\top
        + \mathbf{x}\dot{\mathbf{W}}_k^\top + \dot{\mathbf{b}}_k, \qquad
    \dot{\mathbf{h}}_k = \sigma'(\mathbf{z}) \odot \dot{\mathbf{z}}_k,

and backwards, for cotangents :math:`\mathbf{g}_k` of :math:`\mathbf{z}`:

.. math::
    \bar{\mathbf{W}}_k = \mathbf{g}_k^\top \mathbf{x}, \qquad
    \bar{\mathbf{b}}_k = \mathbf{g}_k^\top \mathbf{1}, \qquad
    \bar{\mathbf{x}}_k = \mathbf{g}_k \mathbf{W}, \qquad
    \bar{\mathbf{z}}_k = \sigma'(\mathbf{z}) \odot \bar{\mathbf{h}}_k.

Compared with dual numbers and a recorded backward pass this skips the matrix
product with the (zero) tangent of the data, stores only the layer inputs and
:math:`\sigma'` (no tangent activations), stops the backward pass at the first
differentiated layer, and has no autograd bookkeeping. The numbers agree with the
AD path to rounding.

Which models qualify (checked at construction and, for what can change later, before
every product; anything else takes the AD path): the model is an ``nn.Sequential``
(nested ones are unrolled) of exactly these types: ``nn.Linear``, the elementwise
activations of :data:`CLOSED_FORM_ACTIVATIONS` and :data:`ELEMENTWISE_ACTIVATIONS`,
``nn.Flatten``, ``nn.Identity`` and ``nn.Dropout`` in eval mode (or with ``p = 0``);
no module has hooks, a parametrization or an instance-level ``forward``; no global
module hooks are registered; the input is a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn import Module
from torch.nn import modules as torch_modules

#: ``(output, JVPs, backward)`` as in :func:`curvlinops_fisher.core.linearize`;
#: ``backward(cotangents, out)`` adds the VJPs to ``out``.
Linearization = tuple[Tensor, Tensor, Callable[[Tensor, tuple[Tensor, ...]], None]]
#: Backward rule of one step: ``rule(g, out)`` takes the cotangents of its output,
#: adds its parameters' VJPs to ``out`` (tied weights add up) and returns the
#: cotangents of its input (``None`` where no earlier step needs them).
BackwardRule = Callable[[Tensor, tuple[Tensor, ...]], Tensor | None]
#: What a step returns for its input ``h`` and tangents ``dh`` (``(K, *h.shape)``,
#: ``None`` before the first differentiated layer): its output, the output's tangents
#: and its backward rule (``None`` where no backward pass reaches it).
StepResult = tuple[Tensor, Tensor | None, BackwardRule | None]


class _Point(NamedTuple):
    """The linearization point and the directions of a product.

    Attributes:
        params: Parameter values.
        V: Columns with a leading axis, ``V[i]`` of shape ``(K, *params[i].shape)``.
    """

    params: Sequence[Tensor]
    V: Sequence[Tensor]


def _relu(z: Tensor) -> tuple[Tensor, Tensor]:
    h = torch.relu(z)
    return h, (h > 0).to(h.dtype)


def _tanh(z: Tensor) -> tuple[Tensor, Tensor]:
    h = torch.tanh(z)
    return h, 1 - h * h


def _sigmoid(z: Tensor) -> tuple[Tensor, Tensor]:
    h = torch.sigmoid(z)
    return h, (1 - h) * h


def _leaky_relu(z: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    h = torch.nn.functional.leaky_relu(z, slope)
    return h, torch.ones_like(z).masked_fill_(z <= 0, slope)


#: Activations with :math:`\sigma'` in closed form: type -> ``(module, z) -> (σ(z), σ'(z))``.
#: The derivatives at kinks are PyTorch's (ReLU: 0 at 0; LeakyReLU: the slope at 0).
CLOSED_FORM_ACTIVATIONS: dict[
    type[Module], Callable[[Module, Tensor], tuple[Tensor, Tensor]]
] = {
    nn.ReLU: lambda module, z: _relu(z),
    nn.Tanh: lambda module, z: _tanh(z),
    nn.Sigmoid: lambda module, z: _sigmoid(z),
    nn.LeakyReLU: lambda module, z: _leaky_relu(z, module.negative_slope),
}

#: Parameter-free elementwise activations whose :math:`\sigma'` comes from one
#: forward-mode derivative of the module with a unit tangent (PyTorch's own rule).
ELEMENTWISE_ACTIVATIONS: tuple[type[Module], ...] = (
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Softshrink,
    nn.Hardshrink,
)

_PASS_THROUGH = (nn.Identity, nn.Dropout)
_GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


@dataclass(frozen=True)
class _Linear:
    """An ``nn.Linear`` step; ``weight`` / ``bias``: slots in ``params`` or ``None``."""

    module: nn.Linear
    weight: int | None
    bias: int | None

    def forward(self, h: Tensor, dh: Tensor | None, point: _Point) -> StepResult:
        """Primal, tangents ``(K, *z.shape)`` and backward rule of the layer."""
        params, V = point
        W = self.module.weight if self.weight is None else params[self.weight]
        b = self.module.bias if self.bias is None else params[self.bias]
        z = torch.nn.functional.linear(h, W, b)
        dz = None if dh is None else torch.matmul(dh, W.mT)
        if self.weight is not None:
            dW = V[self.weight]
            K, out = dW.shape[0], dW.shape[1]
            # One matrix product for all columns: x [.., in] @ [in, K out].
            term = torch.nn.functional.linear(h, dW.reshape(K * out, -1))
            term = term.unflatten(-1, (K, out)).movedim(-2, 0)
            dz = term if dz is None else dz.add_(term)
        if self.bias is not None:
            db = V[self.bias]
            db = db.reshape(db.shape[0], *[1] * (z.ndim - 1), db.shape[1])
            dz = db.expand(db.shape[0], *z.shape) if dz is None else dz + db
        if dz is None:  # a frozen layer before any differentiated one
            return z, None, None
        return z, dz, self._backward_rule(h, W, needs_input_grad=dh is not None)

    def _backward_rule(
        self, h: Tensor, W: Tensor, needs_input_grad: bool
    ) -> BackwardRule:
        def backward(g: Tensor, out: tuple[Tensor, ...]) -> Tensor | None:
            K, width = g.shape[0], g.shape[-1]
            if self.weight is not None:
                # g_k^T x for all k as one matrix product [K out, M] @ [M, in],
                # accumulated by the product itself where the target allows.
                g_rows = g.movedim(0, -2).reshape(-1, K * width)
                x_rows = h.reshape(-1, h.shape[-1])
                acc = out[self.weight]
                if acc.is_contiguous():
                    acc.view(K * width, -1).addmm_(g_rows.mT, x_rows)
                else:
                    acc.add_((g_rows.mT @ x_rows).view(acc.shape))
            if self.bias is not None:
                out[self.bias].add_(g.reshape(K, -1, width).sum(1))
            return torch.matmul(g, W) if needs_input_grad else None

        return backward


@dataclass(frozen=True)
class _Activation:
    """An elementwise activation (closed-form derivative or one from forward AD)."""

    module: Module

    def forward(self, h: Tensor, dh: Tensor | None, point: _Point) -> StepResult:
        """Primal, tangents and backward rule (multiplication by σ')."""
        if dh is None:
            return self.module(h), None, None
        closed_form = CLOSED_FORM_ACTIVATIONS.get(type(self.module))
        if closed_form is not None:
            out, derivative = closed_form(self.module, h)
        else:
            with forward_ad.dual_level():
                dual = forward_ad.make_dual(h, torch.ones_like(h))
                out, derivative = forward_ad.unpack_dual(self.module(dual))
            out = out.clone()  # not a view of the level's dual tensor
            if derivative is None:
                derivative = torch.zeros_like(out)

        def backward(g: Tensor, out: tuple[Tensor, ...]) -> Tensor:
            return g * derivative

        return out, dh * derivative, backward


@dataclass(frozen=True)
class _Flatten:
    """``nn.Flatten``: a reshape of the primal; the column axis shifts dims by one."""

    module: nn.Flatten

    def forward(self, h: Tensor, dh: Tensor | None, point: _Point) -> StepResult:
        """Flattened primal and tangents; the backward rule restores the shape."""
        start, end = self.module.start_dim, self.module.end_dim
        flat = h.flatten(start, end)
        if dh is None:
            return flat, None, None
        shape = h.shape
        shifted = (start + 1 if start >= 0 else start, end + 1 if end >= 0 else end)

        def backward(g: Tensor, out: tuple[Tensor, ...]) -> Tensor:
            return g.reshape(g.shape[0], *shape)

        return flat, dh.flatten(*shifted), backward


_Step = _Linear | _Activation | _Flatten


class SequentialChain:
    """The steps of a qualifying ``nn.Sequential`` and what makes them valid.

    Build with :func:`sequential_chain`.

    Args:
        model: The outermost container.
        containers: Every ``nn.Sequential`` with its children at construction.
        steps: The computing steps, in order (pass-through modules dropped).
        modules: Every module with its exact type at construction.
    """

    def __init__(
        self,
        model: Module,
        containers: tuple[tuple[nn.Sequential, tuple[Module, ...]], ...],
        steps: tuple[_Step, ...],
        modules: tuple[tuple[Module, type[Module]], ...],
    ):
        """Store the chain (see the class docstring)."""
        self.model = model
        self.containers = containers
        self.steps = steps
        self.modules = modules

    def is_current(self) -> bool:
        """Whether the model still computes what the steps compute.

        ``False`` after a child was replaced, a module's class was changed (e.g. by
        a parametrization), a hook was registered (on a module or globally), a
        ``forward`` was set on an instance, or a dropout layer went into training
        mode with ``p > 0``.
        """
        for name in _GLOBAL_HOOKS:
            hooks = getattr(torch_modules.module, name, None)
            if hooks is None or hooks:  # unknown to this PyTorch, or registered
                return False
        for container, children in self.containers:
            if tuple(container._modules.values()) != children:
                return False
        for module, cls in self.modules:
            if (
                type(module) is not cls
                or module._forward_hooks
                or module._forward_pre_hooks
                or module._backward_hooks
                or module._backward_pre_hooks
                or "forward" in module.__dict__
            ):
                return False
            if cls is nn.Dropout and module.training and module.p > 0:
                return False
        return True

    def linearize(
        self, params: Sequence[Tensor], X: Tensor, V: Sequence[Tensor]
    ) -> Linearization:
        """Forward pass with ``K`` tangents and the batched VJP (see the module).

        Args:
            params: Parameter values (the linearization point).
            X: The batch input.
            V: Columns with a leading axis, ``V[i]`` of shape ``(K, *params[i].shape)``.

        Returns:
            The output, the Jacobian-vector products ``(K, *output.shape)``, and
            ``backward(cotangents, out)``, which adds the VJPs of cotangents
            ``(K, *output.shape)`` to ``out`` (format of ``V``).
        """
        K = V[0].shape[0]
        rules: list[BackwardRule] = []
        h, dh = X, None
        with torch.no_grad():
            for step in self.steps:
                h, dh, rule = step.forward(h, dh, _Point(params, V))
                if rule is not None:
                    rules.append(rule)
            if dh is None:  # pragma: no cover - every chain has a differentiated layer
                dh = h.new_zeros(K, *h.shape)
        output = h

        def backward(cotangents: Tensor, out: tuple[Tensor, ...]) -> None:
            g: Tensor | None = cotangents
            with torch.no_grad():
                for rule in reversed(rules):
                    g = rule(g, out)
                    if g is None:
                        break

        return output, dh, backward


def sequential_chain(model: object, slots: Mapping[str, int]) -> SequentialChain | None:
    """The closed-form chain of ``model``, or ``None`` if it does not qualify.

    Args:
        model: The model (qualifies only as an ``nn.Sequential``, see the module).
        slots: Parameter name (every name of a tied tensor included) -> its slot in
            the ``params`` of the products.

    Returns:
        The chain, or ``None``.
    """
    if type(model) is not nn.Sequential:
        return None
    containers: list[tuple[nn.Sequential, tuple[Module, ...]]] = []
    steps: list[_Step] = []
    modules: list[tuple[Module, type[Module]]] = []
    differentiated: set[int] = set()

    def unroll(container: nn.Sequential, prefix: str) -> bool:
        children = tuple(container._modules.values())
        containers.append((container, children))
        modules.append((container, nn.Sequential))
        for name, child in container._modules.items():
            if child is None:
                return False
            cls = type(child)
            modules.append((child, cls))
            if cls is nn.Sequential:
                if not unroll(child, f"{prefix}{name}."):
                    return False
            elif cls is nn.Linear:
                weight = slots.get(f"{prefix}{name}.weight")
                bias = (
                    slots.get(f"{prefix}{name}.bias")
                    if child.bias is not None
                    else None
                )
                differentiated.update(s for s in (weight, bias) if s is not None)
                steps.append(_Linear(child, weight, bias))
            elif cls in CLOSED_FORM_ACTIVATIONS or cls in ELEMENTWISE_ACTIVATIONS:
                steps.append(_Activation(child))
            elif cls is nn.Flatten:
                steps.append(_Flatten(child))
            elif cls not in _PASS_THROUGH:
                return False
        return True

    if not unroll(model, ""):
        return None
    if differentiated != set(slots.values()):
        return None  # a parameter the chain does not see (not a layer's weight/bias)
    chain = SequentialChain(model, tuple(containers), tuple(steps), tuple(modules))
    return chain
