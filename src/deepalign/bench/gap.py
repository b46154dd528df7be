"""Gap closed: how much of the way from weight matching to the best alignment a method gets.

``gap closed = (WM - method) / (WM - floor)`` on mean barriers, where the floor is the lowest mean
barrier of any method in the run: 0 is weight matching's barrier, 1 the best method's, negative
is worse than weight matching. Given per seed (each seed draws its own pairs), over all pairs, and
with a spread from resampling the pairs (every method on the same resampled pairs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

REFERENCE = "wm"
BOOTSTRAP = 1000


def _closed(ref: float, floor: float, value: float) -> float | None:
    span = ref - floor
    return None if not span > 1e-12 else (ref - value) / span


def gap_closed(
    barriers: Mapping[str, Sequence[Sequence[float]]], seed: int = 0
) -> dict[str, dict[str, Any]] | None:
    """Per method: ``mean`` (over all pairs), ``std`` (over pair resamples), ``seed_values``,
    ``floor_method``. ``barriers[method][k]`` are seed k's per-pair barriers (the same pairs for
    every method). None without the reference method (``wm``) or with fewer than two methods."""
    if REFERENCE not in barriers or len(barriers) < 2:
        return None
    methods = list(barriers)
    seeds = len(barriers[REFERENCE])
    per_seed = {m: [] for m in methods}
    for k in range(seeds):
        means = {m: sum(barriers[m][k]) / len(barriers[m][k]) for m in methods}
        floor = min(means.values())
        for m in methods:
            per_seed[m].append(_closed(means[REFERENCE], floor, means[m]))
    table = torch.tensor([[b for k in range(seeds) for b in barriers[m][k]] for m in methods])
    means = table.double().mean(1)
    floor_i = int(means.argmin())
    ref_mean = float(means[methods.index(REFERENCE)])
    overall = {
        m: _closed(ref_mean, float(means[floor_i]), float(means[i])) for i, m in enumerate(methods)
    }
    g = torch.Generator().manual_seed(seed)
    n = table.shape[1]
    draws = table.double()[:, torch.randint(0, n, (BOOTSTRAP, n), generator=g)].mean(-1)  # (M, B)
    ref = draws[methods.index(REFERENCE)]
    span = ref - draws.min(0).values
    ok = span > 1e-12
    samples = (ref - draws)[:, ok] / span[ok]
    out = {}
    for i, m in enumerate(methods):
        spread = float(samples[i].std()) if samples.shape[1] > 1 else math.nan
        out[m] = {
            "mean": overall[m],
            "std": spread,
            "seed_values": per_seed[m],
            "floor_method": methods[floor_i],
            "reference": REFERENCE,
        }
    return out
