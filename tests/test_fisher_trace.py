"""Tests for ``curvlinops_fisher.fisher_trace`` (torch_secorder-style trace functions).

References are brute force in float64 with ``torch.func``: per-term gradients with
``vmap`` for the empirical Fisher, ``jacrev`` and ``hessian`` for the GGN. Statistical
checks average ``R`` estimates drawn with the fixed seeds ``0, ..., R - 1`` and compare
the mean to the exact value with a tolerance of six standard errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from problems import UnusedLayerMLP, make_problem
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from curvlinops_fisher import EFLinearOperator, GGNLinearOperator
from curvlinops_fisher.errors import NonDeterministicError, ParameterError
from curvlinops_fisher.fisher_trace import (
    empirical_fisher_trace,
    generalized_fisher_trace,
)

MODELS = ("mlp_tanh", "seq")  # seq: MSE/BCE on (N, T, C), CE on (N, C, T)
LOSSES = ("mse", "ce", "bce")
REDUCTIONS = ("mean", "sum")
CASES = [(m, loss, r) for m in MODELS for loss in LOSSES for r in REDUCTIONS]


def problem_batch(model_name: str, loss_name: str, reduction: str = "mean"):
    """A float64 problem with one batch: ``(model, loss_func, X, y)``."""
    problem = make_problem(model_name, loss_name, reduction, layout="single")
    X, y = problem.batches[0]
    return problem.model, problem.loss_func, X, y


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-10) -> None:
    actual, expected = actual.detach().double(), expected.detach().double()
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max())
    )


# ------------------------------------------------------------- brute force


def functional(model: nn.Module):
    """``(theta, f)``: the trainable parameters as one flat vector and ``f(theta, X)``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    theta = torch.cat([p.detach().flatten() for _, p in named])

    def f(theta: Tensor, X: Tensor) -> Tensor:
        tensors = theta.split([s.numel() for s in shapes])
        values = {n: t.reshape(s) for n, t, s in zip(names, tensors, shapes)}
        return functional_call(model, values, (X,))

    return theta, f


def term_losses(out: Tensor, y: Tensor, loss_func: nn.Module) -> Tensor:
    """Sum-reduced loss of every loss term (MSE/BCE: summed over the last axis)."""
    unreduced = copy.copy(loss_func)
    unreduced.reduction = "none"
    losses = unreduced(out, y)
    if not isinstance(loss_func, nn.CrossEntropyLoss):
        losses = losses.sum(-1)
    return losses.flatten()


def reduction_scale(out: Tensor, y: Tensor, loss_func: nn.Module) -> float:
    """1 for sum; one over PyTorch's mean divisor (CE: #terms, MSE/BCE: #entries)."""
    if loss_func.reduction == "sum":
        return 1.0
    return 1.0 / (
        y.numel() if isinstance(loss_func, nn.CrossEntropyLoss) else out.numel()
    )


def brute_per_term_gradients(model, loss_func, X, y) -> Tensor:
    """Gradients of every term's loss, ``(N, terms per datum, P)``, via ``vmap``."""
    theta, f = functional(model)

    def datum_losses(theta: Tensor, x: Tensor, y_n: Tensor) -> Tensor:
        return term_losses(f(theta, x[None]), y_n[None], loss_func)

    return vmap(jacrev(datum_losses), in_dims=(None, 0, 0))(theta, X, y)


def brute_ef_trace(model, loss_func, X, y) -> Tensor:
    G = brute_per_term_gradients(model, loss_func, X, y)
    return reduction_scale(model(X), y, loss_func) * G.square().sum()


def brute_ggn_trace(theta: Tensor, f, loss_func, X, y) -> Tensor:
    """``tr(J^T H J)`` with ``J = jacrev(f)``, ``H = hessian(loss)``; differentiable."""
    out = f(theta, X)
    J = jacrev(f)(theta, X).reshape(out.numel(), -1)
    H = hessian(lambda o: loss_func(o, y))(out).reshape(out.numel(), out.numel())
    return (H * (J @ J.T)).sum()


def ggn_trace(model, loss_func, X, y) -> Tensor:
    theta, f = functional(model)
    return brute_ggn_trace(theta, f, loss_func, X, y)


def assert_unbiased(estimates: list[Tensor], exact: Tensor) -> None:
    samples = torch.stack([e.detach() for e in estimates])
    standard_error = samples.std() / len(estimates) ** 0.5
    tolerance = max(6 * float(standard_error), 1e-10 * float(exact.abs()))
    assert abs(float(samples.mean() - exact)) <= tolerance
    assert float(samples.std()) > 0  # a real estimate, not the exact value


# ----------------------------------------------------------- exact values


@pytest.mark.parametrize("model_name,loss_name,reduction", CASES)
def test_empirical_fisher_trace_exact(model_name, loss_name, reduction):
    model, loss_func, X, y = problem_batch(model_name, loss_name, reduction)
    expected = brute_ef_trace(model, loss_func, X, y)
    assert_close(empirical_fisher_trace(model, loss_func, X, y), expected)


