"""Which held-out networks the bench aligns: seeded pairs from the zoo's test split.

Classifier zoos (and INR zoos with one view per target) pair distinct test networks. INR zoos with
several views per target pair two views of the same target, as the paper's INR experiments do
(the two fits of one wave or image are what the aligner learns to align).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from deepalign.core.seeds import derive_seed
from deepalign.errors import DeepAlignError
from deepalign.zoo.loader import Zoo

Pair = tuple[int, int]


def candidate_pairs(zoo: Zoo, split: str = "test") -> list[Pair]:
    """Every unordered pair the bench may draw from ``split`` (ascending indices)."""
    idx = zoo.indices(split)
    if zoo.kind != "classifier" and zoo.plan.views >= 2:
        by_target: dict[int, list[int]] = {}
        for i in idx:
            by_target.setdefault(int(zoo.rows[i]["target"]), []).append(i)
        out = [p for views in by_target.values() for p in itertools.combinations(views, 2)]
        what = "two views of one target"
    else:
        out = list(itertools.combinations(idx, 2))
        what = "two networks"
    if not out:
        raise DeepAlignError(
            f"{zoo.path}: the {split} split has no pair of {what} to align ({len(idx)} networks)"
        )
    return out


def draw_pairs(candidates: Sequence[Pair], n: int, seed: int, draw: int = 0) -> list[Pair]:
    """``min(n, len(candidates))`` distinct pairs, each in a random order (A, B); seeded by
    ``(seed, draw)`` so every bench seed re-draws its own pairs."""
    if n <= 0:
        raise DeepAlignError(f"--pairs must be positive, got {n}")
    g = torch.Generator().manual_seed(derive_seed(seed, "bench-pairs", draw))
    order = torch.randperm(len(candidates), generator=g)[:n].tolist()
    flips = torch.randint(0, 2, (len(order),), generator=g).tolist()
    out = []
    for k, f in zip(order, flips, strict=True):
        a, b = candidates[k]
        out.append((b, a) if f else (a, b))
    return out


def shard_positions(n: int, chunk: int, index: int, count: int) -> list[int]:
    """The pair positions (of ``n``) that shard ``index`` of ``count`` aligns: a contiguous block of
    whole chunks of ``chunk`` pairs, so every batched run (and its shared data order) is the one
    an unsharded bench makes."""
    chunk = max(chunk, 1)
    chunks = -(-n // chunk)
    first, last = index * chunks // count, (index + 1) * chunks // count
    return list(range(first * chunk, min(last * chunk, n)))
