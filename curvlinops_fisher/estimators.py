r"""Randomized estimators of the trace, diagonal and Frobenius norm of an operator.

Every estimator only multiplies the operator :math:`\mathbf{A} \in \mathbb{R}^{P
\times P}` (:math:`P_\text{out} \times P_\text{in}` for the Frobenius norm) onto random
probe vectors. It spends a budget of ``num_matvecs`` products, i.e. columns of
``A @ X``, and never more; each docstring states the exact count.

All probes of one stage are drawn at once and multiplied in *one* call ``A @ X`` with
many columns, because the columns of a curvature operator's product share one pass over
the data. The keyword ``max_block`` caps the columns per call (to bound memory): the
probes are still drawn at once, so the result does not depend on ``max_block`` (up to
floating-point rounding).

Randomness comes only from ``generator`` (a ``torch.Generator``; probes are drawn on
its device, then moved to the operator's device, so a CPU generator gives the same
probes for operators on any device). With ``generator=None``, every call draws fresh
probes from PyTorch's global random number generator on the operator's device, so
results follow ``torch.manual_seed``; the probes are then drawn exactly as curvlinops
3.0.1 draws them (one vector at a time), so under the same seed both libraries use the
same probes.

Call forms of curvlinops 3.0.1 are accepted as well: the operator ``A`` may be a plain
tensor (square, or rectangular for :func:`hutchinson_squared_fro`), and the probe
distribution is chosen with ``distribution="rademacher"`` (random signs),
``"normal"`` (standard Gaussian) or ``"sphere"`` (Gaussian directions scaled to norm
:math:`\sqrt{P}`), also given positionally in place of ``generator`` as in
``hutchinson_trace(A, 10, "normal")``. All three satisfy
:math:`\mathbb{E}[\boldsymbol\omega \boldsymbol\omega^\top] = \mathbf{I}`, so every
estimator stays unbiased. The default is ``"rademacher"``, except for :func:`xtrace`
(``"sphere"``).

The estimators are for real-valued operators. Their results are tensors on
``A.device`` with ``A.dtype``.

References:
    - Hutchinson, M. F. (1989). A stochastic estimator of the trace of the influence
      matrix for Laplacian smoothing splines.
    - Bekas, C., Kokiopoulou, E., & Saad, Y. (2007). An estimator for the diagonal of a
      matrix.
    - Meyer, R. A., Musco, C., Musco, C., & Woodruff, D. P. (2021). Hutch++: Optimal
      stochastic trace estimation. SOSA.
    - Epperly, E. N., Tropp, J. A., & Webber, R. J. (2024). XTrace: making the most of
      every sample in stochastic trace estimation. SIAM J. Matrix Anal. Appl.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from curvlinops_fisher.linop import PyTorchLinearOperator

__all__ = [
    "hutchinson_diag",
    "hutchinson_squared_fro",
    "hutchinson_trace",
    "hutchpp_trace",
    "xdiag",
    "xtrace",
]

#: Probe distributions: random signs, standard Gaussian entries, or Gaussian directions
#: scaled to norm ``sqrt(P)``.
Distribution = Literal["rademacher", "normal", "sphere"]
DISTRIBUTIONS = ("rademacher", "normal", "sphere")

#: What the estimators accept as operator: a linear operator or a plain matrix.
Operator = PyTorchLinearOperator | Tensor


# Argument checks


def _check_num_matvecs(
    name: str, num_matvecs: object, minimum: int = 1, even: bool = False
) -> int:
    """Check the budget of matrix-vector products.

    Args:
        name: The estimator's name, for error messages.
        num_matvecs: The budget to check.
        minimum: The smallest allowed budget.
        even: Whether the budget must be even.

    Returns:
        The budget as ``int``.

    Raises:
        ValueError: If ``num_matvecs`` is not an int, is below ``minimum``, or is odd
            although ``even``.
    """
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, numbers.Integral):
        raise ValueError(
            f"{name}: num_matvecs must be a positive int; got {num_matvecs!r}."
        )
    if num_matvecs < minimum:
        raise ValueError(
            f"{name}: num_matvecs must be at least {minimum}; got {num_matvecs}."
        )
    if even and num_matvecs % 2 != 0:
        raise ValueError(
            f"{name}: num_matvecs must be even (half of the budget draws probes, the "
            f"other half multiplies their basis); got {num_matvecs}."
        )
    return int(num_matvecs)


def _check_max_block(name: str, max_block: object) -> int | None:
    """Check the cap on the columns per operator call.

    Args:
        name: The estimator's name, for error messages.
        max_block: ``None`` (no cap) or a positive int.

    Returns:
        ``max_block`` as ``int`` or ``None``.

    Raises:
        ValueError: If ``max_block`` is neither ``None`` nor a positive int.
    """
    if max_block is None:
        return None
    if (
        isinstance(max_block, bool)
        or not isinstance(max_block, numbers.Integral)
        or max_block < 1
    ):
        raise ValueError(
            f"{name}: max_block must be None or a positive int; got {max_block!r}."
        )
    return int(max_block)


def _check_operator(name: str, A: object, square: bool) -> None:
    """Check that ``A`` is a linear operator or a matrix, square if required.

    Args:
        name: The estimator's name, for error messages.
        A: The operator to check: a ``PyTorchLinearOperator`` or a 2-D floating-point
            tensor.
        square: Whether the operator must be square.

    Raises:
        TypeError: If ``A`` is neither a ``PyTorchLinearOperator`` nor a tensor.
        ValueError: If ``A`` is a tensor that is not a floating-point matrix, or if
            ``square`` and ``A`` is not square.
    """
    if isinstance(A, Tensor):
        if A.ndim != 2 or not A.is_floating_point():
            raise ValueError(
                f"{name}: a tensor A must be a floating-point matrix; got shape "
                f"{tuple(A.shape)} and dtype {A.dtype}."
            )
    elif not isinstance(A, PyTorchLinearOperator):
        raise TypeError(
            f"{name}: A must be a PyTorchLinearOperator or a 2-D tensor; got "
            f"{type(A).__name__}."
        )
    if square and A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} needs a square operator; got shape {tuple(A.shape)}.")


def _check_generator(name: str, generator: object) -> torch.Generator | None:
    """Check that ``generator`` is ``None`` or a ``torch.Generator``.

    Args:
        name: The estimator's name, for error messages.
        generator: The object to check.

    Returns:
        ``generator``.

    Raises:
        TypeError: If ``generator`` is neither ``None`` nor a ``torch.Generator``.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{name}: generator must be a torch.Generator or None; got "
            f"{type(generator).__name__}."
        )
    return generator


