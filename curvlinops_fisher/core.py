r"""The per-batch kernel: one batch's curvature times a matrix, and its linearization.

For one batch ``(X, y)`` with model output :math:`\mathbf{f} = f(\mathbf{X};
\boldsymbol{\theta})` split into loss terms :math:`\mathbf{f}_t \in \mathbb{R}^C`,
the batch's curvature applied to the columns :math:`\mathbf{v}_k` of a matrix is

.. math::
    c \sum_t \mathbf{J}_t^\top \mathbf{B}_t \mathbf{B}_t^\top \mathbf{J}_t \mathbf{v}_k,

computed as: the Jacobian-vector products :math:`\mathbf{J}_t\mathbf{v}_k`, the
output-space contraction with :math:`\mathbf{B}_t\mathbf{B}_t^\top` (see
:mod:`curvlinops_fisher.factors`), and one VJP batched over the columns. The
linearization takes the first strategy of :data:`STRATEGIES` that applies.

This module is also the public home of the model-function helpers
(:mod:`curvlinops_fisher.model_function`), re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlinops_fisher.closed_form import ChainNotApplicable
from curvlinops_fisher.data import ModelInput
from curvlinops_fisher.dual_numbers import linearize_dual
from curvlinops_fisher.factors import BatchOutputFactor, OutputFactorKind
from curvlinops_fisher.fast_path_checks import warn_once
from curvlinops_fisher.linearization import (
    Linearization,
    ModelFunction,
    linearize_columns,
    remember,
)
from curvlinops_fisher.losses import FisherLoss
from curvlinops_fisher.model_function import (
    ModuleFunction,
    forward_ad_compatible_kernels,
    make_model_function,
    named_model_function,
    parameter_names,
)
from curvlinops_fisher.reverse_over_reverse import (
    diagnose_forward_ad_failure,
    linearize_reverse_over_reverse,
    missing_forward_ad,
)

__all__ = [
    "DEFAULT_MAX_COLUMNS",
    "DEFAULT_MC_SEED",
    "REVERSE_OVER_REVERSE_FALLBACK",
    "SEQUENTIAL_CHAIN_PRODUCTS",
    "STRATEGIES",
    "Linearization",
    "ModelFunction",
    "ModuleFunction",
    "Strategy",
    "batch_curvature_matmat",
    "forward_ad_compatible_kernels",
    "linearize",
    "make_model_function",
    "named_model_function",
    "parameter_names",
    "takes_closed_form",
]

#: Default of the most matrix columns that share one forward pass.
DEFAULT_MAX_COLUMNS = 64
#: Default seed of the Monte-Carlo Fisher's generator (operators and functional API).
DEFAULT_MC_SEED = 2147483647
#: Whether products of models with a closed-form linearization
#: (:mod:`curvlinops_fisher.closed_form`) use it instead of forward- and reverse-mode
#: AD. Same numbers to rounding; products 1.2x (MLP 784-256-256-10) to 1.5x (MLP
#: 20-64-64-5) faster, see ``benchmarks/RESULTS.md``.
SEQUENTIAL_CHAIN_PRODUCTS = True
#: Whether models with an operation that has no forward-mode derivative (PyTorch's
#: "Trying to use forward AD with ...", e.g. ``nn.EmbeddingBag``) take the JVP as the
#: VJP of the VJP (:func:`linearize_reverse_over_reverse`) instead of failing.
REVERSE_OVER_REVERSE_FALLBACK = True


def batch_curvature_matmat(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    y: Tensor,
    V: tuple[Tensor, ...],
    loss: FisherLoss,
    factor_kind: OutputFactorKind,
    scale: float = 1.0,
    max_columns: int | None = None,
    check_targets: bool = False,
    out: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor, ...]:
    r"""Multiply one batch's curvature onto a matrix.

    Computes :math:`c \sum_t \mathbf{J}_t^\top \mathbf{B}_t \mathbf{B}_t^\top
    \mathbf{J}_t \mathbf{V}` for the ``K`` columns of ``V``. Cost per group of at
    most ``max_columns`` columns: the forward pass or passes of :func:`linearize`
    with the tangents of all columns of the group (batched over the columns), an
    output-space contraction of cost :math:`O(K T C R)` (``R`` = 1 for the EF, ``M``
    for the MC Fisher; closed form for the GGN), and one backward pass batched over
    the columns.
    The MC samples live in output space, so ``mc_samples`` does not multiply the
    passes; the batch's factor is built once and shared by all columns.

    Args:
        model_function: ``f(param_values, X)``, see :func:`make_model_function`.
        params: Parameter values (the linearization point).
        X: The batch's input.
        y: The batch's targets.
        V: Matrix in tensor list format with a *leading* column axis:
            ``V[i]`` has shape ``(K, *params[i].shape)``.
        loss: The loss wrapper.
        factor_kind: Which curvature matrix (GGN, MC Fisher, EF).
        scale: The reduction scale :math:`c` of this batch.
        max_columns: Largest number of columns that share a forward pass (bounds
            memory: each column carries a tangent of every activation). ``None``: all.
        check_targets: Validate ``y`` against the output first.
        out: Contiguous tensors in the format of ``V`` to add the product to (the
            backward pass accumulates into them: no temporary per batch). ``None``:
            new zeros.

    Returns:
        ``out`` plus the product, in the format of ``V``.
    """
    if out is None:
        out = tuple(torch.zeros(v.shape, dtype=v.dtype, device=v.device) for v in V)
    K = V[0].shape[0]
    step = K if max_columns is None else max(1, max_columns)
    factor: BatchOutputFactor | None = None
    for start in range(0, K, step):
        V_chunk = tuple(v[start : start + step] for v in V)
        output, JV, backward = linearize(model_function, params, X, V_chunk)
        if factor is None:
            if check_targets:
                loss.check_targets(output, y)
            factor = factor_kind.for_batch(
                loss, loss.flatten(output), loss.flatten_targets(y, output)
            )
        W = factor.apply(loss.flatten(JV, lead=1))
        if scale != 1.0:
            W = W * scale
        out_chunk = tuple(o[start : start + step] for o in out)
        backward(loss.unflatten(W, output.shape, lead=1), out_chunk)
    return out


def takes_closed_form(model_function: ModelFunction) -> bool:
    """Whether products of ``model_function`` take its closed-form chain.

    (:mod:`curvlinops_fisher.closed_form`: the model has one, it is still current and
    :data:`SEQUENTIAL_CHAIN_PRODUCTS` is on; a batch input it cannot take still falls
    back to automatic differentiation.)
    """
    chain = getattr(model_function, "sequential", None)
    return SEQUENTIAL_CHAIN_PRODUCTS and chain is not None and chain.is_current()


def _checked_closed_form(
    model_function: ModelFunction, params: tuple[Tensor, ...], X: Tensor
) -> bool:
    """Whether products on ``X`` take the closed-form chain (checked, current).

    The chain must be current (:func:`takes_closed_form`) and agree with the
    generic path on this input signature (:meth:`SequentialChain.check`: checked
    on the first batch of each signature). A disagreement switches the chain off
    for the operator and warns once (:mod:`curvlinops_fisher.fast_path_checks`).
    """
    if not takes_closed_form(model_function) or torch.compiler.is_compiling():
        return False
    chain = model_function.sequential
    try:
        problem = chain.check(
            params, X, lambda V: linearize_columns(model_function, params, X, V)
        )
    except ChainNotApplicable:
        return False
    if problem is not None:
        model = getattr(model_function, "model", model_function)
        warn_once(
            model_function,
            "closed-form chain",
            f"The closed-form chain of {type(model).__name__} disagrees with "
            f"torch.func on a batch of shape {tuple(X.shape)}: {problem}. Products "
            "of this operator use automatic differentiation instead.",
        )
        return False
    return True


def _closed_form(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    V: tuple[Tensor, ...],
) -> Linearization | None:
    """The model's closed-form chain, if current, checked and able to take ``X``."""
    if not isinstance(X, Tensor) or not _checked_closed_form(model_function, params, X):
        return None
    try:
        return model_function.sequential.linearize(params, X, V)
    except ChainNotApplicable:  # e.g. an unbatched convolution input
        return None


