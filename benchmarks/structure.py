"""Exact structure vs black-box products: dense matrix, trace, top eigenpairs, caching.

Figures of the exact-structure issue, each a ratio of two times measured in the same
run (medians over repeats, one thread unless ``--threads`` says otherwise):

- ``to_dense()`` vs ``op @ eye(P)`` on an MLP with about 6,000 parameters (20-64-64-5,
  Tanh, float64) and 512 data points (4 batches of 128), MSE and CrossEntropy;
- exact ``trace()`` vs a 10-vector Hutchinson estimate on the same operators;
- top-5 eigenpairs: ``eigh(5)`` (Gram path) vs ``eigsh`` on ``to_scipy()`` of the
  streaming operator, on an MLP with about 270,000 parameters (784-256-256-10, ReLU)
  and 512 data points, EF and MC Fisher with one sample (R = 1);
- a product of ``op.cached()`` vs a product of the streaming operator on that MLP.

Run from the repository root: ``python benchmarks/structure.py [--repeats 3]
[--threads 1] [--out benchmarks/results/structure.json] [--smoke]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from scipy.sparse.linalg import eigsh
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.workloads import build_w2  # noqa: E402
from curvlinops_fisher import (  # noqa: E402
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    hutchinson_trace,
)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mlp_problem(
    widths: list[int],
    activation: type[nn.Module],
    loss: str,
    dtype: torch.dtype,
    batches: int,
    batch_size: int,
):
    """A seeded MLP, loss function and data (``loss`` in "mse", "ce")."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    model = nn.Sequential(*layers).to(dtype).eval()
    C = widths[-1]
    data = []
    for _ in range(batches):
        X = torch.randn(batch_size, widths[0], dtype=dtype)
        y = (
            torch.randn(batch_size, C, dtype=dtype)
            if loss == "mse"
            else torch.randint(0, C, (batch_size,))
        )
        data.append((X, y))
    loss_func = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    return model, loss_func, [p for p in model.parameters() if p.requires_grad], data


OPERATORS = {
    "GGN": (GGNLinearOperator, {}),
    "EF": (EFLinearOperator, {}),
    "MC1": (FisherMCLinearOperator, {"mc_samples": 1}),
}


def dense_and_trace(smoke: bool, repeats: int) -> list[dict]:
    """to_dense vs op @ eye(P), exact trace vs 10-vector Hutchinson (P about 6,000)."""
    widths = [20, 8, 3] if smoke else [20, 64, 64, 5]
    rows = []
    for loss in ("mse", "ce"):
        problem = mlp_problem(
            widths, nn.Tanh, loss, torch.float64, 4, 16 if smoke else 128
        )
        for name, (cls, kwargs) in OPERATORS.items():
            op = cls(*problem, **kwargs)
            P = op.shape[1]
            identity = torch.eye(P, dtype=op.dtype)
            t_identity = timed(lambda: op @ identity, 1)
            t_dense = timed(op.to_dense, repeats)
            t_trace = timed(op.trace, repeats)
            t_hutch = timed(
                lambda: hutchinson_trace(op, 10, torch.Generator().manual_seed(0)),
                repeats,
            )
            error = (op.to_dense() - op @ identity).abs().max().item()
            rows.append(
                {
                    "figure": "dense/trace",
                    "loss": loss,
                    "operator": name,
                    "P": P,
                    "identity_matmat_s": t_identity,
                    "to_dense_s": t_dense,
                    "speedup_to_dense": t_identity / t_dense,
                    "trace_s": t_trace,
                    "hutchinson10_s": t_hutch,
                    "speedup_trace": t_hutch / t_trace,
                    "max_abs_difference": error,
                }
            )
    return rows


def eigen_and_cached(smoke: bool, repeats: int) -> list[dict]:
    """Gram eigh(5) vs eigsh on the streaming operator; cached vs streaming products.

    On the MLP 784-256-256-10 (512 points) and on the CNN of workload W2 (128 points),
    EF and MC Fisher with one sample (``R = 1``: one factor row per data point).
    """
    widths = [30, 16, 16, 10] if smoke else [784, 256, 256, 10]
    mlp = mlp_problem(widths, nn.ReLU, "ce", torch.float32, 4, 16 if smoke else 128)
    w2 = build_w2(smoke)
    cnn = (w2.model, w2.loss_func, w2.params, w2.data)
    rows = []
    for model_name, problem, name in [
        (model, problem, name)
        for model, problem in (("MLP 784-256-256-10", mlp), ("CNN (W2)", cnn))
        for name in ("EF", "MC1")
    ]:
        cls, kwargs = OPERATORS[name]
        op = cls(*problem, **kwargs)
        P = op.shape[1]
        scipy_op = op.to_scipy()

        def gram() -> object:
            return op.eigh(5, method="gram")

        def lanczos() -> object:
            return eigsh(scipy_op, k=5, which="LA", return_eigenvectors=False)

        # Both run once before either is timed: whichever came first in a fresh
        # process would otherwise also pay the allocator's first page faults.
        gram(), lanczos()
        t_gram = timed(gram, repeats)
        t_eigsh = timed(lanczos, 1)
        vals_gram = op.eigh(5, method="gram")[0]
        vals_eigsh = torch.as_tensor(
            sorted(
                eigsh(scipy_op, k=5, which="LA", return_eigenvectors=False),
                reverse=True,
            )
        )
        cached = op.cached()
        v = torch.randn(P)
        t_stream = timed(lambda: op @ v, repeats)
        t_cached = timed(lambda: cached @ v, repeats)
        rows.append(
            {
                "figure": "eigh/cached",
                "model": model_name,
                "operator": name,
                "P": P,
                "gram_eigh5_s": t_gram,
                "eigsh5_s": t_eigsh,
                "speedup_eigh": t_eigsh / t_gram,
                "max_rel_eigenvalue_difference": (
                    (vals_gram - vals_eigsh).abs() / vals_eigsh.abs()
                )
                .max()
                .item(),
                "streaming_mv_s": t_stream,
                "cached_mv_s": t_cached,
                "speedup_cached": t_stream / t_cached,
                "cached_vs_streaming_rel_difference": (
                    (cached @ v - op @ v).norm() / (op @ v).norm()
                ).item(),
            }
        )
    return rows


def main() -> None:
    """Run the figures, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/structure.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.smoke else args.repeats
    rows = dense_and_trace(args.smoke, repeats) + eigen_and_cached(args.smoke, repeats)
    for row in rows:
        shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()}
        print("  ".join(f"{k}={v}" for k, v in shown.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "threads": args.threads, "repeats": repeats}
    out.write_text(json.dumps({"machine": info, "records": rows}, indent=1))


if __name__ == "__main__":
    main()
