"""Worker functions of ``test_distributed.py``, run in spawned Gloo processes.

Each worker joins a process group, runs a group of checks against single-process
references computed on the concatenated data (every rank builds the same problem from
a seed), and raises on the first failure; ``torch.multiprocessing.spawn`` re-raises
it in the test with the worker's traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import timedelta

import numpy
import pytest
import torch
import torch.distributed as dist
from concat_reference import concatenate, loss64
from problems import LOSSES, REDUCTIONS, make_problem
from reference import dense_fisher_mc, dense_ggn
from scipy.sparse.linalg import cg, eigsh
from test_loss_options import WEIGHT, ce_data
from torch import nn

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)
from curvlinops_fisher.distributed import rank_batch_seed, solve_on_root
from curvlinops_fisher.errors import DataError, DistributedError, TargetError

#: Process group timeout: a hang fails the test instead of blocking it.
TIMEOUT = timedelta(seconds=60)
#: Which of the problem's three batches (sizes 3, 5, 2) each rank holds.
SHARDS = {2: [[0], [1, 2]], 3: [[0, 1], [], [2]]}
OPERATORS = {"ggn": GGNLinearOperator, "ef": EFLinearOperator}
SEED = 42
#: Batches of :func:`loss_option_batches` per rank, two layouts per world size: a
#: rank without ignored targets (its divisor counts, its flag is False), a rank whose
#: targets are all ignored (divisor 0) and, with 3 ranks, an empty shard.
OPTION_SHARDS = {
    2: [[[0], [1, 2, 3]], [[0, 1, 2], [3]]],
    3: [[[3], [], [0, 1, 2]], [[0], [1, 2], [3]]],
}
#: CrossEntropyLoss(reduction='mean') options whose divisor depends on the targets.
CE_OPTIONS = {
    "ignore_index": {},
    "weight": {"weight": WEIGHT},
    "weight-smoothing": {"weight": WEIGHT, "label_smoothing": 0.1},
}


def run(
    rank: int, world_size: int, init_file: str, checks: tuple[Callable, ...]
) -> None:
    """Join the group (file rendezvous), run each ``check(rank, world_size)``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=TIMEOUT,
    )
    try:
        for check in checks:
            check(rank, world_size)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalization: Gloo's worker threads occasionally
    # abort the process (SIGABRT, "terminate called without an active exception")
    # while Python tears down, after all checks have passed.
    sys.stdout.flush()
    os._exit(0)


def shard(batches: list, rank: int, world_size: int) -> list:
    return [batches[i] for i in SHARDS[world_size][rank]]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=what)


def mc_reference(problem, rank_batches: list[list], **kwargs) -> torch.Tensor:
    """Single-process MC Fisher with the distributed sample, as a dense matrix.

    Batch ``i`` of rank ``r`` is a one-batch single-process operator seeded with
    ``rank_batch_seed(seed, r, i)`` (its generator then draws exactly that batch's
    sample); the sum over all batches is the distributed operator.
    """
    P = sum(p.numel() for p in problem.params)
    dense = torch.zeros(P, P, dtype=torch.float64)
    for r, batches in enumerate(rank_batches):
        for i, batch in enumerate(batches):
            op = FisherMCLinearOperator(
                problem.model,
                problem.loss_func,
                problem.params,
                [batch],
                seed=rank_batch_seed(SEED, r, i),
                num_data=problem.num_data,
                **kwargs,
            )
            dense += op @ torch.eye(P, dtype=torch.float64)
    return dense


