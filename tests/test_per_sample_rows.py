"""Per-data-point factor rows are verified against one batched VJP per chunk.

``LinearizedBatch.chunks`` computes the rows of a batch one data point at a time
(``vmap`` over data points of a per-point VJP). With ``nn.PReLU`` in the model,
PyTorch's batching rule makes these rows wrong while products stay right, so every
chunk's :math:`\\mathbf{U}_k^\\top\\boldsymbol\\omega` is compared with a VJP of the
whole batch; on disagreement the operator warns once and uses whole-batch rows.
Ground truth: the ``torch.func`` brute force of :mod:`reference`, in float64.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from reference import (
    assert_matrix_close,
    dense_ef,
    dense_fisher_mc,
    dense_ggn,
    relative_error,
)
from torch import Tensor, nn

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)
from curvlinops_fisher.rows import LinearizedBatch

#: Operator class, brute-force reference, constructor/reference keyword arguments.
KINDS: dict[str, tuple[type, Callable[..., Tensor], dict[str, Any]]] = {
    "ggn": (GGNLinearOperator, dense_ggn, {}),
    "ef": (EFLinearOperator, dense_ef, {}),
    "mc3": (FisherMCLinearOperator, dense_fisher_mc, {"mc_samples": 3, "seed": 7}),
}
TOL = {"rtol": 1e-10, "atol": 1e-10}
MESSAGE = "disagree with the batched VJP"


def _prelu_mlp(channels: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Linear(4, 6) - PReLU(channels) - Linear(6, 3), seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.PReLU(channels), nn.Linear(6, 3)).to(dtype)


def _data(
    sizes: tuple[int, ...] = (5, 3), dtype: torch.dtype = torch.float64
) -> list[tuple[Tensor, Tensor]]:
    """Batches of ``sizes`` data points for 3 classes.

    PyTorch 2.13's PReLU batching rule raises for the GGN's per-data-point rows of a
    batch of 5 (a legitimate fallback) and returns wrong rows for a batch of 3 (as
    many data points as classes).
    """
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 4, generator=generator, dtype=dtype),
            torch.randint(0, 3, (n,), generator=generator),
        )
        for n in sizes
    ]


def _operator(kind: str, model: nn.Module, data: list) -> Any:
    cls, _, kwargs = KINDS[kind]
    return cls(model, nn.CrossEntropyLoss(), list(model.parameters()), data, **kwargs)


def _reference(kind: str, model: nn.Module, data: list) -> Tensor:
    _, ref, kwargs = KINDS[kind]
    return ref(model, nn.CrossEntropyLoss(), list(model.parameters()), data, **kwargs)


def _disagreements(caught: list[warnings.WarningMessage]) -> int:
    return sum(MESSAGE in str(w.message) for w in caught)


@pytest.mark.parametrize("channels", [1, 6], ids=["shared", "per_channel"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_prelu_structure_is_exact(kind: str, channels: int) -> None:
    """Dense matrix, diagonal, trace and cached products equal brute force; one warning.

    GGN (``R = 3`` rows per term) hits PyTorch's PReLU batching rule: the operator
    warns exactly once over all calls (the flag lives on its model function).
    """
    model = _prelu_mlp(channels)
    data = _data()
    op = _operator(kind, model, data)
    expected = _reference(kind, model, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_matrix_close(op.to_dense(), expected)
        torch.testing.assert_close(op.diagonal(), expected.diagonal(), **TOL)
        torch.testing.assert_close(op.trace(), expected.trace(), **TOL)
        cached = op.cached()
        V = torch.randn(op.shape[1], 4, dtype=torch.float64)
        torch.testing.assert_close(cached @ V, expected @ V, **TOL)
        assert_matrix_close(cached.to_dense(), expected)
        values, _ = op.eigh(2, method="gram")
        top = torch.linalg.eigvalsh(expected).flip(0)[:2]
        torch.testing.assert_close(values, top, rtol=1e-9, atol=1e-12)
    warned = _disagreements(caught)
    if kind == "ggn":
        assert warned == 1
    assert warned <= 1


def test_check_is_needed() -> None:
    """Mutation: with the check accepting every chunk, the PReLU rows are wrong.

    This shows that comparing only the per-data-point outputs (the check before the
    fix) lets PyTorch 2.13's PReLU batching rule through: the GGN's dense matrix is
    off by more than 1%.
    """
    model = _prelu_mlp(1)
    data = _data()
    expected = _reference("ggn", model, data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LinearizedBatch, "_rows_agree", lambda self, *args: True)
        wrong = _operator("ggn", model, data).to_dense()
    assert relative_error(wrong, expected) > 1e-2, (
        "per-data-point PReLU rows are right again (PyTorch fixed its batching "
        "rule?): this mutation test no longer shows the check at work"
    )
    with pytest.warns(UserWarning, match=MESSAGE):
        assert_matrix_close(_operator("ggn", model, data).to_dense(), expected)


def test_later_batches_skip_per_data_point_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a failed check, the operator's later batches go straight to batch rows."""
    calls = {"per_data_point": 0, "whole_batch": 0}
    per_point, whole = LinearizedBatch._per_sample_rows, LinearizedBatch._rows_between

    def count_per_point(self: LinearizedBatch, *args: Any, **kwargs: Any) -> Any:
        calls["per_data_point"] += 1
        return per_point(self, *args, **kwargs)

    def count_whole(self: LinearizedBatch, *args: Any, **kwargs: Any) -> Tensor:
        calls["whole_batch"] += 1
        return whole(self, *args, **kwargs)

    monkeypatch.setattr(LinearizedBatch, "_per_sample_rows", count_per_point)
    monkeypatch.setattr(LinearizedBatch, "_rows_between", count_whole)
    model = _prelu_mlp(1)
    data = _data((3, 3, 3, 3))
    op = _operator("ggn", model, data)
    with pytest.warns(UserWarning, match=MESSAGE):
        op.trace()
    # the first batch fails the check; the other three skip the per-point path
    assert calls == {"per_data_point": 1, "whole_batch": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        torch.testing.assert_close(
            op.trace(), _reference("ggn", model, data).trace(), **TOL
        )
    assert calls == {"per_data_point": 1, "whole_batch": 8}
    with pytest.warns(UserWarning, match="Sequential"):  # a new operator warns again
        _operator("ggn", model, data).trace()
    assert calls["per_data_point"] == 2


def test_fallback_within_a_batch() -> None:
    """A chunk that fails falls back from its own first row; earlier chunks are kept.

    Small chunks (one data point each): the first passes (the check is forced to),
    the rest are whole-batch rows; the factor is still exact.
    """
    model = _prelu_mlp(1)
    data = _data()
    op = _operator("ggn", model, data)
    expected = _reference("ggn", model, data)
    verdicts = iter([True])

    def first_only(self: LinearizedBatch, rows: Tensor, start: int, stop: int) -> bool:
        return next(verdicts, False)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LinearizedBatch, "_rows_agree", first_only)
        batch = next(iter(op._structure.linearized_batches()))
        rows_bytes = (op.shape[1] + 3) * 8 * 3  # one data point's 3 rows
        with pytest.warns(UserWarning, match=MESSAGE):
            chunks = list(batch.chunks(chunk_bytes=rows_bytes))
    assert chunks[0].shape[0] == 3
    U = torch.cat(chunks)
    assert U.shape == (15, op.shape[1])
    assert_matrix_close(U.mT @ U, expected - _reference("ggn", model, data[1:]) * 3 / 8)


class _BatchCentered(nn.Module):
    """Mixes the data points of a batch: subtracts the batch mean of a layer's output."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.act = nn.PReLU()
        self.second = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.first(x))
        return self.second(h - h.mean(0, keepdim=True))


@pytest.mark.parametrize("kind", list(KINDS))
def test_interacting_data_points_fall_back_silently(kind: str) -> None:
    """Outputs that depend on other data points: whole-batch rows, no warning."""
    torch.manual_seed(0)
    model = _BatchCentered().double()
    data = _data()
    op = _operator(kind, model, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert_matrix_close(op.to_dense(), _reference(kind, model, data))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_healthy_model_keeps_per_data_point_rows(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """A model without the faulty rule passes the check in float64 and float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.LayerNorm(16)).to(dtype)
    model.append(nn.Linear(16, 3).to(dtype))
    data = _data(dtype=dtype)
    whole = LinearizedBatch._rows_between
    calls = []
    monkeypatch.setattr(
        LinearizedBatch,
        "_rows_between",
        lambda self, *args: calls.append(args) or whole(self, *args),
    )
    op = _operator("ggn", model, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        dense = op.to_dense()
    assert not calls
    expected = _reference("ggn", model, data)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    assert relative_error(dense, expected) < rtol
