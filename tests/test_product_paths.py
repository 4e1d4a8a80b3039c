"""A single column (eager forward-mode AD) and several columns (torch.func) agree."""

import pytest
import torch
from torch import nn

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)

OPERATORS = [GGNLinearOperator, EFLinearOperator, FisherMCLinearOperator]


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    data = [(torch.randn(n, 4).double(), torch.randint(0, 3, (n,))) for n in (3, 5)]
    params = [p for p in model.parameters() if p.requires_grad]
    return model, nn.CrossEntropyLoss(), params, data


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_single_column_equals_batched_columns(cls):
    op = cls(*problem())
    V = torch.randn(op.shape[1], 3, dtype=torch.float64)
    batched = op @ V
    for k in range(3):
        torch.testing.assert_close(op @ V[:, k], batched[:, k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_products_work_under_no_grad(cls):
    op = cls(*problem())
    v = torch.randn(op.shape[1], dtype=torch.float64)
    V = torch.randn(op.shape[1], 2, dtype=torch.float64)
    expected_v, expected_V = op @ v, op @ V
    with torch.no_grad():
        torch.testing.assert_close(op @ v, expected_v)
        torch.testing.assert_close(op @ V, expected_V)


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_results_carry_no_graph(cls):
    op = cls(*problem())
    v = torch.randn(op.shape[1], dtype=torch.float64)
    assert not (op @ v).requires_grad
    assert not (op @ torch.randn(op.shape[1], 2, dtype=torch.float64)).requires_grad
    assert all(p.grad is None for p in op._params)


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_results_carry_no_graph_for_a_parameter_subset(cls):
    """Trainable module parameters outside ``params`` leave no graph in any result."""
    model, loss_func, _, data = problem()
    op = cls(model, loss_func, [model[0].weight], data)
    V = torch.randn(op.shape[1], 2, dtype=torch.float64)
    results = [
        op @ V[:, 0],
        op @ V,
        op.to_dense(),
        op.factor(),
        op.diagonal(),
        op.trace(),
        op.cached() @ V,
    ]
    assert not any(r.requires_grad for r in results)
    assert all(p.grad is None for p in model.parameters())
