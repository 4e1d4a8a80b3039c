"""Models with an operation that has no forward-mode derivative (issue 22).

``nn.EmbeddingBag`` has no forward-mode derivative in PyTorch, so products take the
JVP as the VJP of the VJP (:func:`curvlinops_fisher.reverse_over_reverse.linearize_reverse_over_reverse`).
Products are checked against the brute-force ``jacrev`` references; an operation with
neither forward mode nor a differentiable backward raises the library's error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from reference import (
    assert_matrix_close,
    dense_ef,
    dense_fisher_mc,
    dense_ggn,
    to_dense,
)
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    core,
    reverse_over_reverse,
)
from curvlinops_fisher.errors import UnsupportedOperationError
from curvlinops_fisher.functional import make_ggn_mv

OPERATORS = {
    "ggn": (GGNLinearOperator, dense_ggn),
    "ef": (EFLinearOperator, dense_ef),
    "mc": (FisherMCLinearOperator, dense_fisher_mc),
}
NUM_EMBEDDINGS, DIM, CLASSES, BAG = 7, 3, 4, 3


def embedding_bag_problem(
    mode: str = "mean", loss: str = "ce", reduction: str = "mean", **bag: Any
) -> tuple[nn.Module, nn.Module, list[Tensor], list[tuple[Tensor, Tensor]]]:
    """An ``nn.EmbeddingBag`` and a linear layer, two unequal batches, float64.

    Returns:
        ``(model, loss_func, params, data)``.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.EmbeddingBag(NUM_EMBEDDINGS, DIM, mode=mode, **bag), nn.Linear(DIM, CLASSES)
    ).double()
    data = []
    for n in (3, 5):
        X = torch.randint(0, NUM_EMBEDDINGS, (n, BAG))
        if loss == "ce":
            y = torch.randint(0, CLASSES, (n,))
        else:
            y = torch.randn(n, CLASSES, dtype=torch.float64)
        data.append((X, y))
    loss_func = (nn.CrossEntropyLoss if loss == "ce" else nn.MSELoss)(
        reduction=reduction
    )
    return model, loss_func, list(model.parameters()), data


def check_products(
    name: str, model: nn.Module, loss_func: nn.Module, params: list[Tensor], data: Any
) -> GGNLinearOperator:
    """One column, several columns and the dense matrix against the reference.

    Returns:
        The operator.
    """
    cls, reference = OPERATORS[name]
    op = cls(model, loss_func, params, data)
    dense = reference(model, loss_func, params, data)
    generator = torch.Generator().manual_seed(1)
    v = torch.randn(op.shape[1], generator=generator, dtype=torch.float64)
    V = torch.randn(op.shape[1], 3, generator=generator, dtype=torch.float64)
    assert_matrix_close(op @ v, dense @ v)
    assert_matrix_close(op @ V, dense @ V)
    assert_matrix_close(to_dense(op), dense)
    return op


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("mode", ["mean", "sum"])
@pytest.mark.parametrize("name", list(OPERATORS))
def test_embedding_bag_products(name: str, mode: str, loss: str, reduction: str):
    """Products of an EmbeddingBag model equal the brute-force matrices."""
    model, loss_func, params, data = embedding_bag_problem(mode, loss, reduction)
    op = check_products(name, model, loss_func, params, data)
    failure = op._model_function.forward_ad_failure
    assert failure.op == "_embedding_bag"
    assert failure.layer == "'0' (EmbeddingBag)"
    assert failure.checked


@pytest.mark.parametrize("subset", ["bag_only", "bag_frozen"])
@pytest.mark.parametrize("name", list(OPERATORS))
def test_embedding_bag_parameter_subsets(name: str, subset: str):
    """Only the EmbeddingBag's weight, or all but it (then forward mode works)."""
    model, loss_func, params, data = embedding_bag_problem("mean", "ce", "mean")
    if subset == "bag_only":
        params = [model[0].weight]
    else:
        model[0].weight.requires_grad_(False)
        params = list(model[1].parameters())
    op = check_products(name, model, loss_func, params, data)
    reverse = op._model_function.forward_ad_failure is not None
    assert reverse == (subset == "bag_only")


class OffsetsModel(nn.Module):
    """EmbeddingBag on ``(indices, offsets)`` (1d input) and a linear layer."""

    def __init__(self, **bag: Any):
        super().__init__()
        self.bag = nn.EmbeddingBag(NUM_EMBEDDINGS, DIM, **bag)
        self.linear = nn.Linear(DIM, CLASSES)

    def forward(self, X: tuple[Tensor, Tensor]) -> Tensor:
        return self.linear(self.bag(*X))


