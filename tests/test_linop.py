"""Tests for ``curvlinops_fisher.linop`` against dense matrix algebra."""

from __future__ import annotations

import numpy
import pytest
import torch
from scipy.sparse.linalg import cg, eigsh
from torch import Tensor

from curvlinops_fisher.linop import (
    IdentityLinearOperator,
    PyTorchLinearOperator,
    VectorFormatError,
    _flat_to_list,
    _list_to_flat,
)

DT = torch.float64
# Non-square operator: 11 x 15, with different list structures on both sides.
IN_SHAPE = [(3, 4), (3,)]  # P_in = 15
OUT_SHAPE = [(2, 3), (), (4,)]  # P_out = 11
P_IN, P_OUT = 15, 11


class DenseLinearOperator(PyTorchLinearOperator):
    """Wrap a dense matrix ``A`` of shape ``[P_out, P_in]`` with list structures."""

    def __init__(self, A: Tensor, in_shape=None, out_shape=None):
        """Store the matrix (default structures: one flat tensor per side)."""
        in_shape = [(A.shape[1],)] if in_shape is None else in_shape
        out_shape = [(A.shape[0],)] if out_shape is None else out_shape
        super().__init__(in_shape, out_shape)
        self._A = A

    @property
    def dtype(self) -> torch.dtype:
        """The matrix dtype."""
        return self._A.dtype

    @property
    def device(self) -> torch.device:
        """The matrix device."""
        return self._A.device

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply through the flat form (independent of the library helpers)."""
        K = M[0].shape[-1]
        X = torch.cat([m.reshape(-1, K) for m in M])
        AX = self._A @ X
        out, start = [], 0
        for s in self._out_shape:
            n = s.numel()
            out.append(AX[start : start + n].reshape(*s, K))
            start += n
        return out

    def _adjoint(self) -> DenseLinearOperator:
        """Transpose, swapping list structures."""
        return DenseLinearOperator(self._A.T, self._out_shape, self._in_shape)


class SymmetricDense(DenseLinearOperator):
    """Self-adjoint dense operator (no ``_adjoint``)."""

    SELF_ADJOINT = True

    def _adjoint(self):
        """Must never be called for self-adjoint operators."""
        raise AssertionError("_adjoint of a SELF_ADJOINT operator was called")


class NoAdjoint(DenseLinearOperator):
    """Dense operator that does not define its adjoint."""

    _adjoint = PyTorchLinearOperator._adjoint


def rand(*shape, dtype=DT, seed=None) -> Tensor:
    """Random tensor (optionally seeded)."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=dtype, generator=gen)


def dense(op: PyTorchLinearOperator) -> Tensor:
    """Materialize an operator by multiplying onto the identity."""
    return op @ torch.eye(op.shape[1], dtype=op.dtype, device=op.device)


def to_list(x: Tensor, shapes) -> list[Tensor]:
    """Split a flat vector ``[P]`` or matrix ``[P, K]`` into a list (reference)."""
    out, start = [], 0
    for s in shapes:
        n = int(numpy.prod(s))
        block = x[start : start + n]
        out.append(block.reshape((*s, *x.shape[1:])))
        start += n
    return out


def from_list(xs: list[Tensor]) -> Tensor:
    """Concatenate a list of vectors (no column axis) into a flat vector (reference)."""
    return torch.cat([x.reshape(-1) for x in xs])


@pytest.fixture
def A_mat() -> Tensor:
    return rand(P_OUT, P_IN, seed=0)


@pytest.fixture
def A(A_mat) -> DenseLinearOperator:
    return DenseLinearOperator(A_mat, IN_SHAPE, OUT_SHAPE)


def assert_close(x, y, **kw):
    torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, **kw)


# Basic attributes and helpers


def test_attributes(A):
    assert A.shape == (P_OUT, P_IN)
    assert A.dtype == DT
    assert A.device == torch.device("cpu")
    assert A._in_shape == [torch.Size(s) for s in IN_SHAPE]
    assert A._out_shape == [torch.Size(s) for s in OUT_SHAPE]
    assert A._in_shape_flat == [12, 3]
    assert A._out_shape_flat == [6, 1, 4]
    assert "shape=(11, 15)" in repr(A)


