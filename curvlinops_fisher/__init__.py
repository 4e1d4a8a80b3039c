"""Fisher-family curvature matrices of PyTorch models as linear operators.

The generalized Gauss-Newton (:class:`GGNLinearOperator`), the seeded Monte-Carlo
Fisher (:class:`FisherMCLinearOperator`) and the empirical Fisher
(:class:`EFLinearOperator`), drop-in compatible with curvlinops' operator API, with
exact dense matrices, traces, diagonals and eigenpairs from their factor structure,
and randomized estimators for any operator. :mod:`curvlinops_fisher.functional` offers
the same products as plain functions (laplax-style, with and without fixed data).
"""

from curvlinops_fisher import functional
from curvlinops_fisher.cached import CachedCurvatureLinearOperator
from curvlinops_fisher.curvature import (
    CurvatureLinearOperator,
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)
from curvlinops_fisher.estimators import (
    hutchinson_diag,
    hutchinson_squared_fro,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xtrace,
)
from curvlinops_fisher.fisher_trace import (
    empirical_fisher_trace,
    generalized_fisher_trace,
)
from curvlinops_fisher.linop import IdentityLinearOperator, PyTorchLinearOperator

__version__ = "0.1.0"

__all__ = [
    "CachedCurvatureLinearOperator",
    "CurvatureLinearOperator",
    "EFLinearOperator",
    "FisherMCLinearOperator",
    "GGNLinearOperator",
    "IdentityLinearOperator",
    "PyTorchLinearOperator",
    "empirical_fisher_trace",
    "functional",
    "generalized_fisher_trace",
    "hutchinson_diag",
    "hutchinson_squared_fro",
    "hutchinson_trace",
    "hutchpp_trace",
    "xdiag",
    "xtrace",
]
