r"""
A laplace-torch posterior with the exact-structure backend
==========================================================

`laplace-torch <https://github.com/aleximmer/Laplace>`_ fits Laplace approximations
:math:`\mathcal{N}(\boldsymbol\theta_*, \mathbf{P}^{-1})` of trained networks. Its
curvature comes from a *backend*; :class:`curvlinops_fisher.laplace.CurvlinopsFisherGGN`
is one, built on the exact structure of the GGN: a full Laplace takes ``to_dense()``
(the factor rows :math:`\mathbf{U}_b` of each batch, then
:math:`\mathbf{U}_b^\top\mathbf{U}_b`) instead of ``P`` products per batch with the
identity, and a diagonal Laplace the exact ``diagonal()``. Nothing else changes:

.. code-block:: python

    la = Laplace(model, "regression", subset_of_weights="all",
                 hessian_structure="full", backend=CurvlinopsFisherGGN)

On a 1-d regression problem with a gap in the data we fit a full Laplace with our
backend and with laplace-torch's own ``CurvlinopsGGN``, tune the prior precision by the
marginal likelihood, and plot the GLM predictive: mean and two standard deviations,
which grow in the gap. The two posteriors agree; the fit times are printed side by
side.

laplace-torch is an optional dependency (see the README section "Laplace backends" for
installing it without torchvision); without it this example only says so.
"""

import importlib.util
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SMOKE = os.environ.get("CURVLINOPS_FISHER_SMOKE") == "1"
HAVE_LAPLACE = importlib.util.find_spec("laplace") is not None
torch.manual_seed(0)

# %%
# Data and the trained network
# ----------------------------
# :math:`y = \sin(x) + \varepsilon` on :math:`[-4, -1]` and :math:`[1, 4]`, nothing in
# between; a Tanh MLP trained with Adam (weight decay standing in for the prior).

num_data, width, steps = (64, 16, 100) if SMOKE else (256, 32, 1000)
x = torch.cat([torch.rand(num_data // 2) * 3 - 4, torch.rand(num_data // 2) * 3 + 1])
X = x.unsqueeze(1)
noise = 0.1
y = torch.sin(X) + noise * torch.randn_like(X)
loader = DataLoader(TensorDataset(X, y), batch_size=64)

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

# %%
# Laplace with both backends
# --------------------------
# The same call with ``backend=CurvlinopsFisherGGN`` and ``backend=CurvlinopsGGN``;
# each fit is timed after a warm-up fit. The two curvature matrices agree to float32
# rounding; the small differences of the tuned prior precisions come from the
# float32 log determinant in the marginal likelihood.


def laplace_fits(x_grid: torch.Tensor) -> dict:
    """Fit, tune and predict with both backends; name -> (mean, std) on ``x_grid``."""
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    from curvlinops_fisher.laplace import CurvlinopsFisherGGN

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
        la.optimize_prior_precision(method="marglik", n_steps=50 if SMOKE else 100)
        f_mu, f_var = la(x_grid, pred_type="glm")
        std = (f_var.squeeze() + la.sigma_noise**2).sqrt().detach()
        results[name] = (f_mu.squeeze().detach(), std)
        print(
            f"{name:>20}: fit {seconds:.3f} s, prior precision "
            f"{float(la.prior_precision):.4g}, log marginal likelihood "
            f"{float(la.log_marginal_likelihood()):.4f}"
        )
    return results


x_grid = torch.linspace(-6, 6, 241).unsqueeze(1)
if not HAVE_LAPLACE:
    print("laplace-torch is not installed: see the README section 'Laplace backends'")
else:
    results = laplace_fits(x_grid)
    (mu, std), (_, std_ref) = results.values()
    difference = float((std - std_ref).abs().max())
    print(f"largest difference of the predictive std: {difference:.2e}")
    print(f"predictive std at x = 0 (gap): {std[120]:.3f}, at x = 2.5: {std[170]:.3f}")

# %%
# The predictive
# --------------
# Mean and two standard deviations of the GLM predictive with our backend (the
# observation noise included): narrow on the data, wide in the gap and outside.

try:
    import matplotlib.pyplot as plt
except ImportError:
    plt = None
    print("matplotlib is not installed: no plot")
if HAVE_LAPLACE and plt is not None:
    grid = x_grid.squeeze(1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.fill_between(grid, mu - 2 * std, mu + 2 * std, alpha=0.3, label=r"$\pm 2$ std")
    ax.plot(grid, mu, label="GLM predictive mean")
    ax.plot(grid, torch.sin(grid), "k--", lw=1, label=r"$\sin(x)$")
    ax.plot(x, y.squeeze(1), "k.", ms=3, label="data")
    ax.set_xlabel("x")
    ax.set_ylim(-3, 3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    plt.show()
