r"""Traces of the empirical Fisher and of the generalized Fisher (GGN) in one call.

Two convenience functions under the names that users of ``torch_secorder`` know, for
a loss :math:`L = c \sum_{t=1}^T \ell(\mathbf{f}_t, \mathbf{y}_t)` on one batch whose
model output consists of ``T`` loss terms :math:`\mathbf{f}_t \in \mathbb{R}^C` (the
reduction scale :math:`c` is 1 for ``reduction='sum'`` and one over PyTorch's ``mean``
divisor otherwise: :math:`1/N` for ``CrossEntropyLoss`` with ``N`` terms,
:math:`1/(NC)` for ``MSELoss`` and ``BCEWithLogitsLoss``):

- :func:`empirical_fisher_trace`: the trace of the empirical Fisher, the scaled sum of
  the per-term squared gradient norms

  .. math::
      \operatorname{tr}\mathbf{F}_{\text{EF}}
      = c \sum_t \|\nabla_{\boldsymbol\theta}\ell(\mathbf{f}_t, \mathbf{y}_t)\|^2;

- :func:`generalized_fisher_trace`: the trace of the generalized Gauss-Newton matrix,
  which equals the Fisher for these losses,

  .. math::
      \operatorname{tr}\mathbf{G}
      = \operatorname{tr}\Big(c \sum_t \mathbf{J}_t^\top \mathbf{H}_t \mathbf{J}_t\Big)
      = \|\mathbf{U}\|_F^2,
      \qquad \mathbf{U} = \big[\sqrt{c}\,\mathbf{S}_t^\top \mathbf{J}_t\big]_t,

  with :math:`\mathbf{J}_t = \partial\mathbf{f}_t / \partial\boldsymbol\theta`,
  :math:`\mathbf{H}_t = \nabla^2_{\mathbf{f}_t}\ell` and its square root
  :math:`\mathbf{S}_t\mathbf{S}_t^\top = \mathbf{H}_t` from the losses layer.

Both are exact by default. Given ``num_samples=k`` they return an unbiased Hutchinson
estimate from ``k`` Rademacher probes instead.

Differences from torch_secorder:
    - Exact by default: ``num_samples=None`` gives the exact trace; an int asks for a
      Hutchinson estimate with that many probes, and the estimate really uses them.
      torch_secorder defaults to one sample and ignores the argument.
    - The empirical Fisher trace is the scaled sum of *per-term* squared gradient
      norms, not the squared norm of the mini-batch gradient
      :math:`\|\nabla_{\boldsymbol\theta}L\|^2 = c^2\|\sum_t\nabla_{\boldsymbol\theta}
      \ell_t\|^2`, which is what torch_secorder returns. The two differ by the
      cross terms :math:`\nabla\ell_s^\top\nabla\ell_t` and by a factor :math:`c`;
      the batch gradient's squared norm is not the trace of any Fisher.
    - The generalized Fisher trace is the trace of the GGN: it involves the loss
      Hessian :math:`\mathbf{H}_t` in output space, not squared gradients, and does
      not depend on the target values (they are validated and, for ``mean``, fix the
      divisor). torch_secorder returns the squared norm of the batch gradient again.
    - Reductions follow the loss: ``reduction='sum'`` or ``'mean'`` of the loss module
      sets :math:`c`, as in the operators of this package.
    - Randomness comes only from ``generator`` (or, if it is ``None``, from one draw of
      PyTorch's global generator), so seeded calls are reproducible.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from math import sqrt

import torch
from torch import Generator, Tensor
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, Module, MSELoss

from curvlinops_fisher.accumulation import (
    DEFAULT_CHUNK_BYTES,
    accumulation_dtype,
    squared_norm,
)
from curvlinops_fisher.curvature import EFLinearOperator
from curvlinops_fisher.determinism import check_modules_in_eval_mode
from curvlinops_fisher.errors import ParameterError
from curvlinops_fisher.estimators import _resolve_generator, hutchinson_trace
from curvlinops_fisher.factors import GGNFactor
from curvlinops_fisher.losses import FisherLoss, make_fisher_loss
from curvlinops_fisher.risk_scale import RiskScale

__all__ = ["empirical_fisher_trace", "generalized_fisher_trace"]

#: The loss modules that ``generalized_fisher_trace(..., loss_type=...)`` creates (all
#: with ``reduction='mean'``). ``"nll"`` is the categorical negative log-likelihood of
#: logits, i.e. ``CrossEntropyLoss``, as in torch_secorder.
LOSS_TYPES: dict[str, type[Module]] = {
    "nll": CrossEntropyLoss,
    "cross_entropy": CrossEntropyLoss,
    "mse": MSELoss,
    "bce": BCEWithLogitsLoss,
}


def empirical_fisher_trace(
    model: Module,
    loss_fn: Module,
    inputs: Tensor,
    targets: Tensor,
    num_samples: int | None = None,
    generator: Generator | None = None,
) -> Tensor:
    r"""Trace of the empirical Fisher of ``loss_fn`` on ``(inputs, targets)``.

    With :math:`\ell_t` the sum-reduced loss of term ``t`` (one datum, or one position
    of a sequence output) and :math:`c` the loss's reduction scale (module docstring),

    .. math::
        \operatorname{tr}\Big(c \sum_t \nabla_{\boldsymbol\theta}\ell_t
        (\nabla_{\boldsymbol\theta}\ell_t)^\top\Big)
        = c \sum_t \|\nabla_{\boldsymbol\theta}\ell_t\|^2,

    w.r.t. the trainable parameters ``[p for p in model.parameters() if
    p.requires_grad]`` (those the output does not depend on contribute zero). This is
    :meth:`EFLinearOperator.trace` of the one batch ``(inputs, targets)``; with
    ``num_samples=k`` it is :func:`~curvlinops_fisher.hutchinson_trace` of that
    operator with ``k`` Rademacher probes (unbiased, ``k`` operator columns).

    Differences from torch_secorder:
        Exact unless ``num_samples`` is given (torch_secorder: one sample by default,
        and the argument is ignored). The result is the scaled sum of *per-term*
        squared gradient norms, not the squared norm of the mini-batch gradient
        :math:`\|\nabla_{\boldsymbol\theta}L\|^2 = c^2\|\sum_t
        \nabla_{\boldsymbol\theta}\ell_t\|^2` that torch_secorder returns; the scale
        :math:`c` follows the loss's reduction.

    Args:
        model: The model; ``model(inputs)`` gives the outputs. Dropout and BatchNorm
            layers must be in eval mode (the per-term gradients are otherwise not
            defined independently of the batch).
        loss_fn: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` with
            ``reduction='mean'`` or ``'sum'``.
        inputs: The batch input, a tensor.
        targets: The batch targets.
        num_samples: ``None`` for the exact trace, or the number ``k >= 1`` of
            Hutchinson probes.
        generator: Source of the probes; ``None``: PyTorch's global generator
            (results follow ``torch.manual_seed``). Unused when exact.

    Returns:
        A scalar tensor with the parameters' dtype and device.

    Raises:
        ValueError: If ``num_samples`` is neither ``None`` nor a positive int.
        ParameterError: If no trainable parameter reaches the model's output.
        UnsupportedLossError: For an unsupported loss, reduction or loss option.
        TargetError: If ``targets`` do not fit the outputs and the loss.
        NonDeterministicError: If Dropout or BatchNorm layers are in training mode.
    """
    num_samples = _check_num_samples(num_samples)
    params = _used_parameters(model, inputs)
    operator = EFLinearOperator(model, loss_fn, params, [(inputs, targets)])
    if num_samples is None:
        return operator.trace()
    return hutchinson_trace(operator, num_samples, generator)


def generalized_fisher_trace(
    model: Module,
    outputs: Tensor,
    targets: Tensor,
    loss_fn: Module | None = None,
    loss_type: str = "nll",
    num_samples: int | None = None,
    create_graph: bool = False,
    generator: Generator | None = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tensor:
    r"""Trace of the GGN (the Fisher for these losses) of the loss on ``outputs``.

    ``outputs`` are the model's outputs, computed from the inputs and still attached
    to the autograd graph. With the factor rows
    :math:`\mathbf{u}_{tr} = \sqrt{c}\,\mathbf{J}_t^\top \mathbf{S}_t \mathbf{e}_r`
    (:math:`\mathbf{S}_t` the loss Hessian's square root from the losses layer,
    ``R = C`` columns per term),

    .. math::
        \operatorname{tr}\Big(c \sum_t \mathbf{J}_t^\top \mathbf{H}_t \mathbf{J}_t\Big)
        = \sum_{t, r} \|\mathbf{u}_{tr}\|^2 = \|\mathbf{U}\|_F^2.

    Each row is one vector-Jacobian product of ``outputs`` (reverse mode on the given
    graph, batched with ``is_grads_batched``): the exact trace costs ``T * R`` of them,
    in chunks of at most ``chunk_bytes``.

    With ``num_samples=k``, the output-space Hutchinson estimator

    .. math::
        \widehat{\operatorname{tr}} = \frac{1}{k}\sum_{j=1}^k \|\mathbf{U}^\top
        \mathbf{z}_j\|^2,
        \qquad \mathbf{U}^\top\mathbf{z} = \sum_t \mathbf{J}_t^\top
        \big(\sqrt{c}\,\mathbf{S}_t \mathbf{z}_t\big),
        \quad \mathbf{z}_j \in \{\pm 1\}^{T R} \text{ i.i.d. uniform},

    is returned instead: one VJP per probe. It is unbiased because
    :math:`\mathbb{E}\,\|\mathbf{U}^\top\mathbf{z}\|^2 = \operatorname{tr}(\mathbf{U}
    \mathbf{U}^\top) = \operatorname{tr}(\mathbf{U}^\top\mathbf{U})`, with variance
    :math:`\frac{2}{k}\sum_{i \ne j} (\mathbf{U}\mathbf{U}^\top)_{ij}^2`.

    The graph of ``outputs`` is retained, so it can still be used afterwards. With
    ``create_graph=True`` the result is differentiable w.r.t. the parameters (the
    derivative includes that of :math:`\mathbf{S}_t`, which depends on the outputs).

    Differences from torch_secorder:
        The result is the trace of the GGN, which involves the loss Hessian and not
        squared gradients; torch_secorder returns the squared norm of the mini-batch
        gradient. It is exact unless ``num_samples`` is given (torch_secorder: one
        sample by default, ignored); ``loss_fn`` may be any supported loss module,
        whose reduction sets :math:`c`; ``loss_type`` also accepts ``"mse"`` and
        ``"bce"``.

    Args:
        model: The model that computed ``outputs``; the trace is taken w.r.t. its
            trainable parameters (those ``outputs`` do not depend on contribute zero).
        outputs: The model's outputs on a batch, attached to the autograd graph.
        targets: The batch targets (validated; for ``reduction='mean'`` they fix the
            divisor of :math:`c`; the GGN of these losses does not depend on them).
        loss_fn: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` with
            ``reduction='mean'`` or ``'sum'``. ``None``: chosen by ``loss_type``.
        loss_type: Used if ``loss_fn`` is ``None``: a key of :data:`LOSS_TYPES`
            (``"nll"`` or ``"cross_entropy"``, ``"mse"``, ``"bce"``; mean reduction).
        num_samples: ``None`` for the exact trace, or the number ``k >= 1`` of
            Hutchinson probes.
        create_graph: Build the graph of the result, for higher derivatives.
        generator: Source of the probes; ``None``: a generator seeded from PyTorch's
            global one (results follow ``torch.manual_seed``). Unused when exact.
        chunk_bytes: Memory budget of one chunk of batched VJPs (its cotangents and
            parameter-sized results; default 256 MiB).

    Returns:
        A scalar tensor; it has a ``grad_fn`` if ``create_graph``.

    Raises:
        ValueError: If ``num_samples`` is neither ``None`` nor a positive int, for an
            unknown ``loss_type``, or if ``outputs`` carry no autograd graph.
        ParameterError: If no trainable parameter of ``model`` reaches ``outputs``.
        UnsupportedLossError: For an unsupported loss, reduction or loss option.
        TargetError: If ``targets`` do not fit ``outputs`` and the loss.
    """
    num_samples = _check_num_samples(num_samples)
    loss = make_fisher_loss(_resolve_loss(loss_fn, loss_type))
    _check_outputs(outputs)
    params = _trainable_parameters(model)
    loss.check_targets(outputs.detach(), targets)
    with torch.enable_grad():
        factor = _scaled_hessian_sqrt(loss, outputs, targets, create_graph)
        step = _rows_per_chunk(outputs, params, chunk_bytes)
        if num_samples is None:
            cotangents = _row_cotangents(factor, step)
        else:
            generator = _resolve_generator("generalized_fisher_trace", generator)
            cotangents = _probe_cotangents(factor, num_samples, generator, step)
        total = _sum_squared_vjps(outputs, params, loss, cotangents, create_graph)
    return total if num_samples is None else total / num_samples


# ------------------------------------------------------------------ arguments


def _check_num_samples(num_samples: object) -> int | None:
    """Return ``num_samples`` as ``int`` (or ``None``), or raise ``ValueError``."""
    if num_samples is None:
        return None
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, numbers.Integral)
        or num_samples < 1
    ):
        raise ValueError(
            "num_samples must be None (exact trace) or a positive int (number of "
            f"Hutchinson probes); got {num_samples!r}."
        )
    return int(num_samples)


def _resolve_loss(loss_fn: Module | None, loss_type: str) -> Module:
    """The loss module: ``loss_fn`` if given, else a new one picked by ``loss_type``."""
    if loss_fn is not None:
        return loss_fn
    if loss_type not in LOSS_TYPES:
        options = ", ".join(repr(name) for name in LOSS_TYPES)
        raise ValueError(
            f"Unknown loss_type {loss_type!r}; use one of {options}, or pass loss_fn."
        )
    return LOSS_TYPES[loss_type]()


def _check_outputs(outputs: object) -> None:
    """Require a tensor with a batch axis that is attached to the autograd graph."""
    if not isinstance(outputs, Tensor):
        raise ValueError(f"outputs must be a tensor; got {type(outputs).__name__}.")
    if outputs.ndim == 0:
        raise ValueError(
            "outputs must have a batch axis; got a scalar. Pass the model's outputs, "
            "not the loss."
        )
    if outputs.grad_fn is None:
        raise ValueError(
            "outputs carry no autograd graph (they were detached, computed under "
            "torch.no_grad() or torch.inference_mode(), or are a leaf tensor). Pass "
            "outputs = model(inputs) computed with gradients enabled."
        )


def _trainable_parameters(model: Module) -> list[Tensor]:
    """``[p for p in model.parameters() if p.requires_grad]``, which must not be empty."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ParameterError(
            "The model has no trainable parameters (none requires grad), so there is "
            "no curvature to take the trace of."
        )
    return params


