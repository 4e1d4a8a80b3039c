r"""One column by dual numbers: the forward pass carries the tangent, in eager mode.

For a single column :math:`\mathbf{v}`, ``torch.autograd.forward_ad`` carries
:math:`\mathbf{J}\mathbf{v}` through one forward pass and the VJP is a plain
backward pass: less dispatch overhead than nested ``torch.func`` transforms, the
same numbers. Whether the VJP records the dual pass itself or a second pass of the
primal alone is measured once per model (:func:`_prefers_separate_passes`); a
linear layer fed by the data skips the product with the data's zero tangent
(:class:`_LinearTangentShortcut`). The path is checked against ``torch.func``
once per input signature (:func:`_checked_one_column`).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

from curvlinops_fisher.data import ModelInput
from curvlinops_fisher.fast_path_checks import (
    compare_linearizations,
    signature,
    warn_once,
)
from curvlinops_fisher.linearization import (
    Linearization,
    ModelFunction,
    linearize_columns,
    remember,
)

#: Fewest entries of some differentiated parameter from which a one-column product
#: runs its forward pass under :class:`_LinearTangentShortcut`. The mode saves a
#: matrix product as large as the forward of each linear layer fed by the data, but
#: costs some microseconds of Python per operation of the forward pass, which only
#: pays for layers of this size (measured: 2.1-2.3 to 1.9-2.1 gradient passes for
#: a product on an MLP 784-256-256-10; 10% slower on an MLP 20-64-64-5).
LINEAR_SHORTCUT_MIN_NUMEL = 2**15
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


def linearize_dual(
    model_function: ModelFunction,
    params: tuple[Tensor, ...],
    X: ModelInput,
    V: tuple[Tensor, ...],
) -> Linearization | None:
    """One column by dual numbers, where that applies and its check passed.

    Args:
        model_function: ``f(param_values, X)``.
        params: Parameter values.
        X: Batch input.
        V: Columns with a leading axis, ``V[i]`` of shape ``(K, *params[i].shape)``.

    Returns:
        The linearization (see :data:`~curvlinops_fisher.linearization.Linearization`);
        ``None`` for several columns, under ``torch.compile`` (dual numbers do not
        trace; ``torch.func`` does), or where the check failed.
    """
    if V[0].shape[0] > 1 or torch.compiler.is_compiling():
        return None
    separate = ONE_COLUMN_SEPARATE_PASSES
    if separate is None:
        separate = _prefers_separate_passes(model_function, params, X, V)
    if not _checked_one_column(model_function, params, X, separate):
        return None
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
            lambda V: linearize_columns(model_function, params, X, V),
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
        See :data:`~curvlinops_fisher.linearization.Linearization`.
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
