"""Barrier and AUC of an interpolation curve (Ainsworth et al.; Deep-Align paper, section 6).

``gap(lam) = value(lam) - ((1 - lam) * value(0) + lam * value(1))``;
``barrier = max_lam gap``, ``auc = trapezoid integral of gap over lam``, each clipped at 0 after
the max / the integral (so a curve that dips below the chord has AUC 0). For accuracy-like curves
(``higher_is_better``) the gap is the chord minus the curve.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deepalign.errors import DeepAlignError

Curve = Tensor | Sequence[float]


def _gap(lambdas: Curve, values: Curve, higher_is_better: bool) -> tuple[Tensor, Tensor]:
    lam = torch.as_tensor(lambdas, dtype=torch.float64).cpu()
    v = torch.as_tensor(values, dtype=torch.float64).cpu()
    if lam.dim() != 1 or lam.shape[0] < 2 or v.shape[-1] != lam.shape[0]:
        raise DeepAlignError(
            f"curve: {tuple(v.shape)} values for {tuple(lam.shape)} lambdas (need >= 2 points)"
        )
    if not bool(torch.isfinite(v).all()):
        raise DeepAlignError("curve: values hold NaN or inf")
    chord = (1 - lam) * v[..., :1] + lam * v[..., -1:]
    gap = v - chord
    return lam, (-gap if higher_is_better else gap)


def _out(x: Tensor) -> float | Tensor:
    return float(x) if x.dim() == 0 else x


def barrier(lambdas: Curve, values: Curve, higher_is_better: bool = False) -> float | Tensor:
    """Largest rise of the curve above the chord between its ends, clipped at 0.

    ``values`` may be batched ``(N, K)``; then a tensor ``(N,)`` comes back, else a float.
    """
    _, gap = _gap(lambdas, values, higher_is_better)
    return _out(gap.max(dim=-1).values.clamp_min(0))


def auc(lambdas: Curve, values: Curve, higher_is_better: bool = False) -> float | Tensor:
    """Trapezoid integral of the curve minus its chord, clipped at 0."""
    lam, gap = _gap(lambdas, values, higher_is_better)
    return _out(torch.trapezoid(gap, lam, dim=-1).clamp_min(0))