def check_operators(rank: int, world_size: int) -> None:
    """Every operator and loss, both reductions: products, structure, gradient."""
    for loss in LOSSES:
        for reduction in REDUCTIONS:
            problem = make_problem("mlp_tanh", loss, reduction, layout="unequal")
            P = sum(p.numel() for p in problem.params)
            eye = torch.eye(P, dtype=torch.float64)
            local = shard(problem.batches, rank, world_size)
            args = (problem.model, problem.loss_func, problem.params)
            name = f"{loss}-{reduction}"
            for key, cls in OPERATORS.items():
                ours = cls(*args, local, process_group="default")
                ref = cls(*args, problem.batches)
                expected = ref @ eye
                assert_close(ours @ eye, expected, f"{key} {name} product")
                if key == "ggn":
                    assert_close(ours.to_dense(), expected, f"{name} to_dense")
                    assert_close(ours.trace(), expected.trace(), f"{name} trace")
                    assert_close(ours.diagonal(), expected.diagonal(), f"{name} diag")
                    grad, value = ours.gradient_and_loss()
                    ref_grad, ref_value = ref.gradient_and_loss()
                    assert_close(value, ref_value, f"{name} loss")
                    for g, h in zip(grad, ref_grad, strict=True):
                        assert_close(g, h, f"{name} gradient")
            mc = FisherMCLinearOperator(
                *args, local, seed=SEED, mc_samples=2, process_group="default"
            )
            rank_batches = [
                shard(problem.batches, r, world_size) for r in range(world_size)
            ]
            expected = mc_reference(problem, rank_batches, mc_samples=2)
            assert_close(mc @ eye, expected, f"mc {name} product")
            assert_close(mc @ eye, expected, f"mc {name} second product")
            assert_close(mc.to_dense(), expected, f"mc {name} to_dense")
            assert_close(mc.diagonal(), expected.diagonal(), f"mc {name} diagonal")
    # the MC sample itself, against the brute-force reference (float64 torch.func)
    problem = make_problem("mlp_tanh", "ce", "mean", layout="unequal")
    local = shard(problem.batches, rank, world_size)
    mc = FisherMCLinearOperator(
        problem.model, problem.loss_func, problem.params, local, seed=SEED,
        process_group="default",
    )  # fmt: skip
    brute = sum(
        dense_fisher_mc(
            problem.model,
            problem.loss_func,
            problem.params,
            [batch],
            seed=rank_batch_seed(SEED, r, i),
            num_data=problem.num_data,
        )
        for r in range(world_size)
        for i, batch in enumerate(shard(problem.batches, r, world_size))
    )
    assert_close(mc.to_dense(), brute, "mc against brute force")


def check_solvers_and_cache(rank: int, world_size: int) -> None:
    """SciPy on rank 0 with the others serving; eigh; cached operator; num_data."""
    problem = make_problem("mlp_tanh", "ce", "sum", layout="unequal")
    local = shard(problem.batches, rank, world_size)
    args = (problem.model, problem.loss_func, problem.params)
    op = GGNLinearOperator(*args, local, process_group="default")
    ref = GGNLinearOperator(*args, problem.batches)
    dense = dense_ggn(*args, problem.batches)
    P = dense.shape[0]

    # eigsh with rank 0 driving: every rank gets rank 0's result
    values = solve_on_root(
        op, lambda A: eigsh(A, k=3, which="LA", return_eigenvectors=False)
    )
    expected = torch.linalg.eigvalsh(dense).flip(0)[:3]
    assert numpy.allclose(numpy.sort(values)[::-1], expected.numpy(), rtol=1e-8)
    # cg on (A + I) x = b, with the damped sum operator
    b = numpy.linspace(-1.0, 1.0, P)
    x, info = solve_on_root(op, lambda A: cg(A + _identity(P), b, rtol=1e-12))
    assert info == 0
    x_ref = torch.linalg.solve(dense + torch.eye(P, dtype=dense.dtype), torch.tensor(b))
    assert numpy.allclose(x, x_ref.numpy(), atol=1e-8)

    # eigh: 'auto' takes eigsh; 'gram' needs all rows
    eigenvalues, eigenvectors = op.eigh(3)
    assert_close(eigenvalues, expected, "eigh values")
    assert_close(
        (ref @ eigenvectors), eigenvectors * eigenvalues, "eigh vectors (A v = l v)"
    )
    with pytest.raises(ValueError, match="method='gram'"):
        op.eigh(2, method="gram")

    # factor: this rank's rows only; cached operator sums the ranks' parts
    U = op.factor()
    ref_U = ref.factor()
    assert U.shape[1] == P and U.shape[0] <= ref_U.shape[0]
    cached = op.cached()
    eye = torch.eye(P, dtype=torch.float64)
    assert_close(cached @ eye, ref @ eye, "cached product")
    assert_close(cached.to_dense(), ref.to_dense(), "cached to_dense")
    assert_close(cached.trace(), ref.trace(), "cached trace")
    assert_close(cached.diagonal(), ref.diagonal(), "cached diagonal")
    cached_values, _ = cached.eigh(3)
    assert_close(cached_values, expected, "cached eigh")

    # a subgroup of ranks 1 (empty shard, group rank 0: drives the solver) and 2
    subgroup = dist.new_group([1, 2])  # called on every rank
    if rank in (1, 2):
        sub = GGNLinearOperator(*args, local, process_group=subgroup)
        sub_ref = GGNLinearOperator(*args, [problem.batches[2]])
        values = solve_on_root(
            sub, lambda A: eigsh(A, k=2, which="LA", return_eigenvectors=False)
        )
        expected_sub = torch.linalg.eigvalsh(sub_ref.to_dense()).flip(0)[:2]
        assert numpy.allclose(numpy.sort(values)[::-1], expected_sub.numpy())
    else:
        with pytest.raises(DistributedError, match="not a member"):
            GGNLinearOperator(*args, local, process_group=subgroup)

    # num_data given (global, as on every rank) equals the counted one
    given = GGNLinearOperator(*args, local, num_data=problem.num_data,
                              process_group="default")  # fmt: skip
    assert given._N_data == op._N_data == problem.num_data


