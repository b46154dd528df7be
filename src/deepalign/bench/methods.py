"""Run one alignment method on N stacked pairs: batched where the method allows, else pair by pair.

``identity`` and ``deepalign`` align all pairs in one call (Deep-Align: one forward pass per chunk
of pairs) and report the amortised time per pair. A chain that starts with one of them
(``deepalign+wm``, ``deepalign+sinkhorn``) reuses that batched answer as the ``init`` of the rest of
the chain, solved pair by pair through the solver registry; its time per pair is the amortised
batched time plus the pair's own solver time. Every other method goes through
:func:`deepalign.solvers.registry.align` pair by pair.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deepalign.core import permutation as P
from deepalign.core.functional import unstack_state
from deepalign.core.permutation import Permutation
from deepalign.core.spec import PermutationSpec
from deepalign.solvers.registry import align, resolve

BATCHED = ("identity", "deepalign")
ALIGNER_CHUNK = 64  # pairs per Deep-Align forward pass (bounds memory on wide networks)


@dataclass
class MethodRun:
    """Stacked permutations ``(N, n)`` per group, seconds per pair, and per-pair solver details."""

    perm: Permutation
    seconds: list[float]
    timing: str  # "per pair", "batched (amortised)", "batched (amortised) + per pair"
    batched_seconds: float = 0.0  # the amortised part of each pair's time
    trajectories: list[list[tuple[int, Permutation]]] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)


@dataclass
class Context:
    """Everything a method needs besides the pairs."""

    spec: PermutationSpec
    module: nn.Module
    solver_data: Any
    aligner: Any  # a loaded DeepAlign (or None when no deepalign method runs)
    options: Mapping[str, Mapping[str, Any]]  # per method name (as listed), extra solver options
    sinkhorn: Mapping[str, Any]  # options every sinkhorn part gets (steps, trajectory_steps, ...)
    trajectory_pairs: int = 0


def split_chain(method: str) -> tuple[str, str]:
    """``("deepalign", "sinkhorn")`` for ``deepalign+sinkhorn``; the head is batched when it can be."""
    parts = [p.strip() for p in method.split("+")]
    if parts[0] in BATCHED:
        return parts[0], "+".join(parts[1:])
    return "", "+".join(parts)


def _batched(
    head: str, a: Mapping[str, Tensor], b: Mapping[str, Tensor], ctx: Context
) -> Permutation:
    n = next(iter(a.values())).shape[0]
    if head == "identity":
        device = next(iter(a.values())).device
        return {g: p.expand(n, -1).clone() for g, p in P.identity(ctx.spec, device=device).items()}
    from deepalign.nn.aligner_method import align_batch

    chunks = []
    for s in range(0, n, ALIGNER_CHUNK):
        part_a = {k: v[s : s + ALIGNER_CHUNK] for k, v in a.items()}
        part_b = {k: v[s : s + ALIGNER_CHUNK] for k, v in b.items()}
        chunks.append(align_batch(ctx.aligner, part_a, part_b))
    return {
        g: torch.cat([c[g] for c in chunks]).to(next(iter(a.values())).device) for g in chunks[0]
    }


def warm_up(method: str, a: Mapping[str, Tensor], b: Mapping[str, Tensor], ctx: Context) -> None:
    """One untimed batched call on a single pair, so lazy initialisation is not timed."""
    head, _ = split_chain(method)
    if head == "deepalign":
        _batched(head, {k: v[:1] for k, v in a.items()}, {k: v[:1] for k, v in b.items()}, ctx)


def _solver_options(chain: str, method: str, ctx: Context, with_trajectory: bool) -> dict[str, Any]:
    parts = resolve(chain)
    names = [m.name for m in parts]
    opts: dict[str, Any] = {}
    if "sinkhorn" in names:
        opts.update(ctx.sinkhorn)
        if not with_trajectory:
            opts.pop("trajectory_steps", None)
    if any(n.startswith("deepalign") for n in names):
        opts["aligner"] = ctx.aligner
    opts.update(ctx.options.get(method, {}))
    if all(m.options is not None for m in parts):
        accepted = set().union(*[set(m.options or ()) for m in parts])
        user = set(ctx.options.get(method, {}))
        opts = {k: v for k, v in opts.items() if k in accepted or k in user}
    return opts


def _trajectory(info: Mapping[str, Any]) -> list[tuple[int, Permutation]] | None:
    if "trajectory" in info:
        return list(info["trajectory"])
    parts = info.get("parts") or []
    if parts and "trajectory" in parts[-1]:
        return list(parts[-1]["trajectory"])
    return None


def run_method(
    method: str,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    ctx: Context,
    seeds: list[int],
    on_pair: Callable[[int], None] | None = None,
) -> MethodRun:
    """Align every stacked pair ``(a[i], b[i])`` with ``method``; ``seeds[i]`` seeds pair i's solver.

    Errors propagate (the caller records them); ``on_pair(done)`` is called as pairs finish.
    """
    n = next(iter(a.values())).shape[0]
    head, rest = split_chain(method)
    init: Permutation | None = None
    amortised = 0.0
    if head:
        start = time.perf_counter()
        init = _batched(head, a, b, ctx)
        amortised = (time.perf_counter() - start) / n
        if not rest:
            if on_pair is not None:
                on_pair(n)
            return MethodRun(
                init, [amortised] * n, "batched (amortised)", amortised, iterations=[1] * n
            )
    uses_data = any(m.uses_data for m in resolve(rest))
    perms: list[Permutation] = []
    seconds: list[float] = []
    run = MethodRun({}, [], "per pair" if not head else "batched (amortised) + per pair", amortised)
    for i in range(n):
        with_traj = i < ctx.trajectory_pairs
        perm, info = align(
            unstack_state(a, i),
            unstack_state(b, i),
            ctx.spec,
            rest,
            module=ctx.module,
            data=ctx.solver_data if uses_data else None,
            init=None if init is None else {g: p[i] for g, p in init.items()},
            seed=seeds[i],
            **_solver_options(rest, method, ctx, with_traj),
        )
        perms.append(perm)
        seconds.append(amortised + float(info["seconds"]))
        run.iterations.append(int(info.get("iterations", 0)))
        traj = _trajectory(info) if with_traj else None
        if traj is not None:
            run.trajectories.append(traj)
        if on_pair is not None:
            on_pair(i + 1)
    run.perm = {g: torch.stack([p[g] for p in perms]) for g in perms[0]}
    run.seconds = seconds
    return run
