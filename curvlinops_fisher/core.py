r"""The curvature core: pure functions built on :mod:`torch.func`.

Nothing here knows about data sets or operators. For one batch ``(X, y)`` with model
output :math:`\mathbf{f} = f(\mathbf{X}; \boldsymbol{\theta})` split into loss terms
:math:`\mathbf{f}_t \in \mathbb{R}^C`, the batch's curvature applied to the columns
:math:`\mathbf{v}_k` of a matrix is

.. math::
    c \sum_t \mathbf{J}_t^\top \mathbf{B}_t \mathbf{B}_t^\top \mathbf{J}_t \mathbf{v}_k,

computed as: the Jacobian-vector products :math:`\mathbf{J}_t\mathbf{v}_k`, the
output-space contraction with :math:`\mathbf{B}_t\mathbf{B}_t^\top` (see
:mod:`curvlinops_fisher.factors`), and one VJP batched over the columns. The
linearization (:func:`linearize`) takes one of three paths: MLPs in closed form
(:mod:`curvlinops_fisher.sequential`); one column with dual numbers, whose forward
pass is shared by the JVP and the recorded VJP; several columns with ``vmap`` of
``jvp`` (the primal computed once inside) next to a VJP of the primal alone. A
model with an operation that has no forward-mode derivative (``nn.EmbeddingBag``)
takes the JVP as the VJP of the VJP instead
(:func:`linearize_reverse_over_reverse`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.func import functional_call, jvp, vjp, vmap
from torch.nn import Module
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from curvlinops_fisher.data import ModelInput
from curvlinops_fisher.errors import ParameterError
from curvlinops_fisher.factors import BatchOutputFactor, OutputFactorKind
from curvlinops_fisher.fast_path_checks import (
    compare_linearizations,
    signature,
    warn_once,
)
from curvlinops_fisher.losses import FisherLoss
from curvlinops_fisher.reverse_over_reverse import (
    ForwardADFailure,
    diagnose_forward_ad_failure,
    linearize_reverse_over_reverse,
    missing_forward_ad,
    remember,
)
from curvlinops_fisher.sequential import (
    ChainNotApplicable,
    Linearization,
    SequentialChain,
    sequential_chain,
)

ModelFunction = Callable[[tuple[Tensor, ...], ModelInput], Tensor]

#: Default of the most matrix columns that share one forward pass.
DEFAULT_MAX_COLUMNS = 64
#: Default seed of the Monte-Carlo Fisher's generator (operators and functional API).
DEFAULT_MC_SEED = 2147483647
#: Fewest entries of some differentiated parameter from which a one-column product
#: runs its forward pass under :class:`_LinearTangentShortcut`. The mode saves a
#: matrix product as large as the forward of each linear layer fed by the data, but
#: costs some microseconds of Python per operation of the forward pass, which only
#: pays for layers of this size (measured: 2.1-2.3 to 1.9-2.1 gradient passes for
#: a product on an MLP 784-256-256-10; 10% slower on an MLP 20-64-64-5).
LINEAR_SHORTCUT_MIN_NUMEL = 2**15
#: Whether products of MLPs (``nn.Sequential`` of linear layers and elementwise
#: activations) use their closed-form linearization
#: (:mod:`curvlinops_fisher.sequential`) instead of forward- and reverse-mode AD.
#: Same numbers to rounding; products 1.2x (MLP 784-256-256-10) to 1.5x (MLP
#: 20-64-64-5) faster, see ``benchmarks/RESULTS.md``.
SEQUENTIAL_CHAIN_PRODUCTS = True
#: How one-column products of models without the closed form run their forward
#: pass: ``False``: one dual-number pass that autograd records for the VJP;
#: ``True``: a dual-number pass without autograd and a recorded pass of the primal
#: alone; ``None`` (default): whichever is faster for the model, measured once on its
#: first one-column product (:func:`_prefers_separate_passes`). Same bits either way.
ONE_COLUMN_SEPARATE_PASSES: bool | None = None
#: The measured choice takes the single pass only if it is faster by more than this
#: factor: the two-pass variant never keeps more memory (the recorded single pass
#: also keeps the tangent computation's intermediates), so near-ties go to it.
ONE_PASS_MIN_GAIN = 1.1
#: Whether models with an operation that has no forward-mode derivative (PyTorch's
#: "Trying to use forward AD with ...", e.g. ``nn.EmbeddingBag``) take the JVP as the
#: VJP of the VJP (:func:`linearize_reverse_over_reverse`) instead of failing.
REVERSE_OVER_REVERSE_FALLBACK = True


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
    is an MLP that :mod:`curvlinops_fisher.sequential` linearizes in closed form,
    :attr:`sequential` holds its chain (products take it while it is current).

    Args:
        model: The module.
        names: The names the positional ``param_values`` stand for, in order.
    """

    def __init__(self, model: Module, names: tuple[str, ...]):
        """Find the tied aliases and the closed-form chain (see the class docstring)."""
        self.model = model
        #: Set by the first one-column product (:func:`_prefers_separate_passes`).
        self.one_column_separate: bool | None = None
        #: Set by the first product that finds an operation without forward-mode
        #: derivative; later products go straight to reverse-over-reverse.
        self.forward_ad_failure: ForwardADFailure | None = None
        #: Checks of the one-column dual-number path, by input signature
        #: (:func:`_checked_one_column`).
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
        self.sequential: SequentialChain | None = sequential_chain(
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


def batch_curvature_matmat(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    y: Tensor,
    V: tuple[Tensor, ...],
    loss: FisherLoss,
    factor_kind: OutputFactorKind,
    scale: float = 1.0,
    max_columns: int | None = None,
    check_targets: bool = False,
    out: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor, ...]:
    r"""Multiply one batch's curvature onto a matrix.

    Computes :math:`c \sum_t \mathbf{J}_t^\top \mathbf{B}_t \mathbf{B}_t^\top
    \mathbf{J}_t \mathbf{V}` for the ``K`` columns of ``V``. Cost per group of at
    most ``max_columns`` columns: the forward pass or passes of :func:`linearize`
    with the tangents of all columns of the group (batched over the columns), an
    output-space contraction of cost :math:`O(K T C R)` (``R`` = 1 for the EF, ``M``
    for the MC Fisher; closed form for the GGN), and one backward pass batched over
    the columns.
    The MC samples live in output space, so ``mc_samples`` does not multiply the
    passes; the batch's factor is built once and shared by all columns.

    Args:
        model_function: ``f(param_values, X)``, see :func:`make_model_function`.
        params: Parameter values (the linearization point).
        X: The batch's input.
        y: The batch's targets.
        V: Matrix in tensor list format with a *leading* column axis:
            ``V[i]`` has shape ``(K, *params[i].shape)``.
        loss: The loss wrapper.
        factor_kind: Which curvature matrix (GGN, MC Fisher, EF).
        scale: The reduction scale :math:`c` of this batch.
        max_columns: Largest number of columns that share a forward pass (bounds
            memory: each column carries a tangent of every activation). ``None``: all.
        check_targets: Validate ``y`` against the output first.
        out: Contiguous tensors in the format of ``V`` to add the product to (the
            backward pass accumulates into them: no temporary per batch). ``None``:
            new zeros.

    Returns:
        ``out`` plus the product, in the format of ``V``.
    """
    if out is None:
        out = tuple(torch.zeros(v.shape, dtype=v.dtype, device=v.device) for v in V)
    K = V[0].shape[0]
    step = K if max_columns is None else max(1, max_columns)
    factor: BatchOutputFactor | None = None
    for start in range(0, K, step):
        V_chunk = tuple(v[start : start + step] for v in V)
        output, JV, backward = linearize(model_function, params, X, V_chunk)
        if factor is None:
            if check_targets:
                loss.check_targets(output, y)
            factor = factor_kind.for_batch(
                loss, loss.flatten(output), loss.flatten_targets(y, output)
            )
        W = factor.apply(loss.flatten(JV, lead=1))
        if scale != 1.0:
            W = W * scale
        out_chunk = tuple(o[start : start + step] for o in out)
        backward(loss.unflatten(W, output.shape, lead=1), out_chunk)
    return out


def takes_closed_form(model_function: ModelFunction) -> bool:
    """Whether products of ``model_function`` take its closed-form chain.

    (:mod:`curvlinops_fisher.sequential`: the model has one, it is still current and
    :data:`SEQUENTIAL_CHAIN_PRODUCTS` is on; a batch input it cannot take still falls
    back to automatic differentiation.)
    """
    chain = getattr(model_function, "sequential", None)
    return SEQUENTIAL_CHAIN_PRODUCTS and chain is not None and chain.is_current()


def _checked_closed_form(
    model_function: ModelFunction, params: tuple[Tensor, ...], X: Tensor
) -> bool:
    """Whether products on ``X`` take the closed-form chain (checked, current).

    The chain must be current (:func:`takes_closed_form`) and agree with the
    generic path on this input signature (:meth:`SequentialChain.check`: checked
    on the first batch of each signature). A disagreement switches the chain off
    for the operator and warns once (:mod:`curvlinops_fisher.fast_path_checks`).
    """
    if not takes_closed_form(model_function) or torch.compiler.is_compiling():
        return False
    chain = model_function.sequential
    try:
        problem = chain.check(
            params, X, lambda V: _linearize_columns(model_function, params, X, V)
        )
    except ChainNotApplicable:
        return False
    if problem is not None:
        model = getattr(model_function, "model", model_function)
        warn_once(
            model_function,
            "closed-form chain",
            f"The closed-form chain of {type(model).__name__} disagrees with "
            f"torch.func on a batch of shape {tuple(X.shape)}: {problem}. Products "
            "of this operator use automatic differentiation instead.",
        )
        return False
    return True


def linearize(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    V: tuple[Tensor, ...],
) -> Linearization:
    """Forward pass with the tangents of ``V``'s columns, and the batched VJP.

    Takes the closed-form chain of an MLP (:mod:`curvlinops_fisher.sequential`) when
    the model has one that is still current and :data:`SEQUENTIAL_CHAIN_PRODUCTS` is
    on; otherwise dual numbers for one column (one or two forward passes, see
    :data:`ONE_COLUMN_SEPARATE_PASSES`) and ``torch.func`` for several. If forward
    mode fails for want of an operation's forward-mode derivative (PyTorch's
    "Trying to use forward AD with ..."), the JVP is the VJP of the VJP
    (:func:`linearize_reverse_over_reverse`); the model function remembers that in
    ``forward_ad_failure`` (if it takes attributes), so later products go straight
    there.

    Args:
        model_function: ``f(param_values, X)``.
        params: Parameter values.
        X: Batch input.
        V: Columns with a leading axis, ``V[i]`` of shape ``(K, *params[i].shape)``.

    Returns:
        The detached output, the Jacobian-vector products ``(K, *output.shape)``, and
        the VJP ``backward(cotangents, out)``, batched over the columns: it adds the
        VJPs of cotangents ``(K, *output.shape)`` to ``out`` (format of ``V``).

    Raises:
        UnsupportedOperationError: If an operation has neither a forward-mode
            derivative nor a differentiable backward pass.
    """
    if isinstance(X, Tensor) and _checked_closed_form(model_function, params, X):
        try:
            return model_function.sequential.linearize(params, X, V)
        except ChainNotApplicable:  # e.g. an unbatched convolution input
            pass
    failure = getattr(model_function, "forward_ad_failure", None)
    if failure is None or not REVERSE_OVER_REVERSE_FALLBACK:
        try:
            return _linearize_forward_mode(model_function, params, X, V)
        except RuntimeError as error:  # (NotImplementedError derives from it)
            if not REVERSE_OVER_REVERSE_FALLBACK or missing_forward_ad(error) is None:
                raise
            failure = diagnose_forward_ad_failure(model_function, params, X, V, error)
            remember(model_function, "forward_ad_failure", failure)
    return linearize_reverse_over_reverse(model_function, params, X, V, failure)


def _linearize_forward_mode(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    V: tuple[Tensor, ...],
) -> Linearization:
    """:func:`linearize` by forward mode: dual numbers or ``torch.func`` (see there)."""
    if V[0].shape[0] > 1 or torch.compiler.is_compiling():
        # (dual numbers do not trace; torch.func does)
        return _linearize_columns(model_function, params, X, V)
    separate = ONE_COLUMN_SEPARATE_PASSES
    if separate is None:
        separate = _prefers_separate_passes(model_function, params, X, V)
    if not _checked_one_column(model_function, params, X, separate):
        return _linearize_columns(model_function, params, X, V)
    return _linearize_one_column(model_function, params, X, V, separate=separate)


def _checked_one_column(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    separate: bool,
) -> bool:
    """Whether one-column products on ``X`` may take the dual-number path.

    The dual-number path (with :class:`_LinearTangentShortcut`) is checked against
    ``torch.func`` once per input signature and model function
    (:mod:`curvlinops_fisher.fast_path_checks`); the results are kept on the model
    function. A model function that keeps no attributes takes ``torch.func``
    (nothing would remember its check); a failed check warns once.
    """
    checks = getattr(model_function, "one_column_checks", None)
    if checks is None:
        checks = {}
        remember(model_function, "one_column_checks", checks)
        if getattr(model_function, "one_column_checks", None) is not checks:
            return False
    key = signature(X, params)
    if key not in checks:
        checks[key] = compare_linearizations(
            lambda V: _linearize_one_column(
                model_function, params, X, V, separate=separate
            ),
            lambda V: _linearize_columns(model_function, params, X, V),
            params,
        )
        if checks[key] is not None:
            model = getattr(model_function, "model", model_function)
            warn_once(
                model_function,
                "dual numbers",
                f"One-column products of {type(model).__name__} with dual numbers "
                f"disagree with torch.func: {checks[key]}. They use torch.func "
                "instead.",
            )
    return checks[key] is None


def _linearize_columns(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    V: tuple[Tensor, ...],
) -> Linearization:
    """Forward passes with ``K`` tangents (``torch.func``: ``vmap`` of ``jvp``) and a VJP.

    The tangents of the ``K`` columns are batched with ``vmap`` (the primal inside it
    is computed once). The VJP records its own forward pass of the primal alone:
    differentiating a function that also returns the tangents (one shared forward
    pass) would record the tangent computations of all ``K`` columns in the VJP's
    graph and keep their intermediates, which costs more than the second primal
    pass (measured for 16 columns: 12-15% faster on a small transformer, 20% on a
    small MLP, 3% on a small CNN, and no tangent intermediates in memory).
    Arguments and result as in :func:`linearize`.
    """
    # torch.func differentiates w.r.t. ``params`` whatever the outer grad mode; no_grad
    # keeps module parameters outside ``params`` that require grad from recording an
    # autograd graph into the results.
    with torch.no_grad():
        output, vjp_fn = vjp(lambda p: model_function(p, X), params)

        def tangents(v: tuple[Tensor, ...]) -> Tensor:
            return jvp(lambda q: model_function(q, X), (params,), (v,))[1]

        JV = vmap(tangents)(V)

    def backward(cotangents: Tensor, out: tuple[Tensor, ...]) -> None:
        with torch.no_grad():
            (result,) = vmap(vjp_fn)(cotangents)
            for acc, r in zip(out, result):
                acc.add_(r)

    return output, JV, backward


def _linearize_one_column(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    V: tuple[Tensor, ...],
    separate: bool = False,
) -> Linearization:
    """Forward pass with one tangent, in eager mode (same contract as the batched one).

    Dual numbers (``torch.autograd.forward_ad``) carry the tangent through the
    forward pass; the VJP is a plain backward pass. For a single column this has less
    dispatch overhead than nested ``torch.func`` transforms and gives the same
    numbers.

    With ``separate=False`` the dual forward pass is the one autograd records for the
    VJP (one forward pass); autograd then also records the tangent computation and
    keeps its intermediates. With ``separate=True`` the dual pass runs without
    autograd and the VJP records a second forward pass of the primal alone. Both
    give the same bits (the VJP only traverses the primal's operations); which is
    faster depends on the model (:func:`_prefers_separate_passes`).

    Args:
        model_function: ``f(param_values, X)``.
        params: Parameter values.
        X: Batch input.
        V: One column, ``V[i]`` of shape ``(1, *params[i].shape)``.
        separate: Use two forward passes (see above).

    Returns:
        See :func:`linearize`.
    """
    leaves = tuple(p.detach().requires_grad_() for p in params)
    shortcut = (
        _LinearTangentShortcut()
        if any(p.numel() >= LINEAR_SHORTCUT_MIN_NUMEL for p in params)
        else nullcontext()
    )
    grad_mode = torch.no_grad() if separate else torch.enable_grad()
    with grad_mode, forward_ad.dual_level(), shortcut:
        duals = tuple(forward_ad.make_dual(leaf, v[0]) for leaf, v in zip(leaves, V))
        output, jv = forward_ad.unpack_dual(model_function(duals, X))
    if separate:
        with torch.enable_grad():
            output = model_function(leaves, X)

    def backward(cotangents: Tensor, out: tuple[Tensor, ...]) -> None:
        grads = torch.autograd.grad(output, leaves, cotangents[0], allow_unused=True)
        with torch.no_grad():
            for acc, g in zip(out, grads):
                if g is not None:
                    acc[0].add_(g)

    return output.detach(), jv.detach().unsqueeze(0), backward


def _prefers_separate_passes(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    V: tuple[Tensor, ...],
) -> bool:
    """Whether one-column products of this model are faster with two forward passes.

    Decided once per model function, on the batch of its first one-column product:
    both variants of :func:`_linearize_one_column` (forward and backward pass) run
    twice, alternating, and the single pass is kept only if its minimum is more than
    :data:`ONE_PASS_MIN_GAIN` times faster (it keeps more memory). Recording the tangent
    computation costs more than a second primal pass for models of many cheap
    operations (measured on the transformer W3: 2.46 against 2.78 gradient passes,
    and 1.15 against 2.19 gradient passes of memory); for convolutions or large
    linear layers the second pass costs more (W2: 2.94 against 1.84). Both variants
    give the same bits, so the choice never changes a result.
    """
    choice = getattr(model_function, "one_column_separate", None)
    if choice is None:
        best = {False: float("inf"), True: float("inf")}
        out = tuple(torch.zeros(v.shape, dtype=v.dtype, device=v.device) for v in V)
        for _ in range(2):
            for separate in (False, True):
                start = time.perf_counter()
                _, JV, backward = _linearize_one_column(
                    model_function, params, X, V, separate=separate
                )
                backward(JV, out)
                if out[0].device.type == "cuda":
                    torch.cuda.synchronize(out[0].device)
                best[separate] = min(best[separate], time.perf_counter() - start)
        choice = best[True] <= ONE_PASS_MIN_GAIN * best[False]
        try:
            model_function.one_column_separate = choice  # type: ignore[attr-defined]
        except AttributeError:  # nowhere to keep the decision: always one pass
            return False
    return choice


class _LinearTangentShortcut(TorchFunctionMode):
    r"""Tangent of ``F.linear`` on an input without tangent, without the zero product.

    PyTorch's forward-mode rule of ``addmm`` / ``mm`` computes
    :math:`\dot{\mathbf{X}}\mathbf{W}^\top + \mathbf{X}\dot{\mathbf{W}}^\top`
    even when the input :math:`\mathbf{X}` carries no tangent: the missing tangent
    becomes a zero tensor that is multiplied like a dense one. For the first layer of
    a network (the data carry no tangent) that is a whole wasted matrix product, as
    expensive as the layer's forward pass. Under this mode such a call computes the
    primal with autograd (as before) and the tangent
    :math:`\mathbf{X}\dot{\mathbf{W}}^\top + \dot{\mathbf{b}}` without it (the
    same sum, without the zero term; the backward pass never differentiates a
    tangent), and attaches it with ``make_dual``. Every other call runs unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            shortcut = _linear_without_input_tangent(*args, **kwargs)
            if shortcut is not None:
                return shortcut
        return func(*args, **kwargs)


def _linear_without_input_tangent(
    input: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor | None:
    """``F.linear`` with its tangent if ``input`` has none and ``weight`` has one.

    Returns:
        The dual output, or ``None`` if the shortcut does not apply.
    """
    if forward_ad.unpack_dual(input).tangent is not None:
        return None
    weight_primal, weight_tangent = forward_ad.unpack_dual(weight)
    if weight_tangent is None:
        return None
    bias_primal, bias_tangent = (
        (None, None) if bias is None else forward_ad.unpack_dual(bias)
    )
    output = torch.nn.functional.linear(input, weight_primal, bias_primal)
    with torch.no_grad():
        tangent = torch.nn.functional.linear(input, weight_tangent)
        if bias_tangent is not None:
            tangent = bias_tangent + tangent
    return forward_ad.make_dual(output, tangent)
