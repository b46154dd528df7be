"""The ``deepalign`` method in the solver registry: one forward pass of a trained aligner.

``deepalign+wm`` and ``deepalign+sinkhorn`` come from the registry's chaining: the aligner's
permutation is the next method's ``init``, and its cosine similarities are handed on as
``init_scores`` to a next method that takes them (Sinkhorn starts from the aligner's soft answer).
For many pairs at once use :func:`align_batch`.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deepalign.core.permutation import Permutation
from deepalign.core.spec import PermutationSpec, StateDict
from deepalign.errors import DeepAlignError
from deepalign.nn.model import DeepAlign
from deepalign.nn.pretrained import load_pretrained
from deepalign.solvers.registry import NEXT_SCORES, register


@lru_cache(maxsize=4)
def _cached(folder: str, device: str) -> DeepAlign:
    return load_pretrained(folder, device)


def get_aligner(
    aligner: DeepAlign | str | os.PathLike | None, device: torch.device | str = "cpu"
) -> DeepAlign:
    """A loaded aligner from an instance or a folder (folders are loaded once and cached)."""
    if aligner is None:
        raise DeepAlignError("method deepalign needs a trained aligner (--aligner DIR)")
    if isinstance(aligner, DeepAlign):
        return aligner
    return _cached(str(Path(aligner).resolve()), str(device))


def _check_spec(model: DeepAlign, spec: PermutationSpec) -> None:
    mine = model.layout.spec
    if not mine.same_structure(spec) or dict(mine.groups) != dict(spec.groups):
        widths = "-".join(map(str, model.layout.widths))
        raise DeepAlignError(
            f"the aligner was trained for networks of widths {widths}; these networks have groups "
            f"{dict(spec.groups)}"
        )


@torch.no_grad()
def align_batch(
    aligner: DeepAlign | str | os.PathLike, a: dict[str, Tensor], b: dict[str, Tensor]
) -> Permutation:
    """Permutations ``(N, n)`` bringing each stacked B into its A's basis, in one forward pass."""
    return align_batch_with_similarities(aligner, a, b)[0]


@torch.no_grad()
def align_batch_with_similarities(
    aligner: DeepAlign | str | os.PathLike, a: dict[str, Tensor], b: dict[str, Tensor]
) -> tuple[Permutation, dict[str, Tensor]]:
    """:func:`align_batch` and the aligner's cosine similarities ``(N, n, n)`` per group."""
    model = get_aligner(aligner, next(iter(a.values())).device)
    model.layout.check(a, where="A")
    model.layout.check(b, where="B")
    return model.align_with_similarities(a, b)


@register("deepalign")
def deepalign(
    a: StateDict,
    b: StateDict,
    spec: PermutationSpec,
    *,
    module: Any = None,
    data: Any = None,
    init: Permutation | None = None,
    seed: int = 0,
    aligner: DeepAlign | str | os.PathLike | None = None,
) -> tuple[Permutation, dict[str, Any]]:
    """Deep-Align on one pair (``init`` is ignored: the aligner needs no starting point)."""
    model = get_aligner(aligner, next(iter(a.values())).device)
    _check_spec(model, spec)
    start = time.perf_counter()
    stacked_a = {k: v.unsqueeze(0) for k, v in a.items()}
    stacked_b = {k: v.unsqueeze(0) for k, v in b.items()}
    perm, sims = align_batch_with_similarities(model, stacked_a, stacked_b)
    return {g: p[0] for g, p in perm.items()}, {
        "iterations": 1,
        "forward_seconds": time.perf_counter() - start,
        NEXT_SCORES: {g: s[0] for g, s in sims.items()},
    }
