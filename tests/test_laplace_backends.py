"""laplace-torch backends: the same Laplace approximations as laplace-torch's own.

``CurvlinopsFisherGGN`` / ``CurvlinopsFisherEF`` must give the posterior precision, log
marginal likelihood and GLM predictive (mean and variance) of laplace-torch's
``CurvlinopsGGN`` / ``CurvlinopsEF`` on the same model and data, for classification
and regression, full and diagonal structure, float64 and float32; their matrices must
equal brute-force ``torch.func`` references; the MC Fisher must average to the GGN;
``eig_lowrank`` must give the top eigenpairs of the dense matrix. Skipped when
laplace-torch is not installed (see ``tests/compare-requirements.txt``).

laplace-torch 0.3's ``CurvlinopsGGN.full`` / ``CurvlinopsEF.full`` multiply the
operator onto ``torch.eye(P)`` in the *default* dtype: with the float32 default, the
matrix of a float64 model is only float32-accurate (about ``6e-8`` off on these
problems). Their fits therefore run with the default dtype set to the model's
(:func:`default_dtype`), which makes their float64 numbers exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip(
    "laplace",
    reason="laplace-torch is needed for the backend comparison "
    "(pip install --no-deps -r tests/compare-requirements.txt)",
)

from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN  # noqa: E402
from reference import dense_ef, dense_ggn  # noqa: E402

from curvlinops_fisher.laplace import (  # noqa: E402
    EIGENVALUE_EPS,
    CurvlinopsFisherEF,
    CurvlinopsFisherGGN,
    FisherLowRankLaplace,
)

LIKELIHOODS = ("classification", "regression")
#: Our backend -> laplace-torch's backend of the same matrix.
PEERS = {CurvlinopsFisherGGN: CurvlinopsGGN, CurvlinopsFisherEF: CurvlinopsEF}
#: Relative tolerance (and absolute, relative to the largest entry) per dtype.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
PRIOR_PRECISION = 0.7
SIGMA_NOISE = 0.8


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Set torch's default dtype inside the block (see the module docstring)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_problem(
    likelihood: str, dtype: torch.dtype = torch.float64, N: int = 20
) -> tuple[nn.Module, DataLoader, Tensor]:
    """A seeded 3-6-C Tanh MLP, a loader of ``N`` points (batches 8, 8, 4), test inputs."""
    generator = torch.Generator().manual_seed(0)
    C = 3 if likelihood == "classification" else 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, C)).to(dtype)
    X = torch.randn(N, 3, generator=generator, dtype=dtype)
    if likelihood == "classification":
        y = torch.randint(0, C, (N,), generator=generator)
    else:
        y = torch.randn(N, C, generator=generator, dtype=dtype)
    loader = DataLoader(TensorDataset(X, y), batch_size=8)
    X_test = torch.randn(5, 3, generator=generator, dtype=dtype)
    return model, loader, X_test


def fit(
    model: nn.Module,
    likelihood: str,
    loader: DataLoader,
    backend: type,
    structure: str,
    subset: str = "all",
    **kwargs: Any,
) -> Any:
    """A fitted ``laplace.Laplace`` (default dtype = the model's)."""
    if likelihood == "regression":
        kwargs["sigma_noise"] = SIGMA_NOISE
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=backend,
        prior_precision=PRIOR_PRECISION,
        **kwargs,
    )
    with default_dtype(next(model.parameters()).dtype):
        la.fit(loader)
    return la


def assert_close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    """Entry-wise, with the absolute tolerance relative to the largest entry."""
    scale = max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(
        actual.detach(), expected.detach(), rtol=rtol, atol=rtol * scale
    )


def assert_same_laplace(ours: Any, theirs: Any, X_test: Tensor, rtol: float) -> None:
    """Posterior precision, log marginal likelihood and GLM predictive agree."""
    assert_close(ours.posterior_precision, theirs.posterior_precision, rtol)
    assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood(), rtol)
    for a, b in zip(
        ours._glm_predictive_distribution(X_test),
        theirs._glm_predictive_distribution(X_test),
    ):
        assert_close(a, b, rtol)


