"""Float32 reductions stay within 1e-5 relative of float64.

Squared norms, column squares, Gram and dense accumulation of
:mod:`curvlinops_fisher.accumulation` and :mod:`curvlinops_fisher.kronecker`, and the
public ``trace`` / ``diagonal`` / ``to_dense`` of float32 operators against their
float64 copies. A single-precision ``vector_norm`` of a 67-million-entry chunk loses
about 1% (its accumulators add millions of similar numbers each).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from reference import relative_error
from torch import Tensor, nn

from curvlinops_fisher import GGNLinearOperator
from curvlinops_fisher.accumulation import (
    DenseAccumulator,
    add_column_squares,
    add_gram,
    add_squared_norm,
    squared_norm,
)
from curvlinops_fisher.estimators import _draw_probes
from curvlinops_fisher.kronecker import KroneckerRows, linear_layout

RTOL = 1e-5


def _max_relative(actual: Tensor, expected: Tensor) -> float:
    """Largest entrywise relative error (absolute where ``expected`` is 0)."""
    scale = expected.abs().where(expected != 0, 1.0)
    return float(((actual.double() - expected) / scale).abs().max())


def _float64_reductions(U: Tensor, rows: int = 20) -> tuple[Tensor, Tensor]:
    """Squared norm and column squares in float64, a few rows at a time."""
    total = torch.zeros((), dtype=torch.float64)
    columns = torch.zeros(U.shape[1], dtype=torch.float64)
    for start in range(0, U.shape[0], rows):
        block = U[start : start + rows].double().square()
        total += block.sum()
        columns += block.sum(0)
    return total, columns


def test_large_float32_chunk() -> None:
    """A 51-million-entry float32 chunk with a nonzero mean (a large sum)."""
    generator = torch.Generator().manual_seed(0)
    U = torch.randn(300, 170_000, generator=generator).add_(0.5)
    total, columns = _float64_reductions(U)

    norm = add_squared_norm([U[:100], U[100:]], out=torch.zeros(()))
    assert norm.dtype == torch.float32
    assert _max_relative(norm, total) < RTOL
    assert _max_relative(squared_norm(U), total) < RTOL

    diagonal = add_column_squares([U[:100], U[100:]], out=torch.zeros(U.shape[1]))
    assert diagonal.dtype == torch.float32
    assert _max_relative(diagonal, columns) < RTOL


@pytest.mark.parametrize(
    "shape", [(1, 5_000_003), (200_000, 7), (3, 1)], ids=["row", "column", "tiny"]
)
def test_long_rows_and_columns(shape: tuple[int, int]) -> None:
    """One long row, many short rows, and a transposed (non-contiguous) chunk."""
    generator = torch.Generator().manual_seed(1)
    U = torch.randn(*shape, generator=generator).add_(0.5)
    total, columns = _float64_reductions(U, rows=50_000)
    assert _max_relative(squared_norm(U), total) < RTOL
    assert _max_relative(squared_norm(U.mT.contiguous().mT), total) < RTOL
    out = add_column_squares([U], out=torch.zeros(U.shape[1], dtype=torch.float64))
    assert _max_relative(out, columns) < RTOL
    rows = U.double().square().sum(1)
    assert _max_relative(add_column_squares([U.mT], torch.zeros(shape[0])), rows) < RTOL


def test_half_precision_does_not_overflow() -> None:
    """bfloat16 and float16 entries are squared in float32 (300^2 overflows fp16)."""
    U = torch.full((4, 5000), 300.0)
    for dtype in (torch.float16, torch.bfloat16):
        assert float(squared_norm(U.to(dtype))) == pytest.approx(4 * 5000 * 300.0**2)
        diagonal = add_column_squares([U.to(dtype)], out=torch.zeros(5000))
        torch.testing.assert_close(diagonal, torch.full((5000,), 4 * 300.0**2))


def test_dense_accumulation_of_many_small_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """8-row chunks are joined into few Gram products, within 1e-5 of float64."""
    generator = torch.Generator().manual_seed(2)
    U = torch.randn(40_000, 48, generator=generator).add_(0.5)
    expected = U.double().mT @ U.double()
    products = []
    gram = add_gram

    def counting_gram(chunks, out, blocks=None):  # noqa: ANN001, ANN202
        chunks = list(chunks)
        products.extend(c.shape[0] for c in chunks)
        return gram(chunks, out, blocks)

    monkeypatch.setattr("curvlinops_fisher.accumulation.add_gram", counting_gram)
    dense = DenseAccumulator(torch.zeros(48, 48))
    dense.add_rows(U.split(8), chunk_bytes=2**20)
    dense.add_rows([U[:5000]], chunk_bytes=2**20)  # large: one product of its own
    result = dense.symmetric()
    expected += U[:5000].double().mT @ U[:5000].double()
    assert relative_error(result, expected) < RTOL
    assert _max_relative(result.diagonal(), expected.diagonal()) < RTOL
    assert sum(products) == 45_000 and len(products) < 40
    assert 5000 in products


def _kronecker_rows(N: int, dtype: torch.dtype) -> KroneckerRows:
    """Rows of one ``Linear(12, 5)`` for ``N`` data points, 2 rows each, mean 0.5."""
    layer = nn.Linear(12, 5)
    layout = linear_layout(layer, list(layer.parameters()))
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(N, 12, generator=generator).add_(0.5)
    grads = torch.randn(2 * N, 5, generator=generator).add_(0.5)
    return KroneckerRows(layout, (inputs.to(dtype),), (grads.to(dtype),), 2)


def test_kronecker_reductions() -> None:
    """Trace, diagonal, dense blocks and Gram matrix in Kronecker form, float32."""
    rows32, rows64 = (
        _kronecker_rows(400_000, d) for d in (torch.float32, torch.float64)
    )
    assert rows32.squared_norm().dtype == torch.float32
    assert _max_relative(rows32.squared_norm(), rows64.squared_norm()) < RTOL
    assert _max_relative(rows32.column_squares(), rows64.column_squares()) < RTOL
    rows32, rows64 = (
        _kronecker_rows(100_000, d) for d in (torch.float32, torch.float64)
    )
    P = rows32.layout.dim
    dense32 = rows32.layout.mirror_upper(
        rows32.add_upper_dense(torch.zeros(P, P), 2**22)
    )
    dense64 = rows64.layout.mirror_upper(
        rows64.add_upper_dense(torch.zeros(P, P, dtype=torch.float64), 2**22)
    )
    assert relative_error(dense32, dense64) < RTOL
    small32, small64 = (_kronecker_rows(300, d) for d in (torch.float32, torch.float64))
    assert relative_error(small32.gram(small32), small64.gram(small64)) < RTOL


def _model(kronecker: bool) -> nn.Module:
    torch.manual_seed(0)
    if kronecker:  # every parameter in a Linear layer: rows in Kronecker form
        return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    return nn.Sequential(
        nn.Linear(10, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 4)
    )


@pytest.mark.parametrize("kronecker", [True, False], ids=["kronecker", "explicit"])
def test_float32_operator_matches_float64(kronecker: bool) -> None:
    """trace, diagonal, to_dense (streaming and cached) of float32 against float64.

    Many batches (50 of 16 data points, inputs with mean 1) so that the results sum
    many numbers; the float32 rows themselves differ from float64 by rounding.
    """
    model32 = _model(kronecker)
    model64 = copy.deepcopy(model32).double()
    generator = torch.Generator().manual_seed(4)
    data = [
        (
            torch.randn(16, 10, generator=generator).add_(1.0),
            torch.randint(0, 4, (16,), generator=generator),
        )
        for _ in range(50)
    ]
    data64 = [(X.double(), y) for X, y in data]
    loss = nn.CrossEntropyLoss()
    op32 = GGNLinearOperator(model32, loss, list(model32.parameters()), data)
    op64 = GGNLinearOperator(model64, loss, list(model64.parameters()), data64)
    assert (op32._structure.linear_layout is not None) == kronecker
    for a, b in [(op32, op64), (op32.cached(), op64.cached())]:
        trace, diagonal, dense = a.trace(), a.diagonal(), a.to_dense()
        assert trace.dtype == diagonal.dtype == dense.dtype == torch.float32
        assert _max_relative(trace, b.trace()) < RTOL
        assert relative_error(diagonal, b.diagonal()) < RTOL
        assert relative_error(dense, b.to_dense()) < RTOL


def test_sphere_probes_have_norm_sqrt_p() -> None:
    """Sphere probes of 20 million float32 entries have norm sqrt(P) to 1e-6."""
    dim = 20_000_000
    A = SimpleNamespace(
        shape=(dim, dim), dtype=torch.float32, device=torch.device("cpu")
    )
    probe = _draw_probes(A, 1, torch.Generator().manual_seed(5), "sphere")
    total, _ = _float64_reductions(probe.view(1, -1))
    assert abs(float(total) / dim - 1) < 1e-6
