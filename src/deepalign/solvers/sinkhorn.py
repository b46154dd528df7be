"""Sinkhorn re-basin (Peña et al., CVPR 2023): learn soft permutations by gradient descent.

Each group gets a free score matrix ``S``; ``exp(log_sinkhorn(S / tau))`` is a doubly-stochastic
(soft) permutation, applied to B with :func:`deepalign.core.permutation.apply_soft`. Adam minimises
either the L2 distance to A (``loss="l2"``, data-free) or the task loss of ``(1 - lam) * A + lam *
P(B)`` at a random ``lam`` per step on data batches (``loss="task"``, Peña's ``C_Rnd``). The answer
is the linear assignment of each ``S`` (the same as of the soft permutation: Sinkhorn's row and column
scalings do not change which assignment is best). An ``init`` permutation starts the scores on it, so
``wm+sinkhorn`` and ``deepalign+sinkhorn`` refine those answers.

:func:`sinkhorn_batch` solves N independent pairs in one run (every tensor has a leading N; the
loss is the sum over pairs, so each pair's gradients are its own); the registered per-pair solver
is its N = 1 case. Speed comes from three things: groups of equal size are one stacked score
tensor, so one Sinkhorn call per size serves every group and every pair; the Sinkhorn iterations
run on row and column scaling vectors with a hand-written backward (:func:`sinkhorn_matrices`,
the same function as the unrolled log-domain loop); and the task loss is one vmapped forward of
all merged networks (:func:`deepalign.core.functional.batched_forward`).

Randomness: pair ``i``'s score noise and its ``lam`` draws come from its own generator (seeded by
``pair_seeds[i]``); the data batches, shared by all pairs, come from a generator seeded by
``seed``. A pair's answer is therefore the same alone or in a batch.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from deepalign.core import permutation as P
from deepalign.core.functional import batched_forward, untied
from deepalign.core.permutation import Permutation, apply_soft
from deepalign.core.seeds import derive_seed
from deepalign.core.spec import PermutationSpec, StateDict
from deepalign.data.batches import labelled_batches
from deepalign.errors import DeepAlignError
from deepalign.solvers.assignment import block_assignment, linear_assignment, log_sinkhorn
from deepalign.solvers.method import Method, Options
from deepalign.solvers.objective import cost_keys

LOSSES = ("l2", "task", "output")
# Largest spread (max - min) of one score matrix that the scaling-vector Sinkhorn takes in each
# compute dtype: beyond it exp(-spread) and the scalings could leave the dtype's range, and the
# log-domain loop runs instead.
SAFE_SPREAD = {torch.float64: 200.0, torch.float32: 30.0}


# -- Sinkhorn on scaling vectors -----------------------------------------------------------------
class _ScaledSinkhorn(torch.autograd.Function):
    """``exp(log_sinkhorn(x, iters))`` as ``diag(r) K diag(c)`` with ``K = exp(x - max x)``.

    Log-domain Sinkhorn only ever adds a row vector and a column vector to ``x``, so it is the same
    as updating the scalings ``c = 1 / K^T r`` (columns) and ``r = 1 / K c`` (rows): one
    matrix-vector product per half-step instead of a log-sum-exp over the whole matrix. The
    backward unrolls the same iterations by hand (matrix-vector products, then one matrix product
    for the gradient of ``K``), so the gradient is that of the unrolled loop; only ``K`` and the
    vectors are kept. Vectors are rows ``(..., 1, n)``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, iters: int, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        n = x.shape[-1]
        xd = x.detach().to(dtype).reshape(-1, n, n)  # bmm: the fastest product at every size here
        k = (xd - xd.amax(dim=(-2, -1), keepdim=True)).exp()
        kt = k.mT.contiguous()
        r = torch.ones_like(k[:, :1, :])
        rs, cs = [r], []
        for _ in range(iters):
            c = torch.bmm(r, k).reciprocal_()  # c_j = 1 / sum_i r_i K_ij
            r = torch.bmm(c, kt).reciprocal_()  # r_i = 1 / sum_j K_ij c_j
            cs.append(c)
            rs.append(r)
        ctx.save_for_backward(k, kt, torch.cat(rs, -2), torch.cat(cs, -2))
        ctx.out_dtype = x.dtype
        return (r.mT * k * c).to(x.dtype).reshape(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        k, kt, rs, cs = ctx.saved_tensors  # rs (B, T + 1, n), cs (B, T, n): rows per iteration
        iters = cs.shape[-2]
        g = grad.to(k.dtype).reshape(k.shape)
        r2, c2 = rs.square().split(1, -2), cs.square().split(1, -2)
        r, c = rs[:, -1:], cs[:, -1:]
        h = g * k
        dk = g * r.mT * c  # the output is r_i K_ij c_j
        s = -torch.bmm(c, h.mT)  # minus the gradient of the last r
        g_c = torch.bmm(r, h)  # the gradient of the last c
        ss, qs = [], []
        for t in range(iters - 1, -1, -1):
            s = s * r2[t + 1]  # r_{t+1} = 1 / (c_t K^T): minus the gradient at its input
            g_c = g_c + torch.bmm(s, k) if t == iters - 1 else torch.bmm(s, k)
            q = g_c * c2[t]  # c_t = 1 / (r_t K): minus the gradient at its input
            ss.append(s)
            qs.append(q)
            if t:
                s = torch.bmm(q, kt)  # minus the gradient of r_t
        # dL/dK gains sum_t (s_t^T c_t - r_t^T q_t), the inputs' outer products
        left = torch.cat([*reversed(ss), rs[:, :iters]], -2)
        right = torch.cat([cs, *(-q for q in reversed(qs))], -2)
        dk = dk + torch.bmm(left.mT, right)
        return (dk * k).to(ctx.out_dtype).reshape(grad.shape), None, None


def head_matrices(scores: Tensor, heads: Tensor, tau: float, iters: int) -> Tensor:
    """Soft permutations of a structured group (attention heads): ``P[(i, a), (k, b)] =
    heads[i, k] * T_ik[a, b]`` with ``T_ik`` the Sinkhorn of the ``(i, k)`` block of ``scores``.

    Doubly stochastic whenever ``heads`` is, and a hard permutation of the allowed form when both
    are hard. ``scores`` is ``(..., n, n)``, ``heads`` ``(..., H, H)``.
    """
    n, h = scores.shape[-1], heads.shape[-1]
    d = n // h
    blocks = scores.unflatten(-1, (h, d)).unflatten(-3, (h, d)).transpose(-3, -2)
    within = sinkhorn_matrices(blocks / tau, iters)
    return (heads[..., None, None] * within).transpose(-3, -2).flatten(-2).flatten(-3, -2)


def sinkhorn_matrices(x: Tensor, iters: int = 20) -> Tensor:
    """``log_sinkhorn(x, iters).exp()`` (batched over leading dims), computed on scaling vectors.

    Same function and gradient as the unrolled log-domain loop, to rounding. Runs in float32 when
    every matrix's spread of values (max - min) is at most ``SAFE_SPREAD[float32]``, else in
    float64 (not on MPS), else falls back to the log-domain loop.
    """
    spread = float((x.detach().amax(dim=(-2, -1)) - x.detach().amin(dim=(-2, -1))).max())
    if not math.isfinite(spread) or iters < 1:
        return log_sinkhorn(x, iters).exp()
    for dtype in (torch.float32, torch.float64):
        if spread <= SAFE_SPREAD[dtype] and not (dtype == torch.float64 and x.device.type == "mps"):
            return _ScaledSinkhorn.apply(x, iters, dtype)
    return log_sinkhorn(x, iters).exp()


# -- the solver ------------------------------------------------------------------------------------
def _forever(data: Any, batch_size: int, gen: torch.Generator, device: torch.device) -> Iterator:
    for _ in itertools.count():
        got = False
        for batch in labelled_batches(data, batch_size, generator=gen, shuffle=True, device=device):
            got = True
            yield batch
        if not got:
            raise DeepAlignError("sinkhorn: the data set is empty")


def _buckets(spec: PermutationSpec) -> list[list[str]]:
    """Group names by size, in the spec's order (one stacked score tensor per size)."""
    by_size: dict[int, list[str]] = {}
    for g, n in spec.groups.items():
        by_size.setdefault(n, []).append(g)
    return list(by_size.values())


def _check_batch(
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    spec: PermutationSpec,
    init: Mapping[str, Tensor] | None,
    pair_seeds: Sequence[int] | None,
    init_scores: Mapping[str, Tensor] | None = None,
) -> int:
    spec.check(a, where="A", batch_dims=1)
    spec.check(b, where="B", batch_dims=1)
    sizes = {int(v.shape[0]) for v in a.values()} | {int(v.shape[0]) for v in b.values()}
    if len(sizes) != 1:
        raise DeepAlignError(f"sinkhorn: A and B must stack the same number of pairs, got {sizes}")
    n = sizes.pop()
    if init is not None:
        if set(init) != set(spec.groups):
            raise DeepAlignError(
                f"init permutation groups {sorted(init)} do not match the architecture's "
                f"{sorted(spec.groups)}"
            )
        for g, p in init.items():
            if tuple(p.shape) != (n, spec.groups[g]) or not P.is_permutation(p):
                raise DeepAlignError(
                    f"init for group {g!r} must hold {n} permutations of {spec.groups[g]}"
                )
    if init_scores is not None:
        if not isinstance(init_scores, Mapping) or set(init_scores) != set(spec.groups):
            raise DeepAlignError(
                f"init_scores must map the architecture's groups {sorted(spec.groups)} to score "
                "matrices"
            )
        for g, q in init_scores.items():
            size = spec.groups[g]
            if tuple(q.shape) != (n, size, size) or not bool(torch.isfinite(q).all()):
                raise DeepAlignError(
                    f"init_scores for group {g!r} must be {n} finite {size}x{size} matrices"
                )
    if pair_seeds is not None and len(pair_seeds) != n:
        raise DeepAlignError(f"sinkhorn: {len(pair_seeds)} pair seeds for {n} pairs")
    return n


DEFAULT_INIT_SCALE = 1.0  # a hard init's prior (see sinkhorn_rebasin)
DEFAULT_SOFT_INIT_SCALE = 4.0  # the multiplier of soft init_scores, e.g. Deep-Align's cosines


@dataclass(frozen=True)
class SinkhornOptions(Options):
    """Sinkhorn re-basin's options, shared by :func:`sinkhorn_batch` and :func:`sinkhorn_rebasin`.

    ``loss``: ``"task"`` (default when data is given: cross-entropy of the merged network at a
    random ``lam`` per step), ``"output"`` (mean squared distance of the merged network's outputs
    to the same interpolation of the two end networks' outputs: any network, labels unused, e.g.
    INRs) or ``"l2"`` (data-free); ``l2_weight`` adds that many times the L2 term (mean squared
    difference per tensor, summed) to a data loss. ``steps`` of Adam at ``lr`` on the scores,
    ``sinkhorn_iters`` projections at temperature ``tau``; ``batch_size`` examples per step, a new
    batch each step (``fixed_batch``: the first one every step); ``noise``: size of the seeded
    noise the scores start from (no ``init``).
    ``init_scale``: with ``init``, the score added to its entries (default
    :data:`DEFAULT_INIT_SCALE`: a mild prior the optimisation can leave); with ``init_scores``,
    their multiplier (default :data:`DEFAULT_SOFT_INIT_SCALE`). ``trajectory_steps``: steps (0 =
    before any update) at which the hard permutation is recorded in ``info["trajectory"]``.
    The defaults were chosen on validation pairs (``docs/benchmarks.md``).
    """

    solver: ClassVar[str] = "sinkhorn"
    loss: str | None = None
    steps: int = 200
    lr: float = 0.1
    tau: float = 1.0
    sinkhorn_iters: int = 20
    batch_size: int = 128
    init_scale: float | None = None
    noise: float = 0.01
    trajectory_steps: Sequence[int] | None = None
    fixed_batch: bool = False
    l2_weight: float = 0.0


@dataclass(frozen=True)
class PaperSinkhornOptions(SinkhornOptions):
    """The official Deep-Align code's Sinkhorn baseline (``CLFBatchSinkhorn``): one fixed batch of
    32 examples, the task loss plus the L2 distance, Adam at 5e-2 for 1,000 steps."""

    solver: ClassVar[str] = "sinkhorn-paper"
    steps: int = 1000
    lr: float = 0.05
    batch_size: int = 32
    fixed_batch: bool = True
    l2_weight: float = 1.0


def sinkhorn_batch(
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    spec: PermutationSpec,
    *,
    module: nn.Module | None = None,
    data: Any = None,
    init: Permutation | None = None,
    seed: int = 0,
    pair_seeds: Sequence[int] | None = None,
    init_scores: Mapping[str, Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
    defaults: type[SinkhornOptions] = SinkhornOptions,
    **options: Any,
) -> tuple[Permutation, dict[str, Any]]:
    """Sinkhorn re-basin of N stacked pairs ``(a[i], b[i])`` at once; permutations come back ``(N, n)``.

    ``init``: ``(N, n)`` permutations per group; ``init_scores``: ``(N, n, n)`` soft starts per
    group (e.g. Deep-Align's cosine similarities), which replace ``init``'s prior and the noise.
    ``seed`` seeds the data order shared by all pairs, ``pair_seeds[i]`` (default ``seed + i``) pair
    i's score noise and ``lam`` draws, so a pair gets the same answer alone as in a batch (with the
    same ``seed``). ``options`` are :class:`SinkhornOptions` (``defaults``: the class whose
    defaults fill the rest, e.g. :class:`PaperSinkhornOptions`). ``info``: ``iterations``, ``loss``,
    ``loss_history`` (one list of per-step losses per pair), ``solver_seconds`` (the whole batch),
    ``pairs``, and with ``trajectory_steps`` a ``trajectory`` of ``(step, perm)`` with ``(N, n)``
    permutations.
    """
    o = defaults.make(**options)
    loss, steps, lr, tau = o.loss, o.steps, o.lr, o.tau
    sinkhorn_iters, batch_size, init_scale, noise = (
        o.sinkhorn_iters,
        o.batch_size,
        o.init_scale,
        o.noise,
    )
    trajectory_steps = o.trajectory_steps
    loss = loss or ("task" if data is not None else "l2")
    if loss not in LOSSES:
        raise DeepAlignError(f"sinkhorn: unknown loss {loss!r} (choose from {', '.join(LOSSES)})")
    if loss in ("task", "output") and (data is None or module is None):
        raise DeepAlignError(
            "sinkhorn: loss 'task' needs data and the model's architecture (data=..., module=...)"
        )
    if steps < 0 or tau <= 0 or lr <= 0 or sinkhorn_iters < 1 or noise < 0:
        raise DeepAlignError(
            "sinkhorn: steps >= 0, tau > 0, lr > 0, sinkhorn_iters >= 1 and noise >= 0 needed"
        )
    n_pairs = _check_batch(a, b, spec, init, pair_seeds, init_scores)
    seeds = [seed + i for i in range(n_pairs)] if pair_seeds is None else list(pair_seeds)
    device = next(iter(a.values())).device
    dtype = next(t for t in a.values() if t.is_floating_point()).dtype
    buckets = _buckets(spec)

    # per-pair randomness: score noise (group by group), then the lam of every step
    noise_rows: list[dict[str, Tensor]] = []
    lam_rows: list[Tensor] = []
    for i, s in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(s))
        row = {}
        for g, n in spec.groups.items():
            m = noise * torch.randn(n, n, generator=gen, dtype=torch.float32)
            if init_scores is not None:  # a soft start replaces init's prior and the noise
                scale = DEFAULT_SOFT_INIT_SCALE if init_scale is None else init_scale
                m = scale * init_scores[g][i].detach().float().cpu()
            elif init is not None:
                scale = DEFAULT_INIT_SCALE if init_scale is None else init_scale
                m[torch.arange(n), init[g][i].cpu()] += scale
            row[g] = m
        noise_rows.append(row)
        if loss != "l2":
            lam_rows.append(torch.rand(steps, generator=gen, dtype=torch.float64))
    scores = [
        torch.stack([torch.stack([r[g] for g in names]) for r in noise_rows])
        .to(device)
        .requires_grad_(True)
        for names in buckets
    ]  # one (N, groups, n, n) tensor per group size
    del noise_rows
    adam = _Adam(scores, lr)

    def by_group() -> dict[str, Tensor]:
        return {
            g: s[:, j]
            for names, s in zip(buckets, scores, strict=True)
            for j, g in enumerate(names)
        }

    def hard() -> Permutation:
        out = {}
        for names, s in zip(buckets, scores, strict=True):
            p = linear_assignment(s.detach())
            out.update({g: p[:, j].to(device) for j, g in enumerate(names)})
        now = by_group()
        for h, members in spec.ties().items():  # heads: the best structured assignment
            out.update({g: out[g].clone() for g in (h, *members)})
            for i in range(n_pairs):
                order, perms, _ = block_assignment(
                    [now[g][i].detach() for g in members], spec.groups[h], now[h][i].detach()
                )
                out[h][i] = order.to(device)
                for g, q in zip(members, perms, strict=True):
                    out[g][i] = q.to(device)
        return out

    want = sorted({int(s) for s in (trajectory_steps or ()) if 0 <= int(s) <= steps})
    trajectory: list[tuple[int, Permutation]] = []
    history: list[Tensor] = []
    l2_keys = cost_keys(spec, a)
    if loss == "l2":
        a_used, b_used = {k: a[k] for k in l2_keys}, {k: b[k] for k in l2_keys}
    else:
        a_used, b_used = dict(a), dict(b)
        lams = torch.stack(lam_rows).to(device=device, dtype=dtype)  # (N, steps)
        dims = {v.dim() for v in a.values()}
        net = copy.deepcopy(module).to(device).eval()
        # running statistics (BatchNorm) are buffers: moved with the soft permutation, never
        # differentiated (the normalisation ops take them as constants)
        buffers = {name for name, _ in net.named_buffers()}
        data_gen = torch.Generator().manual_seed(derive_seed(seed, "sinkhorn-data"))
        batches = _forever(data, batch_size, data_gen, device)
        if o.fixed_batch:
            batches = itertools.repeat(next(batches))
    start = time.perf_counter()
    for step in range(steps + 1):
        if want and step == want[0]:
            trajectory.append((step, hard()))
            want.pop(0)
        if step == steps:
            break
        mats: dict[str, Tensor] = {}
        for names, s in zip(buckets, scores, strict=True):
            m = sinkhorn_matrices(s / tau, sinkhorn_iters).to(dtype)
            mats.update({g: m[:, j] for j, g in enumerate(names)})
        if spec.heads:
            now = by_group()
            for g, h in spec.heads.items():
                mats[g] = head_matrices(now[g], mats[h], tau, sinkhorn_iters).to(dtype)
        soft = apply_soft(spec, mats, b_used, batch_dims=1)
        if loss == "l2":
            per_pair = sum(((a_used[k] - soft[k]) ** 2).reshape(n_pairs, -1).sum(1) for k in a_used)
        else:
            x, y = next(batches)
            if y is None and loss == "task":
                raise DeepAlignError("sinkhorn: loss 'task' needs labelled data")
            lam = lams[:, step]
            shaped = {d: lam.reshape(-1, *([1] * (d - 1))) for d in dims}
            merged = {  # (1 - lam) * a + lam * P(b), pair by pair
                k: torch.lerp(v, soft[k], shaped[v.dim()]) if v.is_floating_point() else v
                for k, v in a_used.items()
            }
            merged = {k: v.detach() if k in buffers else v for k, v in merged.items()}
            out = _forward(net, merged, x, n_pairs)
            if loss == "task":
                flat = F.cross_entropy(  # class axis last: images or token sequences
                    out.reshape(-1, out.shape[-1]),
                    y.expand(n_pairs, *y.shape).reshape(-1),
                    reduction="none",
                )
                per_pair = flat.reshape(n_pairs, -1).mean(1)
            else:
                with torch.no_grad():
                    ends = [_forward(net, s, x, n_pairs) for s in (a_used, b_used)]
                    goal = torch.lerp(ends[0], ends[1], lam.reshape(-1, *[1] * (out.dim() - 1)))
                per_pair = ((out - goal) ** 2).flatten(1).mean(1)
            if o.l2_weight:
                per_pair = per_pair + o.l2_weight * sum(
                    ((a[k] - soft[k]) ** 2).flatten(1).mean(1) for k in l2_keys
                )
        adam.step(torch.autograd.grad(per_pair.sum(), scores))
        history.append(per_pair.detach())
        if progress is not None:
            progress(step + 1, steps)
    perm = hard()
    hist = torch.stack(history, 1).cpu() if history else torch.zeros(n_pairs, 0)
    info: dict[str, Any] = {
        "iterations": steps,
        "loss": loss,
        "loss_history": hist.tolist(),
        "solver_seconds": time.perf_counter() - start,
        "pairs": n_pairs,
    }
    if trajectory_steps is not None:
        info["trajectory"] = trajectory
    return perm, info


class _Adam:
    """Adam (PyTorch's defaults, no weight decay) updating ``params`` in place.

    The same update as ``torch.optim.Adam``, without its per-step bookkeeping (which costs more
    than the update on these small tensors).
    """

    def __init__(
        self, params: list[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999)
    ) -> None:
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, 1e-8, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        self.t += 1
        b1, b2 = self.betas
        size = self.lr / (1 - b1**self.t)
        root = (1 - b2**self.t) ** 0.5
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / root).add_(self.eps), value=-size)


