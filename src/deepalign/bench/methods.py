"""Run one alignment method on N stacked pairs: batched where the method allows, else pair by pair.

A method is split into up to three stages. A batched head (``identity``, ``deepalign``: all pairs
in one call, Deep-Align one forward pass per chunk of pairs); a middle solved pair by pair through
:func:`deepalign.solvers.registry.align` (``wm``, ``am``, ...); and a Sinkhorn tail solved
:data:`SINKHORN_CHUNK` pairs at a time by :func:`deepalign.solvers.sinkhorn.sinkhorn_batch` (each
pair with its own seed; the data order is shared within a chunk). Each stage starts from the
previous stage's answer. A pair's time is the sum of its stages' times: a batched stage counts the
amortised time (the call's seconds over its pairs), a per-pair stage the pair's own.
"""

from __future__ import annotations

import dataclasses
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
from deepalign.errors import DeepAlignError
from deepalign.solvers.registry import align, check_options, resolve
from deepalign.solvers.sinkhorn import sinkhorn_batch

BATCHED = ("identity", "deepalign")
ALIGNER_CHUNK = 64  # pairs per Deep-Align forward pass (bounds memory on wide networks)
SINKHORN_CHUNK = 32  # pairs per batched Sinkhorn run
BATCHED_KIND, PER_PAIR_KIND = "batched (amortised)", "per pair"


@dataclass
class MethodRun:
    """Stacked permutations ``(N, n)`` per group, seconds per pair, and per-pair solver details."""

    perm: Permutation
    seconds: list[float]
    timing: str  # each stage's kind joined by " + ", e.g. "per pair + batched (amortised)"
    first_seconds: float = 0.0  # a chain's first stage: mean seconds per pair (0: one stage)
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
    sinkhorn_chunk: int = SINKHORN_CHUNK  # pairs per batched Sinkhorn run (0: pair by pair)


def split_chain(method: str) -> tuple[str, str]:
    """``("deepalign", "sinkhorn")`` for ``deepalign+sinkhorn``; the head is batched when it can be."""
    parts = [p.strip() for p in method.split("+")]
    if parts[0] in BATCHED:
        return parts[0], "+".join(parts[1:])
    return "", "+".join(parts)


def _batched(
    head: str, a: Mapping[str, Tensor], b: Mapping[str, Tensor], ctx: Context
) -> tuple[Permutation, dict[str, Tensor] | None]:
    """The head's permutations and, for Deep-Align, its similarities (a next Sinkhorn's start)."""
    n = next(iter(a.values())).shape[0]
    device = next(iter(a.values())).device
    if head == "identity":
        perm = P.identity(ctx.spec, device=device)
        return {g: p.expand(n, -1).clone() for g, p in perm.items()}, None
    from deepalign.nn.aligner_method import align_batch_with_similarities

    chunks = []
    for s in range(0, n, ALIGNER_CHUNK):
        part_a = {k: v[s : s + ALIGNER_CHUNK] for k, v in a.items()}
        part_b = {k: v[s : s + ALIGNER_CHUNK] for k, v in b.items()}
        chunks.append(align_batch_with_similarities(ctx.aligner, part_a, part_b))
    groups = chunks[0][0]
    perm = {g: torch.cat([c[0][g] for c in chunks]).to(device) for g in groups}
    return perm, {g: torch.cat([c[1][g] for c in chunks]).to(device) for g in groups}


def split_tail(rest: str, ctx: Context) -> tuple[str, str]:
    """``("wm", "sinkhorn")`` for ``wm+sinkhorn``: a final Sinkhorn runs batched (when chunks are on)."""
    parts = [p.strip() for p in rest.split("+")] if rest else []
    if parts and parts[-1] == "sinkhorn" and ctx.sinkhorn_chunk > 0:
        return "+".join(parts[:-1]), "sinkhorn"
    return rest, ""


