"""The ``deepalign`` method: one forward pass of a trained aligner, then a linear assignment per group.

The aligner is a typed argument (anything with the :class:`Aligner` methods; in practice a loaded
:class:`deepalign.nn.DeepAlign`), so this layer never imports the network code. Its answer starts
the next stage of a chain: the permutation as ``init``, its cosine similarities as ``init_scores``
(``deepalign+sinkhorn`` starts Sinkhorn from the aligner's soft answer).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from deepalign.core.permutation import Permutation
from deepalign.core.spec import PermutationSpec, StateDict
from deepalign.errors import DeepAlignError
from deepalign.solvers.method import NEXT_SCORES, Method

ALIGNER_CHUNK = 64  # pairs per forward pass (bounds memory on wide networks)


@runtime_checkable
class Aligner(Protocol):
    """What the ``deepalign`` method needs of an aligner."""

    def check_compatible(
        self,
        spec: PermutationSpec,
        arch: Mapping[str, Any] | None = None,
        where: str = "",
        state: Mapping[str, Tensor] | None = None,
        module: Any = None,
    ) -> None:
        """Raise a one-line DeepAlignError unless it runs on networks of this spec whose tensors
        are shaped like ``state`` (one network's; any hidden widths)."""
        ...

    def align_with_similarities(
        self,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        spec: PermutationSpec | None = None,
    ) -> tuple[Permutation, dict[str, Tensor]]:
        """Stacked permutations ``(N, n)`` and cosine similarities ``(N, n, n)`` per group."""
        ...


def check_aligner(
    aligner: Any,
    spec: PermutationSpec,
    where: str = "aligner",
    arch: Mapping[str, Any] | None = None,
    state: Mapping[str, Tensor] | None = None,
    module: Any = None,
) -> Aligner:
    """``aligner`` as an :class:`Aligner` for networks of ``spec`` shaped like ``state`` (one
    network's tensors; or ``module``'s): the one place this is checked."""
    if aligner is None:
        raise DeepAlignError(
            "method deepalign needs a trained aligner: aligner=DeepAlign.from_pretrained(folder)"
        )
    if isinstance(aligner, str | os.PathLike):
        raise DeepAlignError(
            f"aligner {str(aligner)!r}: pass a loaded aligner "
            "(deepalign.nn.DeepAlign.from_pretrained(folder))"
        )
    if not isinstance(aligner, Aligner):
        raise DeepAlignError(f"aligner: expected a trained Deep-Align model, got {type(aligner)}")
    aligner.check_compatible(spec, arch, where, state=state, module=module)
    return aligner


def deepalign_batch(
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    spec: PermutationSpec,
    *,
    aligner: Any = None,
    module: Any = None,
    pair_seeds: list[int] | None = None,
    **_: Any,
) -> tuple[Permutation, list[dict[str, Any]]]:
    """N stacked pairs in one forward pass: permutations ``(N, n)``, and per pair an info with the
    aligner's similarities (for the next stage)."""
    model = check_aligner(aligner, spec, state={k: v[0] for k, v in a.items()}, module=module)
    start = time.perf_counter()
    perm, sims = model.align_with_similarities(a, b, spec)
    n = next(iter(perm.values())).shape[0]
    seconds = time.perf_counter() - start
    device = next(iter(a.values())).device
    perm = {g: p.to(device) for g, p in perm.items()}
    return perm, [
        {
            "iterations": 1,
            "forward_seconds": seconds / n,
            NEXT_SCORES: {g: s[i].to(device) for g, s in sims.items()},
        }
        for i in range(n)
    ]


def deepalign(
    a: StateDict,
    b: StateDict,
    spec: PermutationSpec,
    *,
    module: Any = None,
    data: Any = None,
    init: Permutation | None = None,
    seed: int = 0,
    aligner: Any = None,
) -> tuple[Permutation, dict[str, Any]]:
    """Deep-Align on one pair (``init`` is ignored: the aligner needs no starting point)."""
    perm, infos = deepalign_batch(
        {k: v.unsqueeze(0) for k, v in a.items()},
        {k: v.unsqueeze(0) for k, v in b.items()},
        spec,
        aligner=aligner,
        module=module,
    )
    return {g: p[0] for g, p in perm.items()}, infos[0]


METHOD = Method(
    "deepalign",
    deepalign,
    solve_batch=deepalign_batch,
    batch_chunk=ALIGNER_CHUNK,
    needs_aligner=True,
    help="one forward pass of a trained Deep-Align aligner (--aligner DIR)",
)
