r"""Output-space factors: what distinguishes the GGN, the MC Fisher and the EF.

All three curvature matrices have the form

.. math::
    \mathbf{A} = \sum_b c_b \sum_t \mathbf{J}_t^\top \mathbf{B}_t \mathbf{B}_t^\top \mathbf{J}_t,
    \qquad \mathbf{B}_t \in \mathbb{R}^{C \times R},

with :math:`\mathbf{J}_t` the Jacobian of loss term :math:`t`'s outputs w.r.t. the
parameters and :math:`c_b` the reduction scale of batch :math:`b`. A *factor kind*
turns one batch's flattened output ``(T, C)`` and targets into a
:class:`BatchOutputFactor`, which applies :math:`\mathbf{B}_t\mathbf{B}_t^\top` to
output-space vectors and can hand out :math:`\mathbf{B}_t` itself.

| kind | :math:`\mathbf{B}_t` | R |
| --- | --- | --- |
| :class:`GGNFactor` | Hessian square root :math:`\mathbf{S}_t` | C |
| :class:`MCFisherFactor` | :math:`[\mathbf{g}_{t1}, \dots, \mathbf{g}_{tM}] / \sqrt{M}`, sampled | M |
| :class:`EFFactor` | the gradient :math:`\nabla_{\mathbf{f}_t}\ell(\mathbf{f}_t, \mathbf{y}_t)` | 1 |
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from math import sqrt

import torch
from torch import Generator, Tensor, einsum

from curvlinops_fisher.errors import check_finite
from curvlinops_fisher.losses import FisherLoss


class BatchOutputFactor(ABC):
    r""":math:`\mathbf{B}_t` of one batch's ``T`` loss terms."""

    @abstractmethod
    def apply(self, U: Tensor) -> Tensor:
        r"""Return :math:`\mathbf{B}_t \mathbf{B}_t^\top \mathbf{u}_{kt}` for ``U`` ``(K, T, C)``."""

    @abstractmethod
    def matrix(self) -> Tensor:
        r"""Return :math:`\mathbf{B}_t` for every term, shape ``(T, C, R)``."""


class HessianOutputFactor(BatchOutputFactor):
    """The loss Hessian, applied in closed form (never materialised as ``C x C``)."""

    def __init__(self, loss: FisherLoss, output: Tensor, y: Tensor):
        """Store the flattened output ``(T, C)`` and targets."""
        self.loss, self.output, self.y = loss, output, y

    def apply(self, U: Tensor) -> Tensor:  # noqa: D102
        return self.loss.hessian_matmat(self.output, self.y, U)

    def matrix(self) -> Tensor:  # noqa: D102
        return self.loss.hessian_sqrt(self.output, self.y)


class LowRankOutputFactor(BatchOutputFactor):
    r"""An explicit factor :math:`\mathbf{B}_t` ``(T, C, R)`` with small ``R``."""

    def __init__(self, B: Tensor):
        """Store ``B`` of shape ``(T, C, R)``."""
        self.B = B

    def apply(self, U: Tensor) -> Tensor:  # noqa: D102
        if self.B.shape[-1] == 1:  # (EF, one MC sample): (u·b) b, three kernels
            b = self.B[..., 0]
            return (U * b).sum(-1, keepdim=True) * b
        return einsum("tcr,ktr->ktc", self.B, einsum("tcr,ktc->ktr", self.B, U))

    def matrix(self) -> Tensor:  # noqa: D102
        return self.B


class SampledLabelsOutputFactor(BatchOutputFactor):
    r"""The MC Fisher's factor of sampled labels, applied without forming it.

    For losses whose would-be gradients are functions of a sampled label
    (``CrossEntropyLoss``), :math:`\mathbf{B}_t\mathbf{B}_t^\top` depends only on
    the labels' frequencies, so a product costs :math:`O(TC)` per column instead of
    :math:`O(TCM)`, and the ``(T, C, M)`` factor exists only if :meth:`matrix` asks.
    """

    def __init__(self, loss: FisherLoss, output: Tensor, y: Tensor, labels: Tensor):
        """Store the flattened output ``(T, C)``, targets and labels ``(T, M)``."""
        self.loss, self.output, self.y, self.labels = loss, output, y, labels

    def apply(self, U: Tensor) -> Tensor:  # noqa: D102
        return self.loss.sampled_fisher_matmat(self.output, self.y, self.labels, U)

    def matrix(self) -> Tensor:  # noqa: D102
        G = self.loss.labels_to_gradients(self.output, self.y, self.labels)
        return G.permute(1, 2, 0) / sqrt(self.labels.shape[1])


