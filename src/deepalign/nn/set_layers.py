"""Pooling and set layers over one axis of neurons: the pieces every DWS block is made of."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deepalign.errors import DeepAlignError

POOLINGS = ("max", "mean")
SET_LAYERS = ("sab", "deepsets")


def pool(x: Tensor, dims: Sequence[int], how: str) -> Tensor:
    """Reduce ``x`` over ``dims`` by max or mean (both invariant to permutations of those dims)."""
    if how == "mean":
        return x.mean(dim=tuple(dims))
    if how != "max":
        raise DeepAlignError(f"unknown pooling {how!r} (choose from {', '.join(POOLINGS)})")
    for d in sorted(dims, reverse=True):
        x = _max_along(x, d)
    return x


def _max_along(x: Tensor, dim: int) -> Tensor:
    """Max over one dim; a halving tree of ``maximum`` where torch's ``amax`` is slow on CPU.

    ``amax`` vectorises over the contiguous block after ``dim``; when that block is short (a
    channel axis after a neuron axis) pairwise maxima of the two halves are several times faster.
    """
    if x.stride(dim) >= 256 or not x.is_contiguous() or x.device.type != "cpu":
        return x.amax(dim)
    while x.shape[dim] > 1:
        n = x.shape[dim]
        h = n // 2
        m = torch.maximum(x.narrow(dim, 0, h), x.narrow(dim, n - h, h))
        if n % 2:  # the middle element is in neither half
            m = torch.maximum(m, x.narrow(dim, h, 1))
        x = m
    return x.squeeze(dim)


class SAB(nn.Module):
    """Set-Transformer self-attention block over axis -2 (no LayerNorm, as DWSNets uses it).

    ``O = Q + softmax(Q K^T / sqrt(c_out)) V`` per head, then ``O + act(fc_o(O))``. Equivariant to
    permutations of the set axis; ``x`` is ``(..., n, c_in)``.
    """

    def __init__(self, c_in: int, c_out: int, n_heads: int, act: nn.Module) -> None:
        super().__init__()
        if c_out % n_heads:
            raise DeepAlignError(f"attention width {c_out} is not divisible by {n_heads} heads")
        self.n_heads, self.c_out = n_heads, c_out
        self.qkv = nn.Linear(c_in, 3 * c_out)
        self.fc_o = nn.Linear(c_out, c_out)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        lead, n = x.shape[:-2], x.shape[-2]
        q, k, v = self.qkv(x.reshape(-1, n, x.shape[-1])).chunk(3, dim=-1)

        def heads(t: Tensor) -> Tensor:
            return t.reshape(t.shape[0], n, self.n_heads, -1).transpose(1, 2)

        att = F.scaled_dot_product_attention(
            heads(q), heads(k), heads(v), scale=1.0 / math.sqrt(self.c_out)
        )
        o = q + att.transpose(1, 2).reshape(q.shape)
        o = o + self.act(self.fc_o(o))
        return o.reshape(*lead, n, self.c_out)


def set_layer(kind: str, c_in: int, c_out: int, n_heads: int, act: nn.Module) -> nn.Module:
    """A map over one neuron axis: SAB (attention across the set) or DeepSets' per-element Linear.

    The DeepSets pooling term is not repeated here: every DWS block already has a fully pooled term.
    """
    if kind == "sab":
        return SAB(c_in, c_out, n_heads, act)
    if kind == "deepsets":
        return nn.Linear(c_in, c_out)
    raise DeepAlignError(f"unknown set layer {kind!r} (choose from {', '.join(SET_LAYERS)})")
