r"""
Trace and diagonal: exact vs randomized estimators
==================================================

The trace and the diagonal of a Fisher-family matrix :math:`\mathbf{A} =
\mathbf{U}^\top\mathbf{U}` are exact sums over the rows :math:`\mathbf{u}_r` of its
factor,

.. math::

    \operatorname{tr}\mathbf{A} = \sum_r \|\mathbf{u}_r\|^2, \qquad
    \operatorname{diag}\mathbf{A} = \sum_r \mathbf{u}_r \odot \mathbf{u}_r,

which ``op.trace()`` and ``op.diagonal()`` compute without a single random vector. For
operators without that structure (sums, products, damped or inverse operators),
``curvlinops_fisher`` has randomized estimators that only multiply the operator onto
random probes: Hutchinson, Hutch++ and XTrace for the trace, Hutchinson and XDiag for
the diagonal. This example measures their error against the exact values as the
number of matrix-vector products grows.

The estimators multiply all probes of a stage in one call ``op @ X``. We hand them the
cached operator (``op.cached()``, which keeps :math:`\mathbf{U}` in memory), so each
product is two matrix multiplications and the sweep takes seconds.
"""

import os

import matplotlib.pyplot as plt
import torch
from torch import nn

from curvlinops_fisher import (
    GGNLinearOperator,
    hutchinson_diag,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xtrace,
)

SMOKE = os.environ.get("CURVLINOPS_FISHER_SMOKE") == "1"
torch.manual_seed(0)
torch.set_default_dtype(torch.float64)

# %%
# The GGN of a small regression MLP
# ---------------------------------

N, D_in, H, D_out = (64, 4, 8, 2) if SMOKE else (256, 8, 24, 3)
X = torch.randn(N, D_in)
y = torch.randn(N, D_out)
data = [(X[i : i + 64], y[i : i + 64]) for i in range(0, N, 64)]
model = nn.Sequential(
    nn.Linear(D_in, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, D_out)
)
params = [p for p in model.parameters() if p.requires_grad]
GGN = GGNLinearOperator(model, nn.MSELoss(), params, data)

exact_trace, exact_diag = GGN.trace(), GGN.diagonal()
print(f"P = {GGN.shape[1]}, exact trace {exact_trace:.6f}")
assert torch.allclose(exact_trace, exact_diag.sum())
cached = GGN.cached()

# %%
# Error against the number of products
# ------------------------------------
# Median relative error over independent runs (seeded ``torch.Generator`` objects).
# Hutchinson's error falls like :math:`1/\sqrt{K}`; Hutch++ and XTrace remove the top
# of the spectrum exactly with a sketch and fall faster on matrices whose spectrum
# decays, as curvature matrices' do.

budgets = [6, 12, 24] if SMOKE else [6, 12, 24, 48, 96, 192]
runs = 5 if SMOKE else 25


def median_error(estimate, exact, budget):
    errors = [
        float(
            torch.linalg.vector_norm(
                estimate(cached, budget, generator=torch.Generator().manual_seed(seed))
                - exact
            )
            / torch.linalg.vector_norm(exact)
        )
        for seed in range(runs)
    ]
    return float(torch.tensor(errors).median())


trace_estimators = {
    "Hutchinson": hutchinson_trace,
    "Hutch++": hutchpp_trace,
    "XTrace": xtrace,
}
diag_estimators = {"Hutchinson": hutchinson_diag, "XDiag": xdiag}
trace_errors = {
    name: [median_error(f, exact_trace, K) for K in budgets]
    for name, f in trace_estimators.items()
}
diag_errors = {
    name: [median_error(f, exact_diag, K) for K in budgets]
    for name, f in diag_estimators.items()
}
for name, errors in {
    **trace_errors,
    **{f"{k} (diag)": v for k, v in diag_errors.items()},
}.items():
    print(f"{name:18s}", " ".join(f"{e:.2e}" for e in errors))

fig, (ax_trace, ax_diag) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
for name, errors in trace_errors.items():
    ax_trace.loglog(budgets, errors, marker="o", label=name)
for name, errors in diag_errors.items():
    ax_diag.loglog(budgets, errors, marker="o", label=name)
for ax, title in [(ax_trace, "trace"), (ax_diag, "diagonal")]:
    ax.set_xlabel("matrix-vector products $K$")
    ax.set_ylabel("median relative error")
    ax.set_title(f"{title}: estimators vs the exact value")
    ax.legend()
fig.tight_layout()

# %%
# The diagonal itself
# -------------------
# The exact diagonal next to a 48-product Hutchinson estimate: the estimate scatters
# around the truth, most for the largest entries.

estimate = hutchinson_diag(cached, 48, generator=torch.Generator().manual_seed(0))
fig, ax = plt.subplots(figsize=(5, 4))
ax.loglog(exact_diag, estimate.abs(), ".", alpha=0.5)
line = [float(exact_diag.min()), float(exact_diag.max())]
ax.loglog(line, line, "k--", lw=1)
ax.set_xlabel("exact diagonal entry")
ax.set_ylabel("|Hutchinson estimate| (48 products)")
fig.tight_layout()
plt.show()
