r"""The top eigenpairs of :math:`\mathbf{A} = \mathbf{U}^\top\mathbf{U}`: Gram or Lanczos.

Through the small Gram matrix :math:`\mathbf{G} = \mathbf{U}\mathbf{U}^\top`
(``n x n``): if :math:`\mathbf{G}\mathbf{w} = \lambda \mathbf{w}` then
:math:`\mathbf{A}\,\mathbf{U}^\top\mathbf{w} = \lambda\,\mathbf{U}^\top\mathbf{w}`
and :math:`\|\mathbf{U}^\top\mathbf{w}\|^2 = \lambda` (LAPACK computes only the top
``k``); or with SciPy's Lanczos ``eigsh`` on products. :func:`prefer_gram` chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy
import scipy.linalg
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor

from curvlinops_fisher.distributed import ProcessGroupMixin, solve_on_root
from curvlinops_fisher.linop import PyTorchLinearOperator
from curvlinops_fisher.rows import FactorRows

#: Default memory budget (bytes) of what ``eigh`` holds on its Gram path (the
#: ``n x n`` Gram matrix; the ``n x P`` factor if it also fits): 256 MiB.
DEFAULT_MAX_BYTES = 256 * 2**20
#: Seed of the generator that draws the orthonormal completion of
#: :func:`gram_eigh` and the start vector of ``eigsh``.
_EIGH_SEED = 0

EighMethod = Literal["auto", "gram", "eigsh"]
_EIGH_METHODS = ("auto", "gram", "eigsh")
#: Data types of the Gram matrices that :func:`_top_eigh` hands to SciPy.
_LAPACK_DTYPES = (torch.float32, torch.float64)


def check_eigh_args(k: object, dim: int, method: object) -> None:
    """Validate ``k`` (``1 <= k <= P``) and ``method``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= dim:
        raise ValueError(f"k must be an int with 1 <= k <= P = {dim}; got {k!r}.")
    if method not in _EIGH_METHODS:
        raise ValueError(f"method must be one of {_EIGH_METHODS}; got {method!r}.")


def prefer_gram(
    num_rows: int,
    dim: int,
    itemsize: int,
    max_bytes: int,
    k: int = 1,
    num_data: int = 0,
    flops_per_point: float = 0.0,
    row_length: int | None = None,
) -> bool:
    r"""Whether ``eigh(method='auto')`` takes the Gram path.

    Only if the factor is short (``n <= P / 2``) and the ``n x n`` Gram matrix fits
    ``max_bytes``. Then, if the model's forward pass costs ``flops_per_point > 0``
    per data point (counted by PyTorch's flop counter), the path with fewer
    floating-point operations: the Gram path costs the rows' VJPs and the Gram matrix,
    :math:`2 n f + n^2 L` (``L = P`` numbers per row, fewer for rows in Kronecker
    form, see :mod:`curvlinops_fisher.kronecker`), Lanczos about :math:`(20 + 2k)` products of
    :math:`3 N f` each (forward, forward-mode and backward pass over ``N`` data
    points). So models with weight sharing (convolutions, sequence models), whose
    forward pass costs far more than :math:`P` per data point, take the Gram path even
    for many rows, while an MLP with many data points takes Lanczos.

    Args:
        num_rows: ``n``, the number of factor rows.
        dim: ``P``.
        itemsize: Bytes per number.
        max_bytes: Memory budget of the Gram path.
        k: Number of eigenpairs.
        num_data: ``N``, the number of data points.
        flops_per_point: Floating-point operations of the forward pass per data
            point (``0``: unknown, decide by size only).
        row_length: ``L``, numbers per row in the Gram product (``None``: ``P``).

    Returns:
        Whether to take the Gram path.
    """
    if 2 * num_rows > dim or num_rows**2 * itemsize > max_bytes:
        return False
    if flops_per_point <= 0 or num_data <= 0:
        return True
    length = dim if row_length is None else row_length
    gram_flops = 2 * num_rows * flops_per_point + num_rows**2 * length
    lanczos_flops = (20 + 2 * k) * 3 * num_data * flops_per_point
    return gram_flops <= lanczos_flops


