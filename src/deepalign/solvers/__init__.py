"""Alignment solvers behind one call: ``align(a, b, spec, method) -> (permutation, info)``.

Built in: ``identity``, ``wm`` (weight matching), ``am`` (activation matching, needs data),
``sinkhorn`` (Sinkhorn re-basin); ``deepalign*`` when a trained aligner is available; chains such as
``wm+sinkhorn``.
"""

from deepalign.solvers.assignment import linear_assignment, log_sinkhorn
from deepalign.solvers.objective import l2_distance, weight_inner
from deepalign.solvers.registry import (
    METHODS,
    align,
    method_names,
    needs_data,
    register,
    resolve,
    uses_data,
)

__all__ = [
    "METHODS",
    "align",
    "l2_distance",
    "linear_assignment",
    "log_sinkhorn",
    "method_names",
    "needs_data",
    "register",
    "resolve",
    "uses_data",
    "weight_inner",
]
