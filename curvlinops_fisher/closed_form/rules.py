r"""The layer rules of the closed form, and which layer takes which rule.

Each rule implements :class:`~curvlinops_fisher.closed_form.protocol.LayerRule`. For
a linear layer :math:`\mathbf{z} = \mathbf{x}\mathbf{W}^\top + \mathbf{b}` and an
activation :math:`\mathbf{h} = \sigma(\mathbf{z})`, with ``K`` tangent columns
:math:`\dot{\mathbf{x}}_k` and parameter directions
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

Convolutions replace the matrix product by :math:`\star` (the columns stacked as
output channels or as images), max-pooling gathers tangents at its maxima, average
pooling and batch norm in eval mode are linear, reshapes keep the element order, a
sum adds its summands' tangents. A new layer type gets a rule here and an entry in
:func:`rule_for` (and :func:`module_is_current` if some state of the module can make
the rule wrong).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn import Module
from torch.nn import functional as F
from torch.nn.modules.utils import _ntuple

from curvlinops_fisher.closed_form.protocol import (
    Add,
    BackwardRule,
    Call,
    ChainNotApplicable,
    LayerRule,
    Point,
)


def _relu(z: Tensor) -> tuple[Tensor, Tensor]:
    h = torch.relu(z)
    return h, h > 0  # a bool mask: a quarter (float64: an eighth) of the memory


def _tanh(z: Tensor) -> tuple[Tensor, Tensor]:
    h = torch.tanh(z)
    return h, 1 - h * h


def _sigmoid(z: Tensor) -> tuple[Tensor, Tensor]:
    h = torch.sigmoid(z)
    return h, (1 - h) * h


def _leaky_relu(z: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    h = F.leaky_relu(z, slope)
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

#: Convolutions in closed form, with their number of spatial dimensions.
CONVOLUTIONS: dict[type[Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
#: Max-pooling layers in closed form, with their number of spatial dimensions.
MAX_POOLINGS: dict[type[Module], int] = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
}

#: Average-pooling layers in closed form (fixed and adaptive windows), with their
#: number of spatial dimensions.
AVERAGE_POOLINGS: dict[type[Module], int] = {
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
}
#: Batch normalization in closed form (eval mode, running statistics), with the
#: numbers of input dimensions each accepts.
BATCH_NORMS: dict[type[Module], tuple[int, ...]] = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
}

#: Layers that pass their input on (dropped from the graph; their state is guarded).
PASS_THROUGH: tuple[type[Module], ...] = (nn.Identity, nn.Dropout)


def _resolve(module: Module, slot: int | None, name: str, params: Sequence[Tensor]):
    """The value of parameter ``name`` of ``module``: from ``params`` if differentiated."""
    return getattr(module, name) if slot is None else params[slot]


class _WeightAndBias:
    """Base of the rules of layers with a ``weight`` and a ``bias``.

    ``weight`` / ``bias``: slots in ``params`` or ``None``; ``active``: a tangent
    reaches the step; ``input_grad``: an earlier step is differentiated (the
    backward pass goes on past this one).
    """

    weight: int | None
    bias: int | None

    @property
    def slots(self) -> tuple[int, ...]:
        """The slots of the differentiated weight and bias."""
        return tuple(s for s in (self.weight, self.bias) if s is not None)


class _ParameterFree:
    """Base of the rules of steps without parameters."""

    @property
    def slots(self) -> tuple[int, ...]:
        """No slots."""
        return ()


@dataclass(frozen=True)
class _Linear(_WeightAndBias):
    """An ``nn.Linear`` step (fields: see :class:`_WeightAndBias`)."""

    module: nn.Linear
    weight: int | None
    bias: int | None
    active: bool
    input_grad: bool

    def primal(
        self, inputs: Sequence[Tensor], params: Sequence[Tensor]
    ) -> tuple[Tensor, Any]:
        """The layer's output, and what its tangents and backward rule need."""
        (h,) = inputs
        W = _resolve(self.module, self.weight, "weight", params)
        b = _resolve(self.module, self.bias, "bias", params)
        return F.linear(h, W, b), (h, W)

    def tangent(
        self, state: Any, tangents: Sequence[Tensor | None], point: Point
    ) -> tuple[Tensor, BackwardRule]:
        """Tangents ``(K, *z.shape)`` of the chunk's columns and the backward rule."""
        (dh,) = tangents
        h, W = state
        dz = None if dh is None else torch.matmul(dh, W.mT)
        if self.weight is not None:
            dW = point.V[self.weight]
            K, out = dW.shape[0], dW.shape[1]
            # One matrix product for all columns: x [.., in] @ [in, K out].
            term = F.linear(h, dW.reshape(K * out, -1))
            term = term.unflatten(-1, (K, out)).movedim(-2, 0)
            dz = term if dz is None else dz.add_(term)
        if self.bias is not None:
            db = point.V[self.bias]
            db = db.reshape(db.shape[0], *[1] * (h.ndim - 1), db.shape[1])
            shape = (db.shape[0], *h.shape[:-1], db.shape[-1])
            dz = db.expand(shape).contiguous() if dz is None else dz.add_(db)
        return dz, self._backward_rule(h, W)

    def _backward_rule(self, h: Tensor, W: Tensor) -> BackwardRule:
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
            return torch.matmul(g, W) if self.input_grad else None

        return backward


