"""Tests for ``curvlinops_fisher.estimators`` (trace, diagonal, Frobenius norm).

Statistical checks are deterministic: each averages ``R`` estimates drawn with the
fixed seeds ``0, ..., R - 1`` and compares the mean to the truth with a tolerance of
six standard errors computed from the same samples.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from curvlinops_fisher import (
    GGNLinearOperator,
    IdentityLinearOperator,
    PyTorchLinearOperator,
)
from curvlinops_fisher.estimators import (
    hutchinson_diag,
    hutchinson_squared_fro,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xtrace,
)

DT = torch.float64
P = 30
Estimator = Callable[..., Tensor]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run this module single-threaded: the problems are tiny, threads only compete."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


class DenseOperator(PyTorchLinearOperator):
    """A dense matrix ``[P_out, P_in]`` as operator (one flat tensor per side)."""

    def __init__(self, A: Tensor):
        super().__init__([(A.shape[1],)], [(A.shape[0],)])
        self._A = A

    @property
    def dtype(self) -> torch.dtype:
        return self._A.dtype

    @property
    def device(self) -> torch.device:
        return self._A.device

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        return [self._A @ M[0]]

    def _adjoint(self) -> DenseOperator:
        return DenseOperator(self._A.T)


class CountingOperator(PyTorchLinearOperator):
    """Wrap an operator; record the input of every call (its adjoint shares the log)."""

    def __init__(self, op: PyTorchLinearOperator, log: list[Tensor] | None = None):
        super().__init__(op._in_shape, op._out_shape)
        self._op = op
        self.inputs: list[Tensor] = [] if log is None else log

    @property
    def dtype(self) -> torch.dtype:
        return self._op.dtype

    @property
    def device(self) -> torch.device:
        return self._op.device

    @property
    def columns(self) -> list[int]:
        """Number of columns ``K`` of each call."""
        return [X.shape[1] for X in self.inputs]

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        X = torch.cat([m.reshape(-1, m.shape[-1]) for m in M])
        self.inputs.append(X.clone())
        return [self._op @ X]

    def _adjoint(self) -> CountingOperator:
        return CountingOperator(self._op.adjoint(), self.inputs)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_matrix(seed: int, rows: int = P, cols: int = P) -> Tensor:
    return torch.randn(rows, cols, dtype=DT, generator=gen(seed))


def psd_matrix(seed: int = 0) -> Tensor:
    X = random_matrix(seed)
    return X @ X.T / P + 0.1 * torch.eye(P, dtype=DT)


def decaying_matrix(seed: int = 0, dim: int = 40, rate: float = 0.5) -> Tensor:
    """Symmetric PSD matrix with eigenvalues ``rate ** j`` and random eigenvectors."""
    Q, _ = torch.linalg.qr(random_matrix(seed, dim, dim))
    return (Q * rate ** torch.arange(dim, dtype=DT)) @ Q.T


def dense(op: PyTorchLinearOperator) -> Tensor:
    return op @ torch.eye(op.shape[1], dtype=op.dtype, device=op.device)


# name -> (estimator, quantity, a small budget)
ESTIMATORS: dict[str, tuple[Estimator, str, int]] = {
    "hutchinson_trace": (hutchinson_trace, "trace", 4),
    "hutchpp_trace": (hutchpp_trace, "trace", 6),
    "xtrace": (xtrace, "trace", 8),
    "hutchinson_diag": (hutchinson_diag, "diag", 4),
    "xdiag": (xdiag, "diag", 8),
    "hutchinson_squared_fro": (hutchinson_squared_fro, "fro", 4),
}
SQUARE_ONLY = [name for name, (_, q, _) in ESTIMATORS.items() if q != "fro"]
TRACES = ["hutchinson_trace", "hutchpp_trace", "xtrace"]


def truth(A: Tensor, quantity: str) -> Tensor:
    if quantity == "trace":
        return A.trace()
    if quantity == "diag":
        return A.diagonal()
    return A.square().sum()


def assert_unbiased(
    estimator: Estimator,
    op: PyTorchLinearOperator,
    num_matvecs: int,
    target: Tensor,
    repeats: int,
) -> None:
    """Mean of ``repeats`` seeded estimates within 6 standard errors of ``target``."""
    estimates = torch.stack(
        [estimator(op, num_matvecs, gen(seed)) for seed in range(repeats)]
    )
    mean = estimates.mean(0)
    stderr = estimates.std(0) / repeats**0.5
    tol = 6 * stderr + 1e-10 * target.abs().max()
    assert ((mean - target).abs() <= tol).all(), (mean, target, stderr)
    # the check has power: the estimator is random, and the bound is not vacuous
    assert stderr.max() > 0
    assert 6 * stderr.max() < 0.5 * target.abs().max()


# Unbiasedness


@pytest.mark.parametrize("kind", ["psd", "nonsymmetric"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_unbiased_dense(name: str, kind: str) -> None:
    estimator, quantity, num_matvecs = ESTIMATORS[name]
    A = psd_matrix() if kind == "psd" else random_matrix(1) + 3 * torch.eye(P, dtype=DT)
    if quantity == "fro" and kind == "nonsymmetric":
        A = random_matrix(2, 11, 15)  # non-square
    assert_unbiased(
        estimator, DenseOperator(A), num_matvecs, truth(A, quantity), repeats=400
    )


def tiny_ggn() -> GGNLinearOperator:
    """GGN of a 3-6-2 tanh MLP (P = 38) with MSE on 8 points (rank <= 16)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)
    X, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT)
    params = [p for p in model.parameters() if p.requires_grad]
    return GGNLinearOperator(
        model, nn.MSELoss(), params, [(X[:5], y[:5]), (X[5:], y[5:])]
    )