@pytest.mark.parametrize("model_name,loss_name,reduction", CASES)
def test_generalized_fisher_trace_exact(model_name, loss_name, reduction):
    model, loss_func, X, y = problem_batch(model_name, loss_name, reduction)
    result = generalized_fisher_trace(model, model(X), y, loss_fn=loss_func)
    assert not result.requires_grad
    assert_close(result, ggn_trace(model, loss_func, X, y))


@pytest.mark.parametrize("loss_name", LOSSES)
def test_traces_equal_operator_traces(loss_name):
    model, loss_func, X, y = problem_batch("seq", loss_name)
    params = list(model.parameters())
    ggn = GGNLinearOperator(model, loss_func, params, [(X, y)]).trace()
    ef = EFLinearOperator(model, loss_func, params, [(X, y)]).trace()
    assert_close(generalized_fisher_trace(model, model(X), y, loss_func), ggn)
    assert_close(empirical_fisher_trace(model, loss_func, X, y), ef)


def test_chunking_does_not_change_the_result():
    model, loss_func, X, y = problem_batch("seq", "ce")
    out = model(X)
    exact = generalized_fisher_trace(model, out, y, loss_func)
    assert_close(
        generalized_fisher_trace(model, out, y, loss_func, chunk_bytes=1), exact
    )
    kwargs = {"num_samples": 7, "loss_fn": loss_func}
    one_chunk = generalized_fisher_trace(model, out, y, generator=gen(3), **kwargs)
    chunked = generalized_fisher_trace(
        model, out, y, generator=gen(3), chunk_bytes=1, **kwargs
    )
    assert_close(chunked, one_chunk)


def test_ef_trace_is_not_the_squared_batch_gradient_norm():
    """torch_secorder returns ||grad L||^2; the EF trace is c * sum_t ||grad l_t||^2."""
    model, loss_func, X, y = problem_batch("mlp_tanh", "mse", "mean")
    c = reduction_scale(model(X), y, loss_func)
    G = brute_per_term_gradients(model, loss_func, X, y).flatten(0, 1)  # (T, P)
    batch_gradient = torch.cat(
        [
            g.flatten()
            for g in torch.autograd.grad(loss_func(model(X), y), model.parameters())
        ]
    )
    assert_close(batch_gradient, c * G.sum(0))  # the batch gradient is c * sum_t g_t
    squared_batch_norm = batch_gradient.square().sum()

    trace = empirical_fisher_trace(model, loss_func, X, y)
    assert_close(trace, c * G.square().sum())
    assert float(trace) > 2 * float(squared_batch_norm)


def test_only_trainable_and_used_parameters():
    model, loss_func, X, y = problem_batch("mlp_tanh", "ce")
    model.fc1.requires_grad_(False)
    expected_ef = brute_ef_trace(model, loss_func, X, y)
    expected_ggn = ggn_trace(model, loss_func, X, y)
    assert_close(empirical_fisher_trace(model, loss_func, X, y), expected_ef)
    assert_close(generalized_fisher_trace(model, model(X), y), expected_ggn)

    unused = UnusedLayerMLP().double()  # a layer that forward never uses
    reference = copy.deepcopy(unused)
    reference.unused.requires_grad_(False)
    assert_close(
        empirical_fisher_trace(unused, loss_func, X, y),
        brute_ef_trace(reference, loss_func, X, y),
    )
    assert_close(
        generalized_fisher_trace(unused, unused(X), y),
        ggn_trace(reference, loss_func, X, y),
    )


# ------------------------------------------------------ loss_type strings


@pytest.mark.parametrize(
    "loss_type,loss_func",
    [
        ("nll", nn.CrossEntropyLoss()),
        ("cross_entropy", nn.CrossEntropyLoss()),
        ("mse", nn.MSELoss()),
        ("bce", nn.BCEWithLogitsLoss()),
    ],
)
def test_loss_type_strings(loss_type, loss_func):
    loss_name = {"nll": "ce", "cross_entropy": "ce"}.get(loss_type, loss_type)
    model, _, X, y = problem_batch("mlp_tanh", loss_name)
    result = generalized_fisher_trace(model, model(X), y, loss_type=loss_type)
    assert_close(result, ggn_trace(model, loss_func, X, y))


def test_loss_fn_takes_precedence_over_loss_type():
    model, loss_func, X, y = problem_batch("mlp_tanh", "mse", "sum")
    result = generalized_fisher_trace(model, model(X), y, loss_func, loss_type="bce")
    assert_close(result, ggn_trace(model, loss_func, X, y))


# ------------------------------------------------------------ Hutchinson


@pytest.mark.parametrize("loss_name", LOSSES)
def test_generalized_hutchinson_unbiased(loss_name):
    model, loss_func, X, y = problem_batch("seq", loss_name, "sum")
    out = model(X)
    estimates = [
        generalized_fisher_trace(
            model, out, y, loss_func, num_samples=2, generator=gen(s)
        )
        for s in range(300)
    ]
    assert_unbiased(estimates, ggn_trace(model, loss_func, X, y))