class OutputFactorKind(ABC):
    """Builds each batch's output-space factor for one curvature matrix."""

    def for_batch(
        self, loss: FisherLoss, output: Tensor, y: Tensor
    ) -> BatchOutputFactor:
        """Factor for a batch's detached flattened output ``(T, C)`` and targets.

        Raises:
            NonFiniteError: If the output holds NaN or Inf.
        """
        check_finite(output, "The model output")
        return self._build(loss, output, y)

    @abstractmethod
    def _build(self, loss: FisherLoss, output: Tensor, y: Tensor) -> BatchOutputFactor:
        """Build the factor of a finite output (see :meth:`for_batch`)."""


class GGNFactor(OutputFactorKind):
    r"""Generalized Gauss-Newton: :math:`\mathbf{B}_t\mathbf{B}_t^\top = \nabla^2_{\mathbf{f}_t}\ell`."""

    def _build(self, loss: FisherLoss, output: Tensor, y: Tensor) -> BatchOutputFactor:
        """See :meth:`OutputFactorKind.for_batch`."""
        return HessianOutputFactor(loss, output, y)


class EFFactor(OutputFactorKind):
    r"""Empirical Fisher: :math:`\mathbf{B}_t = \nabla_{\mathbf{f}_t}\ell(\mathbf{f}_t, \mathbf{y}_t)`."""

    def _build(self, loss: FisherLoss, output: Tensor, y: Tensor) -> BatchOutputFactor:
        """See :meth:`OutputFactorKind.for_batch`."""
        return LowRankOutputFactor(loss.gradient(output, y).unsqueeze(-1))


#: Most bytes of sampled factors that one MC Fisher operator keeps across passes
#: (:class:`SampleCache`); draws beyond it are made anew in every pass.
SAMPLE_CACHE_BYTES = 64 * 2**20


