"""Barrier against Sinkhorn steps, by start: the data of ``sinkhorn_init.png`` (the paper's Fig. 4).

Sinkhorn stages record their hard permutation at :func:`trajectory_steps` on the first pairs of each
seed; here those permutations are evaluated like any answer, and Sinkhorn from the identity is added
as the reference start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from deepalign.bench.evaluate import pair_curves
from deepalign.bench.runs import identity_start
from deepalign.bench.stats import mean_std
from deepalign.core import permutation as P


def trajectory_steps(steps: int) -> list[int]:
    """Roughly log-spaced Sinkhorn steps at which the hard permutation is recorded (0 and ``steps``
    included)."""
    grid = {0, steps}
    for decade in (1, 10, 100, 1000, 10_000, 100_000):
        grid |= {m * decade for m in (1, 2, 5)}
    return sorted(s for s in grid if s <= steps)


def trajectory_curve(
    bench: Any, records: list[tuple[dict[str, Any], int]]
) -> dict[str, Any] | None:
    """Barrier (mean, std over the traced pairs of every seed) at each recorded Sinkhorn step;
    ``records`` are ``(run record, seed)``; ``bench`` holds the pairs' weights and the data."""
    per_step: dict[int, list[float]] = {}
    spec = bench.ctx.spec
    for rec, k in records:
        trajs = rec["trajectories"]
        if not trajs:
            continue
        steps = [s for s, _ in trajs[0]]
        if any([s for s, _ in tr] != steps for tr in trajs):
            continue
        t = len(trajs)
        a = {key: v[:t] for key, v in bench.a[k].items()}
        b = {key: v[:t] for key, v in bench.b[k].items()}
        device = next(iter(b.values())).device
        for j, step in enumerate(steps):
            perm = {g: torch.stack([tr[j][1][g] for tr in trajs]).to(device) for g in spec.groups}
            aligned = P.apply(spec, perm, b, batch_dims=1)
            curves = pair_curves(
                bench.ctx.module, a, aligned, bench.drawn[k][:t], bench.data, bench.points
            )
            per_step.setdefault(int(step), []).extend(float(x) for x in curves["barrier"])
    if not per_step:
        return None
    steps = sorted(per_step)
    stats = [mean_std(per_step[s]) for s in steps]
    return {
        "steps": steps,
        "barrier_mean": [s["mean"] for s in stats],
        "barrier_std": [s["std"] for s in stats],
        "pairs": len(per_step[steps[0]]),
    }


def identity_curve(
    bench: Any, seeds: int, pair_seeds: Callable[[int], list[int]], tell: Callable[[int], None]
) -> dict[str, Any] | None:
    """Barrier vs Sinkhorn steps from the identity (the start the from-scratch row does not show:
    that one starts from near-uniform scores); None when it cannot run (e.g. a broken option)."""
    recs = []
    try:
        for k in range(seeds):
            trajs = identity_start(bench.a[k], bench.b[k], bench.ctx, pair_seeds(k))
            recs.append(({"trajectories": trajs}, k))
            tell(k + 1)
    except Exception:  # noqa: BLE001 - an extra curve; the Sinkhorn rows report their own errors
        return None
    curve = trajectory_curve(bench, recs)
    return None if curve is None else {**curve, "start": "identity", "label": "Sinkhorn"}
