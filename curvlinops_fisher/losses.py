r"""The losses layer: the output-space math of every supported loss function.

Every supported PyTorch loss is wrapped in one small class that gives the operators
what they need, always in terms of the **loss terms** of a batch:

- ``flatten`` / ``unflatten``: reshape a model output ``f`` into a matrix of loss terms
  ``(T, C)`` (one row per term, ``C`` outputs each) and back;
- ``check_targets``: validate the targets ``y`` against the output;
- the output-space math of the *sum-reduced* per-term loss
  :math:`\ell(\mathbf{f}_t, \mathbf{y}_t)`: its gradient, its Hessian applied to
  vectors, a Hessian square root, and would-be gradients sampled from the model's
  likelihood with a given ``torch.Generator``.

The reduction scale of the whole data set's risk (``reduction='mean'``) is not part of
a loss: see :mod:`curvlinops_fisher.risk_scale`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from math import sqrt

import torch
from torch import Generator, Tensor
from torch.func import functional_call
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, Module, MSELoss
from torch.nn.functional import one_hot

from curvlinops_fisher.errors import TargetError, UnsupportedLossError

SUPPORTED_REDUCTIONS = ("mean", "sum")


class FisherLoss(ABC):
    r"""Output-space math of one supported loss function.

    A batch output ``f`` holds ``T`` loss terms of ``C`` entries each. The loss of the
    batch is :math:`L = c_b \sum_{t=1}^T \ell(\mathbf{f}_t, \mathbf{y}_t)` with the
    reduction scale :math:`c_b` of :class:`~curvlinops_fisher.risk_scale.RiskScale`;
    this class holds the math of the sum-reduced terms :math:`\ell`.

    Args:
        loss_func: The PyTorch loss module that is wrapped.

    Raises:
        UnsupportedLossError: If the loss's ``reduction`` is not ``'mean'`` or
            ``'sum'``.
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
        self._summed = copy.deepcopy(loss_func)
        self._summed.reduction = "sum"

    def summed_loss(self, output: Tensor, y: Tensor) -> Tensor:
        """PyTorch's loss of a batch with ``reduction='sum'`` (all other options kept).

        Weights of the loss are converted to the output's dtype and device (as
        arguments of the call: the wrapped copy of the loss is never changed).
        """
        weights = {
            name: w.to(output.device, output.dtype if w.is_floating_point() else None)
            for name, w in self._summed.named_buffers()
        }
        return functional_call(self._summed, weights, (output, y))

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

    def check_sampling(self) -> None:
        """Raise :class:`UnsupportedLossError` if the MC Fisher is not defined.

        The MC Fisher samples labels from the model's likelihood. Losses with options
        that are not part of a likelihood (class or element weights) override this.
        """
        return None

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

    #: Whether :meth:`sample_gradients` draws do not depend on the output's values
    #: (only on its shape, dtype and device and on the generator): then a pass's draws
    #: repeat in every pass and the MC Fisher operator keeps them
    #: (:class:`~curvlinops_fisher.factors.SampleCache`).
    draws_independent_of_output: bool = False

    def sample_labels(
        self, output: Tensor, y: Tensor, mc_samples: int, generator: Generator
    ) -> Tensor | None:
        r"""Sampled class labels ``(T, M)`` (``None`` for losses without labels).

        For losses whose would-be gradients are functions of one label per sample
        (:meth:`sampled_fisher_matmat`); draws exactly what :meth:`sample_gradients`
        draws. ``None``, the default, for other losses.
        """
        return None

    def sampled_fisher_matmat(
        self, output: Tensor, y: Tensor, labels: Tensor, U: Tensor
    ) -> Tensor:
        r"""Apply :math:`\frac{1}{M}\sum_m \mathbf{g}_{tm}\mathbf{g}_{tm}^\top` of labels ``(T, M)``.

        Only for losses whose :meth:`sample_labels` returns labels.
        """
        raise NotImplementedError(f"{type(self).__name__} samples no labels.")

    def labels_to_gradients(self, output: Tensor, y: Tensor, labels: Tensor) -> Tensor:
        """The would-be gradients ``(M, T, C)`` of labels ``(T, M)`` (see above)."""
        raise NotImplementedError(f"{type(self).__name__} samples no labels.")

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
    draws_independent_of_output = True

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
        # What torch.normal(zeros, sqrt(1/2)) draws, bit for bit (curvlinops' draws),
        # without its zero mean tensor.
        epsilon = torch.randn(
            mc_samples,
            *output.shape,
            dtype=output.dtype,
            device=output.device,
            generator=generator,
        )
        return epsilon.mul_(torch.as_tensor(sqrt(0.5), device=output.device)).mul_(2)


