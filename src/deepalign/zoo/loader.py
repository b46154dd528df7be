"""Read a zoo: its plan, its models' rows, stacked weights by index, data or INR targets.

This is the one reader every consumer (Deep-Align training, the bench, ``export``) uses.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deepalign.core.arch import Config, build
from deepalign.core.spec import PermutationSpec
from deepalign.core.user_model import config_example, spec_of
from deepalign.data import Dataset, load
from deepalign.data.inr import InrTargets
from deepalign.errors import DeepAlignError
from deepalign.zoo import storage
from deepalign.zoo.build import INR_IMAGE_SPLIT, targets_for
from deepalign.zoo.from_checkpoints import checkpoint_zoo_data
from deepalign.zoo.plan import CHECKPOINTS, SPLITS, ZooPlan
from deepalign.zoo.tasks import CLASSIFIER, INR_IMAGE
from deepalign.zoo.zoo_set import is_set, member_folders

DEFAULT_CACHE_BYTES = 2 << 30


class Zoo:
    """A zoo folder, read-only. Only trained models with finite weights are listed.

    ``Zoo(path)`` checks the manifest and every shard header (corrupt or foreign shards raise
    DeepAlignError). A zoo up to ``cache_bytes`` is read into memory whole on the first ``load``
    (then every ``load`` is one gather per tensor); larger zoos are read a shard at a time through
    an LRU cache of that size.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        data_dir: str | os.PathLike | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.path = Path(path)
        if not (self.path / storage.MANIFEST).is_file():
            if is_set(self.path):
                names = ", ".join(p.name for p in member_folders(self.path))
                raise DeepAlignError(
                    f"{self.path}: a zoo of several widths ({names}); name one member folder "
                    "(train takes the whole set)"
                )
            raise DeepAlignError(f"{self.path}: not a zoo folder (no {storage.MANIFEST})")
        self.plan: ZooPlan = storage.read_plan(self.path)
        self.info: dict[str, Any] = {
            k: v for k, v in storage.read_manifest(self.path).items() if k != "models"
        }
        self._data_dir = data_dir if data_dir is not None else self.info.get("data_dir")
        self.rows: list[dict[str, Any]] = storage.collect_rows(self.path, self.plan)
        self._usable = [r["index"] for r in self.rows if r["trained"] and r.get("finite", True)]
        self._usable_set = set(self._usable)
        self._full: dict[str, Tensor] | None = None
        self._cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._cache_bytes = cache_bytes

    # -- description ---------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        """The architecture config (``deepalign.core.arch.build`` rebuilds it)."""
        return self.plan.arch

    @property
    def task(self) -> str:
        return self.plan.task

    @property
    def kind(self) -> str:
        """``classifier``, ``inr-image`` or ``inr-sine``."""
        return self.plan.kind

    @property
    def manifest(self) -> list[dict[str, Any]]:
        """Rows of the usable models: index, seed, split, shard, metrics (and INR target/view)."""
        return [self.rows[i] for i in self._usable]

    @property
    def complete(self) -> bool:
        return all(r["trained"] for r in self.rows)

    def __len__(self) -> int:
        return len(self._usable)

    def __repr__(self) -> str:
        return f"Zoo({str(self.path)!r}, task={self.task}, models={len(self)}/{self.plan.n})"

    def indices(self, split: str = "all") -> list[int]:
        """Model indices of one split (``train``, ``val``, ``test``, or ``all``), ascending."""
        if split == "all":
            return list(self._usable)
        if split not in SPLITS:
            raise DeepAlignError(
                f"unknown zoo split {split!r} (choose from {', '.join(SPLITS)}, all)"
            )
        return [i for i in self._usable if self.rows[i]["split"] == split]

    def module(self) -> nn.Module:
        """A fresh instance of the zoo's architecture, in eval mode."""
        return build(self.config).eval()

    @cached_property
    def spec(self) -> PermutationSpec:
        module = self.module()
        return spec_of(module, config_example(self.config, module))

    # -- weights -------------------------------------------------------------------------------
    def load(
        self, indices: Sequence[int] | Tensor, device: str | torch.device | None = None
    ) -> dict[str, Tensor]:
        """Stacked state dicts ``{key: (len(indices), ...)}`` in the order given."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        if not idx:
            raise DeepAlignError(f"{self.path}: no model indices given")
        bad = [i for i in idx if i not in self._usable_set]
        if bad:
            raise DeepAlignError(
                f"{self.path}: model {bad[0]} is not in the zoo (indices 0..{self.plan.n - 1}, trained and finite)"
            )
        if self._full is None and self._zoo_bytes() <= self._cache_bytes:
            self._full = self._read_all()
        if self._full is not None:  # the whole zoo in memory: one gather per tensor
            rows = torch.tensor(idx)
            out = {n: t.index_select(0, rows) for n, t in self._full.items()}
        else:
            out = self._gather_by_shard(idx)
        return {n: t.to(device) for n, t in out.items()} if device is not None else out

    def _zoo_bytes(self) -> int:
        per_model = sum(
            t.numel() * t.element_size() for t in build(self.config).state_dict().values()
        )
        return per_model * self.plan.n

    def _read_all(self) -> dict[str, Tensor]:
        """Every shard concatenated (untrained shards as zeros); they are never served (checked above)."""
        parts: list[dict[str, Tensor]] = []
        template = build(self.config).state_dict()
        for k in range(self.plan.n_shards):
            count = len(self.plan.shard_indices(k))
            if self.rows[k * self.plan.shard_size]["trained"]:
                parts.append(self._read_shard(k))
            else:
                parts.append(
                    {n: torch.zeros((count, *t.shape), dtype=t.dtype) for n, t in template.items()}
                )
        return {n: torch.cat([p[n] for p in parts]) for n in template}

    def _gather_by_shard(self, idx: list[int]) -> dict[str, Tensor]:
        size = self.plan.shard_size
        by_shard: dict[int, list[int]] = {}
        for pos, i in enumerate(idx):
            by_shard.setdefault(i // size, []).append(pos)
        out: dict[str, Tensor] = {}
        for k, positions in by_shard.items():
            tensors = self._shard(k)
            local = torch.tensor([idx[p] - k * size for p in positions])
            if not out:
                out = {
                    n: torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype)
                    for n, t in tensors.items()
                }
            where = torch.tensor(positions)
            for n, t in tensors.items():
                out[n][where] = t.index_select(0, local)
        return out

    def batches(
        self,
        split: str,
        batch_size: int,
        generator: torch.Generator | None = None,
        shuffle: bool = False,
        device: str | torch.device | None = None,
    ) -> Iterator[tuple[list[int], dict[str, Tensor]]]:
        """``(indices, stacked weights)`` batches over one split."""
        idx = self.indices(split)
        if shuffle:
            idx = [idx[i] for i in torch.randperm(len(idx), generator=generator).tolist()]
        for s in range(0, len(idx), batch_size):
            part = idx[s : s + batch_size]
            yield part, self.load(part, device)

    def _read_shard(self, k: int) -> dict[str, Tensor]:
        tensors = storage.read_shard_tensors(self.path, k)
        want = {n: t.shape for n, t in build(self.config).state_dict().items()}
        count = len(self.plan.shard_indices(k))
        if {n: (count, *s) for n, s in want.items()} != {
            n: tuple(t.shape) for n, t in tensors.items()
        }:
            raise DeepAlignError(
                f"{storage.shard_path(self.path, k)}: tensors do not match the zoo's architecture"
            )
        return tensors

    def _shard(self, k: int) -> dict[str, Tensor]:
        """Shard ``k``'s tensors through the LRU cache (zoos larger than ``cache_bytes``)."""
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        tensors = self._read_shard(k)
        self._cache[k] = tensors
        total = sum(
            sum(t.numel() * t.element_size() for t in s.values()) for s in self._cache.values()
        )
        while total > self._cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            total -= sum(t.numel() * t.element_size() for t in old.values())
        return tensors

    # -- task data -----------------------------------------------------------------------------
    def dataset(self, split: str = "test") -> Dataset:
        """The classifier zoo's data set split (``train`` or ``test``; the full split, not a subset)."""
        if self.plan.task == CHECKPOINTS:
            return checkpoint_zoo_data(self.plan, split, self._data_dir)
        if self.kind != CLASSIFIER or self.plan.dataset is None:
            raise DeepAlignError(f"{self.path}: {self.task} is an INR zoo; use .targets(indices)")
        return load(self.plan.dataset, split, self._data_dir)

    def targets(self, indices: Sequence[int]) -> InrTargets:
        """INR zoos: shared coordinates and each model's target values ``(len(indices), P, d_out)``."""
        if self.kind == CLASSIFIER:
            raise DeepAlignError(
                f"{self.path}: {self.task} is a classifier zoo; use .dataset(split)"
            )
        rows = [self.rows[int(i)] for i in indices]
        data: dict[str, Any] = {}
        if self.kind == INR_IMAGE:
            assert self.plan.dataset is not None
            data["images"] = load(self.plan.dataset, INR_IMAGE_SPLIT, self._data_dir)
        return targets_for(self.plan, rows, data)


def open_zoos(folder: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> list[Zoo]:
    """The zoos in ``folder``: the one zoo, or every member of a zoo set (one per width)."""
    if is_set(folder):
        return [Zoo(p, data_dir) for p in member_folders(folder)]
    return [Zoo(folder, data_dir)]
