"""
Quickstart
==========

The GGN, the Monte-Carlo Fisher and the empirical Fisher as linear operators, on a small
synthetic classification problem: multiply them onto vectors and matrices, build dense
matrices, hand an operator to SciPy's ``eigsh`` and ``cg``, and watch the Monte-Carlo
Fisher approach the GGN as ``mc_samples`` grows.

Run with ``python docs/examples/quickstart.py`` (a few seconds on a laptop CPU).
"""

import torch
from scipy.sparse.linalg import cg, eigsh
from torch import nn

from curvlinops_fisher import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    IdentityLinearOperator,
)

torch.manual_seed(0)


def fmt(values) -> str:
    """Format a sequence of numbers compactly."""
    return ", ".join(f"{float(x):.5f}" for x in values)


# A synthetic 4-class problem in 10 dimensions, three unequal batches.
N_per_batch, D_in, C = [32, 32, 16], 10, 4
data = [(torch.randn(n, D_in), torch.randint(0, C, (n,))) for n in N_per_batch]
model = nn.Sequential(nn.Linear(D_in, 16), nn.Tanh(), nn.Linear(16, C))
loss_func = nn.CrossEntropyLoss()  # reduction="mean": curvature of the mean loss
params = [p for p in model.parameters() if p.requires_grad]

GGN = GGNLinearOperator(model, loss_func, params, data)
F = FisherMCLinearOperator(model, loss_func, params, data, mc_samples=4, seed=1)
EF = EFLinearOperator(model, loss_func, params, data)
P = F.shape[1]
print(f"{P} parameters; operators of shape {F.shape}")

# Products: a flat vector, a matrix of columns, or a list shaped like the parameters.
v = torch.randn(P)
Fv = F @ v
Fv_list = F @ [torch.randn_like(p) for p in params]
print(f"|F v| = {Fv.norm():.4f}; list format gives shapes {[t.shape for t in Fv_list]}")

# Dense matrices: multiply onto the identity (columns share each batch's forward pass).
identity = torch.eye(P)
GGN_mat, F_mat, EF_mat = GGN @ identity, F @ identity, EF @ identity

# SciPy: the top eigenvalues of the MC Fisher with eigsh.
vals = eigsh(F.to_scipy(), k=5, which="LA", return_eigenvectors=False)
dense_vals = torch.linalg.eigvalsh(F_mat).flip(0)[:5].tolist()
print("top-5 eigenvalues of the MC Fisher (eigsh):", fmt(sorted(vals, reverse=True)))
print("                          (dense eigvalsh):", fmt(dense_vals))

# Damping for a natural-gradient step: (F + 1e-3 I)^{-1} g with SciPy's cg.
damped = F + 1e-3 * IdentityLinearOperator(
    [p.shape for p in params], device=F.device, dtype=F.dtype
)
gradient, risk = GGN.gradient_and_loss()
flat_gradient = torch.cat([g.flatten() for g in gradient]).numpy()
step, info = cg(damped.to_scipy(), flat_gradient, atol=1e-10)
print(f"risk {risk:.4f}; natural-gradient step norm {torch.tensor(step).norm():.4f}")

# The MC Fisher is an unbiased, seeded sample of the GGN: the residual shrinks.
GGN_norm = torch.linalg.matrix_norm(GGN_mat)
for mc_samples in [1, 4, 16, 64, 256]:
    F_mc = FisherMCLinearOperator(
        model, loss_func, params, data, mc_samples=mc_samples, seed=1
    )
    residual = torch.linalg.matrix_norm(F_mc @ identity - GGN_mat) / GGN_norm
    print(f"mc_samples = {mc_samples:4d}: relative MC-vs-GGN residual {residual:.4f}")
print(
    f"empirical Fisher vs GGN:   relative residual "
    f"{torch.linalg.matrix_norm(EF_mat - GGN_mat) / GGN_norm:.4f}"
)
