"""Exact structure from the factor U: dense matrix, trace, diagonal, eigh, cached mode.

Ground truth: ``op @ I`` (tested against ``torch.func`` elsewhere) and the independent
``torch.func`` brute force of :mod:`reference`, both in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy
import pytest
import torch
from problems import LOSSES, REDUCTIONS, Problem, make_problem
from reference import (
    assert_matrix_close,
    dense_ef,
    dense_fisher_mc,
    dense_ggn,
    to_dense,
)
from scipy.sparse.linalg import eigsh
from torch import Tensor

from curvlinops_fisher import (
    CurvatureLinearOperator,
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    PyTorchLinearOperator,
    eigensolvers,
)
from curvlinops_fisher.accumulation import GRAM_TRIANGLE_MIN_DIM, add_gram
from curvlinops_fisher.cached import CachedCurvatureLinearOperator
from curvlinops_fisher.errors import FactorMemoryError
from curvlinops_fisher.rows import LinearizedBatch

#: Operator class, brute-force reference, constructor/reference keyword arguments.
KINDS: dict[str, tuple[type, Callable[..., Tensor], dict[str, Any]]] = {
    "ggn": (GGNLinearOperator, dense_ggn, {}),
    "ef": (EFLinearOperator, dense_ef, {}),
    "mc1": (FisherMCLinearOperator, dense_fisher_mc, {"mc_samples": 1}),
    "mc3": (FisherMCLinearOperator, dense_fisher_mc, {"mc_samples": 3, "seed": 7}),
}
#: (model, loss, reduction, layout): every loss and reduction with one batch and
#: unequal batches, plus sequence outputs ((N, T, C); CE: (N, C, T)), a
#: segmentation output, dict inputs, a DataLoader and eval-mode BatchNorm.
CASES = (
    [
        ("mlp_tanh", loss, reduction, layout)
        for loss in LOSSES
        for reduction in REDUCTIONS
        for layout in ("single", "unequal")
    ]
    + [("seq", loss, "mean", "unequal") for loss in LOSSES]
    + [
        ("seq", "ce", "sum", "single"),
        ("conv_seg", "ce", "mean", "loader"),
        ("dict", "bce", "sum", "unequal"),
        ("mlp_bn", "mse", "mean", "unequal"),
    ]
)
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _ids(case: tuple[Any, ...]) -> str:
    return "-".join(str(c) for c in case)


def build(kind: str, problem: Problem) -> CurvatureLinearOperator:
    cls, _, kwargs = KINDS[kind]
    return cls(*problem.args(), **problem.kwargs(), **kwargs)


def reference(kind: str, problem: Problem) -> Tensor:
    _, ref, kwargs = KINDS[kind]
    return ref(*problem.args(), **problem.kwargs(), **kwargs)


def rows_per_datum(kind: str, problem: Problem) -> int:
    """``T R`` per datum: terms per datum times the columns of the output factor."""
    C = problem.out_shape[0] if problem.loss_name == "ce" else problem.out_shape[-1]
    R = {"ggn": C, "ef": 1, "mc1": 1, "mc3": 3}[kind]
    return problem.terms_per_datum * R


def batch_sizes(problem: Problem) -> list[int]:
    size = problem.batch_size_fn or (lambda X: X.shape[0])
    return [size(X) for X, _ in problem.batches]


def top_eigenvalues(A: Tensor, k: int) -> Tensor:
    values = numpy.linalg.eigh(A.numpy())[0]
    return torch.as_tensor(values[::-1][:k].copy())


def assert_eigenpairs(A: Tensor, values: Tensor, vectors: Tensor, k: int) -> None:
    """Eigenvalues match numpy's top k; ``A v = lambda v``; orthonormal columns."""
    scale = float(A.abs().max())
    assert values.shape == (k,) and vectors.shape == (A.shape[0], k)
    assert bool((values[:-1] >= values[1:]).all())
    torch.testing.assert_close(
        values, top_eigenvalues(A, k), rtol=1e-9, atol=1e-10 * scale
    )
    torch.testing.assert_close(A @ vectors, vectors * values, rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(
        vectors.T @ vectors, torch.eye(k, dtype=A.dtype), rtol=0, atol=1e-10
    )


# ----------------------------------------------------------------- exactness


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("kind", list(KINDS))
def test_exact_structure(kind: str, case: tuple[str, str, str, str]) -> None:
    """Factor, dense matrix, trace and diagonal equal ``op @ I`` and brute force."""
    problem = make_problem(*case)
    op = build(kind, problem)
    brute_force = reference(kind, problem)
    dense = to_dense(op)
    assert_matrix_close(dense, brute_force)

    U = op.factor()
    blocks = list(op.factor_batches())
    expected_rows = [n * rows_per_datum(kind, problem) for n in batch_sizes(problem)]
    assert [b.shape for b in blocks] == [(n, problem.dim) for n in expected_rows]
    assert U.shape == (sum(expected_rows), problem.dim)
    torch.testing.assert_close(torch.cat(blocks), U, rtol=0, atol=0)
    assert_matrix_close(U.T @ U, dense)

    assert_matrix_close(op.to_dense(), dense)
    assert_matrix_close(op.to_dense(), brute_force)
    trace = op.trace()
    assert trace.shape == () and trace.dtype == op.dtype
    torch.testing.assert_close(trace, dense.trace(), **TOL)
    torch.testing.assert_close(trace, brute_force.trace(), **TOL)
    torch.testing.assert_close(op.diagonal(), dense.diagonal(), **TOL)
    torch.testing.assert_close(op.diagonal(), brute_force.diagonal(), **TOL)


@pytest.mark.parametrize("case", CASES[:6] + CASES[12:16], ids=_ids)
@pytest.mark.parametrize("kind", list(KINDS))
def test_eigh(kind: str, case: tuple[str, str, str, str]) -> None:
    """Gram and eigsh paths agree with numpy's eigendecomposition of brute force."""
    problem = make_problem(*case)
    op = build(kind, problem)
    brute_force = reference(kind, problem)
    k = 4
    for method in ("auto", "gram", "eigsh"):
        values, vectors = op.eigh(k, method=method)
        assert_eigenpairs(brute_force, values, vectors, k)


# ----------------------------------------------------------- eigh: the paths


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of a function of :mod:`eigensolvers`."""
    calls: list[int] = []
    original = getattr(eigensolvers, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(eigensolvers, name, wrapped)
    return calls


def test_eigh_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """'auto' picks the Gram path for short factors; held, streamed and eigsh agree."""
    problem = make_problem("mlp_tanh", "ce", "mean", "unequal")
    op = build("ef", problem)  # n = 10 rows, P = 43
    op._structure.linear_layout = None  # explicit rows (Kronecker: test_kronecker)
    n, P = 10, problem.dim
    brute_force = reference("ef", problem)
    gram, held, lanczos = (
        _spy(monkeypatch, name) for name in ("gram_eigh", "factor_eigh", "eigsh_top")
    )
    k = 5

    results = {"auto": op.eigh(k)}
    assert (len(gram), len(held), len(lanczos)) == (1, 1, 0)
    # Gram matrix fits, U does not: Gram blocks from recomputed batches
    results["streamed"] = op.eigh(k, max_bytes=n * n * 8 + 1)
    assert (len(gram), len(held), len(lanczos)) == (2, 1, 0)
    # Gram matrix does not fit either: eigsh
    results["small budget"] = op.eigh(k, max_bytes=n * n * 8 - 1)
    assert (len(gram), len(held), len(lanczos)) == (2, 1, 1)
    results["eigsh"] = op.eigh(k, method="eigsh")
    results["forced gram"] = op.eigh(k, method="gram", max_bytes=0)
    assert (len(gram), len(held), len(lanczos)) == (3, 1, 2)

    for values, vectors in results.values():
        assert_eigenpairs(brute_force, values, vectors, k)
    reference_values = results["eigsh"][0]
    for values, _ in results.values():
        torch.testing.assert_close(values, reference_values, rtol=1e-10, atol=1e-12)
    assert P > 2 * n


def test_eigh_auto_prefers_eigsh_for_long_factors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With more than P / 2 rows, 'auto' uses eigsh."""
    problem = make_problem("mlp_tanh", "mse", "sum", "unequal")
    op = build("ggn", problem)  # n = 30 rows > P / 2
    lanczos = _spy(monkeypatch, "eigsh_top")
    assert_eigenpairs(reference("ggn", problem), *op.eigh(3), 3)
    assert len(lanczos) == 1


@pytest.mark.parametrize("method", ["gram", "auto"])
def test_eigh_beyond_rank(method: str) -> None:
    """k > rank: zero eigenvalues with an orthonormal completion in the null space."""
    problem = make_problem("mlp_tanh", "bce", "mean", "single")
    op = build("ef", problem)  # 6 rows: rank <= 6
    brute_force = reference("ef", problem)
    k = 9
    values, vectors = op.eigh(k, method=method)
    assert_eigenpairs(brute_force, values, vectors, k)
    assert bool((values[6:] == 0).all())
    # all eigenpairs (k = P) through the Gram path
    values, vectors = op.eigh(problem.dim, method="gram")
    assert_eigenpairs(brute_force, values, vectors, problem.dim)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 3, 7, 8, 11])
