"""Factor rows of linear layers in Kronecker form (:mod:`curvlinops_fisher.kronecker`).

Every reduction of the Kronecker rows is compared with the same reduction of the
explicit rows (per-data-point VJPs), and the operators' structure results with
``op @ I`` and the ``torch.func`` brute force, in float64. Models for which the form
does not hold (parameters used outside the layer call, data points that interact,
layers called twice or on sequences, tied weights, other layer types) must fall back
to explicit rows and still be exact.
"""

from __future__ import annotations

import pytest
import torch
from problems import LOSSES, REDUCTIONS, make_problem
from reference import assert_matrix_close, dense_ef, dense_ggn, to_dense
from torch import Tensor, nn

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    eigensolvers,
    kronecker,
    structure,
)
from curvlinops_fisher.cached import CachedCurvatureLinearOperator
from curvlinops_fisher.errors import FactorMemoryError
from curvlinops_fisher.kronecker import (
    KroneckerFactor,
    KroneckerRows,
    kronecker_rows,
    linear_layout,
)

KINDS = {
    "ggn": (GGNLinearOperator, {}),
    "ef": (EFLinearOperator, {}),
    "ef-datum": (EFLinearOperator, {"per_datum": True}),
    "mc1": (FisherMCLinearOperator, {"mc_samples": 1}),
    "mc3": (FisherMCLinearOperator, {"mc_samples": 3, "seed": 7}),
}
TOL = {"rtol": 1e-10, "atol": 1e-12}


def build(kind, model, loss_func, params, data, **kwargs):
    cls, extra = KINDS[kind]
    return cls(model, loss_func, params, data, **extra, **kwargs)


