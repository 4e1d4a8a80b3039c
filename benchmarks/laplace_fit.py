"""Laplace fits with our backends vs laplace-torch's ``CurvlinopsGGN`` backend.

Times ``Laplace(model, likelihood, subset_of_weights="all", hessian_structure=...,
backend=...).fit(loader)`` for ``hessian_structure`` in ``full`` and ``diag``, with
:class:`curvlinops_fisher.laplace.CurvlinopsFisherGGN` and with laplace-torch's
``CurvlinopsGGN`` in the same run (medians over repeats after one warm-up fit, one
thread unless ``--threads`` says otherwise), on an MLP with about 6,000 parameters
(20-64-64-C, Tanh) and 512 data points in 4 batches of 128, for classification
(C = 5) and regression (C = 5 and C = 1). Each record also gives the largest entry-wise
difference of the two posterior precisions relative to their largest entry.

laplace-torch's full path multiplies a curvlinops operator onto ``torch.eye(P)`` (``P``
products per batch); its diagonal path builds per-sample Jacobians with
``torch.func.jacrev``. Ours: ``to_dense()`` and ``diagonal()`` from the factor rows
(``128 * C`` VJPs per batch).

Run from the repository root: ``python benchmarks/laplace_fit.py [--repeats 3]
[--threads 1] [--dtype float32] [--out benchmarks/results/laplace.json] [--smoke]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvlinops_fisher.laplace import CurvlinopsFisherGGN

BACKENDS = {"ours": CurvlinopsFisherGGN, "laplace-torch": CurvlinopsGGN}


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``fn`` over ``repeats`` calls after one warm-up call."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def problem(
    likelihood: str, widths: list[int], num_data: int, batch_size: int, dtype
) -> tuple[nn.Module, DataLoader]:
    """A seeded Tanh MLP and a non-shuffling loader."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).to(dtype).eval()
    X = torch.randn(num_data, widths[0], dtype=dtype)
    C = widths[-1]
    y = (
        torch.randint(0, C, (num_data,))
        if likelihood == "classification"
        else torch.randn(num_data, C, dtype=dtype)
    )
    return model, DataLoader(TensorDataset(X, y), batch_size=batch_size)


def fit(model: nn.Module, likelihood: str, loader, structure: str, backend) -> Laplace:
    """A fitted Laplace approximation of all weights."""
    la = Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure=structure,
        backend=backend,
    )
    la.fit(loader)
    return la


#: (likelihood, number of outputs C)
CONFIGS = [("classification", 5), ("regression", 5), ("regression", 1)]


def run(smoke: bool, repeats: int, dtype: torch.dtype) -> list[dict]:
    """Time both backends on every configuration and structure."""
    num_data, batch_size = (32, 16) if smoke else (512, 128)
    rows = []
    for likelihood, C in CONFIGS:
        widths = [20, 8, C] if smoke else [20, 64, 64, C]
        model, loader = problem(likelihood, widths, num_data, batch_size, dtype)
        P = sum(p.numel() for p in model.parameters())
        for structure in ("full", "diag"):
            seconds, precision = {}, {}
            for name, backend in BACKENDS.items():
                seconds[name], la = timed(
                    lambda backend=backend: fit(
                        model, likelihood, loader, structure, backend
                    ),
                    repeats,
                )
                precision[name] = la.posterior_precision.detach()
            ours, theirs = precision["ours"], precision["laplace-torch"]
            rows.append(
                {
                    "likelihood": likelihood,
                    "C": C,
                    "structure": structure,
                    "P": P,
                    "num_data": num_data,
                    "batch_size": batch_size,
                    "dtype": str(dtype).removeprefix("torch."),
                    "ours_s": seconds["ours"],
                    "laplace_torch_s": seconds["laplace-torch"],
                    "speedup": seconds["laplace-torch"] / seconds["ours"],
                    "max_rel_difference": float(
                        (ours - theirs).abs().max() / theirs.abs().max()
                    ),
                }
            )
    return rows


def main() -> None:
    """Run the figures, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/laplace.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.smoke else args.repeats
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    rows = run(args.smoke, repeats, dtype)
    for row in rows:
        shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()}
        print("  ".join(f"{k}={v}" for k, v in shown.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "repeats": repeats,
        "run_s": round(time.perf_counter() - start, 1),
    }
    out.write_text(json.dumps({"machine": info, "records": rows}, indent=1))


if __name__ == "__main__":
    main()
