r"""Functional API: Fisher-family matrix-vector products as plain functions.

No operator object: each ``make_*`` function returns a function ``mv`` that multiplies
one batch's curvature onto a vector, to be called per batch, composed, or compiled with
``torch.compile``. For a batch of data points whose model outputs split into loss
terms :math:`\mathbf{f}_t \in \mathbb{R}^C`, with Jacobians
:math:`\mathbf{J}_t = \partial \mathbf{f}_t / \partial \boldsymbol\theta`, every product is

.. math::
    \mathbf{A}\mathbf{v} = \text{factor} \cdot \sum_t
        \mathbf{J}_t^\top \mathbf{B}_t \mathbf{B}_t^\top \mathbf{J}_t \mathbf{v},

with the output-space factor :math:`\mathbf{B}_t` of the GGN (a square root of the
loss Hessian), the Monte-Carlo Fisher (``M`` would-be gradients over
:math:`\sqrt{M}`) or the empirical Fisher (the gradient at the true label), see
:mod:`curvlinops_fisher.factors`. The loss is always ``reduction="sum"``: the functional
API scales only by its own arguments, like laplax.

| curvlinops_fisher.functional | laplax |
| --- | --- |
| :func:`make_ggn_mv` | ``laplax.curv.ggn.create_ggn_mv`` |
| :func:`make_ggn_mv_without_data` | ``laplax.curv.ggn.create_ggn_mv_without_data`` |
| :func:`make_fisher_mc_mv` | ``laplax.curv.fisher.create_MC_fisher_mv`` |
| :func:`make_fisher_mc_mv_without_data` | ``laplax.curv.fisher.create_MC_fisher_mv_without_data`` |
| :func:`make_ef_mv` | ``laplax.curv.fisher.create_empirical_fisher_mv`` |
| :func:`make_ef_mv_without_data` | ``laplax.curv.fisher.create_empirical_fisher_mv_without_data`` |

*With data* (``make_*_mv``): ``mv(v)`` on the fixed batch ``data``, with
``factor = num_total_samples / num_curv_samples`` (both
default to the batch's number of data points): the curvature of a data set of
``num_total_samples`` points estimated from the batch. *Without data*
(``make_*_mv_without_data``): ``mv(v, data)`` for any batch, with an explicit
``factor``, for loops over batches or distributed sums.

The operators (:class:`~curvlinops_fisher.GGNLinearOperator`, ...) are the sums of
these products over their batches times each batch's reduction scale
(:meth:`~curvlinops_fisher.risk_scale.RiskScale.batch_scale`): both compute every batch's
product with the same function, :func:`curvlinops_fisher.core.batch_curvature_matmat`
(one forward pass carrying the tangents, the output-space contraction, one backward
pass), so they agree to rounding.

Arguments shared by all ``make_*`` functions:

- ``model_func``: an ``nn.Module`` (then ``params`` is a dict ``name -> tensor`` of the
  parameters to differentiate, e.g. ``dict(model.named_parameters())`` or a subset;
  the other parameters and the buffers keep the module's values, via
  :func:`torch.func.functional_call`), or a pure function ``model_func(params, X)`` of
  a dict of tensors (note the order: laplax's ``model_fn`` takes ``(input, params)``).
  The values in ``params`` are the point the curvature is taken at; they are not
  modified, and need not be the module's own tensors.
- ``loss_func``: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` with
  ``reduction="sum"``.
- ``data``: one batch ``(X, y)`` (or laplax's ``{"input": X, "target": y}``); ``X`` a
  tensor or a mapping of tensors. It is moved to the device of ``params``.

Vectors: ``v`` is a flat tensor ``[P]`` (the entries of ``params`` flattened and
concatenated in the dict's order), a flat matrix ``[P, K]`` (``K`` products, sharing
one forward pass per group of at most 64 columns), or a dict shaped like ``params``
(optionally with a trailing column axis ``K`` on every entry). ``mv`` returns the same
format. ``v`` must have the dtype and device of ``params``.

Batches: the batch is processed as a whole (one batched forward pass), and the loss
terms are separated in output space, so a batch's product is exactly the sum of the
products of its data points. laplax's ``vmap_over_data`` is therefore not a
correctness switch here: vectorisation over the batch is the model's own batch axis.
Models whose outputs mix data points (BatchNorm in training mode) have no per-example
curvature; put them in eval mode. The EF never mixes examples: its product is
:math:`\text{factor} \sum_t \mathbf{g}_t (\mathbf{g}_t^\top \mathbf{v})` with the
per-term parameter gradients :math:`\mathbf{g}_t = \mathbf{J}_t^\top \nabla_{\mathbf{f}_t}\ell`.

Sampling (MC Fisher): would-be gradients are drawn only from a ``torch.Generator``
(never from the global RNG), exactly as the operators draw them
(:meth:`~curvlinops_fisher.losses.FisherLoss.sample_gradients`). ``generator`` is a
``torch.Generator`` on the device of ``params``, an ``int`` seed, or ``None`` (the
operators' default seed ``2147483647``). The same generator state gives the same
result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from math import prod

import torch
from torch import Generator, Tensor
from torch.nn import Module

from curvlinops_fisher.core import (
    DEFAULT_MAX_COLUMNS,
    DEFAULT_MC_SEED,
    ModelFunction,
    batch_curvature_matmat,
    named_model_function,
)
from curvlinops_fisher.curvature import _check_positive_int
from curvlinops_fisher.data import Batch, ModelInput, to_device
from curvlinops_fisher.errors import (
    DataError,
    ParameterError,
    UnsupportedLossError,
    VectorFormatError,
)
from curvlinops_fisher.factors import (
    EFFactor,
    GGNFactor,
    MCFisherFactor,
    OutputFactorKind,
)
from curvlinops_fisher.losses import SUPPORTED_REDUCTIONS, FisherLoss, make_fisher_loss

__all__ = [
    "make_ef_mv",
    "make_ef_mv_without_data",
    "make_fisher_mc_mv",
    "make_fisher_mc_mv_without_data",
    "make_ggn_mv",
    "make_ggn_mv_without_data",
]

Params = Mapping[str, Tensor]
ModelFunc = Module | Callable[[dict[str, Tensor], ModelInput], Tensor]
Vector = Tensor | Mapping[str, Tensor]
BatchLike = Batch | Mapping[str, object]
GeneratorLike = Generator | int | None
MatrixVectorProduct = Callable[[Vector], Vector]
DataMatrixVectorProduct = Callable[[Vector, BatchLike], Vector]


# ------------------------------------------------------------ public functions
def make_ggn_mv(
    model_func: ModelFunc,
    params: Params,
    data: BatchLike,
    loss_func: Module,
    num_curv_samples: int | None = None,
    num_total_samples: int | None = None,
) -> MatrixVectorProduct:
    r"""Generalized Gauss-Newton matrix-vector product on a fixed batch.

    .. math::
        \mathbf{v} \mapsto \frac{N_\text{total}}{N_\text{curv}}
        \sum_t \mathbf{J}_t^\top \nabla^2_{\mathbf{f}_t}\ell(\mathbf{f}_t,
        \mathbf{y}_t) \mathbf{J}_t \mathbf{v}

    with :math:`N_\text{total}` = ``num_total_samples`` and :math:`N_\text{curv}` =
    ``num_curv_samples`` (laplax: ``create_ggn_mv``). Cost of a call: one forward pass
    carrying the tangent and one backward pass on the batch.

    Args:
        model_func: ``nn.Module`` or pure function ``model_func(params, X)``.
        params: Dict ``name -> tensor``: the parameters and the point of the curvature.
        data: The batch ``(X, y)``.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` with
            ``reduction="sum"``.
        num_curv_samples: Number of data points the curvature is computed from.
            Default: the batch's number of data points.
        num_total_samples: Number of data points of the data set the curvature is
            estimated for. Default: the batch's number of data points.

    Returns:
        ``mv(v)`` for ``v`` a flat tensor ``[P]`` or ``[P, K]`` or a dict shaped like
        ``params``; returns the same format.

    Raises:
        UnsupportedLossError: For an unsupported loss or a reduction other than sum.
        ParameterError: For unusable ``params`` or ``model_func``.
        DataError: For a malformed batch or bad sample counts.
    """
    curvature = _Curvature(model_func, params, loss_func)
    return curvature.with_data(data, num_curv_samples, num_total_samples, GGNFactor)


def make_fisher_mc_mv(
    model_func: ModelFunc,
    params: Params,
    data: BatchLike,
    loss_func: Module,
    num_curv_samples: int | None = None,
    num_total_samples: int | None = None,
    mc_samples: int = 1,
    generator: GeneratorLike = None,
) -> MatrixVectorProduct:
    r"""Monte-Carlo Fisher matrix-vector product on a fixed batch.

    .. math::
        \mathbf{v} \mapsto \frac{N_\text{total}}{N_\text{curv}}
        \frac{1}{M}\sum_{t,m} \mathbf{J}_t^\top \mathbf{g}_{tm}\mathbf{g}_{tm}^\top
        \mathbf{J}_t \mathbf{v},
        \qquad \mathbf{g}_{tm} = \nabla_{\mathbf{f}_t}\ell(\mathbf{f}_t,
        \tilde{\mathbf{y}}_{tm}),\ \tilde{\mathbf{y}}_{tm} \sim q(\cdot\mid\mathbf{f}_t)

    with :math:`N_\text{total}` = ``num_total_samples`` and :math:`N_\text{curv}` =
    ``num_curv_samples`` (laplax: ``create_MC_fisher_mv``). The generator's state is
    copied when ``mv`` is made; every call starts from that copy (laplax's fixed
    ``key``), so ``mv`` is one fixed matrix, and ``generator`` itself is not advanced.
    The samples are those of :class:`~curvlinops_fisher.FisherMCLinearOperator` with the
    same seed on this single batch.

    Args:
        model_func: See :func:`make_ggn_mv`.
        params: See :func:`make_ggn_mv`.
        data: See :func:`make_ggn_mv`.
        loss_func: See :func:`make_ggn_mv`.
        num_curv_samples: See :func:`make_ggn_mv`.
        num_total_samples: See :func:`make_ggn_mv`.
        mc_samples: Number ``M`` of would-be gradients per loss term.
        generator: ``torch.Generator`` on the device of ``params``, an ``int`` seed,
            or ``None`` for the operators' default seed ``2147483647``.

    Returns:
        ``mv(v)``, see :func:`make_ggn_mv`.

    Raises:
        UnsupportedLossError: See :func:`make_ggn_mv`.
        ParameterError: See :func:`make_ggn_mv`.
        DataError: See :func:`make_ggn_mv`.
        ValueError: For a bad ``mc_samples`` or ``generator``.
    """
    _check_positive_int("mc_samples", mc_samples)
    curvature = _Curvature(model_func, params, loss_func)
    new_generator = _generator_copies(generator, curvature.device)
    return curvature.with_data(
        data,
        num_curv_samples,
        num_total_samples,
        lambda: MCFisherFactor(mc_samples, new_generator()),
    )


def make_ef_mv(
    model_func: ModelFunc,
    params: Params,
    data: BatchLike,
    loss_func: Module,
    num_curv_samples: int | None = None,
    num_total_samples: int | None = None,
) -> MatrixVectorProduct:
    r"""Empirical Fisher matrix-vector product on a fixed batch.

    .. math::
        \mathbf{v} \mapsto \frac{N_\text{total}}{N_\text{curv}}
        \sum_t \mathbf{g}_t \mathbf{g}_t^\top \mathbf{v},
        \qquad \mathbf{g}_t = \mathbf{J}_t^\top \nabla_{\mathbf{f}_t}
        \ell(\mathbf{f}_t, \mathbf{y}_t)

    with :math:`N_\text{total}` = ``num_total_samples`` and :math:`N_\text{curv}` =
    ``num_curv_samples`` (laplax: ``create_empirical_fisher_mv``), one gradient per loss
    term (every position of a sequence output is a term, as in the operators).

    Args:
        model_func: See :func:`make_ggn_mv`.
        params: See :func:`make_ggn_mv`.
        data: See :func:`make_ggn_mv`.
        loss_func: See :func:`make_ggn_mv`.
        num_curv_samples: See :func:`make_ggn_mv`.
        num_total_samples: See :func:`make_ggn_mv`.

    Returns:
        ``mv(v)``, see :func:`make_ggn_mv`.

    Raises:
        UnsupportedLossError: See :func:`make_ggn_mv`.
        ParameterError: See :func:`make_ggn_mv`.
        DataError: See :func:`make_ggn_mv`.
    """
    curvature = _Curvature(model_func, params, loss_func)
    return curvature.with_data(data, num_curv_samples, num_total_samples, EFFactor)


def make_ggn_mv_without_data(
    model_func: ModelFunc,
    params: Params,
    loss_func: Module,
    factor: float = 1.0,
    *,
    check_targets: bool = True,
) -> DataMatrixVectorProduct:
    r"""Generalized Gauss-Newton matrix-vector product on any batch.

    ``mv(v, data)`` returns
    :math:`\text{factor} \sum_t \mathbf{J}_t^\top \nabla^2_{\mathbf{f}_t}\ell\,
    \mathbf{J}_t \mathbf{v}` over the loss terms of the batch ``data``
    (laplax: ``create_ggn_mv_without_data``). Summing ``mv(v, batch)`` over the
    batches of a data set with ``factor=1`` gives the GGN of the summed loss; with
    ``factor=1/N`` (``1/(N C)`` for ``MSELoss`` and ``BCEWithLogitsLoss``, as
    PyTorch's ``mean`` divides by every output entry) that of the mean loss.

    Args:
        model_func: See :func:`make_ggn_mv`.
        params: See :func:`make_ggn_mv`.
        loss_func: See :func:`make_ggn_mv`.
        factor: Scale of the product.
        check_targets: Validate each batch's targets against the model output (for
            ``CrossEntropyLoss`` this reads the targets' range, a device sync and a
            graph break under ``torch.compile``; turn it off in hot loops over
            validated data).

    Returns:
        ``mv(v, data)``, ``v`` in any format of :func:`make_ggn_mv`, ``data`` one
        batch ``(X, y)``; returns the format of ``v``.

    Raises:
        UnsupportedLossError: See :func:`make_ggn_mv`.
        ParameterError: See :func:`make_ggn_mv`.
    """
    curvature = _Curvature(model_func, params, loss_func)
    return curvature.without_data(GGNFactor(), factor, check_targets)


def make_fisher_mc_mv_without_data(
    model_func: ModelFunc,
    params: Params,
    loss_func: Module,
    factor: float = 1.0,
    mc_samples: int = 1,
    *,
    check_targets: bool = True,
) -> Callable[..., Vector]:
    r"""Monte-Carlo Fisher matrix-vector product on any batch.

    ``mv(v, data, generator=None)`` returns
    :math:`\frac{\text{factor}}{M} \sum_{t,m} \mathbf{J}_t^\top
    \mathbf{g}_{tm}\mathbf{g}_{tm}^\top \mathbf{J}_t \mathbf{v}` over the loss terms of
    ``data`` (laplax: ``create_MC_fisher_mv_without_data``, whose ``key`` becomes the
    ``generator`` of each call). A ``torch.Generator`` is drawn from, and so advanced:
    one generator passed to the batches of a data set in order draws the samples of
    :class:`~curvlinops_fisher.FisherMCLinearOperator` seeded alike. An ``int`` (or
    ``None``: ``2147483647``) seeds a fresh generator for this call.

    Args:
        model_func: See :func:`make_ggn_mv`.
        params: See :func:`make_ggn_mv`.
        loss_func: See :func:`make_ggn_mv`.
        factor: Scale of the product.
        mc_samples: Number ``M`` of would-be gradients per loss term.
        check_targets: See :func:`make_ggn_mv_without_data`.

    Returns:
        ``mv(v, data, generator=None)``, see :func:`make_ggn_mv_without_data`.

    Raises:
        UnsupportedLossError: See :func:`make_ggn_mv`.
        ParameterError: See :func:`make_ggn_mv`.
        ValueError: For a bad ``mc_samples``.
    """
    _check_positive_int("mc_samples", mc_samples)
    curvature = _Curvature(model_func, params, loss_func)
    scale = _check_factor(factor)

    def mv(v: Vector, data: BatchLike, generator: GeneratorLike = None) -> Vector:
        factor_kind = MCFisherFactor(
            mc_samples, _generator_to_draw_from(generator, curvature.device)
        )
        return curvature.product(v, data, factor_kind, scale, check_targets)

    return mv


def make_ef_mv_without_data(
    model_func: ModelFunc,
    params: Params,
    loss_func: Module,
    factor: float = 1.0,
    *,
    check_targets: bool = True,
) -> DataMatrixVectorProduct:
    r"""Empirical Fisher matrix-vector product on any batch.

    ``mv(v, data)`` returns :math:`\text{factor} \sum_t \mathbf{g}_t
    (\mathbf{g}_t^\top \mathbf{v})` over the loss terms of ``data``, with the
    per-term gradients :math:`\mathbf{g}_t` (laplax:
    ``create_empirical_fisher_mv_without_data``).

    Args:
        model_func: See :func:`make_ggn_mv`.
        params: See :func:`make_ggn_mv`.
        loss_func: See :func:`make_ggn_mv`.
        factor: Scale of the product.
        check_targets: See :func:`make_ggn_mv_without_data`.

    Returns:
        ``mv(v, data)``, see :func:`make_ggn_mv_without_data`.

    Raises:
        UnsupportedLossError: See :func:`make_ggn_mv`.
        ParameterError: See :func:`make_ggn_mv`.
    """
    curvature = _Curvature(model_func, params, loss_func)
    return curvature.without_data(EFFactor(), factor, check_targets)


# ------------------------------------------------------------------ internals
class _Curvature:
    """A model, its parameters and a sum-reduced loss, bound for batch products.

    Args:
        model_func: ``nn.Module`` or pure function ``model_func(params, X)``.
        params: Dict ``name -> tensor``.
        loss_func: A supported loss with ``reduction="sum"``.
    """

    def __init__(self, model_func: ModelFunc, params: Params, loss_func: Module):
        """Validate and bind the arguments (see the class docstring)."""
        self.loss: FisherLoss = _sum_reduced_loss(loss_func)
        self.names, self.values = _check_params(model_func, params)
        self.shapes = tuple(value.shape for value in self.values)
        self.numels = tuple(prod(shape) for shape in self.shapes)
        self.dim = sum(self.numels)
        self.model_function: ModelFunction = named_model_function(
            model_func, self.names
        )

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.values[0].device

    def with_data(
        self,
        data: BatchLike,
        num_curv_samples: int | None,
        num_total_samples: int | None,
        factor_kind: Callable[[], OutputFactorKind],
    ) -> MatrixVectorProduct:
        """``mv(v)`` on the fixed batch ``data``, scaled by the sample counts.

        Args:
            data: The batch.
            num_curv_samples: See :func:`make_ggn_mv`.
            num_total_samples: See :func:`make_ggn_mv`.
            factor_kind: Returns the output-space factor kind for one call.

        Returns:
            ``mv(v)``; the targets are validated on its first call.
        """
        X, y = self.batch(data)
        scale = _dataset_factor(X, num_curv_samples, num_total_samples)
        targets_checked = False

        def mv(v: Vector) -> Vector:
            nonlocal targets_checked
            result = self._product(v, X, y, factor_kind(), scale, not targets_checked)
            targets_checked = True
            return result

        return mv

    def without_data(
        self, factor_kind: OutputFactorKind, factor: float, check_targets: bool
    ) -> DataMatrixVectorProduct:
        """``mv(v, data)``: ``factor`` times a batch's curvature times ``v``.

        Args:
            factor_kind: The output-space factor kind (stateless: GGN or EF).
            factor: The scale.
            check_targets: Validate every batch's targets.

        Returns:
            ``mv(v, data)``.
        """
        scale = _check_factor(factor)

        def mv(v: Vector, data: BatchLike) -> Vector:
            return self.product(v, data, factor_kind, scale, check_targets)

        return mv

    def product(
        self,
        v: Vector,
        data: BatchLike,
        factor_kind: OutputFactorKind,
        scale: float,
        check_targets: bool,
    ) -> Vector:
        """``scale`` times the batch's curvature times ``v`` (format of ``v``)."""
        X, y = self.batch(data)
        return self._product(v, X, y, factor_kind, scale, check_targets)

    def _product(
        self,
        v: Vector,
        X: ModelInput,
        y: Tensor,
        factor_kind: OutputFactorKind,
        scale: float,
        check_targets: bool,
    ) -> Vector:
        V, to_format_of_v = self.columns(v)
        result = batch_curvature_matmat(
            self.model_function,
            self.values,
            X,
            y,
            V,
            self.loss,
            factor_kind,
            scale=scale,
            max_columns=DEFAULT_MAX_COLUMNS,
            check_targets=check_targets,
        )
        return to_format_of_v(result)

    def batch(self, data: BatchLike) -> Batch:
        """Unpack ``(X, y)`` (or laplax's ``{"input", "target"}``) onto the device."""
        if isinstance(data, Mapping) and {"input", "target"} <= data.keys():
            X, y = data["input"], data["target"]
        elif isinstance(data, Sequence) and len(data) == 2:
            X, y = data
        else:
            raise DataError(
                f"data must be one batch (X, y); got a {type(data).__name__}. Pass a "
                "tuple (X, y) or a dict {'input': X, 'target': y}."
            )
        if not isinstance(y, Tensor):
            raise DataError(
                f"data must be one batch (X, y) with a tensor y; got a y of type "
                f"{type(y).__name__}. Pass a single batch, not a list of batches."
            )
        return to_device(X, self.device), to_device(y, self.device)

    def columns(
        self, v: Vector
    ) -> tuple[tuple[Tensor, ...], Callable[[tuple[Tensor, ...]], Vector]]:
        """Split ``v`` into per-parameter columns ``(K, *shape)`` and a way back.

        Args:
            v: Flat ``[P]`` or ``[P, K]``, or a dict shaped like ``params`` (entries
                optionally with a trailing axis ``K``).

        Returns:
            The columns and the function that turns a result back into ``v``'s format.

        Raises:
            VectorFormatError: For any other shape, keys, dtype or device.
        """
        if isinstance(v, Tensor):
            self._check_dtype_device("v", v)
            if v.ndim == 1 and v.shape[0] == self.dim:
                V = tuple(
                    c.reshape(1, *s) for c, s in zip(v.split(self.numels), self.shapes)
                )
                return V, _flat_vector
            if v.ndim == 2 and v.shape[0] == self.dim:
                K = v.shape[1]
                V = tuple(
                    c.T.reshape(K, *s)
                    for c, s in zip(v.split(self.numels), self.shapes)
                )
                return V, _flat_matrix
            raise VectorFormatError(
                f"v has shape {tuple(v.shape)}; expected [P] or [P, K] with P = "
                f"{self.dim}, the number of entries of params."
            )
        if isinstance(v, Mapping):
            return self._dict_columns(v)
        raise VectorFormatError(
            f"v must be a tensor [P] or [P, K] or a dict shaped like params; got a "
            f"{type(v).__name__}."
        )

    def _dict_columns(
        self, v: Mapping[str, Tensor]
    ) -> tuple[tuple[Tensor, ...], Callable[[tuple[Tensor, ...]], Vector]]:
        if set(v.keys()) != set(self.names):
            missing = [n for n in self.names if n not in v]
            extra = [n for n in v if n not in self.names]
            raise VectorFormatError(
                f"v's keys must be those of params; missing {missing}, unexpected "
                f"{extra}."
            )
        entries = tuple(v[name] for name in self.names)
        for name, entry in zip(self.names, entries):
            if not isinstance(entry, Tensor):
                raise VectorFormatError(
                    f"v[{name!r}] is a {type(entry).__name__}, not a tensor."
                )
            self._check_dtype_device(f"v[{name!r}]", entry)
        names = self.names
        if all(e.shape == s for e, s in zip(entries, self.shapes)):
            return tuple(e.unsqueeze(0) for e in entries), lambda R: {
                name: r.squeeze(0) for name, r in zip(names, R)
            }
        Ks = {e.shape[-1] for e in entries if e.ndim}
        if len(Ks) == 1 and all(
            e.shape == (*s, *Ks) for e, s in zip(entries, self.shapes)
        ):
            return tuple(e.movedim(-1, 0) for e in entries), lambda R: {
                name: r.movedim(0, -1) for name, r in zip(names, R)
            }
        got = {name: tuple(e.shape) for name, e in zip(names, entries)}
        expected = {name: tuple(s) for name, s in zip(names, self.shapes)}
        raise VectorFormatError(
            f"v's entries must have the shapes of params {expected} (or those with one "
            f"common trailing column axis K); got {got}."
        )

    def _check_dtype_device(self, what: str, x: Tensor) -> None:
        value = self.values[0]
        if x.dtype != value.dtype or x.device != value.device:
            raise VectorFormatError(
                f"{what} is {x.dtype} on {x.device}, but params are {value.dtype} on "
                f"{value.device}. Convert it with .to(dtype=..., device=...)."
            )


def _flat_vector(R: tuple[Tensor, ...]) -> Tensor:
    """One column ``(1, *shape)`` per parameter to a flat vector ``[P]``."""
    return torch.cat([r.reshape(-1) for r in R])


def _flat_matrix(R: tuple[Tensor, ...]) -> Tensor:
    """``K`` columns ``(K, *shape)`` per parameter to a flat matrix ``[P, K]``."""
    return torch.cat([r.flatten(1).T for r in R])


def _sum_reduced_loss(loss_func: Module) -> FisherLoss:
    """Wrap ``loss_func``; anything but a supported loss with ``sum`` is an error."""
    reduction = getattr(loss_func, "reduction", None)
    if reduction in SUPPORTED_REDUCTIONS or not isinstance(loss_func, Module):
        loss = make_fisher_loss(loss_func)  # rejects unsupported losses and options
        if reduction == "sum":  # the risk scale c_b = 1 of every batch
            return loss
    name = type(loss_func).__name__
    raise UnsupportedLossError(
        f"The functional API needs loss_func with reduction='sum'; got "
        f"{name}(reduction={reduction!r}). It scales only by its own arguments: use "
        f"{name}(reduction='sum') and scale with num_total_samples/num_curv_samples "
        "(with data) or factor (without data). E.g. the curvature of the mean loss "
        "over N data points is factor=1/N (1/(N*C) for MSELoss and BCEWithLogitsLoss "
        "with C outputs per term, as PyTorch's mean divides by every output entry)."
    )


def _check_params(
    model_func: ModelFunc, params: Params
) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
    """Validate ``model_func`` and ``params``; return the names and detached values."""
    if not (isinstance(model_func, Module) or callable(model_func)):
        raise ParameterError(
            f"model_func must be an nn.Module or a function model_func(params, X); got "
            f"a {type(model_func).__name__}."
        )
    if not isinstance(params, Mapping) or not params:
        raise ParameterError(
            "params must be a non-empty dict name -> tensor, e.g. "
            f"dict(model.named_parameters()); got {_describe(params)}."
        )
    names = tuple(params.keys())
    values = tuple(params.values())
    for name, value in zip(names, values):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise ParameterError(
                f"params[{name!r}] must be a floating point tensor; got {kind}."
            )
    if len({(v.dtype, v.device) for v in values}) != 1:
        found = sorted({f"{v.dtype} on {v.device}" for v in values})
        raise ParameterError(
            f"params must share one dtype and device; found {found}. Convert them with "
            ".to(device=..., dtype=...)."
        )
    if isinstance(model_func, Module):
        known = dict(model_func.named_parameters(remove_duplicate=False))
        for name, value in zip(names, values):
            if name not in known:
                raise ParameterError(
                    f"params[{name!r}] is not a parameter of the model; its parameters "
                    f"are {list(known)}. Pass e.g. dict(model.named_parameters())."
                )
            if known[name].shape != value.shape:
                raise ParameterError(
                    f"params[{name!r}] has shape {tuple(value.shape)}, but the model's "
                    f"parameter has shape {tuple(known[name].shape)}."
                )
    return names, tuple(v.detach() for v in values)


def _describe(params: object) -> str:
    """Describe what was passed as ``params`` for an error message."""
    if isinstance(params, Mapping):
        return "an empty dict"
    return f"a {type(params).__name__}"


def _dataset_factor(
    X: ModelInput, num_curv_samples: int | None, num_total_samples: int | None
) -> float:
    """``num_total_samples / num_curv_samples``, both defaulting to the batch size."""
    for name, value in (
        ("num_curv_samples", num_curv_samples),
        ("num_total_samples", num_total_samples),
    ):
        if value is not None:
            _check_positive_int(name, value)
    if num_curv_samples is None and num_total_samples is None:
        return 1.0
    if num_curv_samples is None or num_total_samples is None:
        if not isinstance(X, Tensor):
            raise DataError(
                "The batch input X is not a tensor, so its number of data points is "
                "unknown: pass both num_curv_samples and num_total_samples."
            )
        batch_size = X.shape[0]
        num_curv_samples = num_curv_samples or batch_size
        num_total_samples = num_total_samples or batch_size
    return num_total_samples / num_curv_samples


def _check_factor(factor: float) -> float:
    """The scale ``factor`` as a float (a real number, not a bool)."""
    if isinstance(factor, Tensor) and factor.numel() == 1:
        factor = factor.item()
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise ValueError(f"factor must be a real number; got {factor!r}.")
    return float(factor)


def _check_generator(generator: GeneratorLike, device: torch.device) -> None:
    if generator is None or isinstance(generator, Generator):
        if generator is not None and not _same_device(generator.device, device):
            raise ValueError(
                f"generator is on {generator.device}, but params are on {device}. "
                f"Create it with torch.Generator(device={str(device)!r})."
            )
        return
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise ValueError(
            f"generator must be a torch.Generator, an int seed or None; got "
            f"{generator!r}."
        )


def _generator_copies(
    generator: GeneratorLike, device: torch.device
) -> Callable[[], Generator]:
    """A function returning fresh generators in ``generator``'s current state."""
    _check_generator(generator, device)
    if isinstance(generator, Generator):
        state = generator.get_state()

        def copy() -> Generator:
            fresh = Generator(device=generator.device)
            fresh.set_state(state)
            return fresh

        return copy
    seed = DEFAULT_MC_SEED if generator is None else generator
    return lambda: _seeded(seed, device)


def _generator_to_draw_from(
    generator: GeneratorLike, device: torch.device
) -> Generator:
    """``generator`` itself, or a fresh one seeded with it (default seed for None)."""
    _check_generator(generator, device)
    if isinstance(generator, Generator):
        return generator
    return _seeded(DEFAULT_MC_SEED if generator is None else generator, device)


def _seeded(seed: int, device: torch.device) -> Generator:
    generator = Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are the same (``cuda`` and ``cuda:0`` count as equal)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cpu" or a.index is None or b.index is None:
        return True
    return a.index == b.index
