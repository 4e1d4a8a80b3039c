"""Monte-Carlo Fisher: exact sampling, RNG hygiene and convergence to the GGN."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from problems import LOSSES, REDUCTIONS, Problem, make_problem, supports
from reference import (
    assert_matrix_close,
    dense_fisher_mc,
    dense_ggn,
    relative_error,
    to_dense,
)

from curvlinops_fisher import FisherMCLinearOperator

DEFAULT_SEED = 2147483647
MC_MODELS = (
    "mlp_relu",
    "conv",
    "conv_seg",
    "mlp_bn",
    "seq",
    "dict",
    "subset",
    "frozen",
    "scalar",
)
MC_CASES = [
    (model, loss, reduction)
    for model in MC_MODELS
    for loss in LOSSES
    for reduction in REDUCTIONS
    if supports(model, loss)
]


def _ids(case: tuple[Any, ...]) -> str:
    """Test id of a parameter tuple.

    Args:
        case: Tuple of strings.

    Returns:
        The entries joined by ``-``.
    """
    return "-".join(str(c) for c in case)


def build(problem: Problem, **kwargs: Any) -> FisherMCLinearOperator:
    """Construct the MC Fisher on a problem.

    Args:
        problem: The problem.
        **kwargs: Further constructor arguments (``seed``, ``mc_samples``, ...).

    Returns:
        The operator.
    """
    return FisherMCLinearOperator(*problem.args(), **problem.kwargs(), **kwargs)


def reference(problem: Problem, **kwargs: Any) -> torch.Tensor:
    """Dense reference MC Fisher of a problem.

    Args:
        problem: The problem.
        **kwargs: Further arguments (``seed``, ``mc_samples``, ``num_data``).

    Returns:
        The float64 reference matrix.
    """
    return dense_fisher_mc(*problem.args(), **problem.kwargs(), **kwargs)


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("case", MC_CASES, ids=_ids)
def test_dense_matches_reference(case: tuple[str, str, str], mc_samples: int) -> None:
    """The MC Fisher equals the reference with the documented sampling scheme.

    Args:
        case: ``(model, loss, reduction)``; data in unequal batches ``(3, 5, 2)``.
        mc_samples: Number of Monte-Carlo samples.
    """
    problem = make_problem(*case, layout="unequal")
    op = build(problem, seed=42, mc_samples=mc_samples)
    assert op.shape == (problem.dim, problem.dim)
    expected = reference(problem, seed=42, mc_samples=mc_samples)
    assert_matrix_close(to_dense(op), expected)


@pytest.mark.parametrize("layout", ["single", "loader"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("model", ["mlp_tanh", "dict"])
def test_dense_layouts(model: str, loss: str, layout: str) -> None:
    """One batch and a ``DataLoader`` with a remainder batch match the reference.

    Args:
        model: Model name.
        loss: Loss name.
        layout: Data layout.
    """
    problem = make_problem(model, loss, "mean", layout)
    expected = reference(problem, seed=5, mc_samples=2)
    assert_matrix_close(to_dense(build(problem, seed=5, mc_samples=2)), expected)


@pytest.mark.parametrize("loss", LOSSES)
def test_default_seed_and_samples(loss: str) -> None:
    """Defaults are ``seed=2147483647`` and ``mc_samples=1``.

    Args:
        loss: Loss name.
    """
    problem = make_problem("mlp_tanh", loss, "sum", "unequal")
    expected = reference(problem, seed=DEFAULT_SEED, mc_samples=1)
    assert_matrix_close(to_dense(build(problem)), expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_soft_bce_targets(reduction: str) -> None:
    """Non-binary BCE targets in ``[0, 1]`` work (the samples do not depend on y).

    Args:
        reduction: ``"mean"`` or ``"sum"``.
    """
    problem = make_problem("seq", "bce", reduction, "unequal", soft_bce=True)
    expected = reference(problem, seed=1, mc_samples=2)
    assert_matrix_close(to_dense(build(problem, seed=1, mc_samples=2)), expected)


@pytest.mark.parametrize("loss", LOSSES)
def test_float32(loss: str) -> None:
    """A float32 operator draws the same samples (in float32) as the reference.

    Args:
        loss: Loss name.
    """
    problem = make_problem("mlp_tanh", loss, "mean", "unequal", dtype=torch.float32)
    dense = to_dense(build(problem, seed=3, mc_samples=4))
    assert dense.dtype == torch.float32
    assert relative_error(dense, reference(problem, seed=3, mc_samples=4)) < 1e-4


@pytest.mark.parametrize("loss", LOSSES)
def test_deterministic(loss: str) -> None:
    """Two products are identical; so are two operators with the same seed.

    The second operator is built after drawing global random numbers, which must not
    influence its samples.

    Args:
        loss: Loss name.
    """
    problem = make_problem("mlp_relu", loss, "mean", "unequal")
    op = build(problem, seed=17, mc_samples=2)
    first, second = to_dense(op), to_dense(op)
    assert torch.equal(first, second)

    torch.rand(1000)
    torch.manual_seed(12345)
    torch.randn(17)
    other = build(problem, seed=17, mc_samples=2)
    assert torch.equal(to_dense(other), first)


@pytest.mark.parametrize("loss", LOSSES)
def test_global_rng_untouched(loss: str) -> None:
    """A product neither uses nor advances the global random number generator.

    Args:
        loss: Loss name.
    """
    problem = make_problem("seq", loss, "mean", "unequal")
    op = build(problem, seed=9, mc_samples=3)
    v = torch.randn(problem.dim, dtype=torch.float64)

    state = torch.get_rng_state()
    result = op @ v
    assert torch.equal(torch.get_rng_state(), state)

    torch.manual_seed(0)
    result_seed0 = op @ v
    torch.manual_seed(1)
    result_seed1 = op @ v
    assert torch.equal(result, result_seed0)
    assert torch.equal(result, result_seed1)


@pytest.mark.parametrize("loss", LOSSES)
def test_different_seeds_differ(loss: str) -> None:
    """Different seeds give different matrices.

    Args:
        loss: Loss name.
    """
    problem = make_problem("mlp_tanh", loss, "mean", "unequal")
    dense1 = to_dense(build(problem, seed=1))
    dense2 = to_dense(build(problem, seed=2))
    assert relative_error(dense1, dense2) > 1e-3


@pytest.mark.parametrize("loss", LOSSES)
def test_matmat_columns_share_sample(loss: str) -> None:
    """Every column of a matmat sees the same sample: columns equal matvecs.

    Args:
        loss: Loss name.
    """
    problem = make_problem("conv", loss, "mean", "unequal")
    op = build(problem, seed=4, mc_samples=2)
    generator = torch.Generator().manual_seed(3)
    V = torch.randn(problem.dim, 5, generator=generator, dtype=torch.float64)
    columns = torch.stack([op @ V[:, k] for k in range(V.shape[1])], dim=1)
    assert_matrix_close(op @ V, columns, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("loss", LOSSES)
def test_seed_and_samples_read_each_product(loss: str) -> None:
    """Changing ``_seed`` / ``_mc_samples`` after construction changes later products.

    Args:
        loss: Loss name.
    """
    problem = make_problem("mlp_relu", loss, "sum", "unequal")
    op = build(problem, seed=1, mc_samples=1)
    assert_matrix_close(to_dense(op), reference(problem, seed=1, mc_samples=1))

    op._seed = 2
    assert_matrix_close(to_dense(op), reference(problem, seed=2, mc_samples=1))

    op._mc_samples = 5
    assert_matrix_close(to_dense(op), reference(problem, seed=2, mc_samples=5))


@pytest.mark.parametrize("loss", LOSSES)
def test_convergence_to_ggn(loss: str) -> None:
    """The relative residual to the GGN decreases with the number of samples.

    Args:
        loss: Loss name.
    """
    problem = make_problem("mlp_tanh", loss, "mean", "unequal")
    ggn = dense_ggn(*problem.args())
    errors = [
        relative_error(to_dense(build(problem, seed=0, mc_samples=M)), ggn)
        for M in (1, 16, 256, 1024)
    ]
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] < 0.1, errors


@pytest.mark.parametrize("loss", LOSSES)
def test_average_over_seeds(loss: str) -> None:
    """The average over many seeds approaches the GGN (unbiased estimator).

    Args:
        loss: Loss name.
    """
    problem = make_problem("mlp_tanh", loss, "sum", "single")
    ggn = dense_ggn(*problem.args())
    num_seeds = 64
    average = sum(
        to_dense(build(problem, seed=s, mc_samples=4, check_deterministic=False))
        for s in range(num_seeds)
    )
    average = average / num_seeds
    single = to_dense(build(problem, seed=0, mc_samples=4))
    assert relative_error(average, ggn) < 0.1
    assert relative_error(average, ggn) < relative_error(single, ggn)


@pytest.mark.parametrize("cached_batches", [0, 1, 3])
def test_kept_gaussian_draws_equal_fresh_draws(cached_batches: int) -> None:
    """MSE draws kept across products (all, some or none of the batches) give the
    products of draws made anew, bit for bit, in every later product.

    Args:
        cached_batches: How many of the three batches' factors the cache may hold.
    """
    problem = make_problem("mlp_tanh", "mse", "mean", "unequal")
    op = build(problem, seed=6, mc_samples=3)
    fresh = build(problem, seed=6, mc_samples=3)
    fresh._sample_cache.max_bytes = 0
    sizes = [X.shape[0] * 3 * 3 * 8 for X, _ in problem.data]  # (N, C=3, M=3) float64
    op._sample_cache.for_key(None)  # empty it, with the limit for this test
    op._sample_cache.max_bytes = sum(sizes[:cached_batches])
    V = torch.randn(problem.dim, 2, dtype=torch.float64)
    expected = fresh @ V
    for _ in range(3):
        assert torch.equal(op @ V, expected)
        assert len(op._sample_cache.factors) == cached_batches
    assert torch.equal(op @ V[:, 0], fresh @ V[:, 0])
    assert len(fresh._sample_cache.factors) == 0


def test_kept_draws_follow_changed_batches() -> None:
    """A batch of another shape, dtype or sample count than the kept one is drawn
    anew, from where the generator would be: factors equal those of a fresh pass."""
    from curvlinops_fisher.factors import MCFisherFactor, SampleCache
    from curvlinops_fisher.losses import make_fisher_loss

    loss = make_fisher_loss(torch.nn.MSELoss())
    cache = SampleCache()

    def pass_factors(shapes, dtype=torch.float64, cache=None):
        generator = torch.Generator().manual_seed(11)
        kind = MCFisherFactor(2, generator, cache and cache.for_key(("seed", 2)))
        return [
            kind.for_batch(loss, torch.zeros(s, dtype=dtype), torch.zeros(s)).matrix()
            for s in shapes
        ]

    for shapes, dtype in [
        ([(3, 2), (5, 2), (2, 2)], torch.float64),
        ([(3, 2), (5, 2), (2, 2)], torch.float64),  # all kept
        ([(3, 2), (4, 2), (2, 2), (6, 2)], torch.float64),  # second batch changed
        ([(3, 2), (4, 2)], torch.float64),  # a shorter pass
        ([(3, 2), (4, 2), (2, 2), (6, 2)], torch.float64),
        ([(3, 2), (4, 2)], torch.float32),  # first batch changed
    ]:
        kept = pass_factors(shapes, dtype, cache)
        for B, expected in zip(kept, pass_factors(shapes, dtype), strict=True):
            assert torch.equal(B, expected)
    assert [B.shape[0] for B in cache.factors] == [3, 4]

    # Two passes interleaved, the second with other shapes: each gets its own draws.
    first_shapes, second_shapes = [(3, 2), (4, 2), (2, 2), (5, 2)], [(3, 2), (1, 2)]
    generator = torch.Generator().manual_seed(11)
    first = MCFisherFactor(2, generator, cache.for_key(("seed", 2)))
    factors = [
        first.for_batch(loss, torch.zeros(s, dtype=torch.float64), None).matrix()
        for s in first_shapes[:2]
    ]
    for B, expected in zip(
        pass_factors(second_shapes, cache=cache), pass_factors(second_shapes)
    ):
        assert torch.equal(B, expected)
    factors += [
        first.for_batch(loss, torch.zeros(s, dtype=torch.float64), None).matrix()
        for s in first_shapes[2:]
    ]
    for B, expected in zip(factors, pass_factors(first_shapes), strict=True):
        assert torch.equal(B, expected)
    assert [B.shape[0] for B in cache.factors] == [3, 1]
