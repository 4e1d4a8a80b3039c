r"""
A Laplace approximation for regression
======================================

A Laplace approximation turns a trained network into a Bayesian one: a Gaussian
posterior over the parameters centred at the trained weights
:math:`\boldsymbol\theta_*`, whose precision is the curvature of the negative log
posterior. With a Gaussian likelihood of noise :math:`\sigma^2` and a prior
:math:`\mathcal{N}(\mathbf{0}, \lambda^{-1}\mathbf{I})`, the generalized Gauss-Newton
version is

.. math::

    \boldsymbol\Sigma^{-1} = \frac{1}{\sigma^2} \sum_n \mathbf{J}_n^\top
    \mathbf{J}_n + \lambda \mathbf{I}, \qquad
    \operatorname{Var}[y_*] = \mathbf{J}_* \boldsymbol\Sigma \mathbf{J}_*^\top + \sigma^2

(the linearized predictive). ``MSELoss(reduction="sum")`` has Hessian :math:`2
\mathbf{I}`, so its GGN is :math:`2 \sum_n \mathbf{J}_n^\top \mathbf{J}_n` and the
likelihood term is ``GGN.to_dense() / (2 * sigma**2)`` (the Gaussian negative log
likelihood is ``MSE / (2 sigma^2)`` and the GGN and MC Fisher are linear in the loss).
The empirical Fisher is *quadratic* in the loss' gradient, so its likelihood term is
``EF.to_dense() / (2 * sigma**2)**2``. We compare the predictive
uncertainty from the GGN, the Monte-Carlo Fisher and the empirical Fisher on a 1-d
problem with a gap in the data.
"""

import os

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)

SMOKE = os.environ.get("CURVLINOPS_FISHER_SMOKE") == "1"
torch.manual_seed(0)
torch.set_default_dtype(torch.float64)

# %%
# Data with a gap, and a small trained MLP
# ----------------------------------------

N = 60 if SMOKE else 150
X = torch.cat([torch.rand(N // 2, 1) * 2 - 3, torch.rand(N - N // 2, 1) * 2 + 1])
sigma_true = 0.1
y = torch.sin(2 * X) + sigma_true * torch.randn(N, 1)
model = nn.Sequential(
    nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
)

optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(300 if SMOKE else 2000):
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(X), y)
    loss.backward()
    optimizer.step()
sigma = float(loss.detach().sqrt())  # noise estimate from the training residual
print(f"training MSE {loss.item():.4f}, sigma = {sigma:.3f}")

# %%
# Posterior precision from the three curvature matrices
# ------------------------------------------------------
# ``to_dense()`` builds each ``P x P`` matrix from its factor (no ``P`` products).

params = [p for p in model.parameters() if p.requires_grad]
data = [(X[i : i + 50], y[i : i + 50]) for i in range(0, N, 50)]
loss_func = nn.MSELoss(reduction="sum")
prior_precision = 1.0
# (operator, factor that turns the MSE's curvature into the likelihood's)
curvatures = {
    "GGN": (GGNLinearOperator(model, loss_func, params, data), 1 / (2 * sigma**2)),
    "MC Fisher (M = 8)": (
        FisherMCLinearOperator(model, loss_func, params, data, mc_samples=8, seed=0),
        1 / (2 * sigma**2),
    ),
    "empirical Fisher": (
        EFLinearOperator(model, loss_func, params, data),
        1 / (2 * sigma**2) ** 2,
    ),
}
P = curvatures["GGN"][0].shape[1]
print(f"P = {P} parameters")

# Jacobians of the predictions at test points, flattened like the operators' vectors.
X_test = torch.linspace(-5, 5, 200).unsqueeze(1)
names = [name for name, _ in model.named_parameters()]
values = tuple(p.detach() for p in params)


def predict(param_values, x):
    return functional_call(
        model, dict(zip(names, param_values)), (x.unsqueeze(0),)
    ).squeeze()


J_test = vmap(jacrev(predict), in_dims=(None, 0))(values, X_test)
J_test = torch.cat([j.reshape(len(X_test), -1) for j in J_test], dim=1)
mean = model(X_test).detach().squeeze(1)

fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
for ax, (name, (op, likelihood_factor)) in zip(axes, curvatures.items()):
    precision = likelihood_factor * op.to_dense() + prior_precision * torch.eye(P)
    covariance = torch.cholesky_inverse(torch.linalg.cholesky(precision))
    variance = torch.einsum("np,pq,nq->n", J_test, covariance, J_test) + sigma**2
    std = variance.sqrt()
    print(
        f"{name:18s}: predictive std in the gap {std[(X_test[:, 0].abs() < 0.5)].mean():.3f}, "
        f"on the data {std[(X_test[:, 0].abs() > 1.5) & (X_test[:, 0].abs() < 2.5)].mean():.3f}"
    )
    ax.fill_between(
        X_test[:, 0], mean - 2 * std, mean + 2 * std, alpha=0.3, label=r"$\pm 2$ std"
    )
    ax.plot(X_test[:, 0], mean, label="mean")
    ax.plot(X[:, 0], y[:, 0], "k.", ms=3, label="data")
    ax.set_title(name)
    ax.set_xlabel("x")
axes[0].set_ylabel("y")
axes[0].legend(loc="lower left")
axes[0].set_ylim(-3, 3)
fig.tight_layout()
plt.show()
