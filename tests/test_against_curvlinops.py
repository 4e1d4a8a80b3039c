"""Side-by-side comparison with the peer library curvlinops (3.0.1).

Both libraries must produce the same dense GGN, empirical Fisher and (for the same
seed) Monte-Carlo Fisher, and, under the same ``torch.manual_seed``, the same
randomized estimates. Skipped when curvlinops is not installed (see
``tests/compare-requirements.txt``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from problems import LOSSES, REDUCTIONS, Problem, make_problem
from reference import assert_matrix_close, to_dense

curvlinops = pytest.importorskip(
    "curvlinops", reason="the peer library curvlinops is needed for the comparison"
)

import curvlinops_fisher  # noqa: E402

#: Operator name -> (class name in both libraries, extra constructor arguments).
OPERATORS: dict[str, tuple[str, dict[str, Any]]] = {
    "ggn": ("GGNLinearOperator", {}),
    "ef": ("EFLinearOperator", {}),
    "mc1": ("FisherMCLinearOperator", {"seed": 123, "mc_samples": 1}),
    "mc3": ("FisherMCLinearOperator", {"seed": 123, "mc_samples": 3}),
}
#: ``(model, layout)``: an MLP, the sequence model and a CNN with two spatial output
#: axes with unequal batches, a CNN with a ``DataLoader`` and a dict-input model.
CASES = [
    ("mlp_relu", "unequal"),
    ("seq", "unequal"),
    ("conv_seg", "unequal"),
    ("conv", "loader"),
    ("dict", "unequal"),
]


def _dense(library: Any, name: str, problem: Problem) -> torch.Tensor:
    """Dense matrix of an operator from one of the two libraries.

    Args:
        library: ``curvlinops`` or ``curvlinops_fisher``.
        name: Key of :data:`OPERATORS`.
        problem: The problem.

    Returns:
        ``op @ I``.
    """
    class_name, kwargs = OPERATORS[name]
    op = getattr(library, class_name)(*problem.args(), **problem.kwargs(), **kwargs)
    return to_dense(op)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", list(OPERATORS))
def test_same_as_curvlinops(
    name: str, loss: str, reduction: str, case: tuple[str, str]
) -> None:
    """Our dense matrix equals curvlinops' to ``1e-10`` in float64.

    Args:
        name: Operator key.
        loss: Loss name.
        reduction: ``"mean"`` or ``"sum"``.
        case: ``(model, layout)``.
    """
    model, layout = case
    problem = make_problem(model, loss, reduction, layout)  # binary BCE targets
    ours = _dense(curvlinops_fisher, name, problem)
    theirs = _dense(curvlinops, name, problem)
    assert_matrix_close(ours, theirs)


@pytest.mark.parametrize("loss", LOSSES)
def test_same_as_curvlinops_float32_mc(loss: str) -> None:
    """In float32 the two MC Fishers still draw the same samples.

    Args:
        loss: Loss name.
    """
    problem = make_problem("mlp_tanh", loss, "mean", "unequal", dtype=torch.float32)
    ours = _dense(curvlinops_fisher, "mc3", problem).double()
    theirs = _dense(curvlinops, "mc3", problem).double()
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5


#: Estimator name -> (call arguments after ``A``, shape of ``A``).
ESTIMATOR_CALLS: dict[str, tuple[tuple, tuple[int, int]]] = {
    "hutchinson_trace": ((5,), (20, 20)),
    "hutchpp_trace": ((9,), (20, 20)),
    "xtrace": ((8,), (20, 20)),
    "hutchinson_diag": ((5,), (20, 20)),
    "xdiag": ((8,), (20, 20)),
    "hutchinson_squared_fro": ((5,), (25, 20)),
}


#: ``(estimator, distribution)``; curvlinops' xdiag only draws Rademacher probes.
ESTIMATOR_CASES = [
    (name, distribution)
    for name in ESTIMATOR_CALLS
    for distribution in ("rademacher", "normal")
    if not (name == "xdiag" and distribution == "normal")
]


@pytest.mark.parametrize("name, distribution", ESTIMATOR_CASES)
def test_estimators_same_as_curvlinops(name: str, distribution: str) -> None:
    """Under one ``torch.manual_seed`` both libraries draw the same probes.

    Called in curvlinops' form (a tensor, ``distribution``, the global RNG), each of
    our estimators returns curvlinops' number (XDiag takes no distribution there).

    Args:
        name: Estimator name.
        distribution: ``"rademacher"`` or ``"normal"``.
    """
    args, shape = ESTIMATOR_CALLS[name]
    A = torch.randn(
        *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    kwargs = {} if name == "xdiag" else {"distribution": distribution}
    torch.manual_seed(3)
    theirs = getattr(curvlinops, name)(A, *args, **kwargs)
    torch.manual_seed(3)
    ours = getattr(curvlinops_fisher, name)(A, *args, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
