"""Measurement jobs, run in a fresh process per job by ``benchmarks/run.py``.

A *time job* measures one workload at one thread setting: the gradient pass, and per
library and operator the construction, one matrix-vector and one matrix-matrix
(16 columns) product, plus ``to_dense``/``trace``/``eigh`` where the operator has
them. It also checks, once per workload, that the libraries' products agree.

A *memory job* measures the peak extra memory of one call (a gradient pass or one
operator's matrix-vector product) in a process that did nothing else before.

Command line (used by ``run.py``): ``python -m benchmarks.worker SPEC_JSON OUT_JSON``.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import torch

from benchmarks.libraries import (
    AGREEMENT_OPERATORS,
    OPERATORS,
    OURS,
    build_operator,
    load_library,
)
from benchmarks.machine import load_average
from benchmarks.measure import (
    measure_memory,
    measure_steady_memory,
    time_call,
    time_calls,
)
from benchmarks.workloads import WORKLOADS, Problem

#: Number of columns of the matrix-matrix product.
NUM_COLUMNS = 16
#: Largest parameter count for which ``to_dense``/``trace``/``eigh`` are timed.
MAX_DENSE_PARAMS = 2000
#: Number of eigenpairs requested from ``eigh``.
EIGH_K = 5
#: Tolerances of the agreement check (``atol`` is relative to the largest entry).
AGREE_RTOL = 1e-4
AGREE_ATOL_REL = 1e-6

EXTRAS: dict[str, Callable[[Any], Any]] = {
    "to_dense": lambda op: op.to_dense(),
    "trace": lambda op: op.trace(),
    "eigh": lambda op: op.eigh(EIGH_K),
}


def probe_vectors(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded vector ``[P]`` and matrix ``[P, 16]`` in the parameters' dtype.

    Args:
        problem: The workload.

    Returns:
        The vector and the matrix.
    """
    gen = torch.Generator().manual_seed(1)
    dtype = problem.params[0].dtype
    v = torch.randn(problem.num_params, generator=gen, dtype=dtype)
    V = torch.randn(problem.num_params, NUM_COLUMNS, generator=gen, dtype=dtype)
    return v, V


def gradient_pass(problem: Problem) -> Callable[[], None]:
    """One gradient pass over all batches (the unit of every time ratio).

    Args:
        problem: The workload.

    Returns:
        A function doing ``model.zero_grad()`` and ``loss_func(model(X), y).backward()``
        for every batch.
    """

    def run() -> None:
        problem.model.zero_grad()
        for X, y in problem.data:
            problem.loss_func(problem.model(X), y).backward()

    return run


