r"""Curvature operators: the GGN, the Monte-Carlo Fisher and the empirical Fisher.

For a data set of ``N`` points split into batches, a model :math:`f_{\boldsymbol\theta}`
and a loss :math:`\ell` whose batch outputs consist of loss terms
:math:`\mathbf{f}_t \in \mathbb{R}^C`, every operator here is

.. math::
    \mathbf{A} = \sum_b c_b \sum_{t \in b}
        \mathbf{J}_t^\top \mathbf{B}_t \mathbf{B}_t^\top \mathbf{J}_t,
    \qquad \mathbf{J}_t = \frac{\partial \mathbf{f}_t}{\partial \boldsymbol\theta},

with :math:`c_b = 1` for ``reduction='sum'`` and :math:`c_b = N_b / (N D_b)` for
``reduction='mean'`` (:math:`D_b` is what PyTorch's ``mean`` divides the batch loss by:
the number of terms for ``CrossEntropyLoss``, times ``C`` for ``MSELoss`` and
``BCEWithLogitsLoss``; curvlinops' convention). Where that divisor depends on the
targets (``CrossEntropyLoss`` with ignored targets or class weights), :math:`c_b = 1/D`
with :math:`D = \sum_b D_b` (non-ignored terms, or their targets' class weights)
counted once at construction over the whole data set: the operator is then the
curvature of PyTorch's loss on the concatenated data. The scales are one immutable
:class:`~curvlinops_fisher.risk_scale.RiskScale` built from that scan. The subclasses
differ only in the output-space factor :math:`\mathbf{B}_t`
(:mod:`curvlinops_fisher.factors`). Each
batch's product is :func:`curvlinops_fisher.core.batch_curvature_matmat`, the function
behind :mod:`curvlinops_fisher.functional` too: an operator is the sum of the
functional products of its batches, each times :math:`c_b`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cached_property
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value
from torch.nn import Module

from curvlinops_fisher.core import (
    DEFAULT_MAX_COLUMNS,
    DEFAULT_MC_SEED,
    batch_curvature_matmat,
    make_model_function,
    takes_closed_form,
)
from curvlinops_fisher.data import (
    Batch,
    BatchSizeFn,
    default_batch_size_fn,
    first_batch,
    iterate_batches,
)
from curvlinops_fisher.determinism import (
    check_deterministic as probe_determinism,
)
from curvlinops_fisher.determinism import check_modules_in_eval_mode
from curvlinops_fisher.distributed import (
    Agreement,
    ProcessGroupLike,
    ProcessGroupMixin,
    RankSeededMCFisherFactor,
    group_rank,
    resolve_process_group,
)
from curvlinops_fisher.errors import (
    DataError,
    ParameterError,
    all_finite,
    check_finite,
    naming_batch,
)
from curvlinops_fisher.factors import (
    EFFactor,
    GGNFactor,
    MCFisherFactor,
    OutputFactorKind,
    SampleCache,
)
from curvlinops_fisher.linop import PyTorchLinearOperator
from curvlinops_fisher.losses import PerDatumLoss, make_fisher_loss
from curvlinops_fisher.risk_scale import RiskScale, TargetCount
from curvlinops_fisher.structure import ExactStructure, ExactStructureMethods


class CurvatureLinearOperator(
    ExactStructureMethods, ProcessGroupMixin, PyTorchLinearOperator
):
    r"""Base class: a Fisher-family curvature matrix of an empirical risk.

    Subclasses only choose the output-space factor (:meth:`_factor_kind`).

    Cost of one product with ``K`` columns: per batch and per group of at most
    :attr:`max_columns_per_pass` columns, one forward pass carrying the group's
    tangents (forward mode, batched with ``vmap``), a contraction in output space, and
    one backward pass batched over the group's columns. The data is iterated once.

    Args:
        model_func: The model, an ``nn.Module`` mapping a batch input ``X`` to outputs.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` with
            ``reduction='mean'`` or ``'sum'``.
        params: The parameters the matrix is taken w.r.t.: a list of the model's
            parameters that require grad (a subset is fine; others stay fixed).
        data: A re-iterable of batches ``(X, y)`` in a fixed order: a list of batches
            or a ``DataLoader`` without shuffling. ``X`` may be a mapping (then
            ``batch_size_fn`` is required). Batches are moved to the params' device.
        progressbar: Show a tqdm progress bar over the batches of each pass.
        check_deterministic: Probe at construction that two passes over the data give
            the same batches and model outputs (two forward passes per batch without
            gradients), and that no Dropout or BatchNorm layer is in training mode.
        num_data: Number of data points ``N``; inferred with one pass if ``None``.
            ``CrossEntropyLoss(reduction='mean')`` always makes that pass (over the
            targets only) to find ignored targets and the data set's divisor.
        batch_size_fn: Returns the number of data points of a batch input ``X``.
            Required when ``X`` is not a tensor.
        process_group: ``None`` (default): one process holds all of ``data``. A
            ``torch.distributed`` process group, or ``"default"`` for the default
            group: each rank passes its own shard as ``data`` (it may be empty on
            some ranks) and the operator is the curvature of the concatenated
            shards, in rank order; ``num_data`` is then the global number of data
            points (counted over all ranks if ``None``). Construction, products and
            the exact structure are collective calls (see
            :mod:`curvlinops_fisher.distributed`); a product costs one
            ``all_reduce`` of its result.

    Attributes:
        max_columns_per_pass: Most matrix columns that share one forward pass (each
            column carries a tangent of every activation, so this bounds memory).
    """

    SELF_ADJOINT: bool = True
    FIXED_DATA_ORDER: bool = False
    max_columns_per_pass: int = DEFAULT_MAX_COLUMNS

    def __init__(
        self,
        model_func: Module,
        loss_func: Module,
        params: list[Tensor],
        data: Iterable[Batch],
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        *,
        process_group: ProcessGroupLike = None,
    ):
        """Set up the operator (see the class docstring for the arguments)."""
        self._process_group = resolve_process_group(process_group)
        self._rank = group_rank(self._process_group)
        with Agreement(self._process_group, f"{type(self).__name__}()") as agreement:
            self._setup(
                model_func,
                loss_func,
                params,
                data,
                progressbar,
                check_deterministic,
                batch_size_fn,
            )
            agreement.share(self._scan_data(num_data))
        self._N_data, count = agreement.combine_scans(num_data)
        self._risk_scale = RiskScale.from_count(self._loss_func, self._N_data, count)
        if not (isinstance(self._N_data, int) and self._N_data > 0):
            raise DataError(f"num_data must be a positive int; got {num_data!r}.")

    def _setup(
        self,
        model_func: Module,
        loss_func: Module,
        params: list[Tensor],
        data: Iterable[Batch],
        progressbar: bool,
        check_deterministic: bool,
        batch_size_fn: BatchSizeFn | None,
    ) -> None:
        """Validate the arguments on this rank's data (no collectives)."""
        self._loss = make_fisher_loss(loss_func)
        self._loss_func = loss_func
        if not isinstance(model_func, Module):
            raise ParameterError(
                f"model_func must be a torch.nn.Module; got {type(model_func).__name__}."
                " Wrap your function in a Module whose parameters are params."
            )
        self._params = _check_params(params)
        self._model_func = model_func
        self._model_function = make_model_function(model_func, self._params)
        self._data = data
        self._progressbar = progressbar
        self._batch_size_fn = batch_size_fn
        self._check_deterministic = check_deterministic
        shapes = [tuple(p.shape) for p in self._params]
        super().__init__(shapes, shapes)

        if check_deterministic:  # before any forward pass changes BatchNorm stats
            check_modules_in_eval_mode(model_func)
        batch = first_batch(
            data, self.device, allow_empty=self._process_group is not None
        )
        if batch is not None:  # None: an empty shard of distributed data
            X, y = batch
            if isinstance(X, Mapping) and batch_size_fn is None:
                raise DataError(
                    "The batch inputs X are mappings, so batch_size_fn is required, "
                    "e.g. batch_size_fn=lambda X: X['input_ids'].shape[0]."
                )
            self._check_params_used(X, y)
        self._targets_checked = False
        if check_deterministic:
            probe_determinism(model_func, self._batches, self._checked_forward)
            self._targets_checked = True

    # ------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        """Data type of the parameters (and of the vectors the operator accepts)."""
        return self._params[0].dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters (and of the vectors the operator accepts)."""
        return self._params[0].device

    @cached_property
    def _structure(self) -> ExactStructure:
        """The data passes behind the structure methods (built on first use)."""
        return ExactStructure(
            model=self._model_func,
            model_function=self._model_function,
            params=self._params,
            data=self._data,
            loss=self._loss,
            risk_scale=self._risk_scale,
            factor_kind=self._factor_kind,
            num_data=self._N_data,
            batch_size_fn=self._batch_size_fn,
            progressbar=self._progressbar,
            process_group=self._process_group,
            targets_checked=self._targets_checked,
        )

    # --------------------------------------------------------------- product
    def _factor_kind(self) -> OutputFactorKind:
        """The output-space factor of this curvature matrix, for one product."""
        raise NotImplementedError

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply onto a matrix in tensor list format with a trailing column axis."""
        V = tuple(m.movedim(-1, 0) for m in M)
        result = self._sum_over_ranks(
            lambda: self._local_matmat(V), [v.shape for v in V]
        )
        return [r.movedim(0, -1) for r in result]

    def _local_matmat(self, V: tuple[Tensor, ...]) -> list[Tensor]:
        """This rank's part of the product with ``V`` (leading column axis).

        Raises:
            NonFiniteError: If ``V`` or the part holds NaN or Inf (naming the batch).
        """
        check_finite(V, "The vector or matrix multiplied onto the operator")
        result = self._accumulate_matmat(V, check_batches=False)
        if not all_finite(result):
            # Find the batch to name in the error: a second pass that checks each
            # batch's contribution (only on this error path).
            self._accumulate_matmat(V, check_batches=True)
            check_finite(result, "The product (a sum of finite batch contributions)")
        return result

    def _accumulate_matmat(
        self, V: tuple[Tensor, ...], check_batches: bool
    ) -> list[Tensor]:
        """Sum this rank's batches' products onto ``V`` (leading column axis).

        Args:
            V: Matrix in tensor list format with a leading column axis.
            check_batches: Check each batch's contribution for NaN and Inf (raises
                :class:`~curvlinops_fisher.errors.NonFiniteError` naming the batch).

        Returns:
            The product in the format of ``V``.
        """
        factor_kind = self._factor_kind()
        params = self._param_values()
        result = tuple(torch.zeros(v.shape, dtype=v.dtype, device=v.device) for v in V)
        # One copy here instead of one per batch: a single column goes through dual
        # numbers, whose make_dual copies a tangent that shares its storage with
        # other data (views of the flat vector); several columns are moved-axis views
        # of a [P, K] matrix, which matrix products would copy to be contiguous. The
        # closed form reads a single column's views as they are.
        if V[0].shape[0] == 1:
            if not takes_closed_form(self._model_function):
                V = tuple(v.clone() for v in V)
        else:
            V = tuple(v.contiguous() for v in V)
        for index, (X, y) in enumerate(self._batches("matmat")):
            scale = self._risk_scale.batch_scale(y, self._batch_size(X))
            with naming_batch(index):
                batch_result = batch_curvature_matmat(
                    self._model_function,
                    params,
                    X,
                    y,
                    V,
                    self._loss,
                    factor_kind,
                    scale=scale,
                    max_columns=self.max_columns_per_pass,
                    check_targets=not self._targets_checked,
                    # On the error path each batch's part is checked on its own.
                    out=None if check_batches else result,
                )
                if check_batches:
                    check_finite(
                        batch_result, "The batch's contribution to the product"
                    )
                    for acc, r in zip(result, batch_result):
                        acc.add_(r)
        self._targets_checked = True
        return list(result)

    def gradient_and_loss(self) -> tuple[list[Tensor], Tensor]:
        r"""Gradient and value of the data set's risk :math:`\sum_b c_b \sum_{t \in b} \ell_t`.

        :math:`c_b` is the batch scale of the curvature (for ``mean``: PyTorch's
        ``mean`` over the concatenated data set, see
        :meth:`~curvlinops_fisher.risk_scale.RiskScale.batch_scale`).

        With a process group, the sum over the ranks' shards (one ``all_reduce``).

        Returns:
            The gradient w.r.t. ``params`` (tensor list) and the risk (a scalar).
        """
        params = self._param_values()
        *gradient, total = self._sum_over_ranks(
            lambda: self._local_gradient_and_loss(params),
            [*(p.shape for p in params), ()],
            "gradient_and_loss()",
        )
        return gradient, total

    def _local_gradient_and_loss(self, params: tuple[Tensor, ...]) -> list[Tensor]:
        """Gradient and risk of this rank's shard, as one tensor list."""
        gradient = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=self.dtype, device=self.device)

        for X, y in self._batches("gradient"):
            scale = self._risk_scale.batch_scale(y, self._batch_size(X))

            def batch_risk(p: tuple[Tensor, ...], X=X, y=y, scale=scale) -> Tensor:
                return self._loss.summed_loss(self._model_function(p, X), y) * scale

            batch_grad, value = grad_and_value(batch_risk)(params)
            total += value
            for acc, g in zip(gradient, batch_grad):
                acc.add_(g)
        return [*gradient, total]

    # --------------------------------------------------------------- helpers
    def _param_values(self) -> tuple[Tensor, ...]:
        """Current parameter values, detached (no graph is built outside torch.func).

        Raises:
            ParameterError: If some parameter is no longer in the model (products
                follow a model restructured around the same parameters).
        """
        self._model_function.follow(self._params)
        return tuple(p.detach() for p in self._params)

    def _batches(self, desc: str) -> Iterator[Batch]:
        return iterate_batches(self._data, self.device, self._progressbar, desc)

    def _batch_size(self, X: object) -> int:
        return default_batch_size_fn(self._batch_size_fn, X)

    def _scan_data(self, num_data: int | None) -> tuple[Any, TargetCount]:
        """This rank's data scan: its number of data points and targets' count.

        One pass over this rank's data, only if needed: to count the data points, or
        for a ``mean`` whose divisor may depend on the targets
        (:meth:`~curvlinops_fisher.risk_scale.RiskScale.scans_targets`). ``__init__``
        combines the ranks' scans into the operator's
        :class:`~curvlinops_fisher.risk_scale.RiskScale`.

        Returns:
            ``num_data`` if given, else the number of this rank's data points; the
            :meth:`~curvlinops_fisher.risk_scale.RiskScale.count` of this rank's
            targets (zero without a pass).
        """
        if num_data is not None and not RiskScale.scans_targets(self._loss_func):
            return num_data, TargetCount()
        sizes = []

        def targets() -> Iterator[Tensor]:
            for X, y in self._batches("num_data"):
                sizes.append(self._batch_size(X) if num_data is None else 0)
                yield y

        count = RiskScale.count(self._loss_func, targets())
        return (sum(sizes) if num_data is None else num_data), count

    def _checked_forward(self, batch: Batch) -> Tensor:
        """The model output of a batch, after validating the batch's targets."""
        X, y = batch
        output = self._model_func(X)
        self._loss.check_targets(output, y)
        return output

    def _check_params_used(self, X: object, y: Tensor) -> None:
        """Validate targets and that every parameter reaches the first batch's output."""
        output = self._model_function(tuple(self._params), X)
        self._loss.check_targets(output.detach(), y)
        grads = torch.autograd.grad(
            output,
            self._params,
            grad_outputs=torch.ones_like(output),
            allow_unused=True,
        )
        unused = [i for i, g in enumerate(grads) if g is None]
        if unused:
            raise ParameterError(
                f"params{unused} are not used by the model's forward pass, so the "
                "curvature w.r.t. them is not defined by the model. Pass only "
                "parameters that the forward pass uses."
            )


def _check_params(params: list[Tensor]) -> list[Tensor]:
    """Validate ``params``: tensors requiring grad, one dtype and device."""
    params = list(params)
    if not params:
        raise ParameterError("params is empty: pass at least one parameter.")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise ParameterError(f"params[{i}] is a {type(p).__name__}, not a tensor.")
        if not p.requires_grad:
            raise ParameterError(
                f"params[{i}] (shape {tuple(p.shape)}) does not require grad. Pass "
                "only trainable parameters: "
                "[p for p in model.parameters() if p.requires_grad]."
            )
    if len({p.dtype for p in params}) != 1 or len({p.device for p in params}) != 1:
        found = sorted({f"{p.dtype} on {p.device}" for p in params})
        raise ParameterError(
            f"params must share one dtype and device; found {found}. Convert the model "
            "with model.to(device=..., dtype=...)."
        )
    return params


class GGNLinearOperator(CurvatureLinearOperator):
    r"""Generalized Gauss-Newton matrix (the Fisher for these losses).

    :math:`\mathbf{B}_t\mathbf{B}_t^\top = \nabla^2_{\mathbf{f}_t}\ell(\mathbf{f}_t,
    \mathbf{y}_t)`, applied in closed form per loss (``C x C`` matrices are never
    formed). Cost of a product: see :class:`CurvatureLinearOperator`.
    """

    def _factor_kind(self) -> OutputFactorKind:  # noqa: D102
        return GGNFactor()


class EFLinearOperator(CurvatureLinearOperator):
    r"""Empirical Fisher (uncentered gradient covariance) of the loss terms or data.

    By default (``per_datum=False``) each loss term (every position of a sequence
    output) is one gradient, as in curvlinops:

    .. math::
        \mathbf{A} = \sum_b c_b \sum_t \nabla_{\boldsymbol\theta}\ell_t
            (\nabla_{\boldsymbol\theta}\ell_t)^\top,
        \qquad \mathbf{B}_t = \nabla_{\mathbf{f}_t}\ell(\mathbf{f}_t, \mathbf{y}_t).

    With ``per_datum=True`` each data point is one gradient, that of its summed loss
    :math:`\ell_n = \sum_{t \in n} \ell_t` (what is usually meant for sequence
    models), with the same scale :math:`c_b`:

    .. math::
        \mathbf{A} = \sum_b c_b \sum_{n \in b} \nabla_{\boldsymbol\theta}\ell_n
            (\nabla_{\boldsymbol\theta}\ell_n)^\top.

    Both agree when every datum has one term (outputs ``(N, C)``). Cost of a product:
    that of the GGN (the gradients live in output space).

    Args:
        model_func: See :class:`CurvatureLinearOperator`.
        loss_func: See :class:`CurvatureLinearOperator`.
        params: See :class:`CurvatureLinearOperator`.
        data: See :class:`CurvatureLinearOperator`.
        progressbar: See :class:`CurvatureLinearOperator`.
        check_deterministic: See :class:`CurvatureLinearOperator`.
        num_data: See :class:`CurvatureLinearOperator`.
        batch_size_fn: See :class:`CurvatureLinearOperator`.
        per_datum: Gradients of data points instead of loss terms (keyword only).
            Default: ``False``.
        process_group: See :class:`CurvatureLinearOperator`.
    """

    def __init__(
        self,
        model_func: Module,
        loss_func: Module,
        params: list[Tensor],
        data: Iterable[Batch],
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        *,
        per_datum: bool = False,
        process_group: ProcessGroupLike = None,
    ):
        """Set up the operator (see the class docstring for the arguments)."""
        if not isinstance(per_datum, bool):
            raise ValueError(f"per_datum must be a bool; got {per_datum!r}.")
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            process_group=process_group,
        )
        self._per_datum = per_datum
        if per_datum:
            self._loss = PerDatumLoss(self._loss)

    @property
    def per_datum(self) -> bool:
        """Whether the gradients are per data point (else per loss term)."""
        return self._per_datum

    def _factor_kind(self) -> OutputFactorKind:  # noqa: D102
        return EFFactor()


class FisherMCLinearOperator(CurvatureLinearOperator):
    r"""Monte-Carlo Fisher: a deterministic, seeded sample of the type-I Fisher.

    .. math::
        \mathbf{A} = \sum_b c_b \sum_t \mathbf{J}_t^\top
        \Big(\frac{1}{M}\sum_{m=1}^M \mathbf{g}_{tm}\mathbf{g}_{tm}^\top\Big)
        \mathbf{J}_t,
        \qquad \mathbf{g}_{tm} = \nabla_{\mathbf{f}_t}\ell(\mathbf{f}_t,
        \tilde{\mathbf{y}}_{tm}),\ \tilde{\mathbf{y}}_{tm} \sim q(\cdot\mid\mathbf{f}_t).

    Its expectation is the GGN. Sampling: at the start of every product (and every
    pass of :meth:`factor_batches`, :meth:`to_dense`, ...) a fresh internal
    ``torch.Generator`` on the params' device is seeded with ``seed`` (read anew from
    ``self._seed`` each time, as is ``self._mc_samples``); then, batch by batch in data
    order, ``M`` would-be gradients per term are drawn from it (the same draws as
    curvlinops 3.0, see :meth:`curvlinops_fisher.losses.FisherLoss.sample_gradients`).
    The global RNG is neither used nor advanced, and all columns of a product see the
    same sample, so the operator is one fixed matrix. The samples live in output space:
    the cost of a product barely depends on ``mc_samples``. The Gaussian draws of
    ``MSELoss`` do not depend on the model's output, so the operator keeps them from
    one product to the next (:class:`~curvlinops_fisher.factors.SampleCache`, at most
    :data:`~curvlinops_fisher.factors.SAMPLE_CACHE_BYTES`): the same numbers,
    without drawing them again.

    Args:
        model_func: See :class:`CurvatureLinearOperator`.
        loss_func: See :class:`CurvatureLinearOperator`.
        params: See :class:`CurvatureLinearOperator`.
        data: See :class:`CurvatureLinearOperator`; the order of batches must be fixed.
        progressbar: See :class:`CurvatureLinearOperator`.
        check_deterministic: See :class:`CurvatureLinearOperator`.
        seed: Seed of the internal generator. Default: ``2147483647``.
        mc_samples: Number ``M`` of would-be gradients per loss term. Default: ``1``.
        num_data: See :class:`CurvatureLinearOperator`.
        batch_size_fn: See :class:`CurvatureLinearOperator`.
        process_group: See :class:`CurvatureLinearOperator`. With a group the sample
            is drawn differently (see below).

    With a process group, batch ``i`` of rank ``r``'s shard (in data order) draws its
    sample from a generator seeded with
    :func:`~curvlinops_fisher.distributed.rank_batch_seed` ``(seed, r, i)`` at the
    start of that batch. The operator is then the MC Fisher of the concatenated
    data with this sample: deterministic, independent of the products taken before,
    and a function of ``seed`` and of how the batches are laid out over the ranks.
    It is a different (equally valid) sample than the single-process operator's,
    whose one generator runs through all batches.
    """

    FIXED_DATA_ORDER: bool = True

    def __init__(
        self,
        model_func: Module,
        loss_func: Module,
        params: list[Tensor],
        data: Iterable[Batch],
        progressbar: bool = False,
        check_deterministic: bool = True,
        seed: int = DEFAULT_MC_SEED,
        mc_samples: int = 1,
        num_data: int | None = None,
        batch_size_fn: Callable | None = None,
        *,
        process_group: ProcessGroupLike = None,
    ):
        """Set up the operator (see the class docstring for the arguments)."""
        _check_positive_int("mc_samples", mc_samples)
        make_fisher_loss(loss_func).check_sampling()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int; got {seed!r}.")
        self._seed = seed
        self._mc_samples = mc_samples
        self._sample_cache = SampleCache()
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            process_group=process_group,
        )

    @property
    def seed(self) -> int:
        """Seed of the internal generator, applied at the start of every product."""
        return self._seed

    @property
    def mc_samples(self) -> int:
        """Number of would-be gradients per loss term."""
        return self._mc_samples

    def _factor_kind(self) -> OutputFactorKind:  # noqa: D102
        _check_positive_int("mc_samples", self._mc_samples)
        if self._process_group is not None:
            return RankSeededMCFisherFactor(
                self._mc_samples, self._seed, self._rank, self.device
            )
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self._seed)
        cache = self._sample_cache.for_key((self._seed, self._mc_samples, self.device))
        return MCFisherFactor(self._mc_samples, generator, cache)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")
