"""Dense GGN and empirical Fisher operators against the brute-force reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy
import pytest
import torch
from problems import (
    LOSSES,
    MODELS,
    REDUCTIONS,
    Problem,
    duplicate_data,
    make_problem,
    supports,
)
from reference import (
    assert_matrix_close,
    dense_ef,
    dense_fisher_mc,
    dense_ggn,
    relative_error,
    to_dense,
)
from scipy.sparse.linalg import LinearOperator
from torch.utils.data import DataLoader, TensorDataset

from curvlinops_fisher import (
    CurvatureLinearOperator,
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    IdentityLinearOperator,
    PyTorchLinearOperator,
)

#: Operator classes and their dense references (the MC Fisher with default seed/M).
OPERATORS: dict[str, tuple[type, Callable[..., torch.Tensor]]] = {
    "ggn": (GGNLinearOperator, dense_ggn),
    "ef": (EFLinearOperator, dense_ef),
}
ALL_OPERATORS: dict[str, tuple[type, Callable[..., torch.Tensor]]] = {
    **OPERATORS,
    "mc": (FisherMCLinearOperator, dense_fisher_mc),
}

MODEL_CASES = [
    (model, loss, reduction)
    for model in MODELS
    for loss in LOSSES
    for reduction in REDUCTIONS
    if supports(model, loss)
]
LAYOUT_CASES = [
    (model, loss, reduction, layout)
    for model in ("mlp_relu", "seq", "dict")
    for loss in LOSSES
    for reduction in REDUCTIONS
    for layout in ("single", "loader")
]


def _ids(case: tuple[Any, ...]) -> str:
    """Test id of a parameter tuple.

    Args:
        case: Tuple of strings.

    Returns:
        The entries joined by ``-``.
    """
    return "-".join(str(c) for c in case)


def build(name: str, problem: Problem, **kwargs: Any) -> CurvatureLinearOperator:
    """Construct an operator on a problem.

    Args:
        name: Key of :data:`ALL_OPERATORS`.
        problem: The problem.
        **kwargs: Further constructor arguments.

    Returns:
        The operator.
    """
    cls, _ = ALL_OPERATORS[name]
    return cls(*problem.args(), **problem.kwargs(), **kwargs)


def reference(name: str, problem: Problem, **kwargs: Any) -> torch.Tensor:
    """Dense reference matrix of a problem.

    Args:
        name: Key of :data:`ALL_OPERATORS`.
        problem: The problem.
        **kwargs: Further arguments of the reference (``num_data``, ``seed``, ...).

    Returns:
        The float64 reference matrix.
    """
    _, ref = ALL_OPERATORS[name]
    return ref(*problem.args(), **problem.kwargs(), **kwargs)


@pytest.mark.parametrize("case", MODEL_CASES, ids=_ids)
@pytest.mark.parametrize("name", list(OPERATORS))
def test_dense_matches_reference(name: str, case: tuple[str, str, str]) -> None:
    """``op @ I`` equals the reference for every model, loss and reduction.

    Args:
        name: Operator key.
        case: ``(model, loss, reduction)``; data in unequal batches ``(3, 5, 2)``.
    """
    problem = make_problem(*case, layout="unequal")
    op = build(name, problem)
    assert op.shape == (problem.dim, problem.dim)
    assert_matrix_close(to_dense(op), reference(name, problem))


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=_ids)
@pytest.mark.parametrize("name", list(OPERATORS))
def test_dense_layouts(name: str, case: tuple[str, str, str, str]) -> None:
    """One batch, and a ``DataLoader`` with a remainder batch, match the reference.

    Args:
        name: Operator key.
        case: ``(model, loss, reduction, layout)``.
    """
    problem = make_problem(*case)
    assert_matrix_close(to_dense(build(name, problem)), reference(name, problem))


@pytest.mark.parametrize("model", ["mlp_tanh", "seq", "scalar"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(OPERATORS))
def test_dense_soft_bce_targets(name: str, reduction: str, model: str) -> None:
    """BCE targets anywhere in ``[0, 1]`` (not only binary) are supported.

    Args:
        name: Operator key.
        reduction: ``"mean"`` or ``"sum"``.
        model: Model name.
    """
    problem = make_problem(model, "bce", reduction, "unequal", soft_bce=True)
    assert_matrix_close(to_dense(build(name, problem)), reference(name, problem))


@pytest.mark.parametrize("model", ["mlp_tanh", "conv", "seq"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_dense_float32(name: str, loss: str, model: str) -> None:
    """A float32 problem matches the float64 reference to ``1e-4`` (matrix norm).

    Args:
        name: Operator key.
        loss: Loss name.
        model: Model name.
    """
    problem = make_problem(model, loss, "mean", "unequal", dtype=torch.float32)
    op = build(name, problem)
    assert op.dtype == torch.float32
    dense = to_dense(op)
    assert dense.dtype == torch.float32
    assert relative_error(dense, reference(name, problem)) < 1e-4


@pytest.mark.parametrize(
    "case", [("mlp_relu", "ce", "mean"), ("seq", "mse", "sum"), ("conv", "bce", "mean")]
)
@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_multiplication_formats(name: str, case: tuple[str, str, str]) -> None:
    """Every multiplication format gives the same numbers.

    Args:
        name: Operator key.
        case: ``(model, loss, reduction)``.
    """
    problem = make_problem(*case, layout="unequal")
    op = build(name, problem)
    P, K = problem.dim, 3
    dense = reference(name, problem)
    shapes = [p.shape for p in problem.params]

    generator = torch.Generator().manual_seed(0)
    V = torch.randn(P, K, generator=generator, dtype=torch.float64)
    v = V[:, 0].clone()
    expected_mat, expected_vec = dense @ V, dense @ v

    def split(x: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector/matrix (leading axis P) into parameter-shaped blocks.

        Args:
            x: Tensor of shape ``(P,)`` or ``(P, K)``.

        Returns:
            List of tensors shaped like the parameters (with trailing ``K``).
        """
        trailing = x.shape[1:]
        blocks = x.split([p.numel() for p in problem.params])
        return [b.reshape(*s, *trailing) for b, s in zip(blocks, shapes)]

    def flat(xs: list[torch.Tensor], trailing: tuple[int, ...]) -> torch.Tensor:
        """Concatenate parameter-shaped blocks into a flat tensor.

        Args:
            xs: Blocks shaped like the parameters (with trailing axes).
            trailing: Trailing axes.

        Returns:
            Tensor of shape ``(P, *trailing)``.
        """
        return torch.cat([x.reshape(-1, *trailing) for x in xs])

    # tensor vector and matrix
    out_vec = op @ v
    assert out_vec.shape == (P,)
    assert_matrix_close(out_vec, expected_vec)
    out_mat = op @ V
    assert out_mat.shape == (P, K)
    assert_matrix_close(out_mat, expected_mat)
    assert_matrix_close(op.matmat(V), expected_mat)

    # non-contiguous inputs
    V_strided = torch.randn(K, P, generator=generator, dtype=torch.float64).T
    assert not V_strided.is_contiguous()
    assert_matrix_close(op @ V_strided, dense @ V_strided)
    v_strided = torch.randn(2 * P, generator=generator, dtype=torch.float64)[::2]
    assert not v_strided.is_contiguous()
    assert_matrix_close(op @ v_strided, dense @ v_strided)

    # list format vector and matrix
    out_list_vec = op @ split(v)
    assert isinstance(out_list_vec, list)
    assert [o.shape for o in out_list_vec] == shapes
    assert_matrix_close(flat(out_list_vec, ()), expected_vec)
    out_list_mat = op @ split(V)
    assert isinstance(out_list_mat, list)
    assert [o.shape for o in out_list_mat] == [(*s, K) for s in shapes]
    assert_matrix_close(flat(out_list_mat, (K,)), expected_mat)

    # multiplication from the left
    assert_matrix_close(v @ op, v @ dense)
    out_left = V.T @ op
    assert out_left.shape == (K, P)
    assert_matrix_close(out_left, V.T @ dense)

    # the adjoint is the operator itself
    adjoint = op.adjoint()
    assert adjoint is op
    assert_matrix_close(adjoint @ V, expected_mat)

    # SciPy export
    scipy_op = op.to_scipy()
    assert isinstance(scipy_op, LinearOperator)
    assert scipy_op.shape == (P, P)
    numpy.testing.assert_allclose(
        scipy_op @ v.numpy(), expected_vec.numpy(), rtol=1e-10, atol=1e-10
    )
    numpy.testing.assert_allclose(
        scipy_op @ V.numpy(), expected_mat.numpy(), rtol=1e-10, atol=1e-10
    )
    numpy.testing.assert_allclose(
        scipy_op.rmatvec(v.numpy()), (dense.T @ v).numpy(), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_properties(name: str) -> None:
    """Class hierarchy, ``shape``, ``dtype`` and ``device`` of the operator.

    Args:
        name: Operator key.
    """
    problem = make_problem("frozen", "ce", "mean", "unequal")
    op = build(name, problem)
    assert isinstance(op, CurvatureLinearOperator)
    assert isinstance(op, PyTorchLinearOperator)
    trainable = sum(p.numel() for p in problem.model.parameters() if p.requires_grad)
    assert op.shape == (trainable, trainable) == (problem.dim, problem.dim)
    assert op.dtype == torch.float64
    assert op.device == torch.device("cpu")


@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_symmetric(name: str) -> None:
    """The dense matrix is symmetric (and positive semi-definite).

    Args:
        name: Operator key.
    """
    problem = make_problem("seq", "ce", "mean", "unequal")
    dense = to_dense(
        build(name, problem, mc_samples=2) if name == "mc" else build(name, problem)
    )
    assert_matrix_close(dense, dense.T, rtol=1e-12, atol=1e-12)
    assert torch.linalg.eigvalsh(dense).min() > -1e-10 * dense.abs().max()


@pytest.mark.parametrize(
    "case",
    [
        (model, loss)
        for model in ("mlp_sigmoid", "seq", "conv_seg", "scalar")
        for loss in LOSSES
        if supports(model, loss)
    ],
    ids=_ids,
)
@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_mean_sum_relation(name: str, case: tuple[str, str]) -> None:
    """``sum`` equals ``mean`` times ``num_data * terms per datum (* C for MSE/BCE)``.

    Args:
        name: Operator key.
        case: ``(model, loss)``.
    """
    model, loss = case
    problem_mean = make_problem(model, loss, "mean", "unequal")
    problem_sum = make_problem(model, loss, "sum", "unequal")
    dense_mean = to_dense(build(name, problem_mean))
    dense_sum = to_dense(build(name, problem_sum))
    factor = problem_mean.mean_to_sum_factor()
    assert_matrix_close(dense_sum, factor * dense_mean)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", list(OPERATORS))
def test_duplicated_data(name: str, loss: str, reduction: str) -> None:
    """Duplicating the data leaves ``mean`` unchanged and doubles ``sum``.

    Args:
        name: Operator key.
        loss: Loss name.
        reduction: ``"mean"`` or ``"sum"``.
    """
    problem = make_problem("mlp_gelu", loss, reduction, "unequal")
    cls, _ = OPERATORS[name]
    dense = to_dense(build(name, problem))
    doubled = to_dense(
        cls(problem.model, problem.loss_func, problem.params, duplicate_data(problem))
    )
    factor = 1.0 if reduction == "mean" else 2.0
    assert_matrix_close(doubled, factor * dense)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_explicit_num_data(name: str, reduction: str) -> None:
    """Passing ``num_data`` explicitly gives the same matrix as inferring it.

    Args:
        name: Operator key.
        reduction: ``"mean"`` or ``"sum"``.
    """
    problem = make_problem("dict", "ce", reduction, "unequal")
    inferred = to_dense(build(name, problem))
    explicit = to_dense(build(name, problem, num_data=problem.num_data))
    assert_matrix_close(explicit, inferred, rtol=0.0, atol=1e-14)
    assert_matrix_close(explicit, reference(name, problem))


@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_progressbar(name: str) -> None:
    """``progressbar=True`` works and does not change the numbers.

    Args:
        name: Operator key.
    """
    problem = make_problem("mlp_tanh", "bce", "mean", "loader")
    dense = to_dense(build(name, problem, progressbar=True))
    assert_matrix_close(dense, reference(name, problem))


@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_check_deterministic_off(name: str) -> None:
    """``check_deterministic=False`` gives the same matrix.

    Args:
        name: Operator key.
    """
    problem = make_problem("mlp_bn", "mse", "mean", "unequal")
    dense = to_dense(build(name, problem, check_deterministic=False))
    assert_matrix_close(dense, reference(name, problem))


@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_follows_loaded_weights(name: str) -> None:
    """Weights loaded in place after construction (``load_state_dict``) are used."""
    problem = make_problem("mlp_tanh", "ce", "mean", "unequal")
    op = build(name, problem)
    torch.manual_seed(3)
    other = make_problem("mlp_tanh", "ce", "mean", "unequal").model
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    problem.model.load_state_dict(other.state_dict())
    assert_matrix_close(to_dense(op), reference(name, problem))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_dataloader_equals_list(name: str, loss: str) -> None:
    """A ``DataLoader`` (no shuffling) gives the same matrix as its list of batches.

    Args:
        name: Operator key.
        loss: Loss name.
    """
    problem = make_problem("conv", loss, "mean", "loader")
    assert isinstance(problem.data, DataLoader)
    cls, _ = ALL_OPERATORS[name]
    from_loader = to_dense(build(name, problem))
    from_list = to_dense(
        cls(problem.model, problem.loss_func, problem.params, problem.batches)
    )
    assert_matrix_close(from_loader, from_list, rtol=1e-12, atol=1e-14)

    # a hand-made loader over the concatenated batches
    X = torch.cat([X for X, _ in problem.batches])
    y = torch.cat([y for _, y in problem.batches])
    loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=False)
    from_new_loader = to_dense(
        cls(problem.model, problem.loss_func, problem.params, loader)
    )
    assert_matrix_close(from_new_loader, from_list, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_damping_with_identity(name: str) -> None:
    """``op + damping * IdentityLinearOperator`` adds ``damping * I``.

    Args:
        name: Operator key.
    """
    problem = make_problem("subset", "mse", "sum", "unequal")
    op = build(name, problem)
    identity = IdentityLinearOperator(
        [p.shape for p in problem.params], device=op.device, dtype=op.dtype
    )
    damped = op + 1e-3 * identity
    expected = reference(name, problem) + 1e-3 * torch.eye(problem.dim, dtype=op.dtype)
    assert_matrix_close(to_dense(damped), expected)


@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_model_and_params_untouched(name: str) -> None:
    """Construction and products change neither parameters nor the model's mode.

    Args:
        name: Operator key.
    """
    problem = make_problem("mlp_bn", "ce", "sum", "unequal")
    before = {k: v.detach().clone() for k, v in problem.model.state_dict().items()}
    flags = [p.requires_grad for p in problem.model.parameters()]
    op = build(name, problem)
    to_dense(op)
    assert not problem.model.training
    assert flags == [p.requires_grad for p in problem.model.parameters()]
    for key, value in problem.model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_params_order(name: str) -> None:
    """The operator follows the order of ``params``, not the model's order.

    Args:
        name: Operator key.
    """
    problem = make_problem("conv_seg", "ce", "mean", "unequal")
    problem.params = problem.params[::-1]
    assert_matrix_close(to_dense(build(name, problem)), reference(name, problem))


@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_sees_in_place_parameter_updates(name: str) -> None:
    """Products use the current parameter values (like curvlinops' operators).

    Args:
        name: Operator key.
    """
    problem = make_problem("mlp_tanh", "ce", "sum", "unequal")
    op = build(name, problem)
    before = to_dense(op)
    with torch.no_grad():
        for p in problem.params:
            p.mul_(1.5).add_(0.1)
    after = to_dense(op)
    assert relative_error(after, before) > 1e-3
    assert_matrix_close(after, reference(name, problem))
