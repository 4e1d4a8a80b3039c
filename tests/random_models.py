"""Seeded random models made of the layers the closed-form chain supports.

:func:`random_case` turns a seed into a tiny float64 problem (model, loss, trainable
parameters, two unequal batches, operator class) and optionally a change to make to
the model after the operator is built. The model is one of three styles:

- ``sequential``: an ``nn.Sequential`` (with nested ``Sequential`` groups, and an
  optional ``Conv1d`` block in front) of linear layers, activation modules with
  random ``inplace`` flags, ``Identity``, ``Dropout`` (eval mode, or ``p = 0``) and
  ``Flatten``;
- ``interpreter``: a module whose ``forward`` interprets a random *program* stored
  on it, a list of ``(op, ...)`` tuples over the indices of earlier values
  (``torch.fx`` traces the interpreter loop);
- ``exec``: the same kind of program compiled to straight-line Python source, so that
  ``h3 = h1; h3 += h2`` really is an augmented assignment on a tensor that another
  name (``h1``) still refers to.

Program values are 2-D ``(N, width)`` tensors (input: value 0, op ``k``: value
``k + 1``). Operations: calls of modules (``Linear``, activation modules, pass-through
layers), functional activations (``torch.relu``, ``F.relu(h, inplace=...)``,
``h.tanh()``, ``h.relu_()``, ...), reshapes that return aliases (``view``,
``reshape``, ``flatten``, ``contiguous``, an ``unsqueeze`` / ``squeeze`` pair),
residual sums ``a + b``, augmented sums ``h += t`` and activations chosen by a flag
that ``forward`` reads (a plain attribute, a dict entry, a config object, a class
attribute, a global read directly or by a helper function, or an attribute of a
Python module object).

No operation changes the input (or a view of it) in place, so neither the model nor
the data set is altered by a forward pass. Candidates that PyTorch itself cannot
differentiate (an in-place operation on a tensor that autograd saved) are rejected
and redrawn, deterministically.
"""

from __future__ import annotations

import random
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from reference import dense_ef, dense_fisher_mc, dense_ggn
from torch import Tensor, nn
from torch.nn import functional as F

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)

#: A module-level flag that ``forward`` of interpreted programs reads (``cond`` ops
#: with source ``global``, or ``global_helper`` through :func:`global_flag`).
USE_RELU = True
#: A Python module object whose attribute ``forward`` reads (source ``module_attr``).
SETTINGS = types.ModuleType("random_model_settings")
SETTINGS.use_relu = True


def global_flag() -> bool:
    """The global flag, read by a helper function (not by ``forward`` itself)."""
    return USE_RELU


#: Operator classes and their brute-force references.
REFERENCES: dict[type, Callable[..., Tensor]] = {
    GGNLinearOperator: dense_ggn,
    EFLinearOperator: dense_ef,
    FisherMCLinearOperator: dense_fisher_mc,
}

#: Functional activations: name -> (function of ``(h, inplace)``, source template).
FUNCTIONS: dict[str, tuple[Callable[[Tensor, bool], Tensor], str]] = {
    "torch.relu": (lambda h, ip: torch.relu(h), "torch.relu({h})"),
    "F.relu": (lambda h, ip: F.relu(h, inplace=ip), "F.relu({h}, inplace={ip})"),
    "F.relu_positional": (lambda h, ip: F.relu(h, ip), "F.relu({h}, {ip})"),
    "h.relu": (lambda h, ip: h.relu(), "{h}.relu()"),
    "h.tanh": (lambda h, ip: h.tanh(), "{h}.tanh()"),
    "torch.tanh": (lambda h, ip: torch.tanh(h), "torch.tanh({h})"),
    "torch.sigmoid": (lambda h, ip: torch.sigmoid(h), "torch.sigmoid({h})"),
    "h.sigmoid": (lambda h, ip: h.sigmoid(), "{h}.sigmoid()"),
    "F.leaky_relu": (
        lambda h, ip: F.leaky_relu(h, 0.1, inplace=ip),
        "F.leaky_relu({h}, 0.1, inplace={ip})",
    ),
    "F.gelu": (lambda h, ip: F.gelu(h), "F.gelu({h})"),
    "F.silu": (lambda h, ip: F.silu(h, inplace=ip), "F.silu({h}, inplace={ip})"),
    "F.elu": (lambda h, ip: F.elu(h, inplace=ip), "F.elu({h}, inplace={ip})"),
    "h.relu_": (lambda h, ip: h.relu_(), "{h}.relu_()"),
    "h.tanh_": (lambda h, ip: h.tanh_(), "{h}.tanh_()"),
}
#: Functional activations with an ``inplace`` argument, and those always in place.
INPLACE_ARGUMENT = frozenset({"F.relu", "F.relu_positional", "F.leaky_relu", "F.silu"})
ALWAYS_INPLACE = frozenset({"h.relu_", "h.tanh_"})
#: Out-of-place activations a ``cond`` op chooses between.
COND_FUNCTIONS = ("torch.relu", "torch.tanh", "torch.sigmoid", "h.tanh", "F.gelu")

