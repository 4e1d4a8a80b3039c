"""Fixed, seeded benchmark workloads W1-W6.

Every workload builds a model (in eval mode), a loss function and a list of
``(X, y)`` batches from a fixed seed, so that two processes that build the same
workload get bit-identical models and data. ``smoke=True`` shrinks widths and batch
sizes so that the whole benchmark runs in seconds (used by the test suite).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

SEED = 0

Batch = tuple[Tensor, Tensor]


@dataclass
class Problem:
    """A built workload: everything an operator constructor needs.

    Attributes:
        model: The model (in eval mode).
        loss_func: The loss function (reduction ``"mean"``).
        params: The trainable parameters of ``model``.
        data: The list of ``(X, y)`` batches.
    """

    model: nn.Module
    loss_func: nn.Module
    params: list[Tensor]
    data: list[Batch]

    @property
    def num_params(self) -> int:
        """Total number of trainable parameters."""
        return sum(p.numel() for p in self.params)


@dataclass(frozen=True)
class Workload:
    """A named, seeded benchmark problem.

    Attributes:
        name: Short name (``W1`` ... ``W6``).
        description: One-line description for tables and JSON.
        build: Function ``build(smoke) -> Problem``.
    """

    name: str
    description: str
    build: Callable[[bool], Problem]


def _mlp(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    """Fully-connected network with ``act`` between the linear layers.

    Args:
        sizes: Layer widths, input first, output last.
        act: Activation class inserted after every linear layer but the last.

    Returns:
        The network.
    """
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _finish(
    model: nn.Module, loss_func: nn.Module, data: list[Batch], dtype: torch.dtype
) -> Problem:
    """Cast the model and floating-point data, set eval mode, collect the params.

    Args:
        model: The freshly initialized model.
        loss_func: The loss function.
        data: The batches.
        dtype: Floating-point dtype of model and (floating-point) data.

    Returns:
        The problem.
    """
    model = model.to(dtype).eval()

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    data = [(cast(X), cast(y)) for X, y in data]
    params = [p for p in model.parameters() if p.requires_grad]
    return Problem(model, loss_func, params, data)


def build_w1(smoke: bool) -> Problem:
    """W1: MLP 784-256-256-10 (ReLU), CrossEntropyLoss, 4 batches of 128."""
    gen = torch.manual_seed(SEED)
    hidden, num_batches, batch_size = (32, 2, 16) if smoke else (256, 4, 128)
    model = _mlp([784, hidden, hidden, 10], nn.ReLU)
    data = [
        (
            torch.randn(batch_size, 784, generator=gen),
            torch.randint(0, 10, (batch_size,), generator=gen),
        )
        for _ in range(num_batches)
    ]
    return _finish(model, nn.CrossEntropyLoss(), data, torch.float32)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (padding 1) with ReLU and 2x2 max-pooling, linear head."""

    def __init__(self, c1: int, c2: int, side: int, num_classes: int = 10):
        """Build the layers.

        Args:
            c1: Channels of the first convolution.
            c2: Channels of the second convolution.
            side: Height and width of the (square) 3-channel input.
            num_classes: Number of classes.
        """
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(c2 * (side // 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)``."""
        return self.head(self.features(x))


def build_w2(smoke: bool) -> Problem:
    """W2: small CNN on 3x32x32, CrossEntropyLoss, 2 batches of 64."""
    gen = torch.manual_seed(SEED)
    c1, c2, side, batch_size = (4, 8, 8, 8) if smoke else (16, 32, 32, 64)
    model = SmallCNN(c1, c2, side)
    data = [
        (
            torch.randn(batch_size, 3, side, side, generator=gen),
            torch.randint(0, 10, (batch_size,), generator=gen),
        )
        for _ in range(2)
    ]
    return _finish(model, nn.CrossEntropyLoss(), data, torch.float32)


class TinyCausalLM(nn.Module):
    """Tiny causal transformer language model.

    Token + learned position embeddings, ``num_layers`` post-norm
    ``nn.TransformerEncoderLayer`` blocks with a causal mask, and a linear head.

    ``forward`` returns logits of shape ``(N, C, T)`` (vocabulary on axis 1), i.e. the
    ``(N, T, C)`` logits permuted, because ``CrossEntropyLoss`` expects the classes
    on axis 1 and the targets ``(N, T)``.

    In eval mode, ``nn.TransformerEncoderLayer`` takes PyTorch's fused "fast path"
    (``aten::_transformer_encoder_layer_fwd``) whenever autograd does not see
    parameters that require gradients, which is the case inside ``torch.func``
    transforms; that kernel has no forward-mode AD, so both curvlinops_fisher and
    curvlinops would fail with ``NotImplementedError``. ``forward`` therefore turns the
    fast path off for its own duration (``torch.backends.mha``). It also restricts
    ``scaled_dot_product_attention`` to its math backend: the CPU flash-attention
    kernel has no forward-mode AD either, and curvlinops 3.0.1 (which takes
    Jacobian-vector products outside of reverse mode) fails on it. So every library
    and the gradient pass run the same, standard attention code.
    """

    def __init__(self, vocab: int, width: int, num_layers: int, seq_len: int):
        """Build the layers.

        Args:
            vocab: Vocabulary size.
            width: Model width (embedding dimension).
            num_layers: Number of transformer blocks.
            seq_len: Maximum sequence length (number of learned positions).
        """
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        layer = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True
        )
        self.blocks = nn.TransformerEncoder(
            layer, num_layers, enable_nested_tensor=False
        )
        self.head = nn.Linear(width, vocab)
        mask = nn.Transformer.generate_square_subsequent_mask(seq_len)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(N, C, T)`` for token ids ``(N, T)``."""
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                return self._logits(tokens).permute(0, 2, 1)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)

    def _logits(self, tokens: Tensor) -> Tensor:
        """Logits ``(N, T, C)`` for token ids ``(N, T)``."""
        T = tokens.shape[1]
        positions = torch.arange(T, device=tokens.device)
        h = self.tok(tokens) + self.pos(positions)
        mask = self.causal_mask[:T, :T].to(h.dtype)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(h)


def build_w3(smoke: bool) -> Problem:
    """W3: tiny causal transformer LM, vocab 128, width 64, 2 layers, T=32."""
    gen = torch.manual_seed(SEED)
    vocab, width, seq_len, batch_size = (32, 16, 8, 4) if smoke else (128, 64, 32, 16)
    model = TinyCausalLM(vocab, width, 2, seq_len)
    data = []
    for _ in range(2):
        tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=gen)
        data.append((tokens[:, :-1], tokens[:, 1:]))
    return _finish(model, nn.CrossEntropyLoss(), data, torch.float32)


def build_w4(smoke: bool) -> Problem:
    """W4: MLP 20-64-64-5 (Tanh), MSELoss, float64, 4 batches of 128."""
    gen = torch.manual_seed(SEED)
    hidden, num_batches, batch_size = (8, 2, 16) if smoke else (64, 4, 128)
    model = _mlp([20, hidden, hidden, 5], nn.Tanh)
    data = [
        (
            torch.randn(batch_size, 20, generator=gen),
            torch.randn(batch_size, 5, generator=gen),
        )
        for _ in range(num_batches)
    ]
    return _finish(model, nn.MSELoss(), data, torch.float64)


def build_w5(smoke: bool) -> Problem:
    """W5: MLP 20-64-1, BCEWithLogitsLoss with 0/1 targets, 4 batches of 128."""
    gen = torch.manual_seed(SEED)
    hidden, num_batches, batch_size = (8, 2, 16) if smoke else (64, 4, 128)
    model = _mlp([20, hidden, 1], nn.Tanh)
    data = [
        (
            torch.randn(batch_size, 20, generator=gen),
            torch.randint(0, 2, (batch_size, 1), generator=gen).float(),
        )
        for _ in range(num_batches)
    ]
    return _finish(model, nn.BCEWithLogitsLoss(), data, torch.float32)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norms, and a shortcut.

    The shortcut is the identity, or a strided 1x1 convolution with a batch norm when
    the shape changes; the block's output is ``relu(bn2(conv2(relu(bn1(conv1(x))))) +
    shortcut(x))``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        """Build the layers.

        Args:
            c_in: Input channels.
            c_out: Output channels.
            stride: Stride of the first convolution (and of the shortcut).
        """
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        """The block's output (see the class docstring)."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem (3x3 convolution, batch norm, ReLU), a basic block keeping the shape, a
    downsampling block doubling the channels, global average pooling, linear head."""

    def __init__(self, width: int, num_classes: int = 10):
        """Build the layers.

        Args:
            width: Channels of the stem and the first block (the second has twice).
            num_classes: Number of classes.
        """
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(
            BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)``."""
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


def build_w6(smoke: bool) -> Problem:
    """W6: small ResNet on 3x32x32 with batch norms in eval mode, CE, 2 batches of 32.

    The batch norms' running statistics come from two training-mode forward passes
    on seeded random images, so that they are not the identity.
    """
    gen = torch.manual_seed(SEED)
    width, side, batch_size = (4, 8, 8) if smoke else (16, 32, 32)
    model = SmallResNet(width)
    with torch.no_grad():
        for _ in range(2):
            model(2 + 3 * torch.randn(batch_size, 3, side, side, generator=gen))
    data = [
        (
            torch.randn(batch_size, 3, side, side, generator=gen),
            torch.randint(0, 10, (batch_size,), generator=gen),
        )
        for _ in range(2)
    ]
    return _finish(model, nn.CrossEntropyLoss(), data, torch.float32)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("W1", "MLP 784-256-256-10 ReLU, CE, 4x128", build_w1),
        Workload("W2", "CNN 3x32x32 conv16-conv32, CE, 2x64", build_w2),
        Workload("W3", "causal LM V128 d64 L2 T32, CE, 2x16", build_w3),
        Workload("W4", "MLP 20-64-64-5 Tanh, MSE, float64, 4x128", build_w4),
        Workload("W5", "MLP 20-64-1, BCEWithLogits, 4x128", build_w5),
        Workload("W6", "ResNet 3x32x32 2 blocks, BN eval, CE, 2x32", build_w6),
    ]
}