def _used_parameters(model: Module, inputs: Tensor) -> list[Tensor]:
    """The trainable parameters that ``model(inputs)`` depends on.

    The others contribute zero to the trace, and the operator rejects them.
    """
    params = _trainable_parameters(model)
    check_modules_in_eval_mode(model)  # before a forward pass updates BatchNorm stats
    with torch.enable_grad():
        outputs = model(inputs)
    grads = (
        torch.autograd.grad(outputs.sum(), params, allow_unused=True)
        if outputs.grad_fn is not None
        else [None] * len(params)
    )
    used = [p for p, g in zip(params, grads) if g is not None]
    if not used:
        raise _no_parameter_reached()
    return used


def _no_parameter_reached() -> ParameterError:
    return ParameterError(
        "The outputs do not depend on any trainable parameter of the model. Pass the "
        "model that computes the outputs, with parameters that require grad."
    )


# ---------------------------------------------------------------- GGN trace


def _scaled_hessian_sqrt(
    loss: FisherLoss, outputs: Tensor, targets: Tensor, create_graph: bool
) -> Tensor:
    r""":math:`\sqrt{c}\,\mathbf{S}_t` for every loss term, shape ``(T, C, R)``.

    The outputs are the whole data set (one batch), so :math:`c` is the scale of a
    data set of one batch (:meth:`~curvlinops_fisher.risk_scale.RiskScale.of_batch`).
    They are detached unless the result must be differentiable.
    """
    output = outputs if create_graph else outputs.detach()
    factor = GGNFactor().for_batch(
        loss, loss.flatten(output), loss.flatten_targets(targets, output)
    )
    scale = RiskScale.of_batch(loss.loss_func, targets).batch_scale(targets, 1)
    return factor.matrix() * sqrt(scale)


