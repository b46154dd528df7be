"""The weight-matching objective: the one number every solver is judged by when no data is used.

``weight_inner(a, b, spec) = sum_k <a_k, b_k>`` over every parameter the spec covers, except
BatchNorm running statistics (they are permuted with their layer but are not weights to match).
Maximising it over permutations of ``b`` is the same as minimising ``l2_distance(a, b, spec)``
because permutations keep ``||b||``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from deepalign.core.spec import PermutationSpec

RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def is_running_stat(key: str) -> bool:
    """True for BatchNorm buffers: permuted with their layer, never part of a weight cost."""
    return key.rsplit(".", 1)[-1] in RUNNING_STATS


def cost_keys(spec: PermutationSpec, state: Mapping[str, Tensor]) -> list[str]:
    """Keys of ``state`` that enter the weight cost: floating tensors of the spec, no running stats."""
    return [
        k
        for k in spec.axes
        if k in state and state[k].is_floating_point() and not is_running_stat(k)
    ]


def weight_inner(a: Mapping[str, Tensor], b: Mapping[str, Tensor], spec: PermutationSpec) -> float:
    """``sum_k <a_k, b_k>`` over the cost keys (products in the tensors' dtype, summed in float64)."""
    total = 0.0
    for k in cost_keys(spec, a):
        total += float((a[k] * b[k].to(a[k].device)).sum(dtype=torch.float64))
    return total


def l2_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor], spec: PermutationSpec) -> float:
    """Euclidean distance between the cost tensors of ``a`` and ``b`` (float64)."""
    total = 0.0
    for k in cost_keys(spec, a):
        d = a[k] - b[k].to(a[k].device)
        total += float((d * d).sum(dtype=torch.float64))
    return math.sqrt(total)
