"""The front end of ``nn.Sequential`` models: nested containers unrolled into calls."""

from __future__ import annotations

from torch import nn
from torch.nn import Module

from curvlinops_fisher.closed_form.protocol import Call, CallGraph


def unrolled_calls(model: nn.Sequential) -> CallGraph | None:
    """The calls of a (nested) ``nn.Sequential``, its modules and a guard.

    The guard checks that the containers still hold the same children.

    Args:
        model: The model.

    Returns:
        The graph of a plain chain (each call reads the previous one), or ``None``
        if a child is ``None``.
    """
    containers: list[tuple[nn.Sequential, tuple[Module, ...]]] = []
    calls: list[Call] = []
    modules: list[tuple[Module, type[Module]]] = []

    def unroll(container: nn.Sequential, prefix: str) -> bool:
        containers.append((container, tuple(container._modules.values())))
        modules.append((container, nn.Sequential))
        for name, child in container._modules.items():
            if child is None:
                return False
            if type(child) is nn.Sequential:
                if not unroll(child, f"{prefix}{name}."):
                    return False
            else:
                modules.append((child, type(child)))
                calls.append((f"{prefix}{name}", child))
        return True

    if not unroll(model, ""):
        return None

    def same_children() -> bool:
        return all(
            tuple(container._modules.values()) == children
            for container, children in containers
        )

    return CallGraph(calls, modules, (same_children,))
