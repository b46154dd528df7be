"""The naive baseline: no alignment at all."""

from __future__ import annotations

import sys
from typing import Any

from deepalign.core import permutation as P
from deepalign.core.permutation import Permutation
from deepalign.core.spec import PermutationSpec, StateDict
from deepalign.solvers.method import Method


def identity_method(
    a: StateDict,
    b: StateDict,
    spec: PermutationSpec,
    *,
    module: Any = None,
    data: Any = None,
    init: Permutation | None = None,
    seed: int = 0,
) -> tuple[Permutation, dict[str, Any]]:
    """Returns ``init`` when given (so chains pass through), else the identity."""
    device = next(iter(a.values())).device
    perm = init if init is not None else P.identity(spec, device=device)
    return perm, {"iterations": 0}


def identity_batch(
    a: StateDict,
    b: StateDict,
    spec: PermutationSpec,
    *,
    init: Permutation | None = None,
    pair_seeds: list[int],
    **_: Any,
) -> tuple[Permutation, list[dict[str, Any]]]:
    """:func:`identity_method` for N stacked pairs."""
    n = len(pair_seeds)
    if init is None:
        device = next(iter(a.values())).device
        init = {g: p.expand(n, -1).clone() for g, p in P.identity(spec, device=device).items()}
    return init, [{"iterations": 0} for _ in range(n)]


METHOD = Method(
    "identity",
    identity_method,
    solve_batch=identity_batch,
    batch_chunk=sys.maxsize,
    help="naive: no alignment",
)