def _known_without_forward_mode(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    V: tuple[Tensor, ...],
) -> Linearization | None:
    """Reverse-over-reverse, if an earlier product found forward mode missing."""
    failure = getattr(model_function, "forward_ad_failure", None)
    if failure is None or not REVERSE_OVER_REVERSE_FALLBACK:
        return None
    return linearize_reverse_over_reverse(model_function, params, X, V, failure)


@dataclass(frozen=True)
class Strategy:
    """One way to linearize a batch.

    Attributes:
        name: What it is.
        attempt: ``attempt(model_function, params, X, V)``: the linearization, or
            ``None`` where the strategy does not apply.
        forward_mode: Whether it uses forward-mode AD: a missing forward-mode
            derivative then sends the product to reverse-over-reverse
            (:data:`REVERSE_OVER_REVERSE_FALLBACK`).
    """

    name: str
    attempt: Callable[
        [ModelFunction, tuple[Tensor, ...], ModelInput, tuple[Tensor, ...]],
        Linearization | None,
    ]
    forward_mode: bool


#: The linearization strategies, in the order :func:`linearize` tries them.
STRATEGIES: tuple[Strategy, ...] = (
    # the model's closed-form chain (:mod:`curvlinops_fisher.closed_form`): it has
    # one, :data:`SEQUENTIAL_CHAIN_PRODUCTS` is on, the chain is current, checked on
    # this input signature and takes the input
    Strategy("closed form", _closed_form, forward_mode=False),
    # an earlier product found an operation without forward-mode derivative
    Strategy("reverse over reverse", _known_without_forward_mode, forward_mode=False),
    # one column, eager mode, check passed (:mod:`curvlinops_fisher.dual_numbers`)
    Strategy("one column by dual numbers", linearize_dual, forward_mode=True),
    # always: ``vmap`` of ``jvp`` next to a VJP of the primal alone
    Strategy("columns by torch.func", linearize_columns, forward_mode=True),
)