@pytest.fixture(scope="module")
def ggn() -> tuple[GGNLinearOperator, Tensor]:
    op = tiny_ggn()
    return op, dense(op)


@pytest.mark.parametrize("name", SQUARE_ONLY + ["hutchinson_squared_fro"])
def test_unbiased_curvature(name: str, ggn: tuple[GGNLinearOperator, Tensor]) -> None:
    estimator, quantity, num_matvecs = ESTIMATORS[name]
    op, A = ggn
    assert_unbiased(estimator, op, num_matvecs, truth(A, quantity), repeats=100)


def composites() -> dict[str, tuple[PyTorchLinearOperator, Tensor]]:
    A = psd_matrix()
    op = DenseOperator(A)
    identity = IdentityLinearOperator(P, dtype=DT)
    return {
        "damped": (op + 0.5 * identity, A + 0.5 * torch.eye(P, dtype=DT)),
        "squared": (op @ op, A @ A),
    }


@pytest.mark.parametrize("composite", ["damped", "squared"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_unbiased_composite(name: str, composite: str) -> None:
    estimator, quantity, num_matvecs = ESTIMATORS[name]
    op, A = composites()[composite]
    assert_unbiased(estimator, op, num_matvecs, truth(A, quantity), repeats=100)


# Exactness


@pytest.mark.parametrize("extra", [0, 2])
@pytest.mark.parametrize("kind", ["psd", "nonsymmetric", "damped", "squared"])
@pytest.mark.parametrize("name", ["xtrace", "xdiag"])
def test_exchangeable_exact(name: str, kind: str, extra: int) -> None:
    """XTrace/XDiag are exact for ``num_matvecs / 2 >= P``."""
    estimator, quantity, _ = ESTIMATORS[name]
    if kind in ("damped", "squared"):
        op, A = composites()[kind]
    else:
        A = psd_matrix() if kind == "psd" else random_matrix(1)
        op = DenseOperator(A)
    for seed in range(3):
        estimate = estimator(op, 2 * P + extra, gen(seed))
        torch.testing.assert_close(estimate, truth(A, quantity), rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", ["xtrace", "xdiag"])
def test_exchangeable_exact_low_rank(
    name: str, ggn: tuple[GGNLinearOperator, Tensor]
) -> None:
    """On a rank-deficient GGN, ``num_matvecs / 2 > rank`` suffices for exactness."""
    estimator, quantity, _ = ESTIMATORS[name]
    op, A = ggn
    rank = int(torch.linalg.matrix_rank(A))
    assert rank < op.shape[0] // 2
    for num_matvecs in (2 * rank + 2, 2 * op.shape[0]):
        estimate = estimator(op, num_matvecs, gen(0))
        torch.testing.assert_close(estimate, truth(A, quantity), rtol=0, atol=1e-8)


@pytest.mark.parametrize("extra", [0, 1, 2])
def test_hutchpp_exact(extra: int) -> None:
    """Hutch++ is exact for ``num_matvecs / 3 >= P``."""
    A = psd_matrix()
    estimate = hutchpp_trace(DenseOperator(A), 3 * P + extra, gen(0))
    torch.testing.assert_close(estimate, A.trace(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("num_matvecs", [1, 3])
@pytest.mark.parametrize("name", ["hutchinson_trace", "hutchinson_diag"])
def test_hutchinson_exact_for_diagonal(name: str, num_matvecs: int) -> None:
    estimator, quantity, _ = ESTIMATORS[name]
    A = torch.diag(torch.randn(P, dtype=DT, generator=gen(0)))
    estimate = estimator(DenseOperator(A), num_matvecs, gen(1))
    torch.testing.assert_close(estimate, truth(A, quantity), rtol=0, atol=1e-12)


# Agreement with the naive (leave-one-out) definitions


def naive_leave_one_out_bases(Y: Tensor) -> list[Tensor]:
    """Orthonormal bases of ``Y`` without column ``i``, for every ``i``."""
    m = Y.shape[1]
    return [torch.linalg.qr(Y[:, [j for j in range(m) if j != i]]).Q for i in range(m)]


def naive_xtrace(A: Tensor, Omega: Tensor) -> Tensor:
    n, m = Omega.shape
    estimates = []
    for i, Qi in enumerate(naive_leave_one_out_bases(A @ Omega)):
        x = Omega[:, i] - Qi @ (Qi.T @ Omega[:, i])
        hutch = (n - Qi.shape[1]) * (x @ A @ x) / (x @ x)
        estimates.append((Qi.T @ A @ Qi).trace() + hutch)
    return torch.stack(estimates).mean()


def naive_xdiag(A: Tensor, Omega: Tensor) -> Tensor:
    estimates = []
    for i, Qi in enumerate(naive_leave_one_out_bases(A @ Omega)):
        projector = Qi @ Qi.T
        deflated = A @ Omega[:, i] - projector @ A @ Omega[:, i]
        estimates.append((projector @ A).diagonal() + Omega[:, i] * deflated)
    return torch.stack(estimates).mean(0)


@pytest.mark.parametrize("kind", ["psd", "nonsymmetric"])
@pytest.mark.parametrize(
    "estimator, naive", [(xtrace, naive_xtrace), (xdiag, naive_xdiag)]
)
def test_exchangeable_matches_naive(
    estimator: Estimator, naive: Callable[[Tensor, Tensor], Tensor], kind: str
) -> None:
    A = psd_matrix() if kind == "psd" else random_matrix(1)
    for num_matvecs in (2, 4, 12):
        op = CountingOperator(DenseOperator(A))
        estimate = estimator(op, num_matvecs, gen(3))
        Omega = op.inputs[0]  # the probes
        assert Omega.shape == (P, num_matvecs // 2)
        torch.testing.assert_close(estimate, naive(A, Omega), rtol=1e-10, atol=1e-10)


def test_probe_distributions() -> None:
    """XTrace draws probes of norm sqrt(P), XDiag draws random signs."""
    op = CountingOperator(DenseOperator(psd_matrix()))
    xtrace(op, 10, gen(0))
    norms = op.inputs[0].norm(dim=0)
    torch.testing.assert_close(norms, torch.full_like(norms, P**0.5))
    op = CountingOperator(DenseOperator(psd_matrix()))
    xdiag(op, 10, gen(0))
    assert (op.inputs[0].abs() == 1).all()


# Variance reduction


def test_variance_reduction_fast_decay() -> None:
    """Hutch++ and XTrace beat Hutchinson at equal budget on a fast-decaying spectrum."""
    A = decaying_matrix()
    op, exact = DenseOperator(A), A.trace()
    num_matvecs, seeds = 24, range(20)

    def mean_error(estimator: Estimator) -> float:
        errors = [(estimator(op, num_matvecs, gen(s)) - exact).abs() for s in seeds]
        return float(torch.stack(errors).mean())

    hutchinson = mean_error(hutchinson_trace)
    assert mean_error(hutchpp_trace) < 0.1 * hutchinson
    assert mean_error(xtrace) < 0.1 * hutchinson


def test_xdiag_variance_reduction_fast_decay() -> None:
    A = decaying_matrix()
    op, exact = DenseOperator(A), A.diagonal()

    def mean_error(estimator: Estimator) -> float:
        return float(
            torch.stack(
                [(estimator(op, 24, gen(s)) - exact).norm() for s in range(20)]
            ).mean()
        )

    assert mean_error(xdiag) < 0.1 * mean_error(hutchinson_diag)


# Determinism, RNG and blocking


def square_or_rect(name: str) -> DenseOperator:
    if ESTIMATORS[name][1] == "fro":
        return DenseOperator(random_matrix(2, 11, 15))
    return DenseOperator(psd_matrix())


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_deterministic_with_generator(name: str) -> None:
    estimator, _, num_matvecs = ESTIMATORS[name]
    op = square_or_rect(name)
    first = estimator(op, num_matvecs, gen(7))
    assert torch.equal(first, estimator(op, num_matvecs, gen(7)))
    assert not torch.equal(first, estimator(op, num_matvecs, gen(8)))
    # a generator is advanced: consecutive calls differ
    generator = gen(7)
    estimator(op, num_matvecs, generator)
    assert not torch.equal(first, estimator(op, num_matvecs, generator))


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_follows_manual_seed(name: str) -> None:
    estimator, _, num_matvecs = ESTIMATORS[name]
    op = square_or_rect(name)
    torch.manual_seed(11)
    first = estimator(op, num_matvecs)
    torch.manual_seed(11)
    assert torch.equal(first, estimator(op, num_matvecs))
    assert not torch.equal(first, estimator(op, num_matvecs))


@pytest.mark.parametrize("max_block", [1, 3])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_blockwise_equals_all_at_once(name: str, max_block: int) -> None:
    estimator, _, _ = ESTIMATORS[name]
    base = square_or_rect(name)
    for num_matvecs in (6, 12):
        op = CountingOperator(base)
        blocked = estimator(op, num_matvecs, gen(5), max_block=max_block)
        stages = expected_columns(name, num_matvecs, base.shape[1])
        blocks = [
            min(max_block, k - start)
            for k in stages
            for start in range(0, k, max_block)
        ]
        assert op.columns == blocks
        expected = estimator(base, num_matvecs, gen(5))
        torch.testing.assert_close(blocked, expected, rtol=1e-12, atol=1e-12)


def expected_columns(name: str, num_matvecs: int, dim: int) -> list[int]:
    """The documented columns of each call ``op @ X`` (full-rank operator)."""
    if name.startswith("hutchinson"):
        return [num_matvecs]
    if name == "hutchpp_trace":
        sketch = num_matvecs // 3
        return [sketch, min(sketch, dim) + num_matvecs - 2 * sketch]
    m = num_matvecs // 2
    return [m, min(m, dim)]


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_budget(name: str) -> None:
    estimator = ESTIMATORS[name][0]
    base = square_or_rect(name)
    for num_matvecs in (6, 7, 8, 12, 2 * P + 6, 3 * P + 7):
        if name in ("xtrace", "xdiag") and num_matvecs % 2:
            continue
        op = CountingOperator(base)
        estimator(op, num_matvecs, gen(0))
        assert op.columns == expected_columns(name, num_matvecs, base.shape[1])
        assert sum(op.columns) <= num_matvecs


def test_budget_low_rank() -> None:
    """With a rank-r operator, XTrace/XDiag multiply only an r-column basis."""
    B = random_matrix(0, P, 4)
    for estimator in (xtrace, xdiag):
        op = CountingOperator(DenseOperator(B @ B.T))
        estimator(op, 20, gen(0))
        assert op.columns == [10, 4]


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_output_dtype_shape(name: str) -> None:
    estimator, quantity, num_matvecs = ESTIMATORS[name]
    for dtype in (torch.float32, torch.float64):
        op = DenseOperator(square_or_rect(name)._A.to(dtype))
        result = estimator(op, num_matvecs, gen(0))
        assert result.dtype == dtype
        assert result.device == op.device
        assert result.shape == ((P,) if quantity == "diag" else ())


# Errors


@pytest.mark.parametrize("name", SQUARE_ONLY)
def test_non_square_raises(name: str) -> None:
    op = DenseOperator(random_matrix(0, 11, 15))
    with pytest.raises(ValueError, match=r"square operator; got shape \(11, 15\)"):
        ESTIMATORS[name][0](op, 6, gen(0))


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4", None])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_bad_num_matvecs_raises(name: str, bad: object) -> None:
    with pytest.raises(ValueError, match="num_matvecs"):
        ESTIMATORS[name][0](square_or_rect(name), bad, gen(0))


@pytest.mark.parametrize("num_matvecs", [1, 3, 7])
@pytest.mark.parametrize("estimator", [xtrace, xdiag])
def test_odd_num_matvecs_raises(estimator: Estimator, num_matvecs: int) -> None:
    with pytest.raises(ValueError, match="num_matvecs must be"):
        estimator(DenseOperator(psd_matrix()), num_matvecs, gen(0))


@pytest.mark.parametrize("num_matvecs", [1, 2])
def test_hutchpp_needs_three(num_matvecs: int) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        hutchpp_trace(DenseOperator(psd_matrix()), num_matvecs, gen(0))


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_bad_arguments_raise(name: str) -> None:
    estimator, _, num_matvecs = ESTIMATORS[name]
    op = square_or_rect(name)
    with pytest.raises(ValueError, match="max_block"):
        estimator(op, num_matvecs, gen(0), max_block=0)
    with pytest.raises(TypeError, match="generator"):
        estimator(op, num_matvecs, 0)
    with pytest.raises(TypeError, match="PyTorchLinearOperator or a 2-D tensor"):
        estimator(op._A.numpy(), num_matvecs, gen(0))
    with pytest.raises(ValueError, match="floating-point matrix"):
        estimator(op._A[0], num_matvecs, gen(0))
    with pytest.raises(ValueError, match="floating-point matrix"):
        estimator(op._A.to(torch.int64), num_matvecs, gen(0))
    with pytest.raises(ValueError, match="distribution must be one of"):
        estimator(op, num_matvecs, distribution="uniform")
    with pytest.raises(TypeError, match="distribution is given twice"):
        estimator(op, num_matvecs, "normal", distribution="normal")


# curvlinops' call forms: plain tensors, ``distribution``, the global RNG

DISTRIBUTIONS = ["rademacher", "normal", "sphere"]


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_tensor_as_operator(name: str) -> None:
    """A plain (square, or for the Frobenius norm rectangular) tensor is an operator."""
    estimator, _, num_matvecs = ESTIMATORS[name]
    op = square_or_rect(name)
    for distribution in DISTRIBUTIONS:
        kwargs = {"distribution": distribution}
        expected = estimator(op, num_matvecs, gen(3), **kwargs)
        result = estimator(op._A, num_matvecs, gen(3), **kwargs)
        torch.testing.assert_close(result, expected, rtol=1e-14, atol=1e-14)
    # curvlinops' keyword names
    torch.testing.assert_close(
        estimator(A=op._A, num_matvecs=num_matvecs, generator=gen(3)),
        estimator(op, num_matvecs, gen(3)),
        rtol=1e-14,
        atol=1e-14,
    )


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_probe_distribution_keyword(distribution: str) -> None:
    """Probes are signs, Gaussian entries, or of norm sqrt(P), as requested."""
    for estimator, _, num_matvecs in ESTIMATORS.values():
        op = CountingOperator(DenseOperator(psd_matrix()))
        estimator(op, num_matvecs, gen(0), distribution=distribution)
        probes = op.inputs[0]
        norms = probes.norm(dim=0)
        is_sign = bool((probes.abs() == 1).all())
        on_sphere = torch.allclose(norms, torch.full_like(norms, P**0.5))
        assert is_sign == (distribution == "rademacher")
        assert on_sphere == (distribution != "normal")


def test_default_distributions() -> None:
    """Rademacher probes by default; XTrace draws from the sphere."""
    for name, (estimator, _, num_matvecs) in ESTIMATORS.items():
        default = "sphere" if name == "xtrace" else "rademacher"
        expected = estimator(DenseOperator(psd_matrix()), num_matvecs, gen(4))
        op = DenseOperator(psd_matrix())
        result = estimator(op, num_matvecs, gen(4), distribution=default)
        assert torch.equal(result, expected)


@pytest.mark.parametrize("distribution", ["normal", "sphere"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_unbiased_other_distributions(name: str, distribution: str) -> None:
    estimator, quantity, num_matvecs = ESTIMATORS[name]
    op = square_or_rect(name)

    def with_distribution(*args: object) -> Tensor:
        return estimator(*args, distribution=distribution)

    target = truth(op._A, quantity)
    assert_unbiased(with_distribution, op, num_matvecs, target, repeats=200)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_positional_distribution(name: str) -> None:
    """curvlinops' positional form ``f(A, num_matvecs, distribution)``."""
    estimator, _, num_matvecs = ESTIMATORS[name]
    A = square_or_rect(name)._A
    torch.manual_seed(5)
    positional = estimator(A, num_matvecs, "normal")
    torch.manual_seed(5)
    assert torch.equal(positional, estimator(A, num_matvecs, distribution="normal"))


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_global_rng_fresh_probes(name: str) -> None:
    """Without a generator, each call draws fresh probes from the global RNG."""
    estimator, _, num_matvecs = ESTIMATORS[name]
    op = CountingOperator(square_or_rect(name))
    torch.manual_seed(2)
    estimator(op, num_matvecs)
    estimator(op, num_matvecs)
    first, second = op.inputs[0], op.inputs[-1 if name.startswith("hutchinson") else 2]
    assert not torch.equal(first, second)
    # the probes are the global RNG's next draws, one vector at a time
    torch.manual_seed(2)
    expected = [
        torch.empty(op.shape[1], dtype=DT).bernoulli_(0.5) * 2 - 1
        for _ in range(first.shape[1])
    ]
    assert torch.equal(first, torch.stack(expected, dim=1)) == (name != "xtrace")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_cuda_operator_cpu_generator(name: str) -> None:
    """A CPU generator gives the same probes for an operator on the GPU."""
    estimator, _, num_matvecs = ESTIMATORS[name]
    op = square_or_rect(name)
    op_cuda = DenseOperator(op._A.cuda())
    result = estimator(op_cuda, num_matvecs, gen(0))
    assert result.device.type == "cuda"
    expected = estimator(op, num_matvecs, gen(0))
    torch.testing.assert_close(result.cpu(), expected, rtol=1e-10, atol=1e-10)
    cuda_generator = torch.Generator(device="cuda").manual_seed(0)
    assert estimator(op, num_matvecs, cuda_generator).device.type == "cpu"