def test_flat_list_roundtrip():
    shapes = [torch.Size(s) for s in IN_SHAPE]
    X = rand(P_IN, 2)
    Xs = _flat_to_list(X, shapes)
    assert [x.shape for x in Xs] == [(3, 4, 2), (3, 2)]
    assert_close(Xs[0], X[:12].reshape(3, 4, 2))
    assert_close(_list_to_flat(Xs, [12, 3]), X)


def test_invalid_shapes_in_constructor():
    with pytest.raises(ValueError, match="non-empty list of shapes"):
        DenseLinearOperator(rand(2, 2), [], [(2,)])
    with pytest.raises(ValueError, match="non-negative ints"):
        DenseLinearOperator(rand(2, 2), [(-2,)], [(2,)])


def test_base_class_abstract():
    op = PyTorchLinearOperator([(2,)], [(2,)])
    with pytest.raises(NotImplementedError, match="dtype"):
        _ = op.dtype
    with pytest.raises(NotImplementedError, match="device"):
        _ = op.device
    with pytest.raises(NotImplementedError, match="_matmat"):
        op._matmat([rand(2, 1)])
    with pytest.raises(NotImplementedError, match="adjoint"):
        op.adjoint()


# A @ X in every format


def test_matvec_tensor(A, A_mat):
    x = rand(P_IN)
    out = A @ x
    assert out.shape == (P_OUT,)
    assert_close(out, A_mat @ x)
    assert_close(A.matvec(x), A_mat @ x)
    assert_close(A.matmat(x), A_mat @ x)


@pytest.mark.parametrize("K", [0, 1, 3])
def test_matmat_tensor(A, A_mat, K):
    X = rand(P_IN, K)
    out = A @ X
    assert out.shape == (P_OUT, K)
    assert_close(out, A_mat @ X)
    assert_close(A.matmat(X), A_mat @ X)


@pytest.mark.parametrize("container", [list, tuple])
def test_list_vector(A, A_mat, container):
    x = rand(P_IN)
    out = A @ container(to_list(x, IN_SHAPE))
    assert isinstance(out, list)
    assert [o.shape for o in out] == [torch.Size(s) for s in OUT_SHAPE]
    assert_close(from_list(out), A_mat @ x)


@pytest.mark.parametrize("container", [list, tuple])
@pytest.mark.parametrize("K", [0, 1, 3])
def test_list_matrix(A, A_mat, K, container):
    X = rand(P_IN, K)
    out = A.matmat(container(to_list(X, IN_SHAPE)))
    assert isinstance(out, list)
    assert [o.shape for o in out] == [torch.Size((*s, K)) for s in OUT_SHAPE]
    expected = to_list(A_mat @ X, OUT_SHAPE)
    for o, e in zip(out, expected, strict=True):
        assert_close(o, e)


def test_k0_never_reaches_subclass(A_mat):
    class NoEmpty(DenseLinearOperator):
        def _matmat(self, M):
            assert M[0].shape[-1] > 0, "subclass saw K = 0"
            return super()._matmat(M)

        def _adjoint(self):
            return NoEmpty(self._A.T, self._out_shape, self._in_shape)

    op = NoEmpty(A_mat, IN_SHAPE, OUT_SHAPE)
    assert (op @ rand(P_IN, 0)).shape == (P_OUT, 0)
    assert (rand(0, P_OUT) @ op).shape == (0, P_IN)
    assert ((op @ op.adjoint()) @ rand(P_OUT, 0)).shape == (P_OUT, 0)


# X @ A


def test_rmatmul_vector(A, A_mat):
    v = rand(P_OUT)
    out = v @ A
    assert out.shape == (P_IN,)
    assert_close(out, v @ A_mat)


@pytest.mark.parametrize("K", [0, 1, 3])
def test_rmatmul_matrix(A, A_mat, K):
    V = rand(K, P_OUT)
    out = V @ A
    assert out.shape == (K, P_IN)
    assert_close(out, V @ A_mat)