def _resolve_generator(name: str, generator: object) -> torch.Generator:
    """Return a generator to draw from, creating one if ``generator`` is ``None``.

    Args:
        name: The caller's name, for error messages.
        generator: A ``torch.Generator``, or ``None`` for a fresh CPU generator seeded
            with one ``torch.randint`` draw from the global random number generator.

    Returns:
        The generator.
    """
    if _check_generator(name, generator) is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator().manual_seed(seed)
    return generator


def _check_sampling(
    name: str, generator: object, distribution: object, default: Distribution
) -> tuple[torch.Generator | None, Distribution]:
    """Check the source and distribution of the probes.

    Args:
        name: The estimator's name, for error messages.
        generator: A ``torch.Generator``, ``None`` (PyTorch's global generator), or a
            distribution's name (curvlinops' positional form ``f(A, num_matvecs,
            distribution)``).
        distribution: ``"rademacher"``, ``"normal"``, ``"sphere"``, or ``None`` for
            ``default``.
        default: The estimator's default distribution.

    Returns:
        The generator (or ``None``) and the distribution.

    Raises:
        TypeError: If ``generator`` is of the wrong type, or the distribution is given
            twice.
        ValueError: If the distribution is unknown.
    """
    if isinstance(generator, str):
        if distribution is not None:
            raise TypeError(
                f"{name}: the distribution is given twice ({generator!r} in place of "
                f"generator, and distribution={distribution!r})."
            )
        generator, distribution = None, generator
    if distribution is None:
        distribution = default
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"{name}: distribution must be one of {', '.join(map(repr, DISTRIBUTIONS))}"
            f"; got {distribution!r}."
        )
    return _check_generator(name, generator), distribution


def _prepare(
    name: str,
    A: object,
    num_matvecs: object,
    generator: object,
    distribution: object,
    max_block: object,
    square: bool = True,
    minimum: int = 1,
    even: bool = False,
    default: Distribution = "rademacher",
) -> tuple[int, torch.Generator | None, Distribution, int | None]:
    """Check an estimator's arguments (before any random number is drawn).

    Args:
        name: The estimator's name, for error messages.
        A: The operator.
        num_matvecs: The budget of products.
        generator: The generator, ``None``, or a distribution's name.
        distribution: The probe distribution or ``None`` for ``default``.
        max_block: The cap on columns per operator call, or ``None``.
        square: Whether the operator must be square.
        minimum: The smallest allowed budget.
        even: Whether the budget must be even.
        default: The estimator's default distribution.

    Returns:
        The budget, the generator (``None``: the global one), the distribution, and
        ``max_block``.
    """
    _check_operator(name, A, square)
    num_matvecs = _check_num_matvecs(name, num_matvecs, minimum=minimum, even=even)
    max_block = _check_max_block(name, max_block)
    generator, distribution = _check_sampling(name, generator, distribution, default)
    return num_matvecs, generator, distribution, max_block


# Probes and products