# ------------------------------------------------- against laplace-torch


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("backend", list(PEERS), ids=lambda b: b.__name__)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_same_laplace_as_laplace_torch(likelihood, backend, structure, dtype):
    model, loader, X_test = make_problem(likelihood, dtype)
    ours = fit(model, likelihood, loader, backend, structure)
    theirs = fit(model, likelihood, loader, PEERS[backend], structure)
    assert ours.posterior_precision.dtype == dtype
    assert_same_laplace(ours, theirs, X_test, RTOL[dtype])


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_stochastic_full_same_samples_as_curvlinops_ggn(likelihood):
    """Same seed and sample count as CurvlinopsGGN(stochastic=True): same matrix."""
    model, loader, X_test = make_problem(likelihood)
    kwargs = {"backend_kwargs": {"stochastic": True}}
    ours = fit(model, likelihood, loader, CurvlinopsFisherGGN, "full", **kwargs)
    theirs = fit(model, likelihood, loader, CurvlinopsGGN, "full", **kwargs)
    deterministic = fit(model, likelihood, loader, CurvlinopsFisherGGN, "full")
    assert not torch.allclose(ours.H, deterministic.H)
    assert_same_laplace(ours, theirs, X_test, RTOL[torch.float64])


@pytest.mark.parametrize(
    ("likelihood", "backend", "structure"),
    [
        ("classification", CurvlinopsFisherGGN, "full"),
        ("regression", CurvlinopsFisherGGN, "diag"),
        ("classification", CurvlinopsFisherEF, "diag"),
        ("regression", CurvlinopsFisherEF, "full"),
    ],
    ids=str,
)
def test_last_layer(likelihood, backend, structure):
    """Last-layer Laplace (``FeatureExtractor`` model, last layer's parameters).

    laplace-torch 0.3's ``CurvlinopsEF.diag`` with ``last_layer=True`` returns zeros
    (its per-sample gradients call the whole model with the last layer's parameter
    names, ``weight`` and ``bias``, which replace nothing), so the diagonal EF is
    compared with the diagonal of its full EF instead.
    """
    model, loader, X_test = make_problem(likelihood)
    ours = fit(model, likelihood, loader, backend, structure, subset="last_layer")
    assert ours.H.shape[0] == 6 * model[-1].out_features + model[-1].out_features
    if backend is CurvlinopsFisherEF and structure == "diag":
        theirs = fit(model, likelihood, loader, CurvlinopsEF, "full", "last_layer")
        assert_close(ours.H, theirs.H.diagonal(), RTOL[torch.float64])
        return
    theirs = fit(
        model, likelihood, loader, PEERS[backend], structure, subset="last_layer"
    )
    assert_same_laplace(ours, theirs, X_test, RTOL[torch.float64])


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("backend", list(PEERS), ids=lambda b: b.__name__)
def test_subnetwork(backend, structure):
    likelihood = "classification"
    model, loader, X_test = make_problem(likelihood)
    indices = torch.tensor([0, 4, 17, 20, 30, 41, 44], dtype=torch.long)
    kwargs = {"subset": "subnetwork", "subnetwork_indices": indices}
    ours = fit(model, likelihood, loader, backend, structure, **kwargs)
    theirs = fit(model, likelihood, loader, PEERS[backend], structure, **kwargs)
    assert ours.H.shape[0] == len(indices)
    assert_same_laplace(ours, theirs, X_test, RTOL[torch.float64])