#: Activation modules: name -> factory of ``inplace`` (ignored where there is none).
ACTIVATIONS: dict[str, Callable[[bool], nn.Module]] = {
    "ReLU": lambda ip: nn.ReLU(inplace=ip),
    "LeakyReLU": lambda ip: nn.LeakyReLU(0.2, inplace=ip),
    "ELU": lambda ip: nn.ELU(inplace=ip),
    "SiLU": lambda ip: nn.SiLU(inplace=ip),
    "Hardtanh": lambda ip: nn.Hardtanh(inplace=ip),
    "Tanh": lambda ip: nn.Tanh(),
    "Sigmoid": lambda ip: nn.Sigmoid(),
    "GELU": lambda ip: nn.GELU(),
}
HAS_INPLACE = frozenset({"ReLU", "LeakyReLU", "ELU", "SiLU", "Hardtanh"})
#: Pass-through modules (``Dropout`` with ``p > 0`` only in eval mode).
PASS_THROUGH: dict[str, Callable[[], nn.Module]] = {
    "Identity": nn.Identity,
    "Dropout": lambda: nn.Dropout(0.5),
    "Dropout0": lambda: nn.Dropout(0.0),
    "Flatten": nn.Flatten,
}

#: Reshapes of a 2-D value that return it or a view of it: (function, template).
RESHAPES: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "view_shape": (lambda h: h.view(h.shape), "{h}.view({h}.shape)"),
    "reshape_shape": (lambda h: h.reshape(h.shape), "{h}.reshape({h}.shape)"),
    "flatten": (lambda h: h.flatten(1), "{h}.flatten(1)"),
    "torch.flatten": (lambda h: torch.flatten(h, 1), "torch.flatten({h}, 1)"),
    "contiguous": (lambda h: h.contiguous(), "{h}.contiguous()"),
    "view_size": (lambda h: h.view(h.size(0), -1), "{h}.view({h}.size(0), -1)"),
    "reshape_sizes": (
        lambda h: h.reshape(h.shape[0], h.shape[1]),
        "{h}.reshape({h}.shape[0], {h}.shape[1])",
    ),
}
#: Reshapes to ``(N, 1, width)`` and back (always used as a pair).
UNSQUEEZE = (lambda h: h.unsqueeze(1), "{h}.unsqueeze(1)")
SQUEEZES: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "squeeze": (lambda h: h.squeeze(1), "{h}.squeeze(1)"),
    "flatten": (lambda h: h.flatten(1), "{h}.flatten(1)"),
    "view_size": (lambda h: h.view(h.size(0), -1), "{h}.view({h}.size(0), -1)"),
}
#: Sums: name -> (function, template).
ADDS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], str]] = {
    "+": (lambda a, b: a + b, "{a} + {b}"),
    "torch.add": (lambda a, b: torch.add(a, b), "torch.add({a}, {b})"),
    "method": (lambda a, b: a.add(b), "{a}.add({b})"),
}
#: Where the flag of a ``cond`` op lives.
FLAG_SOURCES = (
    "attr",
    "dict",
    "cfg",
    "class",
    "global",
    "global_helper",
    "module_attr",
)
#: Source of the ``exec`` style's helpers (run in the forward's namespace).
EXEC_HELPERS = "def global_flag():\n    return USE_RELU\n"


class Config:
    """A small configuration object (``self.cfg``) that ``forward`` reads."""


