"""Iterating the data: batches on the operator's device, batch sizes, comparisons."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from curvlinops_fisher.errors import DataError

ModelInput = Tensor | Mapping[str, Any]
Batch = tuple[ModelInput, Tensor]
BatchSizeFn = Callable[[ModelInput], int]


def to_device(X: Any, device: torch.device) -> Any:
    """Move a tensor, or the tensor values of a mapping, to ``device``.

    Mappings that know how to move themselves (e.g. Hugging Face ``BatchEncoding``)
    are moved with their own ``.to``; other mappings become a ``dict``.
    """
    if isinstance(X, Tensor):
        return X.to(device)
    if isinstance(X, Mapping):
        if not isinstance(X, dict) and callable(getattr(X, "to", None)):
            return X.to(device)
        return {k: to_device(v, device) for k, v in X.items()}
    return X


def default_batch_size_fn(batch_size_fn: BatchSizeFn | None, X: ModelInput) -> int:
    """Number of data points in the batch input ``X``."""
    if batch_size_fn is not None:
        return int(batch_size_fn(X))
    if isinstance(X, Tensor):
        return X.shape[0]
    raise DataError(
        f"The batch input X is a {type(X).__name__}, not a tensor, so its batch size "
        "is unknown. Pass batch_size_fn, e.g. batch_size_fn=lambda X: "
        "X['input_ids'].shape[0]."
    )


def iterate_batches(
    data: Iterable[Batch],
    device: torch.device,
    progressbar: bool = False,
    desc: str | None = None,
) -> Iterator[Batch]:
    """Yield the batches ``(X, y)`` of ``data`` on ``device``, optionally with tqdm.

    Raises:
        DataError: If an item is not an ``(X, y)`` pair.
    """
    for item in tqdm(data, desc=desc, disable=not progressbar):
        try:
            X, y = item
        except (TypeError, ValueError):
            raise DataError(
                f"Each item of data must be a pair (X, y); got a {type(item).__name__}."
                " Pass e.g. a list of (X, y) tuples or a DataLoader over a "
                "TensorDataset(X, y)."
            ) from None
        yield to_device(X, device), to_device(y, device)


def first_batch(
    data: Iterable[Batch], device: torch.device, allow_empty: bool = False
) -> Batch | None:
    """Return the first batch of ``data`` on ``device``.

    Args:
        data: The data.
        device: Where to put the batch.
        allow_empty: Return ``None`` for empty ``data`` instead of raising (a rank's
            shard of distributed data may be empty).

    Raises:
        DataError: If ``data`` is empty (unless ``allow_empty``) or an iterator that
            can be consumed only once.
    """
    if iter(data) is data:
        raise DataError(
            "data is an iterator that can be consumed only once; operators iterate it "
            "on every product. Pass a list of batches or a DataLoader."
        )
    for X, y in iterate_batches(data, device):
        return X, y
    if allow_empty:
        return None
    raise DataError("data is empty: pass at least one batch (X, y).")


def batches_equal(a: Any, b: Any) -> bool:
    """Whether two batch inputs or targets hold identical values."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and (
                bool(torch.equal(a, b))
                or (  # NaNs in the same places (reported later as NaN outputs)
                    a.is_floating_point()
                    and bool(torch.isclose(a, b, 0, 0, equal_nan=True).all())
                )
            )
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(batches_equal(a[k], b[k]) for k in a)
    return a == b
