"""Targets for implicit neural representations (INRs): coordinates -> values.

Two kinds, as in the paper: images (pixel grid in [-1, 1]^2 -> intensity) and 1-D sine waves
``sin(a x)`` on ``x in [-pi, pi]`` with ``a ~ U(0.5, 10)``. The LMC loss of an INR is the MSE of
``model(coords)`` against ``values``; ``InrTargets`` carries exactly that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deepalign.data.dataset import Dataset
from deepalign.errors import DeepAlignError

SINE_FREQ_RANGE = (0.5, 10.0)
SINE_POINTS = 128
PIXEL_OFFSET = 0.5  # INRs fit intensity - 0.5, so targets are centred in [-0.5, 0.5]


@dataclass(frozen=True)
class InrTargets:
    """``coords`` ``(P, d_in)`` shared by all targets; ``values`` ``(n, P, d_out)``, one row per target."""

    coords: Tensor
    values: Tensor

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def to(self, device: torch.device | str) -> InrTargets:
        return InrTargets(self.coords.to(device), self.values.to(device))


def coord_grid(height: int, width: int) -> Tensor:
    """Pixel centres of an ``height x width`` image in [-1, 1]^2, row-major, ``(H*W, 2)`` as (row, col)."""
    rows = torch.linspace(-1.0, 1.0, height)
    cols = torch.linspace(-1.0, 1.0, width)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)


def image_targets(dataset: Dataset, indices: Sequence[int] | Tensor) -> InrTargets:
    """Images ``indices`` of ``dataset`` as INR targets: values are intensity - 0.5, ``(n, H*W, C)``."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(dataset)):
        raise DeepAlignError(f"{dataset.name}/{dataset.split}: image index out of range")
    pix = dataset.pixels()[idx.to(dataset.x.device)]  # (n, C, H, W)
    n, c, h, w = pix.shape
    values = pix.permute(0, 2, 3, 1).reshape(n, h * w, c) - PIXEL_OFFSET
    return InrTargets(coord_grid(h, w).to(values.device), values.contiguous())


def sine_frequency(seed: int, wave: int) -> float:
    """Frequency ``a ~ U(0.5, 10)`` of wave number ``wave``; depends only on (seed, wave)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(wave)) % 2**63)
    lo, hi = SINE_FREQ_RANGE
    return float(lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64))


def sine_grid(points: int = SINE_POINTS) -> Tensor:
    """``(points, 1)`` evenly spaced on [-pi, pi]."""
    return torch.linspace(-math.pi, math.pi, points).unsqueeze(1)


def sine_targets(frequencies: Sequence[float] | Tensor, points: int = SINE_POINTS) -> InrTargets:
    """Waves ``sin(a x)`` for each frequency ``a``: values ``(n, points, 1)``."""
    a = torch.as_tensor(frequencies, dtype=torch.float32).reshape(-1, 1, 1)
    x = sine_grid(points)
    return InrTargets(x, torch.sin(a * x.unsqueeze(0)))