def test_top_eigh_subset_matches_full(dtype: torch.dtype, k: int) -> None:
    """LAPACK's subset eigensolver (k < n on the CPU) equals the full eigh's top k."""
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    gram = (A @ A.mT).to(dtype)  # rank 5: three zero eigenvalues
    values, W = eigensolvers._top_eigh(gram, k)
    full_values, full_W = torch.linalg.eigh(gram)
    m = min(k, 8)
    assert values.shape == (m,) and W.shape == (8, m)
    assert values.dtype == dtype and W.dtype == dtype
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {}
    torch.testing.assert_close(values, full_values.flip(0)[:m], **tol)
    assert bool((values[:-1] >= values[1:]).all())
    torch.testing.assert_close(gram @ W[:, :5], W[:, :5] * values[:5], **tol)
    torch.testing.assert_close(W.mT @ W, torch.eye(m, dtype=dtype), **tol)


def test_eigh_invalid_arguments() -> None:
    problem = make_problem("mlp_tanh", "mse", "mean", "single")
    op = build("ggn", problem)
    P = problem.dim
    for k in (0, -1, P + 1, 1.0, True, None):
        with pytest.raises(ValueError, match="1 <= k <= P"):
            op.eigh(k)
    with pytest.raises(ValueError, match="method"):
        op.eigh(2, method="lobpcg")
    with pytest.raises(ValueError, match="eigsh needs k < P"):
        op.eigh(P, method="eigsh")
    with pytest.raises(ValueError, match="eigsh needs k < P"):
        op.cached().eigh(P, method="eigsh")


