"""Small, seeded test problems: model, loss function, parameters and data.

Every factory is deterministic given its ``seed`` and returns float64 problems by
default. Models are tiny (a few dozen to ~120 parameters) so that dense curvature
matrices can be formed quickly on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

#: Number of classes / output features of every model.
NUM_CLASSES = 3
#: Input features of the MLP-type models.
IN_FEATURES = 4
#: Hidden features of the MLP-type models.
HIDDEN = 5
#: Sequence length of the sequence models.
SEQ_LEN = 3

#: Batch sizes of the ``"unequal"`` layout.
UNEQUAL_BATCH_SIZES = (3, 5, 2)
#: Batch size of the ``"single"`` layout.
SINGLE_BATCH_SIZE = 6
#: Number of data points and batch size of the ``"loader"`` layout (remainder of 2).
LOADER_NUM_DATA, LOADER_BATCH_SIZE = 10, 4

LOSSES = ("mse", "ce", "bce")
REDUCTIONS = ("mean", "sum")
LAYOUTS = ("single", "unequal", "loader")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}

#: All model names understood by :func:`make_problem`.
MODELS = (
    "mlp_relu",
    "mlp_tanh",
    "mlp_sigmoid",
    "mlp_gelu",
    "conv",
    "conv_seg",
    "mlp_bn",
    "seq",
    "dict",
    "subset",
    "frozen",
    "scalar",
)


@dataclass
class Problem:
    """A test problem.

    Attributes:
        name: Human-readable identifier.
        model: The neural network.
        loss_func: The loss function.
        params: Parameters the curvature matrix is taken w.r.t.
        data: Re-iterable of ``(X, y)`` mini-batches.
        batch_size_fn: Batch size function for dict inputs, else ``None``.
        num_data: Total number of data points.
        loss_name: One of ``"mse"``, ``"ce"``, ``"bce"``.
        out_shape: Shape of the model output for one datum (without batch axis).
        batches: The data as a list of ``(X, y)`` (same batches as ``data``).
    """

    name: str
    model: nn.Module
    loss_func: nn.Module
    params: list[nn.Parameter]
    data: Iterable[tuple[Any, Tensor]]
    batch_size_fn: Callable[[Any], int] | None
    num_data: int
    loss_name: str
    out_shape: tuple[int, ...]
    batches: list[tuple[Any, Tensor]] = field(default_factory=list)

    @property
    def dim(self) -> int:
        """Number of parameters ``P``.

        Returns:
            Total number of entries of ``params``.
        """
        return sum(p.numel() for p in self.params)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments ``batch_size_fn`` (only if needed).

        Returns:
            A dictionary to splat into an operator's constructor.
        """
        return (
            {} if self.batch_size_fn is None else {"batch_size_fn": self.batch_size_fn}
        )

    def args(self) -> tuple[nn.Module, nn.Module, list[nn.Parameter], Any]:
        """Positional arguments ``(model_func, loss_func, params, data)``.

        Returns:
            The four positional constructor arguments of an operator.
        """
        return self.model, self.loss_func, self.params, self.data

    @property
    def terms_per_datum(self) -> int:
        """Number of loss terms (positions) per datum.

        Returns:
            CE: product of the axes after the class axis 1; MSE/BCE: product of the
            axes between batch and class (last) axis.
        """
        if self.loss_name == "ce":
            return math.prod(self.out_shape[1:])
        return math.prod(self.out_shape[:-1])

    def mean_to_sum_factor(self) -> float:
        """Factor ``s`` with ``curvature(sum) = s * curvature(mean)``.

        PyTorch's mean divides by the number of terms (CE) or of output entries
        (MSE/BCE); the operator multiplies each batch by ``N_b / num_data``.

        Returns:
            ``num_data * terms_per_datum`` (CE) or ``num_data * out_shape.numel()``.
        """
        per_datum = (
            self.terms_per_datum
            if self.loss_name == "ce"
            else math.prod(self.out_shape)
        )
        return float(self.num_data * per_datum)