class Interpreter(nn.Module):
    """A module whose ``forward`` runs the program stored on it.

    Subclassed once per model (:func:`_model_class`), so that class attributes are
    the model's own.

    Attributes:
        program: List of ops, each a tuple (see :func:`describe_program`).
        mods: The modules the program calls, by name.
        opts: A dict of flags (``cond`` ops with source ``dict``).
        cfg: A config object with flags (source ``cfg``).
    """

    def __init__(self, program: list[tuple], modules: dict[str, nn.Module], flags):
        super().__init__()
        self.program = program
        self.mods = nn.ModuleDict(modules)
        for key in flags["attr"]:
            setattr(self, key, True)
        self.opts = {key: True for key in flags["dict"]}
        self.cfg = flags["cfg_object"]
        for key in flags["cfg"]:
            setattr(self.cfg, key, True)

    def forward(self, x: Tensor) -> Tensor:
        values = [x]
        for op in self.program:
            values.append(self.step(op, values))
        return values[-1]

    def flag(self, source: str, key: str) -> bool:
        if source == "attr":
            return getattr(self, key)
        if source == "dict":
            return self.opts[key]
        if source == "cfg":
            return getattr(self.cfg, key)
        if source == "class":
            return getattr(type(self), key)
        if source == "global_helper":
            return global_flag()
        if source == "module_attr":
            return SETTINGS.use_relu
        return USE_RELU

    def step(self, op: tuple, values: list[Tensor]) -> Tensor:
        kind = op[0]
        if kind == "module":
            return self.mods[op[1]](values[op[2]])
        if kind == "fn":
            return FUNCTIONS[op[1]][0](values[op[2]], op[3])
        if kind == "reshape":
            return RESHAPES[op[1]][0](values[op[2]])
        if kind == "unsqueeze":
            return UNSQUEEZE[0](values[op[1]])
        if kind == "squeeze":
            return SQUEEZES[op[1]][0](values[op[2]])
        if kind == "add":
            return ADDS[op[1]][0](values[op[2]], values[op[3]])
        if kind == "iadd":
            h = values[op[1]]
            h += values[op[2]]
            return h
        if kind == "cond":
            _, source, key, i, then, otherwise = op
            name = then if self.flag(source, key) else otherwise
            return FUNCTIONS[name][0](values[i], False)
        raise ValueError(f"unknown op {op}")


def _source_line(op: tuple, index: int, class_name: str) -> list[str]:
    """Python source computing value ``index`` (``h{index}``) in the ``exec`` style."""
    kind, out = op[0], f"h{index}"

    def h(i: int) -> str:
        return f"h{i}"

    if kind == "module":
        return [f"{out} = self.{op[1]}({h(op[2])})"]
    if kind == "fn":
        return [f"{out} = " + FUNCTIONS[op[1]][1].format(h=h(op[2]), ip=op[3])]
    if kind == "reshape":
        return [f"{out} = " + RESHAPES[op[1]][1].format(h=h(op[2]))]
    if kind == "unsqueeze":
        return [f"{out} = " + UNSQUEEZE[1].format(h=h(op[1]))]
    if kind == "squeeze":
        return [f"{out} = " + SQUEEZES[op[1]][1].format(h=h(op[2]))]
    if kind == "add":
        return [f"{out} = " + ADDS[op[1]][1].format(a=h(op[2]), b=h(op[3]))]
    if kind == "iadd":
        return [f"{out} = {h(op[1])}", f"{out} += {h(op[2])}"]
    if kind == "cond":
        _, source, key, i, then, otherwise = op
        flag = {
            "attr": f"self.{key}",
            "dict": f'self.opts["{key}"]',
            "cfg": f"self.cfg.{key}",
            "class": f"{class_name}.{key}",
            "global": "USE_RELU",
            "global_helper": "global_flag()",
            "module_attr": "settings.use_relu",
        }[source]
        a = FUNCTIONS[then][1].format(h=h(i), ip=False)
        b = FUNCTIONS[otherwise][1].format(h=h(i), ip=False)
        return [f"{out} = {a} if {flag} else {b}"]
    raise ValueError(f"unknown op {op}")


def program_source(program: list[tuple], class_name: str) -> str:
    """The ``forward`` of the ``exec`` style."""
    lines = ["def forward(self, x):", "    h0 = x"]
    for k, op in enumerate(program):
        lines += ["    " + line for line in _source_line(op, k + 1, class_name)]
    lines.append(f"    return h{len(program)}")
    return "\n".join(lines) + "\n"


def describe_program(program: list[tuple]) -> str:
    """The program as lines of Python (the ``exec`` style's body)."""
    return program_source(program, "Model")


@dataclass
class Change:
    """A change made to the model after the operator is built.

    Attributes:
        description: What changes.
        apply: Makes the change on the model and returns a function that undoes it.
    """

    description: str
    apply: Callable[[nn.Module], Callable[[], None]]
    flag: bool = False  # a flag that ``forward`` branches on


