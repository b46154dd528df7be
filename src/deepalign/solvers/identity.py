"""The naive baseline: no alignment at all."""

from __future__ import annotations

from typing import Any

from deepalign.core import permutation as P
from deepalign.core.permutation import Permutation
from deepalign.core.spec import PermutationSpec, StateDict
from deepalign.solvers.registry import register


@register("identity", needs_data=False)
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
