"""The benchmarked libraries and operators.

``ours`` is curvlinops_fisher; ``curvlinops`` is the optional peer library with the
same class names and constructor signatures. An operator label (``GGN``, ``MC1``,
``MC16``, ``EF``) names a class and its extra constructor arguments.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import Any

from benchmarks.workloads import Problem

OURS = "curvlinops_fisher"
THEIRS = "curvlinops"

#: Distribution names on the package index, for version look-ups.
DISTRIBUTIONS = {OURS: "curvlinops-fisher", THEIRS: "curvlinops-for-pytorch"}

#: label -> (class name, extra constructor keyword arguments)
OPERATORS: dict[str, tuple[str, dict[str, Any]]] = {
    "GGN": ("GGNLinearOperator", {}),
    "MC1": ("FisherMCLinearOperator", {"mc_samples": 1, "seed": 2147483647}),
    "MC16": ("FisherMCLinearOperator", {"mc_samples": 16, "seed": 2147483647}),
    "EF": ("EFLinearOperator", {}),
}

#: Operators whose products are compared between the libraries: GGN and EF are
#: deterministic; the MC Fisher is too for a fixed seed, and curvlinops_fisher draws
#: the same samples as curvlinops 3.0.1 for the same seed.
AGREEMENT_OPERATORS = ("GGN", "MC1", "MC16", "EF")


def load_library(name: str) -> ModuleType | None:
    """Import a benchmarked library.

    Args:
        name: ``OURS`` or ``THEIRS``.

    Returns:
        The module, or ``None`` if it cannot be imported.
    """
    try:
        return importlib.import_module(name)
    except Exception:  # any import failure means "not available"
        return None


def library_version(name: str) -> str | None:
    """Installed version of a benchmarked library, ``None`` if not installed.

    Args:
        name: ``OURS`` or ``THEIRS``.

    Returns:
        The version string.
    """
    try:
        return version(DISTRIBUTIONS[name])
    except PackageNotFoundError:
        module = load_library(name)
        return getattr(module, "__version__", None) if module else None


def build_operator(
    library: ModuleType,
    label: str,
    problem: Problem,
    check_deterministic: bool = True,
) -> Any:
    """Construct one operator of a library on a problem.

    Args:
        library: The imported library module.
        label: Operator label, a key of ``OPERATORS``.
        problem: The workload.
        check_deterministic: Passed to the constructor.

    Returns:
        The linear operator.
    """
    class_name, kwargs = OPERATORS[label]
    cls = getattr(library, class_name)
    return cls(
        problem.model,
        problem.loss_func,
        problem.params,
        problem.data,
        progressbar=False,
        check_deterministic=check_deterministic,
        **kwargs,
    )