@dataclass
class Case:
    """A random problem (see :func:`random_case`)."""

    seed: int
    style: str
    model: nn.Module
    loss_func: nn.Module
    params: list[Tensor]
    data: list[tuple[Tensor, Tensor]]
    kind: type
    change: Change | None
    description: str
    namespace: dict[str, Any] = field(default_factory=dict)

    def reference(self, data: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """The brute-force matrix of the model as it is now (on copies of the data)."""
        data = self.data if data is None else data
        copies = [(X.clone(), y.clone()) for X, y in data]
        return REFERENCES[self.kind](self.model, self.loss_func, self.params, copies)


# ---------------------------------------------------------------- programs


@dataclass
class _Value:
    width: int
    root: int  # index of the value whose storage this one shares (0: the input)
    ndim: int = 2


class _Builder:
    """Appends ops to a program and tracks widths, aliases and modules."""

    def __init__(self, rng: random.Random, width: int):
        self.rng = rng
        self.values = [_Value(width, 0)]
        self.program: list[tuple] = []
        self.modules: dict[str, nn.Module] = {}
        #: Module name -> the value it reads (to know whether ``inplace`` may flip).
        self.module_input: dict[str, int] = {}
        self.flags: dict[str, list[str]] = {s: [] for s in FLAG_SOURCES}

    def _push(self, op: tuple, width: int, root: int | None, ndim: int = 2) -> int:
        self.program.append(op)
        index = len(self.values)
        self.values.append(_Value(width, index if root is None else root, ndim))
        return index

    def may_write(self, i: int) -> bool:
        """Whether value ``i`` may be changed in place (not the input or a view of it)."""
        return self.values[i].root != 0

    def module(self, kind: str, module: nn.Module, i: int, width: int, alias: bool):
        name = f"{kind.lower()}{len(self.modules)}"
        self.modules[name] = module
        self.module_input[name] = i
        root = self.values[i].root if alias else None
        return self._push(("module", name, i), width, root)

    def linear(self, i: int, width: int | None = None) -> int:
        width = self.rng.randint(2, 5) if width is None else width
        layer = nn.Linear(self.values[i].width, width, bias=self.rng.random() < 0.8)
        return self.module("fc", layer, i, width, alias=False)

    def activation(self, i: int, inplace_p: float = 0.5) -> int:
        inplace = self.may_write(i) and self.rng.random() < inplace_p
        if self.rng.random() < 0.5:
            name = self.rng.choice(sorted(ACTIVATIONS))
            inplace = inplace and name in HAS_INPLACE
            return self.module(
                "act", ACTIVATIONS[name](inplace), i, self.values[i].width, inplace
            )
        name = self.rng.choice(sorted(FUNCTIONS))
        if name in ALWAYS_INPLACE and not self.may_write(i):
            name = "torch.tanh"
        if name in ALWAYS_INPLACE:
            inplace = True
        elif name not in INPLACE_ARGUMENT:
            inplace = False
        root = self.values[i].root if inplace else None
        return self._push(("fn", name, i, inplace), self.values[i].width, root)

    def out_of_place_activation(self, i: int) -> int:
        name = self.rng.choice(["torch.tanh", "torch.sigmoid", "torch.relu", "h.tanh"])
        return self._push(("fn", name, i, False), self.values[i].width, None)

    def pass_through(self, i: int) -> int:
        name = self.rng.choice(sorted(PASS_THROUGH))
        return self.module("pass", PASS_THROUGH[name](), i, self.values[i].width, True)

    def reshape(self, i: int) -> int:
        width, root = self.values[i].width, self.values[i].root
        if self.rng.random() < 0.25:
            j = self._push(("unsqueeze", i), width, root, ndim=3)
            return self._push(
                ("squeeze", self.rng.choice(sorted(SQUEEZES)), j), width, root
            )
        name = self.rng.choice(sorted(RESHAPES))
        return self._push(("reshape", name, i), width, root)

    def add(self, i: int, j: int) -> int:
        if self.rng.random() < 0.5:
            i, j = j, i
        form = self.rng.choice(sorted(ADDS))
        return self._push(("add", form, i, j), self.values[i].width, None)

    def iadd(self, i: int, j: int) -> int:
        return self._push(("iadd", i, j), self.values[i].width, self.values[i].root)

    def cond(self, i: int) -> int:
        source = self.rng.choice(FLAG_SOURCES)
        key = f"use_relu{sum(len(v) for v in self.flags.values())}"
        self.flags[source].append(key)
        then, otherwise = self.rng.sample(COND_FUNCTIONS, 2)
        return self._push(
            ("cond", source, key, i, then, otherwise), self.values[i].width, None
        )

    def unary(self, i: int) -> int:
        kind = self.rng.choice(["linear", "activation", "pass", "reshape"])
        if kind == "linear":
            return self.linear(i)
        if kind == "activation":
            return self.activation(i)
        if kind == "pass":
            return self.pass_through(i)
        return self.reshape(i)

    def matching(self, i: int, width: int) -> int:
        """Value ``i``, or a linear map of it, of ``width``."""
        if self.values[i].width == width and self.rng.random() < 0.6:
            return i
        return self.linear(i, width)

    def earlier(self, c: int) -> int:
        """A 2-D value before ``c``."""
        return self.rng.choice([k for k in range(c) if self.values[k].ndim == 2])


def _program(rng: random.Random, width: int, n_out: int) -> _Builder:
    """A random program from an input of ``width`` to an output of ``n_out``."""
    b = _Builder(rng, width)
    c = 0
    for _ in range(rng.randint(2, 5)):
        step = rng.choices(
            ["unary", "fork", "residual", "iadd", "iadd_fork", "cond"],
            weights=[4, 3, 2, 2, 2, 2],
        )[0]
        if step in ("iadd", "iadd_fork") and not b.may_write(c):
            step = "unary"
        if step == "unary":
            c = b.unary(c)
        elif step == "fork":
            # s = h; h = act_(pass(h)); h = h + s   (in place on a value read again)
            s = c
            for _ in range(rng.randint(1, 2)):
                c = rng.choice([b.pass_through, b.reshape])(c)
            c = b.activation(c, inplace_p=0.8)
            c = b.add(c, b.matching(s, b.values[c].width))
        elif step == "residual":
            s = b.earlier(c) if c > 0 else c
            c = b.add(c, b.matching(s, b.values[c].width))
        elif step == "iadd":
            # h += t, with t an activation of h or an earlier value
            if rng.random() < 0.5:
                t = b.out_of_place_activation(c)
            else:
                t = b.matching(b.earlier(c) if c > 0 else c, b.values[c].width)
            c = b.iadd(c, t)
        elif step == "iadd_fork":
            # g = h; h += tanh(h); h = fc(h) + fc'(g)
            g = c
            c = b.iadd(c, b.out_of_place_activation(c))
            width = rng.randint(2, 5)
            c = b.add(b.linear(c, width), b.linear(g, width))
        else:
            c = b.cond(c)
    if rng.random() < 0.3:  # two heads: fc(h) + fc'(g)
        g = b.earlier(c) if c > 0 else c
        c = b.add(b.linear(c, n_out), b.linear(g, n_out))
    else:
        c = b.linear(c, n_out)
    if rng.random() < 0.2:
        c = rng.choice([b.pass_through, b.reshape])(c)
    return b


def _model_class(base: type, name: str, class_flags: list[str], forward=None) -> type:
    namespace: dict[str, Any] = dict.fromkeys(class_flags, True)
    if forward is not None:
        namespace["forward"] = forward
    return type(name, (base,), namespace)


class _Holder(nn.Module):
    """Base of the ``exec`` style: modules as attributes, flags like :class:`Interpreter`."""

    def __init__(self, modules: dict[str, nn.Module], flags):
        super().__init__()
        for name, module in modules.items():
            setattr(self, name, module)
        for key in flags["attr"]:
            setattr(self, key, True)
        self.opts = {key: True for key in flags["dict"]}
        self.cfg = flags["cfg_object"]
        for key in flags["cfg"]:
            setattr(self.cfg, key, True)


def _program_model(
    rng: random.Random, style: str, seed: int, width: int, n_out: int
) -> tuple[nn.Module, _Builder, dict[str, Any], str]:
    b = _program(rng, width, n_out)
    flags: dict[str, Any] = dict(b.flags)
    flags["cfg_object"] = types.SimpleNamespace() if rng.random() < 0.5 else Config()
    class_name = f"Random{seed}"
    namespace: dict[str, Any] = {}
    if style == "interpreter":
        cls = _model_class(Interpreter, class_name, b.flags["class"])
        model = cls(b.program, b.modules, flags)
        text = "(interpreted; self.<name> is self.mods[<name>])\n" + describe_program(
            b.program
        )
    else:
        text = program_source(b.program, class_name)
        settings = types.ModuleType(f"settings{seed}")
        settings.use_relu = True
        namespace = {"torch": torch, "F": F, "USE_RELU": True, "settings": settings}
        exec(EXEC_HELPERS, namespace)  # noqa: S102
        exec(compile(text, f"<random model {seed}>", "exec"), namespace)  # noqa: S102
        cls = _model_class(_Holder, class_name, b.flags["class"], namespace["forward"])
        namespace[class_name] = cls
        model = cls(b.modules, flags)
    modules = "".join(f"\n    self.{k} = {m!r}" for k, m in b.modules.items())
    return model, b, namespace, text + "modules:" + modules


# --------------------------------------------------------------- sequential


def _sequential(rng: random.Random, width: int, n_out: int) -> tuple[nn.Module, str]:
    layers: list[nn.Module] = []
    writable = False  # the current value is not the input or a view of it
    for _ in range(rng.randint(2, 6)):
        kind = rng.choice(["linear", "activation", "activation", "pass"])
        if kind == "linear":
            new = rng.randint(2, 5)
            layers.append(nn.Linear(width, new, bias=rng.random() < 0.8))
            width, writable = new, True
        elif kind == "activation":
            name = rng.choice(sorted(ACTIVATIONS))
            inplace = writable and name in HAS_INPLACE and rng.random() < 0.6
            layers.append(ACTIVATIONS[name](inplace))
            writable = True  # a new tensor, or (in place) one that already was
        else:
            layers.append(PASS_THROUGH[rng.choice(sorted(PASS_THROUGH))]())
    layers.append(nn.Linear(width, n_out))
    return _nest(rng, layers), ""


def _nest(rng: random.Random, layers: list[nn.Module]) -> nn.Sequential:
    """``layers`` in a ``Sequential``, some consecutive ones grouped in nested ones."""
    if len(layers) < 3 or rng.random() < 0.4:
        return nn.Sequential(*layers)
    start = rng.randrange(len(layers) - 1)
    stop = rng.randint(start + 2, len(layers))
    inner = _nest(rng, layers[start:stop])
    return nn.Sequential(*layers[:start], inner, *layers[stop:])


def _conv_front(rng: random.Random) -> tuple[list[nn.Module], tuple[int, ...], int]:
    """``Conv1d -> activation -> Flatten``: the layers, datum shape, output width."""
    c_in, length = rng.randint(1, 2), rng.randint(3, 5)
    c_out, kernel, padding = rng.randint(1, 2), rng.randint(1, 2), rng.randint(0, 1)
    conv = nn.Conv1d(c_in, c_out, kernel, padding=padding)
    name = rng.choice(sorted(ACTIVATIONS))
    act = ACTIVATIONS[name](name in HAS_INPLACE and rng.random() < 0.5)
    width = c_out * (length + 2 * padding - kernel + 1)
    return [conv, act, nn.Flatten()], (c_in, length), width


def _describe_sequential(model: nn.Module) -> str:
    return repr(model)


# ------------------------------------------------------------------- changes


def _set(obj: Any, name: str, value: Any) -> Callable[[], None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    return lambda: setattr(obj, name, old)


#: Hyperparameters of activation modules that a change sets (name, new value).
HYPERPARAMETERS: dict[type, tuple[str, Any]] = {
    nn.LeakyReLU: ("negative_slope", 0.5),
    nn.ELU: ("alpha", 0.3),
    nn.Hardtanh: ("max_val", 0.5),
    nn.GELU: ("approximate", "tanh"),
}


def _module_changes(model: nn.Module) -> list[Change]:
    """Changes of any model: an activation's hyperparameter, two linear layers of
    the same shape swapped, parameters changed in place."""
    changes = []
    named = [(n, m) for n, m in model.named_modules() if n]
    for name, module in named:
        if type(module) in HYPERPARAMETERS:
            attr, value = HYPERPARAMETERS[type(module)]
            changes.append(
                Change(
                    f"{name}.{attr} = {value!r}",
                    lambda m, module=module, attr=attr, value=value: _set(
                        module, attr, value
                    ),
                )
            )
    linears = [(n, m) for n, m in named if isinstance(m, nn.Linear)]
    for i, (name_a, a) in enumerate(linears):
        for name_b, b in linears[i + 1 :]:
            if a.weight.shape == b.weight.shape and (a.bias is None) == (
                b.bias is None
            ):
                changes.append(
                    Change(f"{name_a} and {name_b} swapped", _swap(name_a, name_b))
                )

    def update(m):
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.5)

        def undo():
            with torch.no_grad():
                for p in m.parameters():
                    p.div_(1.5)

        return undo

    changes.append(Change("every parameter scaled by 1.5 in place", update))
    return changes


def _swap(name_a: str, name_b: str) -> Callable[[nn.Module], Callable[[], None]]:
    def apply(model: nn.Module) -> Callable[[], None]:
        slots = []
        for name in (name_a, name_b):
            parent, _, attr = name.rpartition(".")
            slots.append((model.get_submodule(parent), attr))
        (pa, a), (pb, b) = slots
        ma, mb = getattr(pa, a), getattr(pb, b)
        setattr(pa, a, mb)
        setattr(pb, b, ma)

        def undo():
            setattr(pa, a, ma)
            setattr(pb, b, mb)

        return undo

    return apply


def _sequential_changes(rng: random.Random, model: nn.Sequential) -> list[Change]:
    changes = _module_changes(model)
    containers = [m for m in model.modules() if isinstance(m, nn.Sequential)]
    for parent in containers:
        for index, child in enumerate(parent):
            name = type(child).__name__
            if isinstance(getattr(child, "inplace", None), bool) and child.inplace:
                changes.append(
                    Change(
                        f"{name} at [{index}] of a Sequential: inplace -> False",
                        lambda m, c=child: _set(c, "inplace", False),
                    )
                )
            if not any(True for _ in child.parameters()) and not isinstance(
                child, (nn.Sequential, nn.Flatten)
            ):
                new = rng.choice(["Tanh", "Sigmoid", "GELU"])

                def replace(m, parent=parent, index=index, child=child, new=new):
                    parent[index] = ACTIVATIONS[new](False)
                    return lambda: parent.__setitem__(index, child)

                changes.append(
                    Change(
                        f"{name} at [{index}] of a Sequential replaced by {new}",
                        replace,
                    )
                )
    return changes


def _program_changes(
    b: _Builder, style: str, model: nn.Module, namespace: dict[str, Any], rng
) -> list[Change]:
    changes: list[Change] = _module_changes(model)
    holder = model.mods if style == "interpreter" else model
    for name, module in b.modules.items():
        if isinstance(getattr(module, "inplace", None), bool):
            value = not module.inplace
            if value and not b.may_write(b.module_input[name]):
                continue  # would change the input in place
            changes.append(
                Change(
                    f"self.{name}.inplace -> {value}",
                    lambda m, module=module, value=value: _set(
                        module, "inplace", value
                    ),
                )
            )
        if not any(True for _ in module.parameters()):
            new = rng.choice(["Tanh", "Sigmoid", "GELU"])

            def replace(m, name=name, new=new):
                old = getattr(holder, name)
                setattr(holder, name, ACTIVATIONS[new](False))
                return lambda: setattr(holder, name, old)

            changes.append(Change(f"self.{name} replaced by nn.{new}()", replace))
    for k, op in enumerate(b.program):
        if op[0] == "fn" and style == "interpreter":
            other = "torch.sigmoid" if op[1] != "torch.sigmoid" else "torch.tanh"
            new_op = ("fn", other, op[2], False)
            if op[1] in INPLACE_ARGUMENT and (op[3] or b.may_write(op[2])):
                new_op = ("fn", op[1], op[2], not op[3])  # flip ``inplace``

            def entry(m, k=k, new_op=new_op):
                old = m.program[k]
                m.program[k] = new_op
                return lambda: m.program.__setitem__(k, old)

            changes.append(Change(f"self.program[{k}] = {new_op} (in place)", entry))
        if op[0] == "fn" and style == "exec":
            other = "torch.sigmoid" if op[1] != "torch.sigmoid" else "torch.tanh"
            program = list(b.program)
            program[k] = ("fn", other, op[2], False)
            if op[1] in INPLACE_ARGUMENT and (op[3] or b.may_write(op[2])):
                program[k] = ("fn", op[1], op[2], not op[3])  # flip ``inplace``
            changes.append(_new_forward(program, k, model, namespace))
        if op[0] != "cond":
            continue
        _, source, key = op[:3]
        change = _flag_change(source, key, style, model, namespace)
        change.flag = True
        changes.append(change)
    return changes


def _new_forward(program, k, model, namespace) -> Change:
    cls = type(model)
    text = program_source(program, cls.__name__)

    def apply(m):
        scope = dict(namespace)
        exec(compile(text, "<changed random model>", "exec"), scope)  # noqa: S102
        return _set(cls, "forward", scope["forward"])

    return Change(f"class forward replaced: op {k} becomes {program[k]}", apply)


def _flag_change(source, key, style, model, namespace) -> Change:
    if source == "attr":
        return Change(f"self.{key} = False", lambda m: _set(m, key, False))
    if source == "dict":

        def entry(m):
            m.opts[key] = False
            return lambda: m.opts.__setitem__(key, True)

        return Change(f'self.opts["{key}"] = False', entry)
    if source == "cfg":
        return Change(f"self.cfg.{key} = False", lambda m: _set(m.cfg, key, False))
    if source == "class":
        return Change(
            f"{type(model).__name__}.{key} = False (class attribute)",
            lambda m: _set(type(m), key, False),
        )
    if source == "module_attr":
        settings = SETTINGS if style == "interpreter" else namespace["settings"]
        return Change(
            f"{settings.__name__}.use_relu = False (attribute of a module object)",
            lambda m: _set(settings, "use_relu", False),
        )
    how = "read by a helper function" if source == "global_helper" else "read directly"
    if style == "interpreter":
        this = sys.modules[__name__]
        return Change(
            f"global {__name__}.USE_RELU = False ({how})",
            lambda m: _set(this, "USE_RELU", False),
        )

    def change_global(m):
        namespace["USE_RELU"] = False
        return lambda: namespace.__setitem__("USE_RELU", True)

    return Change(f"global USE_RELU = False (forward's globals, {how})", change_global)


# ---------------------------------------------------------------------- cases


def _valid(model, params, X: Tensor, change: Change | None) -> bool:
    """Whether brute force differentiates the model (before and after the change)
    without PyTorch errors, and without changing the input."""
    before = X.clone()
    loss = nn.MSELoss(reduction="sum")
    with torch.no_grad():
        y = torch.zeros_like(model(X.clone()))
    try:
        dense_ggn(model, loss, params, [(X, y)])
        if change is not None:
            undo = change.apply(model)
            try:
                dense_ggn(model, loss, params, [(X, y)])
                with torch.no_grad():
                    model(X)
            finally:
                undo()
        with torch.no_grad():
            model(X)
    except RuntimeError:
        return False
    return torch.equal(X, before)


def random_case(seed: int) -> Case:
    """The random problem of ``seed`` (see the module docstring)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(100):
        style = rng.choices(["sequential", "interpreter", "exec"], weights=[1, 2, 2])[0]
        n_out = rng.randint(2, 4)
        width = rng.randint(2, 5)
        datum: tuple[int, ...] = (width,)
        namespace: dict[str, Any] = {}
        if style == "sequential":
            front: list[nn.Module] = []
            if rng.random() < 0.25:
                front, datum, width = _conv_front(rng)
            model, _ = _sequential(rng, width, n_out)
            if front:
                model = nn.Sequential(*front, model)
            text = _describe_sequential(model)
            changes = _sequential_changes(rng, model)
        else:
            model, b, namespace, text = _program_model(rng, style, seed, width, n_out)
            changes = _program_changes(b, style, model, namespace, rng)
        model = model.double()
        if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
            model.eval()
        params = list(model.parameters())
        for p in params:
            if rng.random() < 0.2:
                p.requires_grad_(False)
        params = [p for p in params if p.requires_grad]
        if not params:
            continue
        flag_changes = [c for c in changes if c.flag]
        change = None
        if flag_changes and rng.random() < 0.6:
            change = rng.choice(flag_changes)
        elif changes and rng.random() < 0.6:
            change = rng.choice(changes)
        sizes = rng.sample([2, 3, 4], 2)
        data = []
        loss = rng.choice(["mse", "ce"])
        for n in sizes:
            X = torch.randn((n, *datum), generator=generator, dtype=torch.float64)
            if loss == "ce":
                y = torch.randint(0, n_out, (n,), generator=generator)
            else:
                y = torch.randn(n, n_out, generator=generator, dtype=torch.float64)
            data.append((X, y))
        if not _valid(model, params, data[0][0], change):
            continue
        reduction = rng.choice(["mean", "sum"])
        loss_func = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss}[loss](
            reduction=reduction
        )
        kind = rng.choices(list(REFERENCES), weights=[3, 1, 1])[0]
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        description = "\n".join(
            [
                f"seed {seed}: {style} model, {kind.__name__}, {loss_func}, "
                f"batches {sizes}, frozen {frozen or 'none'}",
                text,
                f"change after construction: {change.description if change else 'none'}",
            ]
        )
        return Case(
            seed,
            style,
            model,
            loss_func,
            params,
            data,
            kind,
            change,
            description,
            namespace,
        )
    raise RuntimeError(f"no valid random model for seed {seed}")
