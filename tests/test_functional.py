"""Functional API: products with and without fixed data, against brute force.

Ground truth: the dense float64 matrices of ``reference.py`` (sum-reduced losses, so
the functional sums are compared with the references as they are) and the operators.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from problems import LOSSES, Problem, make_loss, make_problem, supports
from reference import (
    assert_matrix_close,
    dense_ef,
    dense_fisher_mc,
    dense_ggn,
)
from torch import Tensor, nn

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    core,
)
from curvlinops_fisher.errors import (
    DataError,
    ParameterError,
    UnsupportedLossError,
    VectorFormatError,
)
from curvlinops_fisher.functional import (
    make_ef_mv,
    make_ef_mv_without_data,
    make_fisher_mc_mv,
    make_fisher_mc_mv_without_data,
    make_ggn_mv,
    make_ggn_mv_without_data,
)

DEFAULT_SEED = 2147483647
KINDS = ("ggn", "mc", "ef")
WITH_DATA = {"ggn": make_ggn_mv, "mc": make_fisher_mc_mv, "ef": make_ef_mv}
WITHOUT_DATA = {
    "ggn": make_ggn_mv_without_data,
    "mc": make_fisher_mc_mv_without_data,
    "ef": make_ef_mv_without_data,
}
OPERATORS = {
    "ggn": GGNLinearOperator,
    "mc": FisherMCLinearOperator,
    "ef": EFLinearOperator,
}
MODELS = ("mlp_tanh", "seq", "conv_seg", "dict", "subset", "mlp_bn", "scalar")
CASES = [
    (model, loss, kind)
    for model in MODELS
    for loss in LOSSES
    for kind in KINDS
    if supports(model, loss)
]


def _ids(case: tuple[Any, ...]) -> str:
    return "-".join(str(c) for c in case)


def named(problem: Problem) -> dict[str, Tensor]:
    """The problem's params as a dict name -> tensor, in the order of ``params``."""
    names = {id(p): n for n, p in problem.model.named_parameters()}
    return {names[id(p)]: p for p in problem.params}


def reference(problem: Problem, kind: str, **kwargs: Any) -> Tensor:
    """Dense float64 reference of the problem's data (its loss's reduction)."""
    dense = {"ggn": dense_ggn, "mc": dense_fisher_mc, "ef": dense_ef}[kind]
    return dense(*problem.args(), **problem.kwargs(), **kwargs)


def dense_of(mv: Callable[[Tensor], Tensor], dim: int) -> Tensor:
    """A product function applied to the identity (flat matrix format)."""
    return mv(torch.eye(dim, dtype=torch.float64))


def sum_loss(problem: Problem) -> nn.Module:
    """The problem's loss with ``reduction='sum'``."""
    return make_loss(problem.loss_name, "sum")