def _rows_per_chunk(outputs: Tensor, params: list[Tensor], chunk_bytes: int) -> int:
    """How many VJPs fit ``chunk_bytes``: each holds a cotangent and a gradient."""
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int):
        raise ValueError(f"chunk_bytes must be an int; got {chunk_bytes!r}.")
    numel = outputs.numel() + sum(p.numel() for p in params)
    return max(1, chunk_bytes // (numel * outputs.dtype.itemsize))


def _row_cotangents(factor: Tensor, step: int) -> Iterator[Tensor]:
    r"""Cotangents of all rows of :math:`\mathbf{U}`, ``step`` rows at a time.

    Row ``i = t R + r`` has the cotangent :math:`\sqrt{c}\,\mathbf{S}_t\mathbf{e}_r`
    at term ``t`` and zeros elsewhere.

    Args:
        factor: :math:`\sqrt{c}\,\mathbf{S}_t` for every term, shape ``(T, C, R)``.
        step: Most rows per chunk.

    Yields:
        Flattened cotangents of shape ``(k, T, C)``.
    """
    T, C, R = factor.shape
    for start in range(0, T * R, step):
        stop = min(start + step, T * R)
        index = torch.arange(start, stop, device=factor.device)
        terms, columns = index // R, index % R
        W = factor.new_zeros(stop - start, T, C)
        W[torch.arange(stop - start, device=factor.device), terms] = factor[
            terms, :, columns
        ]
        yield W


def _probe_cotangents(
    factor: Tensor, num_samples: int, generator: Generator, step: int
) -> Iterator[Tensor]:
    r"""Cotangents :math:`\sqrt{c}\,\mathbf{S}_t\mathbf{z}_{jt}` of Rademacher probes.

    All probes :math:`\mathbf{z}_j \in \{\pm 1\}^{T R}` are drawn at once on the
    generator's device (so the result does not depend on ``step``), then moved.

    Args:
        factor: :math:`\sqrt{c}\,\mathbf{S}_t` for every term, shape ``(T, C, R)``.
        num_samples: Number ``k`` of probes.
        generator: Source of the probes.
        step: Most probes per chunk.

    Yields:
        Flattened cotangents of shape ``(k', T, C)``.
    """
    T, _, R = factor.shape
    signs = torch.randint(
        0, 2, (num_samples, T, R), generator=generator, device=generator.device
    )
    Z = (2 * signs - 1).to(dtype=factor.dtype, device=factor.device)
    for Z_chunk in Z.split(step):
        yield torch.einsum("tcr,ktr->ktc", factor, Z_chunk)


def _sum_squared_vjps(
    outputs: Tensor,
    params: list[Tensor],
    loss: FisherLoss,
    cotangents: Iterator[Tensor],
    create_graph: bool,
) -> Tensor:
    r"""Sum of :math:`\|\mathbf{J}^\top\mathbf{w}\|^2` over all flattened cotangents.

    Each gradient's squared norm is :func:`~curvlinops_fisher.accumulation.squared_norm`
    (float32 blocks summed in float64; see :func:`_squared_norm`), the sum over
    chunks and parameters in float64; the result has the outputs' data type (and is differentiable with
    ``create_graph``).

    Args:
        outputs: The model outputs (with graph).
        params: The parameters.
        loss: The loss wrapper (for the output layout).
        cotangents: Chunks of flattened cotangents ``(k, T, C)``.
        create_graph: Build the graph of the result.

    Returns:
        The scalar sum.

    Raises:
        ParameterError: If no parameter reaches ``outputs``.
    """
    total = outputs.new_zeros(
        (), dtype=accumulation_dtype(outputs.dtype, outputs.device)
    )
    for W in cotangents:
        grads = torch.autograd.grad(
            outputs,
            params,
            loss.unflatten(W, outputs.shape, lead=1),
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
            is_grads_batched=True,
        )
        if all(g is None for g in grads):
            raise _no_parameter_reached()
        for g in grads:
            if g is not None:
                total = total + _squared_norm(g, create_graph)
    return total.to(outputs.dtype)


def _squared_norm(g: Tensor, create_graph: bool) -> Tensor:
    """``||g||^2`` in float64: blocked without a graph, elementwise with one.

    The blocked norm's derivative divides by the blocks' norms, so its second
    derivative is ``nan`` at a zero block; with ``create_graph`` the squares are
    summed in float64 instead (a float64 copy of ``g``).
    """
    if create_graph:
        return g.square().sum(dtype=accumulation_dtype(g.dtype, g.device))
    return squared_norm(g)
