"""Exceptions raised by ``curvlinops_fisher``.

Every error names the problem and the fix. Each class also derives from the built-in
exception that peers (curvlinops, PyTorch) raise in the same situation, so code that
catches ``ValueError`` or ``NotImplementedError`` keeps working after switching.
"""


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