class MLP(nn.Module):
    """Two-layer MLP ``Linear -> activation -> Linear``."""

    def __init__(
        self, activation: str = "tanh", out_features: int = NUM_CLASSES
    ) -> None:
        """Create the layers.

        Args:
            activation: Key of :data:`ACTIVATIONS`.
            out_features: Output features.
        """
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(HIDDEN, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate the network.

        Args:
            x: Input of shape ``(N, IN_FEATURES)`` (or ``(N, T, IN_FEATURES)``).

        Returns:
            Output of shape ``(N, out_features)`` (or ``(N, T, out_features)``).
        """
        return self.fc2(self.act(self.fc1(x)))


class ScalarMLP(MLP):
    """MLP with a single output feature that is squeezed: output shape ``(N,)``."""

    def __init__(self) -> None:
        """Create the layers."""
        super().__init__("tanh", out_features=1)

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate the network.

        Args:
            x: Input of shape ``(N, IN_FEATURES)``.

        Returns:
            Output of shape ``(N,)``.
        """
        return super().forward(x).squeeze(-1)


class BNMLP(nn.Module):
    """MLP with a ``BatchNorm1d`` layer (use in eval mode)."""

    def __init__(self) -> None:
        """Create the layers."""
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
        self.bn = nn.BatchNorm1d(HIDDEN)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(HIDDEN, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate the network.

        Args:
            x: Input of shape ``(N, IN_FEATURES)``.

        Returns:
            Output of shape ``(N, NUM_CLASSES)``.
        """
        return self.fc2(self.act(self.bn(self.fc1(x))))


class ConvNet(nn.Module):
    """``Conv2d -> ReLU -> Flatten -> Linear`` on ``1x6x6`` inputs."""

    def __init__(self) -> None:
        """Create the layers."""
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=3)
        self.act = nn.Tanh()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * 4 * 4, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate the network.

        Args:
            x: Input of shape ``(N, 1, 6, 6)``.

        Returns:
            Output of shape ``(N, NUM_CLASSES)``.
        """
        return self.fc(self.flatten(self.act(self.conv(x))))


class SegmentationNet(nn.Module):
    """``Conv2d(stride 2) -> Tanh -> Conv2d(1x1)`` on ``1x6x6``: output ``(N, 3, 2, 2)``.

    For CE the class axis is 1 (four terms per datum); for MSE/BCE the class axis is
    the last one (``C = 2``, six terms per datum).
    """

    def __init__(self) -> None:
        """Create the layers."""
        super().__init__()
        self.conv1 = nn.Conv2d(1, NUM_CLASSES, kernel_size=3, stride=2)
        self.act = nn.Tanh()
        self.conv2 = nn.Conv2d(NUM_CLASSES, NUM_CLASSES, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate the network.

        Args:
            x: Input of shape ``(N, 1, 6, 6)``.

        Returns:
            Output of shape ``(N, 3, 2, 2)``.
        """
        return self.conv2(self.act(self.conv1(x)))


class SequenceModel(MLP):
    """MLP applied to ``(N, T, D)`` inputs; output ``(N, T, C)`` or ``(N, C, T)``."""

    def __init__(self, channels_first: bool = False) -> None:
        """Create the layers.

        Args:
            channels_first: Whether to permute the output to ``(N, C, T)`` (for CE).
        """
        super().__init__("tanh")
        self.channels_first = channels_first

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate the network.

        Args:
            x: Input of shape ``(N, T, IN_FEATURES)``.

        Returns:
            Output of shape ``(N, T, C)``, or ``(N, C, T)`` if ``channels_first``.
        """
        out = super().forward(x)
        return out.permute(0, 2, 1) if self.channels_first else out


class DictMLP(MLP):
    """MLP that consumes a dict input ``{"x": tensor}``."""

    def forward(self, X: dict[str, Tensor]) -> Tensor:  # type: ignore[override]
        """Evaluate the network.

        Args:
            X: Dictionary with the input under key ``"x"``.

        Returns:
            Output of shape ``(N, NUM_CLASSES)``.
        """
        return super().forward(X["x"])


class UnusedLayerMLP(MLP):
    """MLP with a layer defined in ``__init__`` but never used in ``forward``."""

    def __init__(self) -> None:
        """Create the layers (including the unused one)."""
        super().__init__("tanh")
        self.unused = nn.Linear(2, 2)


def dict_batch_size(X: dict[str, Tensor]) -> int:
    """Batch size of a dict input.

    Args:
        X: Dictionary with the input under key ``"x"``.

    Returns:
        The batch size.
    """
    return X["x"].shape[0]


def batch_sizes_of(layout: str) -> list[int]:
    """Batch sizes of a data layout.

    Args:
        layout: One of :data:`LAYOUTS`.

    Returns:
        The sizes of the mini-batches.

    Raises:
        ValueError: For an unknown layout.
    """
    if layout == "single":
        return [SINGLE_BATCH_SIZE]
    if layout == "unequal":
        return list(UNEQUAL_BATCH_SIZES)
    if layout == "loader":
        sizes = [LOADER_BATCH_SIZE] * (LOADER_NUM_DATA // LOADER_BATCH_SIZE)
        remainder = LOADER_NUM_DATA % LOADER_BATCH_SIZE
        return sizes + ([remainder] if remainder else [])
    raise ValueError(f"Unknown layout {layout!r}.")


def make_targets(
    loss_name: str,
    out_shape: tuple[int, ...],
    dtype: torch.dtype,
    generator: torch.Generator,
    soft_bce: bool = False,
) -> Tensor:
    """Draw targets for a model output of shape ``out_shape``.

    Args:
        loss_name: One of ``"mse"``, ``"ce"``, ``"bce"``.
        out_shape: Shape of the model output.
        dtype: Floating point type of regression/BCE targets.
        generator: Random number generator.
        soft_bce: Draw BCE targets uniformly from ``[0, 1]`` instead of ``{0, 1}``.

    Returns:
        Targets of the right shape and type for the loss.

    Raises:
        ValueError: For an unknown loss.
    """
    if loss_name == "mse":
        return torch.randn(out_shape, generator=generator, dtype=dtype)
    if loss_name == "bce":
        if soft_bce:
            return torch.rand(out_shape, generator=generator, dtype=dtype)
        return torch.randint(0, 2, out_shape, generator=generator).to(dtype)
    if loss_name == "ce":
        shape = (out_shape[0], *out_shape[2:])
        return torch.randint(0, out_shape[1], shape, generator=generator)
    raise ValueError(f"Unknown loss {loss_name!r}.")


def make_loss(loss_name: str, reduction: str) -> nn.Module:
    """Create a loss function.

    Args:
        loss_name: One of ``"mse"``, ``"ce"``, ``"bce"``.
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        The loss function.

    Raises:
        ValueError: For an unknown loss.
    """
    classes = {
        "mse": nn.MSELoss,
        "ce": nn.CrossEntropyLoss,
        "bce": nn.BCEWithLogitsLoss,
    }
    if loss_name not in classes:
        raise ValueError(f"Unknown loss {loss_name!r}.")
    return classes[loss_name](reduction=reduction)


def _randomize_bn(bn: nn.BatchNorm1d, generator: torch.Generator) -> None:
    """Give a batch normalization layer random running statistics and affine params.

    Args:
        bn: The layer (modified in place).
        generator: Random number generator.
    """
    with torch.no_grad():
        dtype = bn.running_mean.dtype
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator))
        bn.running_var.copy_(
            0.5 + torch.rand(bn.num_features, generator=generator, dtype=dtype)
        )
        bn.weight.copy_(1.0 + 0.3 * torch.randn(bn.num_features, generator=generator))
        bn.bias.copy_(0.3 * torch.randn(bn.num_features, generator=generator))


def make_model(model_name: str, loss_name: str, seed: int = 0) -> nn.Module:
    """Create a (float32, freshly seeded) model by name.

    Args:
        model_name: One of :data:`MODELS`.
        loss_name: Loss name (the sequence model is permuted for CE).
        seed: Seed for the parameter initialization.

    Returns:
        The model (float32; convert the dtype afterwards).

    Raises:
        ValueError: For an unknown model name.
    """
    torch.manual_seed(seed)
    if model_name.startswith("mlp_") and model_name[4:] in ACTIVATIONS:
        return MLP(model_name[4:])
    if model_name in ("subset", "frozen"):
        return MLP("relu" if model_name == "subset" else "gelu")
    if model_name == "conv":
        return ConvNet()
    if model_name == "conv_seg":
        return SegmentationNet()
    if model_name == "mlp_bn":
        model = BNMLP()
        _randomize_bn(model.bn, torch.Generator().manual_seed(seed + 1))
        return model.eval()
    if model_name == "seq":
        return SequenceModel(channels_first=loss_name == "ce")
    if model_name == "dict":
        return DictMLP("sigmoid")
    if model_name == "scalar":
        return ScalarMLP()
    raise ValueError(f"Unknown model {model_name!r}.")


def input_shape(model_name: str) -> tuple[int, ...]:
    """Shape of one input datum (without batch axis).

    Args:
        model_name: One of :data:`MODELS`.

    Returns:
        The per-datum input shape.
    """
    if model_name in ("conv", "conv_seg"):
        return (1, 6, 6)
    if model_name == "seq":
        return (SEQ_LEN, IN_FEATURES)
    return (IN_FEATURES,)


def supports(model_name: str, loss_name: str) -> bool:
    """Whether a model/loss combination makes sense.

    Args:
        model_name: One of :data:`MODELS`.
        loss_name: One of :data:`LOSSES`.

    Returns:
        ``False`` for the scalar-output model with cross-entropy, else ``True``.
    """
    return not (model_name == "scalar" and loss_name == "ce")


def make_problem(
    model_name: str = "mlp_tanh",
    loss_name: str = "mse",
    reduction: str = "mean",
    layout: str = "unequal",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    soft_bce: bool = False,
) -> Problem:
    """Create a test problem.

    Args:
        model_name: One of :data:`MODELS`.
        loss_name: One of :data:`LOSSES`.
        reduction: ``"mean"`` or ``"sum"``.
        layout: One of :data:`LAYOUTS`: one batch, unequal batches ``(3, 5, 2)``, or
            a ``DataLoader`` (no shuffling) with batch size 4 on 10 data points.
        dtype: Floating point type of model and data.
        seed: Random seed for model and data.
        soft_bce: Draw BCE targets from ``[0, 1]`` instead of ``{0, 1}``.

    Returns:
        The problem.

    Raises:
        ValueError: For unsupported combinations.
    """
    if not supports(model_name, loss_name):
        raise ValueError(f"{model_name!r} does not support {loss_name!r}.")
    model = make_model(model_name, loss_name, seed=seed).to(dtype)
    loss_func = make_loss(loss_name, reduction)

    if model_name == "subset":
        # only the first layer's weight and the last layer's bias
        params = [model.fc1.weight, model.fc2.bias]
    elif model_name == "frozen":
        model.fc1.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(model.parameters())

    generator = torch.Generator().manual_seed(seed + 1000)
    sizes = batch_sizes_of(layout)
    num_data = sum(sizes)
    X = torch.randn((num_data, *input_shape(model_name)), generator=generator)
    X = X.to(dtype)
    is_dict = model_name == "dict"
    with torch.no_grad():
        out_shape = tuple(model({"x": X} if is_dict else X).shape)
    y = make_targets(loss_name, out_shape, dtype, generator, soft_bce=soft_bce)

    batch_size_fn = dict_batch_size if is_dict else None

    batches: list[tuple[Any, Tensor]] = []
    start = 0
    for size in sizes:
        X_b, y_b = X[start : start + size], y[start : start + size]
        batches.append(({"x": X_b} if is_dict else X_b, y_b))
        start += size

    data: Iterable[tuple[Any, Tensor]]
    if layout == "loader":
        dataset: Any = (
            [({"x": X[n]}, y[n]) for n in range(num_data)]
            if is_dict
            else TensorDataset(X, y)
        )
        data = DataLoader(dataset, batch_size=LOADER_BATCH_SIZE, shuffle=False)
    else:
        data = batches

    name = f"{model_name}-{loss_name}-{reduction}-{layout}-{str(dtype).split('.')[-1]}"
    return Problem(
        name=name,
        model=model,
        loss_func=loss_func,
        params=params,
        data=data,
        batch_size_fn=batch_size_fn,
        num_data=num_data,
        loss_name=loss_name,
        out_shape=out_shape[1:],
        batches=batches,
    )


def duplicate_data(problem: Problem) -> list[tuple[Any, Tensor]]:
    """The problem's batches, listed twice.

    Args:
        problem: The problem.

    Returns:
        The list of batches followed by the same batches again.
    """
    return list(problem.batches) + list(problem.batches)
