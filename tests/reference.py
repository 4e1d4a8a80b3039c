"""Brute-force dense reference curvature matrices built with ``torch.func``.

All matrices are computed in float64 (the model is copied and converted), whatever the
dtype of the problem. The Monte-Carlo Fisher draws its samples from the model's output
in the model's *native* dtype, exactly like the documented sampling scheme, so that the
reference and an operator in float32 see the same samples.

Conventions (``N_b``: batch size, ``num_data``: total number of data points):

- GGN: ``sum_b s_b J_b^T H_b J_b`` with ``H_b`` the Hessian of ``loss_func(f, y_b)``
  w.r.t. the output, ``s_b = 1`` (sum) or ``N_b / num_data`` (mean).
- EF: ``sum_b c_b sum_t g_t g_t^T``, ``g_t`` the parameter gradient of the t-th term's
  sum-reduced loss, ``c_b = 1`` (sum) or ``N_b / (num_data D_b)`` (mean) where ``D_b``
  is the divisor of PyTorch's mean (CE: number of terms; MSE/BCE: ``f.numel()``).
- MC Fisher: ``sum_b c_b / M sum_m sum_t J_t^T g_mt g_mt^T J_t`` with would-be
  gradients ``g_mt`` drawn from a generator that is re-seeded for every product.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.functional import one_hot

Batch = tuple[Any, Tensor]


def _param_names(model: nn.Module, params: list[Tensor]) -> list[str]:
    """Look up the names of ``params`` inside ``model`` (by identity).

    Args:
        model: The model.
        params: A subset of the model's parameters.

    Returns:
        The parameters' names in ``model.named_parameters()``.

    Raises:
        ValueError: If a parameter is not part of the model.
    """
    id_to_name = {
        id(p): name for name, p in model.named_parameters(remove_duplicate=False)
    }
    names = []
    for p in params:
        if id(p) not in id_to_name:
            raise ValueError("Parameter is not part of the model.")
        names.append(id_to_name[id(p)])
    return names


def _to_float64(X: Any) -> Any:
    """Convert floating point tensors (also inside a dict) to float64.

    Args:
        X: A tensor, a mapping of tensors, or anything else (returned as is).

    Returns:
        The converted object.
    """
    if isinstance(X, Tensor):
        return X.double() if X.is_floating_point() else X
    if isinstance(X, dict):
        return {k: _to_float64(v) for k, v in X.items()}
    return X


def _flatten_terms(x: Tensor, out_shape: torch.Size, loss_func: nn.Module) -> Tensor:
    """Flatten ``x`` of shape ``(*out_shape, *rest)`` to ``(T, C, *rest)``.

    Args:
        x: Tensor whose leading axes have the model output's shape.
        out_shape: Shape of the model output.
        loss_func: The loss; CE has its class axis at 1, MSE/BCE at the end.

    Returns:
        Tensor of shape ``(T, C, *rest)`` where ``T`` is the number of loss terms.
    """
    rest = x.shape[len(out_shape) :]
    if len(out_shape) == 1:  # 1-D output: one term per datum, C = 1
        return x.reshape(out_shape[0], 1, *rest)
    if isinstance(loss_func, nn.CrossEntropyLoss):
        C = out_shape[1]
        x = x.movedim(1, len(out_shape) - 1)
    else:
        C = out_shape[-1]
    return x.reshape(-1, C, *rest)


class _Functional:
    """Float64 functional version of a model w.r.t. a flat parameter vector."""

    def __init__(self, model: nn.Module, params: list[Tensor]) -> None:
        """Copy the model to float64 and record the parameters' names and shapes.

        Args:
            model: The model.
            params: The parameters the curvature is taken w.r.t.
        """
        names = _param_names(model, params)
        self.model64 = copy.deepcopy(model).double()
        self.names = names
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.theta = torch.cat([p.detach().double().flatten() for p in params])

    @property
    def dim(self) -> int:
        """Number of parameters.

        Returns:
            ``P``.
        """
        return self.theta.numel()

    def __call__(self, theta: Tensor, X: Any) -> Tensor:
        """Evaluate the float64 model at the flat parameters ``theta``.

        Args:
            theta: Flat parameter vector of size ``P``.
            X: (float64) model input.

        Returns:
            The model output.
        """
        tensors = [t.reshape(s) for t, s in zip(theta.split(self.numels), self.shapes)]
        return functional_call(self.model64, dict(zip(self.names, tensors)), (X,))


def _batches(
    data: Iterable[Batch], batch_size_fn: Callable[[Any], int] | None
) -> tuple[list[tuple[Any, Tensor, int]], int]:
    """Materialize the batches and their sizes.

    Args:
        data: Re-iterable of ``(X, y)``.
        batch_size_fn: Batch size function, or ``None`` for ``X.shape[0]``.

    Returns:
        List of ``(X, y, N_b)`` and the total number of data points.
    """
    size_fn = batch_size_fn if batch_size_fn is not None else (lambda X: X.shape[0])
    batches = [(X, y, int(size_fn(X))) for X, y in data]
    return batches, sum(n for _, _, n in batches)


def _mean_divisor(out: Tensor, y: Tensor, loss_func: nn.Module) -> int:
    """The number PyTorch's ``reduction='mean'`` divides a batch's summed loss by.

    Args:
        out: Model output of the batch.
        y: Targets of the batch.
        loss_func: The loss function.

    Returns:
        Number of terms (CE) or number of output entries (MSE/BCE).
    """
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return y.numel()
    return out.numel()


def _term_losses(out: Tensor, y: Tensor, loss_func: nn.Module) -> Tensor:
    """Per-term sum-reduced losses of a batch.

    Args:
        out: Model output of the batch.
        y: Targets of the batch.
        loss_func: The loss function (its reduction is ignored).

    Returns:
        Vector of length ``T`` with each term's loss (MSE/BCE: summed over ``C``).
    """
    unreduced = copy.copy(loss_func)
    unreduced.reduction = "none"
    losses = unreduced(out, y)
    if not isinstance(loss_func, nn.CrossEntropyLoss) and out.ndim >= 2:
        losses = losses.sum(-1)
    return losses.flatten()


def dense_ggn(
    model: nn.Module,
    loss_func: nn.Module,
    params: list[Tensor],
    data: Iterable[Batch],
    num_data: int | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> Tensor:
    """Dense float64 generalized Gauss-Newton matrix.

    Args:
        model: The model.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: Parameters the GGN is taken w.r.t.
        data: Re-iterable of ``(X, y)``.
        num_data: Total number of data points (inferred if ``None``).
        batch_size_fn: Batch size function for non-tensor inputs.

    Returns:
        The ``(P, P)`` GGN in float64.
    """
    f = _Functional(model, params)
    batches, inferred = _batches(data, batch_size_fn)
    num_data = inferred if num_data is None else num_data
    result = torch.zeros(f.dim, f.dim, dtype=torch.float64)

    for X, y, N_b in batches:
        X, y = _to_float64(X), _to_float64(y)
        out = f(f.theta, X)
        J = jacrev(lambda theta, X=X: f(theta, X))(f.theta).reshape(-1, f.dim)
        H = hessian(lambda out, y=y: loss_func(out, y))(out)
        H = H.reshape(out.numel(), out.numel())
        scale = 1.0 if loss_func.reduction == "sum" else N_b / num_data
        result += scale * J.T @ H @ J

    return result


def dense_ef(
    model: nn.Module,
    loss_func: nn.Module,
    params: list[Tensor],
    data: Iterable[Batch],
    num_data: int | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> Tensor:
    """Dense float64 empirical Fisher from per-term gradients.

    Args:
        model: The model.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: Parameters the EF is taken w.r.t.
        data: Re-iterable of ``(X, y)``.
        num_data: Total number of data points (inferred if ``None``).
        batch_size_fn: Batch size function for non-tensor inputs.

    Returns:
        The ``(P, P)`` empirical Fisher in float64.
    """
    f = _Functional(model, params)
    batches, inferred = _batches(data, batch_size_fn)
    num_data = inferred if num_data is None else num_data
    result = torch.zeros(f.dim, f.dim, dtype=torch.float64)

    for X, y, N_b in batches:
        X, y = _to_float64(X), _to_float64(y)

        def term_losses(theta: Tensor, X: Any = X, y: Tensor = y) -> Tensor:
            return _term_losses(f(theta, X), y, loss_func)

        grads = jacrev(term_losses)(f.theta)  # (T, P)
        if loss_func.reduction == "sum":
            scale = 1.0
        else:
            out = f(f.theta, X)
            scale = N_b / (num_data * _mean_divisor(out, y, loss_func))
        result += scale * grads.T @ grads

    return result


def sample_grad_outputs(
    F: Tensor, loss_func: nn.Module, mc_samples: int, generator: torch.Generator
) -> Tensor:
    """Draw would-be gradients w.r.t. a flattened output (documented scheme).

    Args:
        F: Detached flattened model output of shape ``(T, C)``.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        mc_samples: Number of samples ``M``.
        generator: The random number generator to draw from.

    Returns:
        Would-be gradients of shape ``(M, T, C)`` (dtype of ``F``).

    Raises:
        NotImplementedError: For other losses.
    """
    T, C = F.shape
    if isinstance(loss_func, nn.MSELoss):
        mean = torch.zeros(mc_samples, T, C, dtype=F.dtype, device=F.device)
        std = torch.as_tensor(math.sqrt(0.5), device=F.device)
        return 2 * torch.normal(mean, std, generator=generator)
    if isinstance(loss_func, nn.CrossEntropyLoss):
        prob = F.softmax(dim=1)
        samples = prob.multinomial(
            num_samples=mc_samples, replacement=True, generator=generator
        )  # (T, M)
        return prob.unsqueeze(0) - one_hot(samples.T, C).to(prob.dtype)
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        prob = F.sigmoid()
        expanded = prob.unsqueeze(0).expand(mc_samples, -1, -1)
        return prob - expanded.bernoulli(generator=generator)
    raise NotImplementedError(f"Unsupported loss {loss_func}.")


def dense_fisher_mc(
    model: nn.Module,
    loss_func: nn.Module,
    params: list[Tensor],
    data: Iterable[Batch],
    seed: int = 2147483647,
    mc_samples: int = 1,
    num_data: int | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> Tensor:
    """Dense float64 Monte-Carlo Fisher with the documented sampling scheme.

    A fresh generator seeded with ``seed`` is used; batches are visited in data order.
    The samples are drawn from the output of the original model (native dtype).

    Args:
        model: The model.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: Parameters the MC Fisher is taken w.r.t.
        data: Re-iterable of ``(X, y)``.
        seed: Seed of the generator.
        mc_samples: Number of Monte-Carlo samples ``M``.
        num_data: Total number of data points (inferred if ``None``).
        batch_size_fn: Batch size function for non-tensor inputs.

    Returns:
        The ``(P, P)`` MC Fisher in float64.
    """
    f = _Functional(model, params)
    batches, inferred = _batches(data, batch_size_fn)
    num_data = inferred if num_data is None else num_data
    result = torch.zeros(f.dim, f.dim, dtype=torch.float64)

    device = params[0].device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    for X, y, N_b in batches:
        with torch.no_grad():
            out_native = model(X).detach()
        F = _flatten_terms(out_native, out_native.shape, loss_func)
        G = sample_grad_outputs(F, loss_func, mc_samples, generator).double()

        X64, y64 = _to_float64(X), _to_float64(y)
        out = f(f.theta, X64)
        J = jacrev(lambda theta, X=X64: f(theta, X))(f.theta)
        J = _flatten_terms(J, out.shape, loss_func)  # (T, C, P)
        A = torch.einsum("mtc,tcp->mtp", G, J).reshape(-1, f.dim)

        if loss_func.reduction == "sum":
            scale = 1.0
        else:
            scale = N_b / (num_data * _mean_divisor(out, y64, loss_func))
        result += (scale / mc_samples) * A.T @ A

    return result


def to_dense(op: Any) -> Tensor:
    """Materialize a (PyTorch) linear operator by multiplying onto the identity.

    Args:
        op: Linear operator with ``shape``, ``dtype``, ``device`` and ``@``.

    Returns:
        The dense matrix ``op @ I``.
    """
    identity = torch.eye(op.shape[1], dtype=op.dtype, device=op.device)
    return op @ identity


def relative_error(A: Tensor, B: Tensor) -> float:
    """Relative Frobenius distance ``||A - B|| / ||B||``.

    Args:
        A: Approximation.
        B: Reference (non-zero).

    Returns:
        The relative error (computed in float64).
    """
    A, B = A.detach().double().cpu(), B.detach().double().cpu()
    return float((A - B).norm() / B.norm())


def assert_matrix_close(
    actual: Tensor, expected: Tensor, rtol: float = 1e-10, atol: float = 1e-10
) -> None:
    """Entry-wise comparison in float64, with tolerances relative to the matrix scale.

    ``atol`` is scaled by the largest absolute entry of ``expected`` (at least 1) so
    that the check is meaningful for matrices of very different magnitude.

    Args:
        actual: Computed matrix.
        expected: Reference matrix.
        rtol: Relative tolerance.
        atol: Absolute tolerance (relative to ``max(1, max|expected|)``).
    """
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)