# -------------------------------------------------------------------- cached


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_matches_streaming(kind: str) -> None:
    """Cached products (vector, matrix, list formats) equal streaming ones."""
    problem = make_problem("seq", "ce", "mean", "unequal")
    op = build(kind, problem)
    cached = op.cached()
    assert isinstance(cached, CachedCurvatureLinearOperator)
    assert isinstance(cached, PyTorchLinearOperator)
    assert cached.SELF_ADJOINT and cached.adjoint() is cached
    assert (cached.shape, cached.dtype, cached.device) == (
        op.shape,
        op.dtype,
        op.device,
    )
    generator = torch.Generator().manual_seed(3)
    P = problem.dim
    v = torch.randn(P, generator=generator, dtype=op.dtype)
    M = torch.randn(P, 4, generator=generator, dtype=op.dtype)
    v_list = [
        torch.randn(p.shape, generator=generator, dtype=op.dtype)
        for p in problem.params
    ]
    M_list = [
        torch.randn(*p.shape, 4, generator=generator, dtype=op.dtype)
        for p in problem.params
    ]
    for X in (v, M):
        torch.testing.assert_close(cached @ X, op @ X, **TOL)
    for X in (v_list, M_list):
        for a, b in zip(cached @ X, op @ X):
            torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(M.T @ cached, (op @ M).T, **TOL)

    dense = to_dense(op)
    torch.testing.assert_close(cached.factor(), op.factor(), rtol=0, atol=0)
    assert_matrix_close(cached.to_dense(), dense)
    assert_matrix_close(to_dense(cached), dense)
    torch.testing.assert_close(cached.trace(), op.trace(), **TOL)
    torch.testing.assert_close(cached.diagonal(), op.diagonal(), **TOL)
    for method in ("auto", "gram", "eigsh"):
        assert_eigenpairs(dense, *cached.eigh(3, method=method), 3)


def test_cached_to_scipy_eigsh() -> None:
    problem = make_problem("mlp_tanh", "ce", "sum", "unequal")
    op = build("ggn", problem)
    brute_force = reference("ggn", problem)
    values = eigsh(op.cached().to_scipy(), k=4, which="LA")[0]
    torch.testing.assert_close(
        torch.as_tensor(numpy.sort(values)[::-1].copy()),
        top_eigenvalues(brute_force, 4),
        rtol=1e-9,
        atol=1e-12,
    )


