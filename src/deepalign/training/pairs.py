"""What a training pair and its task loss look like for each kind of zoo.

Classifier zoos pair any two train networks and score the interpolated network with cross-entropy
on a random data batch. INR zoos pair two views (independent fits) of the same target, as the
paper does, and score it with the MSE to that target on every coordinate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deepalign.errors import DeepAlignError
from deepalign.zoo.loader import Zoo

Criterion = Callable[[Tensor, Tensor], Tensor]


def _mse(out: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(out, target)


@dataclass
class PairTask:
    """Partners and task batches for networks stacked in ``indices`` order."""

    indices: list[int]
    partners: list[list[int]] | None  # per position: positions it may pair with (None: any other)
    x: Tensor  # classifier images, or INR coordinates
    y: Tensor  # classifier labels, or INR target values (one row per position)
    inr: bool
    data_batch: int = 32

    def partner(self, pos: Tensor, g: torch.Generator) -> Tensor:
        """A partner position for each position in ``pos`` (never itself)."""
        n = len(self.indices)
        if self.partners is None:
            return (pos + 1 + torch.randint(0, n - 1, pos.shape, generator=g)) % n
        picks = torch.rand(pos.shape, generator=g)
        return torch.tensor(
            [
                self.partners[p][int(r * len(self.partners[p]))]
                for p, r in zip(pos.tolist(), picks.tolist(), strict=True)
            ]
        )

    def batch(
        self, pos: Tensor, g: torch.Generator, device: torch.device
    ) -> tuple[Tensor, Tensor, Criterion | None]:
        """``(x, target, criterion)`` for the task loss of the pairs whose A is at ``pos``."""
        if self.inr:
            return self.x.to(device), self.y[pos].to(device), _mse
        pick = torch.randint(0, self.x.shape[0], (self.data_batch,), generator=g)
        return self.x[pick].to(device), self.y[pick].to(device), None


def pair_task(zoo: Zoo, split: str, data_batch: int = 32) -> PairTask:
    """The pairing rule and task data of ``split`` of ``zoo``."""
    indices = zoo.indices(split)
    if zoo.kind == "classifier":
        data = zoo.dataset("train")
        return PairTask(indices, None, data.x, data.y, inr=False, data_batch=data_batch)
    by_target: dict[int, list[int]] = {}
    for pos, i in enumerate(indices):
        by_target.setdefault(int(zoo.rows[i]["target"]), []).append(pos)
    keep = [pos for views in by_target.values() if len(views) >= 2 for pos in views]
    if len(keep) < 2:
        raise DeepAlignError(
            f"{zoo.path}: INR training pairs two views of one target; the {split} split has none "
            "(build the zoo with --views 2 or more)"
        )
    indices = [indices[p] for p in keep]
    remap = {old: new for new, old in enumerate(keep)}
    partners = []
    for old in keep:
        target = int(zoo.rows[indices[remap[old]]]["target"])
        partners.append([remap[p] for p in by_target[target] if p != old])
    tg = zoo.targets(indices)
    return PairTask(indices, partners, tg.coords, tg.values, inr=True, data_batch=data_batch)