def _draw_probes(
    A: Operator,
    num_probes: int,
    generator: torch.Generator | None,
    distribution: Distribution,
) -> Tensor:
    r"""Draw a block of probe vectors for the operator's input space, one at a time.

    Each probe is drawn like curvlinops 3.0.1's ``random_vector``, so with
    ``generator=None`` both libraries draw the same probes from the global generator.

    Args:
        A: The operator (its input dimension :math:`P`, dtype and device are used).
        num_probes: The number of probes :math:`K \ge 1`.
        generator: The generator; the probes are drawn on its device, then moved.
            ``None``: PyTorch's global generator, on ``A.device``.
        distribution: ``"rademacher"``: independent signs :math:`\pm 1`;
            ``"normal"``: independent standard normal entries; ``"sphere"``: uniform
            on the sphere of radius :math:`\sqrt{P}`. All have
            :math:`\mathbb{E}[\boldsymbol\omega \boldsymbol\omega^\top] = \mathbf{I}`.

    Returns:
        The probes as columns of a ``[P, K]`` matrix on ``A.device``.
    """
    dim = A.shape[1]
    device = A.device if generator is None else generator.device
    kwargs = {"device": device, "dtype": A.dtype}

    def draw() -> Tensor:
        if distribution == "rademacher":
            v = torch.empty(dim, **kwargs).bernoulli_(0.5, generator=generator)
            return v.mul_(2).sub_(1)
        v = torch.randn(dim, generator=generator, **kwargs)
        if distribution != "sphere":
            return v
        # A pairwise sum of squares: ``v.norm()``'s single-precision accumulators
        # lose 1e-3 relative on 25 million float32 entries, this 1e-8.
        return v * (math.sqrt(dim) / v.square().sum().sqrt())

    return torch.stack([draw() for _ in range(num_probes)], dim=1).to(A.device)


def _apply_blockwise(A: Operator, X: Tensor, max_block: int | None) -> Tensor:
    """Multiply the operator onto the columns of ``X``, at most ``max_block`` at a time.

    Args:
        A: The operator.
        X: Matrix of shape ``[P_in, K]``.
        max_block: The most columns per call ``A @ X``; ``None`` for one call.

    Returns:
        ``A @ X`` of shape ``[P_out, K]`` (no call at all if ``K = 0``).
    """
    num_cols = X.shape[1]
    if num_cols == 0:
        return X.new_zeros(A.shape[0], 0)
    if max_block is None or max_block >= num_cols:
        return A @ X
    return torch.cat([A @ block for block in X.split(max_block, dim=1)], dim=1)


def _mean_quadratic_form(V: Tensor, AV: Tensor) -> Tensor:
    r"""Average the quadratic forms :math:`\mathbf{v}_j^\top \mathbf{A} \mathbf{v}_j`.

    Args:
        V: Probes as columns, shape ``[P, K]`` with ``K >= 1``.
        AV: Their products ``A @ V``.

    Returns:
        :math:`\frac{1}{K} \sum_j \mathbf{v}_j^\top \mathbf{A} \mathbf{v}_j`.
    """
    # torch.sum adds pairwise (CPU) or in a tree (CUDA): 1e-7 relative on 67 million
    # float32 products, where a norm or dot product loses up to 1e-2.
    return (V * AV).sum() / V.shape[1]


# Leave-one-out sketch shared by XTrace and XDiag


@dataclass(frozen=True)
class _Sketch:
    r"""A sketch :math:`\mathbf{Y} = \mathbf{A}\boldsymbol\Omega` and its leave-one-out bases.

    For probe :math:`i`, :math:`\mathbf{Q}_{(i)}` is an orthonormal basis of the range
    of :math:`\mathbf{Y}` without its column :math:`i`; it is represented by the
    rank-one downdate
    :math:`\mathbf{Q}_{(i)} \mathbf{Q}_{(i)}^\top = \mathbf{Q} (\mathbf{I} - \mathbf{s}_i
    \mathbf{s}_i^\top) \mathbf{Q}^\top`.

    Attributes:
        probes: :math:`\boldsymbol\Omega`, shape ``[P, m]``.
        products: :math:`\mathbf{Y} = \mathbf{A}\boldsymbol\Omega`, shape ``[P, m]``.
        basis: :math:`\mathbf{Q}`, orthonormal basis of the range of :math:`\mathbf{Y}`,
            shape ``[P, k]`` with :math:`k = \operatorname{rank}(\mathbf{Y})`.
        coords: :math:`\mathbf{Q}^\top \mathbf{Y}`, shape ``[k, m]``.
        downdates: :math:`\mathbf{S} = [\mathbf{s}_1, \dots, \mathbf{s}_m]`, shape
            ``[k, m]``; unit vectors, or zero where dropping probe :math:`i` keeps the
            range (then :math:`\mathbf{Q}_{(i)} = \mathbf{Q}`).
        dims: :math:`d_i = \operatorname{rank}(\mathbf{Q}_{(i)})`, shape ``[m]``.
    """

    probes: Tensor
    products: Tensor
    basis: Tensor
    coords: Tensor
    downdates: Tensor
    dims: Tensor