def test_cached_max_bytes() -> None:
    problem = make_problem("mlp_tanh", "mse", "mean", "unequal")
    op = build("ggn", problem)
    op._structure.linear_layout = None  # explicit rows (Kronecker: test_kronecker)
    needed = 30 * problem.dim * 8  # 30 rows of P float64 entries
    with pytest.raises(FactorMemoryError, match=f"needs {needed} bytes") as info:
        op.cached(max_bytes=needed - 1)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ValueError)
    assert info.value.needed_bytes == needed
    assert op.cached(max_bytes=needed).factor().shape == (30, problem.dim)


# ------------------------------------------------------------------ chunking


@pytest.mark.parametrize("kind", ["ggn", "mc3"])
def test_tiny_chunks(kind: str) -> None:
    """One row (and one identity column) per chunk gives the same results."""
    problem = make_problem("seq", "mse", "sum", "unequal")  # a batch has T R > P
    op = build(kind, problem)
    tiny = {"chunk_bytes": 1}
    torch.testing.assert_close(op.factor(**tiny), op.factor(), **TOL)
    for a, b in zip(op.factor_batches(**tiny), op.factor_batches()):
        torch.testing.assert_close(a, b, **TOL)
    assert_matrix_close(op.to_dense(**tiny), op.to_dense())
    assert_matrix_close(op.to_dense(**tiny), to_dense(op))
    torch.testing.assert_close(op.trace(**tiny), op.trace(), **TOL)
    torch.testing.assert_close(op.diagonal(**tiny), op.diagonal(), **TOL)
    values, _ = op.eigh(3, method="gram", max_bytes=0, **tiny)
    torch.testing.assert_close(values, op.eigh(3, method="eigsh")[0], **TOL)


# ---------------------------------------------------------------- MC Fisher


def test_mc_factor_is_the_product_sample() -> None:
    """The factor is the seeded sample of the products, whatever was computed before."""
    problem = make_problem("conv_seg", "ce", "mean", "unequal")
    op = FisherMCLinearOperator(*problem.args(), seed=123, mc_samples=2)
    U = op.factor()
    v = torch.ones(problem.dim, dtype=op.dtype)
    op @ v
    torch.testing.assert_close(op.factor(), U, rtol=0, atol=0)
    dense = to_dense(op)
    assert_matrix_close(op.to_dense(), dense)
    torch.testing.assert_close(op.trace(), dense.trace(), **TOL)
    # a product run while a pass is consumed does not disturb the pass's sample
    interleaved = []
    for block in op.factor_batches():
        op @ v
        interleaved.append(block)
    torch.testing.assert_close(torch.cat(interleaved), U, rtol=0, atol=0)
    op._seed = 124
    other = to_dense(op)
    assert float((other - dense).abs().max()) > 1e-3
    assert_matrix_close(op.to_dense(), other)


# ------------------------------------------------------------------- float32


