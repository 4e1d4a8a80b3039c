"""Top eigenvalues of a GGN whose data is sharded over processes.

Run on CPU with two processes (Gloo)::

    torchrun --standalone --nproc_per_node=2 examples/distributed/eigsh_torchrun.py

or on GPUs, one process per GPU (NCCL)::

    torchrun --standalone --nproc_per_node=NUM_GPUS \
        examples/distributed/eigsh_torchrun.py --backend nccl

Each rank holds a different (here: unequal) part of the data set and builds the same
operator with ``process_group="default"``; the operator is the GGN of the whole data
set. Rank 0 runs SciPy's ``eigsh`` while the other ranks serve its products
(``solve_on_root``); every rank receives the eigenvalues. ``--check`` compares them
on rank 0 with the single-process operator on the concatenated data.
"""

from __future__ import annotations

import argparse
import os

import numpy
import torch
import torch.distributed as dist
from scipy.sparse.linalg import eigsh
from torch import nn

from curvlinops_fisher import GGNLinearOperator
from curvlinops_fisher.distributed import solve_on_root

NUM_BATCHES, BATCH_SIZE, K = 7, 16, 4


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The whole data set: NUM_BATCHES batches of a 3-class problem (seeded)."""
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(NUM_BATCHES * BATCH_SIZE, 10, generator=generator)
    y = torch.randint(0, 3, (NUM_BATCHES * BATCH_SIZE,), generator=generator)
    return list(zip(X.split(BATCH_SIZE), y.split(BATCH_SIZE)))


def my_shard(data: list, rank: int, world_size: int) -> list:
    """Contiguous, unequal shards: rank r gets batches [r * n, (r + 1) * n)."""
    per_rank = -(-len(data) // world_size)  # ceil: the last rank gets fewer
    return data[rank * per_rank : (rank + 1) * per_rank]


def main() -> None:
    """Build the sharded operator, find its top eigenvalues on rank 0, report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)  # also used by the object collectives
    else:
        device = torch.device("cpu")

    torch.manual_seed(0)  # the same model on every rank
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
    loss_func = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    data = make_data()
    shard = my_shard(data, rank, world_size)

    ggn = GGNLinearOperator(model, loss_func, params, shard, process_group="default")
    values = solve_on_root(
        ggn, lambda A: eigsh(A, k=K, which="LA", return_eigenvectors=False)
    )
    values = numpy.sort(values)[::-1]
    trace = ggn.trace()  # exact, one all_reduce
    if rank == 0:
        print(f"{world_size} ranks, {len(shard)} of {len(data)} batches on rank 0")
        print(f"top {K} eigenvalues: {numpy.array2string(values, precision=6)}")
        print(f"trace: {trace.item():.6f}")
    if args.check and rank == 0:
        single = GGNLinearOperator(model, loss_func, params, data)
        dense = single.to_dense().double().cpu()
        expected = torch.linalg.eigvalsh(dense).flip(0)[:K].numpy()
        assert numpy.allclose(values, expected, rtol=1e-4), (values, expected)
        assert numpy.isclose(trace.item(), dense.trace().item(), rtol=1e-4)
        print("matches the single-process operator")
    # Leave together: a rank that tears Gloo down while another still works (rank 0
    # above) can abort at exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
