"""Permutation algebra: one index tensor per group, applied to (batches of) state dicts.

Convention everywhere: B is permuted into A's basis, and the aligned B's neuron ``i`` is B's neuron
``perm[group][i]``. As a matrix, ``P[i, perm[i]] = 1`` and the aligned tensor is ``P @ x`` along each
acted-on axis, so hard (index) and soft (doubly-stochastic matrix) permutations share one code path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from deepalign.core.spec import Concat, Entry, PermutationSpec, StateDict
from deepalign.errors import DeepAlignError

Permutation = dict[str, Tensor]


def identity(spec: PermutationSpec, device: torch.device | str | None = None) -> Permutation:
    """The permutation that changes nothing."""
    return {g: torch.arange(n, device=device) for g, n in spec.groups.items()}


def random_permutation(
    spec: PermutationSpec,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch: int | None = None,
) -> Permutation:
    """A uniformly random permutation of every group (``batch`` of them when given), seeded.

    Structured groups (attention heads) get a random order of their head group's heads and a random
    permutation inside each head.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    lead = () if batch is None else (batch,)
    out = {}
    for g, n in spec.groups.items():
        out[g] = torch.argsort(torch.rand(*lead, n, generator=generator), dim=-1)
    for g, h in spec.heads.items():
        heads, d = spec.groups[h], spec.head_size(g)
        within = torch.argsort(torch.rand(*lead, heads, d, generator=generator), dim=-1)
        out[g] = block_permutation(out[h], within)
    return out


def block_permutation(heads: Tensor, within: Tensor) -> Tensor:
    """The permutation of ``H * d`` units that takes head ``heads[i]`` to head ``i`` and, inside
    it, unit ``within[i, j]`` to unit ``j`` (batched over leading dims)."""
    d = within.shape[-1]
    return (heads.unsqueeze(-1) * d + within).flatten(-2)


