"""Bad inputs raise the library's exception classes with helpful messages."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from problems import (
    MLP,
    NUM_CLASSES,
    SINGLE_BATCH_SIZE,
    Problem,
    UnusedLayerMLP,
    make_problem,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)
from curvlinops_fisher.errors import (
    DataError,
    NonDeterministicError,
    ParameterError,
    TargetError,
    UnsupportedLossError,
    all_finite,
)

try:  # documented location; a missing export fails the vector tests, not collection
    from curvlinops_fisher.errors import VectorFormatError
except ImportError:  # pragma: no cover
    VectorFormatError = None  # type: ignore[assignment,misc]

OPERATORS = {
    "ggn": GGNLinearOperator,
    "ef": EFLinearOperator,
    "mc": FisherMCLinearOperator,
}
parametrize_operators = pytest.mark.parametrize("name", list(OPERATORS))


def build(name: str, problem: Problem, **overrides: Any) -> Any:
    """Construct an operator, replacing some of the problem's arguments.

    Args:
        name: Key of :data:`OPERATORS`.
        problem: The problem.
        **overrides: Replacements for ``model_func``, ``loss_func``, ``params``,
            ``data``, plus further keyword arguments.

    Returns:
        The operator.
    """
    kwargs = {
        "model_func": problem.model,
        "loss_func": problem.loss_func,
        "params": problem.params,
        "data": problem.data,
        **problem.kwargs(),
        **overrides,
    }
    return OPERATORS[name](**kwargs)


def with_targets(problem: Problem, y: Tensor) -> list[tuple[Any, Tensor]]:
    """Replace the targets of the problem's single batch.

    Args:
        problem: A problem with the ``"single"`` layout.
        y: The new targets.

    Returns:
        Data with one batch ``(X, y)``.
    """
    ((X, _),) = problem.batches
    return [(X, y)]


def vector_format_error() -> type[Exception]:
    """``curvlinops_fisher.errors.VectorFormatError``, failing the test if missing.

    Returns:
        The exception class.
    """
    if VectorFormatError is None:
        pytest.fail("curvlinops_fisher.errors does not export VectorFormatError.")
    return VectorFormatError


def test_exception_hierarchy() -> None:
    """Each exception also derives from the built-in a peer library would raise."""
    assert issubclass(UnsupportedLossError, NotImplementedError)
    assert issubclass(UnsupportedLossError, ValueError)
    assert issubclass(TargetError, ValueError)
    assert issubclass(vector_format_error(), ValueError)
    assert issubclass(vector_format_error(), TypeError)
    assert issubclass(ParameterError, ValueError)
    assert issubclass(DataError, ValueError)
    assert issubclass(NonDeterministicError, RuntimeError)


# ------------------------------------------------------------------ losses


@parametrize_operators
@pytest.mark.parametrize("loss_func", [nn.L1Loss(), nn.SmoothL1Loss(), nn.NLLLoss()])
def test_unsupported_loss(name: str, loss_func: nn.Module) -> None:
    """Losses other than MSE, CE and BCE-with-logits are rejected.

    Args:
        name: Operator key.
        loss_func: An unsupported loss.
    """
    problem = make_problem("mlp_tanh", "mse", "mean", "single")
    with pytest.raises(UnsupportedLossError, match=r"(?i)loss"):
        build(name, problem, loss_func=loss_func)
    # also catchable as the built-ins peers raise
    with pytest.raises(NotImplementedError):
        build(name, problem, loss_func=loss_func)
    with pytest.raises(ValueError):
        build(name, problem, loss_func=loss_func)


@parametrize_operators
@pytest.mark.parametrize("loss", ["mse", "ce", "bce"])
def test_reduction_none(name: str, loss: str) -> None:
    """``reduction='none'`` is rejected.

    Args:
        name: Operator key.
        loss: Loss name.
    """
    problem = make_problem("mlp_tanh", loss, "mean", "single")
    loss_func = type(problem.loss_func)(reduction="none")
    with pytest.raises(UnsupportedLossError, match=r"(?i)reduction|none"):
        build(name, problem, loss_func=loss_func)


# ----------------------------------------------------------------- targets

TARGET_MATCH = r"(?i)target|label|\by\b|class|shape|range"


def _bad_targets(kind: str) -> tuple[str, str, Tensor]:
    """Loss, model and bad targets (for a single batch of the MLP).

    Args:
        kind: Name of the defect.

    Returns:
        ``(loss, model, y)``.

    Raises:
        ValueError: For an unknown kind.
    """
    N, C = SINGLE_BATCH_SIZE, NUM_CLASSES
    ints = torch.arange(N) % C
    if kind == "mse-shape":
        return "mse", "mlp_tanh", torch.zeros(N, C + 1, dtype=torch.float64)
    if kind == "mse-seq-shape":
        return "mse", "seq", torch.zeros(N, C, dtype=torch.float64)
    if kind == "bce-shape":
        return "bce", "mlp_tanh", torch.zeros(N, C + 1, dtype=torch.float64)
    if kind == "bce-above-one":
        return "bce", "mlp_tanh", torch.full((N, C), 1.5, dtype=torch.float64)
    if kind == "bce-negative":
        return "bce", "mlp_tanh", torch.full((N, C), -0.5, dtype=torch.float64)
    if kind == "ce-too-large":
        return "ce", "mlp_tanh", torch.full((N,), C)
    if kind == "ce-negative":
        return "ce", "mlp_tanh", torch.where(ints == 0, -1, ints)
    if kind == "ce-shape":
        return "ce", "mlp_tanh", torch.zeros(N, 2, dtype=torch.long)
    if kind == "ce-seq-shape":
        return "ce", "seq", torch.zeros(N, dtype=torch.long)
    if kind == "ce-float-shape":
        return "ce", "mlp_tanh", ints.to(torch.float64)
    raise ValueError(kind)


TARGET_KINDS = [
    "mse-shape",
    "mse-seq-shape",
    "bce-shape",
    "bce-above-one",
    "bce-negative",
    "ce-too-large",
    "ce-negative",
    "ce-shape",
    "ce-seq-shape",
    "ce-float-shape",
]


@parametrize_operators
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_bad_targets(name: str, reduction: str, kind: str) -> None:
    """Wrong target shapes, out-of-range classes and non-probabilities are rejected.

    Args:
        name: Operator key.
        reduction: ``"mean"`` or ``"sum"``.
        kind: Name of the defect.
    """
    loss, model, y = _bad_targets(kind)
    problem = make_problem(model, loss, reduction, "single")
    with pytest.raises(TargetError, match=TARGET_MATCH):
        build(name, problem, data=with_targets(problem, y))


@parametrize_operators
def test_bad_targets_in_later_batch(name: str) -> None:
    """A defect in a later batch is found as well.

    Args:
        name: Operator key.
    """
    problem = make_problem("mlp_tanh", "ce", "mean", "unequal")
    data = list(problem.batches)
    X, y = data[-1]
    data[-1] = (X, torch.full_like(y, NUM_CLASSES + 2))
    with pytest.raises(TargetError, match=TARGET_MATCH):
        build(name, problem, data=data)


# ----------------------------------------------------------------- vectors


VECTOR_PROBLEM = ("mlp_tanh", "ce", "mean", "unequal")


@pytest.fixture(scope="module")
def operators() -> dict[str, Any]:
    """One operator of each kind on the same small problem.

    Returns:
        Mapping from operator key to operator.
    """
    problem = make_problem(*VECTOR_PROBLEM)
    return {name: build(name, problem) for name in OPERATORS}


def _param_shapes() -> list[torch.Size]:
    """Parameter shapes of the problem the ``operators`` fixture uses.

    Returns:
        The shapes.
    """
    return [p.shape for p in make_problem(*VECTOR_PROBLEM).params]


def _bad_vectors(P: int, shapes: list[torch.Size]) -> dict[str, Any]:
    """Inputs of wrong shape, dtype or device.

    Args:
        P: Operator dimension.
        shapes: Parameter shapes.

    Returns:
        Mapping from a defect's name to the bad input.
    """
    f64 = {"dtype": torch.float64}
    good_list = [torch.zeros(s, **f64) for s in shapes]
    return {
        "vec-too-long": torch.zeros(P + 1, **f64),
        "vec-too-short": torch.zeros(P - 1, **f64),
        "mat-wrong-rows": torch.zeros(P + 1, 2, **f64),
        "three-dims": torch.zeros(P, 2, 1, **f64),
        "scalar": torch.zeros((), **f64),
        "vec-float32": torch.zeros(P, dtype=torch.float32),
        "mat-float32": torch.zeros(P, 2, dtype=torch.float32),
        "vec-meta": torch.zeros(P, dtype=torch.float64, device="meta"),
        "mat-int": torch.zeros(P, 2, dtype=torch.long),
        "list-too-short": good_list[:-1],
        "list-too-long": [*good_list, torch.zeros(2, **f64)],
        "list-wrong-shape": [torch.zeros(*s, 2, **f64) for s in shapes[:-1]]
        + [torch.zeros(shapes[-1].numel() + 1, 2, **f64)],
        "list-mixed-columns": [torch.zeros(*s, 2, **f64) for s in shapes[:-1]]
        + [torch.zeros(*shapes[-1], 3, **f64)],
        "list-float32": [torch.zeros(s, dtype=torch.float32) for s in shapes],
        "list-meta": [torch.zeros(s, **f64, device="meta") for s in shapes],
    }


BAD_VECTORS = [
    "vec-too-long",
    "vec-too-short",
    "mat-wrong-rows",
    "three-dims",
    "scalar",
    "vec-float32",
    "mat-float32",
    "vec-meta",
    "mat-int",
    "list-too-short",
    "list-too-long",
    "list-wrong-shape",
    "list-mixed-columns",
    "list-float32",
    "list-meta",
]
VECTOR_MATCH = r"(?i)shape|dtype|device|tensor|list|column|entr"


@parametrize_operators
@pytest.mark.parametrize("kind", BAD_VECTORS)
def test_bad_vector_right(operators: dict[str, Any], name: str, kind: str) -> None:
    """``op @ X`` rejects inputs of wrong shape, dtype or device.

    Args:
        operators: Fixture with the operators.
        name: Operator key.
        kind: Name of the defect.
    """
    op = operators[name]
    X = _bad_vectors(op.shape[1], _param_shapes())[kind]
    with pytest.raises(vector_format_error(), match=VECTOR_MATCH):
        op @ X
    if isinstance(X, Tensor):
        with pytest.raises(vector_format_error(), match=VECTOR_MATCH):
            op.matmat(X)


@parametrize_operators
@pytest.mark.parametrize(
    "kind", ["vec-too-long", "mat-wrong-rows", "vec-float32", "vec-meta", "three-dims"]
)
def test_bad_vector_left(operators: dict[str, Any], name: str, kind: str) -> None:
    """``X @ op`` rejects inputs of wrong shape, dtype or device.

    Args:
        operators: Fixture with the operators.
        name: Operator key.
        kind: Name of the defect.
    """
    op = operators[name]
    P = op.shape[0]
    X = {
        "vec-too-long": torch.zeros(P + 1, dtype=torch.float64),
        "mat-wrong-rows": torch.zeros(2, P + 1, dtype=torch.float64),
        "vec-float32": torch.zeros(P, dtype=torch.float32),
        "vec-meta": torch.zeros(P, dtype=torch.float64, device="meta"),
        "three-dims": torch.zeros(1, 2, P, dtype=torch.float64),
    }[kind]
    with pytest.raises(vector_format_error(), match=VECTOR_MATCH):
        X @ op


@parametrize_operators
def test_vector_error_is_value_and_type_error(
    operators: dict[str, Any], name: str
) -> None:
    """Vector errors can be caught as ``ValueError`` and as ``TypeError``.

    Args:
        operators: Fixture with the operators.
        name: Operator key.
    """
    op = operators[name]
    with pytest.raises(ValueError):
        op @ torch.zeros(op.shape[1] + 1, dtype=torch.float64)
    with pytest.raises(TypeError):
        op @ torch.zeros(op.shape[1], dtype=torch.float32)


# -------------------------------------------------------------- parameters


@parametrize_operators
def test_params_without_grad(name: str) -> None:
    """Parameters with ``requires_grad=False`` are rejected.

    Args:
        name: Operator key.
    """
    problem = make_problem("frozen", "mse", "mean", "single")
    params = list(problem.model.parameters())  # includes the frozen layer
    with pytest.raises(ParameterError, match=r"(?i)requires_grad|frozen|grad"):
        build(name, problem, params=params)


@parametrize_operators
@pytest.mark.parametrize("foreign", ["parameter", "tensor"])
def test_params_not_in_model(name: str, foreign: str) -> None:
    """Parameters (or plain tensors) that do not belong to the model are rejected.

    Args:
        name: Operator key.
        foreign: ``"parameter"`` of another module or plain ``"tensor"``.
    """
    problem = make_problem("mlp_tanh", "mse", "mean", "single")
    if foreign == "parameter":
        extra = nn.Linear(2, 2).double().weight
    else:
        extra = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    params = [*problem.params, extra]
    with pytest.raises(ParameterError, match=r"(?i)model|belong|part"):
        build(name, problem, params=params)


@parametrize_operators
def test_params_unused(name: str) -> None:
    """Parameters of a layer that ``forward`` never calls are rejected.

    Args:
        name: Operator key.
    """
    problem = make_problem("mlp_tanh", "ce", "mean", "single")
    torch.manual_seed(0)
    model = UnusedLayerMLP().double()
    with pytest.raises(ParameterError, match=r"(?i)unused|use|depend"):
        build(name, problem, model_func=model, params=list(model.parameters()))


class MixedDtypeMLP(MLP):
    """MLP whose first layer is float64 and last layer float32."""

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate the network, casting between the layers.

        Args:
            x: Input (float64).

        Returns:
            Output (float32).
        """
        hidden = self.act(self.fc1(x))
        return self.fc2(hidden.to(self.fc2.weight.dtype))