def linearize(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    V: tuple[Tensor, ...],
) -> Linearization:
    """Forward pass with the tangents of ``V``'s columns, and the batched VJP.

    Takes the first of :data:`STRATEGIES` that applies. If a forward-mode strategy
    fails for want of an operation's forward-mode derivative (PyTorch's "Trying to
    use forward AD with ..."), the JVP is the VJP of the VJP
    (:func:`linearize_reverse_over_reverse`); the model function remembers that in
    ``forward_ad_failure`` (if it takes attributes), so later products go straight
    there.

    Args:
        model_function: ``f(param_values, X)``.
        params: Parameter values.
        X: Batch input.
        V: Columns with a leading axis, ``V[i]`` of shape ``(K, *params[i].shape)``.

    Returns:
        The detached output, the Jacobian-vector products ``(K, *output.shape)``, and
        the VJP ``backward(cotangents, out)``, batched over the columns: it adds the
        VJPs of cotangents ``(K, *output.shape)`` to ``out`` (format of ``V``).

    Raises:
        UnsupportedOperationError: If an operation has neither a forward-mode
            derivative nor a differentiable backward pass.
    """
    for strategy in STRATEGIES:
        try:
            result = strategy.attempt(model_function, params, X, V)
        except RuntimeError as error:  # (NotImplementedError derives from it)
            if not strategy.forward_mode:
                raise
            return _without_forward_mode(model_function, params, X, V, error)
        if result is not None:
            return result
    raise AssertionError("the last strategy applies to every batch")


def _without_forward_mode(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    V: tuple[Tensor, ...],
    error: RuntimeError,
) -> Linearization:
    """Reverse-over-reverse after ``error`` in forward mode, if it is a missing rule.

    Raises:
        RuntimeError: ``error`` itself, if it is not PyTorch's for a missing
            forward-mode derivative or :data:`REVERSE_OVER_REVERSE_FALLBACK` is off.
    """
    if not REVERSE_OVER_REVERSE_FALLBACK or missing_forward_ad(error) is None:
        raise error
    failure = diagnose_forward_ad_failure(model_function, params, X, V, error)
    remember(model_function, "forward_ad_failure", failure)
    return linearize_reverse_over_reverse(model_function, params, X, V, failure)