def _sketch(
    A: Operator,
    num_probes: int,
    generator: torch.Generator | None,
    distribution: Distribution,
    max_block: int | None,
) -> _Sketch:
    r"""Draw probes, multiply them, and compute the leave-one-out bases.

    With the QR decomposition :math:`\mathbf{Y} = \mathbf{Q}_0 \mathbf{R}` and the SVD
    :math:`\mathbf{R} = \mathbf{U} \boldsymbol\Sigma \mathbf{V}^\top` truncated to the
    numerical rank :math:`k`, :math:`\mathbf{Q} = \mathbf{Q}_0 \mathbf{U}_k` and
    :math:`\mathbf{Q}^\top \mathbf{Y} = \boldsymbol\Sigma_k \mathbf{V}_k^\top`. Dropping
    column :math:`i` lowers the rank iff its leverage
    :math:`h_i = \|\mathbf{V}_k^\top \mathbf{e}_i\|^2` is one; then the dropped direction
    is :math:`\mathbf{s}_i \propto \boldsymbol\Sigma_k^{-1} \mathbf{V}_k^\top
    \mathbf{e}_i`, which is orthogonal to all other columns of
    :math:`\mathbf{Q}^\top\mathbf{Y}` (for full column rank this is the paper's
    :math:`\mathbf{R}^{-\top}\mathbf{e}_i`, normalized). If :math:`k = P`, the sketch
    spans the whole space and no downdate is applied (:math:`\mathbf{S} = \mathbf{0}`),
    which makes the estimates exact. Numerical tolerances: :math:`k` counts the singular
    values above :math:`\max(P, m)\,\varepsilon\,\sigma_1`, and column :math:`i` counts as
    essential if :math:`h_i > 1 - \sqrt{\varepsilon}` (machine epsilon
    :math:`\varepsilon` of the dtype).

    Args:
        A: The square operator.
        num_probes: The number of probes :math:`m`.
        generator: The generator.
        distribution: The probe distribution.
        max_block: The most columns per call ``A @ X``.

    Returns:
        The sketch; it costs :math:`m` products.
    """
    probes = _draw_probes(A, num_probes, generator, distribution)
    products = _apply_blockwise(A, probes, max_block)
    Q0, R = torch.linalg.qr(products)
    U, sigma, Vh = torch.linalg.svd(R, full_matrices=False)
    dim, eps = A.shape[0], torch.finfo(products.dtype).eps
    rank = int((sigma > max(dim, num_probes) * eps * sigma[0]).sum())
    U, sigma, Vh = U[:, :rank], sigma[:rank], Vh[:rank]
    essential = (Vh.square().sum(0) > 1 - math.sqrt(eps)) & (rank < dim)
    downdates = torch.nn.functional.normalize(Vh / sigma[:, None], dim=0)
    return _Sketch(
        probes=probes,
        products=products,
        basis=Q0 @ U,
        coords=sigma[:, None] * Vh,
        downdates=downdates * essential,
        dims=rank - essential.to(products.dtype),
    )


def _downdate(S: Tensor, X: Tensor) -> Tensor:
    r"""Apply :math:`\mathbf{I} - \mathbf{s}_i \mathbf{s}_i^\top` to each column.

    Args:
        S: The vectors :math:`\mathbf{s}_i` as columns, shape ``[k, m]``.
        X: The vectors :math:`\mathbf{x}_i` as columns, shape ``[k, m]``.

    Returns:
        The columns :math:`\mathbf{x}_i - (\mathbf{s}_i^\top \mathbf{x}_i)\mathbf{s}_i`.
    """
    return X - S * (S * X).sum(0)


# Trace estimators


def hutchinson_trace(
    A: Operator,
    num_matvecs: int,
    generator: torch.Generator | str | None = None,
    *,
    distribution: Distribution | None = None,
    max_block: int | None = None,
) -> Tensor:
    r"""Estimate the trace with Hutchinson's method (Rademacher probes).

    .. math::
        \widehat{\operatorname{tr}}(\mathbf{A}) = \frac{1}{K} \sum_{j=1}^K
        \mathbf{v}_j^\top \mathbf{A} \mathbf{v}_j,
        \qquad \mathbf{v}_j \in \{\pm 1\}^P \text{ i.i.d. uniform}.

    Unbiased, with variance :math:`\frac{2}{K} \sum_{i \ne j} A_{ij}^2` for symmetric
    :math:`\mathbf{A}`; exact for diagonal :math:`\mathbf{A}`.

    Products: exactly ``num_matvecs`` columns, in one call ``A @ V``.

    Args:
        A: A square linear operator of shape ``(P, P)``.
        num_matvecs: The number of probes :math:`K \ge 1`.
        generator: Source of the probes. ``None``: PyTorch's global generator (fresh
            probes on every call; results follow ``torch.manual_seed``). A
            distribution's name here is curvlinops' positional ``distribution``.
        distribution: ``"rademacher"``, ``"normal"`` or ``"sphere"`` (see the module
            docstring). ``None``: ``"rademacher"``.
        max_block: The most columns per call ``A @ X``. ``None``: all at once.

    Returns:
        The estimate, a scalar tensor on ``A.device`` with ``A.dtype``.

    Raises:
        ValueError: If ``A`` is not square or ``num_matvecs`` is not a positive int.
    """
    num_matvecs, generator, distribution, max_block = _prepare(
        "hutchinson_trace", A, num_matvecs, generator, distribution, max_block
    )
    V = _draw_probes(A, num_matvecs, generator, distribution)
    return _mean_quadratic_form(V, _apply_blockwise(A, V, max_block))


