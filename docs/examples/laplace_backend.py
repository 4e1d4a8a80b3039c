"""Laplace posterior with the curvlinops_fisher backend for laplace-torch.

A 1-D regression problem with a gap in the data: train a small MLP, fit a full
Laplace approximation with ``backend=CurvlinopsFisherGGN`` and, for comparison, with
laplace-torch's own ``CurvlinopsGGN``, tune the prior precision by the marginal
likelihood, and plot the GLM predictive (mean and two standard deviations, which grow
in the gap). The two backends give the same posterior; the fit times are printed next
to each other.

Needs laplace-torch (see the README section "Laplace backends"); the plot needs
matplotlib and is skipped without it. Run with ``python
docs/examples/laplace_backend.py [--smoke] [--out laplace_backend.png]``.
"""

import argparse
import time

import torch
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvlinops_fisher.laplace import CurvlinopsFisherGGN

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--smoke", action="store_true", help="tiny and fast")
parser.add_argument("--out", default="laplace_backend.png", help="the plot's file")
args = parser.parse_args()
torch.manual_seed(0)

# Data: y = sin(x) + noise on [-4, -1] and [1, 4]; nothing in between.
num_data, width, steps = (64, 16, 50) if args.smoke else (256, 50, 1000)
x = torch.cat([torch.rand(num_data // 2) * 3 - 4, torch.rand(num_data // 2) * 3 + 1])
X = x.unsqueeze(1)
noise = 0.1
y = torch.sin(X) + noise * torch.randn_like(X)
loader = DataLoader(TensorDataset(X, y), batch_size=64)

# The MAP estimate: a 1-width-width-1 Tanh MLP trained with Adam (weight decay as prior).
model = nn.Sequential(
    nn.Linear(1, width),
    nn.Tanh(),
    nn.Linear(width, width),
    nn.Tanh(),
    nn.Linear(width, 1),
)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
for _ in range(steps):
    optimizer.zero_grad()
    nn.functional.mse_loss(model(X), y).backward()
    optimizer.step()
model.eval()
P = sum(p.numel() for p in model.parameters())
print(f"MLP with {P} parameters, {num_data} data points in batches of 64")

# Full Laplace with both backends: same posterior, different cost.
x_grid = torch.linspace(-6, 6, 200).unsqueeze(1)
results = {}
for name, backend in [
    ("CurvlinopsFisherGGN", CurvlinopsFisherGGN),
    ("CurvlinopsGGN", CurvlinopsGGN),
]:
    la = Laplace(
        model,
        "regression",
        subset_of_weights="all",
        hessian_structure="full",
        backend=backend,
        sigma_noise=noise,
    )
    la.fit(loader)  # warm-up
    start = time.perf_counter()
    la.fit(loader)
    seconds = time.perf_counter() - start
    la.optimize_prior_precision(method="marglik", n_steps=50 if args.smoke else 200)
    f_mu, f_var = la(x_grid, pred_type="glm")
    std = (f_var.squeeze() + la.sigma_noise**2).sqrt().detach()
    results[name] = (f_mu.squeeze().detach(), std)
    print(
        f"{name:>20}: fit {seconds:.3f} s, prior precision "
        f"{float(la.prior_precision):.4g}, log marginal likelihood "
        f"{float(la.log_marginal_likelihood()):.4f}"
    )

(mu, std), (mu_ref, std_ref) = results.values()
print(
    f"largest difference of the predictive std: {float((std - std_ref).abs().max()):.2e}"
)
print(
    f"predictive std at x = 0 (gap): {float(std[100]):.3f}, at x = 2.5: {float(std[141]):.3f}"
)

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed: no plot")
else:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    grid = x_grid.squeeze()
    ax.fill_between(grid, mu - 2 * std, mu + 2 * std, alpha=0.3, label="mean ± 2 std")
    ax.plot(grid, mu, label="GLM predictive mean (CurvlinopsFisherGGN)")
    ax.plot(grid, torch.sin(grid), "k--", lw=1, label="sin(x)")
    ax.scatter(x, y.squeeze(), s=6, c="k", label="data")
    ax.set_xlabel("x")
    ax.set_ylim(-3, 3)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot written to {args.out}")
