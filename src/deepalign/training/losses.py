"""Deep-Align's three training losses (PAPER §4.2): supervised, alignment (L2) and LMC (task).

All are batched over B pairs. ``scores`` are the raw score matrices ``Q[b, i, j]`` (A's neuron i vs
B's neuron j); ``soft`` are their Sinkhorn projections.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepalign.core.functional import batched_forward
from deepalign.core.permutation import Permutation, apply_soft
from deepalign.core.spec import PermutationSpec

_SKIP = ("num_batches_tracked",)


def supervised_loss(scores: Mapping[str, Tensor], target: Permutation) -> Tensor:
    """Cross-entropy of each row of ``Q_m`` against the planted answer, averaged over layers.

    ``target[g][b, i]`` is the B neuron that A's neuron i should be matched to (the project's perm).
    """
    losses = []
    for g, q in scores.items():
        n = q.shape[-1]
        losses.append(F.cross_entropy(q.reshape(-1, n), target[g].reshape(-1).to(q.device)))
    return torch.stack(losses).mean()


def alignment_loss(
    spec: PermutationSpec,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    soft: Mapping[str, Tensor],
) -> Tensor:
    """Sum over tensors of the mean squared distance between A and the softly permuted B."""
    moved = apply_soft(spec, soft, b, batch_dims=1)
    terms = [
        F.mse_loss(moved[k], a[k]) for k in a if a[k].is_floating_point() and not k.endswith(_SKIP)
    ]
    return torch.stack(terms).sum()


def interpolate_pairs(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], lam: Tensor
) -> dict[str, Tensor]:
    """``(1 - lam[i]) a[i] + lam[i] b[i]`` for stacked pairs: one ``lam`` per pair, shape ``(B,)``
    (:func:`deepalign.lmc.interpolate` takes one network pair and one float)."""
    out = {}
    for k, t in a.items():
        w = lam.view(-1, *([1] * (t.dim() - 1))).to(t)
        out[k] = (1 - w) * t + w * b[k] if t.is_floating_point() else t
    return out


def lmc_loss(
    spec: PermutationSpec,
    module: nn.Module,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    soft: Mapping[str, Tensor],
    x: Tensor,
    target: Tensor,
    g: torch.Generator | None,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    lam: Tensor | None = None,
) -> Tensor:
    """Task loss of ``(1-λ)·A + λ·P(B)`` at one random ``λ ~ U(0,1)`` per pair (drawn from ``g``,
    or given as ``lam``).

    Classifiers: ``x`` is one data batch shared by all pairs and ``target`` its labels
    (cross-entropy). Other tasks pass ``criterion(outputs (B, batch, ...), target)``.
    """
    moved = apply_soft(spec, soft, b, batch_dims=1)
    batch = next(iter(a.values())).shape[0]
    if lam is None:
        lam = torch.rand(batch, generator=g)
    lam = lam.to(x.device)
    merged = interpolate_pairs(a, moved, lam)
    out = batched_forward(module, merged, x)
    if criterion is not None:
        return criterion(out, target)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.repeat(batch))