@pytest.mark.parametrize("loss_name", LOSSES)
def test_empirical_hutchinson_unbiased(loss_name):
    model, loss_func, X, y = problem_batch("mlp_tanh", loss_name, "mean")
    estimates = [
        empirical_fisher_trace(model, loss_func, X, y, num_samples=20, generator=gen(s))
        for s in range(40)
    ]
    assert_unbiased(estimates, brute_ef_trace(model, loss_func, X, y))


def test_hutchinson_deterministic_with_generator():
    model, loss_func, X, y = problem_batch("seq", "ce")
    out = model(X)

    def ggn(generator):
        return generalized_fisher_trace(
            model, out, y, num_samples=3, generator=generator
        )

    def ef(generator):
        return empirical_fisher_trace(
            model, loss_func, X, y, num_samples=3, generator=generator
        )

    for estimate in (ggn, ef):
        assert torch.equal(estimate(gen(5)), estimate(gen(5)))
        assert not torch.equal(estimate(gen(5)), estimate(gen(6)))
        torch.manual_seed(0)
        first = estimate(None)
        torch.manual_seed(0)
        assert torch.equal(estimate(None), first)


# --------------------------------------------------------- create_graph


@pytest.mark.parametrize("loss_name", LOSSES)
def test_create_graph_gradient_matches_torch_func(loss_name):
    model, loss_func, X, y = problem_batch("mlp_tanh", loss_name, "sum")
    params = list(model.parameters())
    result = generalized_fisher_trace(model, model(X), y, loss_func, create_graph=True)
    gradient = torch.cat(
        [
            g.flatten()
            for g in torch.autograd.grad(result, params, materialize_grads=True)
        ]
    )

    theta, f = functional(model)
    expected = grad(brute_ggn_trace)(theta, f, loss_func, X, y)
    assert_close(result, brute_ggn_trace(theta, f, loss_func, X, y))
    assert_close(gradient, expected, rtol=1e-9)


def test_create_graph_hutchinson_is_differentiable_and_graph_is_retained():
    model, loss_func, X, y = problem_batch("mlp_tanh", "ce")
    out = model(X)
    estimate = generalized_fisher_trace(
        model, out, y, num_samples=2, create_graph=True, generator=gen(0)
    )
    assert estimate.requires_grad
    grads = torch.autograd.grad(estimate, list(model.parameters()), retain_graph=True)
    assert all(torch.isfinite(g).all() for g in grads)
    loss_func(out, y).backward()  # the caller's graph is still usable
    assert model.fc1.weight.grad is not None


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("num_samples", [0, -2, 1.5, True, "3"])
def test_bad_num_samples(num_samples):
    model, loss_func, X, y = problem_batch("mlp_tanh", "ce")
    with pytest.raises(ValueError, match="num_samples"):
        empirical_fisher_trace(model, loss_func, X, y, num_samples=num_samples)
    with pytest.raises(ValueError, match="num_samples"):
        generalized_fisher_trace(model, model(X), y, num_samples=num_samples)


def test_bad_loss_type_lists_the_options():
    model, _, X, y = problem_batch("mlp_tanh", "ce")
    with pytest.raises(ValueError, match="'nll', 'cross_entropy', 'mse', 'bce'"):
        generalized_fisher_trace(model, model(X), y, loss_type="hinge")


def test_outputs_without_graph():
    model, _, X, y = problem_batch("mlp_tanh", "ce")
    with torch.no_grad():
        no_grad_outputs = model(X)
    for outputs in (model(X).detach(), no_grad_outputs):
        with pytest.raises(ValueError, match="no autograd graph"):
            generalized_fisher_trace(model, outputs, y)
    with pytest.raises(ValueError, match="batch axis"):
        generalized_fisher_trace(model, model(X).sum(), y, loss_type="mse")


def test_outputs_of_another_model_or_no_trainable_parameters():
    model, _, X, y = problem_batch("mlp_tanh", "ce")
    other, _, _, _ = problem_batch("mlp_tanh", "ce")
    with pytest.raises(ParameterError, match="do not depend"):
        generalized_fisher_trace(model, other(X), y)
    model.requires_grad_(False)
    with pytest.raises(ParameterError, match="no trainable parameters"):
        generalized_fisher_trace(model, other(X), y)
    with pytest.raises(ParameterError, match="no trainable parameters"):
        empirical_fisher_trace(model, nn.CrossEntropyLoss(), X, y)


def test_targets_and_training_mode_are_checked():
    model, loss_func, X, y = problem_batch("mlp_tanh", "ce")
    with pytest.raises(ValueError, match="targets"):
        generalized_fisher_trace(model, model(X), y[:-1])
    with pytest.raises(ValueError, match="targets"):
        empirical_fisher_trace(model, loss_func, X, y.double())
    dropout = nn.Sequential(model, nn.Dropout(0.5)).train()
    with pytest.raises(NonDeterministicError):
        empirical_fisher_trace(dropout, loss_func, X, y)