def warm_up(method: str, a: Mapping[str, Tensor], b: Mapping[str, Tensor], ctx: Context) -> None:
    """One untimed batched call on a single pair, so lazy initialisation is not timed."""
    head, rest = split_chain(method)
    one_a, one_b = {k: v[:1] for k, v in a.items()}, {k: v[:1] for k, v in b.items()}
    if head == "deepalign":
        _batched(head, one_a, one_b, ctx)
    if split_tail(rest, ctx)[1]:
        opts = _solver_options("sinkhorn", method, ctx, with_trajectory=False)
        _sinkhorn_chunk(one_a, one_b, ctx, [0], None, None, {**opts, "steps": 1})


def _check_options(rest: str, method: str, ctx: Context) -> None:
    """The user's options for ``method`` must suit some part of its solved chain ``rest``."""
    try:
        check_options(rest, ctx.options.get(method, {}))
    except DeepAlignError as exc:  # name the method as the user wrote it
        raise DeepAlignError(str(exc).replace(f"method {rest!r}", f"method {method!r}")) from None


def _solver_options(chain: str, method: str, ctx: Context, with_trajectory: bool) -> dict[str, Any]:
    """The options ``chain`` (a stage of ``method``) gets: the bench's Sinkhorn settings, the
    aligner, and the user's options for ``method``, each only where a part of ``chain`` takes it."""
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
        opts = {k: v for k, v in opts.items() if k in accepted}
    return opts


def _trajectory(info: Mapping[str, Any]) -> list[tuple[int, Permutation]] | None:
    if "trajectory" in info:
        return list(info["trajectory"])
    parts = info.get("parts") or []
    if parts and "trajectory" in parts[-1]:
        return list(parts[-1]["trajectory"])
    return None


def _sinkhorn_chunk(
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    ctx: Context,
    seeds: list[int],
    init: Permutation | None,
    init_scores: Mapping[str, Tensor] | None,
    opts: Mapping[str, Any],
) -> tuple[Permutation, dict[str, Any]]:
    """One batched Sinkhorn run; its data order is seeded by its first pair's seed."""
    return sinkhorn_batch(
        a,
        b,
        ctx.spec,
        module=ctx.module,
        data=ctx.solver_data,
        init=init,
        init_scores=init_scores,
        seed=seeds[0],
        pair_seeds=seeds,
        **opts,
    )


@dataclass
class _Stage:
    """One stage's answer for all pairs."""

    perm: Permutation
    seconds: list[float]
    iterations: list[int]
    trajectories: list[list[tuple[int, Permutation]]]


def _per_pair_stage(
    chain: str,
    method: str,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    ctx: Context,
    seeds: list[int],
    init: Permutation | None,
    init_scores: Mapping[str, Tensor] | None,
    tell: Callable[[int], None],
) -> _Stage:
    parts = resolve(chain)
    uses_data = any(m.uses_data for m in parts)
    soft = init_scores is not None and "init_scores" in (parts[0].options or ())
    n = next(iter(a.values())).shape[0]
    out = _Stage({}, [], [], [])
    perms: list[Permutation] = []
    for i in range(n):
        with_traj = i < ctx.trajectory_pairs
        perm, info = align(
            unstack_state(a, i),
            unstack_state(b, i),
            ctx.spec,
            chain,
            module=ctx.module,
            data=ctx.solver_data if uses_data else None,
            init=None if init is None else {g: p[i] for g, p in init.items()},
            seed=seeds[i],
            **_solver_options(chain, method, ctx, with_traj),
            **({"init_scores": {g: q[i] for g, q in init_scores.items()}} if soft else {}),
        )
        perms.append(perm)
        out.seconds.append(float(info["seconds"]))
        out.iterations.append(int(info.get("iterations", 0)))
        traj = _trajectory(info) if with_traj else None
        if traj is not None:
            out.trajectories.append(traj)
        tell(i + 1)
    out.perm = {g: torch.stack([p[g] for p in perms]) for g in perms[0]}
    return out


