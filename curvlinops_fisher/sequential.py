r"""Closed-form linearization of chains of layers (MLPs and plain CNNs).

For a model that computes a chain of ``nn.Linear`` / convolution layers, batch norms
in eval mode, pooling, reshapes and elementwise activations (an MLP, or a CNN of the
LeNet / VGG kind), the
Jacobian-vector and vector-Jacobian products of a product are written out layer by
layer instead of being derived by forward-mode and reverse AD. For a linear layer
:math:`\mathbf{z} = \mathbf{x}\mathbf{W}^\top + \mathbf{b}` and an activation
:math:`\mathbf{h} = \sigma(\mathbf{z})`, with ``K`` tangent columns
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

A convolution :math:`\mathbf{z} = \mathbf{W} \star \mathbf{x} + \mathbf{b}` has the
same form with :math:`\star` in place of the matrix product: the terms
:math:`\dot{\mathbf{W}}_k \star \mathbf{x}` of all columns are one convolution with the
columns' kernels stacked as output channels, :math:`\mathbf{W} \star
\dot{\mathbf{x}}_k` is one convolution with the columns stacked as images, and the
kernels' VJPs of all columns are one weight-gradient call with the stacked
cotangents. Max-pooling keeps the indices of its maxima: tangents are gathered at
them, cotangents added back (``scatter_add``).

Compared with dual numbers and a recorded backward pass this skips the product with
the (zero) tangent of the data, stores only the layers' inputs, :math:`\sigma'` and
the pooling indices (no tangent activations), stops the backward pass at the first
differentiated layer, and has no autograd bookkeeping. The columns run in chunks
whose largest tangent stays within :data:`TANGENT_CHUNK_BYTES` (large temporaries
cost more in page faults than they save in batching); the primal pass is shared by
all chunks. The numbers agree with the AD path to rounding.

Which models qualify (checked at construction and, for what can change later, before
every product; anything else takes the AD path): the model is an ``nn.Sequential``
(nested ones are unrolled), or a module whose ``forward`` :mod:`torch.fx` traces to
such a chain, or to a graph that also adds earlier values (residual connections,
:mod:`curvlinops_fisher.traced_chain`): tangents of a sum add up, and backwards both
summands get its cotangents. The layers are of exactly these types:
``nn.Linear``; ``nn.Conv1d`` / ``2d`` / ``3d`` with ``padding_mode='zeros'``;
``nn.BatchNorm1d`` / ``2d`` / ``3d`` in eval mode with running statistics (an
affine map per channel); ``nn.MaxPool1d`` / ``2d`` / ``3d`` without
``return_indices``; ``nn.AvgPool1d`` / ``2d`` / ``3d`` and
``nn.AdaptiveAvgPool1d`` / ``2d`` / ``3d`` (linear: tangents pooled, cotangents
through PyTorch's pooling backward kernels); the elementwise
activations of :data:`CLOSED_FORM_ACTIVATIONS` and :data:`ELEMENTWISE_ACTIVATIONS`;
``nn.Flatten`` (and reshapes in a traced ``forward``), ``nn.Identity`` and
``nn.Dropout`` in eval mode (or with ``p = 0``); no module has hooks, a
parametrization or an instance-level ``forward``; no global module hooks are
registered; the input is a batched tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn import Module
from torch.nn import functional as F
from torch.nn import modules as torch_modules
from torch.nn.modules.utils import _ntuple

#: ``(output, JVPs, backward)`` as in :func:`curvlinops_fisher.core.linearize`;
#: ``backward(cotangents, out)`` adds the VJPs to ``out``.
Linearization = tuple[Tensor, Tensor, Callable[[Tensor, tuple[Tensor, ...]], None]]
#: Backward rule of one step for one chunk of columns: ``rule(g, out)`` takes the
#: cotangents of its output, adds its parameters' VJPs to ``out`` (the chunk's
#: columns; tied weights add up) and returns the cotangents of its input (``None``
#: where no earlier step needs them).
BackwardRule = Callable[[Tensor, tuple[Tensor, ...]], Tensor | None]

#: Largest tangent tensor (bytes) of one chunk of columns: the columns of a product
#: run in chunks of ``max(1, TANGENT_CHUNK_BYTES // b)``, ``b`` the bytes of the
#: largest activation of one column, so that a chunk's tangents stay near the
#: per-core L2 cache. Measured with 16 columns (``benchmarks/``, 2-vCPU AMD EPYC,
#: 1 MiB L2 per core): the CNN W2 (4 MiB per column) is 3x faster one column at a
#: time than 4 at a time; the MLP W4 (64 KiB per column) 1.5x faster in chunks of
#: 4 to 8 than all 16 at once; W1 and W5 change by under 10%.
TANGENT_CHUNK_BYTES = 2**19


class ChainNotApplicable(Exception):
    """The chain cannot run on this input (e.g. an unbatched convolution input)."""


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

PASS_THROUGH: tuple[type[Module], ...] = (nn.Identity, nn.Dropout)
_GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


def _resolve(module: Module, slot: int | None, name: str, params: Sequence[Tensor]):
    """The value of parameter ``name`` of ``module``: from ``params`` if differentiated."""
    return getattr(module, name) if slot is None else params[slot]


@dataclass(frozen=True)
class _Linear:
    """An ``nn.Linear`` step; ``weight`` / ``bias``: slots in ``params`` or ``None``.

    ``active``: a tangent reaches the step; ``input_grad``: an earlier step is
    differentiated (the backward pass goes on past this one).
    """

    module: nn.Linear
    weight: int | None
    bias: int | None
    active: bool
    input_grad: bool

    def primal(self, h: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Any]:
        """The layer's output, and what its tangents and backward rule need."""
        W = _resolve(self.module, self.weight, "weight", params)
        b = _resolve(self.module, self.bias, "bias", params)
        return F.linear(h, W, b), (h, W)

    def tangent(
        self, state: Any, dh: Tensor | None, point: _Point
    ) -> tuple[Tensor, BackwardRule]:
        """Tangents ``(K, *z.shape)`` of the chunk's columns and the backward rule."""
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
class _Conv:
    """An ``nn.Conv1d`` / ``2d`` / ``3d`` step (same fields as :class:`_Linear`)."""

    module: nn.Conv1d | nn.Conv2d | nn.Conv3d
    weight: int | None
    bias: int | None
    active: bool
    input_grad: bool

    def _geometry(self) -> tuple[Any, ...]:
        m = self.module
        return tuple(m.stride), conv_padding(m), tuple(m.dilation), m.groups

    def primal(self, h: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Any]:
        """The layer's output, and what its tangents and backward rule need."""
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
        self, state: Any, dh: Tensor | None, point: _Point
    ) -> tuple[Tensor, BackwardRule]:
        """Tangents ``(K, *z.shape)`` of the chunk's columns and the backward rule."""
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
class _MaxPool:
    """An ``nn.MaxPool1d`` / ``2d`` / ``3d`` step: tangents gathered at the maxima."""

    module: nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d
    active: bool

    def primal(self, h: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Any]:
        """The pooled output and the indices of the maxima (only if active)."""
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
        self, state: Any, dh: Tensor, point: _Point
    ) -> tuple[Tensor, BackwardRule]:
        """The tangents at the maxima; backwards, cotangents added at the maxima."""
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
class _AvgPool:
    """An average-pooling step (``nn.AvgPool*d``, ``nn.AdaptiveAvgPool*d``): linear.

    Tangents are pooled like the primal; cotangents go through the pooling's
    transpose (PyTorch's own backward kernels, 1-d pooling as 2-d of height 1).
    """

    module: Module
    active: bool

    def primal(self, h: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Any]:
        """The pooled output and the input's shape."""
        if h.ndim != AVERAGE_POOLINGS[type(self.module)] + 2:
            raise ChainNotApplicable("unbatched pooling input")
        return self.module(h), h.shape

    def tangent(
        self, shape: Any, dh: Tensor, point: _Point
    ) -> tuple[Tensor, BackwardRule]:
        """The pooled tangents; backwards, the cotangents spread over the windows."""
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
class _BatchNorm:
    r"""An ``nn.BatchNorm*d`` step in eval mode: an affine map per channel.

    With running statistics :math:`\mu, \sigma^2` and
    :math:`\hat{\mathbf{x}} = (\mathbf{x} - \mu) / \sqrt{\sigma^2 + \epsilon}`,
    :math:`\mathbf{z} = \gamma \hat{\mathbf{x}} + \beta` per channel (axis 1), so
    :math:`\dot{\mathbf{z}}_k = \gamma \dot{\mathbf{x}}_k / \sqrt{\sigma^2 +
    \epsilon} + \dot\gamma_k \hat{\mathbf{x}} + \dot\beta_k`; backwards
    :math:`\bar\gamma_k = \sum \mathbf{g}_k \odot \hat{\mathbf{x}}`,
    :math:`\bar\beta_k = \sum \mathbf{g}_k` over all axes but the channel's. Same
    fields as :class:`_Linear` (``weight`` is :math:`\gamma`, ``bias`` :math:`\beta`).
    """

    module: nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d
    weight: int | None
    bias: int | None
    active: bool
    input_grad: bool

    def primal(self, h: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Any]:
        """The normalized output; the per-channel scale and (if needed) x-hat."""
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
        self, state: Any, dh: Tensor | None, point: _Point
    ) -> tuple[Tensor, BackwardRule]:
        """Tangents ``(K, *z.shape)`` of the chunk's columns and the backward rule."""
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
class _Activation:
    """An elementwise activation (closed-form derivative or one from forward AD)."""

    module: Module
    active: bool

    def primal(self, h: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Any]:
        r"""The activation and (only if active) its derivative :math:`\sigma'`."""
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
        self, derivative: Tensor, dh: Tensor, point: _Point
    ) -> tuple[Tensor, BackwardRule]:
        r""":math:`\sigma' \odot` the tangents; backwards the same multiplication."""

        def backward(g: Tensor, out: tuple[Tensor, ...]) -> Tensor:
            return g * derivative

        return dh * derivative, backward


