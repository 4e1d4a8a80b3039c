r"""Data-parallel operators on ``torch.distributed``: the collectives they use.

With ``process_group`` set, every rank of the group holds its own shard of the data
and an operator built on it stands for the curvature of the *whole* data set:

.. math::
    \mathbf{A} = \sum_{r} \mathbf{A}_r, \qquad
    \mathbf{A}_r = \sum_{b \in \text{shard } r} c_b \sum_{t \in b}
        \mathbf{J}_t^\top \mathbf{B}_t \mathbf{B}_t^\top \mathbf{J}_t,

with the scales :math:`c_b` of the concatenated data set (``num_data`` is global).
Each rank computes its partial result :math:`\mathbf{A}_r \mathbf{X}` and one
``all_reduce`` (sum) combines them, so every rank gets :math:`\mathbf{A}\mathbf{X}`.
There is no communication layer of our own: only ``torch.distributed`` collectives
(NCCL on GPUs, Gloo on CPUs).

Every method that touches the data is a *collective* call: all ranks of the group
must call it, in the same order, with inputs of the same shape (the values may differ;
the result is the same on every rank). Errors do not hang the group:

- at construction, the ranks agree on errors with one ``all_gather_object``: if any
  rank fails (bad targets, an empty data set, ...) every rank raises a
  :class:`~curvlinops_fisher.errors.DistributedError` that names the failing ranks
  and their messages;
- in a product, the error flag travels in the same ``all_reduce`` as the result
  (one extra number), so a rank whose local part fails makes every rank raise, with
  no extra collective on the success path.

An error *outside* these calls (e.g. one rank passes a wrongly shaped vector) leaves
the others waiting in the next collective until the process group's ``timeout``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import prod
from types import TracebackType
from typing import Any, TypeVar

import numpy
import torch
import torch.distributed as dist
from torch import Tensor

from curvlinops_fisher.errors import DataError, DistributedError
from curvlinops_fisher.factors import BatchOutputFactor, MCFisherFactor
from curvlinops_fisher.linop import PyTorchLinearOperator, _SciPyLinearOperator
from curvlinops_fisher.losses import FisherLoss
from curvlinops_fisher.risk_scale import TargetCount

ProcessGroup = Any  # torch.distributed.ProcessGroup (absent from some builds)
ProcessGroupLike = Any  # ProcessGroup | Literal["default"] | None
T = TypeVar("T")

# Commands the rank that drives a SciPy solver sends to the ranks that serve products.
_STOP, _MATMAT, _RMATMAT, _ABORT = 0, 1, 2, 3


# ------------------------------------------------------------------ groups


def resolve_process_group(process_group: ProcessGroupLike) -> ProcessGroup | None:
    """Turn the ``process_group`` argument of an operator into a group or ``None``.

    Args:
        process_group: ``None`` (single process), ``"default"`` (the default group
            of ``torch.distributed.init_process_group``) or a process group, e.g.
            from ``torch.distributed.new_group``.

    Returns:
        The process group, or ``None`` for single-process operation.

    Raises:
        DistributedError: If a group is requested but ``torch.distributed`` is not
            available or not initialized, or this process is not in the group.
        ValueError: If ``process_group`` is of another type.
    """
    if process_group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError(
            f"process_group={process_group!r} needs an initialized torch.distributed: "
            "call torch.distributed.init_process_group(backend, ...) on every rank "
            "first (e.g. under torchrun), or pass process_group=None for one process."
        )
    if isinstance(process_group, str):
        if process_group != "default":
            raise ValueError(
                f"process_group must be None, 'default' or a torch.distributed "
                f"process group; got the string {process_group!r}."
            )
        return dist.group.WORLD
    non_member = getattr(dist.GroupMember, "NON_GROUP_MEMBER", None)
    if (
        not isinstance(process_group, dist.ProcessGroup)
        and non_member is not None
        and process_group == non_member  # what new_group returns on other ranks
    ) or (
        isinstance(process_group, dist.ProcessGroup)
        and dist.get_rank(process_group) < 0
    ):
        raise DistributedError(
            "This process is not a member of process_group: create the operator "
            "only on the ranks that dist.new_group(ranks) was given."
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(
            "process_group must be None, 'default' or a torch.distributed process "
            f"group; got a {type(process_group).__name__}."
        )
    return process_group


def group_rank(group: ProcessGroup | None) -> int:
    """This process' rank in ``group`` (0 without a group)."""
    return 0 if group is None else dist.get_rank(group)