@parametrize_operators
def test_params_mixed_dtypes(name: str) -> None:
    """Parameters with different dtypes are rejected.

    Args:
        name: Operator key.
    """
    problem = make_problem("mlp_tanh", "ce", "mean", "single")
    torch.manual_seed(0)
    model = MixedDtypeMLP().double()
    model.fc2.float()
    with pytest.raises(ParameterError, match=r"(?i)dtype"):
        build(name, problem, model_func=model, params=list(model.parameters()))


# -------------------------------------------------------------------- data


@parametrize_operators
def test_dict_input_without_batch_size_fn(name: str) -> None:
    """Dict inputs require ``batch_size_fn``.

    Args:
        name: Operator key.
    """
    problem = make_problem("dict", "ce", "mean", "unequal")
    with pytest.raises(DataError, match=r"batch_size_fn"):
        build(name, problem, batch_size_fn=None)


@parametrize_operators
@pytest.mark.parametrize("empty", ["list", "loader"])
def test_empty_data(name: str, empty: str) -> None:
    """Empty data is rejected.

    Args:
        name: Operator key.
        empty: ``"list"`` (``[]``) or ``"loader"`` (``DataLoader`` of nothing).
    """
    problem = make_problem("mlp_tanh", "mse", "mean", "single")
    data: Any = []
    if empty == "loader":
        dataset = TensorDataset(
            torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 3)
        )
        data = DataLoader(dataset, batch_size=4)
    with pytest.raises(DataError, match=r"(?i)empty|no batch|no data"):
        build(name, problem, data=data)