@pytest.mark.parametrize("name", list(OPERATORS))
def test_embedding_bag_offsets_input(name: str):
    """The offsets form (bags of unequal length, one empty) in a tuple input."""
    torch.manual_seed(0)
    model = OffsetsModel(mode="mean", padding_idx=0).double()
    data = []
    for offsets in ([0, 2, 2, 5], [0, 1, 4]):
        offsets = torch.tensor(offsets)
        indices = torch.randint(0, NUM_EMBEDDINGS, (offsets[-1] + 2,))
        data.append(((indices, offsets), torch.randint(0, CLASSES, (len(offsets),))))
    params = list(model.parameters())
    cls, reference = OPERATORS[name]
    kwargs = {"batch_size_fn": lambda X: X[1].numel()}
    op = cls(model, nn.CrossEntropyLoss(), params, data, **kwargs)
    dense = reference(model, nn.CrossEntropyLoss(), params, data, **kwargs)
    assert_matrix_close(to_dense(op), dense)
    assert op._model_function.forward_ad_failure.layer == "'bag' (EmbeddingBag)"


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "sum"},
        {"mode": "mean"},
        {"mode": "sum", "per_sample_weights": True},
        {"mode": "mean", "padding_idx": 2},
        {"mode": "sum", "padding_idx": -1, "offsets": True},
        {"mode": "mean", "offsets": True, "include_last_offset": True},
        {"mode": "sum", "offsets": True, "per_sample_weights": True},
    ],
    ids=str,
)
def test_embedding_bag_composed(options: dict[str, Any]):
    """The composition equals ``F.embedding_bag`` and has the same gradient."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(NUM_EMBEDDINGS, DIM, generator=generator, dtype=torch.float64)
    kwargs = {"mode": options["mode"], "padding_idx": options.get("padding_idx")}
    if options.get("offsets"):
        input = torch.randint(0, NUM_EMBEDDINGS, (9,), generator=generator)
        kwargs["offsets"] = torch.tensor(
            [0, 3, 3, 7, 9][: 4 + ("include_last_offset" in options)]
        )
        kwargs["include_last_offset"] = options.get("include_last_offset", False)
    else:
        input = torch.randint(0, NUM_EMBEDDINGS, (4, 3), generator=generator)
    input[0] = 2  # a bag of padding entries only where padding_idx is 2
    if options.get("per_sample_weights"):
        kwargs["per_sample_weights"] = torch.rand(
            input.shape, generator=generator, dtype=torch.float64
        )

    def value_and_grad(function: Any) -> tuple[Tensor, Tensor]:
        w = weight.clone().requires_grad_()
        out = function(input, w, **kwargs)
        (grad,) = torch.autograd.grad(out, w, torch.ones_like(out) + out.detach())
        return out.detach(), grad

    out, grad = value_and_grad(reverse_over_reverse._embedding_bag_composed)
    expected_out, expected_grad = value_and_grad(nn.functional.embedding_bag)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_functional_api():
    """``make_ggn_mv`` on an EmbeddingBag model equals the dense GGN."""
    model, _, params, data = embedding_bag_problem("sum", "ce")
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    mv = make_ggn_mv(model, dict(model.named_parameters()), data[1], loss_func)
    dense = dense_ggn(model, loss_func, params, data[1:])
    V = torch.randn(dense.shape[0], 2, dtype=torch.float64)
    assert_matrix_close(mv(V[:, 0]), dense @ V[:, 0])
    assert_matrix_close(mv(V), dense @ V)


def test_decision_is_remembered(monkeypatch: pytest.MonkeyPatch):
    """After the first product, products skip forward mode."""
    model, loss_func, params, data = embedding_bag_problem()
    op = GGNLinearOperator(model, loss_func, params, data)
    v = torch.randn(op.shape[1], dtype=torch.float64)
    first = op @ v

    def forward_mode(*args: Any) -> None:
        raise AssertionError("forward mode tried again")

    strategies = tuple(
        dataclasses.replace(s, attempt=forward_mode) if s.forward_mode else s
        for s in core.STRATEGIES
    )
    monkeypatch.setattr(core, "STRATEGIES", strategies)
    assert_matrix_close(op @ v, first)
    op @ torch.randn(op.shape[1], 2, dtype=torch.float64)


class _NoAttributes:
    """A model function that takes no attributes (nowhere to keep the decision)."""

    __slots__ = ("function",)

    def __init__(self, function: Any):
        self.function = function

    def __call__(self, params: tuple[Tensor, ...], X: Tensor) -> Tensor:
        return self.function(params, X)


def test_model_function_without_attributes():
    """A model function without attributes falls back on every call (and is exact)."""
    model, _, params, data = embedding_bag_problem()
    function = _NoAttributes(core.make_model_function(model, params))
    X = data[0][0]
    values = tuple(p.detach() for p in params)
    V = tuple(torch.randn(2, *p.shape, dtype=p.dtype) for p in params)
    jacobians = torch.func.jacrev(lambda p: function(p, X))(values)
    for K in (1, 2, 1):
        output, JV, _ = core.linearize(function, values, X, tuple(v[:K] for v in V))
        expected = sum(
            torch.einsum("...p,kp->k...", J.flatten(output.dim()), v[:K].flatten(1))
            for J, v in zip(jacobians, V)
        )
        torch.testing.assert_close(JV, expected)


def test_fallback_is_what_makes_it_work(monkeypatch: pytest.MonkeyPatch):
    """Mutation: without the fallback, PyTorch's forward-mode error is back."""
    monkeypatch.setattr(core, "REVERSE_OVER_REVERSE_FALLBACK", False)
    model, loss_func, params, data = embedding_bag_problem()
    op = GGNLinearOperator(model, loss_func, params, data)
    for K in (1, 2):
        with pytest.raises(NotImplementedError, match="forward AD with _embedding_bag"):
            op @ torch.randn(op.shape[1], K, dtype=torch.float64)


