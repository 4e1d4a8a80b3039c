r"""
Laplace approximations with the functional API
==============================================

``curvlinops_fisher.functional`` gives the curvature products as plain functions,
laplax-style (see :doc:`/functional`). Here they build three Laplace approximations of a
small 1-D regression network and their posterior predictive standard deviations,
inside and outside the training range:

- **full**: the dense posterior precision (the network is tiny, :math:`P = 97`);
- **diagonal**: only the diagonal of the posterior precision;
- **low-rank**: the top-:math:`k` eigenpairs of the GGN (``scipy.sparse.linalg.eigsh``
  on the functional matrix-vector product), the prior precision on the remaining
  directions.

The products go through ``make_ggn_mv_without_data`` (the whole training set in
batches, with an explicit ``factor``) and ``make_ggn_mv`` with ``num_total_samples``
(laplax's estimate of the data set's curvature from one batch). No plotting library is
needed; with matplotlib installed the script also draws the three predictives.
"""

import os

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.func import functional_call, jacrev, vmap

from curvlinops_fisher.functional import make_ggn_mv, make_ggn_mv_without_data

SMOKE = os.environ.get("CURVLINOPS_FISHER_SMOKE") == "1"
torch.manual_seed(0)
torch.set_default_dtype(torch.float64)

# %%
# Train a small regression network
# --------------------------------
N, noise_std, prior_precision = 128, 0.1, 1.0
X = torch.rand(N, 1) * 2 - 1  # training inputs in [-1, 1]
y = torch.sin(3 * X) + noise_std * torch.randn(N, 1)
model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))

optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
for _ in range(150 if SMOKE else 500):
    optimizer.zero_grad()
    nn.functional.mse_loss(model(X), y).backward()
    optimizer.step()
model.eval()
print(f"training MSE: {nn.functional.mse_loss(model(X), y).item():.4f}")

params = {name: p.detach() for name, p in model.named_parameters()}
P = sum(p.numel() for p in params.values())

# %%
# The GGN of the negative log-likelihood, batch by batch
# ------------------------------------------------------
# The Gaussian negative log-likelihood is sum_n ||f_n - y_n||^2 / (2 noise_std^2) (up
# to a constant); MSELoss(reduction="sum") is sum_n ||f_n - y_n||^2, so its GGN times
# factor = 1 / (2 noise_std^2) is the GGN of the NLL.
loss_func = nn.MSELoss(reduction="sum")
factor = 1.0 / (2 * noise_std**2)
ggn_mv = make_ggn_mv_without_data(model, params, loss_func, factor=factor)
batches = [(X[i : i + 32], y[i : i + 32]) for i in range(0, N, 32)]


def nll_ggn(v: torch.Tensor) -> torch.Tensor:
    """GGN of the data set's NLL times v ([P] or [P, K]): a sum over batches."""
    return sum(ggn_mv(v, batch) for batch in batches)


identity = torch.eye(P)
G = nll_ggn(identity)  # dense [P, P]: P columns share each batch's forward pass
precision = G + prior_precision * identity

# laplax-style estimate of the data set's GGN from one batch of 32 points:
# num_total_samples / num_curv_samples = 128 / 32 scales the batch's sum.
one_batch_mv = make_ggn_mv(model, params, batches[0], loss_func, num_total_samples=N)
G_estimate = factor * one_batch_mv(identity)
estimate_error = ((G_estimate - G).norm() / G.norm()).item()
print(f"GGN estimated from one batch of 32: relative error {estimate_error:.3f}")

# %%
# Three posteriors
# ----------------
covariance_full = torch.linalg.inv(precision)
variance_diag = 1.0 / torch.diagonal(precision)

k = 10
operator = LinearOperator(
    (P, P),
    matvec=lambda v: nll_ggn(torch.from_numpy(np.asarray(v).reshape(-1))).numpy(),
    dtype=np.float64,
)
eigenvalues, eigenvectors = eigsh(operator, k=k, which="LA")
U, lam = torch.from_numpy(eigenvectors), torch.from_numpy(eigenvalues)
print(f"top-{k} GGN eigenvalues: {lam.flip(0)[:4].numpy().round(1)} ...")


def low_rank_covariance_times(M: torch.Tensor) -> torch.Tensor:
    """(U diag(lam) U^T + prior I)^{-1} M, exact on span(U) and its complement."""
    coefficients = U.T @ M
    inverse = 1.0 / (lam + prior_precision) - 1.0 / prior_precision
    return U @ (inverse[:, None] * coefficients) + M / prior_precision


# %%
# Predictive standard deviation
# -----------------------------
X_test = torch.tensor([[-3.0], [-2.0], [-1.0], [-0.5], [0.0], [0.5], [1.0], [2.0]])


def output(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, p, (x.unsqueeze(0),)).squeeze()


jac = vmap(jacrev(output), in_dims=(None, 0))(params, X_test)
J = torch.cat([jac[name].reshape(len(X_test), -1) for name in params], dim=1)

noise = noise_std**2
std_full = ((J @ covariance_full * J).sum(1) + noise).sqrt()
std_diag = ((J**2 * variance_diag).sum(1) + noise).sqrt()
std_low_rank = ((J * low_rank_covariance_times(J.T).T).sum(1) + noise).sqrt()

print("predictive std:")
print("     x     full  diagonal  low-rank")
for x, a, b, c in zip(X_test.squeeze(1), std_full, std_diag, std_low_rank):
    marker = "" if -1 <= x <= 1 else "  (outside the training range)"
    print(f"{x:6.2f} {a:8.3f} {b:9.3f} {c:9.3f}{marker}")

inside = (X_test.abs() <= 1).squeeze(1)
ratio = std_full[~inside].min() / std_full[inside].max()
print(f"full Laplace: smallest std outside / largest std inside = {ratio:.2f}")
assert ratio > 1, "the posterior should be more uncertain away from the data"

# %%
# Plot (only where matplotlib is installed)
# -----------------------------------------

try:
    import matplotlib.pyplot as plt
except ImportError:
    plt = None
if plt is not None:
    X_plot = torch.linspace(-3, 3, 121).unsqueeze(1)
    jac = vmap(jacrev(output), in_dims=(None, 0))(params, X_plot)
    J_plot = torch.cat([jac[name].reshape(len(X_plot), -1) for name in params], dim=1)
    stds = {
        "full": ((J_plot @ covariance_full * J_plot).sum(1) + noise).sqrt(),
        "diagonal": ((J_plot**2 * variance_diag).sum(1) + noise).sqrt(),
        f"low-rank (k = {k})": (
            (J_plot * low_rank_covariance_times(J_plot.T).T).sum(1) + noise
        ).sqrt(),
    }
    mean = model(X_plot).detach().squeeze(1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)
    for ax, (name, std) in zip(axes, stds.items()):
        ax.fill_between(X_plot[:, 0], mean - 2 * std, mean + 2 * std, alpha=0.3)
        ax.plot(X_plot[:, 0], mean)
        ax.plot(X[:, 0], y[:, 0], "k.", ms=3)
        ax.set_title(name)
        ax.set_xlabel("x")
    axes[0].set_ylim(-3, 3)
    fig.tight_layout()
    plt.show()