class CrossEntropyFisherLoss(FisherLoss):
    r"""``CrossEntropyLoss``, class axis 1 (PyTorch's layout), with all its options.

    Every term is :math:`\ell_t = -\sum_c a_{tc} \log p_{tc}` with
    :math:`\mathbf{p}_t = \mathrm{softmax}(\mathbf{f}_t)` and non-negative
    coefficients :math:`\mathbf{a}_t` (:math:`\mathbf{w}` the class weights, ones if
    ``weight=None``; :math:`\varepsilon` = ``label_smoothing``):

    - class index :math:`y_t`: :math:`\mathbf{a}_t = (1-\varepsilon) w_{y_t}
      \mathbf{e}_{y_t} + \frac{\varepsilon}{C}\mathbf{w}`, and
      :math:`\mathbf{a}_t = \mathbf{0}` if :math:`y_t` = ``ignore_index``;
    - probabilities (soft targets) :math:`\mathbf{y}_t`: :math:`\mathbf{a}_t =
      \mathbf{w} \odot ((1-\varepsilon)\mathbf{y}_t + \frac{\varepsilon}{C})`.

    With :math:`s_t = \sum_c a_{tc}`: :math:`\nabla\ell = s_t\mathbf{p}_t -
    \mathbf{a}_t`, :math:`\mathbf{H}_t = s_t(\mathrm{diag}(\mathbf{p}_t) -
    \mathbf{p}_t\mathbf{p}_t^\top)` (applied in closed form, never materialised),
    :math:`\mathbf{S}_t = \sqrt{s_t}(\mathrm{diag}(\sqrt{\mathbf{p}_t}) -
    \mathbf{p}_t\sqrt{\mathbf{p}_t}^\top)`, would-be gradients
    :math:`\sqrt{s_t}(\mathbf{p}_t - \mathbf{e}_{\tilde y})`,
    :math:`\tilde y \sim \mathrm{Categorical}(\mathbf{p}_t)` (the likelihood; their
    second moment is :math:`\mathbf{H}_t`). Plain class indices have
    :math:`\mathbf{a}_t = \mathbf{e}_{y_t}`, :math:`s_t = 1`.

    PyTorch's ``mean`` divisor (the number of terms, or for class indices with class
    weights or ignored entries :math:`\sum_t w_{y_t}` over the non-ignored terms) is
    the business of :class:`~curvlinops_fisher.risk_scale.RiskScale`.

    The MC Fisher of a loss with class weights is not defined (:meth:`check_sampling`):
    the weight belongs to the true label, not to a likelihood one can sample from.

    Raises:
        UnsupportedLossError: If ``weight`` has negative entries (the curvature would
            be indefinite).
    """

    loss_type = CrossEntropyLoss

    def __init__(self, loss_func: CrossEntropyLoss):
        """Check the options (see class docstring)."""
        super().__init__(loss_func)
        weight = loss_func.weight
        if weight is not None and (weight.ndim != 1 or bool((weight < 0).any())):
            raise UnsupportedLossError(
                "CrossEntropyLoss(weight=...) must be a 1-D tensor of non-negative "
                f"class weights; got shape {tuple(weight.shape)} with minimum "
                f"{float(weight.min()) if weight.numel() else 'n/a'}. Negative weights "
                "make the curvature indefinite."
            )
        self.ignore_index: int = loss_func.ignore_index
        self.smoothing: float = float(loss_func.label_smoothing)

    def check_sampling(self) -> None:
        """Raise for class weights (see class docstring)."""
        if self.loss_func.weight is not None:
            raise UnsupportedLossError(
                "The Monte-Carlo Fisher of CrossEntropyLoss(weight=...) is not defined: "
                "a class weight belongs to the true label, so the weighted loss is not "
                "a log-likelihood to sample labels from. Use GGNLinearOperator (the "
                "exact Fisher of the weighted loss) or EFLinearOperator."
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

    @staticmethod
    def _soft(y: Tensor) -> bool:
        """Whether (flattened or not) targets are probabilities (PyTorch's rule)."""
        return y.is_floating_point()

    def flatten_targets(self, y: Tensor, output: Tensor) -> Tensor:
        """Class indices ``(T,)``, or probabilities flattened like the output ``(T, C)``."""
        return self.flatten(y) if self._soft(y) else y.reshape(-1)

    def check_targets(self, output: Tensor, y: Tensor) -> None:  # noqa: D102
        self.flatten(output)  # checks the output's rank
        expected = (output.shape[0], *output.shape[2:])
        C = output.shape[1]
        weight = self.loss_func.weight
        if weight is not None and weight.numel() != C:
            raise TargetError(
                f"CrossEntropyLoss(weight=...) has {weight.numel()} class weights but "
                f"the model outputs C={C} classes (axis 1 of {tuple(output.shape)}). "
                "Pass one weight per class."
            )
        if y.is_complex():
            raise TargetError(
                f"CrossEntropyLoss targets must be integer class indices or float "
                f"probabilities; got dtype {y.dtype}."
            )
        if self._soft(y):
            if tuple(y.shape) != tuple(output.shape):
                raise TargetError(
                    f"CrossEntropyLoss probability (soft) targets must have the output's"
                    f" shape {tuple(output.shape)}; got {tuple(y.shape)}. For class "
                    "indices, pass an integer tensor (y.long())."
                )
            if y.numel() and not bool((y >= 0).all()):
                raise TargetError(
                    "CrossEntropyLoss probability (soft) targets must be non-negative "
                    f"(and finite); got minimum {float(y.min())}. Pass probabilities."
                )
            return
        if tuple(y.shape) != expected:
            raise TargetError(
                f"CrossEntropyLoss targets must have shape {expected} for outputs of "
                f"shape {tuple(output.shape)} (classes on axis 1); got "
                f"{tuple(y.shape)}."
            )
        counted = y[y != self.ignore_index]
        if counted.numel() == 0:
            return
        y_min, y_max = int(counted.min()), int(counted.max())
        if y_min < 0 or y_max >= C:
            bad = y_min if y_min < 0 else y_max
            raise TargetError(
                f"CrossEntropyLoss class index {bad} is out of range [0, {C - 1}] for "
                f"{C} classes (and is not ignore_index={self.ignore_index}). Check the "
                "labels, the model's number of outputs, or ignore_index."
            )

    def _coefficients(self, y: Tensor, like: Tensor) -> tuple[Tensor, Tensor | None]:
        r"""The term scales :math:`s_t` ``(T,)`` and, for soft targets, :math:`\mathbf{a}_t`.

        For class indices the coefficients are applied by :meth:`gradient` without
        forming :math:`\mathbf{a}_t` (second entry ``None``).
        """
        dtype, device = like.dtype, like.device
        weight = self.loss_func.weight
        w = None if weight is None else weight.to(dtype=dtype, device=device)
        eps, C = self.smoothing, like.shape[-1]
        if self._soft(y):
            a = y.to(dtype)
            if eps:
                a = (1 - eps) * a + eps / C
            if w is not None:
                a = a * w
            return a.sum(-1), a
        labels, w_y = self._label_weights(y, w, dtype)
        if eps and w is not None:
            counted = (y != self.ignore_index).to(dtype)
            return (1 - eps) * w_y + (eps / C) * w.sum() * counted, None
        return w_y, None  # without class weights, s_t = 1 (0 if ignored) for any eps

    def _label_weights(
        self, y: Tensor, w: Tensor | None, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Labels with ignored ones set to 0, and :math:`w_{y_t}` (0 if ignored)."""
        counted = y != self.ignore_index
        labels = torch.where(counted, y, 0)
        w_y = counted.to(dtype) if w is None else w[labels] * counted
        return labels, w_y

    def gradient(self, output: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        p = output.softmax(dim=-1)
        s, a = self._coefficients(y, output)
        if a is not None:
            return s.unsqueeze(-1) * p - a
        weight, eps, C = self.loss_func.weight, self.smoothing, p.shape[-1]
        w = None if weight is None else weight.to(dtype=p.dtype, device=p.device)
        labels, w_y = self._label_weights(y, w, p.dtype)
        on_label = w_y if not eps else (1 - eps) * w_y
        grad = s.unsqueeze(-1) * p - one_hot(labels, C).to(p.dtype) * (
            on_label.unsqueeze(-1)
        )
        if eps:
            counted = (y != self.ignore_index).to(p.dtype).unsqueeze(-1)
            grad = grad - (eps / C) * (counted if w is None else counted * w)
        return grad

    def hessian_matmat(self, output: Tensor, y: Tensor, U: Tensor) -> Tensor:  # noqa: D102
        p = output.softmax(dim=-1)
        s, _ = self._coefficients(y, output)
        return s.unsqueeze(-1) * (p * U - p * (p * U).sum(-1, keepdim=True))

    def hessian_sqrt(self, output: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        p = output.softmax(dim=-1)
        sqrt_p = p.sqrt()
        s, _ = self._coefficients(y, output)
        S = torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)
        return s.sqrt()[:, None, None] * S

    def sample_labels(  # noqa: D102
        self, output: Tensor, y: Tensor, mc_samples: int, generator: Generator
    ) -> Tensor:
        self.check_sampling()
        return output.softmax(dim=1).multinomial(
            num_samples=mc_samples, replacement=True, generator=generator
        )

    def labels_to_gradients(  # noqa: D102
        self, output: Tensor, y: Tensor, labels: Tensor
    ) -> Tensor:
        p = output.softmax(dim=1)
        G = p - one_hot(labels.T, p.shape[1]).to(p.dtype)
        s, _ = self._coefficients(y, output)
        return s.sqrt().unsqueeze(-1) * G

    def sampled_fisher_matmat(  # noqa: D102
        self, output: Tensor, y: Tensor, labels: Tensor, U: Tensor
    ) -> Tensor:
        # With label frequencies f_t (T, C) of the M samples,
        # (s/M) sum_m (p - e_m)(p - e_m)^T = s (p p^T - p f^T - f p^T + diag(f)),
        # applied without forming the M gradients:
        # s ((p - f)(p.u) - p (f.u) + f * u).
        p = output.softmax(dim=1)
        f = torch.zeros_like(p).scatter_add_(
            1, labels, torch.ones_like(labels, dtype=p.dtype)
        )
        f = f / labels.shape[1]
        s, _ = self._coefficients(y, output)
        pu = (U * p).sum(-1, keepdim=True)
        fu = (U * f).sum(-1, keepdim=True)
        return s.unsqueeze(-1) * ((p - f) * pu - p * fu + f * U)

    def sample_gradients(  # noqa: D102
        self, output: Tensor, y: Tensor, mc_samples: int, generator: Generator
    ) -> Tensor:
        labels = self.sample_labels(output, y, mc_samples, generator)
        return self.labels_to_gradients(output, y, labels)


class BCEWithLogitsFisherLoss(FisherLoss):
    r"""``BCEWithLogitsLoss`` with targets in [0, 1]; class axis last; any output rank.

    With :math:`\sigma = \mathrm{sigmoid}(\mathbf{f}_t)` (element-wise), element
    weights :math:`\mathbf{w}` (``weight``, broadcast to the output; ones if ``None``)
    and positive-class weights :math:`\boldsymbol{\rho}` (``pos_weight``, broadcast
    along the class axis; ones if ``None``), PyTorch's per-entry loss is
    :math:`-w[\rho y \log\sigma + (1-y)\log(1-\sigma)]`. With
    :math:`\mathbf{h} = \mathbf{w}\odot(\boldsymbol{\rho}\odot\mathbf{y}_t + 1 -
    \mathbf{y}_t)` and :math:`\mathbf{b} = \mathbf{w}\odot\boldsymbol{\rho}\odot
    \mathbf{y}_t`:
    :math:`\nabla\ell = \mathbf{h}\odot\sigma - \mathbf{b}`,
    :math:`\mathbf{H}_t = \mathrm{diag}(\mathbf{h}\odot\sigma(1-\sigma))`,
    :math:`\mathbf{S}_t = \mathrm{diag}(\sqrt{\mathbf{h}\odot\sigma(1-\sigma)})`.
    Without weights :math:`\mathbf{h} = \mathbf{1}`, :math:`\mathbf{b} =
    \mathbf{y}_t`, and would-be gradients are :math:`\sigma - \tilde{\mathbf{y}}`,
    :math:`\tilde{\mathbf{y}} \sim \mathrm{Bernoulli}(\sigma)`. ``mean`` divides
    by the number of entries, weights or not (as PyTorch does).

    The MC Fisher with ``weight`` or ``pos_weight`` is not defined
    (:meth:`check_sampling`): the weighted loss is not a Bernoulli log-likelihood
    (with ``pos_weight`` its Hessian even depends on the true label).

    Raises:
        UnsupportedLossError: If ``weight`` or ``pos_weight`` has negative entries.
    """

    loss_type = BCEWithLogitsLoss

    def __init__(self, loss_func: BCEWithLogitsLoss):
        """Check the options (see class docstring)."""
        super().__init__(loss_func)
        for option in ("weight", "pos_weight"):
            value = getattr(loss_func, option)
            if value is not None and bool((value < 0).any()):
                raise UnsupportedLossError(
                    f"BCEWithLogitsLoss({option}=...) has negative entries (minimum "
                    f"{float(value.min())}); they make the curvature indefinite. Pass "
                    f"non-negative {option}."
                )
        self.weighted = loss_func.weight is not None or loss_func.pos_weight is not None

    def check_sampling(self) -> None:
        """Raise for ``weight``/``pos_weight`` (see class docstring)."""
        if self.weighted:
            raise UnsupportedLossError(
                "The Monte-Carlo Fisher of BCEWithLogitsLoss(weight=... or "
                "pos_weight=...) is not defined: the weighted loss is not a Bernoulli "
                "log-likelihood to sample labels from. Use GGNLinearOperator (the exact "
                "Fisher of the weighted loss) or EFLinearOperator."
            )

    def class_axis(self, ndim: int) -> int:  # noqa: D102
        return ndim - 1

    def flatten_targets(self, y: Tensor, output: Tensor) -> Tensor:
        r"""Targets ``(T, C)``; with weights, :math:`[\mathbf{h}, \mathbf{b}]` ``(T, C, 2)``.

        The weights are broadcast to the batch's output here, the only place that
        knows its shape (see the class docstring for :math:`\mathbf{h}, \mathbf{b}`).
        """
        if not self.weighted:
            return self.flatten(y)
        weight, pos_weight = (
            None if w is None else w.to(output)
            for w in (self.loss_func.weight, self.loss_func.pos_weight)
        )
        y = y.to(output)
        h = torch.ones_like(y) if pos_weight is None else pos_weight * y + 1 - y
        b = y if pos_weight is None else pos_weight * y
        if weight is not None:
            h, b = weight * h, weight * b
        hb = torch.stack([h.expand(output.shape), b.expand(output.shape)], dim=-1)
        return hb.reshape(-1, self.num_classes(output), 2)

    def check_targets(self, output: Tensor, y: Tensor) -> None:  # noqa: D102
        _check_same_shape_float_targets(self, output, y)
        if y.numel() and (bool(y.min() < 0) or bool(y.max() > 1)):
            raise TargetError(
                "BCEWithLogitsLoss targets must lie in [0, 1]; got values in "
                f"[{float(y.min())}, {float(y.max())}]. Pass probabilities or 0/1 labels."
            )
        for option in ("weight", "pos_weight"):
            value = getattr(self.loss_func, option)
            if value is not None and not _broadcasts_to(value.shape, output.shape):
                raise TargetError(
                    f"BCEWithLogitsLoss({option}=...) of shape {tuple(value.shape)} "
                    f"does not broadcast to the model output's shape "
                    f"{tuple(output.shape)}. Reshape {option}."
                )

    @staticmethod
    def _coefficients(y: Tensor) -> tuple[Tensor | None, Tensor]:
        r""":math:`\mathbf{h}` (``None`` for ones) and :math:`\mathbf{b}` of flattened targets."""
        if y.ndim == 3:
            return y[..., 0], y[..., 1]
        return None, y

    def gradient(self, output: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        h, b = self._coefficients(y)
        s = output.sigmoid()
        return (s if h is None else h * s) - b

    def _curvature(self, output: Tensor, y: Tensor) -> Tensor:
        r"""The diagonal of :math:`\mathbf{H}_t`, :math:`\mathbf{h}\odot\sigma(1-\sigma)`."""
        h, _ = self._coefficients(y)
        s = output.sigmoid()
        d = s * (1 - s)
        return d if h is None else h * d

    def hessian_matmat(self, output: Tensor, y: Tensor, U: Tensor) -> Tensor:  # noqa: D102
        return self._curvature(output, y) * U

    def hessian_sqrt(self, output: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        return torch.diag_embed(self._curvature(output, y).sqrt())

    def sample_gradients(  # noqa: D102
        self, output: Tensor, y: Tensor, mc_samples: int, generator: Generator
    ) -> Tensor:
        self.check_sampling()
        p = output.sigmoid()
        labels = (
            p.unsqueeze(0).expand(mc_samples, -1, -1).bernoulli(generator=generator)
        )
        return p - labels


class PerDatumLoss:
    r"""View of a :class:`FisherLoss` whose terms are whole data points.

    A batch output of ``N`` data points with ``Q`` terms of ``C`` entries each is
    flattened to ``(N, Q C)`` instead of ``(N Q, C)``; the gradient of a datum is the
    concatenation of its terms' gradients, i.e. the output gradient of the datum's
    summed loss :math:`\ell_n = \sum_{t \in n} \ell_t`. Used for the empirical
    Fisher of per-datum gradients (:math:`\mathbf{B}_n = \nabla_{\mathbf{f}_n}
    \ell_n`, one row per datum); everything else (e.g. the targets) is the wrapped
    loss's. Only :meth:`gradient` of the output-space math is defined: the Hessian of
    :math:`\ell_n` is block-diagonal over its terms, so the GGN and the MC Fisher are
    the same per term and per datum.

    Args:
        loss: The per-term loss.
    """

    def __init__(self, loss: FisherLoss):
        """Wrap ``loss`` (see class docstring)."""
        self.loss = loss

    def __getattr__(self, name: str):
        """Everything but the layout and the gradient is the wrapped loss's."""
        if name == "loss":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loss, name)

    def flatten(self, x: Tensor, lead: int = 0) -> Tensor:
        """``(*L, N, ...)`` -> ``(*L, N, Q C)`` (terms of a datum stay contiguous)."""
        terms = self.loss.flatten(x, lead)
        return terms.reshape(*x.shape[:lead], x.shape[lead], -1)

    def unflatten(self, x: Tensor, output_shape: torch.Size, lead: int = 0) -> Tensor:
        """Inverse of :meth:`flatten`."""
        ndim = len(output_shape)
        C = 1 if ndim == 1 else output_shape[self.loss.class_axis(ndim)]
        terms = x.reshape(*x.shape[:lead], -1, C)
        return self.loss.unflatten(terms, output_shape, lead)

    def gradient(self, output: Tensor, y: Tensor) -> Tensor:
        """Per-datum output gradients ``(N, Q C)`` from the flattened targets."""
        N, T = output.shape[0], y.shape[0]
        terms = output.reshape(T, output.shape[1] * N // T)
        return self.loss.gradient(terms, y).reshape(N, -1)

    def hessian_matmat(self, output: Tensor, y: Tensor, U: Tensor) -> Tensor:
        """Not used: the GGN is the same per datum (see class docstring)."""
        raise NotImplementedError("PerDatumLoss is only for the empirical Fisher.")

    hessian_sqrt = sample_gradients = hessian_matmat


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` (without growing it)."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


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
