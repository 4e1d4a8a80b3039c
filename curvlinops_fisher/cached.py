r"""A curvature matrix :math:`\mathbf{A} = \mathbf{U}^\top\mathbf{U}` with its factor held.

Products cost two matrix products, :math:`\mathbf{U}^\top(\mathbf{U}\mathbf{X})`,
and no pass over the data; the dense matrix, trace, diagonal and eigenpairs come
from the held rows through :class:`~curvlinops_fisher.rows.FactorRows`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlinops_fisher.accumulation import (
    DEFAULT_CHUNK_BYTES,
    DenseAccumulator,
    accumulation_dtype,
)
from curvlinops_fisher.distributed import (
    ProcessGroupLike,
    ProcessGroupMixin,
    resolve_process_group,
)
from curvlinops_fisher.eigensolvers import (
    DEFAULT_MAX_BYTES,
    EighMethod,
    check_distributed_eigh,
    check_eigh_args,
    eigsh_top,
    factor_eigh,
    prefer_gram,
)
from curvlinops_fisher.kronecker import KroneckerFactor
from curvlinops_fisher.linop import PyTorchLinearOperator, _flat_to_list, _list_to_flat
from curvlinops_fisher.rows import ExplicitRows, FactorRows


class CachedCurvatureLinearOperator(ProcessGroupMixin, PyTorchLinearOperator):
    r"""A curvature matrix :math:`\mathbf{A} = \mathbf{U}^\top\mathbf{U}` with ``U`` held.

    Created by ``cached()`` of the curvature operators. A product costs two matrix
    products, :math:`\mathbf{U}^\top(\mathbf{U}\mathbf{X})` (:math:`O(nPK)`), and no
    pass over the data; :meth:`to_dense`, :meth:`trace`, :meth:`diagonal` and
    :meth:`eigh` use the held factor with the same functions as the streaming
    operator. The factor is held either explicitly (``[n, P]``) or, for models whose
    parameters all belong to linear layers, in Kronecker form
    (:class:`~curvlinops_fisher.kronecker.KroneckerFactor`: the layers' inputs and
    output gradients, ``sum(in + out)`` numbers per row instead of ``P``), whose
    products are matrix products with the layers' ``[N, in]`` inputs.

    With a process group, ``U`` holds this rank's rows :math:`\mathbf{U}_r` and the
    matrix is :math:`\sum_r \mathbf{U}_r^\top\mathbf{U}_r`: products, :meth:`to_dense`,
    :meth:`trace` and :meth:`diagonal` sum the ranks' parts (one ``all_reduce``) and
    are collective calls; :meth:`eigh` uses ``eigsh``.

    Args:
        U: The factor: a tensor ``[n, P]``, or a ``KroneckerFactor``.
        shapes: The parameter shapes (the operator's list structure).
        process_group: A ``torch.distributed`` process group (or ``"default"``)
            over whose ranks the rows of ``U`` are split; ``None``: one process.
    """

    SELF_ADJOINT: bool = True

    def __init__(
        self,
        U: Tensor | KroneckerFactor,
        shapes: list[tuple[int, ...]],
        *,
        process_group: ProcessGroupLike = None,
    ):
        """Store the factor (see the class docstring)."""
        super().__init__(shapes, shapes)
        self._process_group = resolve_process_group(process_group)
        if isinstance(U, KroneckerFactor):
            if U.layout.dim != self.shape[1]:
                raise ValueError(
                    f"The Kronecker factor has P = {U.layout.dim} columns; the shapes "
                    f"give P = {self.shape[1]}."
                )
        elif U.ndim != 2 or U.shape[1] != self.shape[1]:
            raise ValueError(
                f"U must have shape [n, P] with P = {self.shape[1]}; got "
                f"{tuple(U.shape)}."
            )
        self._U = U
        self._rows: FactorRows = (
            U if isinstance(U, KroneckerFactor) else ExplicitRows(U)
        )

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the factor."""
        return self._U.dtype

    @property
    def device(self) -> torch.device:
        """Device of the factor."""
        return self._U.device

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply onto a matrix in tensor list format with a trailing column axis."""
        X = _list_to_flat(M, self._in_shape_flat)
        rows = self._rows
        (AX,) = self._sum_over_ranks(
            lambda: [rows.transpose_product(rows.product(X))], [X.shape]
        )
        return _flat_to_list(AX, self._out_shape)

    def factor(self) -> Tensor:
        r"""The factor :math:`\mathbf{U}` ``[n, P]`` (this rank's rows).

        The held tensor itself (not a copy), or, for a factor held in Kronecker
        form, its rows formed explicitly.
        """
        return self._rows.rows()

    def _accumulator(self, *shape: int) -> Tensor:
        """Zeros in :func:`~curvlinops_fisher.accumulation.accumulation_dtype`."""
        dtype = accumulation_dtype(self.dtype, self.device)
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def to_dense(self) -> Tensor:
        r"""The matrix :math:`\mathbf{U}^\top\mathbf{U}`, ``[P, P]``."""
        dim = self.shape[1]

        def local() -> Tensor:
            zeros = torch.zeros(dim, dim, dtype=self.dtype, device=self.device)
            dense = DenseAccumulator(zeros)
            self._rows.add_to_dense(dense, DEFAULT_CHUNK_BYTES)
            return dense.symmetric()

        return self._summed(local, dim, dim)

    def trace(self) -> Tensor:
        r"""The exact trace :math:`\|\mathbf{U}\|_F^2` (a scalar tensor)."""
        return self._summed(
            lambda: self._rows.add_squared_norm(self._accumulator()).to(self.dtype)
        )

    def diagonal(self) -> Tensor:
        """The exact diagonal (squared column norms of ``U``), ``[P]``."""
        dim = self.shape[1]
        return self._summed(
            lambda: self._rows.add_column_squares(self._accumulator(dim)).to(
                self.dtype
            ),
            dim,
        )

    def eigh(
        self,
        k: int,
        *,
        method: EighMethod = "auto",
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` largest eigenpairs; see ``eigh`` of the curvature operators.

        Args:
            k: Number of eigenpairs, ``1 <= k <= P`` (``k < P`` for ``eigsh``).
            method: ``'auto'``, ``'gram'`` or ``'eigsh'`` (products with the held
                factor).
            max_bytes: Largest Gram matrix ``'auto'`` forms (default 256 MiB).

        Returns:
            Eigenvalues ``[k]`` in descending order and orthonormal eigenvectors
            ``[P, k]``.
        """
        dim = self.shape[1]
        check_eigh_args(k, dim, method)
        check_distributed_eigh(self, method)
        if method == "gram" or (
            self._process_group is None
            and method == "auto"
            and prefer_gram(self._rows.num_rows, dim, self.dtype.itemsize, max_bytes)
        ):
            return factor_eigh(self._rows, k)
        return eigsh_top(self, k)