# -------------------------------------------------------- non-determinism

NONDET_MATCH = r"(?i)shuffle|Dropout|BatchNorm|determin"


class DropoutMLP(nn.Module):
    """MLP with ``Dropout(p=0.5)`` between the layers."""

    def __init__(self) -> None:
        """Create the layers."""
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 5), nn.Tanh(), nn.Dropout(p=0.5), nn.Linear(5, NUM_CLASSES)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate the network.

        Args:
            x: Input.

        Returns:
            Output.
        """
        return self.net(x)


def _nondeterministic_setup(kind: str) -> tuple[Problem, dict[str, Any]]:
    """A problem and the constructor overrides that make it non-deterministic.

    Args:
        kind: ``"shuffle"``, ``"dropout"`` or ``"batchnorm"``.

    Returns:
        The problem and the overrides.

    Raises:
        ValueError: For an unknown kind.
    """
    if kind == "shuffle":
        problem = make_problem("mlp_tanh", "ce", "mean", "loader")
        X = torch.cat([X for X, _ in problem.batches])
        y = torch.cat([y for _, y in problem.batches])
        loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True)
        return problem, {"data": loader}
    if kind == "dropout":
        problem = make_problem("mlp_tanh", "ce", "mean", "unequal")
        torch.manual_seed(0)
        model = DropoutMLP().double().train()
        return problem, {"model_func": model, "params": list(model.parameters())}
    if kind == "batchnorm":
        problem = make_problem("mlp_bn", "ce", "mean", "unequal")
        problem.model.train()
        return problem, {}
    raise ValueError(kind)


@parametrize_operators
@pytest.mark.parametrize("kind", ["shuffle", "dropout", "batchnorm"])
def test_nondeterministic(name: str, kind: str) -> None:
    """Shuffling loaders, dropout and batch norm in training mode are detected.

    With ``check_deterministic=False`` construction succeeds.

    Args:
        name: Operator key.
        kind: Source of non-determinism.
    """
    problem, overrides = _nondeterministic_setup(kind)
    with pytest.raises(NonDeterministicError, match=NONDET_MATCH):
        build(name, problem, **overrides)
    with pytest.raises(RuntimeError):
        build(name, problem, **overrides)

    op = build(name, problem, check_deterministic=False, **overrides)
    assert op.shape == (op.shape[1], op.shape[1])


@pytest.mark.parametrize(
    "tensors, expected",
    [
        ([], True),
        ([torch.randn(5), torch.randn(2, 3, dtype=torch.float64)], True),
        ([torch.full((10,), 3e38)], True),  # the sum overflows, the entries do not
        ([torch.full((4,), 6e4, dtype=torch.float16)], True),
        ([torch.full((4,), 3e38, dtype=torch.bfloat16)], True),
        ([torch.tensor([1, 2])], True),
        ([torch.randn(3), torch.tensor([1.0, float("nan")])], False),
        ([torch.tensor([float("inf"), -float("inf")])], False),
        ([torch.tensor([1.0, float("inf")], dtype=torch.float16)], False),
        ([torch.tensor([1 + 1j, complex(0, float("inf"))])], False),
        ([torch.tensor([1 + 1j, 2 - 1j])], True),
    ],
)
def test_all_finite(tensors: list[Tensor], expected: bool) -> None:
    """Finite sums prove finiteness; an overflowing sum falls back to the entries."""
    assert all_finite(tensors) is expected