@pytest.mark.parametrize("kind", ["ggn", "mc3"])
def test_float32(kind: str) -> None:
    problem = make_problem("mlp_tanh", "ce", "mean", "unequal", dtype=torch.float32)
    op = build(kind, problem)
    dense = to_dense(op)
    for result in (op.to_dense(), op.factor().T @ op.factor()):
        assert result.dtype == torch.float32
        torch.testing.assert_close(result, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(op.trace(), dense.trace(), rtol=1e-5, atol=1e-6)
    values, vectors = op.eigh(3, method="gram")
    assert values.dtype == vectors.dtype == torch.float32
    torch.testing.assert_close(
        values, top_eigenvalues(dense.double(), 3).float(), rtol=1e-4, atol=1e-5
    )


# --------------------------------------------------------------- attention


def test_causal_transformer() -> None:
    """Batched VJPs through attention (math kernels) give the exact structure."""
    from test_attention_models import SEQ, VOCAB, TinyCausalLM

    torch.manual_seed(0)
    model = TinyCausalLM().double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    data = [
        (torch.randint(0, VOCAB, (n, SEQ)), torch.randint(0, VOCAB, (n, SEQ)))
        for n in (2, 3)
    ]
    op = GGNLinearOperator(model, torch.nn.CrossEntropyLoss(), params, data)
    dense = op.to_dense()  # checked against products (op @ I would take seconds)
    V = torch.randn(op.shape[1], 8, dtype=torch.float64)
    torch.testing.assert_close(dense @ V, op @ V, **TOL)
    assert op.factor().shape == (5 * SEQ * VOCAB, op.shape[1])
    torch.testing.assert_close(op.trace(), dense.trace(), **TOL)
    torch.testing.assert_close(op.diagonal(), dense.diagonal(), **TOL)
    assert_eigenpairs(dense, *op.eigh(3, method="gram"), 3)


@pytest.mark.parametrize(
    ("dim", "blocks"),
    [(23, None), (23, 1), (23, 2), (23, 3), (23, 8), (23, 50)]
    + [(GRAM_TRIANGLE_MIN_DIM + 3, None)],
)
def test_add_gram_lower_triangle_blocks(dim, blocks) -> None:
    """Block-triangular Gram accumulation equals U^T U (chunks, repeated calls)."""
    generator = torch.Generator().manual_seed(0)
    U = torch.randn(37, dim, generator=generator, dtype=torch.float64)
    V = torch.randn(5, dim, generator=generator, dtype=torch.float64)
    out = torch.zeros(dim, dim, dtype=torch.float64)
    add_gram([U[:20], U[20:]], out=out, blocks=blocks)
    add_gram([V], out=out, blocks=blocks)
    assert_matrix_close(out, U.T @ U + V.T @ V, rtol=1e-13, atol=1e-13)


class _BatchCentered(torch.nn.Module):
    """Mixes the data points of a batch: subtracts the batch mean of a layer's output."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(3, 4)
        self.second = torch.nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.first(x))
        return self.second(h - h.mean(0, keepdim=True))


def _count_row_paths(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the rows computed per data point and with whole-batch cotangents."""
    calls = {"per_data_point": 0, "whole_batch": 0}
    per_point = LinearizedBatch._per_sample_rows
    whole = LinearizedBatch._rows_between

    def count_per_point(self, *args, **kwargs):
        rows = per_point(self, *args, **kwargs)
        calls["per_data_point"] += rows is not None
        return rows

    def count_whole(self, *args, **kwargs):
        calls["whole_batch"] += 1
        return whole(self, *args, **kwargs)

    monkeypatch.setattr(LinearizedBatch, "_per_sample_rows", count_per_point)
    monkeypatch.setattr(LinearizedBatch, "_rows_between", count_whole)
    return calls


@pytest.mark.parametrize("kind", list(KINDS))
def test_rows_per_data_point_for_independent_data_points(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Models that treat data points independently get their rows per data point."""
    calls = _count_row_paths(monkeypatch)
    problem = make_problem("seq", "ce", "mean", "unequal")
    op = build(kind, problem)
    assert_matrix_close(op.to_dense(), to_dense(op))
    assert calls["per_data_point"] > 0 and calls["whole_batch"] == 0


@pytest.mark.parametrize("kind", list(KINDS))
def test_rows_fall_back_when_data_points_interact(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A model that mixes the data points of a batch gets whole-batch cotangents."""
    torch.manual_seed(0)
    model = _BatchCentered().double()
    data = [
        (torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 2, (n,)))
        for n in (4, 3)
    ]
    cls, _, kwargs = KINDS[kind]
    op = cls(
        model, torch.nn.CrossEntropyLoss(), list(model.parameters()), data, **kwargs
    )
    calls = _count_row_paths(monkeypatch)
    dense = op.to_dense()
    assert_matrix_close(dense, to_dense(op))
    torch.testing.assert_close(op.trace(), dense.trace(), **TOL)
    assert calls["whole_batch"] > 0 and calls["per_data_point"] == 0


def test_eigh_auto_weighs_flops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A short factor with many rows next to a cheap forward pass goes to eigsh.

    MLP 20-20-5 (P = 525) on 250 points, EF: n = 250 <= P / 2, but the Gram matrix
    (n^2 P) costs more than Lanczos's products (about 30 * 3 N f, f = 2 P per point).
    Forcing the Gram path gives the same eigenpairs.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 20), torch.nn.Tanh(), torch.nn.Linear(20, 5)
    ).double()
    data = [
        (torch.randn(125, 20, dtype=torch.float64), torch.randint(0, 5, (125,)))
        for _ in range(2)
    ]
    op = EFLinearOperator(
        model, torch.nn.CrossEntropyLoss(), list(model.parameters()), data
    )
    # explicit rows; in Kronecker form the Gram path wins (test_kronecker)
    op._structure.linear_layout = None
    gram, lanczos = (_spy(monkeypatch, name) for name in ("factor_eigh", "eigsh_top"))
    dense = op.to_dense()
    values, vectors = op.eigh(3)
    assert (len(gram), len(lanczos)) == (0, 1)
    assert_eigenpairs(dense, values, vectors, 3)
    forced_values, _ = op.eigh(3, method="gram")
    assert len(gram) == 1
    torch.testing.assert_close(forced_values, values, rtol=1e-9, atol=1e-12)
    assert eigensolvers.prefer_gram(250, 525, 8, 2**30) is True  # size rule alone
