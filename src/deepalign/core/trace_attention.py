"""Permutation rules of attention and transformer layers.

In a transformer block the residual stream is one permutation (embeddings, every residual add,
every norm's weights, the output projections' rows, the MLP's input columns); each MLP's hidden units
are another; and each attention layer has *structured* groups: queries and keys share one
permutation, values (with the output projection's columns) another, each moving whole heads in one
shared head order and permuting freely inside every head. Hand-written attention (a fused ``qkv``
Linear split in three, ``view`` into heads, ``q @ k^T``, softmax, ``@ v``, heads merged back) gets
the same groups from the generic rules; torch's own modules are leaves with the rules below.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from deepalign.core.axis_classes import Elem
from deepalign.core.trace_ops import Op, _shape, _shapes, handles
from deepalign.errors import DeepAlignError


@handles(F.scaled_dot_product_attention)
def _sdpa(op: Op) -> None:
    q, k, v = (op.arg(i, n) for i, n in enumerate(("query", "key", "value")))
    n = len(op.out_shape)
    for t in (q, k, v):
        for d in range(len(_shape(t)) - 2):
            od = d + n - len(_shape(t))
            if _shape(t)[d] == op.out_shape[od]:
                op.link(op.inp(t, d), op.y(od))
    op.link(op.inp(q, -1), op.inp(k, -1))  # scores contract queries with keys
    op.link(op.inp(k, -2), op.inp(v, -2))  # the output contracts key positions with values
    op.link(op.inp(q, -2), op.y(-2))
    op.link(op.inp(v, -1), op.y(-1))
    mask = op.arg(3, "attn_mask")
    if mask is not None and _shape(mask) is not None:  # a per-head mask pins the heads' order
        ms = _shape(mask)
        for d in range(len(ms) - 2):
            od = d + n - len(ms)
            if ms[d] == op.out_shape[od] and ms[d] != 1:
                op.link(op.inp(mask, d), op.y(od))


def _attention(
    op: Op, prefix: str, m: nn.MultiheadAttention, query: Elem, key: Elem, value: Elem, out: Elem
) -> Elem:
    """The groups of one ``nn.MultiheadAttention`` at ``prefix`` whose inputs' embedding axes are
    ``query``/``key``/``value`` and whose output's is ``out``; returns its head-order axis."""
    e, h = m.embed_dim, m.num_heads
    d = e // h
    qk, v = op.virtual(f"{prefix}.qk", e), op.virtual(f"{prefix}.v", e)
    heads = op.virtual(f"{prefix}.heads", h)
    op.observe(qk, prefix, "q")
    op.observe(v, prefix, "v")
    op.split_heads(qk, heads, op.virtual(f"{prefix}.qk.within", d))
    op.split_heads(v, heads, op.virtual(f"{prefix}.v.within", d))
    p = f"{prefix}."
    if m._qkv_same_embed_dim:
        op.join(op.state(p + "in_proj_weight", 0), [qk, qk, v])
        for x in (query, key, value):
            op.link(x, op.state(p + "in_proj_weight", 1))
    else:
        for name, rows, x in (("q", qk, query), ("k", qk, key), ("v", v, value)):
            op.link(rows, op.state(f"{p}{name}_proj_weight", 0))
            op.link(x, op.state(f"{p}{name}_proj_weight", 1))
    op.join(op.state(p + "in_proj_bias", 0), [qk, qk, v])
    op.link(qk, op.state(p + "bias_k", 2))
    op.link(v, op.state(p + "bias_v", 2))
    op.link(v, op.state(p + "out_proj.weight", 1))
    op.link(out, op.state(p + "out_proj.weight", 0))
    op.link(out, op.state(p + "out_proj.bias", 0))
    return heads


@handles(nn.MultiheadAttention)
def _mha(op: Op) -> None:
    m: nn.MultiheadAttention = op.module
    q, k, v = (op.arg(i, n) for i, n in enumerate(("query", "key", "value")))
    mask = op.arg(5, "attn_mask")
    if mask is not None and _shape(mask) is not None and len(_shape(mask)) == 3:
        raise DeepAlignError(
            f"trace: {op.node.target!r} gets a per-head (3-D) attn_mask; heads cannot be "
            "permuted under it (pass a 2-D mask)"
        )
    heads = _attention(
        op, str(op.node.target), m, op.inp(q, -1), op.inp(k, -1), op.inp(v, -1), op.out(0, -1)
    )
    for d in range(len(_shape(q)) - 1):  # positions and batch
        op.link(op.inp(q, d), op.out(0, d))
    items = _shapes(op.node) or []
    need, average = op.arg(4, "need_weights", True), op.arg(6, "average_attn_weights", True)
    if len(items) > 1 and items[1] is not None and need and not average:
        op.link(heads, op.out(1, -3))  # per-head weights are an output: heads stay in order


