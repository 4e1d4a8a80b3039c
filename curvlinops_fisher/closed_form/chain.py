r"""The driver of the closed form: a graph of layer rules run forwards and backwards.

Value 0 is the model's input, value ``i + 1`` the output of step ``i``, which reads
one or two earlier values. The primal pass runs once per product and keeps only
what the rules need (layer inputs, :math:`\sigma'`, pooling indices); the tangents
of the ``K`` columns run in chunks (:data:`TANGENT_CHUNK_BYTES`), each with its own
backward rules; backwards, a rule's cotangents go to every value its step read, and
a value read by several steps gets their sum. The numbers agree with automatic
differentiation to rounding; :meth:`SequentialChain.check` proves that on each new
input signature before the chain is trusted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn import modules as torch_modules

from curvlinops_fisher import fast_path_checks
from curvlinops_fisher.closed_form.protocol import (
    BackwardRule,
    Call,
    LayerRule,
    Point,
)
from curvlinops_fisher.closed_form.rules import (
    PASS_THROUGH,
    module_is_current,
    rule_for,
)
from curvlinops_fisher.linearization import Linearization

#: Largest tangent tensor (bytes) of one chunk of columns: the columns of a product
#: run in chunks of ``max(1, TANGENT_CHUNK_BYTES // b)``, ``b`` the bytes of the
#: largest activation of one column, so that a chunk's tangents stay near the
#: per-core L2 cache. Measured with 16 columns (``benchmarks/``, 2-vCPU AMD EPYC,
#: 1 MiB L2 per core): the CNN W2 (4 MiB per column) is 3x faster one column at a
#: time than 4 at a time; the MLP W4 (64 KiB per column) 1.5x faster in chunks of
#: 4 to 8 than all 16 at once; W1 and W5 change by under 10%.
TANGENT_CHUNK_BYTES = 2**19

_GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


class SequentialChain:
    """The steps of a qualifying chain and what makes them valid.

    Build with :func:`~curvlinops_fisher.closed_form.closed_form_chain`.

    The steps form a graph: value 0 is the model's input, value ``i + 1`` the output
    of step ``i``, which reads the values ``sources[i]`` (one, or two for a
    sum); the last value is the model's output. A plain chain has
    ``sources[i] == (i,)``.

    Args:
        steps: The computing steps, in order (pass-through modules dropped).
        modules: Every module the model calls or contains, with its exact type at
            construction.
        guards: Further checks that must hold before a product (e.g. that the
            containers still hold the same children).
        sources: The values each step reads (default: a plain chain).
    """

    def __init__(
        self,
        steps: tuple[LayerRule, ...],
        modules: tuple[tuple[Module, type[Module]], ...],
        guards: tuple[Callable[[], bool], ...] = (),
        sources: tuple[tuple[int, ...], ...] | None = None,
    ):
        """Store the chain (see the class docstring)."""
        self.steps = steps
        self.modules = modules
        self.guards = guards
        self.sources = sources or tuple((i,) for i in range(len(steps)))
        #: The last step reading each value: its references are dropped after it.
        self._last_use = [-1] * (len(steps) + 1)
        for i, reads in enumerate(self.sources):
            for value in reads:
                self._last_use[value] = i
        #: Whether a value depends on a differentiated parameter (has tangents).
        self._has_tangent = [False, *(step.active for step in steps)]
        #: Results of the numerical checks, by input signature (see :meth:`check`).
        self._checked: dict[tuple, str | None] = {}
        #: Set when a check failed: the chain is not used any more.
        self.failed = False

    def check(
        self,
        params: Sequence[Tensor],
        X: Tensor,
        generic: Callable[[tuple[Tensor, ...]], Linearization],
    ) -> str | None:
        """Check the chain against the generic path on ``X`` (once per signature).

        The chain's output, JVP and VJP of a random column must equal those of
        ``generic`` (see :mod:`curvlinops_fisher.fast_path_checks`); the result is
        kept for the input's shape, dtype and device while the chain's guards hold.
        A failed check sets :attr:`failed`.

        Args:
            params: The parameter values.
            X: The batch input.
            generic: The generic linearization of the batch at ``params``.

        Returns:
            ``None`` if the chain agrees, else a description of the disagreement.

        Raises:
            ChainNotApplicable: If the chain cannot run on ``X`` (nothing is kept).
        """
        key = fast_path_checks.signature(X, params)
        if key not in self._checked:
            self._checked[key] = fast_path_checks.compare_linearizations(
                lambda V: self._linearize(params, X, V), generic, params
            )
            self.failed = self._checked[key] is not None
        return self._checked[key]

    def is_current(self) -> bool:
        """Whether the model still computes what the steps compute.

        ``False`` after a child was replaced, a module's class was changed (e.g. by
        a parametrization), a hook was registered (on a module or globally), a
        ``forward`` was set on an instance, a dropout layer went into training mode
        with ``p > 0``, a convolution's padding or a pooling layer's
        ``return_indices`` became unsupported, a guard failed, or the chain
        disagreed with the generic path in a numerical check (:meth:`check`).
        """
        if self.failed:
            return False
        for name in _GLOBAL_HOOKS:
            hooks = getattr(torch_modules.module, name, None)
            if hooks is None or hooks:  # unknown to this PyTorch, or registered
                return False
        return all(module_is_current(m, cls) for m, cls in self.modules) and all(
            guard() for guard in self.guards
        )

    def linearize(
        self, params: Sequence[Tensor], X: Tensor, V: Sequence[Tensor]
    ) -> Linearization:
        """Forward pass with ``K`` tangents and the batched VJP (see :meth:`_linearize`)."""
        return self._linearize(params, X, V)

    def _linearize(
        self, params: Sequence[Tensor], X: Tensor, V: Sequence[Tensor]
    ) -> Linearization:
        """Forward pass with ``K`` tangents and the batched VJP (see the module).

        The primal pass runs once; the tangents run in chunks of columns (see
        :data:`TANGENT_CHUNK_BYTES`), each with its own backward rules (they keep
        only primal quantities, shared by all chunks).

        Args:
            params: Parameter values (the linearization point).
            X: The batch input.
            V: Columns with a leading axis, ``V[i]`` of shape ``(K, *params[i].shape)``.

        Returns:
            The output, the Jacobian-vector products ``(K, *output.shape)``, and
            ``backward(cotangents, out)``, which adds the VJPs of cotangents
            ``(K, *output.shape)`` to ``out`` (format of ``V``).

        Raises:
            ChainNotApplicable: If the input does not fit the chain (before any work
                a caller would have to undo).
        """
        K = V[0].shape[0]
        states, widest = [], 0
        with torch.no_grad():
            values: list[Tensor | None] = [X, *[None] * len(self.steps)]
            for i, step in enumerate(self.steps):
                reads = [values[v] for v in self.sources[i]]
                self._drop_last_reads(values, i)
                h, state = step.primal(reads, params)
                values[i + 1] = h
                states.append(state)
                if step.active:
                    widest = max(widest, h.numel() * h.element_size())
            output = values[-1]
            chunk = max(1, TANGENT_CHUNK_BYTES // max(widest, 1))
            if K > chunk:  # every chunk multiplies by each mask twice
                states = _float_masks(states, output.dtype)
            JVs, chunks = [], []
            for start in range(0, K, chunk):
                point = Point(params, tuple(v[start : start + chunk] for v in V))
                JV_chunk, rules = self._tangents(states, point)
                JVs.append(JV_chunk)
                chunks.append((start, rules))
        JV = JVs[0] if len(JVs) == 1 else torch.cat(JVs)

        def backward(cotangents: Tensor, out: tuple[Tensor, ...]) -> None:
            with torch.no_grad():
                for start, rules in chunks:
                    out_chunk = tuple(o[start : start + chunk] for o in out)
                    self._cotangents(
                        rules, cotangents[start : start + chunk], out_chunk
                    )

        return output, JV, backward

    def _drop_last_reads(self, values: list[Tensor | None], i: int) -> None:
        """Drop the references to the values step ``i`` is the last to read."""
        for v in self.sources[i]:
            if self._last_use[v] == i:
                values[v] = None

    def _tangents(
        self, states: list[Any], point: Point
    ) -> tuple[Tensor, list[BackwardRule | None]]:
        """Tangents of the output for one chunk of columns, and each step's rule."""
        tangents: list[Tensor | None] = [None] * (len(self.steps) + 1)
        rules: list[BackwardRule | None] = []
        for i, (step, state) in enumerate(zip(self.steps, states)):
            if not step.active:
                rules.append(None)
                continue
            reads = [tangents[v] for v in self.sources[i]]
            self._drop_last_reads(tangents, i)
            dz, rule = step.tangent(state, reads, point)
            tangents[i + 1] = dz
            rules.append(rule)
        return tangents[-1], rules

    def _cotangents(
        self,
        rules: list[BackwardRule | None],
        cotangents: Tensor,
        out: tuple[Tensor, ...],
    ) -> None:
        """Run the rules backwards from the output's cotangents, adding into ``out``.

        The cotangents a rule returns go to every value its step read (both
        summands of a sum); a value read by several steps gets the sum
        (out of place: rules may return views of the cotangents they were given).
        """
        pending: list[Tensor | None] = [None] * len(self.steps) + [cotangents]
        for i in reversed(range(len(self.steps))):
            rule, g = rules[i], pending[i + 1]
            pending[i + 1] = None
            if rule is None or g is None:
                continue
            grad = rule(g, out)
            if grad is None:
                continue
            for v in self.sources[i]:
                if self._has_tangent[v]:
                    pending[v] = grad if pending[v] is None else pending[v] + grad


