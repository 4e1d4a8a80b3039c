r"""The exact structure methods of a curvature operator, from passes over its data.

Nothing is kept between calls: each method makes its own passes, in which every
batch is linearized (one forward pass) and yields its factor rows
:math:`\mathbf{U}_b` (:mod:`curvlinops_fisher.rows`) in Kronecker form where the
parameters are linear layers, else explicitly in chunks. From them, exactly: the
dense matrix :math:`\sum_b \mathbf{U}_b^\top\mathbf{U}_b`, the trace
:math:`\|\mathbf{U}\|_F^2`, the diagonal, the top eigenpairs and :math:`\mathbf{U}`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import cached_property

import numpy
import torch
from torch import Tensor
from torch.nn import Module
from torch.utils.flop_counter import FlopCounterMode

from curvlinops_fisher import eigensolvers
from curvlinops_fisher.accumulation import (
    DEFAULT_CHUNK_BYTES,
    DenseAccumulator,
    accumulation_dtype,
    add_transpose_product,
)
from curvlinops_fisher.cached import CachedCurvatureLinearOperator
from curvlinops_fisher.core import ModuleFunction
from curvlinops_fisher.data import (
    Batch,
    BatchSizeFn,
    ModelInput,
    default_batch_size_fn,
    iterate_batches,
)
from curvlinops_fisher.distributed import ProcessGroup, ProcessGroupMixin
from curvlinops_fisher.eigensolvers import (
    DEFAULT_MAX_BYTES,
    EighMethod,
    check_distributed_eigh,
    check_eigh_args,
)
from curvlinops_fisher.errors import FactorMemoryError, naming_batch
from curvlinops_fisher.factors import OutputFactorKind
from curvlinops_fisher.kronecker import (
    KroneckerFactor,
    KroneckerRows,
    LinearLayout,
    kronecker_rows,
    linear_layout,
)
from curvlinops_fisher.linop import PyTorchLinearOperator
from curvlinops_fisher.losses import FisherLoss
from curvlinops_fisher.risk_scale import RiskScale
from curvlinops_fisher.rows import (
    BatchRows,
    ExplicitRows,
    FactorRows,
    LinearizedBatch,
    linearize_batch,
)


class ExactStructure(ProcessGroupMixin):
    r"""The data passes of a curvature operator and the structure methods built on them.

    Every pass starts from a freshly built output-space factor kind (the MC Fisher's
    freshly seeded generator), so all methods see the sample that products use. With
    a process group, :math:`\mathbf{U}` is split by rows over the ranks and the
    sums (dense matrix, trace, diagonal) are summed over them (one ``all_reduce``).

    Args:
        model: The model (whose ``nn.Linear`` layers may give rows in Kronecker form).
        model_function: ``f(param_values, X)`` of the model.
        params: The differentiated parameters.
        data: The re-iterable batches of this rank.
        loss: The loss wrapper.
        risk_scale: The reduction scale :math:`c_b` of every batch.
        factor_kind: Builds the output-space factor kind for one pass.
        num_data: ``N``, the data points of the whole data set.
        batch_size_fn: Number of data points of a batch input (``None``: default).
        progressbar: Show a progress bar over the batches of each pass.
        process_group: The process group over whose ranks the data is split.
        targets_checked: Whether the targets were validated already.
    """

    def __init__(
        self,
        *,
        model: Module,
        model_function: ModuleFunction,
        params: list[Tensor],
        data: Iterable[Batch],
        loss: FisherLoss,
        risk_scale: RiskScale,
        factor_kind: Callable[[], OutputFactorKind],
        num_data: int,
        batch_size_fn: BatchSizeFn | None,
        progressbar: bool,
        process_group: ProcessGroup | None,
        targets_checked: bool,
    ):
        """Store the dependencies (see the class docstring)."""
        self.model = model
        self.model_function = model_function
        self.params = params
        self.data = data
        self.loss = loss
        self.risk_scale = risk_scale
        self.factor_kind = factor_kind
        self.num_data = num_data
        self.batch_size_fn = batch_size_fn
        self.progressbar = progressbar
        self._process_group = process_group
        self.targets_checked = targets_checked

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the parameters."""
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.params[0].device

    @property
    def dim(self) -> int:
        """Number ``P`` of parameters."""
        return sum(p.numel() for p in self.params)

    # -------------------------------------------------------------- passes
    def param_values(self) -> tuple[Tensor, ...]:
        """Current parameter values, detached (the model function follows them)."""
        self.model_function.follow(self.params)
        return tuple(p.detach() for p in self.params)

    def batch_size(self, X: ModelInput) -> int:
        """Number of data points of a batch input."""
        return default_batch_size_fn(self.batch_size_fn, X)

    def batches(self, desc: str) -> Iterator[Batch]:
        """One pass over this rank's batches, on the parameters' device."""
        return iterate_batches(self.data, self.device, self.progressbar, desc)

    def linearized_batches(self) -> Iterator[LinearizedBatch]:
        """One pass over the data: every batch linearized, with its factor, in order."""
        factor_kind = self.factor_kind()  # freshly seeded: once per pass
        params = self.param_values()
        for index, (X, y) in enumerate(self.batches("factor")):
            with naming_batch(index):
                batch = linearize_batch(
                    self.model_function,
                    params,
                    X,
                    y,
                    self.loss,
                    factor_kind,
                    scale=self.risk_scale.batch_scale(y, self.batch_size(X)),
                    check_targets=not self.targets_checked,
                )
            yield batch
        self.targets_checked = True

    @cached_property
    def linear_layout(self) -> LinearLayout | None:
        """The parameters' linear layers, if all are (for rows in Kronecker form)."""
        return linear_layout(self.model, self.params)

    def row_blocks(
        self, chunk_bytes: int, max_columns: int | None = None
    ) -> Iterator[FactorRows]:
        """One pass: each batch's rows, in Kronecker form where they have it.

        Args:
            chunk_bytes: Memory budget of one chunk of explicit rows.
            max_columns: Most columns per forward pass of explicit rows' products.

        Yields:
            :class:`~curvlinops_fisher.kronecker.KroneckerRows` or
            :class:`~curvlinops_fisher.rows.BatchRows`, in data order.
        """
        layout = self.linear_layout
        for batch in self.linearized_batches():
            rows = None if layout is None else kronecker_rows(batch, layout)
            yield BatchRows(batch, chunk_bytes, max_columns) if rows is None else rows

    def kronecker_factor(self, max_bytes: int | None = None) -> KroneckerFactor | None:
        """All batches' rows in Kronecker form (one pass).

        ``None`` if a batch lacks the form, there is no batch, or the factor would
        take more than ``max_bytes`` (the pass stops there).
        """
        layout = self.linear_layout
        if layout is None:
            return None
        batches, held = [], 0
        for rows in self.row_blocks(DEFAULT_CHUNK_BYTES):
            if not isinstance(rows, KroneckerRows):
                return None
            held += rows.num_rows * layout.row_length * self.dtype.itemsize
            if max_bytes is not None and held > max_bytes:
                return None
            batches.append(rows)
        return KroneckerFactor.joined(batches) if batches else None

    def factor_chunks(self, chunk_bytes: int) -> Iterator[Tensor]:
        """All explicit factor rows in order, in chunks (one pass)."""
        for batch in self.linearized_batches():
            yield from batch.chunks(chunk_bytes)

    def row_counts(self) -> list[int]:
        """Number of factor rows of each batch (one pass of forwards, no VJPs)."""
        return [batch.num_rows for batch in self.linearized_batches()]

    def forward_flops_per_point(self) -> float:
        """Floating-point operations of the forward pass per data point (first batch).

        Counted with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products,
        convolutions, attention); ``0.0`` if nothing was counted.
        """
        X, _ = next(iter(self.batches("flops")))
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            self.model_function(self.param_values(), X)
        return counter.get_total_flops() / max(1, self.batch_size(X))

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _accumulator(self, *shape: int) -> Tensor:
        """Zeros in :func:`~curvlinops_fisher.accumulation.accumulation_dtype`."""
        dtype = accumulation_dtype(self.dtype, self.device)
        return torch.zeros(shape, dtype=dtype, device=self.device)

    # ------------------------------------------------------ structure methods
    def factor_batches(self, chunk_bytes: int) -> Iterator[Tensor]:
        r"""Yield the explicit rows :math:`\mathbf{U}_b` batch by batch."""
        for batch in self.linearized_batches():
            yield batch.rows(chunk_bytes)

    def factor(self, chunk_bytes: int) -> Tensor:
        r"""The explicit factor :math:`\mathbf{U}` (this rank's rows), ``[n, P]``."""
        blocks = list(self.factor_batches(chunk_bytes))
        return torch.cat(blocks) if blocks else self._zeros(0, self.dim)

    def cached(
        self, max_bytes: int | None, chunk_bytes: int
    ) -> CachedCurvatureLinearOperator:
        r"""The operator that holds :math:`\mathbf{U}` (Kronecker form if it has it)."""
        dim, itemsize = self.dim, self.dtype.itemsize
        layout = self.linear_layout
        num_rows = None if max_bytes is None else sum(self.row_counts())
        U: Tensor | KroneckerFactor | None = None
        if layout is not None and (
            num_rows is None or num_rows * layout.row_length * itemsize <= max_bytes
        ):
            U = self.kronecker_factor()
        if U is None:
            if num_rows is not None and num_rows * dim * itemsize > max_bytes:
                raise FactorMemoryError(num_rows, dim, itemsize, max_bytes)
            U = self.factor(chunk_bytes)
        shapes = [tuple(p.shape) for p in self.params]
        return CachedCurvatureLinearOperator(
            U, shapes, process_group=self._process_group
        )

    def to_dense(self, chunk_bytes: int, max_columns: int | None) -> Tensor:
        r""":math:`\sum_b \mathbf{U}_b^\top\mathbf{U}_b`, ``[P, P]``, summed over ranks."""
        dim = self.dim

        def local() -> Tensor:
            dense = DenseAccumulator(self._zeros(dim, dim))
            for rows in self.row_blocks(chunk_bytes, max_columns):
                rows.add_to_dense(dense, chunk_bytes)
            return dense.symmetric()

        return self._summed(local, dim, dim)

    def trace(self, chunk_bytes: int) -> Tensor:
        r""":math:`\|\mathbf{U}\|_F^2`, summed over ranks (a scalar)."""
        return self._reduced(lambda rows, out: rows.add_squared_norm(out), chunk_bytes)

    def diagonal(self, chunk_bytes: int) -> Tensor:
        r"""The squared column norms of :math:`\mathbf{U}`, summed over ranks, ``[P]``."""
        return self._reduced(
            lambda rows, out: rows.add_column_squares(out), chunk_bytes, self.dim
        )

    def _reduced(
        self,
        add: Callable[[FactorRows, Tensor], object],
        chunk_bytes: int,
        *shape: int,
    ) -> Tensor:
        """One pass of ``add(rows, out)`` over the batches' rows, summed over ranks.

        ``out`` accumulates in :func:`~curvlinops_fisher.accumulation.accumulation_dtype`
        (one rounding at the end); the result is cast to the parameters' type.
        """

        def local() -> Tensor:
            out = self._accumulator(*shape)
            for rows in self.row_blocks(chunk_bytes):
                add(rows, out)
            return out.to(self.dtype)

        return self._summed(local, *shape)

    def eigh(
        self,
        operator: PyTorchLinearOperator,
        k: int,
        method: EighMethod,
        chunk_bytes: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` largest eigenpairs (Gram path or Lanczos on ``operator``).

        Rows in Kronecker form that fit ``max_bytes`` are held and their Gram path
        is weighed with their row length; otherwise the rows are counted and, on
        the Gram path, held if they fit ``max_bytes`` or else recomputed per block
        of the Gram matrix (:meth:`_streamed_gram`).
        """
        dim = self.dim
        check_eigh_args(k, dim, method)
        check_distributed_eigh(self, method)
        if method != "eigsh" and self._process_group is None:
            held = self.kronecker_factor(max_bytes)
            if held is not None:
                if self._takes_gram(
                    method, held.num_rows, k, max_bytes, held.row_length
                ):
                    return eigensolvers.factor_eigh(held, k)
                return eigensolvers.eigsh_top(operator, k)
            counts = self.row_counts()
            num_rows = sum(counts)
            if self._takes_gram(method, num_rows, k, max_bytes):
                if num_rows * dim * self.dtype.itemsize <= max_bytes:
                    U = ExplicitRows(self.factor(chunk_bytes))
                    return eigensolvers.factor_eigh(U, k)
                return eigensolvers.gram_eigh(
                    self._streamed_gram(counts, chunk_bytes),
                    lambda W: add_transpose_product(
                        self.factor_chunks(chunk_bytes),
                        W,
                        out=self._zeros(dim, W.shape[1]),
                    ),
                    k,
                )
        return eigensolvers.eigsh_top(operator, k)

    def _takes_gram(
        self,
        method: str,
        num_rows: int,
        k: int,
        max_bytes: int,
        row_length: int | None = None,
    ) -> bool:
        """Whether :meth:`eigh` takes the Gram path: forced, or ``prefer_gram``."""
        return method == "gram" or eigensolvers.prefer_gram(
            num_rows,
            self.dim,
            self.dtype.itemsize,
            max_bytes,
            k=k,
            num_data=self.num_data,
            flops_per_point=self.forward_flops_per_point(),
            row_length=row_length,
        )

    def _streamed_gram(self, counts: list[int], chunk_bytes: int) -> Tensor:
        r"""The Gram matrix :math:`\mathbf{U}\mathbf{U}^\top` without holding :math:`\mathbf{U}`.

        For each batch ``a`` one pass: hold :math:`\mathbf{U}_a` and form the blocks
        :math:`\mathbf{U}_a\mathbf{U}_b^\top` for ``b >= a`` from chunks of
        :math:`\mathbf{U}_b` (batches before ``a`` only draw their MC sample).

        Args:
            counts: Number of rows of each batch.
            chunk_bytes: Memory budget of one chunk of rows.

        Returns:
            The ``[n, n]`` Gram matrix.
        """
        offsets = numpy.concatenate([[0], numpy.cumsum(counts)]).tolist()
        gram = self._zeros(offsets[-1], offsets[-1])
        for a in range(len(counts)):
            rows_a = slice(offsets[a], offsets[a + 1])
            held: Tensor | None = None
            for b, batch in enumerate(self.linearized_batches()):
                if b < a:
                    continue
                if b == a:
                    held = batch.rows(chunk_bytes)
                start = offsets[b]
                for chunk in [held] if b == a else batch.chunks(chunk_bytes):
                    block = held @ chunk.mT
                    stop = start + chunk.shape[0]
                    gram[rows_a, start:stop] = block
                    gram[start:stop, rows_a] = block.mT
                    start = stop
        return gram


class ExactStructureMethods:
    r"""The structure methods of a curvature operator: calls on its :class:`ExactStructure`.

    Nothing is kept between calls: every method makes its own passes over the data
    and computes the factor rows :math:`\mathbf{U}_b` batch by batch, in chunks of at
    most ``chunk_bytes``. Each pass starts from the MC Fisher's freshly seeded
    generator, hence all methods see the sample products use. :meth:`cached` returns
    an operator that keeps :math:`\mathbf{U}`.

    With a process group (data-parallel operators), :math:`\mathbf{U}` is split by
    rows over the ranks, :math:`\mathbf{A} = \sum_r \mathbf{U}_r^\top\mathbf{U}_r`:
    :meth:`to_dense`, :meth:`trace` and :meth:`diagonal` sum the ranks' parts with one
    ``all_reduce`` and return the global result on every rank; :meth:`factor` and
    :meth:`factor_batches` return this rank's rows :math:`\mathbf{U}_r` only;
    :meth:`cached` keeps each rank's rows on that rank; :meth:`eigh` uses ``eigsh``.
    All of these are collective calls.

    Attributes:
        _structure: The data passes and structure methods (built by the host).
        max_columns_per_pass: Most matrix columns that share one forward pass.
    """

    _structure: ExactStructure
    max_columns_per_pass: int

    def factor_batches(
        self, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[Tensor]:
        r"""Yield the factor rows :math:`\mathbf{U}_b` batch by batch.

        :math:`\mathbf{U}_b = [\sqrt{c_b}\,\mathbf{B}_t^\top\mathbf{J}_t]_{t \in b}`,
        rows ordered by term, then column of :math:`\mathbf{B}_t`, so that
        :math:`\mathbf{A} = \sum_b \mathbf{U}_b^\top \mathbf{U}_b`. Cost per batch:
        one forward pass and ``T_b R`` VJPs (batched with ``vmap``, ``chunk_bytes``
        at a time).

        Args:
            chunk_bytes: Memory budget of one chunk of rows (default 256 MiB).

        Yields:
            :math:`\mathbf{U}_b` of shape ``[T_b * R, P]``, in data order. With a
            process group: the batches of this rank's shard only (no communication).
        """
        return self._structure.factor_batches(chunk_bytes)

    def factor(self, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        r"""The factor :math:`\mathbf{U}` with :math:`\mathbf{A} = \mathbf{U}^\top\mathbf{U}`.

        Args:
            chunk_bytes: Memory budget of one chunk of rows (default 256 MiB).

        Returns:
            :math:`\mathbf{U}`, shape ``[n, P]``: the blocks of
            :meth:`factor_batches`, stacked. With a process group: this rank's rows
            :math:`\mathbf{U}_r` only (``[0, P]`` for an empty shard), with
            :math:`\mathbf{A} = \sum_r \mathbf{U}_r^\top\mathbf{U}_r`.
        """
        return self._structure.factor(chunk_bytes)

    def cached(
        self, max_bytes: int | None = None, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> CachedCurvatureLinearOperator:
        r"""An operator of the same matrix that keeps :math:`\mathbf{U}` in memory.

        Its products cost two matrix products (:math:`\mathbf{U}^\top(\mathbf{U}
        \mathbf{X})`) instead of passes over the data. If every batch's rows have the
        Kronecker form of linear layers (see :mod:`curvlinops_fisher.kronecker`), it
        keeps that form (``sum(in + out)`` numbers per row instead of ``P``) and
        multiplies with the layers' inputs; ``max_bytes`` then bounds that form. It is a snapshot: later
        changes of the parameters, data or the MC Fisher's seed do not reach it.

        Args:
            max_bytes: Most bytes :math:`\mathbf{U}` may take (``None``: no limit).
                With a limit, one pass of forward passes counts the rows first.
            chunk_bytes: Memory budget of one chunk of rows (default 256 MiB).

        Returns:
            The cached operator.

        With a process group, each rank keeps its own rows and ``max_bytes`` bounds
        each rank's rows; the cached operator's products, dense matrix, trace and
        diagonal are collective (one ``all_reduce`` each), like this operator's.

        Raises:
            FactorMemoryError: If :math:`\mathbf{U}` needs more than ``max_bytes``
                (a ``MemoryError`` and ``ValueError``; the message gives the bytes).
        """
        return self._structure.cached(max_bytes, chunk_bytes)

    def to_dense(self, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        r"""The matrix :math:`\mathbf{A}` as a dense ``[P, P]`` tensor.

        Accumulated batch by batch. Batches whose rows have the Kronecker form of
        linear layers (:mod:`curvlinops_fisher.kronecker`) are joined and add
        :math:`\sum_n \mathbf{M}_n \otimes \mathbf{a}_n\mathbf{a}_n^\top` to the
        upper triangle, block by block
        (:meth:`~curvlinops_fisher.kronecker.KroneckerRows.add_upper_dense`:
        :math:`N P^2 / 2` multiply-adds, ``D R`` times fewer than the rows' Gram
        product). Otherwise a batch with ``T_b R <= P`` rows adds
        :math:`\mathbf{U}_b^\top\mathbf{U}_b` (``T_b R`` VJPs), a batch with more rows
        adds its curvature times the identity (``P`` columns of products, same output
        factor and MC sample), whichever needs fewer passes. Peak memory: the result
        plus one chunk of ``chunk_bytes`` (for rows in Kronecker form: the joined
        factors, one Khatri-Rao product of two layers' inputs and one chunk of a
        block's products, each at most ``chunk_bytes``).

        Args:
            chunk_bytes: Memory budget of one chunk of rows or identity columns
                (default 256 MiB).

        Returns:
            :math:`\mathbf{A}`, equal to ``self @ torch.eye(P)`` up to rounding.
        """
        return self._structure.to_dense(chunk_bytes, self.max_columns_per_pass)

    def trace(self, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        r"""The exact trace :math:`\operatorname{tr}\mathbf{A} = \|\mathbf{U}\|_F^2`.

        Rows in Kronecker form (linear layers) contribute
        :math:`\sum_i \|\mathbf{g}_i\|^2 (\|\mathbf{a}_{n(i)}\|^2 + 1)` without
        being formed.

        Args:
            chunk_bytes: Memory budget of one chunk of rows (default 256 MiB).

        Returns:
            A scalar tensor.
        """
        return self._structure.trace(chunk_bytes)

    def diagonal(self, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        r"""The exact diagonal :math:`A_{ii} = \sum_j U_{ji}^2`.

        Args:
            chunk_bytes: Memory budget of one chunk of rows (default 256 MiB).

        Returns:
            A tensor ``[P]`` (flat parameter order).
        """
        return self._structure.diagonal(chunk_bytes)

    def eigh(
        self,
        k: int,
        *,
        method: EighMethod = "auto",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> tuple[Tensor, Tensor]:
        r"""The ``k`` largest eigenvalues and their eigenvectors.

        Two paths:

        - ``'gram'``: the ``n x n`` Gram matrix :math:`\mathbf{U}\mathbf{U}^\top`,
          its eigendecomposition, and :math:`\mathbf{v} = \mathbf{U}^\top
          \mathbf{w}/\sqrt\lambda` (see
          :func:`~curvlinops_fisher.eigensolvers.gram_eigh` for zero eigenvalues:
          if ``k`` exceeds the numerical rank, the rest are zeros with an
          orthonormal completion). :math:`\mathbf{U}` is held if it fits ``max_bytes``;
          otherwise the Gram blocks :math:`\mathbf{U}_a\mathbf{U}_b^\top` are
          formed by recomputing the batches' rows (one pass per batch ``a``), and
          :math:`\mathbf{U}^\top\mathbf{W}` by one more pass.
        - ``'eigsh'``: SciPy's Lanczos ``eigsh(self.to_scipy(), k, which='LA')``,
          which needs ``k < P``.

        If every batch's rows have the Kronecker form of linear layers and fit
        ``max_bytes`` in that form, the Gram path works on that form
        (:func:`~curvlinops_fisher.eigensolvers.factor_eigh`); otherwise ``'auto'``
        counts the rows ``n`` (one pass of forward passes). ``'auto'`` takes the Gram path if ``n <= P / 2``,
        the Gram matrix fits ``max_bytes`` and it needs fewer floating-point
        operations than Lanczos (:func:`~curvlinops_fisher.eigensolvers.prefer_gram`),
        else ``eigsh``. With a process group, ``'auto'`` takes ``eigsh`` (rank 0 drives
        Lanczos, every rank returns the result) and ``'gram'`` is an error.

        Args:
            k: Number of eigenpairs, ``1 <= k <= P`` (``k < P`` for ``eigsh``).
            method: ``'auto'``, ``'gram'`` or ``'eigsh'``.
            chunk_bytes: Memory budget of one chunk of rows (default 256 MiB).
            max_bytes: Memory budget of what the Gram path holds (default 256 MiB).

        Returns:
            Eigenvalues ``[k]`` in descending order and orthonormal eigenvectors
            ``[P, k]`` (columns, flat parameter order).

        Raises:
            ValueError: For an invalid ``k`` or ``method``.
        """
        return self._structure.eigh(self, k, method, chunk_bytes, max_bytes)
