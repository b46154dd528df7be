"""Transformers written the way users write them: torch's layers, and attention by hand.

Nothing here imports deepalign: these are the models a user brings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TinyViT(nn.Module):
    """Patch embedding by a strided conv, a class token, learned positions, torch encoder layers."""

    def __init__(
        self,
        image: int = 8,
        patch: int = 4,
        channels: int = 1,
        dim: int = 16,
        heads: int = 4,
        depth: int = 2,
        classes: int = 10,
        norm_first: bool = True,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, batch_first=batch_first, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1) + self.pos
        if not self.batch_first:
            t = t.transpose(0, 1)
        t = self.encoder(t)
        if not self.batch_first:
            t = t.transpose(0, 1)
        return self.head(self.norm(t[:, 0]))


class UnfoldViT(nn.Module):
    """Patches cut from the raw input with view/permute, mean pooling, separate layers in a list."""

    def __init__(self, image: int = 8, patch: int = 4, dim: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.p = patch
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.randn((image // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 24, dropout=0.0, batch_first=True)
            for _ in range(2)
        )
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.p
        t = x.view(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        t = self.embed(t) + self.pos
        for block in self.blocks:
            t = block(t)
        return self.head(t.mean(dim=1))


class CausalSelfAttention(nn.Module):
    """GPT-2 style: one fused qkv Linear, heads by view/transpose, an explicit causal softmax."""

    def __init__(self, dim: int, heads: int, context: int, fused: bool = True) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer(
            "mask", torch.tril(torch.ones(context, context)).view(1, 1, context, context)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, context: int, fused: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, context, fused)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    """A character-level GPT: token and position embeddings, blocks, a tied language-model head."""

    def __init__(
        self,
        vocab: int = 20,
        dim: int = 16,
        heads: int = 4,
        depth: int = 2,
        context: int = 8,
        fused: bool = False,
        tied: bool = True,
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, context, fused) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class Seq2Seq(nn.Module):
    """torch's decoder layer (self- and cross-attention) over an encoded source."""

    def __init__(self, dim: int = 12, heads: int = 2) -> None:
        super().__init__()
        self.src = nn.Linear(5, dim)
        self.tgt = nn.Linear(3, dim)
        self.enc = nn.TransformerEncoderLayer(dim, heads, 20, dropout=0.0, norm_first=True)
        self.dec = nn.TransformerDecoderLayer(dim, heads, 20, dropout=0.0)
        self.head = nn.Linear(dim, 4)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        memory = self.enc(self.src(src))
        return self.head(self.dec(self.tgt(tgt), memory))


class CrossDims(nn.Module):
    """Multi-head attention whose keys and values come from a stream of another width."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 8)
        self.kv = nn.Linear(4, 6)
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, kv = self.q(x), torch.relu(self.kv(x))
        out, _ = self.attn(q, kv, kv)
        return self.head(out.mean(1))


class RawPatches(nn.Module):
    """Patches cut with F.unfold and Tensor.unfold, fixed sinusoidal positions from arange."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = F.unfold(x, 4, stride=4).transpose(1, 2)
        q = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(x.shape[0], -1, 16)
        pos = torch.sin(torch.arange(p.shape[1], dtype=x.dtype)).unsqueeze(-1)
        return self.head(self.layer(self.embed(p) + self.embed(q) + pos).mean(1))


class TimmAttention(nn.Module):
    """timm's layout: ``qkv(x).reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class TimmStyleViT(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, 4, stride=4)
        self.norm1, self.attn = nn.LayerNorm(dim), TimmAttention(dim, heads)
        self.norm2, self.mlp = (
            nn.LayerNorm(dim),
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
        )
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class Translator(nn.Module):
    """torch's whole encoder-decoder ``nn.Transformer`` between two embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.src, self.tgt = nn.Linear(3, 8), nn.Linear(2, 8)
        self.transformer = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(self.src(src), self.tgt(tgt)))


class EinsumAttention(nn.Module):
    """Separate q/k/v Linears, heads by view, scores and mixing by einsum."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(5, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, c = x.shape
        q, k, v = (f(x).view(b, n, self.heads, c // self.heads) for f in (self.q, self.k, self.v))
        att = torch.einsum("bihd,bjhd->bhij", q, k).softmax(-1)
        y = torch.einsum("bhij,bjhd->bihd", att, v).reshape(b, n, c)
        return self.head(x + self.o(y))