def eigsh_top(op: PyTorchLinearOperator, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenpairs with SciPy's ``eigsh`` (Lanczos, products only).

    The start vector is drawn from a fixed seed, so the result is reproducible. If
    ``op`` has a process group, rank 0 runs ``eigsh`` while the other ranks serve its
    products (:func:`~curvlinops_fisher.distributed.solve_on_root`), and every rank
    returns the result.

    Args:
        op: A symmetric operator.
        k: Number of eigenpairs, ``1 <= k < P``.

    Returns:
        Eigenvalues ``[k]`` in descending order and eigenvectors ``[P, k]``.

    Raises:
        ValueError: If ``k >= P`` (ARPACK needs ``k < P``).
    """
    _check_eigsh_k(k, op.shape[1])
    if getattr(op, "process_group", None) is None:
        values, vectors = _eigsh_numpy(op.to_scipy(), k)
    else:  # one rank runs Lanczos, the others serve its products
        values, vectors = solve_on_root(op, lambda A: _eigsh_numpy(A, k))
    return (
        torch.as_tensor(values, dtype=op.dtype, device=op.device),
        torch.as_tensor(vectors, dtype=op.dtype, device=op.device),
    )


def _check_eigsh_k(k: int, dim: int) -> None:
    """ARPACK needs ``k < P``."""
    if k >= dim:
        raise ValueError(
            f"eigsh needs k < P = {dim}; got k={k}. Use method='gram', or "
            "torch.linalg.eigh(op.to_dense()) for all eigenpairs."
        )


def _eigsh_numpy(
    scipy_op: LinearOperator, k: int
) -> tuple[numpy.ndarray, numpy.ndarray]:
    """``eigsh`` from a fixed start vector; eigenpairs in descending order."""
    v0 = numpy.random.default_rng(_EIGH_SEED).standard_normal(scipy_op.shape[1])
    values, vectors = eigsh(scipy_op, k=k, which="LA", v0=v0.astype(scipy_op.dtype))
    order = numpy.argsort(values)[::-1]
    return values[order].copy(), vectors[:, order].copy()


def check_distributed_eigh(op: ProcessGroupMixin, method: str) -> None:
    """With a process group, the Gram path is unavailable (it needs all rows)."""
    if op.process_group is not None and method == "gram":
        raise ValueError(
            "eigh(method='gram') needs all rows of the factor U on one process, but "
            "with a process_group every rank holds only its own. Use method='eigsh' "
            "(or 'auto', which takes eigsh with a process_group)."
        )


def gram_eigh(
    gram: Tensor, transpose_product: Callable[[Tensor], Tensor], k: int
) -> tuple[Tensor, Tensor]:
    r"""The ``k`` largest eigenpairs of :math:`\mathbf{U}^\top\mathbf{U}` from its Gram matrix.

    With :math:`\mathbf{G} = \mathbf{U}\mathbf{U}^\top = \mathbf{W}\boldsymbol\Lambda
    \mathbf{W}^\top`, the eigenvectors are :math:`\mathbf{v}_i =
    \mathbf{U}^\top\mathbf{w}_i / \sqrt{\lambda_i}`. Eigenvalues at or below
    :math:`\lambda_\max \cdot n \cdot \varepsilon` (the rounding level of
    :math:`\mathbf{G}`'s eigenvalues) count as zero. If ``k`` exceeds the number
    ``r`` of the others (the numerical rank), the last ``k - r`` eigenvalues are 0 and
    their eigenvectors an orthonormal completion (from a fixed seed) of the first
    ``r``, i.e. they span part of the null space. The vectors are re-orthonormalized
    (QR, largest eigenvalue first, signs kept), which removes the loss of
    orthogonality of :math:`\mathbf{U}^\top\mathbf{w}_i` for small :math:`\lambda_i`.

    Args:
        gram: :math:`\mathbf{G}`, ``[n, n]``.
        transpose_product: ``W -> U^T W`` for ``W`` of shape ``[n, m]``.
        k: Number of eigenpairs, ``1 <= k <= P``.

    Returns:
        Eigenvalues ``[k]`` in descending order and orthonormal eigenvectors
        ``[P, k]``.
    """
    values, W = _top_eigh(gram, k)
    n = gram.shape[0]
    largest = float(values[0]) if n else 0.0
    tol = max(largest, 0.0) * n * torch.finfo(values.dtype).eps
    rank = int((values > tol).sum())
    m = min(k, rank)
    vectors = transpose_product(W[:, :m]) / values[:m].sqrt()
    eigenvalues = torch.cat([values[:m], values.new_zeros(k - m)])
    return eigenvalues, _orthonormal_completion(vectors, k)


def _top_eigh(gram: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenpairs of a symmetric matrix, in descending order.

    On the CPU with ``k < n``, LAPACK's ``syevr`` computes only those (SciPy's
    ``eigh`` with ``subset_by_index``: the same tridiagonal reduction, but no
    back-transformation of the other ``n - k`` vectors, about half the time);
    otherwise all eigenpairs with ``torch.linalg.eigh``.
    """
    n = gram.shape[0]
    if gram.device.type == "cpu" and 0 < k < n and gram.dtype in _LAPACK_DTYPES:
        values, W = scipy.linalg.eigh(
            gram.numpy(),
            subset_by_index=[n - k, n - 1],
            driver="evr",
            check_finite=False,
        )
        values, W = torch.from_numpy(values), torch.from_numpy(W)
    else:
        values, W = torch.linalg.eigh(gram)
        values, W = values[max(0, n - k) :], W[:, max(0, n - k) :]
    return values.flip(0), W.flip(1)


def _orthonormal_completion(V: Tensor, k: int) -> Tensor:
    """Orthonormalize the columns of ``V`` ``[P, m]`` in order, completed to ``k``."""
    dim, m = V.shape
    if m < k:
        generator = torch.Generator(device=V.device).manual_seed(_EIGH_SEED)
        fill = torch.randn(
            dim, k - m, generator=generator, dtype=V.dtype, device=V.device
        )
        V = torch.cat([V, fill], dim=1)
    Q, R = torch.linalg.qr(V)
    signs = torch.where(R.diagonal() < 0, -1.0, 1.0).to(V.dtype)
    return Q * signs


def factor_eigh(U: FactorRows, k: int) -> tuple[Tensor, Tensor]:
    r"""The ``k`` largest eigenpairs of :math:`\mathbf{U}^\top\mathbf{U}` for held rows.

    See :func:`gram_eigh`. Rows in Kronecker form give the Gram blocks and
    :math:`\mathbf{U}^\top\mathbf{W}` from the layers' inputs and output gradients;
    no row is formed.
    """
    return gram_eigh(U.gram(), U.transpose_product, k)
