"""The in-memory data set every consumer sees: normalised image tensors, labels, seeded batching."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from deepalign.errors import DeepAlignError


@dataclass(frozen=True)
class Dataset:
    """``x``: float32 ``(N, C, H, W)`` normalised with the data set's fixed mean/std; ``y``: long ``(N,)``.

    The tensors may be shared with an in-process cache: treat them as read-only.
    """

    x: Tensor
    y: Tensor
    n_classes: int
    name: str
    split: str = "train"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x, y)`` batches in order, or in a random order drawn from ``generator`` when ``shuffle``."""
        if batch_size <= 0:
            raise DeepAlignError(f"batch size must be positive, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size].to(self.x.device)
                yield self.x[idx], self.y[idx]

    def subset(self, n: int, seed: int = 0) -> Dataset:
        """``n`` examples drawn without replacement by ``seed`` (a fixed subset, e.g. for fast zoos)."""
        if not 0 < n <= len(self):
            raise DeepAlignError(
                f"{self.name}/{self.split}: subset of {n} from {len(self)} examples"
            )
        if n == len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        idx = idx.sort().values.to(self.x.device)
        return self._replace(self.x[idx], self.y[idx])

    def to(self, device: torch.device | str) -> Dataset:
        return self._replace(self.x.to(device), self.y.to(device))

    def pixels(self) -> Tensor:
        """Intensities in [0, 1] (the normalisation undone), ``(N, C, H, W)``."""
        mean = torch.tensor(self.mean, dtype=self.x.dtype, device=self.x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=self.x.dtype, device=self.x.device).view(1, -1, 1, 1)
        return self.x * std + mean

    def _replace(self, x: Tensor, y: Tensor) -> Dataset:
        return Dataset(x, y, self.n_classes, self.name, self.split, self.mean, self.std)
