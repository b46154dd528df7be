"""Batches from whatever data a caller holds: a Dataset, a tensor of inputs, or an ``(x, y)`` pair."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from deepalign.errors import DeepAlignError


def labelled_batches(
    data: Any,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = False,
    device: torch.device | str | None = None,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """``(x, y)`` batches (``y`` is None for bare inputs), moved to ``device`` when given.

    ``data`` is a :class:`deepalign.data.Dataset` (anything with ``batches``), a tensor of inputs, or
    a tuple ``(x, y)`` of tensors with one leading example axis.
    """
    if batch_size <= 0:
        raise DeepAlignError(f"batch size must be positive, got {batch_size}")
    if hasattr(data, "batches"):
        source = data.batches(batch_size, generator=generator, shuffle=shuffle)
    else:
        if isinstance(data, Tensor):
            inputs, labels = data, None
        elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
            inputs, labels = data
        else:
            raise DeepAlignError(
                f"data: expected a Dataset, a tensor or an (x, y) pair, got {type(data).__name__}"
            )
        source = _chunks(inputs, labels, batch_size, generator, shuffle)
    for x, y in source:
        if device is not None:
            x = x.to(device)
            y = None if y is None else y.to(device)
        yield x, y


def n_examples(data: Any) -> int:
    """How many examples ``data`` holds."""
    if hasattr(data, "batches"):
        return len(data)
    if isinstance(data, Tensor):
        return int(data.shape[0])
    return int(data[0].shape[0])


def _chunks(
    x: Tensor, y: Tensor | None, batch_size: int, generator: torch.Generator | None, shuffle: bool
) -> Iterator[tuple[Tensor, Tensor | None]]:
    n = x.shape[0]
    order = torch.randperm(n, generator=generator).to(x.device) if shuffle else None
    for s in range(0, n, batch_size):
        idx = slice(s, s + batch_size) if order is None else order[s : s + batch_size]
        yield x[idx], (None if y is None else y[idx])
