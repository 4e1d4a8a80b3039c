"""Data-parallel products: time with 1 and 2 processes on the same workload.

One workload, the GGN of an MLP (20-64-64-5, Tanh, float32, about 5,900 parameters)
with CrossEntropy on 1,024 data points (8 batches of 128), split into contiguous
equal shards over Gloo processes on the CPU, one thread each. For each setting the
median wall time (after a barrier, on rank 0) of a matrix-vector product and of a
product with 16 columns:

- ``1 process``: the single-process operator (``process_group=None``);
- ``1 rank``: a process group of size 1 (the distributed code path, no partner);
- ``2 ranks``: two processes, half of the data each.

Communication share: the median time of a bare ``all_reduce`` of the product's
buffer (``P * K + 1`` numbers, after a barrier) over the product's time; and the time
spent inside the product's ``all_reduce`` (which includes waiting for the slower
rank) over the product's time.

Run from the repository root: ``python benchmarks/distributed.py [--repeats 5]
[--out benchmarks/results/distributed.json] [--smoke]``. The speedup needs a free
core per process; on a loaded machine the figures mostly measure the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from curvlinops_fisher import GGNLinearOperator

FULL = {
    "widths": [20, 64, 64, 5],
    "batches": 8,
    "batch_size": 128,
    "repeats": 5,
    "world_sizes": [1, 2],
}
#: Smoke mode (run by the tests): tiny sizes, and only the 2-rank group is spawned.
SMOKE = {
    "widths": [4, 6, 3],
    "batches": 2,
    "batch_size": 8,
    "repeats": 1,
    "world_sizes": [2],
}
COLUMNS = (1, 16)


def problem(widths: list[int], batches: int, batch_size: int):
    """The seeded MLP, loss and the whole data set (identical on every rank)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).eval()
    data = [
        (
            torch.randn(batch_size, widths[0]),
            torch.randint(0, widths[-1], (batch_size,)),
        )
        for _ in range(batches)
    ]
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


def median_time(fn, repeats: int, barrier: bool) -> float:
    """Median wall time of ``fn`` after one warm-up call (barrier before each)."""
    fn()
    times = []
    for _ in range(repeats):
        if barrier:
            dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class AllReduceClock:
    """Wraps ``torch.distributed.all_reduce`` to add up the time spent in it."""

    def __init__(self):
        self.seconds, self._original = 0.0, dist.all_reduce

    def __enter__(self):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        dist.all_reduce = timed
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def worker(rank: int, world_size: int, init_file: str, config: dict, out: str):
    """One rank: time products on its shard; rank 0 writes the records."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    model, loss_func, params, data = problem(
        config["widths"], config["batches"], config["batch_size"]
    )
    per_rank = len(data) // world_size
    shard = data[rank * per_rank : (rank + 1) * per_rank]
    op = GGNLinearOperator(model, loss_func, params, shard, process_group="default")
    P, repeats = op.shape[1], config["repeats"]
    records = []
    for K in COLUMNS:
        V = torch.randn(P, K, generator=torch.Generator().manual_seed(K))
        product = median_time(lambda V=V: op @ V, repeats, barrier=True)
        with AllReduceClock() as clock:
            median_time(lambda V=V: op @ V, repeats, barrier=True)
        in_product = clock.seconds / (repeats + 1)
        buffer = torch.zeros(P * K + 1)
        bare = median_time(lambda b=buffer: dist.all_reduce(b), repeats, barrier=True)
        records.append(
            {
                "setting": f"{world_size} rank" + ("s" if world_size > 1 else ""),
                "processes": world_size,
                "columns": K,
                "product_s": product,
                "allreduce_s": bare,
                "comm_share": bare / product,
                "allreduce_in_product_share": in_product / product,
            }
        )
    if rank == 0:
        Path(out).write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip finalization: Gloo threads may abort a tearing-down process


def single_process(config: dict) -> list[dict]:
    """The single-process operator (no group) on all the data."""
    torch.set_num_threads(1)
    model, loss_func, params, data = problem(
        config["widths"], config["batches"], config["batch_size"]
    )
    op = GGNLinearOperator(model, loss_func, params, data)
    records = []
    for K in COLUMNS:
        V = torch.randn(op.shape[1], K, generator=torch.Generator().manual_seed(K))
        product = median_time(lambda V=V: op @ V, config["repeats"], barrier=False)
        records.append(
            {
                "setting": "1 process",
                "processes": 1,
                "columns": K,
                "product_s": product,
                "allreduce_s": 0.0,
                "comm_share": 0.0,
                "allreduce_in_product_share": 0.0,
            }
        )
    return records


def run(config: dict) -> dict:
    """All settings; returns the JSON document."""
    records = single_process(config)
    for world_size in config["world_sizes"]:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "records.json")
            mp.spawn(
                worker,
                args=(world_size, os.path.join(tmp, "rendezvous"), config, out),
                nprocs=world_size,
            )
            records += json.loads(Path(out).read_text())
    base = {r["columns"]: r["product_s"] for r in records if r["allreduce_s"] == 0}
    for r in records:
        r["speedup_vs_1_process"] = base[r["columns"]] / r["product_s"]
    model, *_ = problem(config["widths"], 1, 1)
    return {
        "workload": {
            **{k: config[k] for k in ("widths", "batches", "batch_size")},
            "num_params": sum(p.numel() for p in model.parameters()),
        },
        "repeats": config["repeats"],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "records": records,
    }


def table(document: dict) -> str:
    """The records as a Markdown table."""
    lines = [
        "| setting | columns | product [ms] | speedup vs 1 process | bare all_reduce "
        "[ms] | communication share | all_reduce in product (incl. waiting) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in document["records"]:
        lines.append(
            f"| {r['setting']} | {r['columns']} | {1e3 * r['product_s']:.2f} | "
            f"{r['speedup_vs_1_process']:.2f} | {1e3 * r['allreduce_s']:.3f} | "
            f"{100 * r['comm_share']:.1f}% | "
            f"{100 * r['allreduce_in_product_share']:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run, write JSON and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/distributed.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat")
    args = parser.parse_args()
    config = dict(SMOKE if args.smoke else FULL)
    if args.repeats is not None:
        config["repeats"] = args.repeats
    document = run(config)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=2))
    print(table(document))


if __name__ == "__main__":
    main()
