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