def _global_rank(group: ProcessGroup, rank: int) -> int:
    """The global rank of the group's rank ``rank`` (what ``src`` arguments take)."""
    return dist.get_global_rank(group, rank)


# -------------------------------------------------------- agreeing on errors


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _raise_agreed(group: ProcessGroup, exc: BaseException | None, what: str) -> None:
    """Exchange every rank's error report and raise on every rank if any failed.

    A collective (one ``all_gather_object``): all ranks of ``group`` must call it.

    Raises:
        DistributedError: Naming each failing rank with its error, on every rank
            (chained to the local exception on a failing rank).
    """
    reports: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(
        reports, None if exc is None else _describe(exc), group=group
    )
    failures = {rank: report for rank, report in enumerate(reports) if report}
    if failures:
        raise DistributedError.from_failures(what, failures) from exc


class Agreement:
    """Context manager: the ranks agree on errors raised in its block.

    On leaving the block (normally or by an exception), all ranks exchange their
    error reports and the values passed to :meth:`share` with one
    ``all_gather_object``; if any rank failed, every rank raises a
    :class:`~curvlinops_fisher.errors.DistributedError`. The block must not run
    collectives itself. Without a group (``None``) it does nothing: exceptions pass
    through unchanged and :meth:`combine_scans` returns the local values.

    Args:
        group: The process group, or ``None``.
        what: What the block does, for error messages.
    """

    def __init__(self, group: ProcessGroup | None, what: str):
        """Store the group (see class docstring)."""
        self.group, self.what = group, what
        self._local: Any = None
        self._shared: list[Any] = []

    def share(self, value: Any) -> None:
        """Contribute this rank's ``value`` to the exchange at the end of the block."""
        self._local = value

    def __enter__(self) -> Agreement:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if self.group is None:
            self._shared = [self._local]
            return False
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt & co.: leave at once
        gathered: list[Any] = [None] * dist.get_world_size(self.group)
        report = None if exc is None else _describe(exc)
        dist.all_gather_object(gathered, (report, self._local), group=self.group)
        failures = {rank: rep for rank, (rep, _) in enumerate(gathered) if rep}
        if failures:
            raise DistributedError.from_failures(self.what, failures) from exc
        self._shared = [value for _, value in gathered]
        return False

    def combine_scans(self, num_data: int | None) -> tuple[Any, TargetCount]:
        """Combine the ranks' data scans into the whole data set's.

        Every rank shared ``(count, targets)``: its number of data points
        (``num_data`` itself if given) and the
        :meth:`~curvlinops_fisher.risk_scale.RiskScale.count` of its targets.

        Args:
            num_data: The ``num_data`` argument. ``None``: the ranks' counts are
                summed. Else every rank shared ``num_data`` (the global count), which
                must agree.

        Returns:
            The global number of data points and the sum of the targets' counts (the
            local values without a group).

        Raises:
            DataError: If every shard is empty.
            DistributedError: If the ranks passed different ``num_data``.
        """
        if self.group is None:
            return self._shared[0]
        counts = [count for count, _ in self._shared]
        targets = sum((part for _, part in self._shared), TargetCount())
        if num_data is None:
            total = sum(counts)
            if total == 0:
                raise DataError(
                    "data is empty on every rank of the process group: pass at least "
                    "one batch (X, y) on some rank."
                )
            return total, targets
        if any(value != num_data for value in counts):
            raise DistributedError(
                f"The ranks passed different num_data {counts}; num_data is the "
                "number of data points of the whole data set, the same on every rank "
                "(or None to count them)."
            )
        return num_data, targets


# ------------------------------------------------------------ sums of parts


def sum_over_ranks(
    compute: Callable[[], Sequence[Tensor]],
    shapes: Sequence[Sequence[int]],
    dtype: torch.dtype,
    device: torch.device,
    group: ProcessGroup,
    what: str = "a product",
) -> list[Tensor]:
    """Sum this rank's tensors ``compute()`` over the ranks, with one ``all_reduce``.

    The tensors are flattened into one buffer with one more entry, an error flag. A
    rank whose ``compute`` raises contributes zeros and the flag, and then every rank
    raises (the reports are exchanged only on this error path).

    Args:
        compute: Computes this rank's part: tensors of ``shapes``.
        shapes: The shapes of the tensors.
        dtype: Their dtype.
        device: Their device.
        group: The process group.
        what: What is computed, for error messages.

    Returns:
        The sums, same shapes, identical on every rank.

    Raises:
        DistributedError: If ``compute`` raised on some rank (on every rank).
    """
    sizes = [prod(shape) for shape in shapes]
    buffer = torch.zeros(sum(sizes) + 1, dtype=dtype, device=device)
    error: Exception | None = None
    try:
        parts = compute()
        torch.cat([p.reshape(-1) for p in parts], out=buffer[:-1])
    except Exception as exc:  # noqa: BLE001 (propagated to every rank below)
        error = exc
        buffer.zero_()
        buffer[-1] = 1
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    if buffer[-1].item() != 0:
        _raise_agreed(group, error, what)
    return [
        b.reshape(shape)
        for b, shape in zip(buffer[:-1].split(sizes), shapes, strict=True)
    ]


