r"""The rows of the factor :math:`\mathbf{U}`, and the one interface of all its forms.

Every curvature operator of this package is :math:`\mathbf{A} = \mathbf{U}^\top
\mathbf{U}` with the rows

.. math::
    \mathbf{U} = \big[\sqrt{c_b}\, \mathbf{B}_t^\top \mathbf{J}_t\big]_{b, t}
    \in \mathbb{R}^{n \times P},

ordered by batch, then loss term ``t``, then column ``r`` of :math:`\mathbf{B}_t`.
The rows of one batch are VJPs of its forward pass (:class:`LinearizedBatch`), per
data point where the data points are independent. :class:`FactorRows` is what the
structure methods use of rows in any form: explicit (:class:`ExplicitRows`,
:class:`BatchRows`) or Kronecker (:mod:`curvlinops_fisher.kronecker`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from math import prod, sqrt
from typing import Protocol

import torch
from torch import Size, Tensor
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from curvlinops_fisher.accumulation import (
    DEFAULT_CHUNK_BYTES,
    DenseAccumulator,
    add_column_squares,
    add_squared_norm,
    add_transpose_product,
)
from curvlinops_fisher.core import ModelFunction, batch_curvature_matmat
from curvlinops_fisher.data import ModelInput
from curvlinops_fisher.factors import BatchOutputFactor, OutputFactorKind
from curvlinops_fisher.fast_path_checks import warn_once
from curvlinops_fisher.losses import FisherLoss

#: Seed of the random row weights with which rows are checked against one VJP.
CHECK_SEED = 0
#: Relative tolerance of that check, by bytes per number.
CHECK_RTOL = {8: 1e-9, 4: 1e-4}


class FactorRows(Protocol):
    r"""Rows of :math:`\mathbf{U}` (of one batch or several), in any form.

    The reductions that the structure methods need; each is exact (up to rounding)
    for the rows it stands for.
    """

    @property
    def num_rows(self) -> int:
        """Number ``n`` of rows."""
        ...

    def rows(self) -> Tensor:
        """The rows in explicit form, ``[n, P]``."""
        ...

    def add_squared_norm(self, out: Tensor) -> Tensor:
        r"""Add :math:`\|\mathbf{U}\|_F^2` to the scalar ``out`` (summed in its type)."""
        ...

    def add_column_squares(self, out: Tensor) -> Tensor:
        r"""Add the squared column norms :math:`\sum_j U_{ji}^2` to ``out`` ``[P]``."""
        ...

    def gram(self) -> Tensor:
        r"""The Gram matrix :math:`\mathbf{U}\mathbf{U}^\top`, ``[n, n]``."""
        ...

    def product(self, V: Tensor) -> Tensor:
        r""":math:`\mathbf{U}\mathbf{V}` for ``V`` ``[P, k]``, shape ``[n, k]``."""
        ...

    def transpose_product(self, W: Tensor) -> Tensor:
        r""":math:`\mathbf{U}^\top\mathbf{W}` for ``W`` ``[n, k]``, shape ``[P, k]``."""
        ...

    def add_to_dense(self, dense: DenseAccumulator, chunk_bytes: int) -> None:
        r"""Add :math:`\mathbf{U}^\top\mathbf{U}` to ``dense`` (chunks of ``chunk_bytes``)."""
        ...


@dataclass(frozen=True)
class ExplicitRows:
    """Rows held as one tensor ``U`` ``[n, P]`` (implements :class:`FactorRows`).

    Attributes:
        U: The rows.
    """

    U: Tensor

    @property
    def num_rows(self) -> int:  # noqa: D102
        return self.U.shape[0]

    def rows(self) -> Tensor:
        """The held tensor itself (not a copy)."""
        return self.U

    def add_squared_norm(self, out: Tensor) -> Tensor:  # noqa: D102
        return add_squared_norm([self.U], out)

    def add_column_squares(self, out: Tensor) -> Tensor:  # noqa: D102
        return add_column_squares([self.U], out)

    def gram(self) -> Tensor:  # noqa: D102
        return self.U @ self.U.mT

    def product(self, V: Tensor) -> Tensor:  # noqa: D102
        return self.U @ V

    def transpose_product(self, W: Tensor) -> Tensor:  # noqa: D102
        return self.U.mT @ W

    def add_to_dense(self, dense: DenseAccumulator, chunk_bytes: int) -> None:  # noqa: D102
        dense.add_rows([self.U], chunk_bytes)


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
        :data:`CHECK_RTOL` of
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
        generator = torch.Generator(device=B.device).manual_seed(CHECK_SEED)
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
        rtol = CHECK_RTOL.get(B.dtype.itemsize, 1e-2)
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


@dataclass
class BatchRows:
    """The explicit rows of one batch, computed in chunks on every use (:class:`FactorRows`).

    Attributes:
        batch: The linearized batch.
        chunk_bytes: Memory budget of one chunk of rows.
        max_columns: Most columns that share one forward pass in
            :meth:`add_to_dense`'s products.
    """

    batch: LinearizedBatch
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_columns: int | None = None

    @property
    def num_rows(self) -> int:  # noqa: D102
        return self.batch.num_rows

    def chunks(self) -> Iterator[Tensor]:
        """The rows in chunks (see :meth:`LinearizedBatch.chunks`)."""
        return self.batch.chunks(self.chunk_bytes)

    def rows(self) -> Tensor:  # noqa: D102
        return self.batch.rows(self.chunk_bytes)

    def add_squared_norm(self, out: Tensor) -> Tensor:  # noqa: D102
        return add_squared_norm(self.chunks(), out)

    def add_column_squares(self, out: Tensor) -> Tensor:  # noqa: D102
        return add_column_squares(self.chunks(), out)

    def gram(self) -> Tensor:  # noqa: D102
        U = self.rows()
        return U @ U.mT

    def product(self, V: Tensor) -> Tensor:  # noqa: D102
        parts = [U @ V for U in self.chunks()]
        return torch.cat(parts) if parts else V.new_zeros(0, V.shape[1])

    def transpose_product(self, W: Tensor) -> Tensor:  # noqa: D102
        out = W.new_zeros(self.batch.dim, W.shape[1])
        return add_transpose_product(self.chunks(), W, out)

    def add_to_dense(self, dense: DenseAccumulator, chunk_bytes: int) -> None:
        """Add the Gram product of the rows, or, with more rows than ``P``, products.

        A batch with ``T R > P`` rows adds its curvature times the identity instead
        (``P`` columns of products, same output factor and MC sample), which needs
        fewer passes.
        """
        if self.num_rows <= self.batch.dim:
            dense.add_rows(self.chunks(), chunk_bytes)
        else:
            self._add_columns(dense.symmetric(), chunk_bytes)

    def _add_columns(self, dense: Tensor, chunk_bytes: int) -> None:
        """Add the batch's curvature times the identity to ``dense``, column blocks."""
        dim = dense.shape[0]
        shapes = [p.shape for p in self.batch.params]
        step = max(1, chunk_bytes // (dim * dense.dtype.itemsize))
        for start in range(0, dim, step):
            stop = min(dim, start + step)
            unit_rows = dense.new_zeros(stop - start, dim)
            index = torch.arange(stop - start, device=dense.device)
            unit_rows[index, index + start] = 1.0
            columns = self.batch.matmat(
                _split_rows(unit_rows, shapes), self.max_columns
            )
            dense[:, start:stop] += _join_rows(columns).mT
