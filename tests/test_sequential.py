"""Closed-form products of ``nn.Sequential`` MLPs against brute force and the AD path."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from reference import dense_ef, dense_fisher_mc, dense_ggn
from torch import nn
from torch.nn.utils import parametrize

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    core,
    functional,
)
from curvlinops_fisher.closed_form import (
    CLOSED_FORM_ACTIVATIONS,
    ELEMENTWISE_ACTIVATIONS,
    SequentialChain,
    closed_form_chain,
)

#: Operator classes and their brute-force matrices.
REFERENCES = (
    (GGNLinearOperator, dense_ggn),
    (EFLinearOperator, dense_ef),
    (FisherMCLinearOperator, dense_fisher_mc),
)
OPERATORS = [cls for cls, _ in REFERENCES]
BATCH_SIZES = (3, 5, 2)


def operator_id(cls: type) -> str:
    """Short test id of an operator class."""
    return cls.__name__.removesuffix("LinearOperator")


def targets(loss: str, out_shape: tuple[int, ...], generator: torch.Generator):
    """Random targets for ``loss`` and a batch output of ``out_shape``."""
    if loss == "ce":
        shape = (out_shape[0], *out_shape[2:])  # classes on axis 1
        return torch.randint(0, out_shape[1], shape, generator=generator)
    if loss == "bce":
        return torch.randint(0, 2, out_shape, generator=generator).double()
    return torch.randn(out_shape, generator=generator, dtype=torch.float64)


def make_loss(loss: str, reduction: str) -> nn.Module:
    """The loss function named ``loss``."""
    cls = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}
    return cls[loss](reduction=reduction)


def mlp(activation: nn.Module | None = None, bias: bool = True) -> nn.Sequential:
    """``Linear(4, 5) -> activation -> Linear(5, 3)`` in float64."""
    torch.manual_seed(0)
    act = nn.Tanh() if activation is None else activation
    return nn.Sequential(
        nn.Linear(4, 5, bias=bias), act, nn.Linear(5, 3, bias=bias)
    ).double()


def model_case(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A qualifying model and the shape of one input datum."""
    torch.manual_seed(0)
    if name == "nested":
        inner = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        head = nn.Sequential(nn.Identity(), nn.Dropout(0.5), nn.Linear(5, 3))
        return nn.Sequential(inner, nn.ReLU(), head).double().eval(), (4,)
    if name == "flatten":
        model = nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
        return model.double(), (2, 2, 2)
    if name == "flatten_middle":
        model = nn.Sequential(
            nn.Linear(2, 4), nn.Tanh(), nn.Flatten(1, 2), nn.Linear(12, 3)
        )
        return model.double(), (3, 2)
    if name == "flatten_negative":
        model = nn.Sequential(
            nn.Linear(2, 4), nn.Tanh(), nn.Flatten(-2, -1), nn.Linear(12, 3)
        )
        return model.double(), (3, 2)
    if name == "deep":
        model = nn.Sequential(
            nn.Linear(4, 6),
            nn.GELU(),
            nn.Linear(6, 5, bias=False),
            nn.Sigmoid(),
            nn.Linear(5, 4),
            nn.LeakyReLU(0.2),
            nn.Linear(4, 3),
        )
        return model.double(), (4,)
    if name == "tied":  # one module called twice
        shared = nn.Linear(5, 5)
        model = nn.Sequential(
            nn.Linear(4, 5), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(5, 3)
        )
        return model.double(), (4,)
    if name == "tied_weight":  # two modules holding one weight
        first, second = nn.Linear(5, 5), nn.Linear(5, 5)
        second.weight = first.weight
        model = nn.Sequential(
            nn.Linear(4, 5), nn.Tanh(), first, nn.Tanh(), second, nn.Linear(5, 3)
        )
        return model.double(), (4,)
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 2, stride=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4, 3),
        )
        return model.double(), (2, 4, 4)
    if name == "conv1d_groups":  # grouped, dilated, strided; overlapping pooling
        model = nn.Sequential(
            nn.Conv1d(2, 4, 3, dilation=2, padding=2, groups=2),
            nn.Sigmoid(),
            nn.MaxPool1d(3, stride=1, padding=1),
            nn.Conv1d(4, 6, 2, stride=2, groups=2, bias=False),
            nn.GELU(),
            nn.Conv1d(6, 3, 1),  # output (N, 3, L): every position a loss term
        )
        return model.double(), (2, 7)
    if name == "conv3d":
        model = nn.Sequential(
            nn.Conv3d(1, 2, 3, padding="same"),
            nn.LeakyReLU(0.1),
            nn.MaxPool3d(2, ceil_mode=True),
            nn.Flatten(),
            nn.Linear(16, 3),
        )
        return model.double(), (1, 3, 3, 3)
    if name == "conv_valid":
        model = nn.Sequential(
            nn.Conv2d(1, 2, (2, 3), padding="valid", dilation=(1, 2)),
            nn.ReLU(),
            nn.MaxPool2d((2, 1), stride=(1, 2), padding=(1, 0), dilation=(1, 1)),
            nn.Conv2d(2, 3, 1, padding="same"),
            nn.Flatten(),
            nn.Linear(24, 3),
        )
        return model.double(), (1, 4, 7)
    if name == "activation_last":
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Tanh())
        return model.double(), (4,)
    if name == "batchnorm_mlp":
        model = nn.Sequential(
            nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)
        )
        return with_running_statistics(model), (4,)
    if name == "batchnorm_cnn":  # conv -> BN -> avg-pool, BN without affine, GAP
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(3, 4, 1),
            nn.BatchNorm2d(4, affine=False),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        )
        return with_running_statistics(model), (2, 4, 6)
    if name == "avg_pool_1d":  # overlapping, padded, ceil mode; BN of (N, C, L)
        model = nn.Sequential(
            nn.Conv1d(2, 3, 2),
            nn.BatchNorm1d(3),
            nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True),
            nn.Sigmoid(),
            nn.AvgPool1d(2, stride=1, count_include_pad=False, padding=1),
            nn.AdaptiveAvgPool1d(3),  # uneven windows from 5 positions
            nn.Conv1d(3, 3, 1),  # output (N, 3, L): every position a loss term
        )
        return with_running_statistics(model), (2, 8)
    if name == "avg_pool_3d":
        model = nn.Sequential(
            nn.Conv3d(1, 2, 2),
            nn.BatchNorm3d(2),
            nn.ReLU(),
            nn.AvgPool3d((2, 1, 2), divisor_override=3),
            nn.AdaptiveAvgPool3d((1, 2, None)),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        return with_running_statistics(model), (1, 3, 4, 5)
    return mlp(), (4,)


def with_running_statistics(model: nn.Module) -> nn.Module:
    """``model`` in float64 and eval mode, its batch norms' statistics and affine
    parameters random (not the identity map of a fresh layer)."""
    generator = torch.Generator().manual_seed(5)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
            if module.affine:
                with torch.no_grad():
                    module.weight.copy_(torch.randn(size, generator=generator))
                    module.bias.copy_(torch.randn(size, generator=generator))
    return model.double().eval()


MODEL_CASES = (
    "mlp",
    "nested",
    "flatten",
    "flatten_middle",
    "flatten_negative",
    "deep",
    "tied",
    "tied_weight",
    "activation_last",
    "cnn",
    "conv1d_groups",
    "conv3d",
    "conv_valid",
    "batchnorm_mlp",
    "batchnorm_cnn",
    "avg_pool_1d",
    "avg_pool_3d",
)


def make_data(model: nn.Module, datum_shape, loss: str, sequence: bool = False):
    """Unequal batches of inputs and targets (``sequence``: an extra axis of 2)."""
    generator = torch.Generator().manual_seed(1)
    data = []
    for n in BATCH_SIZES:
        shape = (n, 2, *datum_shape) if sequence else (n, *datum_shape)
        X = torch.randn(shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            out_shape = tuple(model(X).shape)
        data.append((X, targets(loss, out_shape, generator)))
    return data


@pytest.fixture
def chain_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of columns of every closed-form linearization."""
    calls: list[int] = []
    original = SequentialChain.linearize

    def spy(self, params, X, V):
        calls.append(V[0].shape[0])
        return original(self, params, X, V)

    monkeypatch.setattr(SequentialChain, "linearize", spy)
    return calls


def ad_path_products(monkeypatch, op, *vectors):
    """The products of ``op`` with the closed form switched off."""
    monkeypatch.setattr(core, "SEQUENTIAL_CHAIN_PRODUCTS", False)
    try:
        return [op @ v for v in vectors]
    finally:
        monkeypatch.setattr(core, "SEQUENTIAL_CHAIN_PRODUCTS", True)


def check_products(monkeypatch, chain_calls, kind, model, loss_func, params, data):
    """Products with 1 and 3 columns equal brute force and the AD path.

    Afterwards the model holds the very parameters it held before (a product must
    not leave substituted tensors in it).
    """
    held = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    op = kind(model, loss_func, params, data)
    dense = dict(REFERENCES)[kind](model, loss_func, params, data)
    generator = torch.Generator().manual_seed(2)
    v = torch.randn(op.shape[1], generator=generator, dtype=torch.float64)
    V = torch.randn(op.shape[1], 3, generator=generator, dtype=torch.float64)
    chain_calls.clear()
    Av, AV = op @ v, op @ V
    assert chain_calls == [1] * len(data) + [3] * len(data)
    torch.testing.assert_close(Av, dense @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(AV, dense @ V, rtol=1e-10, atol=1e-12)
    ad_v, ad_V = ad_path_products(monkeypatch, op, v, V)
    torch.testing.assert_close(Av, ad_v, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(AV, ad_V, rtol=1e-12, atol=1e-14)
    assert not Av.requires_grad and not AV.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert [id(p) for _, p in model.named_parameters(remove_duplicate=False)] == held


@pytest.mark.parametrize("kind", OPERATORS, ids=operator_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["mse", "ce", "bce"])
def test_mlp_products(monkeypatch, chain_calls, kind, reduction, loss):
    model = mlp()
    data = make_data(model, (4,), loss)
    params = list(model.parameters())
    loss_func = make_loss(loss, reduction)
    check_products(monkeypatch, chain_calls, kind, model, loss_func, params, data)


@pytest.mark.parametrize("kind", OPERATORS, ids=operator_id)
@pytest.mark.parametrize("name", MODEL_CASES)
def test_model_products(monkeypatch, chain_calls, kind, name):
    model, datum_shape = model_case(name)
    data = make_data(model, datum_shape, "ce")
    params = list(dict.fromkeys(model.parameters()))
    loss_func = nn.CrossEntropyLoss()
    check_products(monkeypatch, chain_calls, kind, model, loss_func, params, data)


@pytest.mark.parametrize("kind", OPERATORS, ids=operator_id)
@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_sequence_inputs(monkeypatch, chain_calls, kind, loss):
    """Linear layers on ``[N, T, in]`` inputs (every position is a loss term)."""
    model = mlp()
    data = make_data(model, (4,), loss, sequence=True)
    params = list(model.parameters())
    loss_func = make_loss(loss, "mean")
    check_products(monkeypatch, chain_calls, kind, model, loss_func, params, data)


ACTIVATIONS = [
    *(cls() for cls in CLOSED_FORM_ACTIVATIONS),
    nn.LeakyReLU(-0.3),
    *(cls() for cls in ELEMENTWISE_ACTIVATIONS),
    nn.ELU(inplace=True),
    nn.Hardtanh(-0.5, 0.5, inplace=True),
]


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=repr)
def test_every_activation(monkeypatch, chain_calls, activation):
    model = mlp(activation)
    data = make_data(model, (4,), "mse")
    params = list(model.parameters())
    loss_func = nn.MSELoss()
    check_products(
        monkeypatch, chain_calls, GGNLinearOperator, model, loss_func, params, data
    )


SUBSETS = {
    "first_weight": lambda m: [m[0].weight],
    "first_bias": lambda m: [m[0].bias],
    "first_bias_last_weight": lambda m: [m[0].bias, m[2].weight],
    "last_layer": lambda m: list(m[2].parameters()),
    "reordered": lambda m: [m[2].bias, m[0].weight, m[2].weight, m[0].bias],
}


BATCHNORM_SUBSETS = {
    "scale": lambda m: [m[1].weight],
    "shift": lambda m: [m[1].bias],
    "shift_last_weight": lambda m: [m[1].bias, m[3].weight],
    "around": lambda m: [m[3].bias, m[0].weight],
}


@pytest.mark.parametrize("kind", OPERATORS, ids=operator_id)
def test_frozen_parameters(monkeypatch, chain_calls, kind):
    model = mlp(bias=False)
    model[0].weight.requires_grad_(False)
    data = make_data(model, (4,), "ce")
    params = [p for p in model.parameters() if p.requires_grad]
    loss_func = nn.CrossEntropyLoss()
    check_products(monkeypatch, chain_calls, kind, model, loss_func, params, data)


def test_float32(chain_calls):
    model = mlp().float()
    data = [(X.float(), y) for X, y in make_data(model.double(), (4,), "ce")]
    model.float()
    op = GGNLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    dense = dense_ggn(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    V = torch.randn(op.shape[1], 2)
    chain_calls.clear()
    result = op @ V
    assert chain_calls == [2] * len(data) and result.dtype == torch.float32
    torch.testing.assert_close(
        result.double(), dense @ V.double(), rtol=1e-4, atol=1e-6
    )


def test_functional_api_takes_the_chain(monkeypatch, chain_calls):
    model = mlp()
    params = dict(model.named_parameters())
    X, y = make_data(model, (4,), "ce")[0]
    mv = functional.make_ggn_mv(
        model, params, (X, y), nn.CrossEntropyLoss(reduction="sum")
    )
    v = {name: torch.randn_like(p) for name, p in params.items()}
    chain_calls.clear()
    result = mv(v)
    assert chain_calls == [1]
    monkeypatch.setattr(core, "SEQUENTIAL_CHAIN_PRODUCTS", False)
    expected = mv(v)
    for name in params:
        torch.testing.assert_close(result[name], expected[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d_groups"])
@pytest.mark.parametrize("budget", [1, 400])
def test_columns_in_chunks(monkeypatch, chain_calls, name, budget):
    """Chunks of one column, and uneven chunks (MLP, 400 bytes: 2, 3 or 5 columns)."""
    monkeypatch.setattr(
        "curvlinops_fisher.closed_form.chain.TANGENT_CHUNK_BYTES", budget
    )
    model, datum_shape = model_case(name)
    data = make_data(model, datum_shape, "ce")
    params = list(model.parameters())
    loss_func = nn.CrossEntropyLoss()
    check_products(
        monkeypatch, chain_calls, GGNLinearOperator, model, loss_func, params, data
    )


CNN_SUBSETS = {
    "first_weight": lambda m: [m[0].weight],
    "second_bias": lambda m: [m[3].bias],
    "second_weight_first_bias": lambda m: [m[3].weight, m[0].bias],
    "head": lambda m: list(m[6].parameters()),
}


#: Parameter subsets of model cases (batch norm: its scale or shift as the first
#: differentiated parameter).
MODEL_SUBSETS = {
    "mlp": SUBSETS,
    "cnn": CNN_SUBSETS,
    "batchnorm_mlp": BATCHNORM_SUBSETS,
}


@pytest.mark.parametrize("kind", OPERATORS, ids=operator_id)
@pytest.mark.parametrize(
    "case, subset",
    [(case, subset) for case, subsets in MODEL_SUBSETS.items() for subset in subsets],
)
def test_model_parameter_subsets(monkeypatch, chain_calls, kind, case, subset):
    """Layers outside ``params`` are constants (also before the first one in it)."""
    model, datum_shape = model_case(case)
    data = make_data(model, datum_shape, "ce")
    params = MODEL_SUBSETS[case][subset](model)
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    check_products(monkeypatch, chain_calls, kind, model, loss_func, params, data)


def test_unbatched_convolution_input_takes_the_ad_path(chain_calls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Tanh(), nn.Conv1d(3, 2, 1)).double()
    X = torch.randn(2, 4, dtype=torch.float64)  # (C, L): unbatched, output (2, 3)
    y = torch.randn(2, 3, dtype=torch.float64)
    loss_func = nn.MSELoss(reduction="sum")
    params = dict(model.named_parameters())
    mv = functional.make_ggn_mv(model, params, (X, y), loss_func)
    v = {name: torch.randn_like(p) for name, p in params.items()}
    chain_calls.clear()
    result = mv(v)
    assert chain_calls == []  # its check finds the chain inapplicable: the AD path
    dense = dense_ggn(model, loss_func, list(params.values()), [(X, y)])
    flat_v = torch.cat([t.flatten() for t in v.values()])
    flat = torch.cat([t.flatten() for t in result.values()])
    torch.testing.assert_close(flat, dense @ flat_v, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------- not qualifying


class CustomSequential(nn.Sequential):
    """A subclass of ``nn.Sequential`` with its own forward."""

    def forward(self, x):
        return super().forward(x) + x[..., :1]


def not_qualifying(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "subclass":
        return CustomSequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    if name == "batchnorm_training":  # batch statistics couple the data points
        layers = (nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
        return nn.Sequential(*layers).double()
    if name == "batchnorm_without_running_statistics":  # batch statistics in eval
        norm = nn.BatchNorm1d(5, track_running_stats=False)
        return nn.Sequential(nn.Linear(4, 5), norm, nn.Linear(5, 3)).double().eval()
    if name == "lp_pool":
        layers = (nn.Conv1d(1, 2, 3), nn.LPPool1d(2, 2), nn.Flatten(), nn.Linear(2, 3))
        return nn.Sequential(*layers).double()
    if name == "prelu":
        return nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3)).double()
    if name == "linear_subclass":

        class MyLinear(nn.Linear):
            pass

        return nn.Sequential(MyLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    if name == "reflect_padding":
        conv = nn.Conv1d(1, 2, 3, padding=1, padding_mode="reflect")
        return nn.Sequential(conv, nn.Flatten(), nn.Linear(8, 3)).double()
    if name == "same_even_kernel":
        conv = nn.Conv1d(1, 2, 2, padding="same")
        return nn.Sequential(conv, nn.Flatten(), nn.Linear(8, 3)).double()
    if name == "transposed":
        conv = nn.ConvTranspose1d(1, 2, 2)
        return nn.Sequential(conv, nn.Flatten(), nn.Linear(10, 3)).double()
    if name == "module":
        return nn.ModuleList([nn.Linear(4, 3)]).double()
    model = mlp()
    parametrize.register_parametrization(model[0], "weight", Doubled())
    return model


class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize(
    "name",
    [
        "subclass",
        "batchnorm_training",
        "batchnorm_without_running_statistics",
        "lp_pool",
        "prelu",
        "linear_subclass",
        "module",
        "parametrized",
        "reflect_padding",
        "same_even_kernel",
        "transposed",
    ],
)
def test_models_that_do_not_qualify(name):
    model = not_qualifying(name)
    slots = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    chain = closed_form_chain(model, slots)
    assert chain is None or not chain.is_current()


def test_parameter_outside_the_layers_does_not_qualify():
    model = mlp()
    assert closed_form_chain(model, {"0.weight": 0, "unknown": 1}) is None


def changes() -> dict[str, Callable]:
    """Changes to a model after an operator was built; each returns an undo."""

    def forward_hook(model):
        handle = model[1].register_forward_hook(lambda m, a, out: 2 * out)
        return handle.remove

    def pre_hook(model):
        handle = model[2].register_forward_pre_hook(lambda m, a: (a[0] + 1,))
        return handle.remove

    def global_hook(model):
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, a, out: out * 1.5 if isinstance(m, nn.Tanh) else None
        )
        return handle.remove

    def replaced_child(model):
        model[1] = nn.Sigmoid()
        return lambda: None

    def instance_forward(model):
        layer = model[1]
        layer.forward = lambda x: torch.tanh(3 * x)
        return lambda: delattr(layer, "forward")

    return {
        "forward_hook": forward_hook,
        "pre_hook": pre_hook,
        "global_hook": global_hook,
        "replaced_child": replaced_child,
        "instance_forward": instance_forward,
    }


def check_change_takes_ad_path(chain_calls, model, data, change) -> tuple:
    """After ``change(model)``, products equal brute force of the changed model and
    skip the chain; the change is undone before returning ``(op, v)``."""
    loss_func = nn.CrossEntropyLoss()
    params = list(model.parameters())
    op = GGNLinearOperator(model, loss_func, params, data)
    undo = change(model)
    try:
        v = torch.randn(op.shape[1], dtype=torch.float64)
        chain_calls.clear()
        result = op @ v
        assert chain_calls == []
        dense = dense_ggn(model, loss_func, params, data)
        torch.testing.assert_close(result, dense @ v, rtol=1e-10, atol=1e-12)
    finally:
        undo()
    return op, v


@pytest.mark.parametrize("change", changes())
def test_changed_model_takes_the_ad_path(chain_calls, change):
    """After the model changes, products are those of the changed model."""
    model = mlp()
    data = make_data(model, (4,), "ce")
    op, v = check_change_takes_ad_path(chain_calls, model, data, changes()[change])
    chain_calls.clear()
    op @ v
    assert chain_calls == [1] * len(data) or change == "replaced_child"


@pytest.mark.parametrize("closed_form", [True, False], ids=["chain", "ad"])
@pytest.mark.parametrize("kind", OPERATORS, ids=operator_id)
def test_products_follow_a_restructured_model(
    monkeypatch, chain_calls, kind, closed_form
):
    """Parameters that move to other names (layers wrapped in containers) are found
    again: products are those of the changed model."""
    monkeypatch.setattr(core, "SEQUENTIAL_CHAIN_PRODUCTS", closed_form)
    model = mlp()
    data = make_data(model, (4,), "ce")
    loss_func = nn.CrossEntropyLoss()
    params = list(model.parameters())
    op = kind(model, loss_func, params, data)
    v = torch.randn(op.shape[1], 2, dtype=torch.float64)
    for change in (
        lambda: model.__setitem__(0, nn.Sequential(model[0])),  # '0.0.weight'
        lambda: model.__setitem__(2, nn.Sequential(OrderedDict(out=model[2]))),
    ):
        change()
        chain_calls.clear()
        result = op @ v
        assert chain_calls == ([2] * len(data) if closed_form else [])
        dense = dict(REFERENCES)[kind](model, loss_func, params, data)
        torch.testing.assert_close(result, dense @ v, rtol=1e-10, atol=1e-12)


def test_batchnorm_with_batch_statistics_is_not_current():
    """Training mode, or no running statistics: the batch couples the data points."""
    model, _ = model_case("batchnorm_mlp")
    chain = closed_form_chain(model, {"1.weight": 0})
    assert chain is not None and chain.is_current()
    model.train()
    assert not chain.is_current()
    model.eval()
    model[1].running_var = None
    assert not chain.is_current()


def test_dropout_in_training_mode_is_not_current():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3))
    chain = closed_form_chain(model, {"0.weight": 0})
    assert chain is not None and not chain.is_current()
    model.eval()
    assert chain.is_current()
    model.train()
    model[1].p = 0.0
    assert chain.is_current()