def hutchpp_trace(
    A: Operator,
    num_matvecs: int,
    generator: torch.Generator | str | None = None,
    *,
    distribution: Distribution | None = None,
    max_block: int | None = None,
) -> Tensor:
    r"""Estimate the trace with Hutch++ (Meyer et al., 2021).

    With :math:`s = \lfloor K / 3 \rfloor` sketch probes :math:`\mathbf{S}` and
    :math:`g = K - 2s \ge s` Hutchinson probes :math:`\mathbf{G}` (all Rademacher),
    :math:`\mathbf{Q}` an orthonormal basis of :math:`\mathbf{A}\mathbf{S}` and the
    deflated probes :math:`\tilde{\mathbf{G}} = (\mathbf{I} - \mathbf{Q}\mathbf{Q}^\top)
    \mathbf{G}`,

    .. math::
        \widehat{\operatorname{tr}}(\mathbf{A})
        = \operatorname{tr}(\mathbf{Q}^\top \mathbf{A} \mathbf{Q})
        + \frac{1}{g} \operatorname{tr}(\tilde{\mathbf{G}}^\top \mathbf{A}
        \tilde{\mathbf{G}}).

    Unbiased, since :math:`\mathbf{G}` is independent of :math:`\mathbf{Q}` and
    :math:`\operatorname{tr}(\mathbf{A}) = \operatorname{tr}(\mathbf{Q}^\top\mathbf{A}
    \mathbf{Q}) + \operatorname{tr}((\mathbf{I} - \mathbf{Q}\mathbf{Q}^\top)\mathbf{A}
    (\mathbf{I} - \mathbf{Q}\mathbf{Q}^\top))`. The second term removes the top of the
    spectrum from Hutchinson's variance, which helps for fast-decaying spectra. Exact (to
    rounding) if :math:`s \ge P`, because then :math:`\mathbf{Q}` is a square
    orthogonal matrix.

    Products: :math:`s + \min(s, P) + g \le` ``num_matvecs`` columns (exactly
    ``num_matvecs`` if :math:`s \le P`), in two calls: ``A @ S``, then
    ``A @ [Q, G~]``.

    Args:
        A: A square linear operator of shape ``(P, P)``.
        num_matvecs: The budget :math:`K \ge 3`.
        generator: Source of the probes. ``None``: PyTorch's global generator (fresh
            probes on every call; results follow ``torch.manual_seed``). A
            distribution's name here is curvlinops' positional ``distribution``.
        distribution: ``"rademacher"``, ``"normal"`` or ``"sphere"`` (see the module
            docstring). ``None``: ``"rademacher"``.
        max_block: The most columns per call ``A @ X``. ``None``: all of a stage at
            once.

    Returns:
        The estimate, a scalar tensor on ``A.device`` with ``A.dtype``.

    Raises:
        ValueError: If ``A`` is not square or ``num_matvecs`` is not an int
            :math:`\ge 3`.
    """
    num_matvecs, generator, distribution, max_block = _prepare(
        "hutchpp_trace", A, num_matvecs, generator, distribution, max_block, minimum=3
    )
    num_sketch = num_matvecs // 3
    num_hutch = num_matvecs - 2 * num_sketch
    S, G = _draw_probes(A, num_sketch + num_hutch, generator, distribution).split(
        [num_sketch, num_hutch], dim=1
    )
    Q, _ = torch.linalg.qr(_apply_blockwise(A, S, max_block))
    G_deflated = G - Q @ (Q.T @ G)
    AQ, AG = _apply_blockwise(A, torch.cat([Q, G_deflated], dim=1), max_block).split(
        [Q.shape[1], num_hutch], dim=1
    )
    return (Q * AQ).sum() + _mean_quadratic_form(G_deflated, AG)


