r"""Exact structure of the Fisher-family operators from their factor.

Every curvature operator of this package is a Gram matrix

.. math::
    \mathbf{A} = \sum_b c_b \sum_{t \in b}
        \mathbf{J}_t^\top \mathbf{B}_t \mathbf{B}_t^\top \mathbf{J}_t
    = \mathbf{U}^\top \mathbf{U},
    \qquad
    \mathbf{U} = \big[\sqrt{c_b}\, \mathbf{B}_t^\top \mathbf{J}_t\big]_{b, t}
    \in \mathbb{R}^{n \times P},

with :math:`n = \sum_b T_b R` rows, ordered by batch, then loss term ``t``, then
column ``r`` of :math:`\mathbf{B}_t` (``R = C`` for the GGN, ``1`` for the empirical
Fisher, ``M`` for the MC Fisher). The rows of one batch are VJPs of the model: one
forward pass per batch, then ``vmap`` of its VJP over the cotangents
:math:`\sqrt{c_b}\,\mathbf{B}_t \mathbf{e}_r` placed at term ``t``, in chunks of rows
that fit a memory budget. From :math:`\mathbf{U}` follow, exactly:

- the dense matrix :math:`\sum_b \mathbf{U}_b^\top \mathbf{U}_b`,
- the trace :math:`\|\mathbf{U}\|_F^2` and the diagonal
  :math:`\operatorname{diag}(\mathbf{A})_i = \sum_j U_{ji}^2`,
- the top eigenpairs through the small Gram matrix
  :math:`\mathbf{G} = \mathbf{U}\mathbf{U}^\top` (:math:`n \times n`): if
  :math:`\mathbf{G}\mathbf{w} = \lambda \mathbf{w}` then
  :math:`\mathbf{A}\,\mathbf{U}^\top\mathbf{w} = \lambda\,\mathbf{U}^\top\mathbf{w}`
  and :math:`\|\mathbf{U}^\top\mathbf{w}\|^2 = \lambda`,
- a cached operator that keeps :math:`\mathbf{U}` and multiplies with two GEMMs.

The reductions below work on any iterable of row chunks, so the streaming operator
(:class:`ExactStructureMixin`, rows recomputed on every call) and the cached one
(:class:`CachedCurvatureLinearOperator`, rows stored) share them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from math import prod, sqrt
from typing import Literal

import numpy
import scipy.linalg
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Size, Tensor
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from curvlinops_fisher.core import ModelFunction, batch_curvature_matmat
from curvlinops_fisher.data import ModelInput
from curvlinops_fisher.distributed import (
    ProcessGroupLike,
    ProcessGroupMixin,
    resolve_process_group,
    solve_on_root,
)
from curvlinops_fisher.errors import FactorMemoryError, naming_batch
from curvlinops_fisher.factors import (
    BatchOutputFactor,
    OutputFactorKind,
)
from curvlinops_fisher.fast_path_checks import warn_once
from curvlinops_fisher.kronecker import (
    _CHECK_RTOL,
    _CHECK_SEED,
    KroneckerFactor,
    KroneckerRows,
    LinearLayout,
    accumulation_dtype,
    kronecker_rows,
    linear_layout,
)
from curvlinops_fisher.linop import PyTorchLinearOperator, _flat_to_list, _list_to_flat
from curvlinops_fisher.losses import FisherLoss

#: Default memory budget (bytes) of one chunk of factor rows: 256 MiB. A chunk of
#: ``k`` rows holds ``k`` cotangents (model-output sized) and ``k`` parameter-sized
#: rows; the activations of the ``k``-fold batched backward pass are not counted.
DEFAULT_CHUNK_BYTES = 256 * 2**20
#: Default memory budget (bytes) of what :meth:`ExactStructureMixin.eigh` holds on
#: its Gram path (the ``n x n`` Gram matrix; the ``n x P`` factor if it also fits):
#: 256 MiB.
DEFAULT_MAX_BYTES = 256 * 2**20
#: Fewest data points (of the batches that :class:`DenseAccumulator` joins) from
#: which rows in Kronecker form with one row per data point (EF, one-sample MC
#: Fisher) add their dense blocks in Kronecker form; with fewer, their explicit rows
#: are formed and their Gram product added. With one row per data point both take
#: :math:`N P^2 / 2` multiply-adds; the Gram product accumulates inside the matrix
#: product, the Kronecker blocks need one more pass over the result, which pays
#: only over enough data points (measured on a 6,000-parameter MLP: 512 points
#: faster, 128 slower).
KRONECKER_DENSE_MIN_POINTS_ONE_ROW = 256
#: Seed of the generator that draws the orthonormal completion of
#: :meth:`ExactStructureMixin.eigh` and the start vector of ``eigsh``.
_EIGH_SEED = 0

EighMethod = Literal["auto", "gram", "eigsh"]
_EIGH_METHODS = ("auto", "gram", "eigsh")
#: Data types of the Gram matrices that :func:`_top_eigh` hands to SciPy.
_LAPACK_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------- one batch


class _FixedFactorKind(OutputFactorKind):
    """Hands out one factor that is already built (so an MC product sees its sample)."""

    def __init__(self, factor: BatchOutputFactor):
        self.factor = factor

    def _build(  # noqa: D102
        self, loss: FisherLoss, output: Tensor, y: Tensor
    ) -> BatchOutputFactor:
        return self.factor


@dataclass
class LinearizedBatch:
    r"""One batch after its forward pass: its factor rows, computed on demand.

    The rows are :math:`\sqrt{c}\,\mathbf{B}_t^\top \mathbf{J}_t` for the batch's
    ``T`` loss terms, i.e. ``T * R`` rows of length ``P``, term-major.

    Attributes:
        model_function: ``f(param_values, X)``.
        params: The parameter values (linearization point).
        X: The batch input.
        y: The batch targets.
        loss: The loss wrapper.
        output_factor: The batch's output-space factor (holds the MC sample).
        scale: The batch's reduction scale :math:`c`.
        output: The batch's model output (detached).
        vjp_fn: VJP of the batch's forward pass w.r.t. ``params``.
    """

    model_function: ModelFunction
    params: tuple[Tensor, ...]
    X: ModelInput
    y: Tensor
    loss: FisherLoss
    output_factor: BatchOutputFactor
    scale: float
    output: Tensor
    vjp_fn: Callable[[Tensor], tuple[tuple[Tensor, ...]]]

    @property
    def output_shape(self) -> Size:
        """Shape of the batch's model output."""
        return self.output.shape

    @cached_property
    def scaled_factor(self) -> Tensor:
        r""":math:`\sqrt{c}\,\mathbf{B}_t` for every term, shape ``(T, C, R)``."""
        return self.output_factor.matrix() * sqrt(self.scale)

    @property
    def num_rows(self) -> int:
        """Number ``T * R`` of factor rows of the batch."""
        T, _, R = self.scaled_factor.shape
        return T * R

    @property
    def dim(self) -> int:
        """Number ``P`` of parameters (the length of a row)."""
        return sum(p.numel() for p in self.params)

    def chunks(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Tensor]:
        """Yield the rows in chunks of at most ``chunk_bytes`` (at least one row each).

        Args:
            chunk_bytes: Memory budget of one chunk: its rows and their cotangents.

        Yields:
            Consecutive blocks of rows, each of shape ``[k, P]``.
        """
        done = 0  # rows yielded so far (per data point, where that path applies)
        layout = self._per_sample_layout()
        if layout is not None and not getattr(
            self.model_function, _PER_SAMPLE_FAILED, False
        ):
            per_sample = self._verified_per_sample_chunks(chunk_bytes, *layout)
            for rows in per_sample:
                done += rows.shape[0]
                yield rows
        itemsize = self.scaled_factor.dtype.itemsize
        row_bytes = (self.dim + prod(self.output_shape)) * itemsize
        step = max(1, chunk_bytes // row_bytes)
        for start in range(done, self.num_rows, step):
            yield self._rows_between(start, min(start + step, self.num_rows))

    def _verified_per_sample_chunks(
        self, chunk_bytes: int, num_samples: int, rows_per_sample: int
    ) -> Iterator[Tensor]:
        """Chunks of rows per data point (:meth:`_per_sample_rows`), each verified.

        Stops early (the caller computes the remaining rows with whole-batch
        cotangents) if the per-data-point outputs differ from the batch output (the
        data points interact, e.g. batch norm in train mode: silently, the path does
        not apply) or if a chunk's rows fail :meth:`_rows_agree` (a wrong batching
        rule: warns once per model function and disables the path for its later
        batches).

        Args:
            chunk_bytes: Memory budget of one chunk.
            num_samples: ``N``, the data points of the batch.
            rows_per_sample: ``D R``, the rows of each data point.

        Yields:
            Consecutive verified chunks, from row 0 on.
        """
        itemsize = self.scaled_factor.dtype.itemsize
        row_bytes = (self.dim + prod(self.output_shape) // num_samples) * itemsize
        step = max(1, chunk_bytes // (row_bytes * rows_per_sample))
        for start in range(0, num_samples, step):
            stop = min(start + step, num_samples)
            rows = self._per_sample_rows(start, stop, check=start == 0)
            if rows is None:
                return
            # One batched VJP per chunk: a data point's share of one backward pass
            # per row of the chunk, negligible against the chunk's own VJPs.
            if not self._rows_agree(rows, start, stop):
                _disable_per_sample_rows(self.model_function)
                return
            yield rows

    def _per_sample_layout(self) -> tuple[int, int] | None:
        """``(N, rows per data point)`` if the rows can be computed per data point.

        That needs a batched output ``(N, ...)`` whose ``T`` terms are ``T / N`` per
        data point (:meth:`FisherLoss.flatten` orders them data point by data
        point), and an input whose tensors all have the leading batch axis ``N``.
        """
        if len(self.output_shape) == 0:
            return None
        num_samples = self.output_shape[0]
        T, _, R = self.scaled_factor.shape
        leaves, _ = tree_flatten(self.X)
        if (
            num_samples == 0
            or T % num_samples != 0
            or not leaves
            or not all(
                isinstance(x, Tensor) and x.ndim > 0 and x.shape[0] == num_samples
                for x in leaves
            )
        ):
            return None
        return num_samples, T // num_samples * R

    def _per_sample_rows(
        self, start: int, stop: int, check: bool = False
    ) -> Tensor | None:
        r"""Rows of data points ``start:stop``: one VJP per data point (``vmap``).

        Data point ``n`` owns the rows ``n D R`` to ``(n + 1) D R`` (``D`` terms of
        ``R`` rows); each is the VJP of the data point's own forward pass (a batch of
        one), so a row costs one data point's backward pass instead of a whole
        batch's, as with :meth:`_rows_between`. This assumes that the model treats
        the data points of a batch independently (eval mode: no batch statistics);
        with ``check=True`` the per-data-point outputs are compared with the batch
        output first, and ``None`` is returned if they differ or if the model
        cannot run under ``vmap`` (then :meth:`_rows_between` is used).

        Args:
            start: First data point.
            stop: One past the last data point.
            check: Compare the outputs with the batch output; ``None`` on mismatch.

        Returns:
            The rows ``[(stop - start) D R, P]``, or ``None`` (see ``check``).
        """
        B = self.scaled_factor
        T, C, R = B.shape
        num_samples = self.output_shape[0]
        D = T // num_samples
        k = stop - start
        B_k = B[start * D : stop * D].reshape(k, D, C, R)
        eye = torch.eye(D, dtype=B.dtype, device=B.device)
        # Cotangent of row (d, r) of data point s: B_k[s, d, :, r] at term d, else 0.
        W = torch.einsum("sdcr,de->sdrec", B_k, eye).reshape(k, D * R, D, C)
        cotangents = self.loss.unflatten(W, Size([1, *self.output_shape[1:]]), lead=2)
        X_k = tree_map(lambda x: x[start:stop], self.X)

        def data_point_rows(x: ModelInput, w: Tensor) -> tuple[Tensor, Tensor]:
            x1 = tree_map(lambda t: t.unsqueeze(0), x)
            out, vjp_fn = vjp(lambda p: self.model_function(p, x1), self.params)
            (grads,) = vmap(vjp_fn)(w)
            return out, _join_rows(grads)

        try:
            with torch.no_grad():  # see linearize_batch
                outputs, rows = vmap(data_point_rows)(X_k, cotangents)
        except Exception:
            if check:
                return None
            raise
        if check:
            batch_out = self.output[start:stop]
            # Batched and one-point matrix products round differently; a model that
            # mixes data points differs by far more.
            tol = {8: 1e-9, 4: 1e-5}.get(outputs.dtype.itemsize, 1e-2)
            scale = 1.0 + float(batch_out.abs().max()) if batch_out.numel() else 1.0
            if not torch.allclose(
                outputs.reshape(batch_out.shape), batch_out, rtol=0, atol=tol * scale
            ):
                return None
        return rows.reshape(k * D * R, -1)

    def _rows_agree(self, rows: Tensor, start: int, stop: int) -> bool:
        r"""Whether rows of data points ``start:stop`` agree with one batched VJP.

        With random weights :math:`\boldsymbol\omega` (a fixed seed) on the rows
        ``i`` of these data points, :math:`\mathbf{U}_k^\top\boldsymbol\omega`
        must equal the VJP of the whole batch's forward pass with the cotangent
        :math:`\sum_i \omega_i \sqrt{c}\,\mathbf{B}_t\mathbf{e}_r` (at term
        ``t(i)``, zeros at the other data points' terms). Agreement within
        :data:`~curvlinops_fisher.kronecker._CHECK_RTOL` of
        :math:`\max(\|\mathbf{J}^\top\mathbf{w}\|, \|\boldsymbol\omega \odot
        (\|\mathbf{u}_i\|)_i\|)` (the second guards against cancellation).

        Args:
            rows: The rows ``[(stop - start) D R, P]``.
            start: First data point.
            stop: One past the last data point.

        Returns:
            Whether they agree.
        """
        B = self.scaled_factor
        T, C, R = B.shape
        D = T // self.output_shape[0]
        terms = slice(start * D, stop * D)
        generator = torch.Generator(device=B.device).manual_seed(_CHECK_SEED)
        omega = torch.randn(
            (stop - start) * D, R, generator=generator, dtype=B.dtype, device=B.device
        )
        W = B.new_zeros(T, C)
        W[terms] = torch.einsum("tcr,tr->tc", B[terms], omega)
        with torch.no_grad():  # see linearize_batch
            (grads,) = self.vjp_fn(self.loss.unflatten(W, self.output_shape))
        expected = torch.cat([g.flatten() for g in grads])
        omega = omega.reshape(-1)
        got = rows.mT @ omega
        weighted = torch.linalg.vector_norm(
            omega * torch.linalg.vector_norm(rows, dim=1)
        )
        scale = torch.maximum(torch.linalg.vector_norm(expected), weighted)
        rtol = _CHECK_RTOL.get(B.dtype.itemsize, 1e-2)
        error = torch.linalg.vector_norm(got - expected)
        return bool(error <= rtol * scale + torch.finfo(B.dtype).tiny)

    def rows(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        """All rows of the batch, shape ``[T * R, P]`` (computed chunk by chunk)."""
        chunks = list(self.chunks(chunk_bytes))
        if not chunks:
            return self.scaled_factor.new_zeros(0, self.dim)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _rows_between(self, start: int, stop: int) -> Tensor:
        r"""Rows ``start:stop``: one batched VJP of the cotangents of these rows.

        Row ``i = t R + r`` has the cotangent :math:`\sqrt{c}\,\mathbf{B}_t
        \mathbf{e}_r` at term ``t`` and zeros elsewhere.
        """
        B = self.scaled_factor
        T, C, R = B.shape
        index = torch.arange(start, stop, device=B.device)
        terms, columns = index // R, index % R
        W = B.new_zeros(stop - start, T, C)
        W[torch.arange(stop - start, device=B.device), terms] = B[terms, :, columns]
        cotangents = self.loss.unflatten(W, self.output_shape, lead=1)
        with torch.no_grad():  # see linearize_batch
            (grads,) = vmap(self.vjp_fn)(cotangents)
        return _join_rows(grads)

    def matmat(
        self, V: tuple[Tensor, ...], max_columns: int | None
    ) -> tuple[Tensor, ...]:
        """The batch's curvature times ``V`` (leading column axis), same factor.

        Uses :func:`~curvlinops_fisher.core.batch_curvature_matmat` with this batch's
        output factor, so the MC Fisher uses the same sample as the rows.

        Args:
            V: Matrix in tensor list format with a leading column axis.
            max_columns: Most columns that share one forward pass.

        Returns:
            The product in the format of ``V``.
        """
        return batch_curvature_matmat(
            self.model_function,
            self.params,
            self.X,
            self.y,
            V,
            self.loss,
            _FixedFactorKind(self.output_factor),
            scale=self.scale,
            max_columns=max_columns,
        )


def linearize_batch(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    y: Tensor,
    loss: FisherLoss,
    factor_kind: OutputFactorKind,
    scale: float = 1.0,
    check_targets: bool = False,
) -> LinearizedBatch:
    """Run one batch's forward pass (keeping its VJP) and build its output factor.

    For the MC Fisher this draws the batch's samples from ``factor_kind``'s generator:
    call it once per batch, in data order.

    Args:
        model_function: ``f(param_values, X)``.
        params: Parameter values (the linearization point).
        X: The batch's input.
        y: The batch's targets.
        loss: The loss wrapper.
        factor_kind: Which curvature matrix (GGN, MC Fisher, EF).
        scale: The batch's reduction scale :math:`c`.
        check_targets: Validate ``y`` against the output first.

    Returns:
        The linearized batch.
    """
    # torch.func differentiates w.r.t. ``params`` whatever the outer grad mode; no_grad
    # keeps module parameters outside ``params`` that require grad out of the results.
    with torch.no_grad():
        output, vjp_fn = vjp(lambda p: model_function(p, X), params)
    if check_targets:
        loss.check_targets(output, y)
    output_factor = factor_kind.for_batch(
        loss, loss.flatten(output), loss.flatten_targets(y, output)
    )
    return LinearizedBatch(
        model_function,
        params,
        X,
        y,
        loss,
        output_factor,
        scale,
        output.detach(),
        vjp_fn,
    )


#: Attribute of a model function set once its per-data-point rows disagreed with
#: the batched VJP (:meth:`LinearizedBatch._rows_agree`).
_PER_SAMPLE_FAILED = "per_sample_rows_failed"


def _disable_per_sample_rows(model_function: ModelFunction) -> None:
    """Skip the per-data-point rows of ``model_function`` from now on, warning once.

    The flag lives on the model function (one per operator); a function that takes
    no attributes warns on every batch instead
    (:func:`~curvlinops_fisher.fast_path_checks.warn_once`).
    """
    model = getattr(model_function, "model", model_function)
    warn_once(
        model_function,
        "per-data-point rows",
        f"The per-data-point rows of {type(model).__name__} disagree with the "
        "batched VJP (a PyTorch batching rule?); this operator's rows come from "
        "batched VJPs instead.",
    )
    try:
        setattr(model_function, _PER_SAMPLE_FAILED, True)
    except AttributeError:
        pass


def _join_rows(tensors: Iterable[Tensor]) -> Tensor:
    """Tensor list with a leading row axis ``k`` -> flat rows ``[k, P]``."""
    tensors = list(tensors)
    rows = [t.reshape(t.shape[0], -1) for t in tensors]
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)


def _split_rows(rows: Tensor, shapes: list[Size]) -> tuple[Tensor, ...]:
    """Flat rows ``[k, P]`` -> tensor list with a leading row axis ``k``."""
    blocks = rows.split([s.numel() for s in shapes], dim=1)
    return tuple(b.reshape(rows.shape[0], *s) for b, s in zip(blocks, shapes))


# -------------------------------------------- reductions over chunks of rows


#: From this many columns on, :func:`add_gram` multiplies only the lower triangle.
GRAM_TRIANGLE_MIN_DIM = 1024
#: Number of column blocks of :func:`add_gram`'s lower-triangle products.
GRAM_TRIANGLE_BLOCKS = 8


def add_gram(
    chunks: Iterable[Tensor], out: Tensor, blocks: int | None = None
) -> Tensor:
    r"""Accumulate :math:`\sum_i \mathbf{U}_i^\top \mathbf{U}_i` into ``out`` ``[P, P]``.

    The result is symmetric, so with ``blocks > 1`` only the lower block triangle is
    multiplied: column block :math:`[a, b)` gets :math:`\mathbf{U}_{:, a:}^\top
    \mathbf{U}_{:, a:b}` (rows ``a:``), with block edges that split the triangle into
    equal areas, which takes :math:`(1 + 1/\text{blocks})/2` of the flops of one
    full product; the strict upper triangle is then copied from the lower one.
    ``out`` must be symmetric on entry (it is: zeros, or sums of such Gram
    matrices).

    Args:
        chunks: Blocks of rows of :math:`\mathbf{U}`, each ``[k, P]``.
        out: Symmetric accumulator ``[P, P]``.
        blocks: Number of column blocks; ``None``: :data:`GRAM_TRIANGLE_BLOCKS` if
            ``P >= GRAM_TRIANGLE_MIN_DIM``, else one full product per chunk.

    Returns:
        ``out``.
    """
    dim = out.shape[0]
    if blocks is None:
        blocks = GRAM_TRIANGLE_BLOCKS if dim >= GRAM_TRIANGLE_MIN_DIM else 1
    if blocks <= 1:
        for U in chunks:
            out.addmm_(U.mT, U)
        return out
    edges = sorted(
        {round(dim * (1 - (1 - i / blocks) ** 0.5)) for i in range(blocks + 1)}
    )
    spans = list(zip(edges[:-1], edges[1:]))
    for U in chunks:
        for a, b in spans:
            out[a:, a:b].addmm_(U[:, a:].mT, U[:, a:b])
    for a, b in spans:
        out[a:b, b:] = out[b:, a:b].mT
    return out


#: Entries per block of :func:`squared_norm`'s partial sums. The blocks' squared
#: norms are taken in the factor's precision (vectorized, no temporary), then summed
#: in float64: on a float32 chunk ``390 x 172,032`` (normal entries, mean 0.5) the
#: error is 1.3e-8 relative, and it takes 6 ms against 9 ms for one ``vector_norm``
#: (2 threads), whose own single-precision accumulators lose 1.2e-2 there.
SUM_BLOCK = 4096
#: Most entries of one temporary tile of :func:`add_column_squares` (16 MiB in
#: float32): a tile's squares are summed over its rows in the factor's precision
#: (pairwise), then added to a float64 accumulator.
TILE_NUMEL = 2**22


def _partial_dtype(dtype: torch.dtype) -> torch.dtype:
    """Data type of partial sums: at least single precision (no overflow in half)."""
    return torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 else dtype


def squared_norm(U: Tensor) -> Tensor:
    r""":math:`\|\mathbf{U}\|_F^2` in :func:`accumulation_dtype` (a scalar).

    The entries are split into blocks of :data:`SUM_BLOCK`; with :math:`\beta_j` the
    squared norm of block ``j`` (in the factor's precision, relative error about
    :math:`\sqrt{\text{SUM\_BLOCK}}\,\varepsilon` each),
    :math:`\|\mathbf{U}\|_F^2 = \sum_j \beta_j` is summed in float64. A
    non-contiguous ``U`` goes in slabs of rows of at most :data:`TILE_NUMEL`
    entries (each copied once).

    Args:
        U: Any tensor.

    Returns:
        The scalar squared norm.
    """
    total_dtype = accumulation_dtype(U.dtype, U.device)
    if not U.is_contiguous():
        total = U.new_zeros((), dtype=total_dtype)
        rows = U.reshape(U.shape[0], -1) if U.ndim > 1 else U.reshape(1, -1)
        step = max(1, TILE_NUMEL // max(1, rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            total += squared_norm(rows[start : start + step].contiguous())
        return total
    flat = U.reshape(-1)
    whole = flat.numel() // SUM_BLOCK * SUM_BLOCK
    partial = _partial_dtype(U.dtype)
    blocks = torch.linalg.vector_norm(
        flat[:whole].view(-1, SUM_BLOCK), dim=1, dtype=partial
    )
    tail = torch.linalg.vector_norm(flat[whole:], dtype=partial)
    return blocks.to(total_dtype).square().sum() + tail.to(total_dtype).square()


def add_squared_norm(chunks: Iterable[Tensor], out: Tensor) -> Tensor:
    r"""Accumulate :math:`\sum_i \|\mathbf{U}_i\|_F^2` into the scalar ``out``.

    Each chunk's :func:`squared_norm` is summed in :func:`accumulation_dtype`, then
    added to ``out`` once (pass a float64 ``out`` to accumulate over several calls
    without rounding).
    """
    total = out.new_zeros((), dtype=accumulation_dtype(out.dtype, out.device))
    for U in chunks:
        total += squared_norm(U)
    return out.add_(total)


def add_column_squares(chunks: Iterable[Tensor], out: Tensor) -> Tensor:
    r"""Accumulate the squared column norms :math:`\sum_i \sum_j (U_i)_{j:}^2` into ``out``.

    Each chunk goes in tiles of at most :data:`TILE_NUMEL` entries (whole rows where
    a row fits): a tile's squares are summed over its rows in the factor's precision
    (PyTorch's pairwise sum), the tiles' sums in :func:`accumulation_dtype`; the
    result is added to ``out`` once (pass a float64 ``out`` to accumulate over
    several calls without rounding). On a float32 chunk ``390 x 172,032`` (normal
    entries, mean 0.5): error 1.1e-7 relative in 44 ms, against 1.3e-6 in 131 ms
    for one ``vector_norm(U, dim=0)`` (5e-5 for ``200,000 x 250``).
    """
    total_dtype = accumulation_dtype(out.dtype, out.device)
    total = (
        out if out.dtype == total_dtype else out.new_zeros(out.shape, dtype=total_dtype)
    )
    for U in chunks:
        _add_column_squares(U, total)
    return out if total is out else out.add_(total)


def _add_column_squares(U: Tensor, total: Tensor) -> None:
    """Add the squared column norms of ``U`` ``[k, P]`` to ``total``, tile by tile."""
    num_rows, dim = U.shape
    height = max(1, TILE_NUMEL // max(1, dim))
    width = min(dim, TILE_NUMEL)
    partial = _partial_dtype(U.dtype)
    for start in range(0, num_rows, height):
        for col in range(0, dim, width):
            tile = U[start : start + height, col : col + width].to(partial)
            total[col : col + width] += tile.square().sum(0)


def add_transpose_product(chunks: Iterable[Tensor], W: Tensor, out: Tensor) -> Tensor:
    r"""Accumulate :math:`\mathbf{U}^\top \mathbf{W}` into ``out`` ``[P, k]``.

    Args:
        chunks: The rows of :math:`\mathbf{U}` in order, in chunks.
        W: Matrix ``[n, k]`` whose rows match the rows of :math:`\mathbf{U}`.
        out: Accumulator ``[P, k]``.

    Returns:
        ``out``.
    """
    start = 0
    for U in chunks:
        out.addmm_(U.mT, W[start : start + U.shape[0]])
        start += U.shape[0]
    return out


# ------------------------------------------------------------ eigenpairs


def _check_eigh_args(k: object, dim: int, method: object) -> None:
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


def _check_distributed_eigh(op: ProcessGroupMixin, method: str) -> None:
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


def factor_eigh(U: Tensor, k: int) -> tuple[Tensor, Tensor]:
    r"""The ``k`` largest eigenpairs of :math:`\mathbf{U}^\top\mathbf{U}` for a held ``U``."""
    return gram_eigh(U @ U.mT, lambda W: U.mT @ W, k)


def kronecker_eigh(factor: KroneckerFactor, k: int) -> tuple[Tensor, Tensor]:
    r"""The ``k`` largest eigenpairs from rows in Kronecker form (see :func:`gram_eigh`).

    The Gram blocks :math:`\mathbf{U}_a\mathbf{U}_b^\top` and
    :math:`\mathbf{U}^\top\mathbf{W}` come from the layers' inputs and output
    gradients; no row is formed.
    """
    return gram_eigh(factor.gram(), factor.transpose_product, k)


class DenseAccumulator:
    r"""Accumulates :math:`\sum_b \mathbf{U}_b^\top\mathbf{U}_b` into a ``[P, P]`` tensor.

    Batches in Kronecker form are held back and joined (up to ``chunk_bytes`` of
    factors, so the matrix products run over all their data points at once and
    ``out`` is visited once per group rather than once per batch), then add their
    blocks to the upper triangle only (:meth:`KroneckerRows.add_upper_dense`:
    :math:`N P^2 / 2` multiply-adds against :math:`n P^2 / 2` for the Gram product of
    the ``n = N D R`` explicit rows); the lower triangle is completed once, before
    the next explicit Gram product (which needs a symmetric accumulator) or at the
    end. A group with one row per data point and fewer than
    :data:`KRONECKER_DENSE_MIN_POINTS_ONE_ROW` data points adds the Gram product of
    its rows instead, formed from the factors.

    Explicit chunks of rows smaller than a quarter of ``chunk_bytes`` are held back
    too and joined (up to half of ``chunk_bytes``, so holding and joining them takes
    at most one more chunk) into one Gram product: small batches then visit ``out``
    once per group, which is faster (``P = 2,000``: 32-row chunks take 1.8 times as
    long as 4,096-row ones) and rounds less, since every visit adds a float32
    rounding of ``out`` (``P = 64``, 2 million rows: diagonal error 1e-5 relative
    in 32-row chunks, 1.4e-6 in one product; each product on its own stays near
    1e-6, also over 172,032 columns).

    Args:
        out: The accumulator, symmetric on entry (zeros).
        layout: The parameters' layers (``None`` if no batch is in Kronecker form).
    """

    def __init__(self, out: Tensor, layout: LinearLayout | None):
        """Start from ``out``."""
        self.out = out
        self.layout = layout
        self._upper_only = False
        self._pending: list[KroneckerRows] = []
        self._chunk_bytes = DEFAULT_CHUNK_BYTES
        self._rows: list[Tensor] = []
        self._rows_bytes = 0

    def add_kronecker(self, rows: KroneckerRows, chunk_bytes: int) -> None:
        """Add a batch's rows in Kronecker form."""
        if self._pending and (
            rows.rows_per_point != self._pending[0].rows_per_point
            or sum(r.nbytes for r in self._pending) + rows.nbytes > chunk_bytes
        ):
            self._flush()
        self._pending.append(rows)
        self._chunk_bytes = chunk_bytes

    def _flush(self) -> None:
        """Add the held-back batches in Kronecker form (see the class docstring)."""
        if not self._pending:
            return
        joined = KroneckerRows.concatenate(self._pending)
        self._pending = []
        if (
            joined.rows_per_point == 1
            and joined.num_points < KRONECKER_DENSE_MIN_POINTS_ONE_ROW
        ):
            self.add_rows([joined.rows()])
        else:
            joined.add_upper_dense(self.out, self._chunk_bytes)
            self._upper_only = True

    def add_rows(
        self, chunks: Iterable[Tensor], chunk_bytes: int | None = None
    ) -> None:
        """Add the Gram product of explicit rows (see :func:`add_gram`).

        Chunks under a quarter of ``chunk_bytes`` (``None``: the last budget given)
        are held back and joined, see the class docstring.
        """
        budget = self._chunk_bytes if chunk_bytes is None else chunk_bytes
        for U in chunks:
            if 4 * U.nbytes >= budget:
                add_gram([U], out=self._complete())
                continue
            if 2 * (self._rows_bytes + U.nbytes) > budget:
                self._flush_rows()
            self._rows.append(U)
            self._rows_bytes += U.nbytes

    def _flush_rows(self) -> None:
        """Add the Gram product of the held-back explicit rows, joined."""
        if not self._rows:
            return
        rows = self._rows[0] if len(self._rows) == 1 else torch.cat(self._rows)
        self._rows, self._rows_bytes = [], 0
        add_gram([rows], out=self._complete())

    def _complete(self) -> Tensor:
        """``out`` with the upper triangle of Kronecker blocks mirrored."""
        if self._upper_only:
            self.layout.mirror_upper(self.out)
            self._upper_only = False
        return self.out

    def symmetric(self) -> Tensor:
        """The accumulator with everything held back added, both triangles complete."""
        self._flush()
        self._flush_rows()
        return self._complete()


# ------------------------------------------------------ streaming operators


class ExactStructureMixin:
    r"""Exact dense matrix, trace, diagonal, eigenpairs and factor of a curvature operator.

    Mixed into :class:`~curvlinops_fisher.curvature.CurvatureLinearOperator`, whose
    data, loss, scale and factor kind it uses. Nothing is kept between calls: every
    method makes its own passes over the data and computes the factor rows
    :math:`\mathbf{U}_b` batch by batch (see the module docstring), in chunks of at
    most ``chunk_bytes``. Each pass starts from the MC Fisher's freshly seeded
    generator (a private copy of it, so products or other passes run while a pass is
    consumed do not disturb it), hence all methods see the sample products use.

    :meth:`cached` returns an operator that keeps :math:`\mathbf{U}`.

    With a process group (data-parallel operators), :math:`\mathbf{U}` is split by
    rows over the ranks, :math:`\mathbf{A} = \sum_r \mathbf{U}_r^\top\mathbf{U}_r`:
    :meth:`to_dense`, :meth:`trace` and :meth:`diagonal` sum the ranks' parts with one
    ``all_reduce`` and return the global result on every rank; :meth:`factor` and
    :meth:`factor_batches` return this rank's rows :math:`\mathbf{U}_r` only;
    :meth:`cached` keeps each rank's rows on that rank; :meth:`eigh` uses ``eigsh``.
    All of these are collective calls.
    """

    # -------------------------------------------------------------- passes
    def _linearized_batches(self) -> Iterator[LinearizedBatch]:
        """One pass over the data: every batch linearized, with its factor, in order."""
        factor_kind = self._factor_kind()  # freshly seeded: once per pass
        params = self._param_values()
        for index, (X, y) in enumerate(self._batches("factor")):
            with naming_batch(index):
                batch = linearize_batch(
                    self._model_function,
                    params,
                    X,
                    y,
                    self._loss,
                    factor_kind,
                    scale=self._loss.batch_scale(y, self._batch_size(X), self._N_data),
                    check_targets=not self._targets_checked,
                )
            yield batch
        self._targets_checked = True

    @cached_property
    def _linear_layout(self) -> LinearLayout | None:
        """The parameters' linear layers, if all are (for rows in Kronecker form)."""
        return linear_layout(self._model_func, self._params)

    def _structured_batches(
        self,
    ) -> Iterator[tuple[LinearizedBatch, KroneckerRows | None]]:
        """One pass: each batch with its rows in Kronecker form, where they have it."""
        layout = self._linear_layout
        for batch in self._linearized_batches():
            yield batch, None if layout is None else kronecker_rows(batch, layout)

    def _kronecker_factor(self, max_bytes: int | None = None) -> KroneckerFactor | None:
        """All batches' rows in Kronecker form (one pass).

        ``None`` if a batch lacks the form, there is no batch, or the factor would
        take more than ``max_bytes`` (the pass stops there).
        """
        layout = self._linear_layout
        if layout is None:
            return None
        batches, held = [], 0
        for _, rows in self._structured_batches():
            if rows is None:
                return None
            held += rows.num_rows * layout.row_length * self.dtype.itemsize
            if max_bytes is not None and held > max_bytes:
                return None
            batches.append(rows)
        return KroneckerFactor.joined(batches) if batches else None

    def _factor_chunks(self, chunk_bytes: int) -> Iterator[Tensor]:
        """All factor rows in order, in chunks (one pass)."""
        for batch in self._linearized_batches():
            yield from batch.chunks(chunk_bytes)

    def _row_counts(self) -> list[int]:
        """Number of factor rows of each batch (one pass of forwards, no VJPs)."""
        return [batch.num_rows for batch in self._linearized_batches()]

    def _forward_flops_per_point(self) -> float:
        """Floating-point operations of the forward pass per data point (first batch).

        Counted with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products,
        convolutions, attention); ``0.0`` if nothing was counted.
        """
        X, _ = next(iter(self._batches("flops")))
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            self._model_function(self._param_values(), X)
        return counter.get_total_flops() / max(1, self._batch_size(X))

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _accumulator(self, *shape: int) -> Tensor:
        """Zeros in :func:`accumulation_dtype` (float64 for a float32 operator).

        Sums over many batches and chunks round once, at the end, instead of once per
        addition: the trace and diagonal of a float32 operator stay within a few
        units of float32 rounding of the float64 result.
        """
        dtype = accumulation_dtype(self.dtype, self.device)
        return torch.zeros(shape, dtype=dtype, device=self.device)

    # -------------------------------------------------------------- factor
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
        for batch in self._linearized_batches():
            yield batch.rows(chunk_bytes)

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
        blocks = list(self.factor_batches(chunk_bytes=chunk_bytes))
        return torch.cat(blocks) if blocks else self._zeros(0, self.shape[1])

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
        dim, itemsize = self.shape[1], self.dtype.itemsize
        layout = self._linear_layout
        num_rows = None if max_bytes is None else sum(self._row_counts())
        U: Tensor | KroneckerFactor | None = None
        if layout is not None and (
            num_rows is None or num_rows * layout.row_length * itemsize <= max_bytes
        ):
            U = self._kronecker_factor()
        if U is None:
            if num_rows is not None and num_rows * dim * itemsize > max_bytes:
                raise FactorMemoryError(num_rows, dim, itemsize, max_bytes)
            U = self.factor(chunk_bytes=chunk_bytes)
        return CachedCurvatureLinearOperator(
            U, [tuple(s) for s in self._in_shape], process_group=self._process_group
        )

    # ------------------------------------------------------ exact structure
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
        dim = self.shape[1]

        def local_dense() -> Tensor:
            dense = DenseAccumulator(self._zeros(dim, dim), self._linear_layout)
            for batch, kronecker in self._structured_batches():
                if kronecker is not None:
                    dense.add_kronecker(kronecker, chunk_bytes)
                elif batch.num_rows <= dim:
                    dense.add_rows(batch.chunks(chunk_bytes), chunk_bytes)
                else:
                    self._add_batch_columns(batch, dense.symmetric(), chunk_bytes)
            return dense.symmetric()

        return self._summed(local_dense, dim, dim)

    def _add_batch_columns(
        self, batch: LinearizedBatch, dense: Tensor, chunk_bytes: int
    ) -> None:
        """Add the batch's curvature times the identity to ``dense``, column blocks."""
        dim = dense.shape[0]
        step = max(1, chunk_bytes // (dim * dense.dtype.itemsize))
        for start in range(0, dim, step):
            stop = min(dim, start + step)
            unit_rows = self._zeros(stop - start, dim)
            index = torch.arange(stop - start, device=self.device)
            unit_rows[index, index + start] = 1.0
            columns = batch.matmat(
                _split_rows(unit_rows, self._in_shape), self.max_columns_per_pass
            )
            dense[:, start:stop] += _join_rows(columns).mT

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
        return self._summed(
            lambda: self._accumulate(
                self._accumulator(),
                lambda rows, out: out.add_(rows.squared_norm(dtype=out.dtype)),
                lambda chunks, out: add_squared_norm(chunks, out),
                chunk_bytes,
            )
        )

    def _accumulate(
        self,
        out: Tensor,
        kronecker: Callable[[KroneckerRows, Tensor], object],
        explicit: Callable[[Iterator[Tensor], Tensor], object],
        chunk_bytes: int,
    ) -> Tensor:
        """One pass: each batch's rows added to ``out``, in Kronecker form if they have it.

        ``out`` accumulates in its own data type (see :meth:`_accumulator`); the
        result is cast to the operator's.
        """
        for batch, rows in self._structured_batches():
            if rows is not None:
                kronecker(rows, out)
            else:
                explicit(batch.chunks(chunk_bytes), out)
        return out.to(self.dtype)

    def diagonal(self, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        r"""The exact diagonal :math:`A_{ii} = \sum_j U_{ji}^2`.

        Args:
            chunk_bytes: Memory budget of one chunk of rows (default 256 MiB).

        Returns:
            A tensor ``[P]`` (flat parameter order).
        """
        dim = self.shape[1]
        return self._summed(
            lambda: self._accumulate(
                self._accumulator(dim),
                lambda rows, out: out.add_(rows.column_squares(dtype=out.dtype)),
                lambda chunks, out: add_column_squares(chunks, out),
                chunk_bytes,
            ),
            dim,
        )

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
          \mathbf{w}/\sqrt\lambda` (see :func:`gram_eigh` for zero eigenvalues: if
          ``k`` exceeds the numerical rank, the rest are zeros with an orthonormal
          completion). :math:`\mathbf{U}` is held if it fits ``max_bytes``;
          otherwise the Gram blocks :math:`\mathbf{U}_a\mathbf{U}_b^\top` are
          formed by recomputing the batches' rows (one pass per batch ``a``), and
          :math:`\mathbf{U}^\top\mathbf{W}` by one more pass.
        - ``'eigsh'``: SciPy's Lanczos ``eigsh(self.to_scipy(), k, which='LA')``,
          which needs ``k < P``.

        If every batch's rows have the Kronecker form of linear layers and fit
        ``max_bytes`` in that form, the Gram path works on that form
        (:func:`kronecker_eigh`); otherwise ``'auto'`` counts the rows ``n`` (one
        pass of forward passes). ``'auto'`` takes the Gram path if ``n <= P / 2``,
        the Gram matrix fits ``max_bytes`` and it needs fewer floating-point
        operations than Lanczos (:func:`prefer_gram`), else ``eigsh``. With a process group, ``'auto'`` takes ``eigsh`` (rank 0 drives
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
        dim = self.shape[1]
        _check_eigh_args(k, dim, method)
        _check_distributed_eigh(self, method)
        if method != "eigsh" and self._process_group is None:
            itemsize = self.dtype.itemsize
            kronecker = self._kronecker_factor(max_bytes)
            if kronecker is not None:
                if self._takes_gram(
                    method, kronecker.num_rows, k, max_bytes, kronecker.row_length
                ):
                    return kronecker_eigh(kronecker, k)
                return eigsh_top(self, k)
            counts = self._row_counts()
            num_rows = sum(counts)
            if self._takes_gram(method, num_rows, k, max_bytes):
                if num_rows * dim * itemsize <= max_bytes:
                    return factor_eigh(self.factor(chunk_bytes=chunk_bytes), k)
                return gram_eigh(
                    self._streamed_gram(counts, chunk_bytes),
                    lambda W: add_transpose_product(
                        self._factor_chunks(chunk_bytes),
                        W,
                        out=self._zeros(dim, W.shape[1]),
                    ),
                    k,
                )
        return eigsh_top(self, k)

    def _takes_gram(
        self,
        method: str,
        num_rows: int,
        k: int,
        max_bytes: int,
        row_length: int | None = None,
    ) -> bool:
        """Whether :meth:`eigh` takes the Gram path: forced, or :func:`prefer_gram`."""
        return method == "gram" or prefer_gram(
            num_rows,
            self.shape[1],
            self.dtype.itemsize,
            max_bytes,
            k=k,
            num_data=self._N_data,
            flops_per_point=self._forward_flops_per_point(),
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
            for b, batch in enumerate(self._linearized_batches()):
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


# --------------------------------------------------------- cached operator


class CachedCurvatureLinearOperator(ProcessGroupMixin, PyTorchLinearOperator):
    r"""A curvature matrix :math:`\mathbf{A} = \mathbf{U}^\top\mathbf{U}` with ``U`` held.

    Created by :meth:`ExactStructureMixin.cached`. A product costs two matrix
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

    @property
    def _kronecker(self) -> KroneckerFactor | None:
        return self._U if isinstance(self._U, KroneckerFactor) else None

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
        U = self._U

        def local() -> list[Tensor]:
            if isinstance(U, KroneckerFactor):
                return [U.transpose_product(U.product(X))]
            return [U.mT @ (U @ X)]

        (AX,) = self._sum_over_ranks(local, [X.shape])
        return _flat_to_list(AX, self._out_shape)

    def factor(self) -> Tensor:
        r"""The factor :math:`\mathbf{U}` ``[n, P]`` (this rank's rows).

        The held tensor itself (not a copy), or, for a factor held in Kronecker
        form, its rows formed explicitly.
        """
        kronecker = self._kronecker
        return self._U if kronecker is None else kronecker.rows()

    def _reduce_rows(
        self,
        kronecker: Callable[[KroneckerFactor], Tensor],
        reduce: Callable[..., Tensor],
        *shape: int,
    ) -> Tensor:
        """The reduction of the held factor, summed over the ranks.

        ``kronecker(factor)`` for a factor in Kronecker form, else
        ``reduce([U], out=zeros(shape))``.
        """
        U = self._U

        def local() -> Tensor:
            if isinstance(U, KroneckerFactor):
                return kronecker(U)
            return reduce([U], out=U.new_zeros(shape))

        return self._summed(local, *shape)

    def to_dense(self) -> Tensor:
        r"""The matrix :math:`\mathbf{U}^\top\mathbf{U}`, ``[P, P]``."""
        dim = self.shape[1]

        def kronecker_dense(factor: KroneckerFactor) -> Tensor:
            dense = DenseAccumulator(
                factor.batches[0].output_grads[0].new_zeros(dim, dim), factor.layout
            )
            for rows in factor.batches:
                dense.add_kronecker(rows, DEFAULT_CHUNK_BYTES)
            return dense.symmetric()

        return self._reduce_rows(kronecker_dense, add_gram, dim, dim)

    def trace(self) -> Tensor:
        r"""The exact trace :math:`\|\mathbf{U}\|_F^2` (a scalar tensor)."""
        return self._reduce_rows(KroneckerFactor.squared_norm, add_squared_norm)

    def diagonal(self) -> Tensor:
        """The exact diagonal (squared column norms of ``U``), ``[P]``."""
        return self._reduce_rows(
            KroneckerFactor.column_squares, add_column_squares, self.shape[1]
        )

    def eigh(
        self,
        k: int,
        *,
        method: EighMethod = "auto",
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` largest eigenpairs; see :meth:`ExactStructureMixin.eigh`.

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
        _check_eigh_args(k, dim, method)
        _check_distributed_eigh(self, method)
        kronecker = self._kronecker
        num_rows = self._U.shape[0] if kronecker is None else kronecker.num_rows
        if method == "gram" or (
            self._process_group is None
            and method == "auto"
            and prefer_gram(num_rows, dim, self.dtype.itemsize, max_bytes)
        ):
            if kronecker is not None:
                return kronecker_eigh(kronecker, k)
            return factor_eigh(self._U, k)
        return eigsh_top(self, k)
