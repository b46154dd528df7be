"""What a zoo is: task, architecture, data, seeds, training settings, splits and shard layout.

The plan is fixed when a zoo folder is created (written to ``manifest.json``); reruns and
``--shard i/n`` workers must present the same plan. Every per-model fact (seed, split, shard,
INR target) is a pure function of the plan, so any worker can train any shard.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepalign.core.arch import Config, describe
from deepalign.core.seeds import derive_seed
from deepalign.data.inr import sine_frequency
from deepalign.errors import DeepAlignError
from deepalign.zoo.tasks import CLASSIFIER, INR_IMAGE, INR_SINE, get_task

FORMAT = "deepalign-zoo/1"
SPLITS = ("train", "val", "test")
CHECKPOINTS = "checkpoints"  # the task of a zoo made from checkpoint files (no training)


@dataclass(frozen=True)
class Training:
    """Optimiser settings (Adam, constant learning rate); ``epochs`` are full-batch steps for INRs."""

    epochs: int
    lr: float
    batch_size: int | None
    train_subset: int | None
    optimizer: str = "adam"


@dataclass(frozen=True)
class ZooPlan:
    task: str
    arch: Config
    dataset: str | None
    n: int
    seed: int
    shard_size: int
    training: Training
    views: int = 1
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    # -- identity ----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["split_fractions"] = list(self.split_fractions)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "manifest") -> ZooPlan:
        try:
            return cls(
                task=str(d["task"]),
                arch=dict(d["arch"]),
                dataset=d["dataset"],
                n=int(d["n"]),
                seed=int(d["seed"]),
                shard_size=int(d["shard_size"]),
                training=Training(**d["training"]),
                views=int(d.get("views", 1)),
                split_fractions=tuple(float(f) for f in d["split_fractions"]),  # type: ignore[arg-type]
                format=str(d["format"]),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DeepAlignError(
                f"{where}: malformed zoo plan ({exc.__class__.__name__}: {exc})"
            ) from None

    @property
    def fingerprint(self) -> str:
        """What identifies the zoo; a zoo from checkpoints may grow (new files), so its count and
        file list are not part of it (each shard records its files)."""
        d = self.to_json()
        if self.task == CHECKPOINTS:
            d.pop("n")
            d["extra"] = {k: v for k, v in d["extra"].items() if k != "sources"}
        text = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def differences(self, other: ZooPlan) -> list[str]:
        """Human-readable fields where ``other`` differs from this plan."""
        a, b = _flat(self.to_json()), _flat(other.to_json())
        return [
            f"{k} is {a.get(k)!r} there, {b.get(k)!r} here"
            for k in sorted(a | b)
            if a.get(k) != b.get(k)
        ]

    # -- layout --------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        if self.task == CHECKPOINTS:
            return CLASSIFIER if self.dataset else CHECKPOINTS
        return get_task(self.task).kind

    @property
    def n_shards(self) -> int:
        return -(-self.n // self.shard_size)

    def shard_indices(self, k: int) -> range:
        return range(k * self.shard_size, min(self.n, (k + 1) * self.shard_size))

    def model_seed(self, index: int) -> int:
        return derive_seed(self.seed, "model", index)

    def splits(self) -> list[str]:
        """The split of every model: a seeded shuffle cut 80/10/10 (or ``split_fractions``).

        INR zoos split by target, so every view of one image or wave lands in the same split. A
        zoo from checkpoints splits each file by a hash of its name and the seed, so files added
        later never move the others.
        """
        if self.task == CHECKPOINTS:
            cut = (self.split_fractions[0], self.split_fractions[0] + self.split_fractions[1])
            out = []
            for src in self.extra["sources"]:
                u = derive_seed(self.seed, "split", Path(src).name) / 2**63
                out.append("train" if u < cut[0] else "val" if u < cut[1] else "test")
            return out
        units = -(-self.n // self.views)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "split"))
        order = torch.randperm(units, generator=g).tolist()
        n_train = round(self.split_fractions[0] * units)
        n_val = round(self.split_fractions[1] * units)
        unit_split = [""] * units
        for pos, u in enumerate(order):
            unit_split[u] = "train" if pos < n_train else "val" if pos < n_train + n_val else "test"
        return [unit_split[i // self.views] for i in range(self.n)]

    def base_rows(self) -> list[dict[str, Any]]:
        """One row per model with what the plan fixes (metrics are added when it is trained)."""
        splits = self.splits()
        rows = []
        for i in range(self.n):
            row: dict[str, Any] = {
                "index": i,
                "seed": self.model_seed(i),
                "split": splits[i],
                "shard": i // self.shard_size,
            }
            if self.kind in (INR_IMAGE, INR_SINE):
                row["target"], row["view"] = i // self.views, i % self.views
            if self.kind == INR_SINE:
                row["frequency"] = sine_frequency(self.seed, i // self.views)
            if self.task == CHECKPOINTS:
                row["source"] = self.extra["sources"][i]
            rows.append(row)
        return rows


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "arch":
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def make_plan(
    task: str,
    n: int,
    seed: int = 0,
    *,
    hidden: Sequence[int] | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    train_subset: int | None = None,
    views: int | None = None,
    shard_size: int | None = None,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> ZooPlan:
    """A plan from the task's defaults and the given overrides; bad values give a DeepAlignError."""
    t = get_task(task)
    if n <= 0:
        raise DeepAlignError(f"--n must be positive, got {n}")
    for name, v in (
        ("epochs", epochs),
        ("batch-size", batch_size),
        ("views", views),
        ("shard-size", shard_size),
        ("train-subset", train_subset),
    ):
        if v is not None and v <= 0:
            raise DeepAlignError(f"--{name} must be positive, got {v}")
    if lr is not None and not lr > 0:
        raise DeepAlignError(f"--lr must be positive, got {lr}")
    fr = tuple(float(f) for f in split_fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise DeepAlignError(
            f"split fractions must be three non-negative numbers summing to 1, got {list(fr)}"
        )
    v = views if views is not None else t.views
    if t.kind == "classifier" and v != 1:
        raise DeepAlignError(f"--views applies to INR tasks, not {task}")
    if t.kind != "classifier" and batch_size is not None:
        raise DeepAlignError(f"{task} fits INRs full-batch; --batch-size does not apply")
    if t.kind != "classifier" and train_subset is not None:
        raise DeepAlignError(f"--train-subset applies to classifier tasks, not {task}")
    training = Training(
        epochs=epochs or t.epochs,
        lr=float(lr or t.lr),
        batch_size=(batch_size or t.batch_size) if t.kind == "classifier" else None,
        train_subset=(train_subset or t.train_subset) if t.kind == "classifier" else None,
    )
    return ZooPlan(
        task=task,
        arch=describe(t.module(hidden)),
        dataset=t.dataset,
        n=int(n),
        seed=int(seed),
        shard_size=int(shard_size or t.shard_size),
        training=training,
        views=int(v),
        split_fractions=fr,  # type: ignore[arg-type]
    )