def xtrace(
    A: Operator,
    num_matvecs: int,
    generator: torch.Generator | str | None = None,
    *,
    distribution: Distribution | None = None,
    max_block: int | None = None,
) -> Tensor:
    r"""Estimate the trace with XTrace (Epperly, Tropp & Webber, 2024).

    XTrace is the exchangeable version of Hutch++: every one of the
    :math:`m = K / 2` probes :math:`\boldsymbol\omega_i` (by default uniform on the
    sphere of radius :math:`\sqrt{P}`) serves both in the sketch :math:`\mathbf{Y} =
    \mathbf{A}\boldsymbol\Omega` and as a Hutchinson probe. With
    :math:`\mathbf{Q}_{(i)}` an orthonormal basis of :math:`\mathbf{Y}` without column
    :math:`i` (dimension :math:`d_i`, generically :math:`\min(m - 1, \operatorname{rank}
    \mathbf{A})`) and the deflated probe
    :math:`\mathbf{x}_i = (\mathbf{I} - \mathbf{Q}_{(i)} \mathbf{Q}_{(i)}^\top)
    \boldsymbol\omega_i`,

    .. math::
        \widehat{\operatorname{tr}}(\mathbf{A}) = \frac{1}{m} \sum_{i=1}^m \left[
        \operatorname{tr}(\mathbf{Q}_{(i)}^\top \mathbf{A} \mathbf{Q}_{(i)})
        + w_i\, \mathbf{x}_i^\top \mathbf{A} \mathbf{x}_i \right],
        \qquad w_i = \frac{P - d_i}{\|\mathbf{x}_i\|^2}
        \text{ for } \texttt{"sphere"}, \quad w_i = 1 \text{ otherwise}.

    Unbiased: :math:`\mathbf{Q}_{(i)}` is independent of :math:`\boldsymbol\omega_i`.
    For ``"sphere"`` (the normalized variant of the paper), the direction of
    :math:`\boldsymbol\omega_i` is uniform, so :math:`\sqrt{P - d_i}\,\mathbf{x}_i /
    \|\mathbf{x}_i\|` has second moment :math:`\mathbf{I} - \mathbf{Q}_{(i)}
    \mathbf{Q}_{(i)}^\top`; for ``"rademacher"`` and ``"normal"`` (curvlinops' form),
    :math:`\mathbb{E}[\boldsymbol\omega_i \boldsymbol\omega_i^\top] = \mathbf{I}`
    gives the same second moment for :math:`\mathbf{x}_i` itself.

    Efficient formulation (the paper's algorithm): one QR decomposition of
    :math:`\mathbf{Y}` gives :math:`\mathbf{Q}`, and every leave-one-out basis is the
    rank-one downdate :math:`\mathbf{Q}_{(i)}\mathbf{Q}_{(i)}^\top = \mathbf{Q}
    (\mathbf{I} - \mathbf{s}_i \mathbf{s}_i^\top) \mathbf{Q}^\top`. With
    :math:`\mathbf{H} = \mathbf{Q}^\top \mathbf{A} \mathbf{Q}` and
    :math:`\mathbf{u}_i = (\mathbf{I} - \mathbf{s}_i \mathbf{s}_i^\top) \mathbf{Q}^\top
    \boldsymbol\omega_i`: :math:`\operatorname{tr}(\mathbf{Q}_{(i)}^\top \mathbf{A}
    \mathbf{Q}_{(i)}) = \operatorname{tr}(\mathbf{H}) - \mathbf{s}_i^\top \mathbf{H}
    \mathbf{s}_i`, :math:`\mathbf{x}_i = \boldsymbol\omega_i - \mathbf{Q}\mathbf{u}_i`
    and :math:`\mathbf{A}\mathbf{x}_i = \mathbf{y}_i - (\mathbf{A}\mathbf{Q})
    \mathbf{u}_i`, so only :math:`\mathbf{A}\boldsymbol\Omega` and
    :math:`\mathbf{A}\mathbf{Q}` are needed. The vectors :math:`\mathbf{s}_i` come from
    an SVD of the small triangular factor (not its inverse), which also covers a
    rank-deficient sketch and :math:`m > P`.

    Exactness: the estimate equals :math:`\operatorname{tr}(\mathbf{A})` (to rounding)
    almost surely if :math:`m \ge P` (``num_matvecs >= 2 P``), for any
    :math:`\mathbf{A}`. Either the sketch spans the whole space (invertible
    :math:`\mathbf{A}`); then no probe is left out and the estimate is
    :math:`\operatorname{tr}(\mathbf{Q}^\top \mathbf{A} \mathbf{Q})` with a square
    orthogonal :math:`\mathbf{Q}`. Or every :math:`\mathbf{Q}_{(i)}` spans the range of
    :math:`\mathbf{A}` (generically when :math:`m > \operatorname{rank}\mathbf{A}`, so
    also for small :math:`m` if :math:`\mathbf{A}` has low rank); then
    :math:`(\mathbf{I} - \mathbf{Q}_{(i)}\mathbf{Q}_{(i)}^\top)\mathbf{A} = \mathbf{0}`,
    the Hutchinson term vanishes and :math:`\operatorname{tr}(\mathbf{Q}_{(i)}^\top
    \mathbf{A} \mathbf{Q}_{(i)}) = \operatorname{tr}(\mathbf{A})`.

    Products: :math:`m + k \le` ``num_matvecs`` columns with
    :math:`k = \operatorname{rank}(\mathbf{A}\boldsymbol\Omega) \le \min(m, P)`, in two
    calls: ``A @ Omega``, then ``A @ Q``.

    Args:
        A: A square linear operator of shape ``(P, P)``.
        num_matvecs: The budget :math:`K`, even and :math:`\ge 2`.
        generator: Source of the probes. ``None``: PyTorch's global generator (fresh
            probes on every call; results follow ``torch.manual_seed``). A
            distribution's name here is curvlinops' positional ``distribution``.
        distribution: ``"rademacher"``, ``"normal"`` or ``"sphere"`` (see the module
            docstring). ``None``: ``"sphere"``.
        max_block: The most columns per call ``A @ X``. ``None``: all of a stage at
            once.

    Returns:
        The estimate, a scalar tensor on ``A.device`` with ``A.dtype``.

    Raises:
        ValueError: If ``A`` is not square or ``num_matvecs`` is not an even int
            :math:`\ge 2`.
    """
    num_matvecs, generator, distribution, max_block = _prepare(
        "xtrace",
        A,
        num_matvecs,
        generator,
        distribution,
        max_block,
        minimum=2,
        even=True,
        default="sphere",
    )
    sk = _sketch(A, num_matvecs // 2, generator, distribution, max_block)
    Q, S = sk.basis, sk.downdates
    AQ = _apply_blockwise(A, Q, max_block)
    H = Q.T @ AQ
    U = _downdate(S, Q.T @ sk.probes)
    X = sk.probes - Q @ U
    AX = sk.products - AQ @ U
    weights = 1.0
    if distribution == "sphere":
        norms = X.square().sum(0).clamp_min(torch.finfo(X.dtype).tiny)
        weights = (A.shape[0] - sk.dims) / norms
    estimates = H.trace() - (S * (H @ S)).sum(0) + weights * (X * AX).sum(0)
    return estimates.mean()


# Diagonal estimators


def hutchinson_diag(
    A: Operator,
    num_matvecs: int,
    generator: torch.Generator | str | None = None,
    *,
    distribution: Distribution | None = None,
    max_block: int | None = None,
) -> Tensor:
    r"""Estimate the diagonal with Hutchinson's method (Rademacher probes).

    .. math::
        \widehat{\operatorname{diag}}(\mathbf{A}) = \frac{1}{K} \sum_{j=1}^K
        \mathbf{v}_j \odot \mathbf{A} \mathbf{v}_j,
        \qquad \mathbf{v}_j \in \{\pm 1\}^P \text{ i.i.d. uniform}.

    Unbiased (Bekas et al., 2007); entry :math:`p` has variance
    :math:`\frac{1}{K} \sum_{q \ne p} A_{pq}^2`, so it is exact for diagonal
    :math:`\mathbf{A}`.

    Products: exactly ``num_matvecs`` columns, in one call ``A @ V``.

    Args:
        A: A square linear operator of shape ``(P, P)``.
        num_matvecs: The number of probes :math:`K \ge 1`.
        generator: Source of the probes. ``None``: PyTorch's global generator (fresh
            probes on every call; results follow ``torch.manual_seed``). A
            distribution's name here is curvlinops' positional ``distribution``.
        distribution: ``"rademacher"``, ``"normal"`` or ``"sphere"`` (see the module
            docstring). ``None``: ``"rademacher"``.
        max_block: The most columns per call ``A @ X``. ``None``: all at once.

    Returns:
        The estimate, a ``[P]`` tensor on ``A.device`` with ``A.dtype``.

    Raises:
        ValueError: If ``A`` is not square or ``num_matvecs`` is not a positive int.
    """
    num_matvecs, generator, distribution, max_block = _prepare(
        "hutchinson_diag", A, num_matvecs, generator, distribution, max_block
    )
    V = _draw_probes(A, num_matvecs, generator, distribution)
    return (V * _apply_blockwise(A, V, max_block)).mean(dim=1)


def xdiag(
    A: Operator,
    num_matvecs: int,
    generator: torch.Generator | str | None = None,
    *,
    distribution: Distribution | None = None,
    max_block: int | None = None,
) -> Tensor:
    r"""Estimate the diagonal with XDiag (Epperly, Tropp & Webber, 2024).

    The exchangeable diagonal estimator: each of the :math:`m = K / 2` probes
    :math:`\boldsymbol\omega_i` (by default Rademacher) serves both in the sketch :math:`\mathbf{Y} =
    \mathbf{A}\boldsymbol\Omega` and as a Hutchinson probe for the part outside the
    leave-one-out basis :math:`\mathbf{Q}_{(i)}` (orthonormal basis of :math:`\mathbf{Y}`
    without column :math:`i`):

    .. math::
        \widehat{\operatorname{diag}}(\mathbf{A}) = \frac{1}{m} \sum_{i=1}^m \left[
        \operatorname{diag}(\mathbf{Q}_{(i)} \mathbf{Q}_{(i)}^\top \mathbf{A})
        + \boldsymbol\omega_i \odot (\mathbf{I} - \mathbf{Q}_{(i)}
        \mathbf{Q}_{(i)}^\top) \mathbf{A} \boldsymbol\omega_i \right].

    Unbiased, as :math:`\mathbf{Q}_{(i)}` is independent of :math:`\boldsymbol\omega_i`
    and :math:`\mathbb{E}[\boldsymbol\omega \odot \mathbf{B}\boldsymbol\omega] =
    \operatorname{diag}(\mathbf{B})`.

    Efficient formulation (the paper's algorithm): with the rank-one downdates
    :math:`\mathbf{Q}_{(i)}\mathbf{Q}_{(i)}^\top = \mathbf{Q} (\mathbf{I} -
    \mathbf{s}_i \mathbf{s}_i^\top) \mathbf{Q}^\top` (see :func:`xtrace`) and
    :math:`\mathbf{Z} = \mathbf{A}^\top \mathbf{Q}`, the first term is
    :math:`\operatorname{diag}(\mathbf{Q}\mathbf{Z}^\top) - (\mathbf{Q}\mathbf{s}_i)
    \odot (\mathbf{Z}\mathbf{s}_i)` and the second is :math:`\boldsymbol\omega_i \odot
    (\mathbf{y}_i - \mathbf{Q} (\mathbf{I} - \mathbf{s}_i \mathbf{s}_i^\top)
    \mathbf{Q}^\top \mathbf{y}_i)`.

    Exactness: the estimate equals :math:`\operatorname{diag}(\mathbf{A})` (to rounding)
    when the sketch spans the whole space (then no probe is left out), i.e. almost
    surely for invertible :math:`\mathbf{A}` and :math:`m \ge P` (``num_matvecs >=
    2 P``; with Rademacher probes, up to the exponentially small chance that
    :math:`\boldsymbol\Omega` is singular), or when every leave-one-out basis spans the
    range of :math:`\mathbf{A}`, generically for :math:`m > \operatorname{rank}
    \mathbf{A}`.

    Products: :math:`m + k \le` ``num_matvecs`` columns with
    :math:`k = \operatorname{rank}(\mathbf{A}\boldsymbol\Omega) \le \min(m, P)`, in two
    calls: ``A @ Omega``, then ``A.adjoint() @ Q`` (the operator itself if it is
    self-adjoint, like all curvature operators).

    Args:
        A: A square linear operator of shape ``(P, P)``.
        num_matvecs: The budget :math:`K`, even and :math:`\ge 2`.
        generator: Source of the probes. ``None``: PyTorch's global generator (fresh
            probes on every call; results follow ``torch.manual_seed``). A
            distribution's name here is curvlinops' positional ``distribution``.
        distribution: ``"rademacher"``, ``"normal"`` or ``"sphere"`` (see the module
            docstring). ``None``: ``"rademacher"``.
        max_block: The most columns per call ``A @ X``. ``None``: all of a stage at
            once.

    Returns:
        The estimate, a ``[P]`` tensor on ``A.device`` with ``A.dtype``.

    Raises:
        ValueError: If ``A`` is not square or ``num_matvecs`` is not an even int
            :math:`\ge 2`.
    """
    num_matvecs, generator, distribution, max_block = _prepare(
        "xdiag",
        A,
        num_matvecs,
        generator,
        distribution,
        max_block,
        minimum=2,
        even=True,
    )
    sk = _sketch(A, num_matvecs // 2, generator, distribution, max_block)
    Q, S = sk.basis, sk.downdates
    Z = _apply_blockwise(A.adjoint(), Q, max_block)
    residual = sk.products - Q @ _downdate(S, sk.coords)
    leave_one_out = (Q @ S) * (Z @ S)
    return (Q * Z).sum(1) + (sk.probes * residual - leave_one_out).mean(dim=1)


# Frobenius norm


def hutchinson_squared_fro(
    A: Operator,
    num_matvecs: int,
    generator: torch.Generator | str | None = None,
    *,
    distribution: Distribution | None = None,
    max_block: int | None = None,
) -> Tensor:
    r"""Estimate the squared Frobenius norm with Hutchinson's method.

    .. math::
        \widehat{\|\mathbf{A}\|_F^2} = \frac{1}{K} \sum_{j=1}^K
        \|\mathbf{A} \mathbf{v}_j\|^2,
        \qquad \mathbf{v}_j \in \{\pm 1\}^{P_\text{in}} \text{ i.i.d. uniform},

    i.e. Hutchinson's estimator of :math:`\operatorname{tr}(\mathbf{A}^\top\mathbf{A})
    = \|\mathbf{A}\|_F^2`. Unbiased, also for non-square operators.

    Products: exactly ``num_matvecs`` columns, in one call ``A @ V``.

    Args:
        A: A linear operator of shape ``(P_out, P_in)``.
        num_matvecs: The number of probes :math:`K \ge 1`.
        generator: Source of the probes. ``None``: PyTorch's global generator (fresh
            probes on every call; results follow ``torch.manual_seed``). A
            distribution's name here is curvlinops' positional ``distribution``.
        distribution: ``"rademacher"``, ``"normal"`` or ``"sphere"`` (see the module
            docstring). ``None``: ``"rademacher"``.
        max_block: The most columns per call ``A @ X``. ``None``: all at once.

    Returns:
        The estimate, a scalar tensor on ``A.device`` with ``A.dtype``.

    Raises:
        ValueError: If ``num_matvecs`` is not a positive int.
    """
    num_matvecs, generator, distribution, max_block = _prepare(
        "hutchinson_squared_fro",
        A,
        num_matvecs,
        generator,
        distribution,
        max_block,
        square=False,
    )
    V = _draw_probes(A, num_matvecs, generator, distribution)
    return _apply_blockwise(A, V, max_block).square().sum() / num_matvecs
