"""Alignment solvers behind one call: ``align(a, b, spec, method) -> (permutation, info)``.

Methods (listed in :mod:`deepalign.solvers.registry`): ``identity``, ``wm`` (weight matching),
``am`` (activation matching, needs data), ``sinkhorn`` (Sinkhorn re-basin), ``deepalign`` (a trained
aligner, passed as ``aligner=``); chains such as ``wm+sinkhorn`` (:class:`Chain`). MergeMany aligns
N networks into one basis (:func:`merge_many`).
"""

from deepalign.solvers.assignment import linear_assignment, log_sinkhorn
from deepalign.solvers.chain import Chain, ChainRun, align, run_chain
from deepalign.solvers.merge_many import merge_many
from deepalign.solvers.method import Method, Options
from deepalign.solvers.objective import l2_distance, weight_inner
from deepalign.solvers.registry import METHODS, add, get, method_names

__all__ = [
    "METHODS",
    "Chain",
    "ChainRun",
    "Method",
    "Options",
    "add",
    "align",
    "get",
    "l2_distance",
    "linear_assignment",
    "log_sinkhorn",
    "merge_many",
    "method_names",
    "run_chain",
    "weight_inner",
]
