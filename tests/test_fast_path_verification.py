"""Fast paths are proven before they are trusted (closed-form chains of traced models).

Each case of the issue "no silent wrong number from a fast path" against brute force,
plus mutation tests: with one safeguard removed, the next one must still catch the
case (a warning and the generic path), and with all of them removed the numbers are
wrong, so each safeguard is needed.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from reference import dense_ggn as brute_force_ggn
from torch import fx, nn
from torch.nn import functional as F

from curvlinops_fisher import GGNLinearOperator, fast_path_checks
from curvlinops_fisher.closed_form import traced, traced_calls
from curvlinops_fisher.fast_path_checks import FastPathFailure


def make_data(in_features: int = 4, sizes=(3, 2)):
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, in_features, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=generator),
        )
        for n in sizes
    ]


def ggn_and_reference(model: nn.Module, data, change=None):
    """``op @ I`` of an operator built before ``change(model)``, and brute force after."""
    loss_func = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    op = GGNLinearOperator(model, loss_func, params, [(X.clone(), y) for X, y in data])
    eye = torch.eye(op.shape[1], dtype=torch.float64)
    if change is not None:
        op @ eye[:, 0]  # checked and used before the change
        assert op._model_function.sequential.is_current()
        change(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dense = op @ eye
    reference = brute_force_ggn(model, loss_func, params, data)
    failures = [w for w in caught if issubclass(w.category, FastPathFailure)]
    return dense, reference, failures


def relative(A, B) -> float:
    return float((A - B).norm() / B.norm())


# ------------------------------------------------ 1. in-place on an alias


ALIASES = {
    "dropout": lambda m, h: m.drop(h),
    "identity": lambda m, h: m.identity(h),
    "flatten": lambda m, h: h.flatten(1),
    "contiguous": lambda m, h: h.contiguous(),
    "view": lambda m, h: h.view(h.shape),
    "reshape": lambda m, h: h.reshape(h.shape),
    "nn_flatten": lambda m, h: m.flat(h),
}


class InPlaceOnAlias(nn.Module):
    """``act(alias(h)) + h`` with an in-place ReLU: the model computes ``2 relu(h)``."""

    def __init__(self, alias: str, in_place: bool = True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.act = nn.ReLU(inplace=in_place)
        self.drop, self.identity, self.flat = (
            nn.Dropout(0.3),
            nn.Identity(),
            nn.Flatten(),
        )
        self.alias = alias

    def forward(self, x):
        h = self.fc1(x)
        a = self.act(ALIASES[self.alias](self, h))
        return self.fc2(a + h)


class FunctionalInPlaceOnAlias(InPlaceOnAlias):
    def forward(self, x):
        h = self.fc1(x)
        a = F.relu(h.view(h.shape), inplace=True)
        return self.fc2(a + h)


class AugmentedAssignment(nn.Module):
    """``g = h; h += tanh(h)``: ``g`` sees the change."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc1(x)
        g = h
        h += torch.tanh(h)
        return self.fc2(h) + self.fc3(g)


