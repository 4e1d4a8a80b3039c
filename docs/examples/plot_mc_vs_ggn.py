r"""
Monte-Carlo Fisher vs GGN
=========================

The Monte-Carlo (MC) Fisher replaces the loss Hessian inside the generalized
Gauss-Newton (GGN) matrix by an average of outer products of gradients at labels
*sampled from the model's predictive distribution*:

.. math::

    \mathbf{F}_M = c \sum_t \mathbf{J}_t^\top \Big(\frac{1}{M} \sum_{m=1}^M
    \mathbf{g}_{t,m} \mathbf{g}_{t,m}^\top\Big) \mathbf{J}_t,
    \qquad \mathbb{E}[\mathbf{g}_{t,m} \mathbf{g}_{t,m}^\top] =
    \nabla^2_{\mathbf{f}_t} \ell,

so :math:`\mathbb{E}[\mathbf{F}_M] = \mathbf{G}` for the losses whose Hessian is the
Fisher of their likelihood (MSE, cross-entropy, binary cross-entropy). This example
shows how fast the seeded sample approaches the GGN as ``mc_samples`` grows, that the
matrix is a deterministic function of ``seed``, and how the empirical Fisher (EF), which
uses the *true* labels instead, differs from both.
"""

import os

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import SymLogNorm
from torch import nn

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)

SMOKE = os.environ.get("CURVLINOPS_FISHER_SMOKE") == "1"
torch.manual_seed(0)
torch.set_default_dtype(torch.float64)

# %%
# A small classification problem
# ------------------------------
# Five classes, 256 points in batches of 64 (the last one shorter), a two-layer MLP.

N, D_in, C = (64, 6, 3) if SMOKE else (256, 8, 5)
X = torch.randn(N, D_in)
y = torch.randint(0, C, (N,))
data = [(X[i : i + 64], y[i : i + 64]) for i in range(0, N, 64)]
model = nn.Sequential(nn.Linear(D_in, 12), nn.Tanh(), nn.Linear(12, C))
loss_func = nn.CrossEntropyLoss()
params = [p for p in model.parameters() if p.requires_grad]

GGN = GGNLinearOperator(model, loss_func, params, data)
G = GGN.to_dense()  # exact, from the factor structure (no P products)
print(f"P = {G.shape[0]} parameters")


def relative_residual(mc_samples: int, seed: int) -> float:
    """Relative Frobenius distance of the seeded MC Fisher to the GGN."""
    F = FisherMCLinearOperator(
        model, loss_func, params, data, mc_samples=mc_samples, seed=seed
    )
    return float(
        torch.linalg.matrix_norm(F.to_dense() - G) / torch.linalg.matrix_norm(G)
    )


# %%
# Convergence in ``mc_samples``
# -----------------------------
# The residual of an average of :math:`M` independent samples falls like
# :math:`1/\sqrt{M}`. The samples live in output space, so a larger ``mc_samples``
# barely changes the cost of a product.

sample_counts = [1, 4, 16] if SMOKE else [1, 2, 4, 8, 16, 32, 64, 128, 256]
seeds = [0, 1] if SMOKE else [0, 1, 2, 3, 4]
residuals = torch.tensor(
    [[relative_residual(M, seed) for M in sample_counts] for seed in seeds]
)
for M, r in zip(sample_counts, residuals.mean(0)):
    print(f"mc_samples = {M:4d}: mean relative residual {r:.4f}")

fig, ax = plt.subplots(figsize=(5.5, 4))
for row in residuals:
    ax.loglog(sample_counts, row, color="tab:blue", alpha=0.3, marker=".")
ax.loglog(
    sample_counts, residuals.mean(0), color="tab:blue", lw=2, label="mean over seeds"
)
reference = (
    residuals.mean(0)[0] / torch.tensor(sample_counts, dtype=torch.float64).sqrt()
)
ax.loglog(sample_counts, reference, "k--", label=r"$\propto 1/\sqrt{M}$")
ax.set_xlabel("mc_samples $M$")
ax.set_ylabel(r"$\|F_M - G\|_F / \|G\|_F$")
ax.set_title("MC Fisher approaches the GGN")
ax.legend()
fig.tight_layout()

# %%
# Determinism
# -----------
# An operator is one fixed matrix: its internal ``torch.Generator`` is re-seeded at the
# start of every product, so repeated products agree bit for bit, all columns of a
# matrix product see the same sample, and the global random number generator is never
# touched. A different seed gives a different (equally valid) sample.

F1 = FisherMCLinearOperator(model, loss_func, params, data, mc_samples=4, seed=1)
v = torch.randn(F1.shape[1])
state = torch.get_rng_state()
assert torch.equal(F1 @ v, F1 @ v)
assert torch.equal(torch.get_rng_state(), state)
F1_again = FisherMCLinearOperator(model, loss_func, params, data, mc_samples=4, seed=1)
F2 = FisherMCLinearOperator(model, loss_func, params, data, mc_samples=4, seed=2)
print("same seed, new operator, same product:", torch.equal(F1 @ v, F1_again @ v))
print("different seed, different product:   ", not torch.allclose(F1 @ v, F2 @ v))
print(
    "F @ I equals to_dense():             ",
    torch.allclose(F1 @ torch.eye(F1.shape[1]), F1.to_dense()),
)

# %%
# The matrices side by side
# -------------------------
# One sample per term (``mc_samples=1``) is noisy; with 64 samples the structure of the
# GGN is visible. The empirical Fisher uses the observed labels: for a model that does
# not fit its data it is a different matrix altogether, not a noisy GGN.

EF = EFLinearOperator(model, loss_func, params, data).to_dense()
panels = {
    "GGN": G,
    "MC Fisher, M = 1": FisherMCLinearOperator(
        model, loss_func, params, data, mc_samples=1, seed=0
    ).to_dense(),
    "MC Fisher, M = 64": FisherMCLinearOperator(
        model, loss_func, params, data, mc_samples=64, seed=0
    ).to_dense(),
    "empirical Fisher": EF,
}
# A symmetric logarithmic colour scale: a few entries (the output layer's) dominate.
limit = float(G.abs().max())
norm = SymLogNorm(linthresh=1e-3 * limit, vmin=-limit, vmax=limit)
fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), layout="constrained")
for ax, (title, matrix) in zip(axes, panels.items()):
    image = ax.imshow(matrix, cmap="RdBu_r", norm=norm)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(image, ax=axes, shrink=0.8)
plt.show()
