"""Closed-form products: models whose linearization is written out layer by layer.

For a model that is a graph of supported layers (an ``nn.Sequential``, or a custom
``forward`` that :mod:`torch.fx` traces to a chain, possibly with residual sums), the
Jacobian-vector and vector-Jacobian products of a product come from one
:class:`~.protocol.LayerRule` per layer instead of automatic differentiation.

- :mod:`~.protocol`: the layer-rule protocol and the call graph front ends produce;
- :mod:`~.rules`: the layer rules, and which layer takes which;
- :mod:`~.chain`: the driver that runs the rules of a graph (:class:`SequentialChain`);
- :mod:`~.unrolled`, :mod:`~.traced`: the front ends (``nn.Sequential``, ``torch.fx``).

:func:`closed_form_chain` chooses the front end.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from curvlinops_fisher.closed_form.chain import (
    TANGENT_CHUNK_BYTES,
    SequentialChain,
    chain_from_calls,
)
from curvlinops_fisher.closed_form.protocol import (
    ADD,
    BackwardRule,
    Call,
    CallGraph,
    ChainNotApplicable,
    LayerRule,
    Point,
)
from curvlinops_fisher.closed_form.rules import (
    AVERAGE_POOLINGS,
    BATCH_NORMS,
    CLOSED_FORM_ACTIVATIONS,
    CONVOLUTIONS,
    ELEMENTWISE_ACTIVATIONS,
    MAX_POOLINGS,
    PASS_THROUGH,
    conv_padding,
    rule_for,
)
from curvlinops_fisher.closed_form.traced import SUPPORTED_LAYERS, traced_calls
from curvlinops_fisher.closed_form.unrolled import unrolled_calls

__all__ = [
    "ADD",
    "AVERAGE_POOLINGS",
    "BATCH_NORMS",
    "CLOSED_FORM_ACTIVATIONS",
    "CONVOLUTIONS",
    "ELEMENTWISE_ACTIVATIONS",
    "MAX_POOLINGS",
    "PASS_THROUGH",
    "SUPPORTED_LAYERS",
    "TANGENT_CHUNK_BYTES",
    "BackwardRule",
    "Call",
    "CallGraph",
    "ChainNotApplicable",
    "LayerRule",
    "Point",
    "SequentialChain",
    "chain_from_calls",
    "closed_form_chain",
    "conv_padding",
    "rule_for",
    "traced_calls",
    "unrolled_calls",
]


def closed_form_chain(
    model: object, slots: Mapping[str, int]
) -> SequentialChain | None:
    """The closed-form chain of ``model``, or ``None`` if it does not qualify.

    Args:
        model: The model: an ``nn.Sequential`` (unrolled), or a module whose
            ``forward`` :func:`traced_calls` traces to a supported graph.
        slots: Parameter name (every name of a tied tensor included) -> its slot in
            the ``params`` of the products.

    Returns:
        The chain, or ``None``.
    """
    if type(model) is nn.Sequential:
        graph = unrolled_calls(model)
    else:
        graph = traced_calls(model)  # (None for anything but a module)
    if graph is None:
        return None
    return chain_from_calls(
        graph.calls, slots, graph.modules, graph.guards, graph.sources
    )
