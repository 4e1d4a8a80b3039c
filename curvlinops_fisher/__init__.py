"""Fisher-family curvature matrices of PyTorch models as linear operators.

The generalized Gauss-Newton (:class:`GGNLinearOperator`), the seeded Monte-Carlo
Fisher (:class:`FisherMCLinearOperator`) and the empirical Fisher
(:class:`EFLinearOperator`), drop-in compatible with curvlinops' operator API.
"""

from curvlinops_fisher.curvature import (
    CurvatureLinearOperator,
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
)
from curvlinops_fisher.linop import IdentityLinearOperator, PyTorchLinearOperator

__version__ = "0.1.0"

__all__ = [
    "CurvatureLinearOperator",
    "EFLinearOperator",
    "FisherMCLinearOperator",
    "GGNLinearOperator",
    "IdentityLinearOperator",
    "PyTorchLinearOperator",
]