def _error(exc: BaseException) -> str:
    """One-line description of an exception."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def time_operator(
    library: Any,
    label: str,
    problem: Problem,
    repeats: int,
    memory: bool,
    grad: Callable[[], None],
) -> dict[str, Any]:
    """Time construction and products of one operator.

    The gradient pass is timed again with each operator, alternating with its
    matrix-vector product (one call of each per round), so that each operator's
    ratios divide by gradient times taken next to its own (robust to the machine's
    speed drifting during a run).

    Args:
        library: The imported library.
        label: Operator label (key of ``OPERATORS``).
        problem: The workload.
        repeats: Number of timed calls per figure.
        memory: Also measure the matrix-vector product's peak extra memory in this
            process (cheap, used by ``--smoke``).

    Returns:
        ``{"time_s": {...}, "memory": {...}, "error": str | None}``.
    """
    v, V = probe_vectors(problem)
    times: dict[str, Any] = {}
    out: dict[str, Any] = {"time_s": times, "memory": {}, "error": None}
    try:
        times["build"] = time_call(
            lambda: build_operator(library, label, problem), repeats
        )
        op = build_operator(library, label, problem)
        times.update(time_calls({"grad": grad, "mv": lambda: op @ v}, repeats))
        times["mm16"] = time_call(lambda: op @ V, repeats)
        if memory:
            out["memory"]["mv"] = {"steady": measure_memory(lambda: op @ v)}
    except Exception as exc:  # record and go on with the other cells
        out["error"] = _error(exc)
        traceback.print_exc()
        return out
    for name, fn in EXTRAS.items():
        if hasattr(op, name) and problem.num_params <= MAX_DENSE_PARAMS:
            try:
                times[name] = time_call(lambda fn=fn: fn(op), min(repeats, 3))
            except Exception as exc:  # an extra failing must not lose the row
                times[name] = {"error": _error(exc)}
    return out


def check_agreement(problem: Problem, theirs: Any) -> dict[str, Any]:
    """Compare ``op @ v`` of our operators with curvlinops' (``AGREEMENT_OPERATORS``).

    Args:
        problem: The workload.
        theirs: The imported curvlinops module.

    Returns:
        Per operator label ``{"agree": bool | None, "max_abs_diff": float,
        "max_abs": float, "error": str | None}``.
    """
    ours = load_library(OURS)
    v, _ = probe_vectors(problem)
    result = {}
    for label in AGREEMENT_OPERATORS:
        try:
            a = build_operator(ours, label, problem) @ v
            b = build_operator(theirs, label, problem) @ v
        except Exception as exc:
            result[label] = {"agree": None, "error": _error(exc)}
            continue
        scale = b.abs().max().item()
        agree = torch.allclose(a, b, rtol=AGREE_RTOL, atol=AGREE_ATOL_REL * scale)
        result[label] = {
            "agree": bool(agree),
            "max_abs_diff": (a - b).abs().max().item(),
            "max_abs": scale,
            "error": None,
        }
    return result


def warm_up(problem: Problem, libraries: Iterable[Any]) -> None:
    """Build every operator and multiply it onto ``v`` and ``V`` once, untimed.

    A fresh process is slower at first (its heap grows, page faults, kernel and
    primitive caches fill): measured up to 1.7x on the first operator's products of
    W2, which made the first operator of every table look slower than the others.
    Errors are left to :func:`time_operator`, which records them.

    Args:
        problem: The workload.
        libraries: The imported libraries.
    """
    v, V = probe_vectors(problem)
    for library in libraries:
        for label in OPERATORS:
            try:
                op = build_operator(library, label, problem)
                op @ v
                op @ V
            except Exception:  # noqa: BLE001, S112 - recorded by time_operator
                continue


def time_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one workload at one thread setting.

    Args:
        spec: ``{"workload", "threads", "libraries", "repeats", "smoke", "agreement",
            "memory"}``; ``agreement`` runs :func:`check_agreement` (needs curvlinops
            in ``libraries`` or importable), ``memory`` measures memory in-process.

    Returns:
        ``{"grad": times, "grad_memory": ..., "cells": {library: {label: ...}},
        "agreement": ... | None, "num_params": int, "load_average_start": [...],
        "load_average_end": [...]}``.
    """
    torch.set_num_threads(spec["threads"])
    problem = WORKLOADS[spec["workload"]].build(spec["smoke"])
    grad = gradient_pass(problem)
    out: dict[str, Any] = {
        "load_average_start": load_average(),
        "num_params": problem.num_params,
        "grad": time_call(grad, spec["repeats"]),
        "grad_memory": {"steady": measure_memory(grad)} if spec["memory"] else {},
        "cells": {},
        "agreement": None,
    }
    libraries = {name: load_library(name) for name in spec["libraries"]}
    warm_up(problem, libraries.values())
    for name, library in libraries.items():
        out["cells"][name] = {
            label: time_operator(
                library, label, problem, spec["repeats"], spec["memory"], grad
            )
            for label in OPERATORS
        }
    if spec["agreement"]:
        theirs = load_library(spec["theirs"])
        out["agreement"] = check_agreement(problem, theirs) if theirs else None
    out["load_average_end"] = load_average()
    return out


def memory_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak extra memory of one call in a fresh process.

    The problem (model, data) and, for products, the operator (built with
    ``check_deterministic=False`` so that construction does no products) are set up,
    then the call is measured: ``first`` against the high-water mark after setup,
    with no call before (the first call also pays one-time allocations), and, if the
    high-water mark can be reset, ``steady``, the median over the next calls (see
    :func:`~benchmarks.measure.measure_steady_memory`).

    Args:
        spec: ``{"workload", "threads", "smoke", "target"}`` with ``target`` either
            ``"grad"`` or ``"LIBRARY:LABEL"``.

    Returns:
        ``{"first": {...}, "steady": {...} | None}``.
    """
    torch.set_num_threads(spec["threads"])
    problem = WORKLOADS[spec["workload"]].build(spec["smoke"])
    if spec["target"] == "grad":
        fn = gradient_pass(problem)
    else:
        name, label = spec["target"].split(":")
        op = build_operator(
            load_library(name), label, problem, check_deterministic=False
        )
        v, _ = probe_vectors(problem)

        def fn() -> torch.Tensor:
            return op @ v

    first = measure_memory(fn)
    steady = measure_steady_memory(fn) if first["peak_reset"] else None
    return {"first": first, "steady": steady}


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "time": time_job,
    "memory": memory_job,
}


def main(argv: list[str]) -> None:
    """Run the job described by ``argv[0]`` (JSON) and write its result to ``argv[1]``.

    Args:
        argv: ``[SPEC_JSON, OUT_JSON]``.
    """
    spec = json.loads(argv[0])
    result = JOBS[spec["job"]](spec)
    with open(argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