class ProcessGroupMixin:
    """Gives an operator its process group and the one reduction it needs.

    Host classes set ``_process_group`` (``None``: single process) and have
    ``dtype`` and ``device``.
    """

    _process_group: ProcessGroup | None = None

    @property
    def process_group(self) -> ProcessGroup | None:
        """The process group whose ranks share the data (``None``: one process)."""
        return self._process_group

    def _sum_over_ranks(
        self,
        compute: Callable[[], Sequence[Tensor]],
        shapes: Sequence[Sequence[int]],
        what: str = "a product",
    ) -> Sequence[Tensor]:
        """``compute()`` on this rank's data, summed over the ranks (one all_reduce).

        Without a process group: just ``compute()``.
        """
        if self._process_group is None:
            return compute()
        return sum_over_ranks(
            compute, shapes, self.dtype, self.device, self._process_group, what
        )

    def _summed(self, compute: Callable[[], Tensor], *shape: int) -> Tensor:
        """One tensor of ``shape`` from this rank's data, summed over the ranks."""
        (total,) = self._sum_over_ranks(lambda: [compute()], [shape], "exact structure")
        return total


# ----------------------------------------------------------- MC Fisher sample


def rank_batch_seed(seed: int, rank: int, batch_index: int) -> int:
    """Seed of the MC Fisher's sample of batch ``batch_index`` of rank ``rank``.

    A hash of ``(seed, rank, batch_index)`` by NumPy's ``SeedSequence``, which gives
    independent streams for different inputs.

    Args:
        seed: The operator's seed.
        rank: The rank in the process group.
        batch_index: The index of the batch in the rank's shard (from 0).

    Returns:
        A seed in ``[0, 2**64)`` for ``torch.Generator.manual_seed``.
    """
    entropy = [seed % 2**64, rank, batch_index]
    return int(numpy.random.SeedSequence(entropy).generate_state(1, numpy.uint64)[0])


class RankSeededMCFisherFactor(MCFisherFactor):
    """MC Fisher factor whose generator is re-seeded for every batch.

    Batch ``i`` of the rank's shard (in data order, counted from 0 in every pass)
    draws from a generator seeded with :func:`rank_batch_seed` ``(seed, rank, i)``.

    Args:
        mc_samples: Number of samples ``M`` per loss term.
        seed: The operator's seed.
        rank: The rank in the process group.
        device: Device of the generator.
    """

    def __init__(self, mc_samples: int, seed: int, rank: int, device: torch.device):
        """Store the seed and rank; the first batch has index 0."""
        super().__init__(mc_samples, torch.Generator(device=device))
        self.seed, self.rank, self.batch_index = seed, rank, 0

    def for_batch(  # noqa: D102
        self, loss: FisherLoss, output: Tensor, y: Tensor
    ) -> BatchOutputFactor:
        self.generator.manual_seed(
            rank_batch_seed(self.seed, self.rank, self.batch_index)
        )
        self.batch_index += 1
        return super().for_batch(loss, output, y)


# --------------------------------------------------- SciPy on one rank


def _broadcast_object(value: Any, group: ProcessGroup, root: int) -> Any:
    objects = [value]
    dist.broadcast_object_list(objects, src=_global_rank(group, root), group=group)
    return objects[0]


