"""Snapshots of the Python state a traced ``forward`` can read.

A fast path that was derived from a model's code (a :mod:`torch.fx` trace) stays
valid only while everything the code read when it was traced is unchanged. That is
more than the modules' own attributes: a ``forward`` may branch on a dict of options
(``self.opts["act"]``), on a configuration object (``self.cfg.use_relu``, the usual
form in Hugging Face-style models), on a class attribute, or on a module-level
variable. :func:`snapshot` turns such a value into a plain, comparable structure
(deeply: containers and the ``__dict__`` / ``__slots__`` of plain objects), and
:func:`code_state` collects the globals and closure variables that the functions of
a class refer to. Two snapshots compare equal only if the values are equal in every
part that a ``forward`` could read; anything the snapshot cannot describe (an
object with a custom ``__getattr__``, a NumPy array that is too large, a nesting
that is too deep) raises :class:`Uncoverable`, and the caller must then not take
the fast path at all.

Functions, classes, Python modules and ``nn.Module`` instances are compared by
identity (code is guarded by identity, a module by the checks of its own), tensors
by identity and their version counter (an in-place change bumps it).
"""

from __future__ import annotations

import dis
import enum
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

#: Deepest nesting that :func:`snapshot` follows.
MAX_DEPTH = 8
#: Most entries (container items, object attributes) that one snapshot holds.
MAX_ENTRIES = 20_000
#: Largest NumPy array (bytes) that a snapshot copies.
MAX_ARRAY_BYTES = 2**16

_PLAIN = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis))
_VALUES = (torch.dtype, torch.device, torch.Size, torch.layout, torch.memory_format)
_BY_IDENTITY = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.BuiltinMethodType,
    types.ModuleType,
    types.CodeType,
    type,
    Module,
    staticmethod,
    classmethod,
    property,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
    types.ClassMethodDescriptorType,
)


class Uncoverable(Exception):
    """A value whose state a snapshot cannot describe."""


class _Budget:
    """Counts the entries of one snapshot (see :data:`MAX_ENTRIES`)."""

    def __init__(self) -> None:
        self.left = MAX_ENTRIES

    def spend(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise Uncoverable("too many entries to snapshot")


def snapshot(value: Any) -> Any:
    """A comparable description of ``value`` and of everything reachable from it.

    Args:
        value: Any Python value.

    Returns:
        A structure of tuples and plain values; equal for two states of ``value``
        exactly when no part that code could read differs (see the module).

    Raises:
        Uncoverable: If part of ``value`` cannot be described.
    """
    return _snapshot(value, 0, {}, _Budget())


class _Same:
    """Equal to a ``_Same`` of the very same object.

    It keeps the object alive, so that its ``id`` cannot go to a new object.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)

    def __repr__(self) -> str:
        return f"<{type(self.value).__name__} at {id(self.value):#x}>"


def _kind(cls: type) -> str:
    """How values of type ``cls`` are described (decided once per type)."""
    if cls in _PLAIN or issubclass(cls, _VALUES):
        return "plain"
    if issubclass(cls, enum.Enum):
        return "enum"
    if issubclass(cls, _BY_IDENTITY) or cls.__module__ == "functools":
        return "identity"  # code (``functools.partial`` included), classes, modules
    if issubclass(cls, Tensor):
        return "tensor"
    if issubclass(cls, (tuple, list)):
        return "sequence"
    if issubclass(cls, dict):
        return "mapping"
    if issubclass(cls, (set, frozenset)):
        return "set"
    if cls.__module__ == "numpy" and hasattr(cls, "tobytes"):
        return "ndarray"
    return "object"


_KINDS: dict[type, str] = {}


def _snapshot(value: Any, depth: int, seen: dict[int, int], budget: _Budget) -> Any:
    budget.spend()
    cls = type(value)
    kind = _KINDS.get(cls)
    if kind is None:
        kind = _KINDS[cls] = _kind(cls)
    if kind == "plain":
        return (cls, value)
    if kind == "identity":
        return _Same(value)
    if kind == "enum":
        return ("enum", cls, value.name)
    if kind == "tensor":
        return (_Same(value), value._version)
    if depth >= MAX_DEPTH:
        raise Uncoverable(f"a {cls.__name__} nested too deeply")
    if id(value) in seen:  # a cycle: the first visit describes it
        return ("seen", seen[id(value)])
    seen[id(value)] = len(seen)
    deeper = depth + 1
    if kind == "sequence":
        return (cls, tuple(_snapshot(v, deeper, seen, budget) for v in value))
    if kind == "mapping":
        return (
            cls,
            tuple(
                (_snapshot(k, deeper, seen, budget), _snapshot(v, deeper, seen, budget))
                for k, v in value.items()
            ),
        )
    if kind == "set":
        items = sorted(repr(_snapshot(v, deeper, seen, budget)) for v in value)
        return (cls, tuple(items))
    if kind == "ndarray":
        return _numpy_array(value)
    return _object_snapshot(value, deeper, seen, budget)


def _numpy_array(value: Any) -> Any:
    """A copy of a small NumPy array's (or scalar's) bytes."""
    if value.nbytes > MAX_ARRAY_BYTES:
        raise Uncoverable("a large NumPy array")
    return ("ndarray", str(value.dtype), value.shape, value.tobytes())


def _object_snapshot(
    value: Any, depth: int, seen: dict[int, int], budget: _Budget
) -> Any:
    """An object's class and the snapshots of its ``__dict__`` and ``__slots__``."""
    cls = type(value)
    if _has_custom_lookup(cls):
        raise Uncoverable(f"a {cls.__name__} computes its attributes")
    state: list[tuple[str, Any]] = []
    attributes = getattr(value, "__dict__", None)
    if attributes is not None:
        if not isinstance(attributes, dict):  # e.g. a mappingproxy of a class
            raise Uncoverable(f"a {cls.__name__} without a plain __dict__")
        state += [(k, _snapshot(v, depth, seen, budget)) for k, v in attributes.items()]
    for name in _slot_names(cls):
        if hasattr(value, name):
            state.append((name, _snapshot(getattr(value, name), depth, seen, budget)))
    if attributes is None and not state and not _immutable_builtin(value):
        raise Uncoverable(f"a {cls.__name__} whose state is not in attributes")
    return ("object", _Same(value), tuple(state))