def spy_kronecker(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, per batch, whether its rows came in Kronecker form."""
    found: list[bool] = []
    original = structure.kronecker_rows

    def spy(batch, layout):
        rows = original(batch, layout)
        found.append(rows is not None)
        return rows

    monkeypatch.setattr(structure, "kronecker_rows", spy)
    return found


def spy_dense_blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the data points of every group that adds dense blocks in Kronecker form."""
    points: list[int] = []
    original = KroneckerRows.add_upper_dense

    def spy(self, out, chunk_bytes):
        points.append(self.num_points)
        return original(self, out, chunk_bytes)

    monkeypatch.setattr(KroneckerRows, "add_upper_dense", spy)
    return points


# ------------------------------------------------------------- the reductions

REDUCTION_CASES = [
    ("mlp_tanh", loss, reduction) for loss in LOSSES for reduction in REDUCTIONS
] + [
    ("mlp_relu", "ce", "mean"),
    ("dict", "bce", "sum"),
    ("frozen", "ce", "mean"),
    ("subset", "mse", "sum"),
    ("scalar", "bce", "mean"),
]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", REDUCTION_CASES, ids="-".join)
def test_reductions_match_explicit_rows(kind: str, case: tuple[str, str, str]):
    """rows, Gram, U V, U^T W, dense, trace, diagonal: Kronecker == explicit rows."""
    problem = make_problem(*case, layout="unequal")
    op = build(kind, *problem.args(), **problem.kwargs())
    layout = op._structure.linear_layout
    assert layout is not None
    batches = list(op._structure.linearized_batches())
    rows = [kronecker_rows(batch, layout) for batch in batches]
    assert all(r is not None for r in rows)
    explicit = [batch.rows() for batch in batches]
    generator = torch.Generator().manual_seed(1)
    P = op.shape[1]
    V = torch.randn(P, 3, generator=generator, dtype=torch.float64)
    for k_rows, U in zip(rows, explicit):
        torch.testing.assert_close(k_rows.rows(), U, **TOL)
        torch.testing.assert_close(k_rows.product(V), U @ V, **TOL)
        W = torch.randn(U.shape[0], 2, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(k_rows.transpose_product(W), U.mT @ W, **TOL)
        torch.testing.assert_close(k_rows.squared_norm(), U.square().sum(), **TOL)
        torch.testing.assert_close(k_rows.column_squares(), U.square().sum(0), **TOL)
        dense = layout.mirror_upper(k_rows.add_upper_dense(U.new_zeros(P, P), 2**20))
        torch.testing.assert_close(dense, U.mT @ U, **TOL)
    for a in range(len(rows)):
        for b in range(len(rows)):
            torch.testing.assert_close(
                rows[a].gram(rows[b]), explicit[a] @ explicit[b].mT, **TOL
            )


def wide_mlp_rows(kind: str) -> tuple[list[KroneckerRows], list[Tensor]]:
    """Kronecker and explicit rows of a 3-20-7 MLP (outputs that chunk unevenly)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, 7)).double()
    data = [
        (torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 7, (n,)))
        for n in (5, 4, 6)
    ]
    op = build(kind, model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    batches = list(op._structure.linearized_batches())
    rows = [kronecker_rows(batch, op._structure.linear_layout) for batch in batches]
    assert all(r is not None for r in rows)
    return rows, [batch.rows() for batch in batches]


@pytest.mark.parametrize("kind", ["ggn", "mc3"])
@pytest.mark.parametrize("output_chunks", [1, 3, 8, 100])
@pytest.mark.parametrize("chunk_bytes", [1, 700, 2**30])
@pytest.mark.parametrize("tile", [7, 256])
def test_dense_blocks_in_chunks(
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    output_chunks: int,
    chunk_bytes: int,
    tile: int,
):
    """Chunks of outputs and data points, joined batches, mirror tiles: S + U^T U."""
    monkeypatch.setattr(kronecker, "DIAGONAL_OUTPUT_CHUNKS", output_chunks)
    monkeypatch.setattr(kronecker, "_MIRROR_TILE", tile)
    rows, explicit = wide_mlp_rows(kind)
    layout = rows[0].layout
    P = layout.dim
    generator = torch.Generator().manual_seed(0)
    S = torch.randn(P, P, generator=generator, dtype=torch.float64)
    S = S + S.mT
    expected = S + sum(U.mT @ U for U in explicit)
    joined = KroneckerRows.concatenate(rows)
    assert joined.num_rows == sum(U.shape[0] for U in explicit)
    dense = layout.mirror_upper(joined.add_upper_dense(S.clone(), chunk_bytes))
    torch.testing.assert_close(dense, expected, **TOL)
    torch.testing.assert_close(dense, dense.mT, rtol=0, atol=0)
    one_by_one = S.clone()
    for r in rows:
        r.add_upper_dense(one_by_one, chunk_bytes)
    torch.testing.assert_close(layout.mirror_upper(one_by_one), expected, **TOL)


def test_concatenate_needs_equal_rows_per_point():
    """Rows of one data point each and of three each do not join."""
    ggn_rows, _ = wide_mlp_rows("ggn")
    mc_rows, _ = wide_mlp_rows("mc3")
    ef_rows, _ = wide_mlp_rows("ef")
    assert KroneckerRows.concatenate(ggn_rows[:1]) is ggn_rows[0]
    with pytest.raises(ValueError, match="rows per point"):
        KroneckerRows.concatenate([ggn_rows[0], ef_rows[0]])
    assert mc_rows[0].rows_per_point == 3


def test_factor_joins_batches_of_equal_rows_per_point():
    """KroneckerFactor.joined: runs of equal rows per point become one batch."""
    ggn_rows, ggn_explicit = wide_mlp_rows("ggn")
    ef_rows, ef_explicit = wide_mlp_rows("ef")
    parts = [*ggn_rows[:2], *ef_rows, ggn_rows[2]]
    factor = KroneckerFactor.joined(parts)
    assert [r.rows_per_point for r in factor.batches] == [7, 1, 7]
    explicit = torch.cat([*ggn_explicit[:2], *ef_explicit, ggn_explicit[2]])
    torch.testing.assert_close(factor.rows(), explicit, **TOL)
    torch.testing.assert_close(factor.gram(), explicit @ explicit.mT, **TOL)


@pytest.mark.parametrize("min_points", [1, 10**6])
def test_to_dense_one_row_per_point(monkeypatch: pytest.MonkeyPatch, min_points: int):
    """EF: Kronecker blocks from enough points, explicit rows below; both exact."""
    monkeypatch.setattr(kronecker, "KRONECKER_DENSE_MIN_POINTS_ONE_ROW", min_points)
    problem = make_problem("mlp_tanh", "ce", "mean", layout="unequal")
    op = build("ef", *problem.args())
    calls = spy_dense_blocks(monkeypatch)
    dense = op.to_dense()
    assert calls == ([problem.num_data] if min_points == 1 else [])
    brute_force = dense_ef(*problem.args(), num_data=problem.num_data)
    assert_matrix_close(dense, brute_force, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_bytes", [1, 2**30])
def test_to_dense_joins_kronecker_batches(
    monkeypatch: pytest.MonkeyPatch, chunk_bytes: int
):
    """to_dense joins batches up to chunk_bytes of factors; same matrix either way."""
    problem = make_problem("mlp_tanh", "ce", "mean", layout="unequal")
    op = build("ggn", *problem.args())
    joined_sizes = spy_dense_blocks(monkeypatch)
    dense = op.to_dense(chunk_bytes=chunk_bytes)
    sizes = [X.shape[0] for X, _ in problem.batches]
    assert joined_sizes == ([sum(sizes)] if chunk_bytes > 2**20 else sizes)
    brute_force = dense_ggn(*problem.args(), num_data=problem.num_data)
    assert_matrix_close(dense, brute_force, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------ operators end to end


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("loss", LOSSES)
def test_structure_uses_kronecker_rows(
    monkeypatch: pytest.MonkeyPatch, kind: str, loss: str
):
    """to_dense, trace, diagonal and eigh of an MLP take the Kronecker path, exactly."""
    problem = make_problem("mlp_tanh", loss, "sum", layout="unequal")
    op = build(kind, *problem.args())
    found = spy_kronecker(monkeypatch)
    expected = to_dense(op)
    dense = op.to_dense()
    assert_matrix_close(dense, expected)
    torch.testing.assert_close(op.trace(), expected.trace(), **TOL)
    torch.testing.assert_close(op.diagonal(), expected.diagonal(), **TOL)
    values, vectors = op.eigh(3, method="gram")
    reference = torch.linalg.eigvalsh(expected).flip(0)[:3]
    torch.testing.assert_close(values, reference, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(expected @ vectors, vectors * values, **TOL)
    assert found and all(found)


def test_eigh_auto_takes_kronecker_gram(monkeypatch: pytest.MonkeyPatch):
    """With rows in Kronecker form the Gram path is cheap, so 'auto' takes it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 5)).double()
    data = [
        (torch.randn(125, 20, dtype=torch.float64), torch.randint(0, 5, (125,)))
        for _ in range(2)
    ]
    op = EFLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    calls = []
    original = eigensolvers.factor_eigh
    monkeypatch.setattr(
        eigensolvers,
        "factor_eigh",
        lambda rows, k: calls.append((type(rows), k)) or original(rows, k),
    )
    values, vectors = op.eigh(3)
    assert calls == [(KroneckerFactor, 3)]
    dense = op.to_dense()
    torch.testing.assert_close(
        values, torch.linalg.eigvalsh(dense).flip(0)[:3], rtol=1e-9, atol=1e-11
    )


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_holds_kronecker_factor(kind: str):
    """The cached operator keeps the Kronecker form and equals the streaming one."""
    problem = make_problem("mlp_tanh", "ce", "mean", layout="unequal")
    op = build(kind, *problem.args())
    layout = op._structure.linear_layout
    num_rows = sum(op._structure.row_counts())
    needed = num_rows * layout.row_length * 8
    assert needed < num_rows * op.shape[1] * 8
    with pytest.raises(FactorMemoryError):
        op.cached(max_bytes=needed - 1)
    cached = op.cached(max_bytes=needed)
    assert isinstance(cached._U, KroneckerFactor)
    expected = to_dense(op)
    V = torch.randn(op.shape[1], 4, dtype=torch.float64)
    torch.testing.assert_close(cached @ V, op @ V, **TOL)
    torch.testing.assert_close(cached.to_dense(), expected, **TOL)
    torch.testing.assert_close(cached.trace(), expected.trace(), **TOL)
    torch.testing.assert_close(cached.diagonal(), expected.diagonal(), **TOL)
    torch.testing.assert_close(cached.factor(), op.factor(), **TOL)
    values, vectors = cached.eigh(3, method="gram")
    reference = torch.linalg.eigvalsh(expected).flip(0)[:3]
    torch.testing.assert_close(values, reference, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(expected @ vectors, vectors * values, **TOL)
    x = torch.randn(op.shape[1], dtype=torch.float64).numpy()
    numpy_product = cached.to_scipy() @ x
    torch.testing.assert_close(
        torch.as_tensor(numpy_product), expected @ torch.as_tensor(x), **TOL
    )


def test_cached_rejects_mismatched_kronecker_factor():
    problem = make_problem("mlp_tanh", "ce", "mean", layout="unequal")
    op = build("ef", *problem.args())
    factor = op._structure.kronecker_factor()
    with pytest.raises(ValueError, match="Kronecker factor has P"):
        CachedCurvatureLinearOperator(factor, [(3,)])


# ------------------------------------------------------------- fall-backs


class _WeightUsedTwice(nn.Module):
    """Uses ``first.weight`` outside ``first``'s call too (on odd-sized batches only)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.first(x)
        if x.shape[0] % 2:
            h = h + 0.5 * torch.tanh(x @ self.first.weight.mT)
        return self.second(torch.tanh(h))


class _BatchCentered(nn.Module):
    """Mixes the data points: subtracts the batch mean of a hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.first(x))
        return self.second(h - h.mean(0, keepdim=True))


