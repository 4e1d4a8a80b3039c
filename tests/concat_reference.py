"""Brute-force curvature of PyTorch's own loss on the *concatenated* data set.

Ground truth for loss options whose ``mean`` divisor depends on the targets
(``ignore_index``, class weights) and for everything else: all batches are
concatenated into one, the model is evaluated in float64 with ``torch.func``, and

- GGN: :math:`\\mathbf{J}^\\top \\nabla^2_{\\mathbf{f}} L(\\mathbf{f}, \\mathbf{y})
  \\mathbf{J}` with :math:`L` the loss module itself (reduction, weights, smoothing,
  ignored targets and all) on the concatenated output;
- EF: :math:`c \\sum_t \\mathbf{g}_t \\mathbf{g}_t^\\top`, :math:`\\mathbf{g}_t` the
  parameter gradient of the ``reduction='none'`` loss of term ``t`` (summed over the
  class axis for MSE/BCE), or of a datum's summed loss (``per_datum``), with
  :math:`c = 1` (sum) or :math:`L_\\text{sum} / L_\\text{mean}` read off PyTorch;
- MC Fisher: the documented sampling scheme, batch by batch in data order, scaled by
  each term's Hessian scale :math:`s_t = \\mathrm{tr}\\,\\mathbf{H}_t / (1 -
  \\|\\mathbf{p}_t\\|^2)` for ``CrossEntropyLoss`` (read off ``torch.func`` Hessians).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from reference import _flatten_terms, _Functional, _to_float64, sample_grad_outputs
from torch import Tensor, nn
from torch.func import hessian, jacrev, vmap

Batch = tuple[Any, Tensor]


def concatenate(batches: Iterable[Batch]) -> Batch:
    """One batch from many (tensor or dict inputs).

    Args:
        batches: The batches ``(X, y)``.

    Returns:
        The concatenated ``(X, y)``.
    """
    batches = list(batches)
    Xs, ys = zip(*batches)
    if isinstance(Xs[0], dict):
        X: Any = {k: torch.cat([X[k] for X in Xs]) for k in Xs[0]}
    else:
        X = torch.cat(Xs)
    return X, torch.cat(ys)


def loss64(loss_func: nn.Module, reduction: str | None = None) -> nn.Module:
    """A float64 copy of the loss (weights included), optionally re-reduced."""
    copied = copy.deepcopy(loss_func).double()
    if reduction is not None:
        copied.reduction = reduction
    return copied


def _term_losses(loss_func: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """Per-term losses ``(T,)`` from PyTorch's ``reduction='none'``."""
    losses = loss64(loss_func, "none")(out, y)
    if not isinstance(loss_func, nn.CrossEntropyLoss) and out.ndim >= 2:
        losses = losses.sum(-1)
    return losses.reshape(out.shape[0], -1)


def mean_scale(loss_func: nn.Module, out: Tensor, y: Tensor) -> float:
    """``1`` for ``sum``; else ``L_sum / L_mean`` of PyTorch on the whole data."""
    if loss_func.reduction == "sum":
        return 1.0
    total = loss64(loss_func, "sum")(out, y)
    return float(loss64(loss_func, "mean")(out, y) / total)


def dense_concat(
    model: nn.Module,
    loss_func: nn.Module,
    params: list[Tensor],
    batches: Iterable[Batch],
    kind: str,
    per_datum: bool = False,
) -> Tensor:
    """Dense float64 GGN (``kind='ggn'``) or EF (``'ef'``) of the concatenated data.

    Args:
        model: The model.
        loss_func: The loss module (any supported options).
        params: The parameters.
        batches: The data.
        kind: ``"ggn"`` or ``"ef"``.
        per_datum: EF of per-datum gradients instead of per-term ones.

    Returns:
        The ``(P, P)`` matrix.
    """
    f = _Functional(model, params)
    X, y = concatenate(batches)
    X, y = _to_float64(X), _to_float64(y)
    out = f(f.theta, X)
    if kind == "ggn":
        J = jacrev(lambda theta: f(theta, X))(f.theta).reshape(-1, f.dim)
        H = hessian(lambda o: loss64(loss_func)(o, y))(out)
        return J.T @ H.reshape(out.numel(), out.numel()) @ J

    def losses(theta: Tensor) -> Tensor:
        per_term = _term_losses(loss_func, f(theta, X), y)
        return per_term.sum(1) if per_datum else per_term.flatten()

    G = jacrev(losses)(f.theta)
    return mean_scale(loss_func, out, y) * G.T @ G


def dense_mc_concat(
    model: nn.Module,
    loss_func: nn.Module,
    params: list[Tensor],
    batches: Iterable[Batch],
    seed: int = 2147483647,
    mc_samples: int = 1,
) -> Tensor:
    """Dense float64 MC Fisher with the documented sampling (see module docstring).

    Args:
        model: The model.
        loss_func: The loss (without weights).
        params: The parameters.
        batches: The data, in order.
        seed: Seed of the generator.
        mc_samples: Number of samples per term.

    Returns:
        The ``(P, P)`` matrix.
    """
    batches = list(batches)
    f = _Functional(model, params)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for X, y in batches:
        with torch.no_grad():
            native = model(X)
        F = _flatten_terms(native, native.shape, loss_func)
        G = sample_grad_outputs(F, loss_func, mc_samples, generator).double()
        X64, y64 = _to_float64(X), _to_float64(y)
        out = f(f.theta, X64)
        if isinstance(loss_func, nn.CrossEntropyLoss):
            G = G * _ce_term_scales(loss_func, out, y64).sqrt().unsqueeze(-1)
        J = jacrev(lambda theta, X=X64: f(theta, X))(f.theta)
        J = _flatten_terms(J, out.shape, loss_func)  # (T, C, P)
        rows.append(torch.einsum("mtc,tcp->mtp", G, J).reshape(-1, f.dim))
    U = torch.cat(rows)
    X, y = concatenate(batches)
    X, y = _to_float64(X), _to_float64(y)
    scale = mean_scale(loss_func, f(f.theta, X), y)
    return scale / mc_samples * U.T @ U


def _ce_term_scales(loss_func: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """``s_t = tr H_t / (1 - |p_t|^2)`` of every term, from ``torch.func`` Hessians."""
    F = _flatten_terms(out, out.shape, loss_func)  # (T, C)
    soft = y.is_floating_point()
    Y = _flatten_terms(y, y.shape, loss_func) if soft else y.reshape(-1)
    single = loss64(loss_func, "sum")

    def term_loss(f_t: Tensor, y_t: Tensor) -> Tensor:
        return single(f_t.unsqueeze(0), y_t.unsqueeze(0))

    H = vmap(hessian(term_loss))(F, Y)  # (T, C, C)
    p = F.softmax(-1)
    return H.diagonal(dim1=-2, dim2=-1).sum(-1) / (1 - p.square().sum(-1))


def is_close(actual: Tensor, expected: Tensor, tol: float = 1e-10) -> bool:
    """Entry-wise closeness relative to the largest entry (float64)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = max(1.0, float(expected.abs().max()))
    return bool(((actual - expected).abs() <= tol * scale).all())


def ce_weight(num_classes: int) -> Tensor:
    """Distinct positive class weights."""
    return torch.linspace(0.5, 2.0, num_classes, dtype=torch.float64)
