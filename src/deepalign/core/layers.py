"""The two small modules deepalign adds to torch's own: a sine activation and a residual block."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Sine(nn.Module):
    """``sin(w0 * x)``: the SIREN activation."""

    def __init__(self, w0: float = 30.0) -> None:
        super().__init__()
        self.w0 = float(w0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.w0 * x)

    def extra_repr(self) -> str:
        return f"w0={self.w0}"


class Residual(nn.Module):
    """``body(x) + shortcut(x)``; the shortcut is the identity when not given."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.shortcut(x)
