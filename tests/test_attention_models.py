"""Attention models: PyTorch's fused attention kernels have no forward-mode AD.

The operators switch them off while the model runs (math backend of
``scaled_dot_product_attention``, no Transformer inference fast path); these tests check
that a causal Transformer in eval mode works and gives the brute-force GGN.
"""

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvlinops_fisher import EFLinearOperator, GGNLinearOperator

VOCAB, WIDTH, SEQ = 7, 8, 5


class TinyCausalLM(nn.Module):
    """Token + position embeddings, one causal Transformer layer, linear head."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(0.1 * torch.randn(SEQ, WIDTH))
        layer = nn.TransformerEncoderLayer(
            WIDTH, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(
            T, dtype=self.position.dtype
        )
        hidden = self.encoder(
            self.embedding(tokens) + self.position[:T], mask=mask, is_causal=True
        )
        return self.head(hidden).permute(0, 2, 1)  # (N, C, T) for CrossEntropyLoss


def dense_ggn(model, loss_func, params, data, num_data):
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    total = 0
    for X, y in data:

        def f(*values, X=X):
            return functional_call(model, dict(zip(keys, values)), (X,))

        out = f(*params)
        jac = jacrev(f, argnums=tuple(range(len(params))))(*params)
        J = torch.cat([j.reshape(out.numel(), -1) for j in jac], dim=1)
        H = hessian(lambda o, y=y: loss_func(o, y))(out.detach())
        H = H.reshape(out.numel(), out.numel())
        total = total + J.T @ H @ J * (X.shape[0] / num_data)
    return total


def test_causal_transformer_ggn_matches_brute_force():
    torch.manual_seed(0)
    model = TinyCausalLM().double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    data = [
        (torch.randint(0, VOCAB, (n, SEQ)), torch.randint(0, VOCAB, (n, SEQ)))
        for n in (2, 3)
    ]
    loss_func = nn.CrossEntropyLoss()
    op = GGNLinearOperator(model, loss_func, params, data)
    P = op.shape[1]
    V = torch.randn(P, 3, dtype=torch.float64)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        expected = dense_ggn(model, loss_func, params, data, num_data=5) @ V
    torch.testing.assert_close(op @ V, expected, rtol=1e-9, atol=1e-12)
    # the fused-kernel settings are restored afterwards
    assert torch.backends.mha.get_fastpath_enabled()
    # the EF runs through the same path
    assert torch.isfinite(EFLinearOperator(model, loss_func, params, data) @ V).all()