@pytest.mark.parametrize("K", [None, 2])
def test_rmatmul_list(A, A_mat, K):
    V = rand(P_OUT) if K is None else rand(K, P_OUT)
    if K is None:
        Vs = to_list(V, OUT_SHAPE)
    else:  # leading column axis
        Vs = [v.movedim(-1, 0) for v in to_list(V.T, OUT_SHAPE)]
    out = Vs @ A
    expected = V @ A_mat
    if K is None:
        assert_close(from_list(out), expected)
    else:
        assert [o.shape for o in out] == [(K, 3, 4), (K, 3)]
        assert_close(torch.cat([o.reshape(K, -1) for o in out], dim=1), expected)


def test_rmatmul_uses_adjoint_and_self_adjoint(A_mat):
    S_mat = A_mat.T @ A_mat
    S = SymmetricDense(S_mat, IN_SHAPE, IN_SHAPE)
    assert S.adjoint() is S
    v = rand(3, P_IN)
    assert_close(v @ S, v @ S_mat)


# Adjoint


def test_adjoint_nonsymmetric(A, A_mat):
    AT = A.adjoint()
    assert AT.shape == (P_IN, P_OUT)
    assert AT._in_shape == A._out_shape and AT._out_shape == A._in_shape
    assert_close(dense(AT), A_mat.T)
    # defining property <y, A x> = <A^T y, x>
    x, y = rand(P_IN), rand(P_OUT)
    assert_close(y @ (A @ x), (AT @ y) @ x)


# Arithmetic


@pytest.fixture
def B_mat() -> Tensor:
    return rand(P_OUT, P_IN, seed=1)


@pytest.fixture
def B(B_mat) -> DenseLinearOperator:
    # same total shape as A, but different list structure
    return DenseLinearOperator(B_mat, [(5,), (10,)], [(11,)])


def composites(A, B, A_mat, B_mat):
    """Pairs (operator, expected dense matrix) covering every composite."""
    two = torch.tensor(2.0, dtype=DT)
    return {
        "sum": (A + B, A_mat + B_mat),
        "sum_rev": (B + A, A_mat + B_mat),
        "diff": (A - B, A_mat - B_mat),
        "neg": (-A, -A_mat),
        "int_left": (3 * A, 3 * A_mat),
        "int_right": (A * 3, 3 * A_mat),
        "float": (0.5 * A, 0.5 * A_mat),
        "numpy": (numpy.float64(1.5) * A, 1.5 * A_mat),
        "numpy32": (A * numpy.float32(2.0), 2.0 * A_mat),
        "tensor_left": (two * A, 2.0 * A_mat),
        "tensor_right": (A * two, 2.0 * A_mat),
        "div": (A / 4, A_mat / 4),
        "div_tensor": (A / two, A_mat / 2),
        "nested": (2 * (A - 0.5 * B) / 3 + (-B), 2 * (A_mat - 0.5 * B_mat) / 3 - B_mat),
        "double_scale": (2 * (3 * A), 6 * A_mat),
    }


CASES = [
    "sum",
    "sum_rev",
    "diff",
    "neg",
    "int_left",
    "int_right",
    "float",
    "numpy",
    "numpy32",
    "tensor_left",
    "tensor_right",
    "div",
    "div_tensor",
    "nested",
    "double_scale",
]


@pytest.mark.parametrize("case", CASES)
def test_composite(A, B, A_mat, B_mat, case):
    op, expected = composites(A, B, A_mat, B_mat)[case]
    assert isinstance(op, PyTorchLinearOperator)
    assert op.shape == (P_OUT, P_IN)
    assert op.dtype == DT and op.device == torch.device("cpu")
    assert_close(dense(op), expected)
    # list format of the first operand
    first = B if case == "sum_rev" else A
    assert op._in_shape == first._in_shape and op._out_shape == first._out_shape
    X = rand(P_IN, 2)
    out = op @ to_list(X, first._in_shape)
    assert_close(torch.cat([o.reshape(-1, 2) for o in out]), expected @ X)
    # adjoint and X @ op
    assert_close(dense(op.adjoint()), expected.T)
    V = rand(2, P_OUT)
    assert_close(V @ op, V @ expected)


