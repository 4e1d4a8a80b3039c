"""Property-based tests (hypothesis): random MLPs, output ranks, batch splits, losses.

For every drawn problem the operators equal the brute-force curvature of PyTorch's
loss on the concatenated data, are symmetric and positive semi-definite, and (GGN, EF)
do not depend on how the data is split into batches. The number of examples is
bounded so the suite stays fast.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from concat_reference import dense_concat, dense_mc_concat
from reference import to_dense
from torch import Tensor, nn

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

OPERATORS = {
    "ggn": GGNLinearOperator,
    "ef": EFLinearOperator,
    "mc": FisherMCLinearOperator,
}
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


class RankMLP(nn.Module):
    """``Linear -> tanh -> Linear`` on inputs ``(N, *middle, D_in)``.

    The output is ``(N, *middle, C)`` (``(N,)`` if ``squeeze``), and for
    ``CrossEntropyLoss`` the class axis is moved to position 1.
    """

    def __init__(self, d_in: int, hidden: int, c: int, classes_first: bool):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, c)
        self.classes_first = classes_first

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc2(torch.tanh(self.fc1(x)))
        if self.classes_first:
            return out.movedim(-1, 1)
        return out.squeeze(-1) if out.shape[-1] == 1 else out


@st.composite
def problems(draw: Any, with_options: bool = True) -> dict[str, Any]:
    """A random small problem: model, loss, data and its batch sizes."""
    loss_name = draw(st.sampled_from(["mse", "ce", "bce"]))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    d_in, hidden = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    c = draw(st.integers(2, 3)) if loss_name == "ce" else draw(st.integers(1, 3))
    middle = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = RankMLP(d_in, hidden, c, classes_first=loss_name == "ce").double()
    N = sum(sizes)
    X = torch.randn(N, *middle, d_in, dtype=torch.float64)
    with torch.no_grad():
        shape = model(X).shape
    options: dict[str, Any] = {}
    if loss_name == "mse":
        y = torch.randn(shape, dtype=torch.float64)
    elif loss_name == "bce":
        y = torch.rand(shape, dtype=torch.float64)
    else:
        y = torch.randint(0, c, (N, *middle))
        if with_options and draw(st.booleans()):
            y[torch.rand(y.shape) < 0.3] = -100
            y.view(-1)[0] = 0  # at least one counted term
        if with_options:
            options["label_smoothing"] = draw(st.sampled_from([0.0, 0.2]))
    loss_cls = {
        "mse": nn.MSELoss,
        "ce": nn.CrossEntropyLoss,
        "bce": nn.BCEWithLogitsLoss,
    }
    loss_func = loss_cls[loss_name](reduction=reduction, **options)
    return {
        "model": model,
        "loss_func": loss_func,
        "X": X,
        "y": y,
        "sizes": sizes,
    }


def split(X: Tensor, y: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Batches of the given sizes."""
    return list(zip(X.split(sizes), y.split(sizes)))


def dense(name: str, p: dict[str, Any], sizes: list[int], **kw: Any) -> Tensor:
    if name == "ef-datum":
        name, kw = "ef", {**kw, "per_datum": True}
    op = OPERATORS[name](
        p["model"],
        p["loss_func"],
        list(p["model"].parameters()),
        split(p["X"], p["y"], sizes),
        **kw,
    )
    return to_dense(op)


def assert_symmetric_psd(A: Tensor) -> None:
    scale = max(1.0, float(A.abs().max()))
    torch.testing.assert_close(A, A.T, rtol=0, atol=1e-12 * scale)
    assert float(torch.linalg.eigvalsh(A).min()) >= -1e-10 * scale


@SETTINGS
@given(p=problems(), name=st.sampled_from(["ggn", "ef", "ef-datum"]))
def test_equals_brute_force_and_is_split_invariant(p: dict[str, Any], name: str):
    A = dense(name, p, p["sizes"])
    batches = split(p["X"], p["y"], p["sizes"])
    params = list(p["model"].parameters())
    kind, per_datum = name[:3].rstrip("-"), name == "ef-datum"
    expected = dense_concat(
        p["model"], p["loss_func"], params, batches, kind, per_datum=per_datum
    )
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(A, expected, rtol=1e-9, atol=1e-10 * scale)
    assert_symmetric_psd(A)
    one_batch = dense(name, p, [sum(p["sizes"])])
    torch.testing.assert_close(A, one_batch, rtol=1e-9, atol=1e-10 * scale)


@SETTINGS
@given(p=problems(), mc_samples=st.integers(1, 3))
def test_mc_fisher_equals_documented_sample(p: dict[str, Any], mc_samples: int):
    A = dense("mc", p, p["sizes"], seed=5, mc_samples=mc_samples)
    batches = split(p["X"], p["y"], p["sizes"])
    params = list(p["model"].parameters())
    expected = dense_mc_concat(
        p["model"], p["loss_func"], params, batches, seed=5, mc_samples=mc_samples
    )
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(A, expected, rtol=1e-9, atol=1e-10 * scale)
    assert_symmetric_psd(A)
