"""A module bound to a pure function ``f(param_values, X)`` of the differentiated parameters.

Values are substituted by name with ``functional_call``; tied weights (one tensor
under several names) are found once, and :meth:`ModuleFunction.follow` finds the
names again after the model was restructured. The model function also holds what
the linearization strategies decide per model (its closed-form chain, the
one-column choices, a forward-mode failure), see :mod:`curvlinops_fisher.core`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn import Module
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlinops_fisher.closed_form import SequentialChain, closed_form_chain
from curvlinops_fisher.data import ModelInput
from curvlinops_fisher.errors import ParameterError
from curvlinops_fisher.linearization import ModelFunction
from curvlinops_fisher.reverse_over_reverse import ForwardADFailure


def parameter_names(model: Module, params: Sequence[Tensor]) -> tuple[str, ...]:
    """Names under which ``params`` live in ``model`` (for ``functional_call``).

    Args:
        model: The model.
        params: Tensors that must be parameters of ``model`` (identity, not equality).

    Returns:
        One name per entry of ``params``.

    Raises:
        ParameterError: If an entry is not a parameter of ``model`` or appears twice.
    """
    names_by_id: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(p), name)
    names = []
    for i, p in enumerate(params):
        if id(p) not in names_by_id:
            raise ParameterError(
                f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model. "
                "Pass tensors taken from model.parameters(), e.g. "
                "[p for p in model.parameters() if p.requires_grad]."
            )
        names.append(names_by_id[id(p)])
    if len(set(names)) != len(names):
        raise ParameterError(
            "params contains the same parameter more than once; pass each parameter "
            "once."
        )
    return tuple(names)


def make_model_function(model: Module, params: Sequence[Tensor]) -> ModuleFunction:
    """Turn ``model`` into a pure function of ``params`` and the input.

    Parameters not in ``params`` (frozen ones, say) and buffers keep the module's
    current values.

    Args:
        model: The model.
        params: The parameters that become arguments.

    Returns:
        ``f(param_values, X) -> output``.
    """
    return ModuleFunction(model, parameter_names(model, params))


def named_model_function(
    model: Module | Callable[[dict[str, Tensor], ModelInput], Tensor],
    names: Sequence[str],
) -> ModelFunction:
    """Turn a module or a function of a parameter dict into ``f(param_values, X)``.

    Args:
        model: An ``nn.Module`` (run with ``functional_call``: parameters not in
            ``names`` and buffers keep the module's values) or a pure function
            ``model(params, X)`` of a dict ``name -> tensor``.
        names: The names the positional ``param_values`` stand for, in order.

    Returns:
        ``f(param_values, X) -> output``.
    """
    names = tuple(names)
    if isinstance(model, Module):
        return ModuleFunction(model, names)

    def pure_model_function(param_values: tuple[Tensor, ...], X: ModelInput) -> Tensor:
        with forward_ad_compatible_kernels():
            return model(dict(zip(names, param_values)), X)

    return pure_model_function


class ModuleFunction:
    """``f(param_values, X)`` of an ``nn.Module``, run with ``functional_call``.

    Parameters not in ``names`` and buffers keep the module's values. If the module
    has a closed-form linearization (:mod:`curvlinops_fisher.closed_form`),
    :attr:`sequential` holds its chain (products take it while it is current).

    Args:
        model: The module.
        names: The names the positional ``param_values`` stand for, in order.
    """

    def __init__(self, model: Module, names: tuple[str, ...]):
        """Find the tied aliases and the closed-form chain (see the class docstring)."""
        self.model = model
        #: Set by the first one-column product (:mod:`curvlinops_fisher.dual_numbers`).
        self.one_column_separate: bool | None = None
        #: Set by the first product that finds an operation without forward-mode
        #: derivative; later products go straight to reverse-over-reverse.
        self.forward_ad_failure: ForwardADFailure | None = None
        #: Checks of the one-column dual-number path, by input signature
        #: (:mod:`curvlinops_fisher.dual_numbers`).
        self.one_column_checks: dict[tuple, str | None] = {}
        self._bind(names)

    def _bind(self, names: tuple[str, ...]) -> None:
        """Resolve ``names`` to every attribute they are substituted into."""
        self.names = names
        # Every name under which each differentiated tensor lives (tied weights, e.g.
        # a language model's embedding and output layer, live under several), found
        # once here so that each call can skip functional_call's own search for ties.
        aliases = _tied_aliases(self.model, names)
        self._alias_sets = tuple(frozenset(aliases[name]) for name in names)
        substituted = [_distinct_attributes(self.model, aliases[n]) for n in names]
        self._all_names = tuple(n for group in substituted for n in group)
        self._repeats = tuple(len(group) for group in substituted)
        self.sequential: SequentialChain | None = closed_form_chain(
            self.model,
            {alias: slot for slot, name in enumerate(names) for alias in aliases[name]},
        )

    def follow(self, params: Sequence[Tensor]) -> None:
        """Re-resolve the names if the model now holds ``params`` under other ones.

        Values are substituted by name, so after a model is restructured (a layer
        wrapped in a container, a module registered under a second name, weights
        tied or untied) the old names would differentiate the wrong tensors, or
        none. One walk over the model's parameters and buffers (microseconds per
        module) finds the names each tensor of ``params`` has now; if any changed,
        names, aliases and the closed-form chain are found again, as for a new
        operator.

        Args:
            params: The tensors the names stand for, in order.

        Raises:
            ParameterError: If some tensor is no longer in the model (its layer or
                the parameter itself was replaced).
        """
        by_tensor = _names_by_tensor(self.model)
        found = tuple(frozenset(by_tensor.get(id(p), ())) for p in params)
        if found == self._alias_sets:
            return
        for i, (names, was) in enumerate(zip(found, self._alias_sets)):
            if not names:
                raise ParameterError(
                    f"params[{i}] (the model's {', '.join(map(repr, sorted(was)))} when the "
                    "operator was built) is no longer a parameter of the model: its "
                    "layer or the parameter itself was replaced after construction. "
                    "Build a new operator from the model's current parameters, or "
                    "copy new values into the old ones (load_state_dict, p.copy_)."
                )
        self._bind(parameter_names(self.model, params))

    def __call__(self, param_values: tuple[Tensor, ...], X: ModelInput) -> Tensor:
        """The model's output at ``param_values`` for input ``X``."""
        if len(self._all_names) != len(self.names):
            param_values = tuple(
                p for p, r in zip(param_values, self._repeats) for _ in range(r)
            )
        with forward_ad_compatible_kernels():
            return functional_call(
                self.model,
                dict(zip(self._all_names, param_values)),
                (X,),
                tie_weights=False,
            )


