"""A tiny Hugging Face GPT-2 (random weights from a config, nothing downloaded).

Dict inputs (``input_ids``, ``attention_mask``), ``batch_size_fn``, right-padded
batches of different lengths and ``ignore_index=-100`` labels: the GGN, the EF (per
term and per datum) and the MC Fisher equal brute force on the data set's loss, whose
``mean`` divides by the number of non-padding tokens of the whole data set.
"""

from __future__ import annotations

import os

import pytest
import torch
from concat_reference import loss64
from reference import _Functional, assert_matrix_close, to_dense
from torch import Tensor, nn
from torch.func import hessian, jacrev

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)

os.environ["HF_HUB_OFFLINE"] = "1"  # never touch the network
transformers = pytest.importorskip(
    "transformers",
    reason="the optional test dependency transformers is not installed "
    "(pip install transformers)",
)

VOCAB, LENGTHS, BATCH_SIZES = 11, (5, 3), (3, 2)


class CausalLM(nn.Module):
    """GPT-2 whose logits are returned as ``(N, V, L)`` (CrossEntropy's layout)."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=8,
            n_embd=8,
            n_layer=1,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        torch.manual_seed(0)
        self.gpt = transformers.GPT2LMHeadModel(config).double().eval()

    def forward(self, X: dict[str, Tensor]) -> Tensor:
        out = self.gpt(input_ids=X["input_ids"], attention_mask=X["attention_mask"])
        return out.logits.movedim(-1, 1)


def padded_batches() -> list[tuple[dict[str, Tensor], Tensor]]:
    """Right-padded batches; labels are the next token, -100 at padding and the end."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for size, length in zip(BATCH_SIZES, LENGTHS):
        ids = torch.randint(0, VOCAB, (size, length), generator=gen)
        lengths = torch.randint(1, length + 1, (size,), generator=gen)
        lengths[0] = length
        mask = (torch.arange(length) < lengths[:, None]).long()
        ids = ids * mask  # pad token 0
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
        batches.append(({"input_ids": ids, "attention_mask": mask}, labels))
    return batches


def batch_size(X: dict[str, Tensor]) -> int:
    return X["input_ids"].shape[0]


def brute_force(model: nn.Module, params: list[Tensor], batches, kind: str) -> Tensor:
    """Sum over batches of PyTorch's summed loss, over the data set's token count."""
    f = _Functional(model, params)
    loss_sum = loss64(nn.CrossEntropyLoss(reduction="sum"))
    D = sum(int((y != -100).sum()) for _, y in batches)
    result = torch.zeros(f.dim, f.dim, dtype=torch.float64)
    for X, y in batches:
        out = f(f.theta, X)
        if kind == "ggn":
            J = jacrev(lambda theta, X=X: f(theta, X))(f.theta).reshape(-1, f.dim)
            H = hessian(lambda o, y=y: loss_sum(o, y) / D)(out)
            result += J.T @ H.reshape(out.numel(), out.numel()) @ J
        else:
            none = nn.CrossEntropyLoss(reduction="none")

            def losses(theta: Tensor, X=X, y=y) -> Tensor:
                per_term = none(f(theta, X), y)
                return per_term.sum(1) if kind == "ef-datum" else per_term.flatten()

            G = jacrev(losses)(f.theta)
            result += G.T @ G / D
    return result


@pytest.fixture(scope="module")
def problem():
    model = CausalLM()
    gpt = model.gpt
    # a subset keeps the dense matrices small: the tied embedding, a block's output
    # projection and the final layer norm
    params = [
        gpt.transformer.wte.weight,
        gpt.transformer.h[0].mlp.c_proj.bias,
        gpt.transformer.ln_f.weight,
    ]
    return model, params, padded_batches()


@pytest.mark.parametrize("kind", ["ggn", "ef", "ef-datum"])
def test_gpt2_padded_against_brute_force(problem, kind: str) -> None:
    model, params, batches = problem
    cls = GGNLinearOperator if kind == "ggn" else EFLinearOperator
    extra = {"per_datum": True} if kind == "ef-datum" else {}
    op = cls(
        model,
        nn.CrossEntropyLoss(),  # ignore_index=-100
        params,
        batches,
        batch_size_fn=batch_size,
        **extra,
    )
    expected = brute_force(model, params, batches, kind)
    assert_matrix_close(to_dense(op), expected)
    assert_matrix_close(op.to_dense(), expected)


def test_gpt2_mc_fisher_is_close_to_the_ggn(problem) -> None:
    model, params, batches = problem
    kwargs = {"batch_size_fn": batch_size}
    mc = FisherMCLinearOperator(
        model, nn.CrossEntropyLoss(), params, batches, mc_samples=3000, **kwargs
    )
    ggn = GGNLinearOperator(model, nn.CrossEntropyLoss(), params, batches, **kwargs)
    A, G = to_dense(mc), to_dense(ggn)
    assert float((A - G).detach().norm() / G.detach().norm()) < 0.1
    # padding positions contribute nothing: their logits may change freely
    v = torch.randn(A.shape[0], dtype=torch.float64)
    torch.testing.assert_close(mc @ v, A @ v)
