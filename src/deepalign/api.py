"""The verbs on modules: align or merge two networks of any traceable class in one call.

These sit above every layer: they derive the spec (hand rules, or the tracer on an example input),
gather the caller's data, load an aligner given as a folder, run a method or chain, and hand back
modules of the caller's own class.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import Tensor, nn

from deepalign.core import permutation as P
from deepalign.core.checkpoint import first_difference
from deepalign.core.user_model import spec_of
from deepalign.data.batches import as_examples
from deepalign.errors import DeepAlignError
from deepalign.lmc.curves import reset_bn_stats
from deepalign.lmc.interpolate import interpolate
from deepalign.solvers import Chain, align


def _checked_states(a: nn.Module, b: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    for name, m in (("a", a), ("b", b)):
        if not isinstance(m, nn.Module):
            raise DeepAlignError(f"{name}: expected an nn.Module, got {type(m).__name__}")
    sa, sb = a.state_dict(), b.state_dict()
    diff = first_difference(sa, sb, ("a", "b"))
    if diff is not None:
        raise DeepAlignError(f"a and b have different architectures: {diff}")
    for name, state in (("a", sa), ("b", sb)):
        for k, t in state.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DeepAlignError(f"{name}: tensor {k} holds NaN or inf values")
    return sa, sb


def _aligner(aligner: Any, method: str) -> Any:
    if isinstance(aligner, str | os.PathLike):
        from deepalign.nn import DeepAlign

        return DeepAlign.from_pretrained(aligner)
    if aligner is None and Chain.parse(method).needs_aligner:
        raise DeepAlignError(
            f"method {method!r} needs a trained aligner: aligner='folder' or a loaded DeepAlign"
        )
    return aligner


def align_models(
    a: nn.Module,
    b: nn.Module,
    *,
    method: str = "wm",
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    data: Any = None,
    aligner: Any = None,
    seed: int = 0,
    **options: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``b`` with its neurons permuted into ``a``'s basis (the same function as ``b``),
    and the info of the alignment (``permutation``, ``objective``, ``l2``, ``seconds``, ...).

    ``a`` and ``b``: two modules of one class. ``example_input``: one batch, to trace a class the
    hand rules do not know (guessed when the first layer is a Linear). ``data``: ``(x, y)``
    tensors, a tensor of inputs, or an iterable of ``(x, y)`` batches (gathered into memory), for
    methods that use data (``am``, Sinkhorn's task loss), used as given. ``aligner``: a trained
    Deep-Align (a folder or a loaded model) for ``deepalign*`` methods. ``options``: the method's
    options (e.g. ``steps=500`` for Sinkhorn).
    """
    sa, sb = _checked_states(a, b)
    spec = spec_of(a, example_input)
    perm, info = align(
        sa,
        sb,
        spec,
        method,
        module=a,
        data=as_examples(data),
        aligner=_aligner(aligner, method),
        seed=seed,
        **options,
    )
    out = copy.deepcopy(b)
    out.load_state_dict(P.apply(spec, perm, sb))
    return out, {**info, "permutation": perm, "spec": spec}


def merge_models(
    a: nn.Module,
    b: nn.Module,
    *,
    alpha: float = 0.5,
    method: str = "wm",
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    data: Any = None,
    reset_bn: bool = False,
    aligner: Any = None,
    seed: int = 0,
    **options: Any,
) -> nn.Module:
    """``(1 - alpha) * a + alpha * aligned b``, as a module of ``a``'s class.

    Arguments as :func:`align_models`; ``reset_bn`` recomputes BatchNorm running statistics of the
    merge on ``data`` (averaged statistics do not describe the merged network).
    """
    if not isinstance(alpha, int | float) or not 0.0 <= float(alpha) <= 1.0:
        raise DeepAlignError(f"alpha={alpha!r}: must lie in [0, 1]")
    if reset_bn and data is None:
        raise DeepAlignError("reset_bn=True needs data (the batches to recompute statistics on)")
    examples = as_examples(data)
    aligned, _ = align_models(
        a,
        b,
        method=method,
        example_input=example_input,
        data=examples,
        aligner=aligner,
        seed=seed,
        **options,
    )
    merged = copy.deepcopy(a)
    merged.load_state_dict(interpolate(a.state_dict(), aligned.state_dict(), float(alpha)))
    if reset_bn:
        reset_bn_stats(merged, examples)
    return merged.eval()