def _tied_aliases(model: Module, names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Map each name in ``names`` to all names of ``model`` holding the same tensor.

    Args:
        model: The module.
        names: Names of (some of) its parameters or buffers.

    Returns:
        ``name -> (name, *other names of the same tensor)``.
    """
    by_tensor = _names_by_tensor(model)
    aliases = {}
    for name in names:
        found = next((group for group in by_tensor.values() if name in group), [name])
        aliases[name] = (name, *[n for n in found if n != name])
    return aliases


def _distinct_attributes(model: Module, names: Sequence[str]) -> tuple[str, ...]:
    """``names`` less those naming the same module attribute as an earlier one.

    A module registered twice (one layer called at two places) has each parameter
    under two names but in one attribute. ``functional_call`` must substitute it
    once: substituted twice, the restore at the end puts the substitute back, and
    the module would lose its ``nn.Parameter``.
    """
    seen, kept = set(), []
    for name in names:
        prefix, _, attribute = name.rpartition(".")
        key = (id(model.get_submodule(prefix)), attribute)
        if key not in seen:
            seen.add(key)
            kept.append(name)
    return tuple(kept)


def _names_by_tensor(model: Module) -> dict[int, list[str]]:
    """``id(tensor) -> [every name of it]`` over the parameters and buffers of ``model``."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        by_tensor.setdefault(id(tensor), []).append(name)
    return by_tensor


@contextmanager
def forward_ad_compatible_kernels() -> Iterator[None]:
    """Use kernels that have forward-mode derivatives while the model runs.

    PyTorch's fused attention kernels (the inference fast path of
    ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` in eval mode, and the
    flash / memory-efficient backends of ``scaled_dot_product_attention``) have no
    forward-mode derivative. Inside this context the fast path is off and
    ``scaled_dot_product_attention`` uses its math backend, which computes the same
    function from differentiable operations.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