class SampleCache:
    r"""Sampled factors of the first batches of a pass, kept for the next passes.

    For a loss whose draws do not depend on the output's values
    (:attr:`~curvlinops_fisher.losses.FisherLoss.draws_independent_of_output`, the
    Gaussian of ``MSELoss``), every pass of a seeded MC Fisher operator draws the same
    :math:`\mathbf{B}_t` for batch ``i``: the generator starts from the same seed and
    consumes a number of values that only depends on the batches' output shapes.
    The cache holds the factors of a prefix of the batches (at most ``max_bytes``)
    with the generator state after the last of them, so a pass reuses them and
    resumes drawing where they end: the same numbers as drawing all, bit for bit.
    Each entry is checked against the batch's shape, dtype and device before use; a
    mismatch drops that entry and the ones after it. Every pass works on its own copy
    of the list and writes it back while no other pass has dropped entries, so
    passes that run interleaved (a lazily consumed ``factor_batches()`` next to a
    product) stay correct.

    Args:
        max_bytes: Most bytes of factors kept. ``None``: :data:`SAMPLE_CACHE_BYTES`.
    """

    def __init__(self, max_bytes: int | None = None):
        """Start empty (see the class docstring)."""
        self.max_bytes = SAMPLE_CACHE_BYTES if max_bytes is None else max_bytes
        self.key: object = None
        self.factors: list[Tensor] = []
        #: The generator's state after drawing the last cached factor.
        self.state_after: Tensor | None = None
        #: Counts the times a pass dropped factors: a pass that began before such a
        #: change draws from its own copy and no longer writes here.
        self.version = 0

    def for_key(self, key: object) -> SampleCache:
        """Empty the cache unless it was filled under ``key`` (seed and sample count)."""
        if key != self.key:
            self.key, self.factors, self.state_after = key, [], None
            self.version += 1
        return self


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class MCFisherFactor(OutputFactorKind):
    r"""Monte-Carlo Fisher: ``M`` would-be gradients per term, drawn from ``generator``.

    :math:`\mathbf{B}_t\mathbf{B}_t^\top = \frac{1}{M}\sum_{m=1}^M \mathbf{g}_{tm}\mathbf{g}_{tm}^\top`
    with :math:`\mathbf{g}_{tm} = \nabla_{\mathbf{f}_t}\ell(\mathbf{f}_t, \tilde{\mathbf{y}}_{tm})`,
    :math:`\tilde{\mathbf{y}}_{tm} \sim q(\cdot\mid\mathbf{f}_t)`. Each call of
    :meth:`for_batch` advances ``generator``: batches must come in a fixed order.

    Args:
        mc_samples: Number of samples ``M`` per loss term.
        generator: The only source of randomness.
        cache: Where a pass keeps draws that do not depend on the output, for the
            next passes (see :class:`SampleCache`); ``None``: draw every time. The
            generator must be freshly seeded with the seed the cache is kept for,
            and only this object may draw from it.
    """

    def __init__(
        self, mc_samples: int, generator: Generator, cache: SampleCache | None = None
    ):
        """Store the sample count and the generator (see class docstring)."""
        self.mc_samples, self.generator, self.cache = mc_samples, generator, cache
        #: Batches of this pass so far, and how many of them the generator drew.
        self._batches = self._drawn = 0
        if cache is not None:
            # This pass reads its own copy: another pass may change the cache.
            self._kept, self._kept_state = list(cache.factors), cache.state_after
            self._kept_bytes = sum(_nbytes(B) for B in self._kept)
            self._version = cache.version

    def _build(self, loss: FisherLoss, output: Tensor, y: Tensor) -> BatchOutputFactor:
        """See :meth:`OutputFactorKind.for_batch`."""
        labels = loss.sample_labels(output, y, self.mc_samples, self.generator)
        if labels is not None:
            return SampledLabelsOutputFactor(loss, output, y, labels)
        if self.cache is not None and loss.draws_independent_of_output:
            return LowRankOutputFactor(self._cached_factor(loss, output, y))
        return LowRankOutputFactor(self._draw(loss, output, y))

    def _draw(self, loss: FisherLoss, output: Tensor, y: Tensor) -> Tensor:
        """A new factor ``(T, C, M)`` from :meth:`FisherLoss.sample_gradients`."""
        G = loss.sample_gradients(output, y, self.mc_samples, self.generator)
        return G.permute(1, 2, 0) / sqrt(self.mc_samples)

    def _cached_factor(self, loss: FisherLoss, output: Tensor, y: Tensor) -> Tensor:
        """The factor of this pass's next batch, from the cache where it has it."""
        kept, index = self._kept, self._batches
        self._batches += 1
        if index < len(kept):
            B = kept[index]
            if (
                B.shape == (*output.shape, self.mc_samples)
                and B.dtype == output.dtype
                and B.device == output.device
            ):
                return B
            self._replay(loss, index)  # another batch than before: draw anew from here
        elif self._drawn < index:  # batches 0 ... index - 1 all came from the cache
            self.generator.set_state(self._kept_state)
            self._drawn = index
        B = self._draw(loss, output, y)
        self._drawn += 1
        if index == len(kept) and self._kept_bytes + _nbytes(B) <= self.cache.max_bytes:
            kept.append(B)
            self._kept_bytes += _nbytes(B)
            self._kept_state = self.generator.get_state()
            self._publish()
        return B

    def _replay(self, loss: FisherLoss, index: int) -> None:
        """Drop the kept factors from batch ``index`` on; bring the generator there.

        The generator is where this pass's last draw left it; the kept batches
        between there and ``index`` are drawn again and dropped (the draws depend on
        their shapes only).
        """
        kept = self._kept
        for B in kept[self._drawn : index]:
            dummy = torch.empty(B.shape[:-1], dtype=B.dtype, device=B.device)
            loss.sample_gradients(dummy, dummy, self.mc_samples, self.generator)
        self._drawn = index
        self._kept_bytes -= sum(_nbytes(B) for B in kept[index:])
        del kept[index:]
        self._kept_state = self.generator.get_state() if index else None
        self.cache.version += 1  # passes begun before keep their own copies
        self._version = self.cache.version
        self._publish()

    def _publish(self) -> None:
        """Hand this pass's kept factors to the cache, unless another pass changed it."""
        if self.cache.version == self._version:
            self.cache.factors = list(self._kept)
            self.cache.state_after = self._kept_state