def test_composition_is_what_makes_it_work(monkeypatch: pytest.MonkeyPatch):
    """Mutation: without the composition, EmbeddingBag's double backward fails."""
    monkeypatch.setattr(
        reverse_over_reverse, "_embedding_bag_composed", lambda *a, **k: None
    )
    model, loss_func, params, data = embedding_bag_problem()
    op = GGNLinearOperator(model, loss_func, params, data)
    with pytest.raises(UnsupportedOperationError, match="_embedding_bag_backward"):
        op @ torch.randn(op.shape[1], dtype=torch.float64)


class Doubled(torch.autograd.Function):
    """``2 x`` with a backward that is not differentiable and no ``jvp``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return 2 * x

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return 2 * grad.detach()


class DoubledLayer(nn.Module):
    """Module around :class:`Doubled`."""

    def forward(self, x: Tensor) -> Tensor:
        return Doubled.apply(x)


def doubled_problem() -> tuple[nn.Module, nn.Module, list[Tensor], list[Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), DoubledLayer(), nn.Linear(4, 2))
    model = model.double()
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


@pytest.mark.parametrize("K", [1, 3])
def test_neither_forward_mode_nor_double_backward(K: int):
    """An operation with neither derivative raises the library error naming it."""
    model, loss_func, params, data = doubled_problem()
    op = GGNLinearOperator(model, loss_func, params, data)
    with pytest.raises(UnsupportedOperationError) as info:
        op @ torch.randn(op.shape[1], K, dtype=torch.float64)
    assert info.value.op == "autograd.Function Doubled"
    assert info.value.layer == "'2' (DoubledLayer)"
    message = str(info.value)
    assert "Doubled" in message and "'2' (DoubledLayer)" in message
    assert "jvp staticmethod" in message


def test_adjoint_check_is_what_catches_it(monkeypatch: pytest.MonkeyPatch):
    """Mutation: without the adjoint check, the product is silently wrong."""
    monkeypatch.setattr(reverse_over_reverse, "_check_adjoint", lambda *args: None)
    model, loss_func, params, data = doubled_problem()
    op = GGNLinearOperator(model, loss_func, params, data)
    v = torch.randn(op.shape[1], dtype=torch.float64)
    dense = dense_ggn(model, loss_func, params, data)
    assert not torch.allclose(op @ v, dense @ v)


def test_embedding_bag_max_mode_raises():
    """Mode ``max`` has neither derivative: the error names the op and the layer."""
    model, loss_func, params, data = embedding_bag_problem("max")
    op = GGNLinearOperator(model, loss_func, params, data)
    with pytest.raises(UnsupportedOperationError, match="'0' \\(EmbeddingBag\\)"):
        op @ torch.randn(op.shape[1], dtype=torch.float64)
