"""The determinism probe: data and model must give the same numbers on every pass.

Curvature operators iterate the data on every product. Their matrix is only well
defined if every pass sees the same batches in the same order and the model maps a
batch to the same output every time (no Dropout, no batch statistics, no state that a
forward pass changes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import zip_longest

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from curvlinops_fisher.data import Batch, batches_equal
from curvlinops_fisher.errors import NonDeterministicError, check_finite, naming_batch

_FIX = (
    " Common causes: a DataLoader with shuffle=True or random augmentation, Dropout "
    "or BatchNorm in training mode. Fix: use shuffle=False and no random transforms, "
    "call model.eval(); or pass check_deterministic=False if you know the matrix is "
    "well defined."
)


def check_modules_in_eval_mode(model: Module) -> None:
    """Reject Dropout (p > 0) and BatchNorm layers that are in training mode.

    Raises:
        NonDeterministicError: Naming the first offending layer.
    """
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, _DropoutNd) and module.p > 0:
            raise NonDeterministicError(
                f"The model is not deterministic: {type(module).__name__} layer "
                f"'{name}' is in training mode and drops random units on every pass."
                + _FIX
            )
        if isinstance(module, _BatchNorm):
            raise NonDeterministicError(
                f"The model is not deterministic: {type(module).__name__} layer "
                f"'{name}' is in training mode, so its output depends on the batch "
                "statistics and every forward pass updates its running statistics."
                + _FIX
            )


def check_deterministic(
    model: Module,
    batches: Callable[[str], Iterable[Batch]],
    forward: Callable[[Batch], Tensor],
    rtol: float = 1e-5,
    atol: float = 1e-8,
) -> None:
    """Iterate the data twice in lockstep and compare batches and model outputs.

    Call :func:`check_modules_in_eval_mode` first: a forward pass through a BatchNorm
    layer in training mode would change its running statistics.

    Cost: two forward passes (without gradients) per batch.

    Args:
        model: The model (its modules and buffers are inspected).
        batches: ``batches(desc)`` returns a fresh iterable over the data.
        forward: Computes a batch's model output.
        rtol: Relative tolerance for comparing outputs.
        atol: Absolute tolerance for comparing outputs.

    Raises:
        NonDeterministicError: If batches, their number, outputs or the model's buffers
            differ between passes.
    """
    buffers = [b.detach().clone() for b in model.buffers()]
    missing = object()
    pairs = zip_longest(batches("check 1"), batches("check 2"), fillvalue=missing)
    for index, (first, second) in enumerate(pairs):
        if first is missing or second is missing:
            raise NonDeterministicError(
                "The data is not deterministic: two passes yield different numbers of "
                "batches." + _FIX
            )
        for part, a, b in zip(("X", "y"), first, second):
            if not batches_equal(a, b):
                raise NonDeterministicError(
                    f"The data is not deterministic: batch {index} has different {part} "
                    "on two passes over the data." + _FIX
                )
        with torch.no_grad():
            out1, out2 = forward(first), forward(second)
        with naming_batch(index):
            check_finite(out1, "The model output")
        if out1.shape != out2.shape or not torch.allclose(out1, out2, rtol, atol):
            raise NonDeterministicError(
                f"The model is not deterministic: two forward passes on batch {index} "
                "give different outputs." + _FIX
            )
    if any(
        b.shape != old.shape or not torch.equal(b, old)
        for b, old in zip(model.buffers(), buffers)
    ):
        raise NonDeterministicError(
            "The model is not deterministic: a forward pass changed its buffers (e.g. "
            "running statistics)." + _FIX
        )