def test_products_non_square_chain(A, A_mat):
    C_mat, D_mat = rand(P_IN, 7, seed=2), rand(7, 4, seed=3)
    C = DenseLinearOperator(C_mat, [(7,)], [(5, 3)])
    D = DenseLinearOperator(D_mat, [(2, 2)], [(7,)])
    prod = A @ C @ D
    expected = A_mat @ C_mat @ D_mat
    assert prod.shape == (P_OUT, 4)
    assert prod._out_shape == A._out_shape and prod._in_shape == D._in_shape
    assert_close(dense(prod), expected)
    assert_close(prod @ rand(4, seed=4), expected @ rand(4, seed=4))
    # adjoint: D^T C^T A^T
    assert prod.adjoint().shape == (4, P_OUT)
    assert_close(dense(prod.adjoint()), expected.T)
    V = rand(3, P_OUT)
    assert_close(V @ prod, V @ expected)
    # nested chains are flattened, grouping does not matter
    grouped = (A @ C) @ (2.0 * D)
    assert len(grouped._operators) == 3
    assert_close(dense(grouped), 2.0 * expected)
    # product of composites
    both = (A + A) @ (C - C) @ D
    assert_close(dense(both), torch.zeros(P_OUT, 4, dtype=DT))


def test_product_different_structures(A, A_mat):
    # A's in_shape [(3, 4), (3,)] vs. the left factor's in_shape [(11,)]
    L_mat = rand(5, P_OUT, seed=5)
    L = DenseLinearOperator(L_mat, [(P_OUT,)], [(5,)])
    assert_close(dense(L @ A), L_mat @ A_mat)
    x = rand(P_IN)
    assert_close((L @ A) @ to_list(x, IN_SHAPE), [L_mat @ A_mat @ x])


# Identity and damping


def test_identity_int():
    eye = IdentityLinearOperator(6)
    assert eye.shape == (6, 6)
    assert eye._in_shape == [torch.Size((6,))]
    assert eye.dtype == torch.get_default_dtype()
    assert eye.device == torch.device("cpu")
    assert eye.adjoint() is eye
    x = torch.randn(6, 2)
    assert torch.equal(eye @ x, x)


def test_identity_list_shapes():
    params = [torch.zeros(3, 4), torch.zeros(3)]
    eye = IdentityLinearOperator([p.shape for p in params], device="cpu", dtype=DT)
    assert eye.shape == (15, 15) and eye.dtype == DT
    assert eye._in_shape == [torch.Size((3, 4)), torch.Size((3,))]
    xs = [rand(3, 4), rand(3)]
    out = eye @ xs
    for o, x in zip(out, xs, strict=True):
        assert torch.equal(o, x)
    assert_close(dense(eye), torch.eye(15, dtype=DT))


def test_identity_invalid():
    with pytest.raises(ValueError, match=r"single tensor shape; pass a list"):
        IdentityLinearOperator((3, 4))
    with pytest.raises(ValueError, match=r"single tensor shape"):
        IdentityLinearOperator(torch.Size((3, 4)))
    with pytest.raises(ValueError, match=">= 0"):
        IdentityLinearOperator(-1)
    with pytest.raises(TypeError, match="int P or a list of shapes"):
        IdentityLinearOperator("3")


@pytest.fixture
def S_mat() -> Tensor:
    M = rand(P_IN, P_IN, seed=6)
    return M @ M.T  # symmetric PSD


@pytest.fixture
def S(S_mat) -> SymmetricDense:
    return SymmetricDense(S_mat, IN_SHAPE, IN_SHAPE)