def conv_padding(module: Module) -> tuple[int, ...] | None:
    """Symmetric zero padding of a convolution as integers (``None``: not supported).

    ``'valid'`` is no padding; ``'same'`` is supported where the padding it needs is
    even in every dimension (odd kernels, any dilation), other modes not at all.
    """
    if getattr(module, "padding_mode", None) != "zeros":
        return None
    padding = module.padding
    if padding == "valid":
        return (0,) * len(module.kernel_size)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in totals):
            return None
        return tuple(t // 2 for t in totals)
    return tuple(padding)


def _stack_kernels(dW: Tensor, groups: int) -> Tensor:
    """Kernels ``(K, C_out, ...)`` of ``K`` columns as one kernel of ``K C_out`` channels.

    Grouped convolutions assign output channels to groups in blocks, so the columns
    are stacked inside each group: channel order ``(group, column, channel in group)``.
    """
    K, c_out = dW.shape[:2]
    return (
        dW.unflatten(1, (groups, c_out // groups))
        .transpose(0, 1)
        .reshape(K * c_out, *dW.shape[2:])
    )


def _unstack_channels(z: Tensor, K: int, groups: int) -> Tensor:
    """Inverse of :func:`_stack_kernels` on outputs: ``(N, K C, ...)`` -> ``(K, N, C, ...)``."""
    return z.unflatten(1, (groups, K, -1)).movedim(2, 0).flatten(2, 3)


def _stack_channels(g: Tensor, groups: int) -> Tensor:
    """Cotangents ``(K, N, C, ...)`` -> ``(N, K C, ...)`` (order of :func:`_stack_kernels`)."""
    K, N, c_out = g.shape[:3]
    stacked = g.unflatten(2, (groups, c_out // groups)).movedim(0, 2)
    return stacked.reshape(N, K * c_out, *g.shape[3:])


@dataclass(frozen=True)
class _Conv(_WeightAndBias):
    """An ``nn.Conv1d`` / ``2d`` / ``3d`` step (fields: see :class:`_WeightAndBias`)."""

    module: nn.Conv1d | nn.Conv2d | nn.Conv3d
    weight: int | None
    bias: int | None
    active: bool
    input_grad: bool

    def _geometry(self) -> tuple[Any, ...]:
        m = self.module
        return tuple(m.stride), conv_padding(m), tuple(m.dilation), m.groups

    def primal(
        self, inputs: Sequence[Tensor], params: Sequence[Tensor]
    ) -> tuple[Tensor, Any]:
        """The layer's output, and what its tangents and backward rule need."""
        (h,) = inputs
        dims = CONVOLUTIONS[type(self.module)]
        if h.ndim != dims + 2:
            raise ChainNotApplicable("unbatched convolution input")
        W = _resolve(self.module, self.weight, "weight", params)
        b = _resolve(self.module, self.bias, "bias", params)
        stride, padding, dilation, groups = self._geometry()
        z = torch.convolution(
            h, W, b, stride, padding, dilation, False, [0] * dims, groups
        )
        return z, (h, W, z.shape)

    def _convolve(self, x: Tensor, W: Tensor) -> Tensor:
        stride, padding, dilation, groups = self._geometry()
        zeros = [0] * len(stride)
        return torch.convolution(
            x, W, None, stride, padding, dilation, False, zeros, groups
        )

    def tangent(
        self, state: Any, tangents: Sequence[Tensor | None], point: Point
    ) -> tuple[Tensor, BackwardRule]:
        """Tangents ``(K, *z.shape)`` of the chunk's columns and the backward rule."""
        (dh,) = tangents
        h, W, z_shape = state
        groups = self.module.groups
        dz = None
        if dh is not None:
            dz = self._convolve(dh.flatten(0, 1), W).unflatten(0, dh.shape[:2])
        if self.weight is not None:
            dW = point.V[self.weight]
            term = self._convolve(h, _stack_kernels(dW, groups))
            term = _unstack_channels(term, dW.shape[0], groups)
            dz = term if dz is None else dz.add_(term)
        if self.bias is not None:
            db = point.V[self.bias]
            db = db.reshape(*db.shape, *[1] * (h.ndim - 2)).unsqueeze(1)
            shape = (db.shape[0], *z_shape)
            dz = db.expand(shape).contiguous() if dz is None else dz.add_(db)
        return dz, self._backward_rule(h, W)

    def _backward_rule(self, h: Tensor, W: Tensor) -> BackwardRule:
        stride, padding, dilation, groups = self._geometry()
        zeros = [0] * len(stride)

        def backward(g: Tensor, out: tuple[Tensor, ...]) -> Tensor | None:
            K, N = g.shape[:2]
            if self.weight is not None:
                acc = out[self.weight]
                kernels = W.new_empty(1).expand(K * W.shape[0], *W.shape[1:])
                grad_kernels = torch.ops.aten.convolution_backward(
                    _stack_channels(g, groups), h, kernels, None, stride, padding,
                    dilation, False, zeros, groups, (False, True, False),
                )[1]  # fmt: skip
                grad_kernels = grad_kernels.unflatten(0, (groups, K, -1))
                acc.add_(grad_kernels.transpose(0, 1).reshape(acc.shape))
            if self.bias is not None:
                out[self.bias].add_(g.sum([1, *range(3, g.ndim)]))
            if not self.input_grad:
                return None
            inputs = g.new_empty(1).expand(K * N, *h.shape[1:])
            grad_inputs = torch.ops.aten.convolution_backward(
                g.flatten(0, 1), inputs, W, None, stride, padding, dilation, False,
                zeros, groups, (True, False, False),
            )[0]  # fmt: skip
            return grad_inputs.unflatten(0, (K, N))

        return backward


@dataclass(frozen=True)
class _MaxPool(_ParameterFree):
    """An ``nn.MaxPool1d`` / ``2d`` / ``3d`` step: tangents gathered at the maxima."""

    module: nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d
    active: bool

    def primal(
        self, inputs: Sequence[Tensor], params: Sequence[Tensor]
    ) -> tuple[Tensor, Any]:
        """The pooled output and the indices of the maxima (only if active)."""
        (h,) = inputs
        if not self.active:
            return self.module(h), None
        dims = MAX_POOLINGS[type(self.module)]
        if h.ndim != dims + 2:
            raise ChainNotApplicable("unbatched pooling input")
        m = self.module
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
        z, indices = pool(
            h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True
        )
        # indices: positions in the flattened spatial dims of each (sample, channel)
        return z, (indices.flatten(2), h.shape, z.shape)

    def tangent(
        self, state: Any, tangents: Sequence[Tensor | None], point: Point
    ) -> tuple[Tensor, BackwardRule]:
        """The tangents at the maxima; backwards, cotangents added at the maxima."""
        (dh,) = tangents
        indices, shape, out_shape = state
        K = dh.shape[0]
        index = indices.expand(K, *indices.shape)
        pooled = dh.flatten(3).gather(3, index)

        def backward(g: Tensor, out: tuple[Tensor, ...]) -> Tensor:
            grad = g.new_zeros(K, shape[0], shape[1], shape[2:].numel())
            grad.scatter_add_(3, index, g.flatten(3))
            return grad.view(K, *shape)

        return pooled.view(K, *out_shape), backward


@dataclass(frozen=True)
class _AvgPool(_ParameterFree):
    """An average-pooling step (``nn.AvgPool*d``, ``nn.AdaptiveAvgPool*d``): linear.

    Tangents are pooled like the primal; cotangents go through the pooling's
    transpose (PyTorch's own backward kernels, 1-d pooling as 2-d of height 1).
    """

    module: Module
    active: bool

    def primal(
        self, inputs: Sequence[Tensor], params: Sequence[Tensor]
    ) -> tuple[Tensor, Any]:
        """The pooled output and the input's shape."""
        (h,) = inputs
        if h.ndim != AVERAGE_POOLINGS[type(self.module)] + 2:
            raise ChainNotApplicable("unbatched pooling input")
        return self.module(h), h.shape

    def tangent(
        self, shape: Any, tangents: Sequence[Tensor | None], point: Point
    ) -> tuple[Tensor, BackwardRule]:
        """The pooled tangents; backwards, the cotangents spread over the windows."""
        (dh,) = tangents
        K, N = dh.shape[:2]

        def backward(g: Tensor, out: tuple[Tensor, ...]) -> Tensor:
            inputs = (K * N, *shape[1:])
            return _avg_pool_transpose(self.module, g.flatten(0, 1), inputs).unflatten(
                0, (K, N)
            )

        return self.module(dh.flatten(0, 1)).unflatten(0, (K, N)), backward


def _avg_pool_transpose(module: Module, g: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The transpose of average pooling ``module`` (input shape ``shape``) applied to ``g``."""
    dims = AVERAGE_POOLINGS[type(module)]
    lifted = dims == 1  # PyTorch's 1-d pooling is 2-d pooling of height 1
    if lifted:
        g, shape = g.unsqueeze(-2), (*shape[:-1], 1, shape[-1])
    like = g.new_empty(shape)  # only its shape is read
    aten = torch.ops.aten
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        grad = aten._adaptive_avg_pool2d_backward(g, like)
    elif isinstance(module, nn.AdaptiveAvgPool3d):
        grad = aten._adaptive_avg_pool3d_backward(g, like)
    else:
        size = _ntuple(dims)
        kernel, stride, padding = (
            size(module.kernel_size),
            size(module.stride),
            size(module.padding),
        )
        if lifted:
            kernel, stride, padding = (1, *kernel), (1, *stride), (0, *padding)
        backward = aten.avg_pool3d_backward if dims == 3 else aten.avg_pool2d_backward
        grad = backward(
            g, like, kernel, stride, padding, module.ceil_mode,
            module.count_include_pad, getattr(module, "divisor_override", None),
        )  # fmt: skip
    return grad.squeeze(-2) if lifted else grad


@dataclass(frozen=True)
class _BatchNorm(_WeightAndBias):
    r"""An ``nn.BatchNorm*d`` step in eval mode: an affine map per channel.

    With running statistics :math:`\mu, \sigma^2` and
    :math:`\hat{\mathbf{x}} = (\mathbf{x} - \mu) / \sqrt{\sigma^2 + \epsilon}`,
    :math:`\mathbf{z} = \gamma \hat{\mathbf{x}} + \beta` per channel (axis 1), so
    :math:`\dot{\mathbf{z}}_k = \gamma \dot{\mathbf{x}}_k / \sqrt{\sigma^2 +
    \epsilon} + \dot\gamma_k \hat{\mathbf{x}} + \dot\beta_k`; backwards
    :math:`\bar\gamma_k = \sum \mathbf{g}_k \odot \hat{\mathbf{x}}`,
    :math:`\bar\beta_k = \sum \mathbf{g}_k` over all axes but the channel's.
    Fields: see :class:`_WeightAndBias` (``weight`` is :math:`\gamma`, ``bias``
    :math:`\beta`).
    """

    module: nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d
    weight: int | None
    bias: int | None
    active: bool
    input_grad: bool

    def primal(
        self, inputs: Sequence[Tensor], params: Sequence[Tensor]
    ) -> tuple[Tensor, Any]:
        """The normalized output; the per-channel scale and (if needed) x-hat."""
        (h,) = inputs
        m = self.module
        if h.ndim not in BATCH_NORMS[type(m)]:
            raise ChainNotApplicable("unbatched batch-norm input")
        gamma = _resolve(m, self.weight, "weight", params)
        beta = _resolve(m, self.bias, "bias", params)
        z = F.batch_norm(
            h, m.running_mean, m.running_var, gamma, beta, False, 0.0, m.eps
        )
        if not self.active:
            return z, None
        per_channel = (-1, *[1] * (h.ndim - 2))
        inv_std = torch.rsqrt(m.running_var + m.eps).view(per_channel)
        scale = inv_std if gamma is None else gamma.view(per_channel) * inv_std
        x_hat = None
        if self.weight is not None:
            x_hat = (h - m.running_mean.view(per_channel)) * inv_std
        return z, (scale, x_hat, per_channel, z.shape)

    def tangent(
        self, state: Any, tangents: Sequence[Tensor | None], point: Point
    ) -> tuple[Tensor, BackwardRule]:
        """Tangents ``(K, *z.shape)`` of the chunk's columns and the backward rule."""
        (dh,) = tangents
        scale, x_hat, per_channel, z_shape = state
        dz = None if dh is None else dh * scale
        if self.weight is not None:
            d_gamma = point.V[self.weight]
            term = d_gamma.view(d_gamma.shape[0], 1, *per_channel) * x_hat
            dz = term if dz is None else dz.add_(term)
        if self.bias is not None:
            d_beta = point.V[self.bias]
            d_beta = d_beta.view(d_beta.shape[0], 1, *per_channel)
            shape = (d_beta.shape[0], *z_shape)
            dz = d_beta.expand(shape).contiguous() if dz is None else dz.add_(d_beta)
        return dz, self._backward_rule(scale, x_hat)

    def _backward_rule(self, scale: Tensor, x_hat: Tensor | None) -> BackwardRule:
        def backward(g: Tensor, out: tuple[Tensor, ...]) -> Tensor | None:
            summed = [1, *range(3, g.ndim)]  # all axes but the column's and channel's
            if self.weight is not None:
                out[self.weight].add_((g * x_hat).sum(summed))
            if self.bias is not None:
                out[self.bias].add_(g.sum(summed))
            return g * scale if self.input_grad else None

        return backward


@dataclass(frozen=True)
class _Activation(_ParameterFree):
    """An elementwise activation (closed-form derivative or one from forward AD)."""

    module: Module
    active: bool

    def primal(
        self, inputs: Sequence[Tensor], params: Sequence[Tensor]
    ) -> tuple[Tensor, Any]:
        r"""The activation and (only if active) its derivative :math:`\sigma'`."""
        (h,) = inputs
        if not self.active:
            return self.module(h), None
        closed_form = CLOSED_FORM_ACTIVATIONS.get(type(self.module))
        if closed_form is not None:
            return closed_form(self.module, h)
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(h, torch.ones_like(h))
            out, derivative = forward_ad.unpack_dual(self.module(dual))
        out = out.clone()  # not a view of the level's dual tensor
        if derivative is None:
            derivative = torch.zeros_like(out)
        return out, derivative

    def tangent(
        self, derivative: Any, tangents: Sequence[Tensor | None], point: Point
    ) -> tuple[Tensor, BackwardRule]:
        r""":math:`\sigma' \odot` the tangents; backwards the same multiplication."""
        (dh,) = tangents

        def backward(g: Tensor, out: tuple[Tensor, ...]) -> Tensor:
            return g * derivative

        return dh * derivative, backward


@dataclass(frozen=True)
class _Reshape(_ParameterFree):
    """A reshape of the primal (``nn.Flatten``, ``view`` ...): element order is kept.

    ``function`` maps the primal to its reshaped value; the tangents (column axis
    first) take the primal's new shape, the cotangents its old one.
    """

    function: Callable[[Tensor], Tensor]
    active: bool

    def primal(
        self, inputs: Sequence[Tensor], params: Sequence[Tensor]
    ) -> tuple[Tensor, Any]:
        """The reshaped primal, and both shapes."""
        (h,) = inputs
        z = self.function(h)
        if z.numel() != h.numel():
            raise ChainNotApplicable("a reshape changed the number of elements")
        return z, (h.shape, z.shape)

    def tangent(
        self, state: Any, tangents: Sequence[Tensor | None], point: Point
    ) -> tuple[Tensor, BackwardRule]:
        """Tangents reshaped like the primal; backwards the inverse reshape."""
        (dh,) = tangents
        before, after = state

        def backward(g: Tensor, out: tuple[Tensor, ...]) -> Tensor:
            return g.reshape(g.shape[0], *before)

        return dh.reshape(dh.shape[0], *after), backward


@dataclass(frozen=True)
class _Add(_ParameterFree):
    """The sum of two earlier values (a residual connection).

    Tangents add up; backwards, both summands get the sum's cotangents.
    """

    active: bool

    def primal(
        self, inputs: Sequence[Tensor], params: Sequence[Tensor]
    ) -> tuple[Tensor, Any]:
        """The sum (no state)."""
        return inputs[0] + inputs[1], None

    def tangent(
        self, state: Any, tangents: Sequence[Tensor | None], point: Point
    ) -> tuple[Tensor, BackwardRule]:
        """The sum of the summands' tangents (those that have any)."""
        present = [t for t in tangents if t is not None]
        return sum(present[1:], present[0]), _same_cotangents


def _same_cotangents(g: Tensor, out: tuple[Tensor, ...]) -> Tensor:
    """Backward rule of an :class:`_Add`: each summand gets the sum's cotangents."""
    return g


def module_is_current(module: Module, cls: type[Module]) -> bool:
    """Whether ``module`` still computes what its rule computes.

    ``False`` if its class changed (e.g. by a parametrization), it has hooks or an
    instance-level ``forward``, or its state makes the rule wrong: dropout in
    training mode with ``p > 0``, an unsupported convolution padding, max-pooling
    that returns indices, batch norm with batch statistics.

    Args:
        module: A module of the model (containers included).
        cls: Its type when the graph was found.
    """
    if (
        type(module) is not cls
        or module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
    ):
        return False
    if cls is nn.Dropout:
        return not (module.training and module.p > 0)
    if cls in CONVOLUTIONS:
        return conv_padding(module) is not None
    if cls in MAX_POOLINGS:
        return not module.return_indices
    if cls in BATCH_NORMS:  # eval mode with running statistics: a fixed affine map
        return not module.training and (
            module.running_mean is not None and module.running_var is not None
        )
    return True


def _rule_with_parameters(
    cls: type[Module],
) -> type[_Linear] | type[_Conv] | type[_BatchNorm] | None:
    """The rule of a layer type with a ``weight`` and a ``bias`` (``None``: other)."""
    if cls is nn.Linear:
        return _Linear
    if cls in CONVOLUTIONS:
        return _Conv
    if cls in BATCH_NORMS:
        return _BatchNorm
    return None


def rule_for(call: Call, slots: Mapping[str, int], reached: bool) -> LayerRule | None:
    """The rule of a call (``None``: unsupported).

    Args:
        call: A call of the graph (a pass-through layer is not one).
        slots: Parameter name (every name of a tied tensor included) -> its slot in
            the ``params`` of the products.
        reached: Whether the call's input has tangents.
    """
    if isinstance(call, Add):
        return _Add(reached)
    if not isinstance(call, tuple):
        return _Reshape(call, reached)
    name, module = call
    cls = type(module)
    rule_cls = _rule_with_parameters(cls)
    if rule_cls is not None:
        weight = slots.get(f"{name}.weight") if module.weight is not None else None
        bias = slots.get(f"{name}.bias") if module.bias is not None else None
        own = weight is not None or bias is not None
        return rule_cls(module, weight, bias, reached or own, reached)
    if cls in CLOSED_FORM_ACTIVATIONS or cls in ELEMENTWISE_ACTIVATIONS:
        return _Activation(module, reached)
    if cls in MAX_POOLINGS:
        return _MaxPool(module, reached)
    if cls in AVERAGE_POOLINGS:
        return _AvgPool(module, reached)
    if cls is nn.Flatten:
        return _Reshape(module, reached)
    return None
