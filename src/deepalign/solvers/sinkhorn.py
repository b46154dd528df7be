"""Sinkhorn re-basin (Peña et al., CVPR 2023): learn soft permutations by gradient descent.

Each group gets a free score matrix ``S``; ``exp(log_sinkhorn(S / tau))`` is a doubly-stochastic
(soft) permutation, applied to B with :func:`deepalign.core.permutation.apply_soft`. Adam minimises
either the L2 distance to A (``loss="l2"``, data-free) or the task loss of ``(1 - lam) * A + lam *
P(B)`` at a random ``lam`` per step on data batches (``loss="task"``, Peña's ``C_Rnd``). The answer
is the linear assignment of each ``S`` (the same as of the soft permutation: Sinkhorn's row and column
scalings do not change which assignment is best). An ``init`` permutation starts the scores on it, so
``wm+sinkhorn`` and ``deepalign+sinkhorn`` refine those answers.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from deepalign.core.permutation import Permutation, apply_soft
from deepalign.core.spec import PermutationSpec, StateDict
from deepalign.errors import DeepAlignError
from deepalign.lmc.batches import labelled_batches
from deepalign.solvers.assignment import linear_assignment, log_sinkhorn
from deepalign.solvers.objective import cost_keys
from deepalign.solvers.registry import register

LOSSES = ("l2", "task")


def _hard(scores: dict[str, Tensor]) -> Permutation:
    return {g: linear_assignment(s.detach()) for g, s in scores.items()}


def _forever(data: Any, batch_size: int, gen: torch.Generator, device: torch.device) -> Iterator:
    for _ in itertools.count():
        got = False
        for batch in labelled_batches(data, batch_size, generator=gen, shuffle=True, device=device):
            got = True
            yield batch
        if not got:
            raise DeepAlignError("sinkhorn: the data set is empty")


@register("sinkhorn", needs_data=False, uses_data=True)
def sinkhorn_rebasin(
    a: StateDict,
    b: StateDict,
    spec: PermutationSpec,
    *,
    module: nn.Module | None = None,
    data: Any = None,
    init: Permutation | None = None,
    seed: int = 0,
    loss: str | None = None,
    steps: int = 200,
    lr: float = 0.1,
    tau: float = 1.0,
    sinkhorn_iters: int = 20,
    batch_size: int = 128,
    init_scale: float | None = None,
    noise: float = 0.01,
    trajectory_steps: Sequence[int] | None = None,
) -> tuple[Permutation, dict[str, Any]]:
    """Sinkhorn re-basin; ``loss`` defaults to "task" when ``data`` is given, else "l2".

    ``init_scale`` (default ``log(n) + 2`` per group) is the score given to the ``init`` entries,
    enough for the soft permutation to sit mostly on them; without ``init`` the scores start near
    uniform (seeded noise of size ``noise``). ``trajectory_steps`` lists steps (0 = before any
    update) at which the hard permutation is recorded in ``info["trajectory"]`` as ``(step, perm)``.
    ``info["loss_history"]`` has the loss of every step.
    """
    loss = loss or ("task" if data is not None else "l2")
    if loss not in LOSSES:
        raise DeepAlignError(f"sinkhorn: unknown loss {loss!r} (choose from {', '.join(LOSSES)})")
    if loss == "task" and (data is None or module is None):
        raise DeepAlignError(
            "sinkhorn: loss 'task' needs data and the model's architecture; pass --data NAME"
        )
    if steps < 0 or tau <= 0 or lr <= 0 or sinkhorn_iters < 1:
        raise DeepAlignError("sinkhorn: steps >= 0, tau > 0, lr > 0 and sinkhorn_iters >= 1 needed")
    device = next(iter(a.values())).device
    dtype = next(t for t in a.values() if t.is_floating_point()).dtype
    gen = torch.Generator().manual_seed(seed)
    scores: dict[str, Tensor] = {}
    for g, n in spec.groups.items():
        s = noise * torch.randn(n, n, generator=gen, dtype=torch.float32)
        if init is not None:
            scale = math.log(n) + 2 if init_scale is None else init_scale
            s[torch.arange(n), init[g].cpu()] += scale
        scores[g] = s.to(device).requires_grad_(True)
    opt = torch.optim.Adam(scores.values(), lr=lr)
    keys = cost_keys(spec, a)
    want = sorted({int(s) for s in (trajectory_steps or ()) if 0 <= int(s) <= steps})
    trajectory: list[tuple[int, Permutation]] = []
    history: list[float] = []
    batches = _forever(data, batch_size, gen, device) if loss == "task" else None
    net = (
        copy.deepcopy(module).to(device).eval() if (loss == "task" and module is not None) else None
    )
    start = time.perf_counter()
    for step in range(steps + 1):
        if want and step == want[0]:
            trajectory.append((step, _hard(scores)))
            want.pop(0)
        if step == steps:
            break
        mats = {g: log_sinkhorn(s / tau, sinkhorn_iters).exp().to(dtype) for g, s in scores.items()}
        if loss == "l2":
            soft = apply_soft(spec, mats, {k: b[k] for k in keys})
            value = sum(((a[k] - soft[k]) ** 2).sum() for k in keys)
        else:
            assert batches is not None and net is not None
            x, y = next(batches)
            if y is None:
                raise DeepAlignError("sinkhorn: loss 'task' needs labelled data")
            lam = float(torch.rand((), generator=gen))
            soft = apply_soft(spec, mats, b)
            merged = {
                k: (1 - lam) * v + lam * soft[k] if v.is_floating_point() else v
                for k, v in a.items()
            }
            value = F.cross_entropy(functional_call(net, merged, (x,)), y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        history.append(float(value.detach()))
    perm = {g: p.to(device) for g, p in _hard(scores).items()}
    info: dict[str, Any] = {
        "iterations": steps,
        "loss": loss,
        "loss_history": history,
        "solver_seconds": time.perf_counter() - start,
    }
    if trajectory_steps is not None:
        info["trajectory"] = trajectory
    return perm, info