def test_damping_different_structures(S, S_mat):
    eye_int = IdentityLinearOperator(P_IN, dtype=DT)
    eye_list = IdentityLinearOperator(IN_SHAPE, dtype=DT)
    expected = S_mat + 1e-3 * torch.eye(P_IN, dtype=DT)
    for damped in (S + 1e-3 * eye_int, S + 1e-3 * eye_list, 1e-3 * eye_int + S):
        assert_close(dense(damped), expected)
        assert_close(dense(damped.adjoint()), expected)
    # first operand's structure
    damped = S + 1e-3 * eye_int
    xs = [rand(3, 4), rand(3)]
    out = damped @ xs
    assert [o.shape for o in out] == [(3, 4), (3,)]
    assert_close(from_list(out), expected @ from_list(xs))
    rev = 1e-3 * eye_int + S
    assert [o.shape for o in rev @ [rand(P_IN)]] == [(P_IN,)]
    # products across structures
    assert_close(dense(eye_int @ S), S_mat)
    assert_close(dense(S @ eye_int @ S), S_mat @ S_mat)


# SciPy export


def test_to_scipy_products(A, A_mat):
    sp = A.to_scipy()
    assert sp.shape == (P_OUT, P_IN)
    assert sp.dtype == numpy.float64
    Am = A_mat.numpy()
    x, y = numpy.random.randn(P_IN), numpy.random.randn(P_OUT)
    X, Y = numpy.random.randn(P_IN, 3), numpy.random.randn(P_OUT, 3)
    tol = {"rtol": 1e-12, "atol": 1e-12}
    out = sp.matvec(x)
    assert out.shape == (P_OUT,) and isinstance(out, numpy.ndarray)
    numpy.testing.assert_allclose(out, Am @ x, **tol)
    out = sp.matvec(x[:, None])
    assert out.shape == (P_OUT, 1)
    numpy.testing.assert_allclose(out[:, 0], Am @ x, **tol)
    numpy.testing.assert_allclose(sp @ X, Am @ X, **tol)
    numpy.testing.assert_allclose(sp.matmat(X), Am @ X, **tol)
    numpy.testing.assert_allclose(sp.rmatvec(y), Am.T @ y, **tol)
    assert sp.rmatvec(y[:, None]).shape == (P_IN, 1)
    numpy.testing.assert_allclose(sp.rmatmat(Y), Am.T @ Y, **tol)
    numpy.testing.assert_allclose(sp.T @ y, Am.T @ y, **tol)
    numpy.testing.assert_allclose(
        sp.matmat(numpy.zeros((P_IN, 0))), numpy.zeros((P_OUT, 0))
    )
    # read-only and non-contiguous inputs
    ro = x.copy()
    ro.flags.writeable = False
    numpy.testing.assert_allclose(sp.matvec(ro), Am @ x, **tol)
    numpy.testing.assert_allclose(sp.matmat(X[:, ::2]), Am @ X[:, ::2], **tol)


def test_to_scipy_eigsh(S, S_mat):
    evals, evecs = eigsh(S.to_scipy(), k=3, which="LA")
    expected = numpy.linalg.eigh(S_mat.numpy())[0][-3:]
    numpy.testing.assert_allclose(numpy.sort(evals), expected, rtol=1e-10)
    Sm = S_mat.numpy()
    numpy.testing.assert_allclose(Sm @ evecs, evecs * evals, atol=1e-8)


def test_to_scipy_cg(S, S_mat):
    op = S + IdentityLinearOperator(P_IN, dtype=DT)
    b = numpy.random.randn(P_IN)
    x, info = cg(op.to_scipy(), b, rtol=1e-12, atol=0.0, maxiter=1000)
    assert info == 0
    expected = numpy.linalg.solve(S_mat.numpy() + numpy.eye(P_IN), b)
    numpy.testing.assert_allclose(x, expected, rtol=1e-8, atol=1e-8)


def test_to_scipy_float32(A_mat):
    op = DenseLinearOperator(A_mat.float(), IN_SHAPE, OUT_SHAPE)
    x = numpy.random.randn(P_IN)
    sp = op.to_scipy()
    assert sp.dtype == numpy.float32
    out = sp.matvec(x)
    assert out.dtype == numpy.float32
    numpy.testing.assert_allclose(out, A_mat.numpy() @ x, rtol=1e-4, atol=1e-4)
    sp64 = op.to_scipy(dtype=numpy.float64)
    assert sp64.dtype == numpy.float64
    out = sp64.matvec(x)
    assert out.dtype == numpy.float64
    numpy.testing.assert_allclose(out, A_mat.numpy() @ x, rtol=1e-4, atol=1e-4)
    y = numpy.random.randn(P_OUT).astype(numpy.float32)
    numpy.testing.assert_allclose(
        sp.rmatvec(y), A_mat.numpy().T @ y, rtol=1e-4, atol=1e-4
    )