def _identity(dim: int):
    from scipy.sparse.linalg import aslinearoperator

    return aslinearoperator(numpy.eye(dim))


def check_errors(rank: int, world_size: int) -> None:
    """A rank that fails makes every rank fail with a clear message, no hang."""
    problem = make_problem("mlp_tanh", "ce", "mean", layout="unequal")
    args = (problem.model, problem.loss_func, problem.params)
    local = shard(problem.batches, rank, world_size)

    # construction: bad targets on rank 1 only
    bad = [(X, y + 100 if rank == 1 else y) for X, y in local]
    with pytest.raises(
        DistributedError, match=r"(?s)rank\(s\) 1 .*out of range"
    ) as info:
        GGNLinearOperator(*args, bad, process_group="default")
    assert set(info.value.failures) == {1}

    # construction: data empty on every rank
    with pytest.raises(DataError, match="empty on every rank"):
        GGNLinearOperator(*args, [], process_group="default")

    # construction: ranks disagree on num_data
    with pytest.raises(DistributedError, match="different num_data"):
        GGNLinearOperator(*args, local, num_data=10 + rank, process_group="default")

    # a product whose local part fails on the last rank
    op = GGNLinearOperator(*args, local, process_group="default")
    P = op.shape[1]
    v = torch.ones(P, dtype=torch.float64)
    expected = op @ v
    if rank == world_size - 1:

        def broken(*args):
            raise RuntimeError("boom in the local product")

        op._local_matmat = broken
    with pytest.raises(DistributedError, match="boom in the local product"):
        op @ v
    if rank == world_size - 1:
        del op._local_matmat
        op._structure.row_blocks = broken
    with pytest.raises(DistributedError, match="boom in the local product"):
        op.trace()
    op._structure.__dict__.pop("row_blocks", None)
    # the group is still in step: the next product works
    assert_close(op @ v, expected, "product after an error")

    # the driving rank's solver fails: the servers stop with its message
    def solve(A):
        A @ numpy.ones(P)
        raise ArithmeticError("solver diverged")

    error = ArithmeticError if rank == 0 else DistributedError
    with pytest.raises(error, match="solver diverged"):
        solve_on_root(op, solve)
    assert_close(op @ v, expected, "product after a failed solver")


def loss_option_batches() -> tuple[nn.Module, list]:
    """Sequence model and four batches of class targets (``-100`` ignored).

    Batch 0 has no ignored target, batches 1 and 2 some (one datum entirely), batch 3
    only ignored ones.
    """
    model, batches = ce_data("padded")
    X, y = batches[0]
    batches[0] = (X, y.clamp(min=0))
    assert not bool((batches[0][1] == -100).any())
    assert bool((batches[3][1] == -100).all())
    return model, batches


