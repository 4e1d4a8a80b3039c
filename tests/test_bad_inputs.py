"""Every bad input of the table in ``docs/errors.md``: error type and cause in message.

:data:`CASES` maps each row's id to a thunk that feeds the bad input, the expected
exception class and a regex the message must match (naming the cause). The table in
the docs and :data:`CASES` must list the same ids with the same exception classes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from problems import IN_FEATURES, MLP, DictMLP
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)
from curvlinops_fisher import errors as E

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
N = 6


def data(y: Tensor | None = None, X: Tensor | None = None) -> list[tuple[Any, Tensor]]:
    """Two batches of 3 MLP inputs with class targets (or the given ones)."""
    gen = torch.Generator().manual_seed(0)
    X = (
        torch.randn(N, IN_FEATURES, generator=gen, dtype=torch.float64)
        if X is None
        else X
    )
    y = torch.randint(0, 3, (N,), generator=gen) if y is None else y
    return [(X[:3], y[:3]), (X[3:], y[3:])]


def model() -> nn.Module:
    torch.manual_seed(0)
    return MLP().double()


def ggn(loss_func: nn.Module | None = None, cls: type = GGNLinearOperator, **kw: Any):
    """Thunk building an operator on the MLP, with overrides."""
    m = kw.pop("model_func", None) or model()
    args = {
        "model_func": m,
        "loss_func": nn.CrossEntropyLoss() if loss_func is None else loss_func,
        "params": kw.pop("params") if "params" in kw else list(m.parameters()),
        "data": kw.pop("data") if "data" in kw else data(),
    }
    return lambda: cls(**args, **kw)


def product(v: Any) -> Callable[[], Any]:
    """Thunk multiplying the MLP's GGN onto ``v`` (a function of the operator)."""

    def run() -> Any:
        op = ggn()()
        return op @ v(op)

    return run


def nan_batch() -> list[tuple[Tensor, Tensor]]:
    X = torch.randn(N, IN_FEATURES, dtype=torch.float64)
    X[4, 0] = float("nan")
    return data(X=X)


class SqrtAbs(MLP):
    """Output 0 (finite) on zero inputs, but an infinite Jacobian there."""

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(x @ self.fc1.weight.T).abs().sqrt()


def nan_product() -> Any:
    torch.manual_seed(0)
    m = SqrtAbs().double()
    with torch.no_grad():
        m.fc2.bias.zero_()
    X = torch.randn(N, IN_FEATURES, dtype=torch.float64)
    X[3:] = 0
    op = GGNLinearOperator(
        m, nn.CrossEntropyLoss(), [m.fc2.weight], data(X=X), check_deterministic=False
    )
    return op @ torch.ones(op.shape[1], dtype=torch.float64)


def frozen_param() -> Any:
    m = model()
    m.fc1.weight.requires_grad_(False)
    return ggn(model_func=m, params=list(m.parameters()))()


def mixed_dtypes() -> Any:
    m = model()
    m.fc2.float()
    return ggn(model_func=m)()


def unused_param() -> Any:
    m = model()
    m.extra = nn.Linear(2, 2).double()
    return ggn(model_func=m)()


def shuffled() -> Any:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, IN_FEATURES, generator=gen, dtype=torch.float64)
    loader = DataLoader(
        TensorDataset(X, torch.randint(0, 3, (N,), generator=gen)),
        batch_size=3,
        shuffle=True,
    )
    return ggn(data=loader)()


def dropout_in_training() -> Any:
    m = nn.Sequential(MLP().double(), nn.Dropout(0.5))
    return ggn(model_func=m)()


def dict_without_size() -> Any:
    torch.manual_seed(0)
    m = DictMLP().double()
    batches = [({"x": X}, y) for X, y in data()]
    return ggn(model_func=m, data=batches)()