class HarmlessInPlace(nn.Module):
    """In-place changes nobody reads afterwards: ``out += identity`` (a ResNet block)
    and an in-place ReLU on a value read only before it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 5)
        self.fc3, self.act = nn.Linear(5, 3), nn.ReLU(inplace=True)

    def forward(self, x):
        identity = self.fc1(x)
        out = self.fc2(identity)
        out += identity
        return self.fc3(self.act(out))


def in_place_models():
    models = {f"alias_{name}": lambda n=name: InPlaceOnAlias(n) for name in ALIASES}
    models["functional_view"] = lambda: FunctionalInPlaceOnAlias("view")
    models["augmented"] = AugmentedAssignment
    return models


@pytest.mark.parametrize("name", in_place_models())
def test_in_place_change_of_an_alias_is_not_a_chain(name):
    torch.manual_seed(0)
    model = in_place_models()[name]().double().eval()
    assert traced_calls(model) is None
    dense, reference, failures = ggn_and_reference(model, make_data())
    assert relative(dense, reference) < 1e-12
    assert failures == []


def test_harmless_in_place_changes_keep_the_chain():
    torch.manual_seed(0)
    model = HarmlessInPlace().double()
    assert traced_calls(model) is not None
    dense, reference, failures = ggn_and_reference(model, make_data())
    assert relative(dense, reference) < 1e-12
    assert failures == []


def _without_alias_analysis(monkeypatch):
    monkeypatch.setattr(traced, "_check_values", lambda *args: None)
    monkeypatch.setattr(traced, "_Tracer", fx.Tracer)


def _without_numerical_check(monkeypatch):
    monkeypatch.setattr(
        fast_path_checks, "compare_linearizations", lambda *args, **kwargs: None
    )


@pytest.mark.parametrize("name", ["alias_dropout", "alias_view", "augmented"])
def test_numerical_check_catches_what_the_alias_analysis_misses(monkeypatch, name):
    """Mutation: without the alias analysis the chain is built, and its check sends
    products to the generic path with one warning; without both, numbers are wrong."""
    torch.manual_seed(0)
    _without_alias_analysis(monkeypatch)
    model = in_place_models()[name]().double().eval()
    assert traced_calls(model) is not None
    dense, reference, failures = ggn_and_reference(model, make_data())
    assert relative(dense, reference) < 1e-12
    assert len(failures) == 1
    assert "InPlaceOnAlias" in str(failures[0].message) or "Augmented" in str(
        failures[0].message
    )
    _without_numerical_check(monkeypatch)
    model = in_place_models()[name]().double().eval()
    dense, reference, _ = ggn_and_reference(model, make_data())
    assert relative(dense, reference) > 1e-3


def test_warning_once_per_operator(monkeypatch):
    torch.manual_seed(0)
    _without_alias_analysis(monkeypatch)
    model = InPlaceOnAlias("identity").double().eval()
    op = GGNLinearOperator(
        model, nn.CrossEntropyLoss(), list(model.parameters()), make_data()
    )
    v = torch.randn(op.shape[1], dtype=torch.float64)
    with pytest.warns(FastPathFailure, match="closed-form chain of InPlaceOnAlias"):
        op @ v
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFailure)
        op @ v
        op @ torch.randn(op.shape[1], 2, dtype=torch.float64)


# ------------------------------------- 3. state that forward reads, changed later

FLAG = True


class Options:
    """A configuration object (the Hugging Face style)."""

    def __init__(self):
        self.use_relu = True
        self.nested = {"scale": [1.0, 2.0]}


class Configured(nn.Module):
    """Branches on a dict entry, a config object, a class attribute and a global."""

    use_sigmoid = True

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.opts = {"act": True}
        self.cfg = Options()
        self.ns = types.SimpleNamespace(gelu=True)

    def forward(self, x):
        h = self.fc1(x)
        if self.opts["act"]:
            h = torch.tanh(h)
        if self.cfg.use_relu:
            h = torch.relu(h)
        if self.cfg.nested["scale"][1] == 2.0:
            h = h.view(h.shape[0], -1)
        else:
            h = F.silu(h)
        if self.use_sigmoid:
            h = torch.sigmoid(h)
        if self.ns.gelu:
            h = F.gelu(h)
        if FLAG:
            h = h.tanh()
        return self.fc2(h)


def _set_global(value):
    global FLAG
    FLAG = value


STATE_CHANGES = {
    "dict_entry": (
        lambda m: m.opts.__setitem__("act", False),
        lambda m: m.opts.__setitem__("act", True),
    ),
    "config_object": (
        lambda m: setattr(m.cfg, "use_relu", False),
        lambda m: setattr(m.cfg, "use_relu", True),
    ),
    "nested_list": (
        lambda m: m.cfg.nested["scale"].__setitem__(1, 3.0),
        lambda m: m.cfg.nested["scale"].__setitem__(1, 2.0),
    ),
    "namespace": (
        lambda m: setattr(m.ns, "gelu", False),
        lambda m: setattr(m.ns, "gelu", True),
    ),
    "class_attribute": (
        lambda m: setattr(Configured, "use_sigmoid", False),
        lambda m: setattr(Configured, "use_sigmoid", True),
    ),
    "global_variable": (lambda m: _set_global(False), lambda m: _set_global(True)),
}


@pytest.mark.parametrize("change", STATE_CHANGES)
def test_state_changed_after_construction_is_followed(change):
    torch.manual_seed(0)
    model = Configured().double()
    assert traced_calls(model) is not None
    apply, undo = STATE_CHANGES[change]
    try:
        dense, reference, failures = ggn_and_reference(model, make_data(), apply)
    finally:
        undo(model)
    assert relative(dense, reference) < 1e-12
    assert failures == []  # the guard saw it: no check needed


@pytest.mark.parametrize("change", ["dict_entry", "class_attribute", "global_variable"])
def test_without_the_deep_guard_a_changed_state_gives_wrong_numbers(
    monkeypatch, change
):
    """Mutation: a guard that compares attributes by identity only misses the change
    (the check ran before it, on the old state)."""
    monkeypatch.setattr(
        traced,
        "snapshot",
        lambda modules: [[id(v) for v in a.values()] for a in modules],
    )
    monkeypatch.setattr(traced, "class_state", lambda classes: None)
    monkeypatch.setattr(traced, "references_state", lambda refs: None)
    torch.manual_seed(0)
    model = Configured().double()
    apply, undo = STATE_CHANGES[change]
    try:
        dense, reference, _ = ggn_and_reference(model, make_data(), apply)
    finally:
        undo(model)
    assert relative(dense, reference) > 1e-3


class Uncovered(nn.Module):
    """Reads a config whose attributes are computed (``__getattr__``)."""

    class Config:
        def __getattr__(self, name):
            return True

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.cfg = self.Config()

    def forward(self, x):
        return self.fc(torch.relu(x)) if self.cfg.relu else self.fc(x)


def test_state_a_snapshot_cannot_cover_refuses_the_trace():
    assert traced_calls(Uncovered()) is None


def test_check_runs_once_per_input_signature(monkeypatch):
    calls = []
    original = fast_path_checks.compare_linearizations

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fast_path_checks, "compare_linearizations", spy)
    torch.manual_seed(0)
    model = HarmlessInPlace().double()
    data = make_data(sizes=(3, 2, 3))
    op = GGNLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    for _ in range(3):
        op @ torch.randn(op.shape[1], dtype=torch.float64)
    assert len(calls) == 2  # batch sizes 3 and 2


# ------------------------------------------- the one-column dual-number path


def test_dual_number_path_is_checked(monkeypatch):
    """Mutation: a wrong tangent rule of the dual-number path (injected into its
    ``F.linear`` shortcut) is caught by the check; products stay exact."""
    from curvlinops_fisher import core, dual_numbers

    monkeypatch.setattr(core, "SEQUENTIAL_CHAIN_PRODUCTS", False)
    monkeypatch.setattr(dual_numbers, "LINEAR_SHORTCUT_MIN_NUMEL", 0)
    original = dual_numbers._linear_without_input_tangent

    def wrong(input, weight, bias=None):
        result = original(input, weight, bias)
        if result is None:
            return None
        primal, tangent = torch.autograd.forward_ad.unpack_dual(result)
        return torch.autograd.forward_ad.make_dual(primal, 2 * tangent)

    monkeypatch.setattr(dual_numbers, "_linear_without_input_tangent", wrong)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = make_data()
    loss_func = nn.CrossEntropyLoss()
    params = list(model.parameters())
    op = GGNLinearOperator(model, loss_func, params, data)
    v = torch.randn(op.shape[1], dtype=torch.float64)
    with pytest.warns(FastPathFailure, match="dual numbers disagree"):
        result = op @ v
    reference = brute_force_ggn(model, loss_func, params, data) @ v
    torch.testing.assert_close(result, reference, rtol=1e-10, atol=1e-12)
    # without the check, the injected rule gives a wrong product
    monkeypatch.setattr(dual_numbers, "_checked_one_column", lambda *args: True)
    op = GGNLinearOperator(model, loss_func, params, data)
    assert relative(op @ v, reference) > 1e-3
