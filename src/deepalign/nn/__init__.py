"""Deep-Align's network: equivariant weight-space layers and the siamese matching model."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DeepAlign", "DeepAlignConfig"]


def __getattr__(name: str) -> Any:  # torch loads with the model, not with nn.sizes
    if name in __all__:
        value = getattr(importlib.import_module("deepalign.nn.model"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepalign.nn' has no attribute {name!r}")