def test_to_scipy_bfloat16(A_mat):
    op = DenseLinearOperator(A_mat.bfloat16(), IN_SHAPE, OUT_SHAPE)
    sp = op.to_scipy()
    assert sp.dtype == numpy.float32
    out = sp.matvec(numpy.ones(P_IN))
    assert out.dtype == numpy.float32 and out.shape == (P_OUT,)
    numpy.testing.assert_allclose(out, A_mat.numpy().sum(1), rtol=5e-2, atol=5e-2)


def test_to_scipy_keeps_grad_enabled_and_detaches(A_mat):
    seen = []

    class Recording(DenseLinearOperator):
        def _matmat(self, M):
            seen.append(torch.is_grad_enabled())
            return super()._matmat(M)

    op = Recording(A_mat.clone().requires_grad_(True), IN_SHAPE, OUT_SHAPE)
    out = op.to_scipy().matvec(numpy.ones(P_IN))
    assert seen == [True]
    assert isinstance(out, numpy.ndarray)


# Errors


def test_vector_format_error_is_value_and_type_error():
    assert issubclass(VectorFormatError, ValueError)
    assert issubclass(VectorFormatError, TypeError)


@pytest.mark.parametrize("shape", [(P_IN + 1,), (P_IN, 2, 1), (), (2, P_IN)], ids=str)
def test_error_tensor_shape(A, shape):
    with pytest.raises(
        VectorFormatError,
        match=r"expected a tensor of shape \(15,\) or \(15, K\) with P_in=15, or a "
        r"list of tensors shaped like \[\(3, 4\), \(3,\)\] \(optionally with a "
        r"trailing column axis K\); got a tensor of shape",
    ):
        A @ rand(*shape)


def test_error_tensor_shape_rmatmul(A):
    with pytest.raises(
        VectorFormatError,
        match=r"X @ A: expected a tensor of shape \(11,\) or \(K, 11\)",
    ):
        rand(P_OUT, 2) @ A


def test_error_hint_wrap_in_list(A_mat):
    op = DenseLinearOperator(A_mat[:, :12], [(3, 4)], [(P_OUT,)])
    with pytest.raises(VectorFormatError, match=r"wrap it in a list: \[X\]"):
        op @ rand(3, 4)


def test_error_list_shape(A):
    with pytest.raises(
        VectorFormatError,
        match=r"got a list of 2 tensors with shapes \[\(3, 4\), \(4,\)\]\. Either all "
        r"entries have exactly these shapes, or all have them plus a trailing",
    ):
        A @ [rand(3, 4), rand(4)]
    # mixing vector and matrix entries
    with pytest.raises(VectorFormatError, match="Either all entries"):
        A @ [rand(3, 4, 2), rand(3)]


def test_error_list_length(A):
    with pytest.raises(
        VectorFormatError, match=r"got a list of 1 tensors.*needs exactly 2 entries"
    ):
        A @ [rand(3, 4)]
    with pytest.raises(VectorFormatError, match="needs exactly 2 entries"):
        A @ []


def test_error_list_mismatched_k(A):
    with pytest.raises(VectorFormatError, match=r"column axes differ \(K = \[2, 3\]\)"):
        A @ [rand(3, 4, 2), rand(3, 3)]


def test_error_dtype(A):
    with pytest.raises(
        VectorFormatError,
        match=r"X has dtype torch.float32, but the operator has dtype torch.float64. "
        r"Convert it with X.to\(torch.float64\)",
    ):
        A @ torch.ones(P_IN)
    with pytest.raises(
        VectorFormatError, match=r"entry 1 of X has dtype torch.float32"
    ):
        A @ [rand(3, 4), torch.ones(3)]
    with pytest.raises(VectorFormatError, match=r"X @ A: X has dtype torch.float32"):
        torch.ones(P_OUT) @ A