def mc_sum_reference(model, params, rank_batches: list[list]) -> torch.Tensor:
    """The distributed MC sample (2 per term) of ``CrossEntropyLoss('sum')``, dense.

    As in :func:`mc_reference`: one single-process operator per batch, seeded with
    ``rank_batch_seed``.
    """
    P = sum(p.numel() for p in params)
    dense = torch.zeros(P, P, dtype=torch.float64)
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    for r, batches in enumerate(rank_batches):
        for i, batch in enumerate(batches):
            op = FisherMCLinearOperator(
                model,
                loss_func,
                params,
                [batch],
                seed=rank_batch_seed(SEED, r, i),
                mc_samples=2,
            )
            dense += op @ torch.eye(P, dtype=torch.float64)
    return dense


def check_loss_options(rank: int, world_size: int) -> None:
    """CrossEntropyLoss 'mean' with ignored targets and class weights.

    The data set's divisor is summed over the ranks, also from ranks whose own
    targets do not need it, have none counted, or are empty.
    """
    model, batches = loss_option_batches()
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    eye = torch.eye(P, dtype=torch.float64)
    for layout in OPTION_SHARDS[world_size]:
        rank_batches = [[batches[i] for i in indices] for indices in layout]
        everything = [batch for shard in rank_batches for batch in shard]
        local = rank_batches[rank]
        num_data = sum(len(y) for _, y in everything)
        for case, options in CE_OPTIONS.items():
            loss_func = nn.CrossEntropyLoss(**options)
            args = (model, loss_func, params)
            name = f"{case} {layout}"
            ggn = GGNLinearOperator(*args, local, process_group="default")
            expected = {}
            for key, kwargs in {
                "ggn": {},
                "ef": {},
                "ef-per-datum": {"per_datum": True},
            }.items():
                cls = GGNLinearOperator if key == "ggn" else EFLinearOperator
                ours = (
                    ggn
                    if key == "ggn"
                    else cls(*args, local, process_group="default", **kwargs)
                )
                ref = cls(*args, everything, **kwargs)
                assert ours._risk_scale.divisor == pytest.approx(
                    ref._risk_scale.divisor, rel=1e-12
                ), name
                expected[key] = ref @ eye
                assert_close(ours @ eye, expected[key], f"{key} {name} product")
                assert_close(ours.to_dense(), expected[key], f"{key} {name} dense")
            given = GGNLinearOperator(
                *args, local, num_data=num_data, process_group="default"
            )
            assert_close(given @ eye, expected["ggn"], f"{name} num_data given")
            grad, value = ggn.gradient_and_loss()
            X, y = concatenate(everything)
            truth = loss64(loss_func)(model(X), y)
            assert_close(value, truth, f"{name} loss")
            truth_grad = torch.autograd.grad(truth, params)
            for g, h in zip(grad, truth_grad, strict=True):
                assert_close(g, h, f"{name} gradient")
        # the MC Fisher (unweighted): the distributed sample, divided by the number
        # of counted targets of the whole data set
        mc = FisherMCLinearOperator(
            model, nn.CrossEntropyLoss(), params, local, seed=SEED,
            mc_samples=2, process_group="default",
        )  # fmt: skip
        counted = sum(int((y != -100).sum()) for _, y in everything)
        assert mc._risk_scale.divisor == counted
        expected = mc_sum_reference(model, params, rank_batches) / counted
        assert_close(mc @ eye, expected, f"mc {layout} product")
        assert_close(mc.to_dense(), expected, f"mc {layout} to_dense")
    # every target of the data set ignored: PyTorch's mean is nan, on every rank
    ignored = [batches[3]] if rank != 1 else []
    with pytest.raises(TargetError, match="ignored"):
        GGNLinearOperator(model, nn.CrossEntropyLoss(), params, ignored,
                          process_group="default")  # fmt: skip
