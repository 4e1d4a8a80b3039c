"""The losses layer against torch.func brute force on the per-term losses."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import grad, hessian

from curvlinops_fisher.errors import TargetError, UnsupportedLossError
from curvlinops_fisher.factors import LowRankOutputFactor, SampledLabelsOutputFactor
from curvlinops_fisher.losses import make_fisher_loss

T, C = 5, 3


def per_term_loss(loss_func: nn.Module, f: torch.Tensor, y: torch.Tensor):
    """Sum-reduced loss of one term (f of shape (C,)), all options kept."""
    summed = copy.deepcopy(loss_func).double()
    summed.reduction = "sum"
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return summed(f.unsqueeze(0), y.unsqueeze(0))
    return summed(f, y)


def term_data(loss_func: nn.Module, soft: bool = False):
    torch.manual_seed(0)
    f = torch.randn(T, C, dtype=torch.float64)
    if isinstance(loss_func, nn.CrossEntropyLoss) and soft:
        y = torch.rand(T, C, dtype=torch.float64)  # need not sum to 1
    elif isinstance(loss_func, nn.CrossEntropyLoss):
        y = torch.randint(0, C, (T,))
        y[1] = loss_func.ignore_index
    elif isinstance(loss_func, nn.BCEWithLogitsLoss):
        y = torch.rand(T, C, dtype=torch.float64)
    else:
        y = torch.randn(T, C, dtype=torch.float64)
    return f, y


LOSSES = [nn.MSELoss(), nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss()]


W = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
OPTIONS = [
    (nn.CrossEntropyLoss(label_smoothing=0.3), False),
    (nn.CrossEntropyLoss(weight=W), False),
    (nn.CrossEntropyLoss(weight=W, label_smoothing=0.2, ignore_index=2), False),
    (nn.CrossEntropyLoss(), True),
    (nn.CrossEntropyLoss(weight=W, label_smoothing=0.2), True),
    (nn.BCEWithLogitsLoss(pos_weight=W), False),
    (nn.BCEWithLogitsLoss(weight=W, pos_weight=W.flip(0)), False),
]


@pytest.mark.parametrize(
    "loss_func, soft",
    [(loss, False) for loss in LOSSES] + OPTIONS,
    ids=lambda x: repr(x) if isinstance(x, nn.Module) else str(x),
)
def test_gradient_hessian_sqrt_against_torch_func(loss_func, soft):
    loss = make_fisher_loss(loss_func)
    f, y = term_data(loss_func, soft)
    y_flat = loss.flatten_targets(y, f)  # packs BCE weights
    U = torch.randn(2, T, C, dtype=torch.float64)
    S = loss.hessian_sqrt(f, y_flat)
    HU = loss.hessian_matmat(f, y_flat, U)
    for t in range(T):
        g_true = grad(lambda ft: per_term_loss(loss_func, ft, y[t]))(f[t])
        H_true = hessian(lambda ft: per_term_loss(loss_func, ft, y[t]))(f[t])
        torch.testing.assert_close(loss.gradient(f, y_flat)[t], g_true)
        torch.testing.assert_close(S[t] @ S[t].T, H_true)
        torch.testing.assert_close(HU[:, t], U[:, t] @ H_true.T)


@pytest.mark.parametrize("loss_func", LOSSES, ids=lambda loss: type(loss).__name__)
def test_sampled_gradients_match_hessian_in_expectation(loss_func):
    loss = make_fisher_loss(loss_func)
    f, y = term_data(loss_func)
    generator = torch.Generator().manual_seed(3)
    M = 200_000
    G = loss.sample_gradients(f, y, M, generator)
    assert G.shape == (M, T, C)
    second_moment = torch.einsum("mti,mtj->tij", G, G) / M
    H = loss.hessian_sqrt(f, y) @ loss.hessian_sqrt(f, y).transpose(-1, -2)
    torch.testing.assert_close(second_moment, H, atol=2e-2, rtol=0)


def test_sampling_uses_only_the_generator():
    loss = make_fisher_loss(nn.CrossEntropyLoss())
    f, y = term_data(nn.CrossEntropyLoss())
    state = torch.get_rng_state()
    a = loss.sample_gradients(f, y, 4, torch.Generator().manual_seed(1))
    b = loss.sample_gradients(f, y, 4, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    "loss_func, shape",
    [
        (nn.CrossEntropyLoss(), (2, 3)),
        (nn.CrossEntropyLoss(), (2, 3, 4, 5)),
        (nn.MSELoss(), (2,)),
        (nn.MSELoss(), (2, 4, 3)),
        (nn.BCEWithLogitsLoss(), (2, 4, 5, 3)),
    ],
)
def test_flatten_unflatten_round_trip(loss_func, shape):
    loss = make_fisher_loss(loss_func)
    x = torch.randn(7, *shape)
    flat = loss.flatten(x, lead=1)
    C_expected = 1 if len(shape) == 1 else shape[1 if "Cross" in str(loss_func) else -1]
    assert flat.shape[-1] == C_expected and flat.shape[0] == 7
    torch.testing.assert_close(loss.unflatten(flat, torch.Size(shape), lead=1), x)
    # class entries of one term stay together
    if isinstance(loss_func, nn.CrossEntropyLoss) and len(shape) == 4:
        torch.testing.assert_close(flat[0, 0], x[0, 0, :, 0, 0])


@pytest.mark.parametrize(
    "loss_func, match",
    [
        (nn.L1Loss(), "L1Loss.*MSELoss"),
        (nn.MSELoss(reduction="none"), "reduction"),
        (nn.CrossEntropyLoss(weight=-torch.ones(3)), "weight.*non-negative"),
        (nn.CrossEntropyLoss(weight=torch.ones(3, 1)), "weight.*1-D"),
        (nn.BCEWithLogitsLoss(pos_weight=-torch.ones(3)), "pos_weight.*negative"),
        (nn.BCEWithLogitsLoss(weight=-torch.ones(3)), "weight.*negative"),
    ],
)
def test_unsupported_losses(loss_func, match):
    with pytest.raises(UnsupportedLossError, match=match):
        make_fisher_loss(loss_func)
    # catchable as the built-in exceptions peers raise
    with pytest.raises(NotImplementedError):
        make_fisher_loss(loss_func)
    with pytest.raises(ValueError):
        make_fisher_loss(loss_func)


@pytest.mark.parametrize(
    "loss_func, output, y, match",
    [
        (nn.CrossEntropyLoss(), torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), "range"),
        (
            nn.CrossEntropyLoss(),
            torch.randn(4, 3),
            torch.tensor([0, -1, 2, 0]),
            "range",
        ),
        (
            nn.CrossEntropyLoss(ignore_index=-1),
            torch.randn(4, 3),
            torch.tensor([0, -100, 2, 0]),
            "not ignore_index=-1",
        ),
        (nn.CrossEntropyLoss(weight=torch.ones(4)), torch.randn(4, 3), None, "4 class"),
        (nn.CrossEntropyLoss(), torch.randn(4, 3), -torch.rand(4, 3), "non-negative"),
        (nn.CrossEntropyLoss(), torch.randn(4, 3), torch.rand(4, 2), "soft.*shape"),
        (nn.CrossEntropyLoss(), torch.randn(4, 3), torch.zeros(4, 3).cfloat(), "dtype"),
        (
            nn.BCEWithLogitsLoss(weight=torch.ones(4)),
            torch.randn(4, 2),
            torch.rand(4, 2),
            "weight.*broadcast",
        ),
        (
            nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)),
            torch.randn(4, 2),
            torch.rand(4, 2),
            "pos_weight.*broadcast",
        ),
        (nn.CrossEntropyLoss(), torch.randn(4, 3), torch.zeros(4, 1).long(), "shape"),
        (nn.CrossEntropyLoss(), torch.randn(4, 3), torch.zeros(4), "integer"),
        (nn.CrossEntropyLoss(), torch.randn(4), torch.zeros(4).long(), r"\(N, C\)"),
        (nn.MSELoss(), torch.randn(4, 1), torch.randn(4), "shape"),
        (nn.MSELoss(), torch.randn(4, 2), torch.ones(4, 2).long(), "floating"),
        (nn.BCEWithLogitsLoss(), torch.randn(4, 2), 2 * torch.ones(4, 2), r"\[0, 1\]"),
        (nn.BCEWithLogitsLoss(), torch.randn(4, 2), -torch.ones(4, 2), r"\[0, 1\]"),
    ],
)
def test_bad_targets(loss_func, output, y, match):
    if y is None:
        y = torch.zeros(output.shape[0]).long()
    with pytest.raises(TargetError, match=match):
        make_fisher_loss(loss_func).check_targets(output, y)


def test_soft_cross_entropy_targets_are_accepted():
    make_fisher_loss(nn.CrossEntropyLoss()).check_targets(
        torch.randn(4, 3), torch.rand(4, 3).softmax(-1)
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("soft", [False, True])
def test_sampled_labels_factor_equals_the_explicit_one(smoothing, soft):
    """The frequency form of the MC factor applies exactly the sampled gradients.

    ``term_data`` ignores one term of class-index targets (``s_t = 0``).
    """
    loss_func = nn.CrossEntropyLoss(label_smoothing=smoothing)
    loss = make_fisher_loss(loss_func)
    f, y = term_data(loss_func, soft)
    M = 7
    labels = loss.sample_labels(f, y, M, torch.Generator().manual_seed(5))
    G = loss.sample_gradients(f, y, M, torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        loss.labels_to_gradients(f, y, labels), G, rtol=0, atol=0
    )
    explicit = LowRankOutputFactor(G.permute(1, 2, 0) / math.sqrt(M))
    sampled = SampledLabelsOutputFactor(loss, f, y, labels)
    U = torch.randn(3, T, C, dtype=torch.float64)
    torch.testing.assert_close(
        sampled.apply(U), explicit.apply(U), rtol=1e-13, atol=1e-14
    )
    torch.testing.assert_close(sampled.matrix(), explicit.matrix(), rtol=0, atol=0)


def test_only_label_losses_sample_labels():
    for loss_func in (nn.MSELoss(), nn.BCEWithLogitsLoss()):
        loss = make_fisher_loss(loss_func)
        f, y = term_data(loss_func)
        assert loss.sample_labels(f, y, 3, torch.Generator()) is None
        with pytest.raises(NotImplementedError, match="samples no labels"):
            loss.sampled_fisher_matmat(f, y, torch.zeros(T, 3), f)
