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


def as_examples(data: Any) -> Any:
    """What a caller holds as data, in a form every solver and curve reads: a Dataset, an input
    tensor and an ``(x, y)`` pair pass through; any other iterable of ``(x, y)`` batches (a list,
    a ``DataLoader``, a generator) is gathered into one ``(x, y)`` pair in memory."""
    if data is None or hasattr(data, "batches") or isinstance(data, Tensor):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        if not isinstance(y, Tensor) or y.shape[0] != x.shape[0]:
            raise DeepAlignError(
                "data: an (x, y) pair needs a tensor y with one label per example of x"
            )
        return x, y
    try:
        batches = list(data)
    except TypeError:
        raise DeepAlignError(
            f"data: expected a Dataset, a tensor, an (x, y) pair or batches of them, got "
            f"{type(data).__name__}"
        ) from None
    if not batches:
        raise DeepAlignError("data: no batches")
    if all(isinstance(b, Tensor) for b in batches):
        return torch.cat(batches)
    if not all(isinstance(b, (tuple, list)) and len(b) >= 2 for b in batches):
        raise DeepAlignError("data: expected batches of (x, y) tensors")
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


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
