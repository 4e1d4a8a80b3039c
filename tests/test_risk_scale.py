"""The reduction scale against PyTorch's own loss on the concatenated data set."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from curvlinops_fisher.errors import TargetError
from curvlinops_fisher.losses import make_fisher_loss
from curvlinops_fisher.risk_scale import RiskScale, TargetCount

C = 3
BATCH_SIZES = (3, 5, 2)


def batches(loss_func: nn.Module, targets: str) -> list[tuple[Tensor, Tensor]]:
    """Outputs ``(N_b, C, 2)`` and targets of unequal batches, float64.

    ``targets``: ``"hard"``, ``"padded"`` (some class indices ignored) or ``"soft"``
    for ``CrossEntropyLoss``; anything for the other losses.
    """
    gen = torch.Generator().manual_seed(0)
    result = []
    for N_b in BATCH_SIZES:
        f = torch.randn(N_b, C, 2, generator=gen, dtype=torch.float64)
        if not isinstance(loss_func, nn.CrossEntropyLoss):
            y = torch.rand(N_b, C, 2, generator=gen, dtype=torch.float64)
        elif targets == "soft":
            y = torch.rand(N_b, C, 2, generator=gen, dtype=torch.float64).softmax(1)
        else:
            y = torch.randint(0, C, (N_b, 2), generator=gen)
            if targets == "padded":
                y[0, 1] = loss_func.ignore_index
        result.append((f, y))
    return result


def risk(loss_func: nn.Module, data: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``sum_b c_b sum_t loss_t``, the scale built from the batches' summed counts."""
    count = sum(
        (RiskScale.count(loss_func, [y]) for _, y in data), TargetCount()
    )  # as the ranks' counts are summed
    scale = RiskScale.from_count(loss_func, sum(len(y) for _, y in data), count)
    loss = make_fisher_loss(loss_func)
    return sum(scale.batch_scale(y, len(y)) * loss.summed_loss(f, y) for f, y in data)


CASES = {
    "mse": (nn.MSELoss, {}, "any"),
    "bce-weighted": (
        nn.BCEWithLogitsLoss,
        {"pos_weight": 2 * torch.ones(C, 1, dtype=torch.float64)},
        "any",
    ),
    "ce": (nn.CrossEntropyLoss, {}, "hard"),
    "ce-padded": (nn.CrossEntropyLoss, {}, "padded"),
    "ce-weighted": (
        nn.CrossEntropyLoss,
        {"weight": torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)},
        "padded",
    ),
    "ce-soft-weighted": (
        nn.CrossEntropyLoss,
        {"weight": torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)},
        "soft",
    ),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CASES)
def test_risk_is_pytorch_loss_on_concatenated_data(case: str, reduction: str) -> None:
    """Equal terms per datum: the scaled risk is PyTorch's loss on all the data."""
    loss_class, options, targets = CASES[case]
    loss_func = loss_class(reduction=reduction, **options)
    data = batches(loss_func, targets)
    F = torch.cat([f for f, _ in data])
    Y = torch.cat([y for _, y in data])
    torch.testing.assert_close(risk(loss_func, data), loss_func(F, Y))


@pytest.mark.parametrize("reduction, expected", [("sum", 1.0), ("mean", 3 / (12 * 18))])
def test_batch_scale(reduction: str, expected: float) -> None:
    scale = RiskScale.from_count(nn.MSELoss(reduction=reduction), num_data=12)
    y = torch.zeros(3, 2, 3)  # 3 data points, 2 terms of C=3 each
    assert scale.batch_scale(y, batch_size=3) == pytest.approx(expected)


def test_data_set_divisor_only_where_targets_need_it() -> None:
    """``divisor`` is set for ignored class indices of ``mean`` only."""
    y = torch.tensor([0, -100, 2, 1])
    mean, summed = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
    assert RiskScale.count(mean, [y, y]) == TargetCount(6.0, True)
    assert RiskScale.from_count(mean, 8, RiskScale.count(mean, [y, y])).divisor == 6
    assert RiskScale.from_count(summed, 8, RiskScale.count(summed, [y])).divisor is None
    hard = torch.tensor([0, 1, 2])
    assert RiskScale.from_count(mean, 3, RiskScale.count(mean, [hard])).divisor is None
    assert RiskScale.scans_targets(mean)
    assert not RiskScale.scans_targets(summed)
    assert not RiskScale.scans_targets(nn.MSELoss())


def test_of_batch_is_one_over_pytorch_mean_divisor() -> None:
    y = torch.tensor([[0, -100], [2, 1]])
    scale = RiskScale.of_batch(nn.CrossEntropyLoss(), y)
    assert scale.batch_scale(y, 1) == pytest.approx(1 / 3)
    assert RiskScale.of_batch(nn.MSELoss(), torch.zeros(4, 5)).batch_scale(
        torch.zeros(4, 5), 1
    ) == pytest.approx(1 / 20)


def test_every_target_ignored_is_an_error() -> None:
    y = torch.full((4,), -100)
    loss_func = nn.CrossEntropyLoss()
    with pytest.raises(TargetError, match="ignored"):
        RiskScale.from_count(loss_func, 4, RiskScale.count(loss_func, [y]))


def test_scale_and_loss_are_immutable() -> None:
    """The scale is frozen; the loss holds no scale to change."""
    scale = RiskScale.from_count(nn.MSELoss(), 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scale.divisor = 2.0  # type: ignore[misc]
    loss = make_fisher_loss(nn.CrossEntropyLoss())
    assert not hasattr(loss, "normalizer")
    assert not hasattr(loss, "batch_scale")