class DictModel(nn.Module):
    """An MLP that reads its input from a mapping (as Hugging Face models do)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.net(batch["features"])


@pytest.mark.parametrize("backend", list(PEERS), ids=lambda b: b.__name__)
def test_dict_inputs(backend):
    net, loader, _ = make_problem("classification")
    model = DictModel(net)
    X, y = loader.dataset.tensors
    items = [{"features": X[i], "target": y[i]} for i in range(len(y))]
    dict_loader = DataLoader(items, batch_size=8)
    keys = {"dict_key_x": "features", "dict_key_y": "target"}
    ours = fit(model, "classification", dict_loader, backend, "full", **keys)
    theirs = fit(model, "classification", dict_loader, PEERS[backend], "full", **keys)
    assert_close(ours.H, theirs.H, RTOL[torch.float64])
    # laplace-torch refuses a diagonal EF for dict inputs with CurvlinopsEF; ours works
    diag = fit(model, "classification", dict_loader, backend, "diag", **keys)
    assert_close(diag.H, theirs.H.diagonal(), RTOL[torch.float64])
    # eig_lowrank reads the targets from dict_key_y (all eigenpairs: low_rank >= P)
    curvature = backend(model, "classification", low_rank=100, **keys)
    vecs, vals, loss = curvature.eig_lowrank(dict_loader)
    # eigenvalues <= EIGENVALUE_EPS are dropped: entries may differ by that much
    difference = vecs @ torch.diag(vals) @ vecs.T - theirs.H
    assert difference.abs().max() <= EIGENVALUE_EPS + 1e-10
    assert_close(loss, theirs.loss, RTOL[torch.float64])


# ------------------------------------------------------ against brute force


def reference_curvature(backend: type, likelihood: str, model, loader) -> Tensor:
    """``factor`` times the brute-force GGN or EF of laplace-torch's summed loss."""
    loss_func, factor = (
        (nn.CrossEntropyLoss(reduction="sum"), 1.0)
        if likelihood == "classification"
        else (nn.MSELoss(reduction="sum"), 0.5)
    )
    dense = dense_ggn if backend is CurvlinopsFisherGGN else dense_ef
    return factor * dense(model, loss_func, list(model.parameters()), list(loader))


@pytest.mark.parametrize("backend", list(PEERS), ids=lambda b: b.__name__)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_full_and_diag_equal_brute_force(likelihood, backend):
    model, loader, _ = make_problem(likelihood)
    X, y = loader.dataset.tensors
    curvature = backend(model, likelihood)
    expected = reference_curvature(backend, likelihood, model, [(X, y)])
    loss, H = curvature.full(X, y, N=len(y))
    loss_diag, H_diag = curvature.diag(X, y, N=len(y))
    assert_close(H, expected, 1e-12)
    assert_close(H_diag, expected.diagonal(), 1e-12)
    with torch.no_grad():
        expected_loss = curvature.factor * curvature.lossfunc(model(X), y)
    assert_close(loss, expected_loss, 1e-14)
    assert_close(loss_diag, expected_loss, 1e-14)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_mc_fisher_expectation_is_the_ggn(likelihood):
    """The mean over S seeds of the MC Fisher equals the GGN within 6 standard errors.

    Deterministic (fixed seeds, internal generators). The bound is computed from the
    sample itself, entry by entry: ``|mean - GGN| <= 6 * std / sqrt(S)`` plus rounding.
    For an unbiased estimator an entry exceeds 6 standard errors with probability
    about ``2e-9`` (CLT; S = 400 draws), so even over all ~2,000 entries a different
    seed set would fail with probability below ``1e-5``. Entries with zero variance
    must match to rounding. A bias of 6 standard errors (a few percent of the
    entries here) would fail, and so does the single-seed MC Fisher.
    """
    model, loader, _ = make_problem(likelihood, N=8)
    X, y = loader.dataset.tensors
    S = 400
    ggn = CurvlinopsFisherGGN(model, likelihood).full(X, y)[1]
    draws = []
    for seed in range(S):
        curvature = CurvlinopsFisherGGN(model, likelihood, stochastic=True, seed=seed)
        H = curvature.full(X, y)[1]
        if seed < 3:  # diag uses the same sample as full
            assert_close(curvature.diag(X, y)[1], H.diagonal(), 1e-12)
        draws.append(H)
    draws = torch.stack(draws)
    mean, std = draws.mean(0), draws.std(0)
    bound = 6 * std / S**0.5 + 1e-10 * ggn.abs().max()
    assert ((mean - ggn).abs() <= bound).all()
    assert not ((draws[0] - ggn).abs() <= 6 * std / S**0.5).all()


# ----------------------------------------------------------- low rank


def top_eigenpairs(matrix: Tensor, k: int) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(matrix)
    return values.flip(0)[:k], vectors.flip(1)[:, :k]


