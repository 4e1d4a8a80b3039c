"""Random models of the closed-form chain's layers against brute force (issue 22).

:mod:`random_models` draws a tiny float64 model per seed (an ``nn.Sequential``, or a
custom ``forward`` that runs a random program of linear layers, activations with
random ``inplace`` flags, pass-through layers, aliasing reshapes, residual sums and
``h += t``), frozen parameter subsets, two unequal batches, and optionally a change
to the model after the operator is built. Every product, the dense matrix and the
trace must equal the brute-force matrix of what the model computes at that moment
(before the change and after it).

A failing seed reproduces with ``pytest tests/test_random_models.py -k seed17``; the
failure message lists the model's program and the change.

Below the random cases: one hand-written model per failure class of the issue
(an in-place activation on an alias of a value the sum reads again; ``h += t`` with
another name still referring to ``h``; state that ``forward`` branches on, changed
after construction).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import pytest
import torch
from random_models import Case, random_case
from reference import assert_matrix_close, dense_ggn
from torch import Tensor, nn

from curvlinops_fisher import GGNLinearOperator
from curvlinops_fisher.closed_form import closed_form_chain

#: Seeds of the random cases (their test ids are ``seed<k>``).
SEEDS = range(48)


def check_operator(op, expected: Tensor, context: str) -> None:
    """``op`` as products (one column, the identity), dense matrix and trace."""
    P = op.shape[1]
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(P, generator=generator, dtype=torch.float64)
    checks = [
        ("op @ v", lambda: op @ v, lambda: expected @ v),
        ("op @ I", lambda: op @ torch.eye(P, dtype=torch.float64), lambda: expected),
        ("op.to_dense()", op.to_dense, lambda: expected),
        ("op.trace()", op.trace, lambda: expected.trace()),
    ]
    for what, actual, reference in checks:
        try:
            assert_matrix_close(actual(), reference())
        except AssertionError as error:
            raise AssertionError(f"{what} {context}:\n{error}") from None


def run_case(case: Case) -> None:
    """Products before and (if the case has one) after the change, against brute force."""
    data_before = [(X.clone(), y.clone()) for X, y in case.data]
    op = case.kind(case.model, case.loss_func, case.params, case.data)
    try:
        check_operator(op, case.reference(), "of the model as built")
        if case.change is not None:
            undo = case.change.apply(case.model)
            try:
                check_operator(op, case.reference(), "after the change")
            finally:
                undo()
            # and once more after undoing it
            check_operator(op, case.reference(), "after undoing the change")
    except AssertionError as error:
        raise AssertionError(f"{case.description}\n{error}") from None
    for (X, y), (X0, y0) in zip(case.data, data_before):
        assert torch.equal(X, X0) and torch.equal(y, y0), "the data set changed"


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_random_model(seed: int):
    run_case(random_case(seed))


def test_random_models_exercise_the_closed_form():
    """At least a quarter of the random models qualify for the closed-form chain (so
    that the seeds keep testing the fast path, not only the AD path)."""
    qualifying = 0
    for seed in SEEDS:
        model = random_case(seed).model
        slots = {name: i for i, (name, _) in enumerate(model.named_parameters())}
        qualifying += closed_form_chain(model, slots) is not None
    assert qualifying >= len(SEEDS) / 4, qualifying


def test_generator_is_deterministic():
    first, second = random_case(3), random_case(3)
    assert first.description == second.description
    for (X1, y1), (X2, y2) in zip(first.data, second.data):
        assert torch.equal(X1, X2) and torch.equal(y1, y2)
    for p1, p2 in zip(first.params, second.params):
        assert torch.equal(p1, p2)


# ------------------------------------------------------------ hand-written cases


def make_data(model: nn.Module, width: int = 3) -> list[tuple[Tensor, Tensor]]:
    """Two unequal batches with class targets for ``model``'s 3 outputs."""
    generator = torch.Generator().manual_seed(1)
    data = []
    for n in (3, 2):
        X = torch.randn(n, width, generator=generator, dtype=torch.float64)
        data.append((X, torch.randint(0, 3, (n,), generator=generator)))
    return data


def check_against_brute_force(
    model: nn.Module, change: Callable[[nn.Module], Callable[[], None]] | None = None
) -> None:
    """GGN products of ``model`` (and after ``change``) equal brute force."""
    model = model.double()
    loss_func = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    data = make_data(model)
    data_before = [(X.clone(), y.clone()) for X, y in data]

    def reference() -> Tensor:
        return dense_ggn(
            model, loss_func, params, [(X.clone(), y.clone()) for X, y in data]
        )

    op = GGNLinearOperator(model, loss_func, params, data)
    check_operator(op, reference(), "of the model as built")
    if change is not None:
        undo = change(model)
        try:
            check_operator(op, reference(), "after the change")
        finally:
            undo()
        check_operator(op, reference(), "after undoing the change")
    for (X, y), (X0, y0) in zip(data, data_before):
        assert torch.equal(X, X0) and torch.equal(y, y0), "the data set changed"