def _feedforward(op: Op, prefix: str, layer: nn.Module, residual: Elem) -> None:
    p = f"{prefix}."
    hidden = op.virtual(f"{prefix}.linear1", layer.linear1.out_features)
    op.observe(hidden, prefix, "hidden")
    op.link(residual, op.state(p + "linear1.weight", 1))
    op.link(hidden, op.state(p + "linear1.weight", 0))
    op.link(hidden, op.state(p + "linear1.bias", 0))
    op.link(hidden, op.state(p + "linear2.weight", 1))
    op.link(residual, op.state(p + "linear2.weight", 0))
    op.link(residual, op.state(p + "linear2.bias", 0))
    for norm in ("norm1", "norm2", "norm3"):
        op.link(residual, op.state(f"{p}{norm}.weight", 0))
        op.link(residual, op.state(f"{p}{norm}.bias", 0))


def _encoder_layer(op: Op, prefix: str, layer: nn.TransformerEncoderLayer, r: Elem) -> None:
    _attention(op, f"{prefix}.self_attn", layer.self_attn, r, r, r, r)
    _feedforward(op, prefix, layer, r)


def _decoder_layer(
    op: Op, prefix: str, layer: nn.TransformerDecoderLayer, r: Elem, memory: Elem
) -> None:
    _attention(op, f"{prefix}.self_attn", layer.self_attn, r, r, r, r)
    _attention(op, f"{prefix}.multihead_attn", layer.multihead_attn, r, memory, memory, r)
    _feedforward(op, prefix, layer, r)


def _stream(op: Op) -> Elem:
    """The residual stream: the first input's last axis, tied to the output's."""
    op.leading(1)
    op.link(op.x(0, -1), op.y(-1))
    return op.x(0, -1)


@handles(nn.TransformerEncoderLayer)
def _encoder_layer_rule(op: Op) -> None:
    _encoder_layer(op, str(op.node.target), op.module, _stream(op))


@handles(nn.TransformerDecoderLayer)
def _decoder_layer_rule(op: Op) -> None:
    r = _stream(op)
    _decoder_layer(op, str(op.node.target), op.module, r, op.inp(op.arg(1, "memory"), -1))


def _final_norm(op: Op, norm: nn.Module | None, r: Elem) -> None:
    if norm is not None:
        op.link(r, op.param("norm.weight", 0))
        op.link(r, op.param("norm.bias", 0))


@handles(nn.TransformerEncoder)
def _encoder_rule(op: Op) -> None:
    r = _stream(op)
    for i, layer in enumerate(op.module.layers):
        _encoder_layer(op, f"{op.node.target}.layers.{i}", layer, r)
    _final_norm(op, op.module.norm, r)


@handles(nn.TransformerDecoder)
def _decoder_rule(op: Op) -> None:
    r = _stream(op)
    memory = op.inp(op.arg(1, "memory"), -1)
    for i, layer in enumerate(op.module.layers):
        _decoder_layer(op, f"{op.node.target}.layers.{i}", layer, r, memory)
    _final_norm(op, op.module.norm, r)


@handles(nn.Transformer)
def _transformer_rule(op: Op) -> None:
    """``nn.Transformer(src, tgt)``: the encoder's stream is the decoder's memory."""
    src, tgt = op.inp(op.arg(0, "src"), -1), op.inp(op.arg(1, "tgt"), -1)
    op.leading(1)
    op.link(tgt, op.y(-1))
    m, prefix = op.module, str(op.node.target)
    for i, layer in enumerate(m.encoder.layers):
        _encoder_layer(op, f"{prefix}.encoder.layers.{i}", layer, src)
    for i, layer in enumerate(m.decoder.layers):
        _decoder_layer(op, f"{prefix}.decoder.layers.{i}", layer, tgt, src)
    for part, stream in (("encoder", src), ("decoder", tgt)):
        op.link(stream, op.param(f"{part}.norm.weight", 0))
        op.link(stream, op.param(f"{part}.norm.bias", 0))
