r"""Numerical checks of fast paths against the generic :mod:`torch.func` path.

A fast path (the closed-form chain of :mod:`curvlinops_fisher.closed_form`, the
dual-number product of one column, rows in Kronecker form or per data point)
decides from the model's code or structure that a shortcut computes the same
numbers as automatic differentiation. That decision is trusted only after it was
checked on the real model and data: with a random tangent :math:`\mathbf{v}` and a
random cotangent :math:`\mathbf{u}` (a seeded generator, so reruns see the same
check), the shortcut's output, :math:`\mathbf{J}\mathbf{v}` and
:math:`\mathbf{J}^\top\mathbf{u}` must equal those of ``torch.func`` to a
dtype-aware, norm-wise relative tolerance (:data:`CHECK_RTOL`). A fast path keeps
the result of its check per input signature (shape, dtype and device of the batch
input, dtypes of the parameters) while the guards of the path hold; a guard that
fails sends products back to the generic path.

A check costs one generic linearization and one shortcut linearization of a single
column plus two VJPs, once per input signature: about three gradient passes,
against the hundreds of products an eigensolver or a CG solve makes.

A failed check is never an error: products take the generic path and
:func:`warn_once` says which model part disagreed, once per operator.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlinops_fisher.linearization import Linearization

#: A linearization of the batch at the check's parameters, for columns ``V``.
Linearizer = Callable[[tuple[Tensor, ...]], Linearization]

#: Seed of the random tangents and cotangents of the checks.
CHECK_SEED = 0
#: Norm-wise relative tolerance of a check, by bytes per number. Rounding differs
#: between a shortcut and AD by a few units of the last place times the depth of
#: the computation; a shortcut that computes another function differs by far more.
CHECK_RTOL = {8: 1e-8, 4: 1e-4}
#: Tolerance of smaller floating-point types (half precision).
CHECK_RTOL_LOW_PRECISION = 5e-2


class FastPathFailure(UserWarning):
    """A fast path disagreed with ``torch.func``; the generic path is used instead."""


def check_tolerance(dtype: torch.dtype) -> float:
    """The norm-wise relative tolerance of a check in ``dtype``."""
    return CHECK_RTOL.get(dtype.itemsize, CHECK_RTOL_LOW_PRECISION)


def relative_error(got: Tensor, expected: Tensor) -> float:
    r""":math:`\|g - e\| / \|e\|` (0 if both are zero, ``inf`` if only ``e`` is)."""
    if got.shape != expected.shape:
        return float("inf")
    difference = torch.linalg.vector_norm((got - expected).double())
    scale = torch.linalg.vector_norm(expected.double())
    if scale == 0:
        return 0.0 if difference == 0 else float("inf")
    return float(difference / scale)


def signature(X: Any, params: Sequence[Tensor]) -> tuple:
    """What a check's result is kept for: the input's shape, dtype and device."""
    if isinstance(X, Tensor):
        batch = (tuple(X.shape), X.dtype, X.device)
    else:
        batch = (type(X),)
    return (batch, tuple(p.dtype for p in params))


def compare_linearizations(
    fast: Linearizer, generic: Linearizer, params: Sequence[Tensor]
) -> str | None:
    r"""Compare a shortcut's linearization with the generic one.

    Both run on one random column :math:`\mathbf{v}` (like ``params``); their
    outputs, JVPs :math:`\mathbf{J}\mathbf{v}` and VJPs :math:`\mathbf{J}^\top
    \mathbf{u}` of one random cotangent :math:`\mathbf{u}` are compared.

    Args:
        fast: The shortcut's linearization.
        generic: The generic (``torch.func``) linearization.
        params: The parameter values (shapes, dtype and device of the columns).

    Returns:
        ``None`` if they agree, else a description of what differs.
    """
    reference = params[0]
    generator = torch.Generator(device=reference.device).manual_seed(CHECK_SEED)

    def draw(shape: Sequence[int]) -> Tensor:
        return torch.randn(
            (1, *shape),
            generator=generator,
            dtype=reference.dtype,
            device=reference.device,
        )

    V = tuple(draw(p.shape) for p in params)
    with torch.no_grad():
        output, JV, backward = generic(V)
        fast_output, fast_JV, fast_backward = fast(V)
        U = draw(output.shape)
        VJP = tuple(torch.zeros_like(v) for v in V)
        fast_VJP = tuple(torch.zeros_like(v) for v in V)
        backward(U, VJP)
        fast_backward(U, fast_VJP)
    tolerance = check_tolerance(output.dtype)
    for name, got, expected in (
        ("output", fast_output, output),
        ("Jacobian-vector product", fast_JV, JV),
        ("vector-Jacobian product", _joined(fast_VJP), _joined(VJP)),
    ):
        error = relative_error(got, expected)
        if not error <= tolerance:
            return f"its {name} differs by {error:.2e} (relative; tolerance {tolerance:.0e})"
    return None


def _joined(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.flatten() for t in tensors])


def warn_once(owner: object, path: str, message: str) -> None:
    """Warn with :class:`FastPathFailure`, once per ``owner`` and ``path``.

    Args:
        owner: What the warning is once for (an operator's model function).
        path: The fast path (e.g. ``"closed-form chain"``).
        message: What disagreed and what is used instead.
    """
    warned = getattr(owner, "_fast_path_warnings", None)
    if warned is None:
        warned = set()
        try:
            owner._fast_path_warnings = warned  # type: ignore[attr-defined]
        except AttributeError:  # nowhere to remember: warn every time
            pass
    if path in warned:
        return
    warned.add(path)
    warnings.warn(message, FastPathFailure, stacklevel=3)
