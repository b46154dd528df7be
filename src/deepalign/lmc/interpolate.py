"""Points on the segment between two state dicts: ``(1 - lam) * a + lam * b``.

Convention everywhere in :mod:`deepalign.lmc`: ``lam = 0`` is A, ``lam = 1`` is (aligned) B.
Integer buffers (BatchNorm's ``num_batches_tracked``) are taken from A.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from deepalign.core.spec import StateDict


def interpolate(a: Mapping[str, Tensor], b: Mapping[str, Tensor], lam: float) -> StateDict:
    """``(1 - lam) * a + lam * b`` key by key (works on stacked states too)."""
    out: StateDict = {}
    for k, va in a.items():
        vb = b[k].to(va.device)
        out[k] = va.lerp(vb.to(va.dtype), float(lam)) if va.is_floating_point() else va.clone()
    return out
