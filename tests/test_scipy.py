"""SciPy interoperability: ``eigsh`` and ``cg`` on ``op.to_scipy()``."""

from __future__ import annotations

from typing import Any

import numpy
import pytest
import torch
from problems import Problem, make_problem
from reference import dense_ef, dense_fisher_mc, dense_ggn
from scipy.sparse.linalg import LinearOperator, cg, eigsh

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    IdentityLinearOperator,
)

OPERATORS: dict[str, tuple[type, Any]] = {
    "ggn": (GGNLinearOperator, dense_ggn),
    "ef": (EFLinearOperator, dense_ef),
    "mc": (FisherMCLinearOperator, dense_fisher_mc),
}
CASES = [("mlp_tanh", "ce", "mean"), ("conv", "mse", "sum"), ("seq", "bce", "mean")]


def _ids(case: tuple[Any, ...]) -> str:
    """Test id of a parameter tuple.

    Args:
        case: Tuple of strings.

    Returns:
        The entries joined by ``-``.
    """
    return "-".join(str(c) for c in case)


def build(name: str, problem: Problem) -> Any:
    """Construct an operator and its dense reference.

    Args:
        name: Key of :data:`OPERATORS`.
        problem: The problem.

    Returns:
        The operator and the reference as float64 NumPy array.
    """
    cls, ref = OPERATORS[name]
    op = cls(*problem.args(), **problem.kwargs())
    return op, ref(*problem.args(), **problem.kwargs()).numpy()


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("name", list(OPERATORS))
def test_eigsh(name: str, case: tuple[str, str, str]) -> None:
    """The three largest eigenpairs from ``eigsh`` match ``numpy.linalg.eigh``.

    Args:
        name: Operator key.
        case: ``(model, loss, reduction)``.
    """
    problem = make_problem(*case, layout="unequal")
    op, dense = build(name, problem)
    scipy_op = op.to_scipy()
    assert isinstance(scipy_op, LinearOperator)

    k = 3
    v0 = numpy.random.default_rng(0).standard_normal(op.shape[0])
    evals, evecs = eigsh(scipy_op, k=k, which="LA", v0=v0, tol=1e-12)
    ref_evals, ref_evecs = numpy.linalg.eigh(dense)
    ref_evals, ref_evecs = ref_evals[-k:], ref_evecs[:, -k:]

    order = numpy.argsort(evals)
    evals, evecs = evals[order], evecs[:, order]
    scale = ref_evals[-1]
    numpy.testing.assert_allclose(evals, ref_evals, rtol=1e-8, atol=1e-10 * scale)

    # eigenvectors up to sign, where the eigenvalue is well separated
    gaps = numpy.diff(numpy.linalg.eigvalsh(dense))[-k:]
    for i in range(k):
        separated = gaps[i] > 1e-3 * scale and (i == 0 or gaps[i - 1] > 1e-3 * scale)
        if separated:
            overlap = abs(evecs[:, i] @ ref_evecs[:, i])
            assert overlap == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("name", list(OPERATORS))
def test_cg_damped(name: str, case: tuple[str, str, str]) -> None:
    """``cg`` on ``(op + damping * I).to_scipy()`` matches ``numpy.linalg.solve``.

    Args:
        name: Operator key.
        case: ``(model, loss, reduction)``.
    """
    problem = make_problem(*case, layout="unequal")
    op, dense = build(name, problem)
    damping = 1e-2 * numpy.linalg.norm(dense, ord=2)
    identity = IdentityLinearOperator(
        [p.shape for p in problem.params], device=op.device, dtype=op.dtype
    )
    damped = (op + damping * identity).to_scipy()

    b = numpy.random.default_rng(1).standard_normal(op.shape[0])
    x, info = cg(damped, b, rtol=1e-12, atol=0.0, maxiter=10 * op.shape[0])
    assert info == 0
    expected = numpy.linalg.solve(dense + damping * numpy.eye(op.shape[0]), b)
    numpy.testing.assert_allclose(
        x, expected, rtol=1e-7, atol=1e-9 * abs(expected).max()
    )


@pytest.mark.parametrize("name", list(OPERATORS))
def test_float32_to_scipy(name: str) -> None:
    """A float32 operator works through ``to_scipy`` (products and ``eigsh``).

    Args:
        name: Operator key.
    """
    problem = make_problem("mlp_tanh", "ce", "mean", "unequal", dtype=torch.float32)
    op, dense = build(name, problem)
    assert op.dtype == torch.float32
    scipy_op = op.to_scipy()
    P = op.shape[0]
    rng = numpy.random.default_rng(2)

    for x in (rng.standard_normal(P), rng.standard_normal((P, 3))):
        x32 = x.astype(numpy.float32)
        result = scipy_op @ x32
        assert result.shape == x.shape
        expected = dense @ x32.astype(numpy.float64)
        error = numpy.linalg.norm(result - expected) / numpy.linalg.norm(expected)
        assert error < 1e-4

    evals = numpy.sort(eigsh(scipy_op, k=3, which="LA", tol=1e-6)[0])
    ref_evals = numpy.linalg.eigvalsh(dense)[-3:]
    numpy.testing.assert_allclose(
        evals, ref_evals, rtol=1e-3, atol=1e-4 * ref_evals[-1]
    )
