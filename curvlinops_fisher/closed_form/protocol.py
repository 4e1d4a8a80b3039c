"""The interfaces of the closed form: the layer-rule protocol and the calls of a graph.

A front end (:mod:`~curvlinops_fisher.closed_form.unrolled`,
:mod:`~curvlinops_fisher.closed_form.traced`) turns a model into a
:class:`CallGraph`; the driver (:mod:`~curvlinops_fisher.closed_form.chain`) turns
each call into a :class:`LayerRule` and runs the rules forwards (primal and
tangents) and backwards (cotangents).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from torch import Tensor
from torch.nn import Module

#: Backward rule of one step for one chunk of columns: ``rule(g, out)`` takes the
#: cotangents of its output, adds its parameters' VJPs to ``out`` (the chunk's
#: columns; tied weights add up) and returns the cotangents of its inputs (every
#: input gets them; ``None`` where no earlier step needs them).
BackwardRule = Callable[[Tensor, tuple[Tensor, ...]], Tensor | None]


class ChainNotApplicable(Exception):
    """The chain cannot run on this input (e.g. an unbatched convolution input)."""


class Point(NamedTuple):
    """The linearization point and the directions of a product.

    Attributes:
        params: Parameter values.
        V: Columns with a leading axis, ``V[i]`` of shape ``(K, *params[i].shape)``.
    """

    params: Sequence[Tensor]
    V: Sequence[Tensor]


class LayerRule(Protocol):
    r"""The closed-form linearization of one step of a graph (a layer, or a sum).

    For a step :math:`\mathbf{z} = g(\mathbf{x}; \boldsymbol{\theta}_g)` the rule
    gives the primal :math:`\mathbf{z}`, the tangents :math:`\dot{\mathbf{z}}_k =
    \partial_{\mathbf{x}} g\,\dot{\mathbf{x}}_k + \partial_{\boldsymbol{\theta}_g}
    g\,\dot{\boldsymbol{\theta}}_k` of ``K`` columns at once, and the backward rule
    that maps cotangents of :math:`\mathbf{z}` to those of :math:`\mathbf{x}` while
    adding the VJPs of :math:`\boldsymbol{\theta}_g`.
    """

    @property
    def active(self) -> bool:
        """Whether a tangent reaches the step (it or an earlier step is differentiated)."""
        ...

    @property
    def slots(self) -> tuple[int, ...]:
        """The slots in ``params`` of the parameters the step differentiates."""
        ...

    def primal(
        self, inputs: Sequence[Tensor], params: Sequence[Tensor]
    ) -> tuple[Tensor, Any]:
        """The step's output, and the state its tangents and backward rule need.

        Args:
            inputs: The values the step reads (one; two for a sum).
            params: Parameter values (the linearization point).

        Raises:
            ChainNotApplicable: If the step cannot take these inputs.
        """
        ...

    def tangent(
        self, state: Any, tangents: Sequence[Tensor | None], point: Point
    ) -> tuple[Tensor, BackwardRule]:
        """Tangents ``(K, *output.shape)`` of the chunk's columns and the backward rule.

        Args:
            state: What :meth:`primal` returned besides the output.
            tangents: The tangents of the inputs (``None`` where an input has none).
            point: The parameters and the chunk's columns.
        """
        ...


class Add:
    """The call of a graph that adds two earlier values (a residual connection)."""


#: The one :class:`Add` call.
ADD = Add()

#: A call of a graph: a module with its qualified name, a reshape of the primal, or
#: :data:`ADD`.
Call = tuple[str, Module] | Callable[[Tensor], Tensor] | Add


class CallGraph(NamedTuple):
    """What a front end found in a model, for :func:`~.chain.chain_from_calls`.

    Attributes:
        calls: The model's computation in order.
        modules: Every module of the model with its type (containers included).
        guards: Checks that must hold before a product (what the front end assumed).
        sources: The values each call reads: 0 is the model's input, ``j + 1`` the
            output of call ``j``; two for :data:`ADD`, one for the others. ``None``:
            each call reads the previous one.
    """

    calls: list[Call]
    modules: list[tuple[Module, type[Module]]]
    guards: tuple[Callable[[], bool], ...]
    sources: list[tuple[int, ...]] | None = None
