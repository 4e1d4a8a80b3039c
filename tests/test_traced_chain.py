"""Closed-form products of chains behind a custom ``forward`` (traced with torch.fx)."""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest
import torch
from test_sequential import (
    OPERATORS,
    chain_calls,  # noqa: F401 (fixture)
    check_change_takes_ad_path,
    check_products,
    make_data,
    operator_id,
    with_running_statistics,
)
from torch import nn
from torch.nn import functional as F

from curvlinops_fisher import GGNLinearOperator, core
from curvlinops_fisher.closed_form import closed_form_chain, traced_calls


class SmallCNN(nn.Module):
    """Convolutions in a ``Sequential``, then a head called from ``forward``."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class FunctionalNet(nn.Module):
    """Layers in a ``ModuleList`` loop, functional activations and size-based views."""

    def __init__(self, use_tanh: bool = True):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(2, 3, 2), nn.Conv1d(3, 2, 2, bias=False)])
        self.out = nn.Linear(4, 3)
        self.use_tanh = use_tanh

    def forward(self, x):
        x = F.leaky_relu(self.convs[0](x), 0.2)
        x = (
            torch.relu(self.convs[1](x))
            if not self.use_tanh
            else self.convs[1](x).tanh()
        )
        x = x.view(x.size(0), -1)
        return F.gelu(self.out(torch.reshape(x, (x.shape[0], 4))))


class LeNet(nn.Module):
    """The tutorial CNN: functional pooling between convolutions, a batch norm."""

    def __init__(self):
        super().__init__()
        self.conv1, self.norm = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.norm(self.conv1(x))), 2, stride=1)
        x = F.avg_pool2d(torch.tanh(self.conv2(x)), (1, 2), ceil_mode=True)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class Block(nn.Module):
    """A ResNet basic block: two convolutions with batch norms, a shortcut (a strided
    1x1 convolution when the shape changes), one ReLU module called twice."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A stem, a block keeping the shape, a downsampling block, global pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3))
        self.layers = nn.Sequential(Block(3, 3), Block(3, 4, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.layers(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResidualMLP(nn.Module):
    """Residual additions as ``torch.add`` and ``Tensor.add``, and ``x + x``."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.add(h, F.silu(self.mid(h)))
        h = h.add(self.mid(h))  # the same layer again, on the sum
        return self.out(h + h)


class CustomSequential(nn.Sequential):
    """A subclass that keeps ``nn.Sequential``'s forward."""


def traced_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "cnn":
        return SmallCNN().double(), (2, 4, 4)
    if name == "functional":
        return FunctionalNet().double(), (2, 4)
    if name == "functional_relu":
        return FunctionalNet(use_tanh=False).double(), (2, 4)
    if name == "lenet":
        return with_running_statistics(LeNet()), (1, 5, 6)
    if name == "resnet":
        return with_running_statistics(ResNet()), (2, 4, 4)
    if name == "residual_mlp":
        return ResidualMLP().double(), (4,)
    return CustomSequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(), (4,)


TRACED = [
    "cnn",
    "functional",
    "functional_relu",
    "lenet",
    "resnet",
    "residual_mlp",
    "subclass",
]


@pytest.mark.parametrize("kind", OPERATORS, ids=operator_id)
@pytest.mark.parametrize("name", TRACED)
def test_traced_products(monkeypatch, chain_calls, kind, name):  # noqa: F811
    model, datum_shape = traced_model(name)
    data = make_data(model, datum_shape, "ce")
    params = list(model.parameters())
    loss_func = nn.CrossEntropyLoss()
    check_products(monkeypatch, chain_calls, kind, model, loss_func, params, data)


def test_subset_of_a_traced_model(monkeypatch, chain_calls):  # noqa: F811
    model, datum_shape = traced_model("functional")
    data = make_data(model, datum_shape, "ce")
    params = [model.convs[1].weight, model.out.bias]
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    check_products(
        monkeypatch, chain_calls, GGNLinearOperator, model, loss_func, params, data
    )


RESNET_SUBSETS = {
    "shortcut": lambda m: [m.layers[1].downsample[0].weight],  # one summand
    "main_branch": lambda m: [m.layers[0].conv2.weight, m.fc.bias],
    "scale": lambda m: [m.layers[1].bn1.weight],
}


@pytest.mark.parametrize("subset", RESNET_SUBSETS)
def test_subsets_of_a_residual_model(monkeypatch, chain_calls, subset):  # noqa: F811
    """Sums with tangents in one summand only, and cotangents into one branch."""
    model, datum_shape = traced_model("resnet")
    data = make_data(model, datum_shape, "ce")
    params = RESNET_SUBSETS[subset](model)
    check_products(
        monkeypatch, chain_calls, GGNLinearOperator, model, nn.CrossEntropyLoss(),
        params, data,
    )  # fmt: skip


class AddConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        return self.layer(x) + 1


class InPlaceOnShared(nn.Module):
    """``relu_`` changes ``h``, which the sum reads again: the model computes
    ``2 relu(h)``, which a graph of the values would not."""

    def __init__(self, functional: bool, in_place: bool = True):
        super().__init__()
        self.layer, self.act = nn.Linear(3, 3), nn.ReLU(inplace=in_place)
        self.functional = functional

    def forward(self, x):
        h = self.layer(x)
        r = F.relu(h, inplace=True) if self.functional else self.act(h)
        return r + h


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.layer(x) * self.scale


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        return self.layer(x) if x.sum() > 0 else -self.layer(x)


class Permuted(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        return self.layer(x.permute(0, 2, 1))


class DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        self.first(x)
        return self.second(x)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x, shift=None):
        return self.layer(x)


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer, self.norm = nn.Linear(3, 3), nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.layer(x))


class PoolingIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 2)

    def forward(self, x):
        return F.max_pool1d(self.conv(x), 2, return_indices=True)[0]


@pytest.mark.parametrize(
    "cls",
    [AddConstant, OwnParameter, DataDependent, Permuted, DeadBranch, TwoInputs]
    + [WithLayerNorm, PoolingIndices]
    + [lambda: InPlaceOnShared(True), lambda: InPlaceOnShared(False)],
)
def test_models_that_do_not_trace_to_a_chain(cls):
    model = cls()
    assert traced_calls(model) is None
    slots = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    assert closed_form_chain(model, slots) is None


class Recording(nn.Module):
    """Its ``forward`` stores its input (tracing must not leave a symbolic value)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.last = None

    def forward(self, x):
        self.last = x
        return self.layer(x)


def test_tracing_restores_attributes():
    model = Recording()
    assert traced_calls(model) is not None
    assert model.last is None


class Doubled(nn.Module):
    """Twice a layer's output, under the layer's parameter names."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.layer = layer

    def forward(self, x):
        return (
            2 * self.layer._conv_forward(x, self.weight, self.bias)
            if isinstance(self.layer, nn.Conv1d)
            else 2 * F.linear(x, self.weight, self.bias)
        )


def changes() -> dict[str, Callable]:
    """Changes to a traced model after construction; each returns an undo."""

    def flag(model):
        model.use_tanh = False
        return lambda: setattr(model, "use_tanh", True)

    def class_forward(model):
        original = FunctionalNet.forward
        FunctionalNet.forward = lambda self, x: original(self, 2 * x)
        return lambda: setattr(FunctionalNet, "forward", original)

    def replaced_child(model):  # same parameters, another class
        model.out = Doubled(model.out)
        return lambda: None

    def root_hook(model):
        handle = model.register_forward_hook(lambda m, a, out: 2 * out)
        return handle.remove

    def instance_forward(model):
        def forward(self, x):
            return FunctionalNet.forward(self, x).sin()

        model.forward = types.MethodType(forward, model)
        return lambda: delattr(model, "forward")

    def list_entry(model):
        model.convs[0] = Doubled(model.convs[0])
        return lambda: None

    return {
        "flag": flag,
        "class_forward": class_forward,
        "replaced_child": replaced_child,
        "root_hook": root_hook,
        "instance_forward": instance_forward,
        "list_entry": list_entry,
    }


def test_layer_made_in_place_after_tracing_takes_the_ad_path(chain_calls):  # noqa: F811
    """``inplace=True`` set on a layer whose input the sum reads again changes the
    model to ``2 relu(h)``: products must follow it, not the traced graph."""
    torch.manual_seed(0)
    model = InPlaceOnShared(functional=False, in_place=False).double()
    assert traced_calls(model) is not None
    data = make_data(model, (3,), "ce")

    def in_place(model):
        model.act.inplace = True
        return lambda: setattr(model.act, "inplace", False)

    check_change_takes_ad_path(chain_calls, model, data, in_place)


@pytest.mark.parametrize("change", changes())
def test_changed_traced_model_takes_the_ad_path(chain_calls, change):  # noqa: F811
    """After the model changes, products are those of the changed model."""
    model, datum_shape = traced_model("functional")
    data = make_data(model, datum_shape, "ce")
    check_change_takes_ad_path(chain_calls, model, data, changes()[change])


def test_switch_turns_the_traced_chain_off(monkeypatch, chain_calls):  # noqa: F811
    model, datum_shape = traced_model("cnn")
    data = make_data(model, datum_shape, "ce")
    op = GGNLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    monkeypatch.setattr(core, "SEQUENTIAL_CHAIN_PRODUCTS", False)
    chain_calls.clear()
    op @ torch.randn(op.shape[1], dtype=torch.float64)
    assert chain_calls == []