# -------------------------------------------------------------- brute force
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_with_data_matches_brute_force(case: tuple[str, str, str]) -> None:
    model, loss, kind = case
    problem = make_problem(model, loss, "sum", layout="single")
    (batch,) = problem.batches
    mv = WITH_DATA[kind](problem.model, named(problem), batch, problem.loss_func)
    assert_matrix_close(dense_of(mv, problem.dim), reference(problem, kind))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "counts, factor", [((None, 60), 10.0), ((3, None), 2.0), ((4, 10), 2.5)]
)
def test_with_data_dataset_factor(
    kind: str, loss: str, counts: tuple[int | None, int | None], factor: float
) -> None:
    """``num_total_samples / num_curv_samples``, both defaulting to the batch size 6."""
    problem = make_problem("mlp_tanh", loss, "sum", layout="single")
    (batch,) = problem.batches
    num_curv, num_total = counts
    mv = WITH_DATA[kind](
        problem.model,
        named(problem),
        batch,
        problem.loss_func,
        num_curv_samples=num_curv,
        num_total_samples=num_total,
    )
    expected = factor * reference(problem, kind)
    assert_matrix_close(dense_of(mv, problem.dim), expected)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_without_data_matches_brute_force(case: tuple[str, str, str]) -> None:
    """Summed over unequal batches with ``factor``; one generator across batches."""
    model, loss, kind = case
    problem = make_problem(model, loss, "sum", layout="unequal")
    factor = 0.25
    mv = WITHOUT_DATA[kind](
        problem.model, named(problem), problem.loss_func, factor=factor
    )
    identity = torch.eye(problem.dim, dtype=torch.float64)
    generator = torch.Generator().manual_seed(7)
    extra = {"generator": generator} if kind == "mc" else {}
    actual = sum(mv(identity, batch, **extra) for batch in problem.batches)
    seed = {"seed": 7} if kind == "mc" else {}
    assert_matrix_close(actual, factor * reference(problem, kind, **seed))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_operator_is_scaled_sum_of_functional(
    kind: str, loss: str, reduction: str
) -> None:
    """Operator = sum over batches of the functional products times the scale."""
    problem = make_problem("mlp_relu", loss, reduction, layout="loader")
    scale = 1.0 if reduction == "sum" else 1.0 / problem.mean_to_sum_factor()
    mv = WITHOUT_DATA[kind](
        problem.model, named(problem), sum_loss(problem), factor=scale
    )
    op = OPERATORS[kind](*problem.args())
    V = torch.randn(problem.dim, 3, dtype=torch.float64)
    generator = torch.Generator().manual_seed(DEFAULT_SEED)
    extra = {"generator": generator} if kind == "mc" else {}
    actual = sum(mv(V, batch, **extra) for batch in problem.data)
    torch.testing.assert_close(actual, op @ V, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_with_data_agrees_with_operator_float32(kind: str) -> None:
    """Same code path as the operator: equal to rounding also in float32."""
    problem = make_problem("seq", "ce", "sum", layout="single", dtype=torch.float32)
    (batch,) = problem.batches
    mv = WITH_DATA[kind](problem.model, named(problem), batch, problem.loss_func)
    op = OPERATORS[kind](*problem.args())
    v = torch.randn(problem.dim)
    torch.testing.assert_close(mv(v), op @ v, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ batch handling
@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("loss", LOSSES)
def test_batch_product_is_sum_over_examples(kind: str, loss: str) -> None:
    problem = make_problem("seq", loss, "sum", layout="single")
    (batch,) = problem.batches
    X, y = batch
    mv = WITHOUT_DATA[kind](problem.model, named(problem), problem.loss_func)
    v = torch.randn(problem.dim, dtype=torch.float64)
    per_example = sum(mv(v, (X[n : n + 1], y[n : n + 1])) for n in range(len(X)))
    torch.testing.assert_close(mv(v, batch), per_example, rtol=1e-12, atol=1e-13)


def test_ef_never_mixes_examples() -> None:
    """EF on a batch = sum_n g_n (g_n^T v) with per-example gradients."""
    problem = make_problem("mlp_tanh", "ce", "sum", layout="single")
    (batch,) = problem.batches
    X, y = batch
    params = named(problem)
    grads = []
    for n in range(len(X)):
        loss = problem.loss_func(problem.model(X[n : n + 1]), y[n : n + 1])
        g = torch.autograd.grad(loss, list(params.values()))
        grads.append(torch.cat([gi.flatten() for gi in g]))
    G = torch.stack(grads)
    v = torch.randn(problem.dim, dtype=torch.float64)
    mv = make_ef_mv(problem.model, params, batch, problem.loss_func)
    torch.testing.assert_close(mv(v), G.T @ (G @ v), rtol=1e-12, atol=1e-13)


# -------------------------------------------------------- models and formats
class _PureMLP:
    """The MLP of ``problems.py`` as a pure function of a parameter dict."""

    def __call__(self, params: dict[str, Tensor], X: Tensor) -> Tensor:
        hidden = torch.tanh(X @ params["fc1.weight"].T + params["fc1.bias"])
        return hidden @ params["fc2.weight"].T + params["fc2.bias"]


@pytest.mark.parametrize("kind", KINDS)
def test_pure_function_model(kind: str) -> None:
    problem = make_problem("mlp_tanh", "bce", "sum", layout="single")
    (batch,) = problem.batches
    params = {n: p.detach().clone() for n, p in named(problem).items()}
    mv = WITH_DATA[kind](_PureMLP(), params, batch, problem.loss_func)
    assert_matrix_close(dense_of(mv, problem.dim), reference(problem, kind))


def test_params_are_the_linearization_point() -> None:
    """Values in params replace the module's; the module is untouched."""
    problem = make_problem("mlp_tanh", "mse", "sum", layout="single")
    (batch,) = problem.batches
    shifted = {n: p.detach() + 0.1 for n, p in named(problem).items()}
    before = [p.detach().clone() for p in problem.params]
    mv = make_ggn_mv(problem.model, shifted, batch, problem.loss_func)
    actual = dense_of(mv, problem.dim)
    for p, old in zip(problem.params, before):
        assert torch.equal(p, old)
    with torch.no_grad():
        for p, value in zip(problem.params, shifted.values()):
            p.copy_(value)
    assert_matrix_close(actual, reference(problem, "ggn"))


@pytest.mark.parametrize("closed_form", [True, False], ids=["chain", "ad"])
@pytest.mark.parametrize("kind", KINDS)
def test_module_called_twice(monkeypatch, kind: str, closed_form: bool) -> None:
    """A layer registered twice: its parameter counts once, the module keeps it."""
    monkeypatch.setattr(core, "SEQUENTIAL_CHAIN_PRODUCTS", closed_form)
    torch.manual_seed(0)
    shared = nn.Linear(5, 5)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(5, 3)
    ).double()
    held = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    params = dict(model.named_parameters())  # '4.weight' is '2.weight'
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    mv = WITH_DATA[kind](model, params, batch, loss_func)
    dim = sum(p.numel() for p in params.values())
    actual = dense_of(mv, dim)
    v = torch.randn(dim, dtype=torch.float64)
    torch.testing.assert_close(mv(v), actual @ v)
    assert [id(p) for _, p in model.named_parameters(remove_duplicate=False)] == held
    dense = {"ggn": dense_ggn, "mc": dense_fisher_mc, "ef": dense_ef}[kind]
    assert_matrix_close(actual, dense(model, loss_func, list(params.values()), [batch]))


@pytest.mark.parametrize("kind", KINDS)
def test_vector_formats(kind: str) -> None:
    """Flat [P], flat [P, K], dict, dict with trailing K: same numbers, same format."""
    problem = make_problem("conv", "ce", "sum", layout="single")
    (batch,) = problem.batches
    params = named(problem)
    mv = WITH_DATA[kind](problem.model, params, batch, problem.loss_func)
    V = torch.randn(problem.dim, 3, dtype=torch.float64)
    expected = mv(V)
    assert expected.shape == (problem.dim, 3)

    flat = torch.stack([mv(V[:, k]) for k in range(3)], dim=1)
    torch.testing.assert_close(flat, expected, rtol=1e-12, atol=1e-13)

    def as_dict(x: Tensor) -> dict[str, Tensor]:
        chunks = x.split([p.numel() for p in params.values()])
        return {
            n: c.reshape(*p.shape, *x.shape[1:])
            for (n, p), c in zip(params.items(), chunks)
        }

    for k in range(3):
        out = mv(as_dict(V[:, k]))
        assert list(out) == list(params)
        assert all(out[n].shape == p.shape for n, p in params.items())
        for n, value in as_dict(expected[:, k]).items():
            torch.testing.assert_close(out[n], value, rtol=1e-12, atol=1e-13)
    out = mv(as_dict(V))
    for n, value in as_dict(expected).items():
        torch.testing.assert_close(out[n], value, rtol=1e-12, atol=1e-13)


def test_laplax_data_format_and_zero_columns() -> None:
    problem = make_problem("mlp_tanh", "mse", "sum", layout="single")
    (batch,) = problem.batches
    X, y = batch
    params = named(problem)
    v = torch.randn(problem.dim, dtype=torch.float64)
    mv = make_ggn_mv(problem.model, params, batch, problem.loss_func)
    mv_dict = make_ggn_mv(
        problem.model, params, {"input": X, "target": y}, problem.loss_func
    )
    torch.testing.assert_close(mv_dict(v), mv(v), rtol=0, atol=0)
    assert mv(torch.zeros(problem.dim, 0, dtype=torch.float64)).shape == (
        problem.dim,
        0,
    )


# ----------------------------------------------------------------- sampling
def test_generator_determinism() -> None:
    problem = make_problem("mlp_tanh", "ce", "sum", layout="single")
    (batch,) = problem.batches
    args = (problem.model, named(problem), batch, problem.loss_func)
    v = torch.randn(problem.dim, dtype=torch.float64)

    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    mv = make_fisher_mc_mv(*args, mc_samples=2, generator=generator)
    first = mv(v)
    torch.testing.assert_close(mv(v), first, rtol=0, atol=0)  # one fixed matrix
    assert torch.equal(generator.get_state(), state)  # the caller's is not advanced
    by_seed = make_fisher_mc_mv(*args, mc_samples=2, generator=3)(v)
    torch.testing.assert_close(by_seed, first, rtol=0, atol=0)
    other = make_fisher_mc_mv(*args, mc_samples=2, generator=4)(v)
    assert not torch.allclose(other, first)
    default = make_fisher_mc_mv(*args)(v)
    torch.testing.assert_close(
        default, make_fisher_mc_mv(*args, generator=DEFAULT_SEED)(v), rtol=0, atol=0
    )

    mv_free = make_fisher_mc_mv_without_data(
        problem.model, named(problem), problem.loss_func, mc_samples=2
    )
    torch.testing.assert_close(mv_free(v, batch, 3), first, rtol=0, atol=0)
    generator = torch.Generator().manual_seed(3)
    torch.testing.assert_close(mv_free(v, batch, generator), first, rtol=0, atol=0)
    assert not torch.allclose(mv_free(v, batch, generator), first)  # advanced


@pytest.mark.parametrize("loss", LOSSES)
def test_mc_matches_operator_seed_and_samples(loss: str) -> None:
    problem = make_problem("mlp_tanh", loss, "sum", layout="single")
    (batch,) = problem.batches
    mv = make_fisher_mc_mv(
        problem.model,
        named(problem),
        batch,
        problem.loss_func,
        mc_samples=5,
        generator=11,
    )
    op = FisherMCLinearOperator(*problem.args(), seed=11, mc_samples=5)
    V = torch.randn(problem.dim, 4, dtype=torch.float64)
    torch.testing.assert_close(mv(V), op @ V, rtol=1e-13, atol=1e-14)


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_reduction_other_than_sum_is_an_error(reduction: str, kind: str) -> None:
    problem = make_problem("mlp_tanh", "mse", "sum", layout="single")
    loss_func = nn.MSELoss(reduction=reduction)
    with pytest.raises(UnsupportedLossError, match="reduction='sum'.*factor"):
        WITHOUT_DATA[kind](problem.model, named(problem), loss_func)
    with pytest.raises(UnsupportedLossError, match="num_total_samples"):
        WITH_DATA[kind](problem.model, named(problem), problem.batches[0], loss_func)


def test_unsupported_loss_is_an_error() -> None:
    problem = make_problem("mlp_tanh", "ce", "sum", layout="single")
    with pytest.raises(UnsupportedLossError, match="NLLLoss"):
        make_ggn_mv_without_data(
            problem.model, named(problem), nn.NLLLoss(reduction="sum")
        )


def test_bad_arguments_are_errors() -> None:
    problem = make_problem("mlp_tanh", "mse", "sum", layout="single")
    (batch,) = problem.batches
    model, loss_func, params = problem.model, problem.loss_func, named(problem)
    with pytest.raises(ParameterError, match="dict"):
        make_ggn_mv(model, list(params.values()), batch, loss_func)
    with pytest.raises(ParameterError, match="not a parameter of the model"):
        make_ggn_mv(model, {"nope": torch.zeros(2)}, batch, loss_func)
    with pytest.raises(ParameterError, match="shape"):
        make_ggn_mv(model, {"fc1.bias": torch.zeros(2)}, batch, loss_func)
    with pytest.raises(ParameterError, match="model_func"):
        make_ggn_mv(3, params, batch, loss_func)
    with pytest.raises(DataError, match="one batch"):
        make_ggn_mv(model, params, [batch, batch, batch], loss_func)
    with pytest.raises(ValueError, match="num_curv_samples"):
        make_ggn_mv(model, params, batch, loss_func, num_curv_samples=0)
    with pytest.raises(DataError, match="num_curv_samples and num_total_samples"):
        make_ggn_mv(model, params, ({"x": batch[0]}, batch[1]), loss_func, None, 4)
    with pytest.raises(ValueError, match="mc_samples"):
        make_fisher_mc_mv(model, params, batch, loss_func, mc_samples=0)
    with pytest.raises(ValueError, match="generator"):
        make_fisher_mc_mv(model, params, batch, loss_func, generator=1.5)
    with pytest.raises(ValueError, match="factor"):
        make_ef_mv_without_data(model, params, loss_func, factor="1")

    mv = make_ggn_mv(model, params, batch, loss_func)
    with pytest.raises(VectorFormatError, match=r"\[P\] or \[P, K\]"):
        mv(torch.zeros(problem.dim + 1, dtype=torch.float64))
    with pytest.raises(VectorFormatError, match="float32"):
        mv(torch.zeros(problem.dim))
    with pytest.raises(VectorFormatError, match="missing"):
        mv({"fc1.weight": torch.zeros(5, 4, dtype=torch.float64)})
    with pytest.raises(VectorFormatError, match="shapes"):
        mv({n: torch.zeros(2, dtype=torch.float64) for n in params})


def test_bad_targets_are_errors() -> None:
    problem = make_problem("mlp_tanh", "ce", "sum", layout="single")
    X, y = problem.batches[0]
    mv = make_ggn_mv(problem.model, named(problem), (X, y + 5), problem.loss_func)
    v = torch.zeros(problem.dim, dtype=torch.float64)
    with pytest.raises(ValueError, match="out of range"):
        mv(v)
    mv = make_ggn_mv_without_data(problem.model, named(problem), problem.loss_func)
    with pytest.raises(ValueError, match="out of range"):
        mv(v, (X, y + 5))


# ------------------------------------------------------------ torch.compile
def _compiler_unavailable() -> str | None:
    """Why ``torch.compile`` cannot run here, or ``None``."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) is not supported on this Python/platform"
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        return "no C compiler for the CPU inductor backend"
    return None


@pytest.mark.skipif(
    _compiler_unavailable() is not None, reason=str(_compiler_unavailable())
)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_torch_compile_product_functions() -> None:
    """``torch.compile`` of a product function runs and agrees with eager mode.

    Skipped, with the reason, where dynamo is unsupported or no C compiler exists for
    inductor's CPU code. Under compilation the
    single-column product takes the ``torch.func`` path (dual numbers do not trace).
    """
    torch._dynamo.reset()
    problem = make_problem("mlp_tanh", "mse", "sum", layout="single")
    (batch,) = problem.batches
    params = named(problem)
    v = torch.randn(problem.dim, dtype=torch.float64)
    mv = make_ggn_mv(problem.model, params, batch, problem.loss_func, None, 12)
    torch.testing.assert_close(torch.compile(mv)(v), mv(v), rtol=1e-10, atol=1e-12)
    mv_free = make_ef_mv_without_data(
        problem.model, params, problem.loss_func, factor=0.5
    )
    V = torch.randn(problem.dim, 2, dtype=torch.float64)
    compiled = torch.compile(mv_free)
    torch.testing.assert_close(
        compiled(V, batch), mv_free(V, batch), rtol=1e-10, atol=1e-12
    )