@dataclass(frozen=True)
class _Reshape:
    """A reshape of the primal (``nn.Flatten``, ``view`` ...): element order is kept.

    ``function`` maps the primal to its reshaped value; the tangents (column axis
    first) take the primal's new shape, the cotangents its old one.
    """

    function: Callable[[Tensor], Tensor]
    active: bool

    def primal(self, h: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Any]:
        """The reshaped primal, and both shapes."""
        z = self.function(h)
        if z.numel() != h.numel():
            raise ChainNotApplicable("a reshape changed the number of elements")
        return z, (h.shape, z.shape)

    def tangent(
        self, state: Any, dh: Tensor, point: _Point
    ) -> tuple[Tensor, BackwardRule]:
        """Tangents reshaped like the primal; backwards the inverse reshape."""
        before, after = state

        def backward(g: Tensor, out: tuple[Tensor, ...]) -> Tensor:
            return g.reshape(g.shape[0], *before)

        return dh.reshape(dh.shape[0], *after), backward


@dataclass(frozen=True)
class _Add:
    """The sum of two earlier values (a residual connection).

    Tangents add up; backwards, both summands get the sum's cotangents.
    """

    active: bool


class Add:
    """The call of a graph that adds two earlier values (see :func:`chain_from_calls`)."""


#: The one :class:`Add` call.
ADD = Add()

