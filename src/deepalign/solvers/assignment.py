"""Linear assignment and log-domain Sinkhorn: the two projections every method ends with."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def linear_assignment(score: Tensor) -> Tensor:
    """The permutation ``p`` maximising ``sum_i score[i, p[i]]`` (batched over leading dims).

    Runs on the CPU with scipy (as fast as lap/lapjv here); returns a LongTensor on ``score``'s device.
    """
    s = score.detach().to("cpu", torch.float64)
    flat = s.reshape(-1, *s.shape[-2:]).numpy()
    out = np.empty(flat.shape[:2], dtype=np.int64)
    for b in range(flat.shape[0]):
        _, cols = linear_sum_assignment(flat[b], maximize=True)
        out[b] = cols
    return torch.from_numpy(out.reshape(s.shape[:-1])).to(score.device)


def log_sinkhorn(log_alpha: Tensor, iters: int = 20) -> Tensor:
    """Log-domain Sinkhorn: alternately normalise columns then rows of ``exp(log_alpha)``.

    Returns log of a (nearly) doubly-stochastic matrix with unit row and column sums; differentiable
    by unrolling. Batched over leading dims.
    """
    for _ in range(iters):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-2, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1, keepdim=True)
    return log_alpha


def block_assignment(
    costs: list[Tensor], heads: int, head_cost: Tensor | None = None
) -> tuple[Tensor, list[Tensor], float]:
    """The head order and per-head permutations maximising ``sum_g sum_i costs[g][i, p_g[i]]``
    (plus ``head_cost[i, order[i]]``) when every ``p_g`` moves whole heads in one shared order.

    Exact: each pair of heads (A's ``i``, B's ``k``) is scored by its best within-head matching (one
    assignment per pair and group), then one assignment over heads picks the order. Returns the
    order, each group's permutation, and the value reached.
    """
    value = torch.zeros(heads, heads, dtype=torch.float64)
    if head_cost is not None:
        value += head_cost.detach().to("cpu", torch.float64)
    within = []
    for c in costs:
        n = c.shape[-1]
        d = n // heads
        blocks = c.detach().to("cpu", torch.float64).reshape(heads, d, heads, d).transpose(1, 2)
        best = linear_assignment(blocks)  # (heads, heads, d): per pair of heads
        value += blocks.gather(-1, best.unsqueeze(-1)).squeeze(-1).sum(-1)
        within.append(best)
    order = linear_assignment(value)
    rows = torch.arange(heads)
    perms = [
        (order.unsqueeze(-1) * w.shape[-1] + w[rows, order]).flatten().to(c.device)
        for w, c in zip(within, costs, strict=True)
    ]
    return order, perms, float(value[rows, order].sum())