def _sinkhorn_stage(
    method: str,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    ctx: Context,
    seeds: list[int],
    init: Permutation | None,
    init_scores: Mapping[str, Tensor] | None,
    tell: Callable[[int], None],
) -> _Stage:
    n = next(iter(a.values())).shape[0]
    out = _Stage({}, [], [], [])
    chunks: list[Permutation] = []
    for s in range(0, n, ctx.sinkhorn_chunk):
        e = min(n, s + ctx.sinkhorn_chunk)
        traced = max(0, min(e, ctx.trajectory_pairs) - s)
        opts = _solver_options("sinkhorn", method, ctx, with_trajectory=traced > 0)
        start = time.perf_counter()
        perm, info = _sinkhorn_chunk(
            {k: v[s:e] for k, v in a.items()},
            {k: v[s:e] for k, v in b.items()},
            ctx,
            seeds[s:e],
            None if init is None else {g: p[s:e] for g, p in init.items()},
            None if init_scores is None else {g: q[s:e] for g, q in init_scores.items()},
            opts,
        )
        out.seconds += [(time.perf_counter() - start) / (e - s)] * (e - s)
        out.iterations += [int(info["iterations"])] * (e - s)
        for i in range(traced):
            out.trajectories.append(
                [(step, {g: p[i] for g, p in pm.items()}) for step, pm in info["trajectory"]]
            )
        chunks.append(perm)
        tell(e)
    out.perm = {g: torch.cat([c[g] for c in chunks]) for g in chunks[0]}
    return out


def run_method(
    method: str,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    ctx: Context,
    seeds: list[int],
    on_pair: Callable[[int], None] | None = None,
) -> MethodRun:
    """Align every stacked pair ``(a[i], b[i])`` with ``method``; ``seeds[i]`` seeds pair i's solver.

    Errors propagate (the caller records them); ``on_pair(done)`` is called as pairs finish (a
    chain of several stages reports each stage's share of the pairs).
    """
    n = next(iter(a.values())).shape[0]
    head, rest = split_chain(method)
    middle, tail = split_tail(rest, ctx)
    if rest:
        _check_options(rest, method, ctx)
    n_stages = sum(bool(x) for x in (head, middle, tail))
    kinds: list[str] = []
    stage_seconds: list[list[float]] = []
    iterations = [0] * n
    trajectories: list[list[tuple[int, Permutation]]] = []
    init: Permutation | None = None
    scores: dict[str, Tensor] | None = None  # the head's soft answer, for a Sinkhorn right after it

    def teller(stage: int) -> Callable[[int], None]:
        def tell(done: int) -> None:
            if on_pair is not None:
                on_pair((stage * n + done) // n_stages)

        return tell

    if head:
        start = time.perf_counter()
        init, scores = _batched(head, a, b, ctx)
        stage_seconds.append([(time.perf_counter() - start) / n] * n)
        kinds.append(BATCHED_KIND)
        teller(0)(n)
    for chain, batched in ((middle, False), (tail, True)):
        if not chain:
            continue
        tell = teller(len(kinds))
        if batched:
            stage = _sinkhorn_stage(method, a, b, ctx, seeds, init, scores, tell)
        else:
            stage = _per_pair_stage(chain, method, a, b, ctx, seeds, init, scores, tell)
        init, scores = stage.perm, None
        stage_seconds.append(stage.seconds)
        kinds.append(BATCHED_KIND if batched else PER_PAIR_KIND)
        iterations = [i + j for i, j in zip(iterations, stage.iterations, strict=True)]
        trajectories = stage.trajectories  # the last solver's trajectory (Sinkhorn's)
    assert init is not None
    seconds = [sum(col) for col in zip(*stage_seconds, strict=True)]
    first = sum(stage_seconds[0]) / n if len(stage_seconds) > 1 else 0.0
    if head and not rest:
        iterations = [1] * n
    return MethodRun(init, seconds, " + ".join(kinds), first, trajectories, iterations)


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
