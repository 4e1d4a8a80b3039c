r"""The losses layer: the only module that knows about loss functions.

Every supported PyTorch loss is wrapped in one small class that gives the operators
what they need, always in terms of the **loss terms** of a batch:

- ``flatten`` / ``unflatten``: reshape a model output ``f`` into a matrix of loss terms
  ``(T, C)`` (one row per term, ``C`` outputs each) and back;
- ``check_targets``: validate the targets ``y`` against the output;
- ``mean_denominator``: what PyTorch's ``reduction='mean'`` divides the batch loss by;
- the output-space math of the *sum-reduced* per-term loss
  :math:`\ell(\mathbf{f}_t, \mathbf{y}_t)`: its gradient, its Hessian applied to
  vectors, a Hessian square root, and would-be gradients sampled from the model's
  likelihood with a given ``torch.Generator``.

The reduction scale :math:`c` of the whole data set's risk is applied by the callers
(see :meth:`FisherLoss.batch_scale`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from math import sqrt

import torch
from torch import Generator, Tensor
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, Module, MSELoss
from torch.nn.functional import one_hot

from curvlinops_fisher.errors import TargetError, UnsupportedLossError

SUPPORTED_REDUCTIONS = ("mean", "sum")


class FisherLoss(ABC):
    r"""Output-space math of one supported loss function.

    A batch output ``f`` holds ``T`` loss terms of ``C`` entries each. The loss of the
    batch is :math:`L = c_{\text{batch}} \sum_{t=1}^T \ell(\mathbf{f}_t, \mathbf{y}_t)`
    with :math:`c_{\text{batch}} = 1` for ``reduction='sum'`` and
    :math:`1 / D` for ``reduction='mean'`` (:meth:`mean_denominator`).

    Args:
        loss_func: The PyTorch loss module that is wrapped.
    """

    loss_type: type[Module]

    def __init__(self, loss_func: Module):
        """Store the loss and check its reduction (see class docstring)."""
        reduction = getattr(loss_func, "reduction", None)
        if reduction not in SUPPORTED_REDUCTIONS:
            raise UnsupportedLossError(
                f"{type(loss_func).__name__}(reduction={reduction!r}) is not supported: "
                f"the curvature needs a scalar risk. Use reduction='mean' or 'sum'."
            )
        self.loss_func = loss_func
        self.reduction: str = reduction

    # ----------------------------------------------------------------- layout
    @abstractmethod
    def class_axis(self, ndim: int) -> int:
        """Return the axis of an ``ndim``-dimensional output holding a term's entries."""

    def num_classes(self, output: Tensor) -> int:
        """Return ``C``, the number of output entries per loss term."""
        return 1 if output.ndim == 1 else output.shape[self.class_axis(output.ndim)]

    def flatten(self, x: Tensor, lead: int = 0) -> Tensor:
        """Reshape an output-shaped tensor into loss terms.

        Args:
            x: Tensor of shape ``(*L, *output_shape)`` with ``lead = len(L)`` leading
                axes (e.g. a column axis).
            lead: Number of leading axes.

        Returns:
            Tensor of shape ``(*L, T, C)``.
        """
        output_ndim = x.ndim - lead
        if output_ndim == 1:
            return x.unsqueeze(-1)
        axis = lead + self.class_axis(output_ndim)
        C = x.shape[axis]
        return x.movedim(axis, -1).reshape(*x.shape[:lead], -1, C)

    def unflatten(self, x: Tensor, output_shape: torch.Size, lead: int = 0) -> Tensor:
        """Inverse of :meth:`flatten`.

        Args:
            x: Tensor of shape ``(*L, T, C)``.
            output_shape: Shape of the model output the terms came from.
            lead: Number of leading axes.

        Returns:
            Tensor of shape ``(*L, *output_shape)``.
        """
        leading = x.shape[:lead]
        if len(output_shape) == 1:
            return x.reshape(*leading, *output_shape)
        axis = self.class_axis(len(output_shape))
        moved = list(output_shape)
        C = moved.pop(axis)
        return x.reshape(*leading, *moved, C).movedim(-1, lead + axis)

    @abstractmethod
    def flatten_targets(self, y: Tensor, output: Tensor) -> Tensor:
        """Arrange targets to match :meth:`flatten` of the output: ``(T,)`` or ``(T, C)``."""

    # ------------------------------------------------------------- validation
    @abstractmethod
    def check_targets(self, output: Tensor, y: Tensor) -> None:
        """Raise :class:`TargetError` if ``y`` does not fit ``output`` and the loss."""

    def mean_denominator(self, y: Tensor) -> int:
        """Return the number PyTorch's ``reduction='mean'`` divides the batch loss by.

        For all supported losses (class-index targets for ``CrossEntropyLoss``,
        output-shaped targets otherwise) this is the number of target entries.
        """
        return y.numel()

    def batch_scale(self, y: Tensor, batch_size: int, num_data: int) -> float:
        r"""Scale of a batch's summed term curvatures in the data set's curvature.

        For ``sum`` it is 1. For ``mean`` the data set's risk is
        :math:`\sum_b \frac{N_b}{N} L_b` with :math:`L_b` the batch's ``mean`` loss,
        i.e. :math:`c_b = N_b / (N D_b)`, with :math:`D_b` from
        :meth:`mean_denominator`. When every datum has the same number of terms, this
        is one over the total number of terms of the data set (times ``C`` for
        ``MSELoss`` and ``BCEWithLogitsLoss``), exactly PyTorch's ``mean`` over the
        concatenated data set.

        Args:
            y: The batch's targets.
            batch_size: Number of data points ``N_b`` in the batch.
            num_data: Number of data points ``N`` in the data set.

        Returns:
            The scale :math:`c_b`.
        """
        if self.reduction == "sum":
            return 1.0
        return batch_size / (num_data * self.mean_denominator(y))

    # ------------------------------------------------------- output-space math
    @abstractmethod
    def gradient(self, output: Tensor, y: Tensor) -> Tensor:
        r"""Gradient :math:`\nabla_{\mathbf{f}_t} \ell(\mathbf{f}_t, \mathbf{y}_t)` per term.

        Args:
            output: Flattened output ``(T, C)``.
            y: Flattened targets (see :meth:`flatten_targets`).

        Returns:
            Tensor ``(T, C)``.
        """

    @abstractmethod
    def hessian_matmat(self, output: Tensor, y: Tensor, U: Tensor) -> Tensor:
        r"""Apply each term's Hessian :math:`\mathbf{H}_t = \nabla^2_{\mathbf{f}_t}\ell`.

        Args:
            output: Flattened output ``(T, C)``.
            y: Flattened targets.
            U: Tensor ``(K, T, C)``.

        Returns:
            :math:`\mathbf{H}_t \mathbf{u}_{kt}` for every ``k, t``, shape ``(K, T, C)``.
        """

    @abstractmethod
    def hessian_sqrt(self, output: Tensor, y: Tensor) -> Tensor:
        r"""A square root :math:`\mathbf{S}_t` with :math:`\mathbf{S}_t\mathbf{S}_t^\top = \mathbf{H}_t`.

        Args:
            output: Flattened output ``(T, C)``.
            y: Flattened targets.

        Returns:
            Tensor ``(T, C, C)``.
        """

    @abstractmethod
    def sample_gradients(
        self, output: Tensor, y: Tensor, mc_samples: int, generator: Generator
    ) -> Tensor:
        r"""Would-be gradients :math:`\nabla_{\mathbf{f}_t}\ell(\mathbf{f}_t, \tilde{\mathbf{y}})`.

        The labels :math:`\tilde{\mathbf{y}} \sim q(\cdot \mid \mathbf{f}_t)` are drawn
        from the model's likelihood, using only ``generator``, so that
        :math:`\mathbb{E}[\mathbf{g}\mathbf{g}^\top] = \mathbf{H}_t`. The draws are the
        same as curvlinops 3.0's for the same generator state.

        Args:
            output: Flattened output ``(T, C)`` (detached).
            y: Flattened targets (unused by the likelihood; kept for symmetry).
            mc_samples: Number ``M`` of samples per term.
            generator: The only source of randomness.

        Returns:
            Tensor ``(M, T, C)``.
        """