_Step = (
    _Linear | _Conv | _BatchNorm | _MaxPool | _AvgPool | _Activation | _Reshape | _Add
)

#: A call of a chain: a module with its qualified name, a reshape of the primal, or
#: :data:`ADD`.
Call = tuple[str, Module] | Callable[[Tensor], Tensor] | Add


def _module_is_current(module: Module, cls: type[Module]) -> bool:
    """Whether ``module`` still computes what its step computes (see the module)."""
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


class SequentialChain:
    """The steps of a qualifying chain and what makes them valid.

    Build with :func:`sequential_chain`.

    The steps form a graph: value 0 is the model's input, value ``i + 1`` the output
    of step ``i``, which reads the values ``sources[i]`` (one, or two for an
    :class:`_Add`); the last value is the model's output. A plain chain has
    ``sources[i] == (i,)``.

    Args:
        steps: The computing steps, in order (pass-through modules dropped).
        modules: Every module the model calls or contains, with its exact type at
            construction.
        guards: Further checks that must hold before a product (e.g. that the
            containers still hold the same children).
        sources: The values each step reads (default: a plain chain).
    """

    def __init__(
        self,
        steps: tuple[_Step, ...],
        modules: tuple[tuple[Module, type[Module]], ...],
        guards: tuple[Callable[[], bool], ...] = (),
        sources: tuple[tuple[int, ...], ...] | None = None,
    ):
        """Store the chain (see the class docstring)."""
        self.steps = steps
        self.modules = modules
        self.guards = guards
        self.sources = sources or tuple((i,) for i in range(len(steps)))
        #: The last step reading each value: its references are dropped after it.
        self._last_use = [-1] * (len(steps) + 1)
        for i, reads in enumerate(self.sources):
            for value in reads:
                self._last_use[value] = i
        #: Whether a value depends on a differentiated parameter (has tangents).
        self._has_tangent = [False, *(step.active for step in steps)]
        #: Results of the numerical checks, by input signature (see :meth:`check`).
        self._checked: dict[tuple, str | None] = {}
        #: Set when a check failed: the chain is not used any more.
        self.failed = False

    def check(
        self,
        params: Sequence[Tensor],
        X: Tensor,
        generic: Callable[[tuple[Tensor, ...]], Linearization],
    ) -> str | None:
        """Check the chain against the generic path on ``X`` (once per signature).

        The chain's output, JVP and VJP of a random column must equal those of
        ``generic`` (see :mod:`curvlinops_fisher.fast_path_checks`); the result is
        kept for the input's shape, dtype and device while the chain's guards hold.
        A failed check sets :attr:`failed`.

        Args:
            params: The parameter values.
            X: The batch input.
            generic: The generic linearization of the batch at ``params``.

        Returns:
            ``None`` if the chain agrees, else a description of the disagreement.

        Raises:
            ChainNotApplicable: If the chain cannot run on ``X`` (nothing is kept).
        """
        from curvlinops_fisher.fast_path_checks import (  # (imports this module)
            compare_linearizations,
            signature,
        )

        key = signature(X, params)
        if key not in self._checked:
            self._checked[key] = compare_linearizations(
                lambda V: self._linearize(params, X, V), generic, params
            )
            self.failed = self._checked[key] is not None
        return self._checked[key]

    def is_current(self) -> bool:
        """Whether the model still computes what the steps compute.

        ``False`` after a child was replaced, a module's class was changed (e.g. by
        a parametrization), a hook was registered (on a module or globally), a
        ``forward`` was set on an instance, a dropout layer went into training mode
        with ``p > 0``, a convolution's padding or a pooling layer's
        ``return_indices`` became unsupported, a guard failed, or the chain
        disagreed with the generic path in a numerical check (:meth:`check`).
        """
        if self.failed:
            return False
        for name in _GLOBAL_HOOKS:
            hooks = getattr(torch_modules.module, name, None)
            if hooks is None or hooks:  # unknown to this PyTorch, or registered
                return False
        return all(_module_is_current(m, cls) for m, cls in self.modules) and all(
            guard() for guard in self.guards
        )

    def linearize(
        self, params: Sequence[Tensor], X: Tensor, V: Sequence[Tensor]
    ) -> Linearization:
        """Forward pass with ``K`` tangents and the batched VJP (see :meth:`_linearize`)."""
        return self._linearize(params, X, V)

    def _linearize(
        self, params: Sequence[Tensor], X: Tensor, V: Sequence[Tensor]
    ) -> Linearization:
        """Forward pass with ``K`` tangents and the batched VJP (see the module).

        The primal pass runs once; the tangents run in chunks of columns (see
        :data:`TANGENT_CHUNK_BYTES`), each with its own backward rules (they keep
        only primal quantities, shared by all chunks).

        Args:
            params: Parameter values (the linearization point).
            X: The batch input.
            V: Columns with a leading axis, ``V[i]`` of shape ``(K, *params[i].shape)``.

        Returns:
            The output, the Jacobian-vector products ``(K, *output.shape)``, and
            ``backward(cotangents, out)``, which adds the VJPs of cotangents
            ``(K, *output.shape)`` to ``out`` (format of ``V``).

        Raises:
            ChainNotApplicable: If the input does not fit the chain (before any work
                a caller would have to undo).
        """
        K = V[0].shape[0]
        states, widest = [], 0
        with torch.no_grad():
            values: list[Tensor | None] = [X, *[None] * len(self.steps)]
            for i, step in enumerate(self.steps):
                reads = [values[v] for v in self.sources[i]]
                self._drop_last_reads(values, i)
                if isinstance(step, _Add):
                    h, state = reads[0] + reads[1], None
                else:
                    h, state = step.primal(reads[0], params)
                values[i + 1] = h
                states.append(state)
                if step.active:
                    widest = max(widest, h.numel() * h.element_size())
            output = values[-1]
            chunk = max(1, TANGENT_CHUNK_BYTES // max(widest, 1))
            if K > chunk:  # every chunk multiplies by each mask twice
                states = _float_masks(self.steps, states, output.dtype)
            JVs, chunks = [], []
            for start in range(0, K, chunk):
                point = _Point(params, tuple(v[start : start + chunk] for v in V))
                JV_chunk, rules = self._tangents(states, point)
                JVs.append(JV_chunk)
                chunks.append((start, rules))
        JV = JVs[0] if len(JVs) == 1 else torch.cat(JVs)

        def backward(cotangents: Tensor, out: tuple[Tensor, ...]) -> None:
            with torch.no_grad():
                for start, rules in chunks:
                    out_chunk = tuple(o[start : start + chunk] for o in out)
                    self._cotangents(
                        rules, cotangents[start : start + chunk], out_chunk
                    )

        return output, JV, backward

    def _drop_last_reads(self, values: list[Tensor | None], i: int) -> None:
        """Drop the references to the values step ``i`` is the last to read."""
        for v in self.sources[i]:
            if self._last_use[v] == i:
                values[v] = None

    def _tangents(
        self, states: list[Any], point: _Point
    ) -> tuple[Tensor, list[BackwardRule | None]]:
        """Tangents of the output for one chunk of columns, and each step's rule."""
        tangents: list[Tensor | None] = [None] * (len(self.steps) + 1)
        rules: list[BackwardRule | None] = []
        for i, (step, state) in enumerate(zip(self.steps, states)):
            if not step.active:
                rules.append(None)
                continue
            reads = [tangents[v] for v in self.sources[i]]
            self._drop_last_reads(tangents, i)
            if isinstance(step, _Add):
                present = [t for t in reads if t is not None]
                dz, rule = sum(present[1:], present[0]), _same_cotangents
            else:
                dz, rule = step.tangent(state, reads[0], point)
            tangents[i + 1] = dz
            rules.append(rule)
        return tangents[-1], rules

    def _cotangents(
        self,
        rules: list[BackwardRule | None],
        cotangents: Tensor,
        out: tuple[Tensor, ...],
    ) -> None:
        """Run the rules backwards from the output's cotangents, adding into ``out``.

        The cotangents a rule returns go to every value its step read (both
        summands of an :class:`_Add`); a value read by several steps gets the sum
        (out of place: rules may return views of the cotangents they were given).
        """
        pending: list[Tensor | None] = [None] * len(self.steps) + [cotangents]
        for i in reversed(range(len(self.steps))):
            rule, g = rules[i], pending[i + 1]
            pending[i + 1] = None
            if rule is None or g is None:
                continue
            grad = rule(g, out)
            if grad is None:
                continue
            for v in self.sources[i]:
                if self._has_tangent[v]:
                    pending[v] = grad if pending[v] is None else pending[v] + grad


def _float_masks(
    steps: Sequence[_Step], states: list[Any], dtype: torch.dtype
) -> list[Any]:
    """``states`` with the activations' bool masks (ReLU's) as ``dtype`` tensors.

    A bool mask keeps a quarter of the memory (float32), but multiplying by it is
    slower (1.5x at a million entries); with several chunks of columns the product
    multiplies by each mask twice per chunk, which made 16-column products of the CNN
    W2 10% slower than with float masks.
    """
    return [
        state.to(dtype)
        if isinstance(step, _Activation) and state is not None
        and state.dtype == torch.bool
        else state
        for step, state in zip(steps, states)
    ]  # fmt: skip


def _same_cotangents(g: Tensor, out: tuple[Tensor, ...]) -> Tensor:
    """Backward rule of an :class:`_Add`: each summand gets the sum's cotangents."""
    return g


def _step_with_parameters(
    cls: type[Module],
) -> type[_Linear] | type[_Conv] | type[_BatchNorm] | None:
    """The step of a layer type with a ``weight`` and a ``bias`` (``None``: other)."""
    if cls is nn.Linear:
        return _Linear
    if cls in CONVOLUTIONS:
        return _Conv
    if cls in BATCH_NORMS:
        return _BatchNorm
    return None


def chain_from_calls(
    calls: Sequence[Call],
    slots: Mapping[str, int],
    modules: Sequence[tuple[Module, type[Module]]],
    guards: tuple[Callable[[], bool], ...] = (),
    sources: Sequence[tuple[int, ...]] | None = None,
) -> SequentialChain | None:
    """The closed-form chain of a sequence of calls, or ``None`` if one is unsupported.

    Args:
        calls: The model's computation in order: ``(qualified name, module)`` pairs,
            reshapes of the primal and :data:`ADD`.
        slots: Parameter name (every name of a tied tensor included) -> its slot in
            the ``params`` of the products.
        modules: Every module of the model with its type (containers included).
        guards: Passed on to :class:`SequentialChain`.
        sources: The values each call reads: 0 is the model's input, ``j + 1`` the
            output of call ``j``; two for :data:`ADD`, one for the others. The last
            call's output is the model's. Default: each call reads the previous one.

    Returns:
        The chain, or ``None`` if a call is unsupported or a parameter in ``slots``
        is not a weight or bias of a called layer.
    """
    if sources is None:
        sources = [(j,) for j in range(len(calls))]
    steps: list[_Step] = []
    step_sources: list[tuple[int, ...]] = []
    node_of = [0]  # value of the calls -> value of the steps (pass-through dropped)
    has_tangent = [False]  # per value of the steps: depends on a differentiated one
    differentiated: set[int] = set()
    for call, reads in zip(calls, sources):
        nodes = tuple(node_of[v] for v in reads)
        if isinstance(call, tuple) and type(call[1]) in PASS_THROUGH:
            node_of.append(nodes[0])
            continue
        step = _step(call, slots, any(has_tangent[n] for n in nodes))
        if step is None:
            return None
        for slot in (getattr(step, "weight", None), getattr(step, "bias", None)):
            if slot is not None:
                differentiated.add(slot)
        steps.append(step)
        step_sources.append(nodes)
        has_tangent.append(step.active)
        node_of.append(len(steps))
    if differentiated != set(slots.values()):
        return None  # a parameter the chain does not see (not a layer's weight/bias)
    if node_of[-1] != len(steps):
        return None  # the output passes an earlier value through (not in a chain)
    return SequentialChain(tuple(steps), tuple(modules), guards, tuple(step_sources))


def _step(call: Call, slots: Mapping[str, int], reached: bool) -> _Step | None:
    """The step of a call (``None``: unsupported); ``reached``: its input has tangents."""
    if isinstance(call, Add):
        return _Add(reached)
    if not isinstance(call, tuple):
        return _Reshape(call, reached)
    name, module = call
    cls = type(module)
    step_cls = _step_with_parameters(cls)
    if step_cls is not None:
        weight = slots.get(f"{name}.weight") if module.weight is not None else None
        bias = slots.get(f"{name}.bias") if module.bias is not None else None
        own = weight is not None or bias is not None
        return step_cls(module, weight, bias, reached or own, reached)
    if cls in CLOSED_FORM_ACTIVATIONS or cls in ELEMENTWISE_ACTIVATIONS:
        return _Activation(module, reached)
    if cls in MAX_POOLINGS:
        return _MaxPool(module, reached)
    if cls in AVERAGE_POOLINGS:
        return _AvgPool(module, reached)
    if cls is nn.Flatten:
        return _Reshape(module, reached)
    return None


def _unrolled_calls(
    model: nn.Sequential,
) -> tuple[list[Call], list[tuple[Module, type[Module]]], Callable[[], bool]] | None:
    """The calls of a (nested) ``nn.Sequential``, its modules and a guard.

    The guard checks that the containers still hold the same children. ``None`` if a
    child is ``None``.
    """
    containers: list[tuple[nn.Sequential, tuple[Module, ...]]] = []
    calls: list[Call] = []
    modules: list[tuple[Module, type[Module]]] = []

    def unroll(container: nn.Sequential, prefix: str) -> bool:
        containers.append((container, tuple(container._modules.values())))
        modules.append((container, nn.Sequential))
        for name, child in container._modules.items():
            if child is None:
                return False
            if type(child) is nn.Sequential:
                if not unroll(child, f"{prefix}{name}."):
                    return False
            else:
                modules.append((child, type(child)))
                calls.append((f"{prefix}{name}", child))
        return True

    if not unroll(model, ""):
        return None

    def same_children() -> bool:
        return all(
            tuple(container._modules.values()) == children
            for container, children in containers
        )

    return calls, modules, same_children


def sequential_chain(model: object, slots: Mapping[str, int]) -> SequentialChain | None:
    """The closed-form chain of ``model``, or ``None`` if it does not qualify.

    Args:
        model: The model: an ``nn.Sequential``, or a module whose ``forward``
            :func:`curvlinops_fisher.traced_chain.traced_calls` traces to a chain.
        slots: Parameter name (every name of a tied tensor included) -> its slot in
            the ``params`` of the products.

    Returns:
        The chain, or ``None``.
    """
    if type(model) is nn.Sequential:
        unrolled = _unrolled_calls(model)
        if unrolled is None:
            return None
        calls, modules, same_children = unrolled
        return chain_from_calls(calls, slots, modules, (same_children,))
    from curvlinops_fisher.traced_chain import traced_calls  # (imports this module)

    traced = traced_calls(model)
    if traced is None:
        return None
    calls, modules, guards, sources = traced
    return chain_from_calls(calls, slots, modules, guards, sources)
