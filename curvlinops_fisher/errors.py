"""Exceptions raised by ``curvlinops_fisher``.

Every error names the problem and the fix. Each class also derives from the built-in
exception that peers (curvlinops, PyTorch) raise in the same situation, so code that
catches ``ValueError`` or ``NotImplementedError`` keeps working after switching.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


class UnsupportedLossError(NotImplementedError, ValueError):
    """The loss function, its reduction or one of its options is not supported."""


class VectorFormatError(ValueError, TypeError):
    """A vector or matrix passed to an operator has the wrong shape, dtype or device.

    Also raised for an object that is not a tensor (or tensor list) at all.
    """


class TargetError(ValueError):
    """Targets ``y`` have the wrong shape, dtype or values for the loss."""


class ParameterError(ValueError):
    """``params`` are unusable: frozen, not part of the model, unused, or mixed."""


class DataError(ValueError):
    """The data cannot be iterated as needed (empty, mapping without batch size)."""


class NonDeterministicError(RuntimeError):
    """Data or model do not produce the same batches or outputs on every pass."""


class FactorMemoryError(MemoryError, ValueError):
    """The factor ``U`` needs more memory than the budget that was given.

    Attributes:
        needed_bytes: Bytes the factor needs.
        max_bytes: The budget.
    """

    def __init__(self, num_rows: int, dim: int, itemsize: int, max_bytes: int):
        """Describe the factor's size (rows, columns, bytes per entry) and the budget."""
        self.needed_bytes = num_rows * dim * itemsize
        self.max_bytes = max_bytes
        super().__init__(
            f"The factor U has {num_rows} rows x {dim} columns and needs "
            f"{self.needed_bytes} bytes ({self.needed_bytes / 2**20:.1f} MiB), more "
            f"than max_bytes={max_bytes}. Raise max_bytes, or use the streaming "
            "operator (its products, to_dense, trace, diagonal and eigh recompute U)."
        )


class NonFiniteError(FloatingPointError, ValueError):
    """A model output or a batch's contribution to a product holds NaN or Inf.

    Raised by the operators with the (0-based) index of the batch in data order.
    """


def check_finite(tensors: Iterable[torch.Tensor] | torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` if any entry of ``tensors`` is NaN or Inf.

    Args:
        tensors: A tensor or tensors (one device synchronisation in all).
        what: What they are, for the message (e.g. ``"the model output"``).
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    if all_finite(tensors):
        return
    bad = int(sum((~torch.isfinite(t)).sum() for t in tensors))
    total = sum(t.numel() for t in tensors)
    raise NonFiniteError(
        f"{what} has {bad} NaN or Inf entries (of {total}). Check the model and "
        "its inputs for overflow (large inputs or weights, float16 ranges) or "
        "NaNs; in low precision, convert the model to float32 or float64."
    )


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether no entry of ``tensors`` is NaN or Inf (one device synchronisation).

    A NaN or an infinite entry makes its tensor's sum NaN or infinite, so finite
    sums prove every entry finite with one cheap reduction per tensor (no boolean
    masks); only if a sum is not finite (a bad entry, or a sum that overflowed) are
    the entries checked one by one. Half-precision tensors are summed in float32.
    """
    if not tensors:
        return True
    if len(tensors) == 1:
        sums = _finite_probe(tensors[0])
    else:
        sums = torch.stack([_finite_probe(t) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _finite_probe(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t``'s entries, as a scalar that is finite only if they all are."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.sum(dtype=torch.float32)
    if t.is_complex():
        return torch.view_as_real(t).sum()
    if not t.is_floating_point():
        return t.new_zeros((), dtype=torch.float32)  # integers are always finite
    return t.sum()


@contextmanager
def naming_batch(index: int) -> Iterator[None]:
    """Prefix a :class:`NonFiniteError` raised inside with ``Batch {index}``."""
    try:
        yield
    except NonFiniteError as error:
        raise NonFiniteError(
            f"Batch {index} (0-based, in data order): {error}"
        ) from None


class DistributedError(RuntimeError):
    """An operator's collective call failed on some rank, or the group is unusable.

    Raised on *every* rank of the process group when one of them fails, so that no
    rank waits forever for the others.

    Attributes:
        failures: The failing ranks and their errors (``type: message``).
    """

    def __init__(self, message: str, failures: dict[int, str] | None = None):
        """Store the message and the failing ranks."""
        super().__init__(message)
        self.failures = dict(failures or {})

    @classmethod
    def from_failures(cls, what: str, failures: dict[int, str]) -> DistributedError:
        """The error for ``failures`` (rank -> report) while doing ``what``."""
        lines = "\n".join(
            f"  rank {rank}: {report}" for rank, report in failures.items()
        )
        ranks = ", ".join(str(rank) for rank in failures)
        return cls(
            f"{what} failed on rank(s) {ranks} of the process group, so it fails on "
            f"every rank:\n{lines}",
            failures,
        )


class UnsupportedOperationError(NotImplementedError):
    r"""An operation of the model has no derivative that a product can use.

    Products need :math:`\mathbf{J}\mathbf{v}`: by forward mode, or, where an
    operation has no forward-mode derivative, as the VJP of the VJP
    (reverse-over-reverse), which needs a differentiable backward. Raised when an
    operation has neither; the message names the operation and the layer.

    Attributes:
        op: The operation (PyTorch's name, or the ``autograd.Function``'s class).
        layer: The module that ran it (``None`` if unknown).
    """

    def __init__(self, message: str, op: str, layer: str | None = None):
        """Store the message, the operation and the layer."""
        super().__init__(message)
        self.op = op
        self.layer = layer
