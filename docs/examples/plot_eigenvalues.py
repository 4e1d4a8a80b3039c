r"""
Eigenvalues: Lanczos on ``to_scipy()`` vs the Gram matrix
=========================================================

Every Fisher-family matrix is a Gram product :math:`\mathbf{A} = \mathbf{U}^\top
\mathbf{U}` with one row of :math:`\mathbf{U} \in \mathbb{R}^{n \times P}` per loss
term and output-space factor column (``n = N`` for the empirical Fisher and for the MC
Fisher with one sample, ``n = N C`` for the GGN of a ``C``-class cross-entropy). The
nonzero eigenvalues of :math:`\mathbf{U}^\top\mathbf{U}` are those of the small
:math:`n \times n` matrix :math:`\mathbf{U}\mathbf{U}^\top`, and an eigenvector
:math:`\mathbf{w}` of the latter gives :math:`\mathbf{v} = \mathbf{U}^\top
\mathbf{w} / \sqrt{\lambda}` of the former.

``op.eigh(k)`` takes this path when ``n`` is small next to ``P`` and otherwise hands the
operator to SciPy's Lanczos solver, the black-box route that every linear operator
supports: ``scipy.sparse.linalg.eigsh(op.to_scipy(), k, which="LA")``. This example
runs both on the empirical Fisher of an MLP with about 7,000 parameters and plots the
spectrum, which the Gram path gives in full.
"""

import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import nn

from curvlinops_fisher import EFLinearOperator, FisherMCLinearOperator

SMOKE = os.environ.get("CURVLINOPS_FISHER_SMOKE") == "1"
torch.manual_seed(0)

# %%
# Problem: 512 points in batches of 128, MLP 32-64-64-10
# -------------------------------------------------------

N, D_in, H, C = (64, 8, 16, 4) if SMOKE else (512, 32, 64, 10)
X = torch.randn(N, D_in)
y = torch.randint(0, C, (N,))
data = [(X[i : i + 128], y[i : i + 128]) for i in range(0, N, 128)]
model = nn.Sequential(
    nn.Linear(D_in, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, C)
)
loss_func = nn.CrossEntropyLoss()
params = [p for p in model.parameters() if p.requires_grad]
EF = EFLinearOperator(model, loss_func, params, data)
P, k = EF.shape[1], 10
print(f"P = {P} parameters, N = {N} data points, k = {k}")

# %%
# Top-k eigenpairs both ways
# --------------------------
# Timings are medians of three calls after a warm-up call. The products of this small
# model are cheap (a few milliseconds), so Lanczos is fast too; the Gram path's lead
# grows with the cost of a product (see ``benchmarks/RESULTS.md`` for a 270,000
# parameter MLP).


def median_time(func, repeats=3):
    """Median wall time of ``func()`` after one untimed warm-up call, and its result."""
    result = func()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


time_lanczos, lanczos_values = median_time(
    lambda: np.sort(eigsh(EF.to_scipy(), k=k, which="LA", return_eigenvectors=False))[
        ::-1
    ]
)
time_gram, (gram_values, gram_vectors) = median_time(lambda: EF.eigh(k, method="gram"))

print(f"eigsh on to_scipy(): {time_lanczos:.2f} s")
print(
    f"Gram path eigh(k):   {time_gram:.2f} s  ({time_lanczos / time_gram:.1f}x faster)"
)
print("largest eigenvalues (eigsh):", np.array2string(lanczos_values[:5], precision=5))
print(
    "largest eigenvalues (Gram): ",
    np.array2string(gram_values[:5].numpy(), precision=5),
)
assert np.allclose(lanczos_values, gram_values.numpy(), rtol=1e-3, atol=1e-6)

# The eigenvectors are orthonormal columns in flat parameter order, and satisfy
# A v = lambda v up to rounding.
residual = EF @ gram_vectors - gram_vectors * gram_values
print(f"max |A v - lambda v| = {residual.abs().max():.2e}")

# %%
# The whole spectrum from the Gram matrix
# ---------------------------------------
# ``U`` has ``n = N`` rows here, so the Gram matrix is ``N x N`` and its eigenvalues are
# *all* the nonzero eigenvalues of the ``P x P`` matrix. The MC Fisher with one sample
# has the same row count; its spectrum is drawn for comparison.

U = EF.factor()
spectrum_ef = torch.linalg.eigvalsh(U @ U.T).flip(0).clamp_min(0)
F = FisherMCLinearOperator(model, loss_func, params, data, mc_samples=1, seed=0)
U_mc = F.factor()
spectrum_mc = torch.linalg.eigvalsh(U_mc @ U_mc.T).flip(0).clamp_min(0)

fig, ax = plt.subplots(figsize=(6, 4))
ax.semilogy(spectrum_ef.numpy(), label="empirical Fisher (Gram)")
ax.semilogy(spectrum_mc.numpy(), label="MC Fisher, M = 1 (Gram)")
ax.semilogy(range(k), lanczos_values, "k.", label=f"top {k} by eigsh")
ax.set_xlabel("index")
ax.set_ylabel("eigenvalue")
ax.set_ylim(bottom=max(1e-10, float(spectrum_ef[spectrum_ef > 0].min())))
ax.set_title(f"Spectrum: {len(spectrum_ef)} nonzero eigenvalues of a {P} x {P} matrix")
ax.legend()
fig.tight_layout()
plt.show()
