"""One method's run over a seed's pairs: the bench's call of the chain executor.

:func:`deepalign.solvers.run_chain` does the work (batched stages on chunks of pairs: Deep-Align one
forward pass per chunk, Sinkhorn one optimisation per chunk; other stages pair by pair). Here the
bench adds its settings (Sinkhorn's steps and recorded trajectory steps, the user's options per
method, the loaded aligner), an untimed warm-up, and picks out the Sinkhorn trajectories of the
first pairs for the start plot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from deepalign.core.permutation import Permutation
from deepalign.core.spec import PermutationSpec
from deepalign.solvers import Chain, run_chain
from deepalign.solvers.sinkhorn import SINKHORN_CHUNK


@dataclass
class MethodRun:
    """Stacked permutations ``(N, n)`` per group, seconds per pair, and the traced trajectories."""

    perm: Permutation
    seconds: list[float]
    timing: str  # each stage's kind joined by " + ", e.g. "per pair + batched (amortised)"
    first_seconds: float = 0.0  # a chain's first stage: mean seconds per pair (0: one stage)
    trajectories: list[list[tuple[int, Permutation]]] = field(default_factory=list)


@dataclass
class Context:
    """Everything a method needs besides the pairs."""

    spec: PermutationSpec
    module: nn.Module
    solver_data: Any
    aligner: Any  # a loaded DeepAlign (or None when no deepalign method runs)
    options: Mapping[str, Mapping[str, Any]]  # per method name (as listed), extra solver options
    sinkhorn: Mapping[str, Any]  # settings every sinkhorn stage gets (steps, trajectory_steps, ...)
    trajectory_pairs: int = 0
    sinkhorn_chunk: int = SINKHORN_CHUNK  # pairs per batched Sinkhorn run (0: pair by pair)


def run_method(
    method: str,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    ctx: Context,
    seeds: list[int],
    on_pair: Callable[[int], None] | None = None,
    trace: bool = True,
) -> MethodRun:
    """Align every stacked pair ``(a[i], b[i])`` with ``method``; ``seeds[i]`` seeds pair i's solver.

    Errors propagate (the caller records them); ``on_pair(done)`` is called as pairs finish.
    """
    chain = Chain.parse(method)
    sinkhorn = dict(ctx.sinkhorn)
    if not trace or ctx.trajectory_pairs == 0:
        sinkhorn.pop("trajectory_steps", None)
    run = run_chain(
        chain,
        a,
        b,
        ctx.spec,
        seeds=seeds,
        module=ctx.module,
        data=ctx.solver_data if chain.uses_data else None,
        aligner=ctx.aligner if chain.needs_aligner else None,
        options=ctx.options.get(method, {}),
        defaults={"sinkhorn": sinkhorn},
        chunks={"sinkhorn": ctx.sinkhorn_chunk},
        on_pair=on_pair,
    )
    last = [pair[-1] for pair in run.infos[: ctx.trajectory_pairs]]
    trajectories = [list(info["trajectory"]) for info in last if "trajectory" in info]
    return MethodRun(run.perm, run.seconds, run.timing, run.first_seconds, trajectories)


def warm_up(method: str, a: Mapping[str, Tensor], b: Mapping[str, Tensor], ctx: Context) -> None:
    """One untimed call on a single pair (Sinkhorn for one step), so lazy initialisation is not
    timed."""
    one_a, one_b = {k: v[:1] for k, v in a.items()}, {k: v[:1] for k, v in b.items()}
    short = dataclasses.replace(ctx, sinkhorn={**ctx.sinkhorn, "steps": 1})
    short = dataclasses.replace(
        short,
        options={m: {k: v for k, v in o.items() if k != "steps"} for m, o in ctx.options.items()},
    )
    run_method(method, one_a, one_b, short, [0], trace=False)


def identity_start(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], ctx: Context, seeds: list[int]
) -> list[list[tuple[int, Permutation]]]:
    """Sinkhorn started from the identity on the first ``ctx.trajectory_pairs`` pairs, with the
    ``sinkhorn`` method's options and the same pair seeds: its trajectories (for the start plot)."""
    t = min(ctx.trajectory_pairs, next(iter(a.values())).shape[0])
    if t == 0:
        return []
    method = "identity+sinkhorn"
    ctx = dataclasses.replace(ctx, options={method: dict(ctx.options.get("sinkhorn", {}))})
    part_a = {k: v[:t] for k, v in a.items()}
    part_b = {k: v[:t] for k, v in b.items()}
    return run_method(method, part_a, part_b, ctx, seeds[:t]).trajectories
