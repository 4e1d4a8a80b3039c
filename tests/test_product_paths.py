"""A single column (eager forward-mode AD) and several columns (torch.func) agree.

The model of :func:`problem` is an ``nn.Sequential`` MLP, so its products take the
closed-form chain (:mod:`curvlinops_fisher.closed_form`) unless it is switched off:
the tests that are about the AD paths run with both.
"""

import time

import pytest
import torch
from problems import MODELS, make_problem
from reference import dense_ef, dense_ggn
from torch import nn

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    core,
    dual_numbers,
)
from curvlinops_fisher.factors import GGNFactor
from curvlinops_fisher.losses import make_fisher_loss

OPERATORS = [GGNLinearOperator, EFLinearOperator, FisherMCLinearOperator]


@pytest.fixture(params=["chain", "ad"])
def product_path(request, monkeypatch) -> str:
    """Run a test with the closed-form MLP chain on and off."""
    monkeypatch.setattr(core, "SEQUENTIAL_CHAIN_PRODUCTS", request.param == "chain")
    return request.param


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    data = [(torch.randn(n, 4).double(), torch.randint(0, 3, (n,))) for n in (3, 5)]
    params = [p for p in model.parameters() if p.requires_grad]
    return model, nn.CrossEntropyLoss(), params, data


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_single_column_equals_batched_columns(cls, product_path):
    op = cls(*problem())
    V = torch.randn(op.shape[1], 3, dtype=torch.float64)
    batched = op @ V
    for k in range(3):
        torch.testing.assert_close(op @ V[:, k], batched[:, k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_products_work_under_no_grad(cls, product_path):
    op = cls(*problem())
    v = torch.randn(op.shape[1], dtype=torch.float64)
    V = torch.randn(op.shape[1], 2, dtype=torch.float64)
    expected_v, expected_V = op @ v, op @ V
    with torch.no_grad():
        torch.testing.assert_close(op @ v, expected_v)
        torch.testing.assert_close(op @ V, expected_V)


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_results_carry_no_graph(cls, product_path):
    op = cls(*problem())
    v = torch.randn(op.shape[1], dtype=torch.float64)
    assert not (op @ v).requires_grad
    assert not (op @ torch.randn(op.shape[1], 2, dtype=torch.float64)).requires_grad
    assert all(p.grad is None for p in op._params)


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_results_carry_no_graph_for_a_parameter_subset(cls, product_path):
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


# ------------------------------------------- tangent shortcut of data-fed layers


class SequenceHead(nn.Module):
    """A linear layer on ``[N, T, in]`` inputs (outputs ``[N, T, C]``)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def shortcut_problem(name: str):
    """Models whose first linear layer is fed by the data, with several parameter sets."""
    torch.manual_seed(0)
    if name == "sequence":
        model = SequenceHead().double()
        data = [
            (torch.randn(n, 2, 4).double(), torch.randn(n, 2, 3).double())
            for n in (3, 5)
        ]
        return model, nn.MSELoss(), list(model.parameters()), data
    first = nn.Linear(4, 6, bias=name != "no_bias")
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(6, 3)).double()
    data = [(torch.randn(n, 4).double(), torch.randint(0, 3, (n,))) for n in (3, 5)]
    params = {
        "mlp": list(model.parameters()),
        "no_bias": list(model.parameters()),
        "first_weight_only": [first.weight, *model[2].parameters()],
        "first_bias_only": [first.bias, *model[2].parameters()],
    }[name]
    return model, nn.CrossEntropyLoss(), params, data


SHORTCUT_CASES = ["mlp", "no_bias", "first_weight_only", "first_bias_only", "sequence"]


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", SHORTCUT_CASES)
def test_linear_tangent_shortcut_is_exact(monkeypatch, cls, name):
    """The shortcut gives the same bits as PyTorch's rule, and the brute-force matrix."""
    monkeypatch.setattr(core, "SEQUENTIAL_CHAIN_PRODUCTS", False)
    args = shortcut_problem(name)
    op = cls(*args)
    v = torch.randn(op.shape[1], dtype=torch.float64)
    monkeypatch.setattr(dual_numbers, "LINEAR_SHORTCUT_MIN_NUMEL", 2**62)
    without = op @ v
    fired = []
    original = dual_numbers._linear_without_input_tangent

    def spy(*a, **k):
        result = original(*a, **k)
        fired.append(result is not None)
        return result

    monkeypatch.setattr(dual_numbers, "_linear_without_input_tangent", spy)
    monkeypatch.setattr(dual_numbers, "LINEAR_SHORTCUT_MIN_NUMEL", 0)
    with_shortcut = op @ v
    assert torch.equal(with_shortcut, without)
    # the data-fed layer takes the shortcut unless its weight has no tangent
    assert any(fired) == (name != "first_bias_only")
    assert not with_shortcut.requires_grad
    assert all(p.grad is None for p in op._params)
    if cls is not FisherMCLinearOperator:
        dense = (dense_ggn if cls is GGNLinearOperator else dense_ef)(*args)
        torch.testing.assert_close(with_shortcut, dense @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_name", MODELS)
def test_linear_tangent_shortcut_on_every_test_model(monkeypatch, model_name):
    """Forced on, the shortcut changes no bit of any test model's product."""
    monkeypatch.setattr(core, "SEQUENTIAL_CHAIN_PRODUCTS", False)
    loss = "mse" if model_name in ("seq", "conv_seg", "scalar") else "ce"
    problem = make_problem(model_name, loss, "mean", layout="unequal")
    op = GGNLinearOperator(*problem.args(), **problem.kwargs())
    v = torch.randn(op.shape[1], dtype=torch.float64)
    monkeypatch.setattr(dual_numbers, "LINEAR_SHORTCUT_MIN_NUMEL", 2**62)
    without = op @ v
    monkeypatch.setattr(dual_numbers, "LINEAR_SHORTCUT_MIN_NUMEL", 0)
    assert torch.equal(op @ v, without)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("model_name", ["sequential", "module"])
def test_batch_product_adds_into_out(product_path, model_name, K):
    """``out=`` gets the product added (for every path: chain, dual numbers, vmap)."""
    if model_name == "sequential":
        model, loss_func, params, data = problem()
    else:
        model, loss_func, params, data = shortcut_problem("sequence")
    X, y = data[0]
    loss = make_fisher_loss(loss_func)
    model_function = core.make_model_function(model, params)
    V = tuple(torch.randn(K, *p.shape, dtype=torch.float64) for p in params)
    start = tuple(torch.randn(K, *p.shape, dtype=torch.float64) for p in params)
    out = tuple(s.clone() for s in start)
    args = (model_function, tuple(params), X, y, V, loss, GGNFactor())
    fresh = core.batch_curvature_matmat(*args, scale=0.5, max_columns=2)
    returned = core.batch_curvature_matmat(*args, scale=0.5, max_columns=2, out=out)
    assert returned is out
    for o, s, f in zip(out, start, fresh):
        torch.testing.assert_close(o, s + f, rtol=1e-13, atol=1e-14)


# ------------------------------------------ one or two forward passes per column


@pytest.mark.parametrize("model_name", MODELS)
def test_separate_passes_give_the_same_bits(monkeypatch, model_name):
    """One recorded dual pass or a dual pass plus a primal pass: identical products."""
    monkeypatch.setattr(core, "SEQUENTIAL_CHAIN_PRODUCTS", False)
    loss = "mse" if model_name in ("seq", "conv_seg", "scalar") else "ce"
    problem = make_problem(model_name, loss, "mean", layout="unequal")
    for cls in OPERATORS:
        op = cls(*problem.args(), **problem.kwargs())
        v = torch.randn(op.shape[1], dtype=torch.float64)
        monkeypatch.setattr(dual_numbers, "ONE_COLUMN_SEPARATE_PASSES", False)
        shared = op @ v
        monkeypatch.setattr(dual_numbers, "ONE_COLUMN_SEPARATE_PASSES", True)
        assert torch.equal(op @ v, shared)


@pytest.mark.parametrize("slow", [False, True])
def test_first_product_measures_which_pass_is_faster(monkeypatch, slow):
    """The variant made slow loses; the decision is kept and used from then on."""
    monkeypatch.setattr(core, "SEQUENTIAL_CHAIN_PRODUCTS", False)
    model, loss_func, params, data = shortcut_problem("sequence")
    op = GGNLinearOperator(model, loss_func, params, data)
    calls = []
    original = dual_numbers._linearize_one_column

    def spy(*args, separate=False):
        calls.append(separate)
        if separate == slow:
            time.sleep(0.02)
        return original(*args, separate=separate)

    monkeypatch.setattr(dual_numbers, "_linearize_one_column", spy)
    v = torch.randn(op.shape[1], dtype=torch.float64)
    op @ v
    assert op._model_function.one_column_separate is (not slow)
    assert calls[:4] == [False, True, False, True]  # calibration on the first batch
    assert set(calls[4:]) == {not slow}  # (with the check of each batch shape)
    calls.clear()
    op @ v
    assert calls == [not slow] * len(data)


def test_function_without_attributes_keeps_one_pass():
    """A model function that cannot keep the decision always takes one pass."""

    class Slotted:
        __slots__ = ("model",)

        def __init__(self, model):
            self.model = model

        def __call__(self, param_values, X):
            return torch.func.functional_call(
                self.model, dict(zip(["0.weight", "0.bias"], param_values)), (X,)
            )

    model = nn.Sequential(nn.Linear(3, 2)).double()
    params = tuple(model.parameters())
    V = tuple(torch.randn(1, *p.shape, dtype=torch.float64) for p in params)
    X = torch.randn(4, 3, dtype=torch.float64)
    assert not dual_numbers._prefers_separate_passes(Slotted(model), params, X, V)
