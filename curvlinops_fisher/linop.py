r"""Matrix-free linear operators in PyTorch (API of curvlinops' ``PyTorchLinearOperator``).

A linear operator :math:`\mathbf{A} \in \mathbb{R}^{P_\text{out} \times P_\text{in}}`
acts on vectors that, in deep learning, usually come as a *list* of tensors (one per
parameter). The operator therefore knows its input and output spaces as lists of
shapes, ``in_shape = [S_1, S_2, ...]`` with :math:`P_\text{in} = \sum_i |S_i|`, and
accepts vectors and matrices either flattened (``[P_in]``, ``[P_in, K]``) or as tensor
lists (``[*S_1], [*S_2], ...`` or ``[*S_1, K], [*S_2, K], ...``).

Subclasses implement only :meth:`PyTorchLinearOperator._matmat` (on tensor lists with a
trailing column axis), the properties ``dtype`` and ``device`` and, unless they are
self-adjoint, :meth:`PyTorchLinearOperator._adjoint`. Everything else (input checks,
format conversion, operator arithmetic, export to SciPy) is provided here.

Internally, every conversion between the flat ``[P, K]`` form and the list form goes
through :func:`_flat_to_list` and :func:`_list_to_flat`.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Size, Tensor

from curvlinops_fisher.errors import VectorFormatError

__all__ = [
    "IdentityLinearOperator",
    "PyTorchLinearOperator",
    "VectorFormatError",
]


# Flat <-> list conversion (the only place where reshaping between formats happens)


def _flat_to_list(X: Tensor, shapes: Sequence[Size]) -> list[Tensor]:
    """Split a flat matrix into a tensor list with a trailing column axis.

    Args:
        X: Matrix of shape ``[P, K]`` with ``P = sum(s.numel() for s in shapes)``.
        shapes: Shapes ``S_1, S_2, ...`` of the list entries.

    Returns:
        Tensors of shape ``[*S_1, K], [*S_2, K], ...`` (views of ``X`` where possible).
    """
    num_cols = X.shape[1]
    if len(shapes) == 1:
        return [X.reshape(*shapes[0], num_cols)]
    blocks = X.split([s.numel() for s in shapes], dim=0)
    return [x.reshape(*s, num_cols) for x, s in zip(blocks, shapes, strict=True)]


def _list_to_flat(Xs: Sequence[Tensor], shapes_flat: Sequence[int]) -> Tensor:
    """Stack a tensor list with a trailing column axis into a flat matrix.

    Args:
        Xs: Tensors of shape ``[*S_1, K], [*S_2, K], ...``.
        shapes_flat: The numbers of elements ``|S_1|, |S_2|, ...``.

    Returns:
        Matrix of shape ``[sum_i |S_i|, K]``.
    """
    num_cols = Xs[0].shape[-1]
    blocks = [x.reshape(n, num_cols) for x, n in zip(Xs, shapes_flat, strict=True)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=0)


def _convert_list(
    Xs: list[Tensor], from_shapes: Sequence[Size], to_shapes: Sequence[Size]
) -> list[Tensor]:
    """Re-split a tensor list (trailing column axis) into another list structure.

    Args:
        Xs: Tensors of shape ``[*S_i, K]`` for ``S_i`` in ``from_shapes``.
        from_shapes: The list structure of ``Xs``.
        to_shapes: The target list structure (same total number of elements).

    Returns:
        Tensors of shape ``[*T_j, K]`` for ``T_j`` in ``to_shapes``; ``Xs`` itself if
        both structures agree.
    """
    if list(from_shapes) == list(to_shapes):
        return Xs
    flat = _list_to_flat(Xs, [s.numel() for s in from_shapes])
    return _flat_to_list(flat, to_shapes)


# Small helpers


def _fmt_shape(shape: Sequence[int]) -> str:
    """Format a shape like a Python tuple, e.g. ``(3, 4)``."""
    return str(tuple(shape))


def _fmt_shapes(shapes: Sequence[Sequence[int]]) -> str:
    """Format a list of shapes, e.g. ``[(3, 4), (3,)]``."""
    return "[" + ", ".join(_fmt_shape(s) for s in shapes) + "]"


def _devices_match(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same (an unspecified index matches any index)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def _as_scalar(c: object) -> float | None:
    """Convert a real scalar (Python, NumPy, or 0-dim real tensor) to ``float``.

    Args:
        c: The candidate scalar.

    Returns:
        ``float(c)``, or ``None`` if ``c`` is not a real scalar.
    """
    if isinstance(c, Tensor):
        if c.ndim == 0 and not c.is_complex() and c.device.type != "meta":
            return float(c.item())
        return None
    if isinstance(c, numbers.Real):
        return float(c)
    return None


@dataclass(frozen=True)
class _Format:
    """How the user passed a vector/matrix, to return the result in the same format.

    Attributes:
        is_list: Whether it was a tensor list (or tuple) rather than a single tensor.
        is_vec: Whether it was a vector (no column axis) rather than a matrix.
        num_cols: Number of columns ``K`` (``1`` for vectors).
    """

    is_list: bool
    is_vec: bool
    num_cols: int


class PyTorchLinearOperator:
    r"""Base class for matrix-free linear operators acting on PyTorch tensor lists.

    The operator represents :math:`\mathbf{A} \in \mathbb{R}^{P_\text{out} \times
    P_\text{in}}`, whose input (output) space is a list of tensor shapes ``in_shape``
    (``out_shape``). It supports

    - ``A @ X``: ``X`` of shape ``[P_in]``/``[P_in, K]``, or a list (tuple) of tensors
      shaped like ``in_shape`` (optionally with a trailing column axis ``K``). The
      result comes in the same format, with ``out_shape``.
    - ``X @ A``: ``X`` of shape ``[P_out]``/``[K, P_out]`` (or a list with an optional
      *leading* column axis), computed as
      :math:`\mathbf{X} \mathbf{A} = (\mathbf{A}^\top \mathbf{X}^\top)^\top` through
      :meth:`adjoint`.
    - ``A + B``, ``A - B``, ``-A``, ``c * A``, ``A * c``, ``A / c``, ``A @ B``: lazy
      composite operators.
    - :meth:`to_scipy`: export to ``scipy.sparse.linalg.LinearOperator``.

    Inputs are never cast to another dtype or moved to another device; a mismatch
    raises :class:`VectorFormatError` naming the fix.

    Subclasses implement :meth:`_matmat`, the properties ``dtype`` and ``device``, and
    :meth:`_adjoint` (unless ``SELF_ADJOINT``).

    Attributes:
        SELF_ADJOINT: Whether :math:`\mathbf{A}^\top = \mathbf{A}` (then
            :meth:`adjoint` returns the operator itself). Default: ``False``.
        shape: ``(P_out, P_in)``.
        _in_shape: The input space's shapes, a list of ``torch.Size`` (for the
            curvature operators, the params' shapes). Kept under curvlinops' name for
            compatibility, as are ``_out_shape`` and the flat sizes ``_in_shape_flat``
            and ``_out_shape_flat`` (lists of ints).
    """

    SELF_ADJOINT: bool = False

    # Make NumPy defer to our reflected operators (``ndarray @ A``, ``np.float64 * A``).
    __array_ufunc__ = None

    def __init__(
        self, in_shape: list[tuple[int, ...]], out_shape: list[tuple[int, ...]]
    ):
        """Store the shapes of the input and output spaces.

        Args:
            in_shape: Shapes ``[S_1, S_2, ...]`` of the input space's tensor list.
            out_shape: Shapes ``[T_1, T_2, ...]`` of the output space's tensor list.
        """
        self._in_shape = self._validate_shapes(in_shape, "in_shape")
        self._out_shape = self._validate_shapes(out_shape, "out_shape")
        self._in_shape_flat = [s.numel() for s in self._in_shape]
        self._out_shape_flat = [s.numel() for s in self._out_shape]
        self.shape = (sum(self._out_shape_flat), sum(self._in_shape_flat))

    @staticmethod
    def _validate_shapes(shapes: object, name: str) -> list[Size]:
        """Check a list of shapes and convert its entries to ``torch.Size``.

        Args:
            shapes: The list of shapes to check.
            name: The argument name, for error messages.

        Returns:
            The shapes as a list of ``torch.Size``.

        Raises:
            ValueError: If ``shapes`` is not a non-empty list of shapes with
                non-negative integer entries.
        """
        valid = (
            isinstance(shapes, (list, tuple))
            and len(shapes) > 0
            and all(
                isinstance(s, (list, tuple))
                and all(isinstance(d, numbers.Integral) and d >= 0 for d in s)
                for s in shapes
            )
        )
        if not valid:
            raise ValueError(
                f"{name} must be a non-empty list of shapes (tuples of non-negative "
                f"ints), e.g. [p.shape for p in params]; got {shapes!r}."
            )
        return [Size(tuple(int(d) for d in s)) for s in shapes]

    # Interface for subclasses

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply the operator onto a matrix in tensor list format.

        Args:
            M: Tensors of shape ``[*S_1, K], [*S_2, K], ...`` for ``S_i`` in
                ``in_shape``, with ``K >= 1``, on the operator's device and dtype.

        Returns:
            Tensors of shape ``[*T_1, K], [*T_2, K], ...`` for ``T_j`` in
            ``out_shape``.

        Raises:
            NotImplementedError: Must be implemented by subclasses.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement _matmat(M: list[Tensor]) -> "
            "list[Tensor]."
        )

    @property
    def dtype(self) -> torch.dtype:
        """The operator's data type.

        Raises:
            NotImplementedError: Must be implemented by subclasses.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement the `dtype` property."
        )

    @property
    def device(self) -> torch.device:
        """The operator's device.

        Raises:
            NotImplementedError: Must be implemented by subclasses.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement the `device` property."
        )

    def _adjoint(self) -> PyTorchLinearOperator:
        """Return the adjoint operator (override in subclasses that are not self-adjoint).

        Raises:
            NotImplementedError: If the subclass does not define its adjoint.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not define its adjoint: implement "
            "`_adjoint()` or set `SELF_ADJOINT = True` if the operator is symmetric. "
            "The adjoint is needed for `X @ A`, `adjoint()`, and `rmatvec` of "
            "`to_scipy()`."
        )

    # Adjoint

    def adjoint(self) -> PyTorchLinearOperator:
        r"""Return the adjoint operator :math:`\mathbf{A}^\top`.

        The adjoint is defined by :math:`\langle \mathbf{y}, \mathbf{A}\mathbf{x}
        \rangle = \langle \mathbf{A}^\top \mathbf{y}, \mathbf{x} \rangle` for all
        :math:`\mathbf{x} \in \mathbb{R}^{P_\text{in}}, \mathbf{y} \in
        \mathbb{R}^{P_\text{out}}` (the conjugate transpose for complex operators).

        Returns:
            ``self`` if ``SELF_ADJOINT``, else ``self._adjoint()``.
        """
        return self if self.SELF_ADJOINT else self._adjoint()

    # Multiplication with vectors and matrices

    def __matmul__(
        self, X: Tensor | Sequence[Tensor] | PyTorchLinearOperator
    ) -> Tensor | list[Tensor] | PyTorchLinearOperator:
        """Multiply onto a vector/matrix (``A @ X``) or compose operators (``A @ B``).

        Args:
            X: A tensor of shape ``[P_in]`` or ``[P_in, K]``; a list (or tuple) of
                tensors shaped like ``in_shape``, optionally all with a common trailing
                column axis ``K``; or another ``PyTorchLinearOperator``.

        Returns:
            ``A X`` in the format of ``X`` (a tensor list comes back as a list shaped
            like ``out_shape``), or the lazy product operator if ``X`` is an operator.
        """
        if isinstance(X, PyTorchLinearOperator):
            return _ChainPyTorchLinearOperator(self, X)
        Xs, fmt = self._preprocess(X, self._in_shape, leading=False, op="A @ X")
        AX = self._apply(Xs, fmt.num_cols)
        return self._postprocess(AX, self._out_shape_flat, fmt, leading=False)

    def matmat(self, X: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Multiply onto a vector or matrix; same as ``A @ X`` for tensors/lists.

        Args:
            X: See :meth:`__matmul__`.

        Returns:
            ``A X`` in the format of ``X``.

        Raises:
            VectorFormatError: If ``X`` is an operator (use ``A @ B`` to compose).
        """
        if isinstance(X, PyTorchLinearOperator):
            raise VectorFormatError(
                "matmat/matvec multiply onto tensors; to compose two operators, "
                "use A @ B."
            )
        return self @ X

    matvec = matmat

    def __rmatmul__(self, X: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        r"""Multiply a vector/matrix from the left (``X @ A``) via the adjoint.

        Uses :math:`\mathbf{X}\mathbf{A} = (\mathbf{A}^\top \mathbf{X}^\top)^\top`.

        Args:
            X: A tensor of shape ``[P_out]`` or ``[K, P_out]``, or a list (or tuple) of
                tensors shaped like ``out_shape``, optionally all with a common
                *leading* column axis ``K``.

        Returns:
            ``X A`` of shape ``[P_in]`` or ``[K, P_in]`` (a list shaped like
            ``in_shape`` for list inputs).

        Raises:
            RuntimeError: If the adjoint has the wrong shape.
        """
        Xs, fmt = self._preprocess(X, self._out_shape, leading=True, op="X @ A")
        AH = self.adjoint()
        if AH.shape != (self.shape[1], self.shape[0]):
            raise RuntimeError(
                f"The adjoint of {type(self).__name__} (shape {self.shape}) has shape "
                f"{AH.shape}, expected {(self.shape[1], self.shape[0])}; fix its "
                "`_adjoint()`."
            )
        XH = _convert_list([x.conj() for x in Xs], self._out_shape, AH._in_shape)
        AHXH = AH._apply(XH, fmt.num_cols)
        XA = _convert_list(AHXH, AH._out_shape, self._in_shape)
        XA = [x.conj() for x in XA]
        return self._postprocess(XA, self._in_shape_flat, fmt, leading=True)

    def _apply(self, Xs: list[Tensor], num_cols: int) -> list[Tensor]:
        """Call :meth:`_matmat` and check its output; handles ``K = 0`` itself.

        Args:
            Xs: Tensors of shape ``[*S_i, K]`` for ``S_i`` in ``in_shape``.
            num_cols: The number of columns ``K``.

        Returns:
            Tensors of shape ``[*T_j, K]`` for ``T_j`` in ``out_shape``.

        Raises:
            RuntimeError: If ``_matmat`` returns tensors of the wrong shape.
        """
        if num_cols == 0:  # nothing to compute; subclasses never see K = 0
            return [
                torch.zeros(*s, 0, dtype=Xs[0].dtype, device=Xs[0].device)
                for s in self._out_shape
            ]
        AX = self._matmat(Xs)
        expected = [Size((*s, num_cols)) for s in self._out_shape]
        if (
            not isinstance(AX, (list, tuple))
            or len(AX) != len(expected)
            or any(
                not isinstance(y, Tensor) or y.shape != s
                for y, s in zip(AX, expected, strict=True)
            )
        ):
            got = (
                _fmt_shapes([y.shape for y in AX])
                if isinstance(AX, (list, tuple))
                and all(isinstance(y, Tensor) for y in AX)
                else repr(type(AX))
            )
            raise RuntimeError(
                f"{type(self).__name__}._matmat returned {got}, but must return a "
                f"list of tensors with shapes {_fmt_shapes(expected)} "
                "(out_shape plus a trailing column axis); fix the subclass."
            )
        return list(AX)

    def _matmat_flat(self, X: Tensor) -> Tensor:
        """Multiply onto a flat matrix (no input checks).

        Args:
            X: Matrix of shape ``[P_in, K]``.

        Returns:
            ``A X`` of shape ``[P_out, K]``.
        """
        AX = self._apply(_flat_to_list(X, self._in_shape), X.shape[1])
        return _list_to_flat(AX, self._out_shape_flat)

    # Input checks and format conversion

    def _preprocess(
        self,
        X: object,
        shapes: list[Size],
        leading: bool,
        op: str,
    ) -> tuple[list[Tensor], _Format]:
        """Check a vector/matrix and convert it to tensor list format.

        Args:
            X: The user's input.
            shapes: The expected list structure (``in_shape`` or ``out_shape``).
            leading: Whether the column axis is leading (``X @ A``) rather than
                trailing (``A @ X``).
            op: Description of the operation for error messages.

        Returns:
            ``X`` as tensors of shape ``[*S_i, K]`` (trailing column axis, list
            structure ``shapes``) and the format to restore in the output.

        Raises:
            VectorFormatError: If ``X`` has the wrong type, shape, dtype or device.
        """
        total = sum(s.numel() for s in shapes)
        tensor_fmt = f"({total},) or " + (
            f"(K, {total})" if leading else f"({total}, K)"
        )
        axis = "leading" if leading else "trailing"
        accepted = (
            f"{op}: expected a tensor of shape {tensor_fmt} with "
            f"{'P_out' if leading else 'P_in'}={total}, or a list of tensors shaped "
            f"like {_fmt_shapes(shapes)} (optionally with a {axis} column axis K)"
        )

        if isinstance(X, Tensor):
            if X.ndim not in (1, 2) or X.shape[-1 if leading else 0] != total:
                hint = ""
                core = X.shape[1:] if leading else X.shape[:-1]
                if len(shapes) == 1 and shapes[0] in (X.shape, core):
                    hint = "; to pass it in its parameter shape, wrap it in a list: [X]"
                raise VectorFormatError(
                    f"{accepted}; got a tensor of shape {_fmt_shape(X.shape)}{hint}."
                )
            self._check_dtype_device(X, op, "X")
            if X.ndim == 1:
                fmt = _Format(is_list=False, is_vec=True, num_cols=1)
                flat = X.unsqueeze(1)
            else:
                num_cols = X.shape[0 if leading else 1]
                fmt = _Format(is_list=False, is_vec=False, num_cols=num_cols)
                flat = X.mT if leading else X
            return _flat_to_list(flat, shapes), fmt

        if isinstance(X, (list, tuple)):
            for i, x in enumerate(X):
                if not isinstance(x, Tensor):
                    raise VectorFormatError(
                        f"{accepted}; got a list whose entry {i} has type "
                        f"{type(x).__module__}.{type(x).__qualname__}, not "
                        "torch.Tensor. Convert it with "
                        "torch.as_tensor(x, dtype=A.dtype, device=A.device)."
                    )
            got = f"got a list of {len(X)} tensors with shapes " + _fmt_shapes(
                [x.shape for x in X]
            )
            if len(X) != len(shapes):
                raise VectorFormatError(
                    f"{accepted}; {got}. The list needs exactly {len(shapes)} "
                    "entries, one per shape."
                )
            if all(x.shape == s for x, s in zip(X, shapes, strict=True)):
                fmt = _Format(is_list=True, is_vec=True, num_cols=1)
                Xs = [x.unsqueeze(-1) for x in X]
            elif all(
                x.ndim == len(s) + 1 and (x.shape[1:] if leading else x.shape[:-1]) == s
                for x, s in zip(X, shapes, strict=True)
            ):
                cols = [x.shape[0 if leading else -1] for x in X]
                if len(set(cols)) != 1:
                    raise VectorFormatError(
                        f"{accepted}; {got}: the {axis} column axes differ "
                        f"(K = {cols}). All entries must have the same number of "
                        "columns K."
                    )
                fmt = _Format(is_list=True, is_vec=False, num_cols=cols[0])
                Xs = [x.movedim(0, -1) for x in X] if leading else list(X)
            else:
                raise VectorFormatError(
                    f"{accepted}; {got}. Either all entries have exactly these "
                    f"shapes, or all have them plus a {axis} column axis."
                )
            for i, x in enumerate(X):
                self._check_dtype_device(x, op, f"entry {i} of X")
            return Xs, fmt

        raise VectorFormatError(
            f"{accepted}; got an object of type {type(X).__module__}."
            f"{type(X).__qualname__}. Convert it with torch.as_tensor(X, "
            "dtype=A.dtype, device=A.device), or use A.to_scipy() to work with "
            "NumPy arrays."
        )

    def _check_dtype_device(self, x: Tensor, op: str, name: str) -> None:
        """Check that a tensor has the operator's dtype and device (no casting).

        Args:
            x: The tensor to check.
            op: Description of the operation for error messages.
            name: Name of the tensor for error messages.

        Raises:
            VectorFormatError: If dtype or device differ from the operator's.
        """
        if x.dtype != self.dtype:
            raise VectorFormatError(
                f"{op}: {name} has dtype {x.dtype}, but the operator has dtype "
                f"{self.dtype}. Convert it with X.to({self.dtype}) (inputs are never "
                "cast implicitly)."
            )
        if not _devices_match(x.device, self.device):
            raise VectorFormatError(
                f"{op}: {name} is on device '{x.device}', but the operator is on "
                f"device '{self.device}'. Move it with X.to('{self.device}') (inputs "
                "are never moved implicitly)."
            )

    @staticmethod
    def _postprocess(
        AX: list[Tensor], shapes_flat: list[int], fmt: _Format, leading: bool
    ) -> Tensor | list[Tensor]:
        """Convert a result in tensor list format back to the user's input format.

        Args:
            AX: Result tensors with a trailing column axis.
            shapes_flat: Numbers of elements of the result's list entries.
            fmt: The format of the user's input.
            leading: Whether the column axis should be leading (``X @ A``).

        Returns:
            The result as a tensor or list of tensors, in the format of the input.
        """
        if fmt.is_list:
            if fmt.is_vec:
                return [y.squeeze(-1) for y in AX]
            return [y.movedim(-1, 0) for y in AX] if leading else AX
        flat = _list_to_flat(AX, shapes_flat)
        if fmt.is_vec:
            return flat.squeeze(1)
        return flat.mT if leading else flat

    # Arithmetic

    def __add__(self, other: object) -> PyTorchLinearOperator:
        """Lazy sum ``A + B`` of two operators of equal shape.

        Args:
            other: Another ``PyTorchLinearOperator``.

        Returns:
            The sum operator (``NotImplemented`` for non-operators).
        """
        if not isinstance(other, PyTorchLinearOperator):
            return NotImplemented
        return _SumPyTorchLinearOperator(self, other)

    def __sub__(self, other: object) -> PyTorchLinearOperator:
        """Lazy difference ``A - B = A + (-1) B`` of two operators of equal shape.

        Args:
            other: Another ``PyTorchLinearOperator``.

        Returns:
            The difference operator (``NotImplemented`` for non-operators).
        """
        if not isinstance(other, PyTorchLinearOperator):
            return NotImplemented
        return _SumPyTorchLinearOperator(self, -other)

    def __neg__(self) -> PyTorchLinearOperator:
        """Lazy negation ``-A = (-1) A``.

        Returns:
            The negated operator.
        """
        return _ScalePyTorchLinearOperator(self, -1.0)

    def __mul__(self, other: object) -> PyTorchLinearOperator:
        """Lazy scalar multiple ``A * c``.

        Args:
            other: A real scalar (Python, NumPy, or 0-dim tensor).

        Returns:
            The scaled operator (``NotImplemented`` for non-scalars).
        """
        c = _as_scalar(other)
        if c is None:
            return NotImplemented
        return _ScalePyTorchLinearOperator(self, c)

    def __rmul__(self, other: object) -> PyTorchLinearOperator:
        """Lazy scalar multiple ``c * A``.

        Args:
            other: A real scalar (Python, NumPy, or 0-dim tensor).

        Returns:
            The scaled operator (``NotImplemented`` for non-scalars).
        """
        return self.__mul__(other)

    def __truediv__(self, other: object) -> PyTorchLinearOperator:
        """Lazy scalar division ``A / c = (1 / c) A``.

        Args:
            other: A non-zero real scalar (Python, NumPy, or 0-dim tensor).

        Returns:
            The scaled operator (``NotImplemented`` for non-scalars).
        """
        c = _as_scalar(other)
        if c is None:
            return NotImplemented
        return _ScalePyTorchLinearOperator(self, 1.0 / c)

    def __repr__(self) -> str:
        """Short description with the operator's shapes."""
        return (
            f"{type(self).__name__}(shape={self.shape}, "
            f"in_shape={_fmt_shapes(self._in_shape)}, "
            f"out_shape={_fmt_shapes(self._out_shape)})"
        )

    # SciPy export

    def to_scipy(self, dtype: numpy.dtype | type | None = None) -> LinearOperator:
        """Wrap the operator as a ``scipy.sparse.linalg.LinearOperator``.

        NumPy inputs are converted to the operator's dtype and device, multiplied in
        PyTorch, and returned as NumPy arrays of the SciPy operator's dtype.
        ``rmatvec``/``rmatmat`` use :meth:`adjoint`. Gradient tracking is left as is
        (subclasses may need autograd); outputs are detached.

        Args:
            dtype: NumPy dtype of the SciPy operator. Default: the NumPy equivalent of
                ``self.dtype`` (``float32`` for ``float16``/``bfloat16``, which SciPy's
                solvers do not support).

        Returns:
            A SciPy linear operator of shape ``self.shape``.
        """
        if dtype is None:
            if self.dtype in (torch.float16, torch.bfloat16):
                dtype = numpy.float32
            else:
                dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
        return _SciPyLinearOperator(self, numpy.dtype(dtype))


class _SciPyLinearOperator(LinearOperator):
    """SciPy view of a :class:`PyTorchLinearOperator` (see ``to_scipy``)."""

    def __init__(self, op: PyTorchLinearOperator, dtype: numpy.dtype):
        """Store the PyTorch operator.

        Args:
            op: The PyTorch linear operator.
            dtype: NumPy dtype of inputs/outputs.
        """
        super().__init__(dtype=dtype, shape=op.shape)
        self._op = op
        self._op_adjoint: PyTorchLinearOperator | None = None

    def _to_torch(self, x: numpy.ndarray) -> Tensor:
        """Convert a NumPy vector/matrix to a ``[P, K]`` tensor of the operator."""
        x = numpy.asarray(x)
        if not x.flags.writeable:
            x = x.copy()
        X = torch.as_tensor(x, dtype=self._op.dtype, device=self._op.device)
        return X if X.ndim == 2 else X.reshape(-1, 1)

    def _to_numpy(self, Y: Tensor) -> numpy.ndarray:
        """Convert a result tensor to a NumPy array of this operator's dtype."""
        Y = Y.detach().cpu()
        if Y.dtype == torch.bfloat16:
            Y = Y.float()
        return Y.numpy().astype(self.dtype, copy=False)

    def _adjoint_op(self) -> PyTorchLinearOperator:
        """The PyTorch operator's adjoint (computed once, on first use)."""
        if self._op_adjoint is None:
            self._op_adjoint = self._op.adjoint()
        return self._op_adjoint

    def _matmat(self, X: numpy.ndarray) -> numpy.ndarray:
        """Compute ``A @ X`` for ``X`` of shape ``[P_in, K]``."""
        return self._to_numpy(self._op._matmat_flat(self._to_torch(X)))

    def _matvec(self, x: numpy.ndarray) -> numpy.ndarray:
        """Compute ``A @ x`` for ``x`` of shape ``[P_in]`` or ``[P_in, 1]``."""
        y = self._matmat(numpy.reshape(x, (-1, 1)))
        return y.reshape((self.shape[0],) + numpy.shape(x)[1:])

    def _rmatmat(self, X: numpy.ndarray) -> numpy.ndarray:
        """Compute ``A^H @ X`` for ``X`` of shape ``[P_out, K]``."""
        return self._to_numpy(self._adjoint_op()._matmat_flat(self._to_torch(X)))

    def _rmatvec(self, x: numpy.ndarray) -> numpy.ndarray:
        """Compute ``A^H @ x`` for ``x`` of shape ``[P_out]`` or ``[P_out, 1]``."""
        y = self._rmatmat(numpy.reshape(x, (-1, 1)))
        return y.reshape((self.shape[1],) + numpy.shape(x)[1:])


# Composite operators


def _check_compatible(
    A: PyTorchLinearOperator, B: PyTorchLinearOperator, op: str
) -> None:
    """Check that two operators can be added (``op="+"``) or multiplied (``"@"``).

    Args:
        A: The left operand.
        B: The right operand.
        op: ``"+"`` or ``"@"``.

    Raises:
        ValueError: If shapes, dtypes or devices are incompatible.
    """
    if op == "+" and A.shape != B.shape:
        raise ValueError(
            f"Cannot add operators of shapes {A.shape} and {B.shape}: A + B and "
            "A - B need A.shape == B.shape."
        )
    if op == "@" and A.shape[1] != B.shape[0]:
        raise ValueError(
            f"Cannot multiply operators of shapes {A.shape} and {B.shape}: A @ B "
            "needs A.shape[1] == B.shape[0]."
        )
    if A.dtype != B.dtype:
        raise ValueError(
            f"Cannot combine operators with dtypes {A.dtype} and {B.dtype} "
            f"(A {op} B); create both with the same dtype (e.g. dtype={A.dtype})."
        )
    if not _devices_match(A.device, B.device):
        raise ValueError(
            f"Cannot combine operators on devices '{A.device}' and '{B.device}' "
            f"(A {op} B); create both on the same device (e.g. device='{A.device}')."
        )


class _SumPyTorchLinearOperator(PyTorchLinearOperator):
    r"""Lazy sum :math:`\mathbf{A} + \mathbf{B}`, with the list structure of ``A``."""

    def __init__(self, A: PyTorchLinearOperator, B: PyTorchLinearOperator):
        """Store the summands.

        Args:
            A: The first summand (its list structure is used).
            B: The second summand (same shape, dtype and device).
        """
        _check_compatible(A, B, "+")
        super().__init__(A._in_shape, A._out_shape)
        self._A, self._B = A, B

    @property
    def dtype(self) -> torch.dtype:
        """The operator's data type."""
        return self._A.dtype

    @property
    def device(self) -> torch.device:
        """The operator's device."""
        return self._A.device

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        r"""Compute :math:`\mathbf{A}\mathbf{M} + \mathbf{B}\mathbf{M}`."""
        num_cols = M[0].shape[-1]
        AM = self._A._apply(M, num_cols)
        MB = _convert_list(M, self._in_shape, self._B._in_shape)
        BM = _convert_list(
            self._B._apply(MB, num_cols), self._B._out_shape, self._out_shape
        )
        return [a + b for a, b in zip(AM, BM, strict=True)]

    def _adjoint(self) -> PyTorchLinearOperator:
        r"""Return :math:`(\mathbf{A} + \mathbf{B})^\top = \mathbf{A}^\top + \mathbf{B}^\top`."""
        return _SumPyTorchLinearOperator(self._A.adjoint(), self._B.adjoint())


class _ScalePyTorchLinearOperator(PyTorchLinearOperator):
    r"""Lazy scalar multiple :math:`c \mathbf{A}` (nested scalings are merged)."""

    def __init__(self, A: PyTorchLinearOperator, scalar: float):
        """Store the operator and the scalar.

        Args:
            A: The operator to scale.
            scalar: The real scale factor.
        """
        if isinstance(A, _ScalePyTorchLinearOperator):
            A, scalar = A._A, A._scalar * scalar
        super().__init__(A._in_shape, A._out_shape)
        self._A, self._scalar = A, float(scalar)

    @property
    def dtype(self) -> torch.dtype:
        """The operator's data type."""
        return self._A.dtype

    @property
    def device(self) -> torch.device:
        """The operator's device."""
        return self._A.device

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        r"""Compute :math:`c \mathbf{A}\mathbf{M}`."""
        return [self._scalar * y for y in self._A._apply(M, M[0].shape[-1])]

    def _adjoint(self) -> PyTorchLinearOperator:
        r"""Return :math:`(c \mathbf{A})^\top = c \mathbf{A}^\top` (``c`` is real)."""
        return _ScalePyTorchLinearOperator(self._A.adjoint(), self._scalar)


class _ChainPyTorchLinearOperator(PyTorchLinearOperator):
    r"""Lazy product :math:`\mathbf{A}_1 \mathbf{A}_2 \cdots \mathbf{A}_n`.

    Has the output list structure of :math:`\mathbf{A}_1` and the input list structure
    of :math:`\mathbf{A}_n`. Nested products are flattened.
    """

    def __init__(self, *operators: PyTorchLinearOperator):
        """Store the factors.

        Args:
            *operators: The factors, left to right.
        """
        ops: list[PyTorchLinearOperator] = []
        for op in operators:
            if isinstance(op, _ChainPyTorchLinearOperator):
                ops.extend(op._operators)
            else:
                ops.append(op)
        for left, right in itertools.pairwise(ops):
            _check_compatible(left, right, "@")
        super().__init__(ops[-1]._in_shape, ops[0]._out_shape)
        self._operators = ops

    @property
    def dtype(self) -> torch.dtype:
        """The operator's data type."""
        return self._operators[0].dtype

    @property
    def device(self) -> torch.device:
        """The operator's device."""
        return self._operators[0].device

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Apply the factors right to left, converting list structures in between."""
        num_cols = M[0].shape[-1]
        shapes = self._in_shape
        for op in reversed(self._operators):
            M = op._apply(_convert_list(M, shapes, op._in_shape), num_cols)
            shapes = op._out_shape
        return M

    def _adjoint(self) -> PyTorchLinearOperator:
        r"""Return :math:`(\mathbf{A}_1 \cdots \mathbf{A}_n)^\top = \mathbf{A}_n^\top \cdots \mathbf{A}_1^\top`."""
        return _ChainPyTorchLinearOperator(
            *(op.adjoint() for op in reversed(self._operators))
        )


class IdentityLinearOperator(PyTorchLinearOperator):
    r"""The identity :math:`\mathbf{I}`, e.g. for damping ``A + 1e-3 * I``.

    Its products return the input tensors themselves (no copy).
    """

    SELF_ADJOINT: bool = True

    def __init__(
        self,
        shape: int | list[tuple[int, ...]],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Create the identity on a space of given size or list structure.

        Args:
            shape: Either the dimension ``P`` (list structure ``[(P,)]``), or a list of
                shapes, e.g. ``[p.shape for p in params]``.
            device: Device of the operator. Default: CPU.
            dtype: Data type of the operator. Default: ``torch.get_default_dtype()``.

        Raises:
            ValueError: If ``shape`` is a negative int or a single tensor shape.
            TypeError: If ``shape`` is neither an int nor a list of shapes.
        """
        if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
            if shape < 0:
                raise ValueError(f"Identity dimension must be >= 0, got {shape}.")
            shapes = [(int(shape),)]
        elif isinstance(shape, (list, tuple)):
            if len(shape) > 0 and all(isinstance(s, numbers.Integral) for s in shape):
                raise ValueError(
                    f"IdentityLinearOperator got shape={shape!r}, a single tensor "
                    f"shape; pass a list of shapes, e.g. [{tuple(shape)!r}], or the "
                    "total dimension as an int."
                )
            shapes = shape
        else:
            raise TypeError(
                f"IdentityLinearOperator needs an int P or a list of shapes (e.g. "
                f"[p.shape for p in params]); got {shape!r}."
            )
        super().__init__(shapes, shapes)
        self._device = torch.device("cpu" if device is None else device)
        self._dtype = torch.get_default_dtype() if dtype is None else dtype

    @property
    def dtype(self) -> torch.dtype:
        """The operator's data type."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The operator's device."""
        return self._device

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Return ``M`` unchanged."""
        return list(M)