def _immutable_builtin(value: Any) -> bool:
    """Instances of ``object`` itself (sentinels) carry no state."""
    return type(value) is object


def _has_custom_lookup(cls: type) -> bool:
    """Whether attribute reads of ``cls`` instances run Python code of the class."""
    return any(
        isinstance(vars(c).get(name), types.FunctionType)
        for c in cls.__mro__
        for name in ("__getattr__", "__getattribute__")
    )


def _slot_names(cls: type) -> Iterator[str]:
    for c in cls.__mro__:
        slots = vars(c).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__"):
                yield name


# ------------------------------------------------------------- code and classes

#: Entries of a class's ``__dict__`` that are not state code can read.
_CLASS_INTERNAL = frozenset(
    {
        "__dict__",
        "__weakref__",
        "__module__",
        "__doc__",
        "__qualname__",
        "__annotations__",
        "__firstlineno__",
        "__static_attributes__",
        "__orig_bases__",
        "__parameters__",
        "_abc_impl",
    }
)


def classes_below(classes: list[type], stop: type) -> list[type]:
    """``classes`` and their bases, without ``stop`` and its bases (each once).

    PyTorch's own classes (containers such as ``nn.Sequential``) are left out: their
    ``forward`` is guarded by identity elsewhere, their other attributes are code.

    Args:
        classes: Classes (of modules).
        stop: The base where the search ends (``nn.Module``).

    Returns:
        The classes of the MROs below ``stop``, in MRO order, first occurrences.
    """
    found: dict[type, None] = {}
    for cls in classes:
        for c in cls.__mro__:
            if not issubclass(stop, c) and not _is_library(c):
                found.setdefault(c, None)
    return list(found)


def class_state(classes: list[type]) -> Any:
    """A snapshot of the attributes of ``classes`` (see :func:`classes_below`).

    Raises:
        Uncoverable: If an attribute cannot be described.
    """
    return snapshot(
        [
            {k: v for k, v in vars(c).items() if k not in _CLASS_INTERNAL}
            for c in classes
        ]
    )


def class_functions(classes: list[type]) -> list[types.FunctionType]:
    """The functions that ``classes`` define (see :func:`classes_below`).

    Methods, static and class methods, and the accessors of properties.
    """
    found: list[Any] = []
    for c in classes:
        for v in vars(c).values():
            if isinstance(v, (staticmethod, classmethod)):
                v = v.__func__
            if isinstance(v, property):
                found += [v.fget, v.fset, v.fdel]
            else:
                found.append(v)
    return [f for f in found if isinstance(f, types.FunctionType)]