# (1) an in-place activation on an alias of a value that the sum reads again

ALIASES: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    "dropout_eval": lambda m, h: m.drop(h),
    "identity": lambda m, h: m.ident(h),
    "flatten": lambda m, h: h.flatten(1),
    "contiguous": lambda m, h: h.contiguous(),
    "view": lambda m, h: h.view(h.shape),
    "reshape": lambda m, h: h.reshape(h.shape),
}


class InPlaceOnAlias(nn.Module):
    """``a = relu_(alias(h)); return fc2(a + h)``: the sum is ``2 relu(h)``."""

    def __init__(self, alias: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 3)
        self.drop, self.ident = nn.Dropout(0.5), nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.alias = alias

    def forward(self, x):
        h = self.fc1(x)
        a = self.act(ALIASES[self.alias](self, h))
        return self.fc2(a + h)


@pytest.mark.parametrize("alias", ALIASES)
def test_in_place_activation_on_alias(alias: str):
    torch.manual_seed(0)
    check_against_brute_force(InPlaceOnAlias(alias).eval())


# (2) ``h += t`` while another name still refers to ``h``


class AugmentedAssignment(nn.Module):
    """``g = h; h += tanh(h); return fc2(h) + fc3(g)``: ``g`` is the changed ``h``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc1(x)
        g = h
        h += torch.tanh(h)
        return self.fc2(h) + self.fc3(g)


def test_augmented_assignment_with_another_reference():
    torch.manual_seed(0)
    check_against_brute_force(AugmentedAssignment())


# (3) state that ``forward`` branches on, changed after construction

#: A global flag that :class:`GlobalFlag` reads (and :func:`global_use_relu`).
GLOBAL_USE_RELU = True
#: A Python module object whose attribute :class:`ModuleAttributeFlag` reads (as
#: ``from . import settings; settings.use_relu`` would).
settings = types.ModuleType("settings")
settings.use_relu = True


def global_use_relu() -> bool:
    return GLOBAL_USE_RELU


class Branching(nn.Module):
    """``fc2(relu(fc1(x)))`` or ``fc2(tanh(fc1(x)))``, by a flag read in ``forward``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 3)

    def use_relu(self) -> bool:
        raise NotImplementedError

    def forward(self, x):
        h = self.fc1(x)
        h = torch.relu(h) if self.use_relu() else torch.tanh(h)
        return self.fc2(h)


class DictFlag(Branching):
    def __init__(self):
        super().__init__()
        self.opts = {"act": True}

    def use_relu(self):
        return self.opts["act"]


class SmallConfig:
    def __init__(self):
        self.use_relu = True


class ConfigFlag(Branching):
    def __init__(self, config):
        super().__init__()
        self.cfg = config

    def use_relu(self):
        return self.cfg.use_relu


class ClassFlag(Branching):
    use_relu_flag = True

    def use_relu(self):
        return ClassFlag.use_relu_flag


class GlobalFlag(Branching):
    def use_relu(self):
        return GLOBAL_USE_RELU


class GlobalHelperFlag(Branching):
    def use_relu(self):
        return global_use_relu()


class ModuleAttributeFlag(Branching):
    def use_relu(self):
        return settings.use_relu


class AttributeFlag(Branching):
    def __init__(self):
        super().__init__()
        self.flag = True

    def use_relu(self):
        return self.flag


def _set(obj, name: str, value) -> Callable[[], None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    return lambda: setattr(obj, name, old)


def _dict_entry(model):
    model.opts["act"] = False
    return lambda: model.opts.__setitem__("act", True)


STATE_CHANGES: dict[str, tuple[Callable[[], nn.Module], Callable]] = {
    "attribute": (AttributeFlag, lambda m: _set(m, "flag", False)),
    "dict_entry": (DictFlag, _dict_entry),
    "config_namespace": (
        lambda: ConfigFlag(types.SimpleNamespace(use_relu=True)),
        lambda m: _set(m.cfg, "use_relu", False),
    ),
    "config_object": (
        lambda: ConfigFlag(SmallConfig()),
        lambda m: _set(m.cfg, "use_relu", False),
    ),
    "class_attribute": (ClassFlag, lambda m: _set(ClassFlag, "use_relu_flag", False)),
    "global": (
        GlobalFlag,
        lambda m: _set(sys.modules[__name__], "GLOBAL_USE_RELU", False),
    ),
    "global_via_helper": (
        GlobalHelperFlag,
        lambda m: _set(sys.modules[__name__], "GLOBAL_USE_RELU", False),
    ),
    "module_attribute": (
        ModuleAttributeFlag,
        lambda m: _set(settings, "use_relu", False),
    ),
}


@pytest.mark.parametrize("state", STATE_CHANGES)
def test_state_changed_after_construction(state: str):
    torch.manual_seed(0)
    make, change = STATE_CHANGES[state]
    check_against_brute_force(make(), change)