@pytest.mark.parametrize("low_rank", [5, 45])
@pytest.mark.parametrize("backend", list(PEERS), ids=lambda b: b.__name__)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_eig_lowrank_top_eigenpairs(likelihood, backend, low_rank):
    """Top-k of the dense matrix (k = 5: eigsh or Gram path; k = P: dense path)."""
    model, loader, _ = make_problem(likelihood)
    curvature = backend(model, likelihood, low_rank=low_rank)
    vectors, values, loss = curvature.eig_lowrank(loader)
    expected = reference_curvature(backend, likelihood, model, loader)
    P = expected.shape[0]
    ref_values, ref_vectors = top_eigenpairs(expected, min(low_rank, P))
    keep = ref_values > curvature.factor * EIGENVALUE_EPS
    ref_values, ref_vectors = ref_values[keep], ref_vectors[:, keep]
    assert values.shape == ref_values.shape and vectors.shape == ref_vectors.shape
    assert_close(values, ref_values, 1e-8)
    # eigenvectors up to sign, where the eigenvalue is separated from its neighbours
    gaps = torch.cat([ref_values[:-1] - ref_values[1:], ref_values[-1:]])
    gaps = torch.minimum(gaps, torch.cat([gaps[:1], gaps[:-1]]))
    separated = gaps > 1e-3 * ref_values[0]
    overlap = (vectors.T @ ref_vectors).diagonal().abs()
    assert_close(overlap[separated], torch.ones_like(overlap[separated]), 1e-6)
    assert_close(vectors.T @ vectors, torch.eye(len(values), dtype=values.dtype), 1e-8)
    with torch.no_grad():
        expected_loss = curvature.factor * sum(
            curvature.lossfunc(model(X), y) for X, y in loader
        )
    assert_close(loss, expected_loss, 1e-12)


@pytest.mark.parametrize("backend", list(PEERS), ids=lambda b: b.__name__)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_low_rank_laplace_with_all_eigenpairs_is_full_laplace(likelihood, backend):
    model, loader, X_test = make_problem(likelihood)
    kwargs = {"sigma_noise": SIGMA_NOISE} if likelihood == "regression" else {}
    low = FisherLowRankLaplace(
        model,
        likelihood,
        backend=backend,
        prior_precision=PRIOR_PRECISION,
        backend_kwargs={"low_rank": 100},
        **kwargs,
    )
    low.fit(loader)
    full = fit(model, likelihood, loader, backend, "full")
    # eig_lowrank drops eigenvalues (of the unscaled curvature) below EIGENVALUE_EPS;
    # each changes log det P by at most log(1 + EPS / prior) <= EPS / prior
    P = full.n_params
    lml_tolerance = 0.5 * P * EIGENVALUE_EPS / PRIOR_PRECISION
    lml_low, lml_full = low.log_marginal_likelihood(), full.log_marginal_likelihood()
    assert abs(float(lml_low - lml_full)) <= lml_tolerance
    for a, b in zip(
        low._glm_predictive_distribution(X_test),
        full._glm_predictive_distribution(X_test),
    ):
        assert_close(a, b, 1e-5)


def test_low_rank_laplace_is_not_registered_in_laplace_factory():
    model, _, _ = make_problem("classification")
    try:
        la = Laplace(model, "classification", "all", "lowrank")
    except ImportError:  # laplace-torch's LowRankLaplace without asdfghjkl
        return
    assert not isinstance(la, FisherLowRankLaplace)


# ------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", list(PEERS), ids=lambda b: b.__name__)
def test_kron_names_the_backends_that_offer_it(backend):
    model, loader, _ = make_problem("classification")
    with pytest.raises(NotImplementedError, match="CurvlinopsGGN"):
        fit(model, "classification", loader, backend, "kron")


def test_bad_arguments_are_clear_errors():
    model, loader, _ = make_problem("classification")
    X, y = loader.dataset.tensors
    with pytest.raises(ValueError, match="likelihood"):
        CurvlinopsFisherGGN(model, "poisson")
    with pytest.raises(ValueError, match="low_rank"):
        CurvlinopsFisherEF(model, "classification", low_rank=0)
    with pytest.raises(TypeError, match="backend_kwargs"):
        CurvlinopsFisherGGN(model, "classification").diag(X, y, N=20, bogus=1)
    subnet = CurvlinopsFisherGGN(model, "classification")
    subnet.subnetwork_indices = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="subnetwork"):
        subnet.eig_lowrank(loader)
    with pytest.raises(ValueError, match="empty"):
        CurvlinopsFisherEF(model, "classification").eig_lowrank([])