def product_after(change: Callable[[nn.Module], None]) -> Callable[[], Any]:
    """Thunk building the MLP's GGN, changing the model, then multiplying."""

    def run() -> Any:
        m = model()
        op = ggn(model_func=m)()
        change(m)
        return op @ torch.ones(op.shape[1], dtype=op.dtype)

    return run


def replace_fc1(m: nn.Module) -> None:
    m.fc1 = nn.Linear(m.fc1.in_features, m.fc1.out_features).double()


W = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)

#: id -> (thunk, exception class, regex naming the cause)
CASES: dict[str, tuple[Callable[[], Any], type[Exception], str]] = {
    # losses
    "unsupported-loss": (ggn(nn.L1Loss()), E.UnsupportedLossError, r"L1Loss"),
    "reduction-none": (
        ggn(nn.CrossEntropyLoss(reduction="none")),
        E.UnsupportedLossError,
        r"reduction='none'",
    ),
    "ce-negative-weight": (
        ggn(nn.CrossEntropyLoss(weight=-W)),
        E.UnsupportedLossError,
        r"weight.*non-negative",
    ),
    "bce-negative-weight": (
        ggn(nn.BCEWithLogitsLoss(pos_weight=-W)),
        E.UnsupportedLossError,
        r"pos_weight.*negative",
    ),
    "mc-ce-weight": (
        ggn(nn.CrossEntropyLoss(weight=W), FisherMCLinearOperator),
        E.UnsupportedLossError,
        r"Monte-Carlo Fisher of CrossEntropyLoss\(weight=...\) is not defined",
    ),
    "mc-bce-weight": (
        ggn(nn.BCEWithLogitsLoss(pos_weight=W), FisherMCLinearOperator),
        E.UnsupportedLossError,
        r"Monte-Carlo Fisher of BCEWithLogitsLoss.*not defined",
    ),
    # targets
    "ce-class-out-of-range": (
        ggn(data=data(y=torch.tensor([0, 1, 2, 3, 0, 1]))),
        E.TargetError,
        r"class index 3 is out of range \[0, 2\]",
    ),
    "ce-target-shape": (
        ggn(data=data(y=torch.zeros(N, 2).long())),
        E.TargetError,
        r"targets must have shape \(3,\)",
    ),
    "ce-weight-length": (
        ggn(nn.CrossEntropyLoss(weight=torch.ones(4))),
        E.TargetError,
        r"4 class weights but the model outputs C=3",
    ),
    "ce-soft-negative": (
        ggn(data=data(y=-torch.rand(N, 3, dtype=torch.float64))),
        E.TargetError,
        r"soft\) targets must be non-negative",
    ),
    "ce-soft-shape": (
        ggn(data=data(y=torch.rand(N, 2, dtype=torch.float64))),
        E.TargetError,
        r"soft\) targets must have the output's shape",
    ),
    "ce-all-ignored": (
        ggn(data=data(y=torch.full((N,), -100))),
        E.TargetError,
        r"every target is ignored",
    ),
    "mse-target-shape": (
        ggn(nn.MSELoss(), data=data(y=torch.zeros(N, dtype=torch.float64))),
        E.TargetError,
        r"model output's shape \(3, 3\); got \(3,\)",
    ),
    "mse-integer-targets": (
        ggn(nn.MSELoss(), data=data(y=torch.zeros(N, 3).long())),
        E.TargetError,
        r"floating point",
    ),
    "bce-target-range": (
        ggn(nn.BCEWithLogitsLoss(), data=data(y=2 * torch.ones(N, 3).double())),
        E.TargetError,
        r"\[0, 1\]",
    ),
    "bce-weight-shape": (
        ggn(
            nn.BCEWithLogitsLoss(weight=torch.ones(4)),
            data=data(y=torch.rand(N, 3, dtype=torch.float64)),
        ),
        E.TargetError,
        r"weight=...\) of shape \(4,\) does not broadcast",
    ),
    # model and params
    "model-not-module": (
        ggn(model_func=lambda x: x, params=[torch.ones(1, requires_grad=True)]),
        E.ParameterError,
        r"model_func must be a torch.nn.Module",
    ),
    "params-empty": (ggn(params=[]), E.ParameterError, r"params is empty"),
    "params-frozen": (frozen_param, E.ParameterError, r"does not require grad"),
    "params-foreign": (
        ggn(params=[nn.Parameter(torch.ones(2, dtype=torch.float64))]),
        E.ParameterError,
        r"not a parameter of the model",
    ),
    "params-unused": (unused_param, E.ParameterError, r"not used by the model"),
    "params-mixed-dtypes": (mixed_dtypes, E.ParameterError, r"one dtype and device"),
    "params-replaced": (
        product_after(replace_fc1),
        E.ParameterError,
        r"params\[0\] \(the model's 'fc1.weight' when the operator was built\) is no "
        r"longer a parameter of the model",
    ),
    # data
    "data-iterator": (ggn(data=iter(data())), E.DataError, r"consumed only once"),
    "data-no-batches": (ggn(data=[]), E.DataError, r"data is empty"),
    "data-not-pairs": (ggn(data=[torch.ones(3)]), E.DataError, r"pair \(X, y\)"),
    "dict-without-batch-size-fn": (
        dict_without_size,
        E.DataError,
        r"batch_size_fn is required",
    ),
    "num-data-invalid": (
        ggn(num_data=-1),
        E.DataError,
        r"num_data must be a positive int",
    ),
    "mc-samples-invalid": (
        ggn(cls=FisherMCLinearOperator, mc_samples=0),
        ValueError,
        r"mc_samples must be a positive int",
    ),
    "ef-per-datum-invalid": (
        ggn(cls=EFLinearOperator, per_datum="yes"),
        ValueError,
        r"per_datum must be a bool",
    ),
    # determinism
    "data-shuffled": (shuffled, E.NonDeterministicError, r"batch 0 has different"),
    "dropout-training": (
        dropout_in_training,
        E.NonDeterministicError,
        r"Dropout layer '1' is in training mode",
    ),
    # numerics
    "nan-output": (
        ggn(data=nan_batch()),
        E.NonFiniteError,
        r"Batch 1 \(0-based, in data order\): The model output has 3 NaN or Inf",
    ),
    "nan-product": (
        nan_product,
        E.NonFiniteError,
        r"Batch 1 .*contribution to the product has .* NaN or Inf",
    ),
    "nan-vector": (
        product(lambda op: torch.full((op.shape[1],), float("nan"), dtype=op.dtype)),
        E.NonFiniteError,
        r"vector or matrix multiplied onto the operator has \d+ NaN",
    ),
    # vectors
    "vector-shape": (
        product(lambda op: torch.ones(op.shape[1] + 1, dtype=op.dtype)),
        E.VectorFormatError,
        r"got a tensor of shape",
    ),
    "vector-dtype": (
        product(lambda op: torch.ones(op.shape[1], dtype=torch.float32)),
        E.VectorFormatError,
        r"has dtype torch.float32, but the operator has dtype torch.float64",
    ),
    "vector-not-tensor": (
        product(lambda op: [1.0] * op.shape[1]),
        E.VectorFormatError,
        r"not torch.Tensor",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str) -> None:
    thunk, error, pattern = CASES[case]
    with pytest.raises(error, match=pattern):
        thunk()


def _docs_rows() -> dict[str, str]:
    """``id -> error class name`` of the table in ``docs/errors.md``."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        match = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|[^|]*\|\s*`(\w+)`\s*\|", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_docs_table_lists_every_case() -> None:
    rows = _docs_rows()
    assert set(rows) == set(CASES), set(rows) ^ set(CASES)
    for case, (_, error, _) in CASES.items():
        assert rows[case] == error.__name__, case


def test_nonfinite_error_hierarchy() -> None:
    assert issubclass(E.NonFiniteError, FloatingPointError)
    assert issubclass(E.NonFiniteError, ValueError)
