r"""The reduction scale of a data set's risk: the factor :math:`c_b` of every batch.

A data set of ``N`` points in batches ``b`` of ``N_b`` points has the risk
:math:`\sum_b c_b \sum_{t \in b} \ell_t` of its sum-reduced loss terms, with

- :math:`c_b = 1` for ``reduction='sum'``;
- :math:`c_b = N_b / (N D_b)` for ``reduction='mean'``, :math:`D_b` what PyTorch's
  ``mean`` divides the batch loss by (the number of terms for ``CrossEntropyLoss``,
  times ``C`` for ``MSELoss`` and ``BCEWithLogitsLoss``; curvlinops' convention);
- :math:`c_b = 1 / D`, :math:`D = \sum_b D_b` counted once over the whole data set,
  where :math:`D_b` depends on the targets (``CrossEntropyLoss`` class indices with
  ignored targets or class weights): PyTorch's ``mean`` on the concatenated data.

:class:`RiskScale` holds this rule, built once from a scan of the data
(:meth:`RiskScale.scan`, summed over the ranks of a process group).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor
from torch.nn import CrossEntropyLoss, Module

from curvlinops_fisher.errors import TargetError


@dataclass(frozen=True, eq=False)
class MeanDivisor:
    r"""What PyTorch's ``reduction='mean'`` divides a batch's summed loss by, :math:`D_b`.

    For ``MSELoss`` and ``BCEWithLogitsLoss`` (also with ``weight``/``pos_weight``)
    the number of target entries. For ``CrossEntropyLoss`` the number of terms; for
    class indices, the number of non-ignored terms, or with class weights the sum of
    their targets' weights.

    Attributes:
        cross_entropy: Whether the loss is ``CrossEntropyLoss`` (classes on axis 1).
        ignore_index: Its ignored class index (unused otherwise).
        weight: Its class weights, or ``None``.
    """

    cross_entropy: bool = False
    ignore_index: int = -100
    weight: Tensor | None = None

    @classmethod
    def of(cls, loss_func: Module) -> MeanDivisor:
        """The divisor rule of a supported PyTorch loss."""
        if isinstance(loss_func, CrossEntropyLoss):
            return cls(True, loss_func.ignore_index, loss_func.weight)
        return cls()

    def __call__(self, y: Tensor) -> float:
        """:math:`D_b` of a batch's targets ``y``."""
        if not self.cross_entropy:
            return y.numel()
        if y.is_floating_point():  # probabilities: one term per row of C
            return y.numel() // y.shape[1] if y.ndim > 1 else 0
        counted = y != self.ignore_index
        if self.weight is None:
            return int(counted.sum())
        return float(self.weight.to(y.device)[y[counted]].sum())

    def depends_on_targets(self, y: Tensor) -> bool:
        """Whether these targets make :math:`D_b` more than a count of terms.

        ``True`` for ``CrossEntropyLoss`` class indices with class weights or with
        ignored entries: then the data set's :math:`D` is used (module docstring).
        """
        if not self.cross_entropy or y.is_floating_point():
            return False
        return self.weight is not None or bool((y == self.ignore_index).any())


@dataclass(frozen=True)
class TargetCount:
    r"""A part of the data set's scan: :math:`\sum_b D_b` and whether :math:`D` is needed.

    Parts (e.g. the shards of the ranks of a process group) add up.

    Attributes:
        divisor: The summed :math:`D_b` of the part's batches.
        needed: Whether some batch's targets need the data set's :math:`D`
            (:meth:`MeanDivisor.depends_on_targets`).
    """

    divisor: float = 0.0
    needed: bool = False

    def __add__(self, other: TargetCount) -> TargetCount:
        """The count of both parts."""
        return TargetCount(self.divisor + other.divisor, self.needed or other.needed)


@dataclass(frozen=True)
class RiskScale:
    r"""The reduction scale :math:`c_b` of every batch of a data set (module docstring).

    Build it with :meth:`from_count` (or :meth:`of_batch` for a data set of one
    batch); never changed afterwards.

    Attributes:
        reduction: The loss's ``reduction``, ``'mean'`` or ``'sum'``.
        num_data: Number ``N`` of data points of the data set.
        divisor: The data set's :math:`D` where :math:`D_b` depends on the targets,
            else ``None`` (then the per-batch rule :math:`N_b / (N D_b)` applies).
        mean_divisor: The rule for :math:`D_b`.
    """

    reduction: str
    num_data: int
    divisor: float | None
    mean_divisor: MeanDivisor

    @staticmethod
    def scans_targets(loss_func: Module) -> bool:
        """Whether :meth:`from_count` needs the targets' :meth:`count` (else ``None``)."""
        return isinstance(loss_func, CrossEntropyLoss) and loss_func.reduction == "mean"

    @staticmethod
    def count(loss_func: Module, targets: Iterable[Tensor]) -> TargetCount:
        """Count the targets of every batch of (a part of) the data set.

        Args:
            loss_func: The PyTorch loss.
            targets: The batches' targets, in any order; always consumed in full.

        Returns:
            Their :class:`TargetCount`.
        """
        rule = MeanDivisor.of(loss_func)
        total, needed = 0.0, False
        for y in targets:  # consumed in full, also when the divisor is not needed
            total += rule(y)
            needed = needed or rule.depends_on_targets(y)
        return TargetCount(total, needed)

    @classmethod
    def from_count(
        cls, loss_func: Module, num_data: int, count: TargetCount | None = None
    ) -> RiskScale:
        """The scale of a data set from its number of points and targets' count.

        Args:
            loss_func: The PyTorch loss, with ``reduction='mean'`` or ``'sum'``.
            num_data: Number ``N`` of data points.
            count: The whole data set's :meth:`count`; ``None`` if not
                :meth:`scans_targets`.

        Returns:
            The scale.

        Raises:
            TargetError: If the data set's :math:`D` is needed and is 0 (every target
                ignored or of weight 0): PyTorch's loss is ``nan`` then.
        """
        reduction, rule = loss_func.reduction, MeanDivisor.of(loss_func)
        if reduction == "sum" or count is None or not count.needed:
            return cls(reduction, num_data, None, rule)
        if count.divisor <= 0:
            raise TargetError(
                f"{type(loss_func).__name__}(reduction='mean') divides by "
                f"{count.divisor} over the whole data set (every target is ignored or "
                "has weight 0), so the loss is nan. Use reduction='sum' or data with "
                "counted targets."
            )
        return cls(reduction, num_data, count.divisor, rule)

    @classmethod
    def of_batch(cls, loss_func: Module, y: Tensor) -> RiskScale:
        """The scale of a data set that is one batch with targets ``y``.

        The batch counts as one data point: its ``batch_scale(y, 1)`` is one over
        PyTorch's ``mean`` divisor of the batch (1 for ``sum``).
        """
        return cls.from_count(loss_func, 1, cls.count(loss_func, [y]))

    def batch_scale(self, y: Tensor, batch_size: int) -> float:
        r"""The scale :math:`c_b` of a batch (module docstring).

        When every datum has the same number of terms, :math:`N_b / (N D_b)` is one
        over the data set's number of terms (times ``C`` for ``MSELoss`` and
        ``BCEWithLogitsLoss``): PyTorch's ``mean`` over the concatenated data set.

        Args:
            y: The batch's targets.
            batch_size: Number of data points ``N_b`` of the batch.

        Returns:
            :math:`c_b`.
        """
        if self.reduction == "sum":
            return 1.0
        if self.divisor is not None:
            return 1.0 / self.divisor
        return batch_size / (self.num_data * self.mean_divisor(y))