class MSEFisherLoss(FisherLoss):
    r"""``MSELoss``: :math:`\ell = \|\mathbf{f}_t - \mathbf{y}_t\|^2`, class axis last.

    Gaussian likelihood :math:`\mathcal{N}(\mathbf{f}_t, \tfrac{1}{2}\mathbf{I})`, so
    :math:`\nabla\ell = 2(\mathbf{f}_t - \mathbf{y}_t)`, :math:`\mathbf{H}_t = 2\mathbf{I}`,
    :math:`\mathbf{S}_t = \sqrt{2}\mathbf{I}`, would-be gradients
    :math:`2\boldsymbol{\epsilon}`, :math:`\boldsymbol{\epsilon}\sim\mathcal{N}(0, \tfrac12\mathbf{I})`.
    """

    loss_type = MSELoss

    def class_axis(self, ndim: int) -> int:  # noqa: D102
        return ndim - 1

    def flatten_targets(self, y: Tensor, output: Tensor) -> Tensor:  # noqa: D102
        return self.flatten(y)

    def check_targets(self, output: Tensor, y: Tensor) -> None:  # noqa: D102
        _check_same_shape_float_targets(self, output, y)

    def gradient(self, output: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        return 2 * (output - y)

    def hessian_matmat(self, output: Tensor, y: Tensor, U: Tensor) -> Tensor:  # noqa: D102
        return 2 * U

    def hessian_sqrt(self, output: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        T, C = output.shape
        eye = torch.eye(C, dtype=output.dtype, device=output.device)
        return (sqrt(2.0) * eye).expand(T, C, C)

    def sample_gradients(  # noqa: D102
        self, output: Tensor, y: Tensor, mc_samples: int, generator: Generator
    ) -> Tensor:
        mean = torch.zeros(
            mc_samples, *output.shape, dtype=output.dtype, device=output.device
        )
        std = torch.as_tensor(sqrt(0.5), device=output.device)
        return 2 * torch.normal(mean, std, generator=generator)


class CrossEntropyFisherLoss(FisherLoss):
    r"""``CrossEntropyLoss`` with class-index targets; class axis 1 (PyTorch's layout).

    :math:`\ell = -\log \mathrm{softmax}(\mathbf{f}_t)_{y_t}`, with
    :math:`\mathbf{p}_t = \mathrm{softmax}(\mathbf{f}_t)`:
    :math:`\nabla\ell = \mathbf{p}_t - \mathbf{e}_{y_t}`,
    :math:`\mathbf{H}_t = \mathrm{diag}(\mathbf{p}_t) - \mathbf{p}_t\mathbf{p}_t^\top`
    (applied in closed form, never materialised),
    :math:`\mathbf{S}_t = \mathrm{diag}(\sqrt{\mathbf{p}_t}) - \mathbf{p}_t\sqrt{\mathbf{p}_t}^\top`,
    would-be gradients :math:`\mathbf{p}_t - \mathbf{e}_{\tilde y}`,
    :math:`\tilde y \sim \mathrm{Categorical}(\mathbf{p}_t)`.
    """

    loss_type = CrossEntropyLoss

    def __init__(self, loss_func: CrossEntropyLoss):
        """Reject options whose curvature is not implemented yet (see class doc)."""
        super().__init__(loss_func)
        if loss_func.weight is not None:
            raise UnsupportedLossError(
                "CrossEntropyLoss(weight=...) is not supported yet. Remove the class "
                "weights, or rescale the operator yourself."
            )
        if loss_func.label_smoothing != 0.0:
            raise UnsupportedLossError(
                "CrossEntropyLoss(label_smoothing=...) is not supported yet. "
                "Use label_smoothing=0.0."
            )

    def class_axis(self, ndim: int) -> int:  # noqa: D102
        return 1

    def flatten(self, x: Tensor, lead: int = 0) -> Tensor:  # noqa: D102
        if x.ndim - lead < 2:
            raise TargetError(
                "CrossEntropyLoss needs model outputs of shape (N, C) or "
                f"(N, C, d1, ...); got {tuple(x.shape[lead:])}. Return batched logits."
            )
        return super().flatten(x, lead)

    def flatten_targets(self, y: Tensor, output: Tensor) -> Tensor:  # noqa: D102
        return y.reshape(-1)

    def check_targets(self, output: Tensor, y: Tensor) -> None:  # noqa: D102
        self.flatten(output)  # checks the output's rank
        expected = (output.shape[0], *output.shape[2:])
        if y.is_floating_point() or y.is_complex():
            if y.shape == output.shape:
                raise UnsupportedLossError(
                    "CrossEntropyLoss with probability (soft) targets is not supported "
                    "yet. Pass class indices (an integer tensor of shape "
                    f"{expected})."
                )
            raise TargetError(
                f"CrossEntropyLoss targets must be integer class indices; got dtype "
                f"{y.dtype}. Convert them with y.long()."
            )
        if tuple(y.shape) != expected:
            raise TargetError(
                f"CrossEntropyLoss targets must have shape {expected} for outputs of "
                f"shape {tuple(output.shape)} (classes on axis 1); got "
                f"{tuple(y.shape)}."
            )
        if y.numel() == 0:
            return
        C = output.shape[1]
        y_min, y_max = int(y.min()), int(y.max())
        if y_min < 0 or y_max >= C:
            bad = y_min if y_min < 0 else y_max
            hint = (
                f" It equals ignore_index={self.loss_func.ignore_index}: ignored targets "
                "are not supported yet; drop those terms from the data."
                if bad == self.loss_func.ignore_index
                else ""
            )
            raise TargetError(
                f"CrossEntropyLoss class index {bad} is out of range [0, {C - 1}] for "
                f"{C} classes.{hint} Check the labels or the model's number of outputs."
            )

    def gradient(self, output: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        return output.softmax(dim=-1) - one_hot(y, output.shape[-1]).to(output.dtype)

    def hessian_matmat(self, output: Tensor, y: Tensor, U: Tensor) -> Tensor:  # noqa: D102
        p = output.softmax(dim=-1)
        return p * U - p * (p * U).sum(-1, keepdim=True)

    def hessian_sqrt(self, output: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        p = output.softmax(dim=-1)
        sqrt_p = p.sqrt()
        return torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)

    def sample_gradients(  # noqa: D102
        self, output: Tensor, y: Tensor, mc_samples: int, generator: Generator
    ) -> Tensor:
        p = output.softmax(dim=1)
        labels = p.multinomial(
            num_samples=mc_samples, replacement=True, generator=generator
        )
        return p - one_hot(labels.T, p.shape[1]).to(p.dtype)


class BCEWithLogitsFisherLoss(FisherLoss):
    r"""``BCEWithLogitsLoss`` with targets in [0, 1]; class axis last.

    With :math:`\sigma = \mathrm{sigmoid}(\mathbf{f}_t)` (element-wise):
    :math:`\nabla\ell = \sigma - \mathbf{y}_t`,
    :math:`\mathbf{H}_t = \mathrm{diag}(\sigma(1-\sigma))`,
    :math:`\mathbf{S}_t = \mathrm{diag}(\sqrt{\sigma(1-\sigma)})`, would-be gradients
    :math:`\sigma - \tilde{\mathbf{y}}`, :math:`\tilde{\mathbf{y}} \sim \mathrm{Bernoulli}(\sigma)`.
    """

    loss_type = BCEWithLogitsLoss

    def __init__(self, loss_func: BCEWithLogitsLoss):
        """Reject options whose curvature is not implemented yet (see class doc)."""
        super().__init__(loss_func)
        for option in ("weight", "pos_weight"):
            if getattr(loss_func, option) is not None:
                raise UnsupportedLossError(
                    f"BCEWithLogitsLoss({option}=...) is not supported yet. Remove "
                    f"{option}."
                )

    def class_axis(self, ndim: int) -> int:  # noqa: D102
        return ndim - 1

    def flatten_targets(self, y: Tensor, output: Tensor) -> Tensor:  # noqa: D102
        return self.flatten(y)

    def check_targets(self, output: Tensor, y: Tensor) -> None:  # noqa: D102
        _check_same_shape_float_targets(self, output, y)
        if y.numel() and (bool(y.min() < 0) or bool(y.max() > 1)):
            raise TargetError(
                "BCEWithLogitsLoss targets must lie in [0, 1]; got values in "
                f"[{float(y.min())}, {float(y.max())}]. Pass probabilities or 0/1 labels."
            )

    def gradient(self, output: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        return output.sigmoid() - y

    def hessian_matmat(self, output: Tensor, y: Tensor, U: Tensor) -> Tensor:  # noqa: D102
        s = output.sigmoid()
        return s * (1 - s) * U

    def hessian_sqrt(self, output: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        s = output.sigmoid()
        return torch.diag_embed((s * (1 - s)).sqrt())

    def sample_gradients(  # noqa: D102
        self, output: Tensor, y: Tensor, mc_samples: int, generator: Generator
    ) -> Tensor:
        p = output.sigmoid()
        labels = (
            p.unsqueeze(0).expand(mc_samples, -1, -1).bernoulli(generator=generator)
        )
        return p - labels


def _check_same_shape_float_targets(
    loss: FisherLoss, output: Tensor, y: Tensor
) -> None:
    """Targets of ``MSELoss``/``BCEWithLogitsLoss``: floating, shaped like the output."""
    name = type(loss.loss_func).__name__
    if tuple(y.shape) != tuple(output.shape):
        raise TargetError(
            f"{name} targets must have the model output's shape {tuple(output.shape)}; "
            f"got {tuple(y.shape)}. PyTorch would broadcast them silently; reshape the "
            "targets (e.g. y.unsqueeze(-1)) or the output."
        )
    if not y.is_floating_point():
        raise TargetError(
            f"{name} targets must be floating point; got dtype {y.dtype}. Convert them "
            f"with y.to({output.dtype})."
        )


_LOSSES: tuple[type[FisherLoss], ...] = (
    MSEFisherLoss,
    CrossEntropyFisherLoss,
    BCEWithLogitsFisherLoss,
)


def make_fisher_loss(loss_func: Module) -> FisherLoss:
    """Wrap a PyTorch loss in the matching :class:`FisherLoss`.

    Args:
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.

    Returns:
        The wrapper that holds the loss's output-space math.

    Raises:
        UnsupportedLossError: For any other loss, reduction or unsupported option.
    """
    for loss_class in _LOSSES:
        if isinstance(loss_func, loss_class.loss_type):
            return loss_class(loss_func)
    supported = ", ".join(cls.loss_type.__name__ for cls in _LOSSES)
    raise UnsupportedLossError(
        f"Unsupported loss function {type(loss_func).__name__}: the Fisher family "
        f"needs a negative log-likelihood loss. Use one of {supported}."
    )
