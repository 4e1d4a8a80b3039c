r"""laplace-torch backends built on the exact structure of the Fisher-family operators.

`laplace-torch <https://github.com/aleximmer/Laplace>`_ (``laplace``, version 0.3)
fits Laplace approximations :math:`\mathcal{N}(\boldsymbol\theta_\mathrm{MAP},
\mathbf{P}^{-1})` with a posterior precision

.. math::
    \mathbf{P} = \frac{1}{\sigma^2 T}\,\mathbf{H} + \mathbf{P}_0,
    \qquad
    \mathbf{H} = \gamma \sum_b \mathbf{A}_b,

where :math:`\mathbf{A}_b` is the curvature of batch ``b``'s summed loss
(``MSELoss(reduction='sum')`` for regression, ``CrossEntropyLoss(reduction='sum')``
for classification) and :math:`\gamma` the backend's ``factor`` (``1/2`` for
regression, turning the summed squared error into the negative log likelihood of
:math:`\mathcal{N}(f, 1)`; ``1`` for classification). The backends here compute
:math:`\mathbf{A}_b` as ``U_b^T U_b`` from the factor rows of
:mod:`curvlinops_fisher.rows` instead of ``P`` operator products per batch:

- :meth:`~_CurvlinopsFisherInterface.full`: ``op.to_dense()`` (``T_b R`` VJPs per
  batch, ``R = C`` for the GGN, ``1`` for the empirical Fisher and the one-sample MC
  Fisher),
- :meth:`~_CurvlinopsFisherInterface.diag`: the exact ``op.diagonal()``,
- :meth:`~_CurvlinopsFisherInterface.eig_lowrank`: the top eigenpairs of
  :math:`\gamma\,\mathbf{A}` over a whole data loader from ``op.eigh(low_rank)``
  (Gram matrix ``U U^T`` when it is small), for ``hessian_structure='lowrank'``.

Usage (change only the ``backend`` argument)::

    from laplace import Laplace
    from curvlinops_fisher.laplace import CurvlinopsFisherGGN

    la = Laplace(model, "classification", subset_of_weights="all",
                 hessian_structure="full", backend=CurvlinopsFisherGGN)
    la.fit(train_loader)

The numbers equal those of laplace-torch's ``CurvlinopsGGN`` / ``CurvlinopsEF``
backends (same losses, ``factor`` and scaling) up to rounding. laplace-torch is an
optional dependency (``pip install "curvlinops-fisher[laplace]"``; see the README for
installing it without torchvision).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from curvlinops_fisher.accumulation import add_column_squares, add_gram
from curvlinops_fisher.curvature import (
    CurvatureLinearOperator,
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)
from curvlinops_fisher.data import Batch, ModelInput, to_device

try:
    from laplace.baselaplace import LowRankLaplace, ParametricLaplace
    from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "curvlinops_fisher.laplace needs laplace-torch 0.3 (import name 'laplace'), "
        "which is not importable here. Install it without torchvision: pip install "
        "--no-deps laplace-torch==0.3 asdfghjkl==0.1a4 torchmetrics "
        "lightning-utilities backpack-for-pytorch curvlinops-for-pytorch (plus their "
        "dependencies, see the README section 'Laplace backends')."
    ) from error

__all__ = ["CurvlinopsFisherEF", "CurvlinopsFisherGGN", "FisherLowRankLaplace"]

#: Eigenvalues of the unscaled curvature at or below this are dropped by
#: :meth:`_CurvlinopsFisherInterface.eig_lowrank`, as laplace-torch's own
#: ``eig_lowrank`` (``AsdfghjklHessian``, ``EPS = 1e-6``) does: ``LowRankLaplace``
#: divides by the eigenvalues and takes their logarithm.
EIGENVALUE_EPS = 1e-6
#: Seed of the MC Fisher for ``stochastic=True``: curvlinops' default, which
#: laplace-torch's ``CurvlinopsGGN(stochastic=True)`` uses for every batch.
DEFAULT_MC_SEED = 2147483647
_LIKELIHOODS = ("classification", "regression")
_KRON_BACKENDS = (
    "laplace.curvature.CurvlinopsGGN / CurvlinopsEF (KFAC through curvlinops), "
    "AsdlGGN / AsdlEF, or BackPackGGN / BackPackEF"
)


class _CurvlinopsFisherInterface(CurvatureInterface):
    r"""What the GGN/MC Fisher and the empirical Fisher backends share.

    Subclasses choose the operator class and its extra arguments
    (:meth:`_operator_class`, :meth:`_operator_kwargs`). The operator is built over the
    model and ``self.params`` (the last layer's parameters for ``last_layer=True``,
    all trainable parameters otherwise) with laplace-torch's summed loss
    ``self.lossfunc``; every result is multiplied by ``self.factor``.
    ``subnetwork_indices`` (set by ``SubnetLaplace`` after construction) select
    entries of the flat parameter vector: :meth:`full` forms
    :math:`\sum_b \mathbf{U}_{b,S}^\top \mathbf{U}_{b,S}` from the selected
    columns :math:`S` of the factor, :meth:`diag` selects from the exact diagonal.
    """

    low_rank: int

    # ------------------------------------------------------------- set-up
    def _init_low_rank(self, likelihood: object, low_rank: object) -> None:
        """Validate ``likelihood`` and ``low_rank`` and store ``low_rank``."""
        if likelihood not in _LIKELIHOODS:
            raise ValueError(
                f"likelihood must be one of {_LIKELIHOODS}; got {likelihood!r}. "
                "(laplace-torch maps 'reward_modeling' to 'classification'.)"
            )
        if isinstance(low_rank, bool) or not isinstance(low_rank, int) or low_rank < 1:
            raise ValueError(f"low_rank must be a positive int; got {low_rank!r}.")
        self.low_rank = low_rank

    def _operator_class(self) -> type[CurvatureLinearOperator]:
        raise NotImplementedError

    def _operator_kwargs(self) -> dict[str, Any]:
        return {}

    def _operator(
        self, data: list[Batch], num_data: int | None = None
    ) -> CurvatureLinearOperator:
        """The curvature operator of ``self.lossfunc`` over ``data`` w.r.t. ``self.params``."""
        first_X = data[0][0]
        batch_size_fn = (
            (lambda X: X[self.dict_key_x].shape[0])
            if isinstance(first_X, Mapping)
            else None
        )
        return self._operator_class()(
            self.model,
            self.lossfunc,
            self.params,
            data,
            check_deterministic=False,  # as laplace-torch's backends (no overhead)
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            **self._operator_kwargs(),
        )

    def _summed_loss(self, data: Iterable[Batch]) -> Tensor:
        """``sum_b lossfunc(model(X_b), y_b)``, detached."""
        device = self.params[0].device
        with torch.no_grad():
            return sum(
                self.lossfunc(self.model(to_device(X, device)), to_device(y, device))
                for X, y in data
            )

    def _subnetwork(self) -> Tensor | None:
        indices = self.subnetwork_indices
        if indices is None:
            return None
        return torch.as_tensor(indices, device=self.params[0].device)

    def _scaled(self, loss: Tensor, curvature: Tensor) -> tuple[Tensor, Tensor]:
        """``factor * loss`` and ``factor * curvature`` (in place: a fresh tensor)."""
        if self.factor != 1.0:
            curvature.mul_(self.factor)
        return self.factor * loss, curvature

    @staticmethod
    def _check_kwargs(method: str, kwargs: dict[str, Any]) -> None:
        """Accept laplace-torch's ``N``; anything else is an error (not ignored)."""
        unexpected = sorted(set(kwargs) - {"N"})
        if unexpected:
            raise TypeError(
                f"{method}() got unexpected keyword arguments {unexpected}. This "
                "backend takes its options (stochastic, mc_samples, seed, low_rank) "
                "from backend_kwargs, not from asdl_fisher_kwargs."
            )

    # ---------------------------------------------------------- structures
    def full(
        self,
        x: Tensor | MutableMapping[str, Tensor | Any],
        y: Tensor,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        r"""The batch's loss and dense curvature, both times ``factor``.

        :math:`\gamma\,\mathbf{A}_b = \gamma\,\mathbf{U}_b^\top\mathbf{U}_b` from
        ``op.to_dense()``: one forward pass and ``T_b R`` VJPs instead of ``P``
        products.

        Args:
            x: Batch input (a tensor, or a mapping with the input under
                ``dict_key_x``).
            y: Batch targets.
            **kwargs: ``N`` (the data set size, passed by laplace-torch; unused since
                the loss is summed).

        Returns:
            ``factor * loss`` (scalar) and ``factor * A_b`` (``[P, P]``, or
            ``[S, S]`` for a subnetwork of ``S`` entries).
        """
        self._check_kwargs("full", kwargs)
        op = self._operator([(x, y)])
        subnetwork = self._subnetwork()
        if subnetwork is None:
            H = op.to_dense()
        else:
            size = subnetwork.numel()
            H = add_gram(
                (U[:, subnetwork] for U in op.factor_batches()),
                out=torch.zeros(size, size, dtype=op.dtype, device=op.device),
            )
        return self._scaled(self._summed_loss([(x, y)]), H)

    def diag(
        self,
        x: Tensor | MutableMapping[str, Tensor | Any],
        y: Tensor,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        r"""The batch's loss and exact curvature diagonal, both times ``factor``.

        :math:`\gamma\,\operatorname{diag}(\mathbf{A}_b)_i = \gamma \sum_j
        (U_b)_{ji}^2` from ``op.diagonal()``.

        Args:
            x: Batch input (a tensor, or a mapping with the input under
                ``dict_key_x``).
            y: Batch targets.
            **kwargs: ``N`` (passed by laplace-torch; unused).

        Returns:
            ``factor * loss`` (scalar) and ``factor * diag(A_b)`` (``[P]``, or
            ``[S]`` for a subnetwork).
        """
        self._check_kwargs("diag", kwargs)
        op = self._operator([(x, y)])
        subnetwork = self._subnetwork()
        if subnetwork is None:
            diagonal = op.diagonal()
        else:
            diagonal = add_column_squares(
                (U[:, subnetwork] for U in op.factor_batches()),
                out=torch.zeros(subnetwork.numel(), dtype=op.dtype, device=op.device),
            )
        return self._scaled(self._summed_loss([(x, y)]), diagonal)

    def kron(
        self,
        x: Tensor | MutableMapping[str, Tensor | Any],
        y: Tensor,
        N: int,
        **kwargs: Any,
    ) -> Any:
        """Not offered: these backends compute exact structure, not KFAC.

        Raises:
            NotImplementedError: Always; the message names the backends with ``kron``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no Kronecker-factored ('kron') curvature: it "
            "computes the exact matrix. Use hessian_structure='full', 'diag' or "
            "'lowrank' with this backend, or, for hessian_structure='kron' (the "
            f"default of laplace.Laplace), one of {_KRON_BACKENDS}."
        )

    def eig_lowrank(self, data_loader: Iterable[Any]) -> tuple[Tensor, Tensor, Tensor]:
        r"""Top eigenpairs of the curvature of the whole data set, for ``LowRankLaplace``.

        With :math:`\mathbf{A} = \sum_b \mathbf{A}_b` over every batch of
        ``data_loader``, returns the ``k = min(low_rank, P)`` largest eigenpairs of
        :math:`\gamma\,\mathbf{A}` from ``op.eigh(k)`` (from the dense matrix if
        ``2k >= P``), dropping those whose
        eigenvalue of :math:`\mathbf{A}` is at most :data:`EIGENVALUE_EPS` (as
        laplace-torch's ``AsdfghjklHessian.eig_lowrank`` does; ``LowRankLaplace``
        inverts them). The loader is iterated once and its batches are held (on the
        device it yields them on), so that the passes of ``eigh`` see the same
        batches even if the loader shuffles. With ``stochastic=True``, one MC Fisher
        operator covers the whole loader (one seeded draw per pass, batch by batch).

        Args:
            data_loader: Batches ``(X, y)``, or mappings holding the input under
                ``dict_key_x`` and the targets under ``dict_key_y``.

        Returns:
            Eigenvectors ``[P, k']`` (orthonormal columns, flat parameter order),
            eigenvalues ``[k']`` in descending order times ``factor``, and
            ``factor`` times the summed loss over the loader (``k' <= k``).

        Raises:
            ValueError: For a subnetwork (laplace-torch has no low-rank subnetwork
                Laplace) or an empty loader.
        """
        if self.subnetwork_indices is not None:
            raise ValueError(
                "eig_lowrank does not support subnetwork_indices (laplace-torch's "
                "SubnetLaplace takes hessian_structure='full' or 'diag' only)."
            )
        batches = [self._split_batch(batch) for batch in data_loader]
        if not batches:
            raise ValueError("data_loader is empty: pass at least one batch.")
        op = self._operator(batches)
        values, vectors = _top_eigenpairs(op, min(self.low_rank, op.shape[1]))
        keep = values > EIGENVALUE_EPS
        return (
            vectors[:, keep],
            self.factor * values[keep],
            self.factor * self._summed_loss(batches),
        )

    def _split_batch(self, batch: Any) -> tuple[ModelInput, Tensor]:
        """A loader item as ``(X, y)``; a mapping gives ``(batch, batch[dict_key_y])``."""
        if isinstance(batch, MutableMapping):
            return batch, batch[self.dict_key_y]
        X, y = batch
        return X, y


def _top_eigenpairs(op: CurvatureLinearOperator, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenpairs: ``op.eigh(k)``, or the dense matrix's if ``2k >= P``.

    For ``2k >= P`` the eigenvectors alone take at least half the memory of the
    dense matrix, and Lanczos (which needs ``k < P``) has no advantage.
    """
    dim = op.shape[1]
    if 2 * k < dim:
        return op.eigh(k)
    values, vectors = torch.linalg.eigh(op.to_dense())
    return values.flip(0)[:k], vectors.flip(1)[:, :k]


class CurvlinopsFisherGGN(_CurvlinopsFisherInterface, GGNInterface):
    r"""The GGN (or, with ``stochastic=True``, the MC Fisher) for laplace-torch.

    A drop-in for ``laplace.curvature.CurvlinopsGGN``:
    ``Laplace(model, likelihood, subset_of_weights="all", hessian_structure=...,
    backend=CurvlinopsFisherGGN)`` with ``hessian_structure`` in ``'full'``,
    ``'diag'``, ``'lowrank'`` (``'kron'`` raises ``NotImplementedError``).
    ``subset_of_weights='last_layer'`` and ``'subnetwork'`` work too.

    The GGN of the summed loss is :math:`\sum_t \mathbf{J}_t^\top
    \nabla^2_{\mathbf{f}_t}\ell\,\mathbf{J}_t` (the Fisher for these likelihoods);
    for regression ``factor = 1/2`` turns the GGN of the summed squared error,
    :math:`2\sum_t \mathbf{J}_t^\top\mathbf{J}_t`, into that of
    :math:`\mathcal{N}(f, 1)`.

    MC Fisher (``stochastic=True``): :class:`~curvlinops_fisher.FisherMCLinearOperator`
    with ``mc_samples`` would-be gradients per data point from a generator seeded
    with ``seed`` at the start of every :meth:`full` / :meth:`diag` call (one batch)
    and of every pass of :meth:`eig_lowrank` (whole loader). The defaults
    (``mc_samples=1``, ``seed=2147483647``) are those of laplace-torch's
    ``CurvlinopsGGN(stochastic=True)``, which draws the same samples, so the two
    backends give the same matrices; as there, each batch starts from the same seed.
    Its expectation over seeds is the GGN; raise ``mc_samples`` (almost free: the
    samples live in output space) for less noise.

    Args:
        model: The model (a ``FeatureExtractor`` for last-layer Laplace).
        likelihood: ``'classification'`` or ``'regression'``.
        last_layer: Only the last layer's parameters (set by ``LLLaplace``).
        subnetwork_indices: Entries of the flat parameter vector (set by
            ``SubnetLaplace``).
        dict_key_x: Key of the input in mapping batches (its batch size).
        dict_key_y: Key of the targets in mapping batches (:meth:`eig_lowrank`).
        stochastic: The MC Fisher instead of the GGN.
        low_rank: Number of eigenpairs :meth:`eig_lowrank` computes.
        mc_samples: Would-be gradients per data point for ``stochastic=True``.
        seed: Seed of the MC Fisher's generator for ``stochastic=True``.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        low_rank: int = 10,
        *,
        mc_samples: int = 1,
        seed: int = DEFAULT_MC_SEED,
    ) -> None:
        """Set up the backend (see the class docstring for the arguments)."""
        self._init_low_rank(likelihood, low_rank)
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            stochastic=stochastic,
            num_samples=mc_samples,
        )
        self.seed = seed

    def _operator_class(self) -> type[CurvatureLinearOperator]:
        return FisherMCLinearOperator if self.stochastic else GGNLinearOperator

    def _operator_kwargs(self) -> dict[str, Any]:
        if self.stochastic:
            return {"seed": self.seed, "mc_samples": self.num_samples}
        return {}


class CurvlinopsFisherEF(_CurvlinopsFisherInterface, EFInterface):
    r"""The empirical Fisher for laplace-torch.

    A drop-in for ``laplace.curvature.CurvlinopsEF``: :math:`\gamma \sum_n
    \nabla_{\boldsymbol\theta}\ell_n (\nabla_{\boldsymbol\theta}\ell_n)^\top` with the
    per-data-point gradients :math:`\nabla_{\boldsymbol\theta}\ell_n =
    \mathbf{J}_n^\top\nabla_{\mathbf{f}_n}\ell` of the summed loss (one factor row
    per data point). ``hessian_structure`` in ``'full'``, ``'diag'``, ``'lowrank'``;
    ``'kron'`` raises ``NotImplementedError``. Unlike ``CurvlinopsEF``, the diagonal
    works for mapping (dict) inputs.

    Args:
        model: The model (a ``FeatureExtractor`` for last-layer Laplace).
        likelihood: ``'classification'`` or ``'regression'``.
        last_layer: Only the last layer's parameters (set by ``LLLaplace``).
        subnetwork_indices: Entries of the flat parameter vector (set by
            ``SubnetLaplace``).
        dict_key_x: Key of the input in mapping batches (its batch size).
        dict_key_y: Key of the targets in mapping batches (:meth:`eig_lowrank`).
        low_rank: Number of eigenpairs :meth:`eig_lowrank` computes.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        low_rank: int = 10,
    ) -> None:
        """Set up the backend (see the class docstring for the arguments)."""
        self._init_low_rank(likelihood, low_rank)
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y
        )

    def _operator_class(self) -> type[CurvatureLinearOperator]:
        return EFLinearOperator


class FisherLowRankLaplace(LowRankLaplace):
    r"""laplace-torch's ``LowRankLaplace`` with a Fisher-family backend.

    The posterior precision is :math:`\mathbf{V}\operatorname{diag}(\boldsymbol
    \lambda)\mathbf{V}^\top/(\sigma^2 T) + \mathbf{P}_0` with the top eigenpairs
    of the backend's :meth:`~_CurvlinopsFisherInterface.eig_lowrank` (``low_rank``
    of them, set through ``backend_kwargs``). laplace-torch's own ``LowRankLaplace``
    (``hessian_structure='lowrank'``) refuses to start unless the module
    ``asdfghjkl`` (a package that is no longer on the registry) is importable, even
    with another backend; this class differs from it only in skipping that check
    and in its default backend. It is not registered under ``laplace.Laplace``'s
    ``('all', 'lowrank')``: construct it directly. Its ``fit`` needs a loader of
    ``(X, y)`` batches (as laplace-torch's).

    Args:
        model: The model at the MAP estimate.
        likelihood: ``'classification'`` or ``'regression'``.
        backend: A backend class with ``eig_lowrank``; default
            :class:`CurvlinopsFisherGGN`.
        sigma_noise: Observation noise (regression).
        prior_precision: Prior precision (scalar, per layer or diagonal).
        prior_mean: Prior mean.
        temperature: Likelihood temperature.
        enable_backprop: Backpropagation through the predictive.
        dict_key_x: Key of the input in mapping batches.
        dict_key_y: Key of the targets in mapping batches.
        backend_kwargs: Arguments of the backend, e.g. ``{"low_rank": 20}``.
    """

    # Any subclass of BaseLaplace with a ``_key`` enters laplace.Laplace's lookup
    # table; a key that is never looked up keeps ('all', 'lowrank') laplace-torch's.
    _key = ("all", "lowrank", "curvlinops_fisher")

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        backend: type[CurvatureInterface] = CurvlinopsFisherGGN,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Set up the approximation (see the class docstring for the arguments)."""
        ParametricLaplace.__init__(
            self,
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
        )
