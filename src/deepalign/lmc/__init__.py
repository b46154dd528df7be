"""Linear mode connectivity: interpolate two networks, evaluate along the segment, barrier and AUC.

Convention: ``lam = 0`` is A, ``lam = 1`` is aligned B, ``merged = (1 - lam) * A + lam * B``.
"""

from deepalign.lmc.curves import evaluate, has_batchnorm, lmc_curve, lmc_curves, reset_bn_stats
from deepalign.lmc.interpolate import interpolate
from deepalign.lmc.metrics import auc, barrier

__all__ = [
    "auc",
    "barrier",
    "evaluate",
    "has_batchnorm",
    "interpolate",
    "lmc_curve",
    "lmc_curves",
    "reset_bn_stats",
]