def test_error_device(A):
    meta = torch.ones(P_IN, dtype=DT, device="meta")
    with pytest.raises(
        VectorFormatError,
        match=r"X is on device 'meta', but the operator is on device 'cpu'. Move it "
        r"with X.to\('cpu'\)",
    ):
        A @ meta
    with pytest.raises(VectorFormatError, match="entry 0 of X is on device 'meta'"):
        A @ [torch.ones(3, 4, dtype=DT, device="meta"), rand(3)]
    with pytest.raises(VectorFormatError, match="is on device 'meta'"):
        torch.ones(P_OUT, dtype=DT, device="meta") @ A


def test_error_not_a_tensor(A):
    with pytest.raises(
        VectorFormatError, match=r"got an object of type numpy.ndarray. Convert it"
    ):
        A @ numpy.ones(P_IN)
    with pytest.raises(VectorFormatError, match=r"to_scipy\(\)"):
        numpy.ones(P_OUT) @ A
    with pytest.raises(VectorFormatError, match="object of type builtins.int"):
        A.matvec(3)
    with pytest.raises(
        VectorFormatError, match="entry 1 has type numpy.ndarray, not torch.Tensor"
    ):
        A @ [rand(3, 4), numpy.ones(3)]
    with pytest.raises(TypeError):  # catching TypeError works as well
        A @ "x"
    with pytest.raises(VectorFormatError, match="use A @ B"):
        A.matmat(A.adjoint())


def test_error_incompatible_sum_and_product(A, A_mat):
    C = DenseLinearOperator(rand(P_OUT, 4))
    with pytest.raises(
        ValueError, match=r"Cannot add operators of shapes \(11, 15\) and \(11, 4\)"
    ):
        A + C
    with pytest.raises(ValueError, match=r"need A.shape == B.shape"):
        A - C
    with pytest.raises(
        ValueError,
        match=r"Cannot multiply operators of shapes \(11, 15\) and \(11, 4\): A @ B "
        r"needs A.shape\[1\] == B.shape\[0\]",
    ):
        A @ C
    A32 = DenseLinearOperator(A_mat.float(), IN_SHAPE, OUT_SHAPE)
    with pytest.raises(ValueError, match="dtypes torch.float64 and torch.float32"):
        A + A32
    with pytest.raises(ValueError, match="dtypes"):
        A.adjoint() @ A32
    with pytest.raises(ValueError, match="devices 'cpu' and 'meta'"):
        A @ IdentityLinearOperator(P_IN, device="meta", dtype=DT)


def test_error_non_operator_arithmetic(A):
    with pytest.raises(TypeError):
        A + 1.0
    with pytest.raises(TypeError):
        1.0 + A
    with pytest.raises(TypeError):
        A - rand(P_OUT, P_IN)
    with pytest.raises(TypeError):
        rand(3) * A
    with pytest.raises(TypeError):
        A * "2"
    with pytest.raises(TypeError):
        A / A
    with pytest.raises(TypeError):
        2.0 / A


def test_error_missing_adjoint(A_mat):
    op = NoAdjoint(A_mat, IN_SHAPE, OUT_SHAPE)
    msg = r"NoAdjoint does not define its adjoint: implement `_adjoint\(\)`"
    with pytest.raises(NotImplementedError, match=msg):
        op.adjoint()
    with pytest.raises(NotImplementedError, match=msg):
        rand(P_OUT) @ op
    with pytest.raises(NotImplementedError, match=msg):
        (2 * op + op).adjoint()
    with pytest.raises(NotImplementedError, match=msg):
        op.to_scipy().rmatvec(numpy.ones(P_OUT))
    # forward products still work
    assert_close(op @ rand(P_IN, seed=7), A_mat @ rand(P_IN, seed=7))


def test_error_bad_subclass_output(A_mat):
    class Broken(DenseLinearOperator):
        def _matmat(self, M):
            return [m for m in M]

    op = Broken(A_mat, IN_SHAPE, OUT_SHAPE)
    with pytest.raises(
        RuntimeError, match=r"Broken._matmat returned .* fix the subclass"
    ):
        op @ rand(P_IN)