class _Channel:
    """Commands and matrices from the driving rank to the serving ranks."""

    def __init__(self, op: PyTorchLinearOperator, group: ProcessGroup, root: int):
        self.op, self.group, self.root = op, group, root
        self.src = _global_rank(group, root)

    def send(self, command: int, X: Tensor | None = None) -> None:
        """Driver: announce a command (and broadcast ``X`` for a product)."""
        num_cols = 0 if X is None else X.shape[1]
        header = torch.tensor([command, num_cols], device=self.op.device)
        dist.broadcast(header, src=self.src, group=self.group)
        if X is not None:
            dist.broadcast(X.contiguous(), src=self.src, group=self.group)

    def receive(self) -> tuple[int, Tensor | None]:
        """Server: the next command (and ``X`` for a product)."""
        header = torch.zeros(2, dtype=torch.int64, device=self.op.device)
        dist.broadcast(header, src=self.src, group=self.group)
        command, num_cols = header.tolist()
        if command not in (_MATMAT, _RMATMAT):
            return command, None
        X = torch.empty(
            self.op.shape[1 if command == _MATMAT else 0],
            num_cols,
            dtype=self.op.dtype,
            device=self.op.device,
        )
        dist.broadcast(X, src=self.src, group=self.group)
        return command, X


class _DrivingSciPyOperator(_SciPyLinearOperator):
    """The SciPy view on the driving rank: broadcasts each input before the product."""

    def __init__(self, channel: _Channel, dtype: numpy.dtype):
        super().__init__(channel.op, dtype)
        self._channel = channel

    def _matmat(self, X: numpy.ndarray) -> numpy.ndarray:
        Xt = self._to_torch(X)
        self._channel.send(_MATMAT, Xt)
        return self._to_numpy(self._op._matmat_flat(Xt))

    def _rmatmat(self, X: numpy.ndarray) -> numpy.ndarray:
        Xt = self._to_torch(X)
        self._channel.send(_RMATMAT, Xt)
        return self._to_numpy(self._adjoint_op()._matmat_flat(Xt))


def solve_on_root(
    op: PyTorchLinearOperator,
    solve: Callable[[_SciPyLinearOperator], T],
    *,
    process_group: ProcessGroupLike = None,
    root: int = 0,
    dtype: numpy.dtype | type | None = None,
) -> T:
    """Run a SciPy solver on one rank while the other ranks serve its products.

    A collective: call it on every rank with the same arguments. On rank ``root``,
    ``solve(A)`` runs with ``A`` the SciPy view of ``op`` (as ``op.to_scipy()``); each
    product it takes broadcasts its input to the other ranks, which meanwhile wait in
    a loop, take their part of the same product (its ``all_reduce``) and wait for the
    next, until the solver returns. The result is then broadcast (pickled), so every
    rank returns it: return NumPy arrays or plain Python objects, not device tensors.

    Per product: two broadcasts (a 2-number header, the input ``[P, K]``) plus the
    product's own ``all_reduce``.

    If ``solve`` raises on the root, the servers are told to stop and raise a
    :class:`~curvlinops_fisher.errors.DistributedError` with the root's message while
    the root re-raises its own exception; an error in a product raises on every rank.

    Args:
        op: An operator whose products are collective over the group (e.g. a
            curvature operator with ``process_group``, or a sum of one with a
            damping term).
        solve: Called on the root with the SciPy operator, e.g.
            ``lambda A: scipy.sparse.linalg.eigsh(A, k=5, which='LA')``.
        process_group: The group; ``None`` takes ``op.process_group`` if ``op`` has
            one, else the default group.
        root: The rank (in the group) that runs the solver.
        dtype: NumPy dtype of the SciPy operator (see ``to_scipy``).

    Returns:
        What ``solve`` returned on the root, on every rank.
    """
    if process_group is None:
        process_group = getattr(op, "process_group", None)
    group = resolve_process_group("default" if process_group is None else process_group)
    scipy_view = op.to_scipy(dtype)
    channel = _Channel(op, group, root)
    if group_rank(group) != root:
        return _serve(channel)
    try:
        result = solve(_DrivingSciPyOperator(channel, scipy_view.dtype))
    except DistributedError:
        raise  # raised by a product on every rank: the servers have left already
    except Exception as exc:
        channel.send(_ABORT)
        _broadcast_object(_describe(exc), group, root)
        raise
    channel.send(_STOP)
    return _broadcast_object(result, group, root)


def _serve(channel: _Channel) -> Any:
    """Serve the driver's products until it stops; return its broadcast result."""
    adjoint: PyTorchLinearOperator | None = None
    while True:
        command, X = channel.receive()
        if command == _MATMAT:
            channel.op._matmat_flat(X)
        elif command == _RMATMAT:
            adjoint = channel.op.adjoint() if adjoint is None else adjoint
            adjoint._matmat_flat(X)
        elif command == _STOP:
            return _broadcast_object(None, channel.group, channel.root)
        else:
            message = _broadcast_object(None, channel.group, channel.root)
            raise DistributedError(
                f"rank {channel.root} failed while driving the solver: {message}"
            )
