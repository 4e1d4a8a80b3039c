"""Data-parallel operators: 2 and 3 Gloo processes on CPU against one process.

Spawning a process costs seconds, so each test runs a whole group of checks
(:mod:`distributed_workers`) in one spawn. Shards are unequal and, with 3 ranks, one
is empty. A worker that fails raises in the test with its traceback; the process
group's timeout turns a hang into a failure.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import distributed_workers as workers
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from problems import make_problem

from curvlinops_fisher import GGNLinearOperator
from curvlinops_fisher.errors import DistributedError

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with Gloo is not available",
)


def spawn(world_size: int, tmp_path, *checks) -> None:
    mp.spawn(
        workers.run,
        args=(world_size, str(tmp_path / "rendezvous"), checks),
        nprocs=world_size,
        join=True,
    )


def test_two_ranks_operators_and_errors(tmp_path):
    """Every operator and loss (unequal shards); CrossEntropy options; errors."""
    spawn(
        2,
        tmp_path,
        workers.check_operators,
        workers.check_loss_options,
        workers.check_errors,
    )


def test_three_ranks_operators_solvers_and_cache(tmp_path):
    """Operators, losses and CrossEntropy options with an empty shard; SciPy; cached."""
    spawn(
        3,
        tmp_path,
        workers.check_operators,
        workers.check_loss_options,
        workers.check_solvers_and_cache,
    )


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


def test_torchrun_example_runs_on_two_processes():
    """The documented launch: torchrun (python -m torch.distributed.run) on CPU."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "examples/distributed/eigsh_torchrun.py",
            "--check",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "matches the single-process operator" in result.stdout


def test_benchmark_smoke(tmp_path):
    """benchmarks/distributed.py runs end to end and writes complete records."""
    out = tmp_path / "distributed.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/distributed.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert {(r["setting"], r["columns"]) for r in records} == {
        (setting, K) for setting in ("1 process", "2 ranks") for K in (1, 16)
    }
    for r in records:
        assert math.isfinite(r["product_s"]) and r["product_s"] > 0
        assert r["speedup_vs_1_process"] > 0
        assert (r["allreduce_s"] > 0) == (r["setting"] == "2 ranks")