class _CalledTwice(nn.Module):
    """Applies one layer twice."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.second = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(torch.tanh(self.first(x)))))


class _Tied(nn.Module):
    """Two layers that share their weight."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.second = nn.Linear(3, 3)
        self.second.weight = self.first.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(x)))


class _MyLinear(nn.Linear):
    """A subclass of ``nn.Linear`` with its own forward."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2.0


def _data(sizes=(4, 3, 4), features=3, classes=2) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(n, features, generator=generator, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=generator),
        )
        for n in sizes
    ]


@pytest.mark.parametrize("kind", list(KINDS))
def test_weight_used_outside_the_layer_falls_back(
    monkeypatch: pytest.MonkeyPatch, kind: str
):
    """Odd batches use a weight outside its layer: those batches take explicit rows.

    The batches alternate between the two forms, so the dense matrix's upper block
    triangle (Kronecker blocks) is completed before each explicit Gram product.
    """
    torch.manual_seed(0)
    model = _WeightUsedTwice().double()
    op = build(kind, model, nn.CrossEntropyLoss(), list(model.parameters()), _data())
    found = spy_kronecker(monkeypatch)
    expected = to_dense(op)
    assert_matrix_close(op.to_dense(), expected)
    assert found == [True, False, True]
    torch.testing.assert_close(op.trace(), expected.trace(), **TOL)
    torch.testing.assert_close(op.diagonal(), expected.diagonal(), **TOL)
    values, _ = op.eigh(2, method="gram")
    reference = torch.linalg.eigvalsh(expected).flip(0)[:2]
    torch.testing.assert_close(values, reference, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_interacting_data_points_fall_back(monkeypatch: pytest.MonkeyPatch, kind):
    """A model that mixes data points fails the check on every batch."""
    torch.manual_seed(0)
    model = _BatchCentered().double()
    op = build(kind, model, nn.CrossEntropyLoss(), list(model.parameters()), _data())
    found = spy_kronecker(monkeypatch)
    assert_matrix_close(op.to_dense(), to_dense(op))
    assert found == [False, False, False]


def test_layer_called_twice_falls_back(monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    model = _CalledTwice().double()
    op = build("ggn", model, nn.CrossEntropyLoss(), list(model.parameters()), _data())
    found = spy_kronecker(monkeypatch)
    assert_matrix_close(op.to_dense(), to_dense(op))
    assert found == [False, False, False]


def test_sequence_inputs_fall_back(monkeypatch: pytest.MonkeyPatch):
    """A linear layer on (N, T, D) inputs has a sum of Kronecker products per row."""
    problem = make_problem("seq", "ce", "mean", layout="unequal")
    op = build("ggn", *problem.args())
    assert op._structure.linear_layout is not None
    found = spy_kronecker(monkeypatch)
    assert_matrix_close(op.to_dense(), to_dense(op))
    assert found and not any(found)


def test_layouts():
    """Only untied parameters of plain nn.Linear layers have a layout."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = [mlp[2].bias, mlp[0].weight]  # any order, any subset
    layout = linear_layout(mlp, params)
    assert layout.slots == ((0, False), (1, True))
    assert layout.layers == (mlp[2], mlp[0])
    assert layout.dim == 2 + 12 and layout.row_length == (2 + 1) + (4 + 3)
    tied = _Tied()
    assert linear_layout(tied, list(tied.parameters())) is None
    custom = nn.Sequential(_MyLinear(3, 2))
    assert linear_layout(custom, list(custom.parameters())) is None
    conv = make_problem("conv", "ce", "mean", layout="single")
    assert linear_layout(conv.model, conv.params) is None
    assert linear_layout(mlp, []) is None


def test_float32_check_passes():
    """The consistency check's float32 tolerance accepts a float32 MLP's rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    data = [(torch.randn(64, 10), torch.randint(0, 4, (64,)))]
    op = GGNLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    (batch,) = op._structure.linearized_batches()
    rows = kronecker_rows(batch, op._structure.linear_layout)
    assert isinstance(rows, KroneckerRows)
    torch.testing.assert_close(rows.rows(), batch.rows(), rtol=1e-4, atol=1e-6)
    assert kronecker.CHECK_RTOL[4] >= 1e-5
