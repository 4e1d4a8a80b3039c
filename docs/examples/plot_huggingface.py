r"""
A Hugging Face language model with padding
==========================================

Language-model batches are dictionaries (``input_ids``, ``attention_mask``), padded to
the longest sequence, with the padding's labels set to ``-100`` so that
``CrossEntropyLoss`` ignores them. The operators take such data as it is: a mapping
input needs ``batch_size_fn``, ignored labels contribute nothing, and under
``reduction="mean"`` the operator divides by the number of non-ignored tokens of the
*whole data set*, exactly like PyTorch's loss on the concatenated data. So the matrix
does not depend on how the sequences are batched and padded, which this example
checks, before comparing the spectra of the GGN, the empirical Fisher of single tokens
and the empirical Fisher of whole sequences (``per_datum=True``).

The model is a tiny GPT-2 built from a configuration with random weights: nothing is
downloaded. The example needs the optional dependency ``transformers``.
"""

import os
import sys

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import nn

from curvlinops_fisher import EFLinearOperator, GGNLinearOperator

os.environ["HF_HUB_OFFLINE"] = "1"
try:
    import transformers
except ImportError:
    print("This example needs transformers: pip install transformers")
    sys.exit(0)

SMOKE = os.environ.get("CURVLINOPS_FISHER_SMOKE") == "1"
torch.manual_seed(0)
transformers.logging.set_verbosity_error()

# %%
# A tiny causal language model
# ----------------------------
# ``CrossEntropyLoss`` wants the classes on axis 1, so the wrapper returns the logits as
# ``(N, vocabulary, length)``: every position is a loss term.

VOCAB, WIDTH, LAYERS = (16, 8, 1) if SMOKE else (32, 16, 2)


class CausalLM(nn.Module):
    def __init__(self):
        super().__init__()
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=WIDTH,
            n_layer=LAYERS,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        self.gpt = transformers.GPT2LMHeadModel(config).eval()

    def forward(self, X):
        logits = self.gpt(
            input_ids=X["input_ids"], attention_mask=X["attention_mask"]
        ).logits
        return logits.movedim(-1, 1)


model = CausalLM()
params = [p for p in model.parameters() if p.requires_grad]

# %%
# Sequences of different lengths, batched two ways
# ------------------------------------------------
# Next-token labels, ``-100`` after the end of each sequence. Once right-padded in
# batches of 8, once one sequence per batch without padding.

num_sequences = 8 if SMOKE else 16
lengths = torch.randint(4, 12 if SMOKE else 16, (num_sequences,))
sequences = [torch.randint(1, VOCAB, (int(n),)) for n in lengths]


def make_batch(seqs):
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
        labels[i, : len(s) - 1] = s[1:]
    return {"input_ids": ids, "attention_mask": mask}, labels


padded = [make_batch(sequences[i : i + 8]) for i in range(0, num_sequences, 8)]
unpadded = [make_batch([s]) for s in sequences]


def batch_size_fn(X):
    return X["input_ids"].shape[0]


loss_func = nn.CrossEntropyLoss()  # ignore_index=-100, reduction="mean"
GGN = GGNLinearOperator(model, loss_func, params, padded, batch_size_fn=batch_size_fn)
GGN_unpadded = GGNLinearOperator(
    model, loss_func, params, unpadded, batch_size_fn=batch_size_fn
)
v = torch.randn(GGN.shape[1])
difference = (GGN @ v - GGN_unpadded @ v).norm() / (GGN @ v).norm()
print(f"P = {GGN.shape[1]} parameters, {int((lengths - 1).sum())} predicted tokens")
print(f"padded vs unpadded batches: relative difference of products {difference:.1e}")
assert difference < 1e-4

# %%
# Spectra: GGN, per-token and per-sequence empirical Fisher
# ---------------------------------------------------------
# The per-token empirical Fisher sums the outer products of every token's gradient;
# the per-sequence one (``per_datum=True``) first sums the gradients of a sequence's
# tokens, which is what "the empirical Fisher of a sequence model" usually means. Its
# rank is at most the number of sequences.

EF_token = EFLinearOperator(
    model, loss_func, params, padded, batch_size_fn=batch_size_fn
)
EF_sequence = EFLinearOperator(
    model, loss_func, params, padded, batch_size_fn=batch_size_fn, per_datum=True
)
k = 6 if SMOKE else 20
spectra = {}
for name, op in [
    ("GGN", GGN),
    ("EF, per token", EF_token),
    ("EF, per sequence", EF_sequence),
]:
    values = eigsh(op.to_scipy(), k=k, which="LA", return_eigenvectors=False)
    spectra[name] = np.sort(values)[::-1]
    print(
        f"{name:17s} trace {float(op.trace()):.4f}, top eigenvalue {spectra[name][0]:.4f}"
    )

fig, ax = plt.subplots(figsize=(6, 4))
for name, values in spectra.items():
    ax.semilogy(
        np.arange(1, k + 1), np.clip(values, 1e-12, None), marker="o", label=name
    )
ax.set_xlabel("index")
ax.set_ylabel("eigenvalue")
ax.set_title(f"Top-{k} eigenvalues of a tiny GPT-2's curvature")
ax.legend()
fig.tight_layout()
plt.show()
