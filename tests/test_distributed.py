"""Data-parallel operators: 2 and 3 Gloo processes on CPU against one process.

Spawning a process costs seconds, so each test runs a whole group of checks
(:mod:`distributed_workers`) in one spawn. Shards are unequal and, with 3 ranks, one
is empty. A worker that fails raises in the test with its traceback; the process
group's timeout turns a hang into a failure.
"""

from __future__ import annotations

import distributed_workers as workers
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from problems import make_problem

from curvlinops_fisher import GGNLinearOperator
from curvlinops_fisher.errors import DistributedError

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with Gloo is not available",
)


def spawn(check, world_size: int, tmp_path) -> None:
    mp.spawn(
        workers.run,
        args=(world_size, str(tmp_path / "rendezvous"), check),
        nprocs=world_size,
        join=True,
    )


@pytest.mark.parametrize("world_size", [2, 3])
def test_operators_match_single_process(world_size, tmp_path):
    spawn(workers.check_operators, world_size, tmp_path)


def test_solvers_eigh_and_cached(tmp_path):
    spawn(workers.check_solvers_and_cache, 3, tmp_path)


def test_errors_reach_every_rank(tmp_path):
    spawn(workers.check_errors, 2, tmp_path)


def test_process_group_needs_initialized_distributed():
    problem = make_problem("mlp_tanh", "mse", "mean", layout="single")
    args = (problem.model, problem.loss_func, problem.params, problem.data)
    with pytest.raises(DistributedError, match="init_process_group"):
        GGNLinearOperator(*args, process_group="default")


def test_single_process_has_no_group():
    problem = make_problem("mlp_tanh", "mse", "mean", layout="single")
    op = GGNLinearOperator(
        problem.model, problem.loss_func, problem.params, problem.data
    )
    assert op.process_group is None
    assert op.cached().process_group is None
