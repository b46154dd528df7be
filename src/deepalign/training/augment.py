"""Weight-space augmentations for Deep-Align's supervised pairs (PAPER §4.1), batched and seeded.

Every function takes stacked state dicts ``(B, ...)`` and returns new ones; randomness comes only
from the ``torch.Generator`` passed in. Defaults are the paper's MLP settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from deepalign.core.spec import PermutationSpec, StateDict

_NOT_WEIGHTS = ("running_mean", "running_var", "num_batches_tracked")


def _is_weight(key: str, t: Tensor) -> bool:
    return t.is_floating_point() and not key.endswith(_NOT_WEIGHTS)


def _rand(shape: tuple[int, ...], g: torch.Generator, like: Tensor) -> Tensor:
    return torch.rand(shape, generator=g).to(device=like.device, dtype=like.dtype)


def gaussian_noise(state: Mapping[str, Tensor], sigma: float, g: torch.Generator) -> StateDict:
    """Add ``N(0, (sigma * std(tensor))^2)`` to every weight tensor, per network."""
    out = dict(state)
    for k, t in state.items():
        if sigma <= 0 or not _is_weight(k, t):
            continue
        std = t.flatten(1).std(dim=1, correction=0).view(-1, *([1] * (t.dim() - 1)))
        noise = torch.randn(t.shape, generator=g).to(t)
        out[k] = t + sigma * std * noise
    return out


def weight_dropout(state: Mapping[str, Tensor], p: float, g: torch.Generator) -> StateDict:
    """Zero each weight entry with probability ``p`` and rescale the rest by ``1/(1-p)``."""
    out = dict(state)
    for k, t in state.items():
        if p <= 0 or not _is_weight(k, t):
            continue
        keep = (_rand(tuple(t.shape), g, t) >= p).to(t.dtype)
        out[k] = t * keep / (1 - p)
    return out


def quantile_prune(state: Mapping[str, Tensor], max_q: float, g: torch.Generator) -> StateDict:
    """Draw ``q ~ U(0, max_q)`` per network and zero every weight below the q-quantile of |w|."""
    if max_q <= 0:
        return dict(state)
    keys = [k for k, t in state.items() if _is_weight(k, t)]
    flat = torch.cat([state[k].flatten(1).abs() for k in keys], dim=1)
    ref = state[keys[0]]
    q = _rand((flat.shape[0],), g, ref) * max_q
    idx = (q * (flat.shape[1] - 1)).long().clamp(0, flat.shape[1] - 1)
    thresh = flat.sort(dim=1).values.gather(1, idx.unsqueeze(1)).squeeze(1)
    out = dict(state)
    for k in keys:
        t = state[k]
        out[k] = torch.where(
            t.abs() < thresh.view(-1, *([1] * (t.dim() - 1))), torch.zeros_like(t), t
        )
    return out


def positive_scaling(
    state: Mapping[str, Tensor], spec: PermutationSpec, rho: float, g: torch.Generator
) -> StateDict:
    """Scale each hidden neuron by ``s ~ U(1-rho, 1+rho)``: its incoming weights and bias times s,
    its outgoing weights divided by s. Exact for positively homogeneous activations (ReLU) without
    normalisation layers."""
    if rho <= 0:
        return dict(state)
    out = dict(state)
    batch = next(iter(state.values())).shape[0]
    for group, n in spec.groups.items():
        s = 1 + (torch.rand(batch, n, generator=g) * 2 - 1) * rho
        for m in spec.members[group]:
            t = out[m.key]
            if not _is_weight(m.key, t) or m.axis > 1:
                continue
            factor = s if m.axis == 0 else 1 / s
            factor = factor.repeat_interleave(m.inner, dim=1).to(t)
            shape = [batch] + [1] * (t.dim() - 1)
            shape[1 + m.axis] = factor.shape[1]
            out[m.key] = t * factor.view(shape)
    return out


@dataclass(frozen=True)
class Augment:
    """The paper's augmentation pipeline, in its order: noise, dropout, scaling, pruning."""

    noise: float = 1e-2
    dropout: float = 5e-2
    scaling: float = 0.1
    prune: float = 0.1

    def __call__(
        self, state: Mapping[str, Tensor], spec: PermutationSpec, g: torch.Generator
    ) -> StateDict:
        out = gaussian_noise(state, self.noise, g)
        out = weight_dropout(out, self.dropout, g)
        out = positive_scaling(out, spec, self.scaling, g)
        return quantile_prune(out, self.prune, g)
