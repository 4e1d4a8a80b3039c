"""Numerical robustness: NaN/Inf, huge logits, low precision (float16, bfloat16)."""

from __future__ import annotations

import pytest
import torch
from problems import IN_FEATURES, MLP, make_problem
from reference import dense_ef, dense_fisher_mc, dense_ggn, to_dense
from torch import Tensor, nn

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)
from curvlinops_fisher.errors import NonFiniteError
from curvlinops_fisher.losses import make_fisher_loss

OPERATORS = {
    "ggn": GGNLinearOperator,
    "ef": EFLinearOperator,
    "mc": FisherMCLinearOperator,
}
REFERENCES = {"ggn": dense_ggn, "ef": dense_ef, "mc": dense_fisher_mc}


def three_batches(bad: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
    """Three batches of MLP inputs with CE targets; batch 1's input is ``bad``."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for b in range(3):
        X = torch.randn(4, IN_FEATURES, generator=gen, dtype=torch.float64)
        if b == 1 and bad is not None:
            X = bad
        batches.append((X, torch.randint(0, 3, (4,), generator=gen)))
    return batches


def nan_input() -> Tensor:
    X = torch.randn(4, IN_FEATURES, dtype=torch.float64)
    X[2, 1] = float("nan")
    return X


class SqrtAbs(MLP):
    """``sqrt(|W x|)``: finite output at ``x = 0``, but an infinite Jacobian there."""

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(x @ self.fc1.weight.T).abs().sqrt()


@pytest.mark.parametrize("name", list(OPERATORS))
def test_nan_output_names_the_batch(name: str) -> None:
    model = MLP().double()
    batches = three_batches(nan_input())
    op = OPERATORS[name](
        model, nn.CrossEntropyLoss(), list(model.parameters()), batches,
        check_deterministic=False,
    )  # fmt: skip
    v = torch.ones(op.shape[1], dtype=torch.float64)
    with pytest.raises(
        NonFiniteError, match=r"Batch 1 .*model output has 3 NaN or Inf"
    ):
        op @ v
    with pytest.raises(NonFiniteError, match=r"Batch 1 .*model output"):
        op.to_dense()  # the factor (structure) path
    with pytest.raises(FloatingPointError):  # catchable as the built-in
        op @ v
    with pytest.raises(NonFiniteError, match=r"Batch 1 .*model output"):  # the probe
        OPERATORS[name](model, nn.CrossEntropyLoss(), list(model.parameters()), batches)


def test_nonfinite_product_names_the_batch() -> None:
    """Finite outputs, infinite Jacobian: the product of batch 1 is caught."""
    torch.manual_seed(0)
    model = SqrtAbs().double()
    params = [model.fc2.weight, model.fc2.bias]
    zero = torch.zeros(4, IN_FEATURES, dtype=torch.float64)
    batches = three_batches(zero)
    with torch.no_grad():  # bias 0 so that the output is exactly 0 on zero inputs
        model.fc2.bias.zero_()
    op = GGNLinearOperator(
        model, nn.CrossEntropyLoss(), [params[0]], batches, check_deterministic=False
    )
    v = torch.ones(op.shape[1], dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"Batch 1 .*contribution to the product"):
        op @ v


def test_nonfinite_vector_is_an_error() -> None:
    model = MLP().double()
    op = GGNLinearOperator(
        model, nn.CrossEntropyLoss(), list(model.parameters()), three_batches()
    )
    v = torch.ones(op.shape[1], dtype=torch.float64)
    v[3] = float("inf")
    with pytest.raises(NonFiniteError, match="vector.*1 NaN or Inf"):
        op @ v


@pytest.mark.parametrize(
    "loss_func", [nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss()], ids=["ce", "bce"]
)
@pytest.mark.parametrize("magnitude", [1e4, 1e30])
def test_huge_logits(loss_func: nn.Module, magnitude: float) -> None:
    """Hessian square root, products and samples stay finite and consistent."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        f = magnitude * torch.randn(6, 4, generator=gen).to(dtype)
        f[0] = torch.tensor([magnitude, magnitude, -magnitude, 0.0])  # ties, zero
        if isinstance(loss_func, nn.CrossEntropyLoss):
            y = torch.randint(0, 4, (6,), generator=gen)
        else:
            y = torch.rand(6, 4, generator=gen).to(dtype)
        loss = make_fisher_loss(loss_func)
        S = loss.hessian_sqrt(f, y)
        U = torch.randn(2, 6, 4, generator=gen).to(dtype)
        HU = loss.hessian_matmat(f, y, U)
        G = loss.sample_gradients(f, y, 5, torch.Generator().manual_seed(1))
        for x in (S, HU, G, loss.gradient(f, y)):
            assert bool(torch.isfinite(x).all())
        SSU = torch.einsum("tcr,tdr,ktd->ktc", S, S, U)
        torch.testing.assert_close(SSU, HU, atol=1e-6, rtol=1e-5)


def test_huge_logits_operator() -> None:
    """An MLP with logits of order 1e4: finite, symmetric, matches brute force."""
    model = MLP().double()
    with torch.no_grad():
        model.fc2.weight.mul_(1e4)
    batches = three_batches()
    for name in ("ggn", "ef", "mc"):
        op = OPERATORS[name](
            model, nn.CrossEntropyLoss(), list(model.parameters()), batches
        )
        A = to_dense(op)
        assert bool(torch.isfinite(A).all())
        expected = REFERENCES[name](
            model, nn.CrossEntropyLoss(), list(model.parameters()), batches
        )
        scale = max(1.0, float(expected.abs().max()))
        assert float((A - expected).abs().max()) <= 1e-8 * scale


#: Relative Frobenius error bound per dtype: 4 unit roundoffs (float16 has eps ~1e-3,
#: bfloat16 ~8e-3). Documented in docs/losses.md.
LOW_PRECISION = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("loss", ["mse", "ce", "bce"])
@pytest.mark.parametrize("name", list(OPERATORS))
def test_low_precision(name: str, loss: str, dtype: torch.dtype) -> None:
    """Half-precision params work; the result is within a few unit roundoffs."""
    problem = make_problem("mlp_tanh", loss, "mean", "unequal", dtype=dtype)
    op = OPERATORS[name](*problem.args())
    assert op.dtype == dtype
    A = to_dense(op)
    assert A.dtype == dtype
    expected = REFERENCES[name](*problem.args())  # float64, same samples for MC
    error = float((A.double() - expected).norm() / expected.norm())
    assert error < LOW_PRECISION[dtype]