def _forward(net: nn.Module, stacked: Mapping[str, Tensor], x: Tensor, n_pairs: int) -> Tensor:
    """``batched_forward``; one pair skips ``vmap`` (the same result, without vmap's overhead)."""
    if n_pairs == 1:
        one = {k: v[0] for k, v in untied(net, stacked).items()}
        return functional_call(net, one, (x,)).unsqueeze(0)
    return batched_forward(net, stacked, x)


def pair_info(info: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Pair ``i``'s part of a :func:`sinkhorn_batch` info, shaped as the per-pair solver's info."""
    out = {k: v for k, v in info.items() if k not in ("loss_history", "trajectory", "pairs")}
    out["loss_history"] = list(info["loss_history"][i])
    if "trajectory" in info:
        out["trajectory"] = [
            (s, {g: p[i] for g, p in perm.items()}) for s, perm in info["trajectory"]
        ]
    return out


def sinkhorn_rebasin(
    a: StateDict,
    b: StateDict,
    spec: PermutationSpec,
    *,
    module: nn.Module | None = None,
    data: Any = None,
    init: Permutation | None = None,
    seed: int = 0,
    init_scores: Mapping[str, Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
    defaults: type[SinkhornOptions] = SinkhornOptions,
    **options: Any,
) -> tuple[Permutation, dict[str, Any]]:
    """Sinkhorn re-basin of one pair; ``loss`` defaults to "task" when ``data`` is given, else "l2".

    ``init`` starts the scores on a permutation (a mild prior, so the optimisation starts there yet
    can leave it); without it they start near uniform. ``init_scores`` (``{group: (n, n)}``, e.g.
    Deep-Align's cosine similarities, which ``deepalign+sinkhorn`` hands on) is a soft start
    instead. ``options`` are :class:`SinkhornOptions`; ``info["loss_history"]`` has the loss of
    every step. The same as :func:`sinkhorn_batch` on the one pair with ``pair_seeds=[seed]``.
    """
    perm, info = sinkhorn_batch(
        {k: v.unsqueeze(0) for k, v in a.items()},
        {k: v.unsqueeze(0) for k, v in b.items()},
        spec,
        module=module,
        data=data,
        init=None if init is None else {g: p.unsqueeze(0) for g, p in init.items()},
        seed=seed,
        pair_seeds=[seed],
        init_scores=None
        if init_scores is None
        else {g: q.unsqueeze(0) for g, q in init_scores.items()},
        progress=progress,
        defaults=defaults,
        **options,
    )
    return {g: p[0] for g, p in perm.items()}, pair_info(info, 0)


def _solve_batch(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], spec: PermutationSpec, **kw: Any
) -> tuple[Permutation, list[dict[str, Any]]]:
    perm, info = sinkhorn_batch(a, b, spec, **kw)
    return perm, [pair_info(info, i) for i in range(info["pairs"])]


SINKHORN_CHUNK = 32  # pairs per batched run when a chain aligns many pairs

METHOD = Method(
    "sinkhorn",
    sinkhorn_rebasin,
    options=SinkhornOptions,
    solve_batch=_solve_batch,
    batch_chunk=SINKHORN_CHUNK,
    uses_data=True,
    takes_scores=True,
    reports_progress=True,
    help="Sinkhorn re-basin: learned soft permutations, L2 or task loss",
)

PAPER_METHOD = Method(
    "sinkhorn-paper",
    functools.partial(sinkhorn_rebasin, defaults=PaperSinkhornOptions),
    options=PaperSinkhornOptions,
    solve_batch=functools.partial(_solve_batch, defaults=PaperSinkhornOptions),
    batch_chunk=SINKHORN_CHUNK,
    uses_data=True,
    takes_scores=True,
    reports_progress=True,
    help="Sinkhorn with the official Deep-Align code's settings (fixed batch of 32, task + L2, "
    "lr 5e-2, 1,000 steps)",
)