def _float_masks(states: list[Any], dtype: torch.dtype) -> list[Any]:
    """``states`` with the bool masks (ReLU's derivative) as ``dtype`` tensors.

    A bool mask keeps a quarter of the memory (float32), but multiplying by it is
    slower (1.5x at a million entries); with several chunks of columns the product
    multiplies by each mask twice per chunk, which made 16-column products of the CNN
    W2 10% slower than with float masks.
    """
    return [
        state.to(dtype)
        if isinstance(state, Tensor) and state.dtype == torch.bool
        else state
        for state in states
    ]


def chain_from_calls(
    calls: Sequence[Call],
    slots: Mapping[str, int],
    modules: Sequence[tuple[Module, type[Module]]],
    guards: tuple[Callable[[], bool], ...] = (),
    sources: Sequence[tuple[int, ...]] | None = None,
) -> SequentialChain | None:
    """The closed-form chain of a sequence of calls, or ``None`` if one is unsupported.

    Args:
        calls: The model's computation in order: ``(qualified name, module)`` pairs,
            reshapes of the primal and :data:`~.protocol.ADD`.
        slots: Parameter name (every name of a tied tensor included) -> its slot in
            the ``params`` of the products.
        modules: Every module of the model with its type (containers included).
        guards: Passed on to :class:`SequentialChain`.
        sources: The values each call reads: 0 is the model's input, ``j + 1`` the
            output of call ``j``; two for a sum, one for the others. The last
            call's output is the model's. Default: each call reads the previous one.

    Returns:
        The chain, or ``None`` if a call is unsupported or a parameter in ``slots``
        is not a weight or bias of a called layer.
    """
    if sources is None:
        sources = [(j,) for j in range(len(calls))]
    steps: list[LayerRule] = []
    step_sources: list[tuple[int, ...]] = []
    node_of = [0]  # value of the calls -> value of the steps (pass-through dropped)
    has_tangent = [False]  # per value of the steps: depends on a differentiated one
    differentiated: set[int] = set()
    for call, reads in zip(calls, sources):
        nodes = tuple(node_of[v] for v in reads)
        if isinstance(call, tuple) and type(call[1]) in PASS_THROUGH:
            node_of.append(nodes[0])
            continue
        step = rule_for(call, slots, any(has_tangent[n] for n in nodes))
        if step is None:
            return None
        differentiated.update(step.slots)
        steps.append(step)
        step_sources.append(nodes)
        has_tangent.append(step.active)
        node_of.append(len(steps))
    if differentiated != set(slots.values()):
        return None  # a parameter the chain does not see (not a layer's weight/bias)
    if node_of[-1] != len(steps):
        return None  # the output passes an earlier value through (not in a chain)
    return SequentialChain(tuple(steps), tuple(modules), guards, tuple(step_sources))
