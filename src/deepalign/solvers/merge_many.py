"""Merge N networks of one architecture: align them all into one basis, then average.

MergeMany (Ainsworth et al., "Git Re-Basin", 2023), started from a star: first every network is
aligned to network 0 (so the start does not depend on how any network's neurons happen to be
ordered, as averaging unaligned networks would), then every network in turn is aligned to the mean
of all the others (as aligned so far), in passes over the networks, until a pass changes no
permutation or ``max_passes`` is reached. Any registered method aligns (``wm`` by default:
data-free); each network's alignment starts from its current permutation, so with ``wm`` the sum of
the pairwise weight inner products never decreases from pass to pass. At the end everything is
re-expressed in network 0's basis (a common permutation changes no function), so the merged
network can be compared or interpolated with network 0 directly. (Keeping network 0 fixed instead
lets the others settle in a basis of their own: three permuted copies of one network then agree
with each other and not with the fourth.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deepalign.core import permutation as P
from deepalign.core.permutation import Permutation
from deepalign.core.seeds import derive_seed
from deepalign.core.spec import PermutationSpec, StateDict
from deepalign.errors import DeepAlignError
from deepalign.solvers.chain import Chain, align
from deepalign.solvers.objective import weight_inner


def mean_state(states: Sequence[Mapping[str, Tensor]]) -> StateDict:
    """Key-by-key mean of floating tensors; integer buffers (e.g. BatchNorm's step count) from
    the first state."""
    first = states[0]
    return {
        k: torch.stack([s[k].to(v) for s in states]).mean(0) if v.is_floating_point() else v.clone()
        for k, v in first.items()
    }


def pairwise_objective(states: Sequence[Mapping[str, Tensor]], spec: PermutationSpec) -> float:
    """``sum_{i<j} <state_i, state_j>`` over the weights the spec permutes (what WM raises)."""
    return sum(
        weight_inner(states[i], states[j], spec)
        for i in range(len(states))
        for j in range(i + 1, len(states))
    )


def merge_many(
    states: Sequence[Mapping[str, Tensor]],
    spec: PermutationSpec,
    method: str = "wm",
    *,
    module: nn.Module | None = None,
    data: Any = None,
    seed: int = 0,
    max_passes: int = 10,
    on_step: Callable[[int, int], None] | None = None,
    aligner: Any = None,
    **options: Any,
) -> tuple[StateDict, list[Permutation], dict[str, Any]]:
    """The mean of ``states`` after aligning them all into ``states[0]``'s basis.

    Returns the merged state, one permutation per network (``perms[0]`` is the identity;
    ``apply(spec, perms[i], states[i])`` is network i in the merged basis, network 0's) and an
    info dict: ``passes``, ``converged`` (the last pass changed nothing), ``history`` (the star
    start, then each pass: networks whose permutation changed, and the pairwise objective after
    it). ``seed`` seeds the order of each pass and each alignment; ``on_step(done, total)``
    reports alignments as they finish.
    """
    if len(states) < 2:
        raise DeepAlignError(f"merging needs at least 2 networks, got {len(states)}")
    if max_passes < 1:
        raise DeepAlignError(f"max_passes must be at least 1, got {max_passes}")
    chain = Chain.parse(method)
    chain.check_inputs(data, aligner)
    chain.check_options(options)
    for i, s in enumerate(states):
        spec.check(s, where=f"network {i}")
    device = next(iter(states[0].values())).device
    originals = [dict(s) for s in states]
    perms = [P.identity(spec, device=device) for _ in states]
    aligned = list(originals)
    history: list[dict[str, Any]] = []
    n, changed = len(states), -1
    total, done = (n - 1) + max_passes * n, 0

    def realign(i: int, target: StateDict, init: Permutation | None, tag: tuple) -> None:
        nonlocal done
        perms[i], _ = align(
            target,
            originals[i],
            spec,
            chain,
            module=module,
            data=data,
            init=init,
            seed=derive_seed(seed, *tag, i),
            aligner=aligner,
            **options,
        )
        aligned[i] = P.apply(spec, perms[i], originals[i])
        done += 1
        if on_step is not None:
            on_step(done, total)

    for i in range(1, n):  # the star start: each network aligned to network 0 by the method alone
        realign(i, originals[0], None, ("merge-start",))
    history.append({"changed": n - 1, "objective": pairwise_objective(aligned, spec)})
    for p in range(max_passes):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + p))
        changed = 0
        for i in order.tolist():
            before = perms[i]
            realign(i, mean_state([aligned[j] for j in range(n) if j != i]), before, ("merge", p))
            changed += any(not torch.equal(perms[i][g], before[g]) for g in before)
        history.append({"changed": changed, "objective": pairwise_objective(aligned, spec)})
        if changed == 0:
            break
    back = P.invert(perms[0])  # into network 0's basis: P0^-1 after each P_i
    perms = [P.compose(perm, back) for perm in perms]
    info = {"passes": len(history) - 1, "converged": changed == 0, "history": history}
    return P.apply(spec, back, mean_state(aligned)), perms, info