def code_references(
    functions: list[types.FunctionType],
) -> list[tuple[str, Callable[[], Any]]]:
    """The globals and closure variables that ``functions`` read, as getters.

    Follows the plain functions they reach through globals and closures (helper
    functions of the user's module), not those of ``torch``. The names are found
    once, from the bytecode; :func:`references_state` reads their current values.

    Args:
        functions: The functions (e.g. :func:`class_functions` of a module class).

    Returns:
        ``(description, getter)`` pairs, in a fixed order.
    """
    found: list[tuple[str, Callable[[], Any]]] = []
    queue = list(functions)
    visited: set[int] = set()
    while queue:
        function = queue.pop()
        if id(function) in visited or _is_library(function):
            continue
        visited.add(id(function))
        for name, getter in _referred(function):
            found.append((f"{function.__qualname__}: {name}", getter))
            value = _read(getter)
            if isinstance(value, types.FunctionType):
                queue.append(value)
    return found


def references_state(references: list[tuple[str, Callable[[], Any]]]) -> tuple:
    """Snapshots of the current values of :func:`code_references`' getters.

    Raises:
        Uncoverable: If a value cannot be described.
    """
    return tuple((name, snapshot(_read(getter))) for name, getter in references)


_MISSING = object()


def _read(getter: Callable[[], Any]) -> Any:
    try:
        return getter()
    except (KeyError, ValueError):  # a deleted global, an empty cell
        return _MISSING


def _is_library(code: types.FunctionType | type) -> bool:
    """Whether a function or class is PyTorch's own."""
    module = getattr(code, "__module__", None) or ""
    return module == "torch" or module.startswith("torch.")


def _referred(
    function: types.FunctionType,
) -> Iterator[tuple[str, Callable[[], Any]]]:
    """``(name, getter)`` of each global and closure variable ``function`` reads.

    A global that names a Python module or a class (compared by identity) also
    yields the attributes the code reads from it (``settings.use_relu``,
    ``Config.flag``: ``LOAD_ATTR`` right after the ``LOAD_GLOBAL``).
    """
    paths: set[tuple[str, ...]] = set()
    for code in _codes(function.__code__):
        paths.update(_global_paths(code))
    module_globals = function.__globals__
    for path in sorted(paths):
        if path[0] not in module_globals:
            continue
        if len(path) > 1 and not isinstance(
            module_globals[path[0]], (types.ModuleType, type)
        ):
            continue  # an object: its snapshot covers its attributes
        yield ".".join(path), lambda path=path: _follow(module_globals, path)
    cells = function.__closure__ or ()
    for name, cell in zip(function.__code__.co_freevars, cells):
        yield name, lambda cell=cell: cell.cell_contents


def _follow(module_globals: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value of the attribute path ``path`` in ``module_globals``."""
    value = module_globals[path[0]]
    for attribute in path[1:]:
        try:
            value = getattr(value, attribute)
        except AttributeError:
            return _MISSING
    return value


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and the code objects nested in it (lambdas, comprehensions)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


#: Most attributes read in a row from a global that :func:`_global_paths` follows.
_MAX_ATTRIBUTE_PATH = 3


def _global_paths(code: types.CodeType) -> Iterator[tuple[str, ...]]:
    """The globals ``code`` loads, each with the attributes read right after it.

    Yields every prefix of a path too (``("settings",)`` for ``settings.flag``).
    """
    path: list[str] = []
    for instruction in dis.get_instructions(code):
        name = instruction.opname
        if path and name in ("LOAD_ATTR", "LOAD_METHOD"):
            if len(path) <= _MAX_ATTRIBUTE_PATH:
                path.append(str(instruction.argval))
            continue
        for end in range(1, len(path) + 1):
            yield tuple(path[:end])
        path = [str(instruction.argval)] if name in ("LOAD_GLOBAL", "LOAD_NAME") else []
    for end in range(1, len(path) + 1):
        yield tuple(path[:end])


def guard_of(take: Callable[[], Any]) -> Callable[[], bool]:
    """A guard that is true while ``take()`` returns what it returned first.

    ``take`` raising :class:`Uncoverable` later (the state grew into something it
    cannot describe) makes the guard false.
    """
    first = take()

    def unchanged() -> bool:
        try:
            return take() == first
        except Uncoverable:
            return False

    return unchanged