def split_blocks(p: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`block_permutation`: ``(heads order, within-head permutations)``."""
    blocks = p.unflatten(-1, (heads, -1))
    d = blocks.shape[-1]
    return blocks[..., 0] // d, blocks % d


def check_structure(spec: PermutationSpec, perm: Mapping[str, Tensor], where: str = "") -> None:
    """Raise unless every structured group moves whole heads as its head group says."""
    for g, h in spec.heads.items():
        heads, within = split_blocks(perm[g], spec.groups[h])
        d = spec.head_size(g)
        if not bool((perm[g].unflatten(-1, (spec.groups[h], d)) // d == heads.unsqueeze(-1)).all()):
            raise DeepAlignError(f"{where}group {g!r} does not move whole heads")
        if not torch.equal(heads, perm[h].to(heads.device)):
            raise DeepAlignError(f"{where}group {g!r} does not follow its head order {h!r}")


def invert(perm: Permutation) -> Permutation:
    """The inverse: ``apply(invert(p), apply(p, x)) == x``."""
    return {g: torch.argsort(p, dim=-1) for g, p in perm.items()}


def compose(first: Permutation, then: Permutation) -> Permutation:
    """Apply ``first``, then ``then``: ``apply(compose(f, t), x) == apply(t, apply(f, x))``."""
    return {g: torch.gather(first[g], -1, then[g].expand_as(first[g])) for g in first}


def to_matrices(perm: Permutation, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """One-hot matrices ``P[i, perm[i]] = 1`` (batched when the index tensors are)."""
    out = {}
    for g, p in perm.items():
        n = p.shape[-1]
        out[g] = torch.nn.functional.one_hot(p, n).to(dtype)
    return out


def from_matrices(mats: Mapping[str, Tensor]) -> Permutation:
    """Index form of (hard) permutation matrices: the column of each row's largest entry."""
    return {g: m.argmax(dim=-1) for g, m in mats.items()}


def _along(
    x: Tensor, axis: int, inner: int, batch_dims: int, fn: Callable[[Tensor], Tensor]
) -> Tensor:
    """Run ``fn`` on ``x`` viewed as ``(*batch, n, rest)`` with the acted-on axis as ``n``."""
    dim = batch_dims + axis
    moved = x.movedim(dim, batch_dims)
    shape = moved.shape
    n = shape[batch_dims] // inner
    flat = moved.reshape(*shape[:batch_dims], n, -1)
    out = fn(flat).reshape(shape)
    return out.movedim(batch_dims, dim)


def _check_perm(
    spec: PermutationSpec, perm: Mapping[str, Tensor], batch_dims: int, soft: bool
) -> None:
    if set(perm) != set(spec.groups):
        raise DeepAlignError(
            f"permutation groups {sorted(perm)} do not match the architecture's {sorted(spec.groups)}"
        )
    for g, p in perm.items():
        want = spec.groups[g]
        size = p.shape[-1]
        if size != want or (soft and p.shape[-2] != want):
            raise DeepAlignError(f"permutation for group {g!r} has size {size}, expected {want}")


def _on_axis(
    x: Tensor, axis: int, entry: Entry, batch_dims: int, fn: Callable[[Tensor, str], Tensor]
) -> Tensor:
    """Run ``fn(block view, group)`` on every stretch of ``x``'s ``axis`` that ``entry`` moves."""
    if entry is None:
        return x
    if not isinstance(entry, Concat):
        return _along(x, axis, entry.inner, batch_dims, lambda t: fn(t, entry.group))
    parts = x.split([n for _, n in entry.parts], dim=batch_dims + axis)
    return torch.cat(
        [
            t if e is None else _along(t, axis, e.inner, batch_dims, lambda t, e=e: fn(t, e.group))
            for t, (e, _) in zip(parts, entry.parts, strict=True)
        ],
        dim=batch_dims + axis,
    )


def apply(
    spec: PermutationSpec,
    perm: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    batch_dims: int = 0,
) -> StateDict:
    """Permute every acted-on axis of ``state``; tensors of ``perm`` may carry the batch dims too."""
    _check_perm(spec, perm, batch_dims, soft=False)

    def move(t: Tensor, group: str) -> Tensor:
        p = perm[group].to(t.device)
        if p.dim() == 1:
            return t.index_select(batch_dims, p)
        return torch.gather(t, batch_dims, p.unsqueeze(-1).expand_as(t))

    out: StateDict = {}
    for key, x in state.items():
        for axis, entry in enumerate(spec.axes.get(key, ())):
            x = _on_axis(x, axis, entry, batch_dims, move)
        out[key] = x
    return out


def apply_soft(
    spec: PermutationSpec,
    mats: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    batch_dims: int = 0,
) -> StateDict:
    """Apply (soft) permutation matrices ``P`` as ``P @ x`` along each axis; differentiable."""
    _check_perm(spec, mats, batch_dims, soft=True)
    out: StateDict = {}
    for key, x in state.items():
        for axis, entry in enumerate(spec.axes.get(key, ())):
            x = _on_axis(
                x,
                axis,
                entry,
                batch_dims,
                lambda t, g, x=x: mats[g].to(device=x.device, dtype=x.dtype) @ t,
            )
        out[key] = x
    return out


def is_permutation(p: Tensor) -> bool:
    """True when every row of ``p`` (last dim) holds each index exactly once."""
    n = p.shape[-1]
    return bool((torch.sort(p, dim=-1).values == torch.arange(n, device=p.device)).all())


# -- files ---------------------------------------------------------------------------------------
def to_json_dict(perm: Mapping[str, Tensor]) -> dict:
    return {
        "convention": "aligned B neuron i = B neuron perm[group][i]",
        "perm": {g: p.tolist() for g, p in perm.items()},
    }


def save_json(perm: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Write the permutation as JSON, atomically."""
    from deepalign.core.io import atomic_write_text

    atomic_write_text(path, json.dumps(to_json_dict(perm)))


def load_json(path: str | os.PathLike, spec: PermutationSpec | None = None) -> Permutation:
    """Read a permutation written by :func:`save_json`; checked against ``spec`` when given."""
    path = Path(path)
    if not path.is_file():
        raise DeepAlignError(f"{path}: no such permutation file")
    try:
        data = json.loads(path.read_text())
        perm = {str(g): torch.tensor(v, dtype=torch.long) for g, v in data["perm"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise DeepAlignError(f"{path}: not a permutation file ({exc.__class__.__name__})") from None
    for g, p in perm.items():
        if p.dim() != 1 or not is_permutation(p):
            raise DeepAlignError(f"{path}: group {g!r} is not a permutation")
    if spec is not None:
        _check_perm(spec, perm, 0, soft=False)
        check_structure(spec, perm, where=f"{path}: ")
    return perm
