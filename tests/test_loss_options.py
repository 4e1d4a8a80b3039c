"""Loss options against brute force on the concatenated data set.

``CrossEntropyLoss`` with ``ignore_index`` (padding), ``label_smoothing``, class
``weight`` and probability targets; ``BCEWithLogitsLoss`` with ``weight`` and
``pos_weight``; MSE and BCE on outputs of every rank. Each operator must equal the
curvature of PyTorch's own loss evaluated on all batches concatenated (see
``concat_reference.py``), including the data-set-wide ``mean`` divisor.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from concat_reference import (
    concatenate,
    dense_concat,
    dense_mc_concat,
    loss64,
)
from problems import IN_FEATURES, MLP, NUM_CLASSES, SEQ_LEN, SequenceModel
from reference import assert_matrix_close, to_dense
from torch import Tensor, nn

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)
from curvlinops_fisher.errors import TargetError, UnsupportedLossError

OPERATORS = {
    "ggn": GGNLinearOperator,
    "ef": EFLinearOperator,
    "mc": FisherMCLinearOperator,
}
BATCH_SIZES = (3, 5, 2)
WEIGHT = torch.tensor([0.5, 2.0, 1.25])


def ce_data(
    targets: str, seed: int = 0, spatial: bool = True
) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """Sequence model (output ``(N, C, L)``) or MLP, unequal batches, CE targets.

    Args:
        targets: ``"hard"``, ``"padded"`` (some targets -100, one datum entirely, and
            one whole batch of ignored targets at the end) or ``"soft"``.
        seed: Seed.
        spatial: Sequence model (else an MLP with output ``(N, C)``).

    Returns:
        Model (float64) and batches.
    """
    torch.manual_seed(seed)
    model = (SequenceModel(channels_first=True) if spatial else MLP()).double()
    gen = torch.Generator().manual_seed(seed + 1)
    sizes = (*BATCH_SIZES, 2) if targets == "padded" else BATCH_SIZES
    batches = []
    for b, size in enumerate(sizes):
        shape = (size, SEQ_LEN, IN_FEATURES) if spatial else (size, IN_FEATURES)
        X = torch.randn(shape, generator=gen, dtype=torch.float64)
        tshape = (size, SEQ_LEN) if spatial else (size,)
        if targets == "soft":
            logits = torch.randn(
                (size, NUM_CLASSES, *tshape[1:]), generator=gen, dtype=torch.float64
            )
            y = logits.softmax(1)
        else:
            y = torch.randint(0, NUM_CLASSES, tshape, generator=gen)
            if targets == "padded":
                y[torch.rand(tshape, generator=gen) < 0.3] = -100
                y[0] = -100  # a datum without any counted term
                if b == len(sizes) - 1:
                    y[:] = -100  # a batch without any counted term
        batches.append((X, y))
    return model, batches


CE_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "padded": ("padded", {}),
    "padded-custom-index": ("padded", {"ignore_index": -100}),
    "smoothing": ("hard", {"label_smoothing": 0.2}),
    "weight": ("hard", {"weight": WEIGHT}),
    "all-options": ("padded", {"weight": WEIGHT, "label_smoothing": 0.1}),
    "soft": ("soft", {}),
    "soft-all-options": ("soft", {"weight": WEIGHT, "label_smoothing": 0.3}),
}


def build(name: str, model: nn.Module, loss_func: nn.Module, data: Any, **kw: Any):
    return OPERATORS[name](model, loss_func, list(model.parameters()), data, **kw)


@pytest.mark.parametrize("spatial", [True, False], ids=["seq", "mlp"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(CE_CASES))
@pytest.mark.parametrize("name", ["ggn", "ef"])
def test_cross_entropy_options(
    name: str, case: str, reduction: str, spatial: bool
) -> None:
    targets, options = CE_CASES[case]
    model, batches = ce_data(targets, spatial=spatial)
    loss_func = nn.CrossEntropyLoss(reduction=reduction, **options)
    op = build(name, model, loss_func, batches)
    expected = dense_concat(model, loss_func, op._params, batches, name)
    assert_matrix_close(to_dense(op), expected)
    assert_matrix_close(op.to_dense(), expected)  # the factor (structure) path


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", ["padded", "smoothing", "soft"])
def test_cross_entropy_options_mc(case: str, reduction: str) -> None:
    """Unweighted options: the MC Fisher is the documented sample, exactly."""
    targets, options = CE_CASES[case]
    model, batches = ce_data(targets)
    loss_func = nn.CrossEntropyLoss(reduction=reduction, **options)
    op = build("mc", model, loss_func, batches, seed=7, mc_samples=3)
    expected = dense_mc_concat(
        model, loss_func, op._params, batches, seed=7, mc_samples=3
    )
    assert_matrix_close(to_dense(op), expected)
    assert_matrix_close(op.to_dense(), expected)


@pytest.mark.parametrize("case", ["padded", "smoothing", "soft"])
def test_cross_entropy_options_mc_expectation(case: str) -> None:
    """Many samples: the MC Fisher approaches the GGN (unbiasedness of the scaling)."""
    targets, options = CE_CASES[case]
    model, batches = ce_data(targets, spatial=False)
    loss_func = nn.CrossEntropyLoss(**options)
    mc = to_dense(build("mc", model, loss_func, batches, mc_samples=20_000))
    ggn = to_dense(build("ggn", model, loss_func, batches))
    assert float((mc - ggn).norm() / ggn.norm()) < 0.05


def test_ignored_terms_change_nothing_but_the_divisor() -> None:
    """Padding a data set with ignored positions leaves the ``sum`` curvature as is."""
    model, batches = ce_data("padded")
    unpadded = [
        (X[y != -100], y[y != -100]) for X, y in batches if bool((y != -100).any())
    ]
    flat_model = MLP().double()
    flat_model.load_state_dict(model.state_dict())
    for name in ("ggn", "ef"):
        loss = nn.CrossEntropyLoss(reduction="sum")
        padded = to_dense(build(name, model, loss, batches))
        plain = to_dense(build(name, flat_model, loss, unpadded))
        assert_matrix_close(padded, plain)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_and_loss_with_options(reduction: str) -> None:
    model, batches = ce_data("padded")
    loss_func = nn.CrossEntropyLoss(
        reduction=reduction, weight=WEIGHT, label_smoothing=0.1
    )
    op = build("ggn", model, loss_func, batches)
    gradient, value = op.gradient_and_loss()
    X, y = concatenate(batches)
    expected = loss64(loss_func)(model(X), y)
    torch.testing.assert_close(value, expected)
    expected_grad = torch.autograd.grad(expected, list(model.parameters()))
    for g, e in zip(gradient, expected_grad):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize(
    "options",
    [{"weight": WEIGHT}, {"weight": WEIGHT, "label_smoothing": 0.1}],
    ids=["weight", "weight-smoothing"],
)
def test_mc_fisher_of_weighted_cross_entropy_is_an_error(options: dict) -> None:
    model, batches = ce_data("hard")
    with pytest.raises(UnsupportedLossError, match="not defined.*weight"):
        build("mc", model, nn.CrossEntropyLoss(**options), batches)


def test_all_targets_ignored_is_an_error() -> None:
    model, batches = ce_data("hard")
    batches = [(X, torch.full_like(y, -100)) for X, y in batches]
    with pytest.raises(TargetError, match="ignored"):
        build("ggn", model, nn.CrossEntropyLoss(), batches)
    # the sum is fine: the curvature is zero
    op = build("ggn", model, nn.CrossEntropyLoss(reduction="sum"), batches)
    assert float(to_dense(op).abs().max()) == 0.0


# ------------------------------------------------------------------- BCE, MSE


def output_rank_data(
    rank: int, loss_name: str, seed: int = 0
) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """An MLP whose output has ``rank`` axes (batch axis included), class axis last.

    Rank 1 is ``(N,)``, 2 is ``(N, C)``, 3 is ``(N, L, C)``, 4 is ``(N, L, L, C)``.
    """
    torch.manual_seed(seed)
    out_features = 1 if rank == 1 else NUM_CLASSES

    class RankModel(MLP):
        def forward(self, x: Tensor) -> Tensor:
            out = super().forward(x)
            return out.squeeze(-1) if rank == 1 else out

    model = RankModel(out_features=out_features).double()
    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for size in BATCH_SIZES:
        middle = (SEQ_LEN,) * max(0, rank - 2)
        X = torch.randn((size, *middle, IN_FEATURES), generator=gen).double()
        with torch.no_grad():
            shape = model(X).shape
        if loss_name == "bce":
            y = torch.rand(shape, generator=gen, dtype=torch.float64)
        else:
            y = torch.randn(shape, generator=gen, dtype=torch.float64)
        batches.append((X, y))
    return model, batches


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rank", [1, 2, 3, 4])
@pytest.mark.parametrize("loss_name", ["mse", "bce"])
@pytest.mark.parametrize("name", ["ggn", "ef"])
def test_outputs_of_any_rank(name: str, loss_name: str, rank: int, reduction: str):
    model, batches = output_rank_data(rank, loss_name)
    loss_cls = nn.MSELoss if loss_name == "mse" else nn.BCEWithLogitsLoss
    loss_func = loss_cls(reduction=reduction)
    op = build(name, model, loss_func, batches)
    expected = dense_concat(model, loss_func, op._params, batches, name)
    assert_matrix_close(to_dense(op), expected)
    assert_matrix_close(op.to_dense(), expected)


BCE_OPTIONS: dict[str, dict[str, Tensor]] = {
    "pos_weight": {"pos_weight": torch.tensor([0.5, 3.0, 1.0])},
    "weight": {"weight": torch.tensor([2.0, 0.0, 0.7])},
    "both": {
        "weight": torch.tensor([1.5, 0.3, 1.0]),
        "pos_weight": torch.tensor([2.0, 0.25, 1.0]),
    },
    "weight-full-shape": {"weight": torch.rand(SEQ_LEN, NUM_CLASSES) + 0.1},
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(BCE_OPTIONS))
@pytest.mark.parametrize("name", ["ggn", "ef"])
def test_bce_weights(name: str, case: str, reduction: str) -> None:
    model, batches = output_rank_data(3, "bce")
    loss_func = nn.BCEWithLogitsLoss(reduction=reduction, **BCE_OPTIONS[case])
    op = build(name, model, loss_func, batches)
    expected = dense_concat(model, loss_func, op._params, batches, name)
    assert_matrix_close(to_dense(op), expected)
    assert_matrix_close(op.to_dense(), expected)


@pytest.mark.parametrize("case", list(BCE_OPTIONS))
def test_mc_fisher_of_weighted_bce_is_an_error(case: str) -> None:
    model, batches = output_rank_data(3, "bce")
    with pytest.raises(UnsupportedLossError, match="not defined"):
        build("mc", model, nn.BCEWithLogitsLoss(**BCE_OPTIONS[case]), batches)


# -------------------------------------------------------------- per-datum EF


PER_DATUM_CASES = {
    "ce-padded-all-options": lambda r: (
        *ce_data("padded"),
        nn.CrossEntropyLoss(reduction=r, weight=WEIGHT, label_smoothing=0.1),
    ),
    "ce-soft": lambda r: (*ce_data("soft"), nn.CrossEntropyLoss(reduction=r)),
    "mse-rank4": lambda r: (*output_rank_data(4, "mse"), nn.MSELoss(reduction=r)),
    "bce-rank3-weighted": lambda r: (
        *output_rank_data(3, "bce"),
        nn.BCEWithLogitsLoss(reduction=r, **BCE_OPTIONS["both"]),
    ),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(PER_DATUM_CASES))
def test_per_datum_empirical_fisher(case: str, reduction: str) -> None:
    model, batches, loss_func = PER_DATUM_CASES[case](reduction)
    op = build("ef", model, loss_func, batches, per_datum=True)
    assert op.per_datum
    expected = dense_concat(model, loss_func, op._params, batches, "ef", per_datum=True)
    assert_matrix_close(to_dense(op), expected)
    assert_matrix_close(op.to_dense(), expected)
    assert_matrix_close(torch.diag(op.diagonal()), torch.diag(expected.diagonal()))
    per_term = dense_concat(model, loss_func, op._params, batches, "ef")
    assert float((expected - per_term).norm()) > 1e-3 * float(per_term.norm())


def test_per_datum_equals_per_term_for_one_term_per_datum() -> None:
    model, batches = ce_data("padded", spatial=False)
    loss_func = nn.CrossEntropyLoss(label_smoothing=0.1)
    per_datum = to_dense(build("ef", model, loss_func, batches, per_datum=True))
    per_term = to_dense(build("ef", model, loss_func, batches))
    assert_matrix_close(per_datum, per_term)
