"""Build a zoo: train its shards (all, or one worker's slice), resumably, into a folder.

A shard is the unit of work and of storage: its models train together in one batched run and land
in one atomic file. Shard ``k`` belongs to worker ``k mod n`` of ``--shard i/n``. Rerunning after a
kill skips the shards on disk and trains the rest; since each shard's models depend only on the
plan, the result is the same, bit for bit, on the same device and thread count.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deepalign.core.seeds import derive_seed
from deepalign.data import Dataset, load, resolve_dir
from deepalign.data.inr import InrTargets, image_targets, sine_targets
from deepalign.errors import DeepAlignError
from deepalign.zoo import storage
from deepalign.zoo.batched import init_states, make_forward
from deepalign.zoo.plan import ZooPlan
from deepalign.zoo.tasks import CLASSIFIER, INR_IMAGE
from deepalign.zoo.train import evaluate_classifiers, fit_inrs, train_classifiers

INR_IMAGE_SPLIT = "train"  # INR image zoos fit images of this split, in order


@dataclass(frozen=True)
class ShardSlice:
    """Worker ``index`` of ``count`` (``--shard i/n``, 0-based)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None, env: Mapping[str, str] | None = None) -> ShardSlice:
        """``i/n``, or ``auto``: the job array's index and count from the scheduler's environment
        (Slurm's ``SLURM_ARRAY_TASK_ID`` minus ``SLURM_ARRAY_TASK_MIN``, and
        ``SLURM_ARRAY_TASK_COUNT``; or ``DEEPALIGN_SHARD_INDEX`` and ``DEEPALIGN_SHARD_COUNT``)."""
        if not text:
            return cls()
        if text == "auto":
            return cls.from_env(os.environ if env is None else env)
        try:
            i, n = (int(p) for p in text.split("/"))
        except ValueError:
            raise DeepAlignError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
        if n <= 0 or not 0 <= i < n:
            raise DeepAlignError(f"--shard {text!r}: need 0 <= i < n")
        return cls(i, n)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ShardSlice:
        pairs = (
            ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
            ("DEEPALIGN_SHARD_INDEX", "DEEPALIGN_SHARD_COUNT"),
        )
        for index_key, count_key in pairs:
            if index_key in env and count_key in env:
                try:
                    index, count = int(env[index_key]), int(env[count_key])
                    if index_key.startswith("SLURM"):
                        index -= int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
                except ValueError:
                    raise DeepAlignError(
                        f"--shard auto: {index_key}/{count_key} are not integers"
                    ) from None
                return cls.parse(f"{index}/{count}")
        raise DeepAlignError(
            "--shard auto: no job array in the environment (SLURM_ARRAY_TASK_ID and "
            "SLURM_ARRAY_TASK_COUNT, or DEEPALIGN_SHARD_INDEX and DEEPALIGN_SHARD_COUNT)"
        )

    def shards(self, plan: ZooPlan) -> list[int]:
        return [k for k in range(plan.n_shards) if k % self.count == self.index]


def order_seed(model_seed: int) -> int:
    """The seed of a model's data order (its init uses the model seed itself)."""
    return derive_seed(model_seed, "order")


def task_data(plan: ZooPlan, data_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Everything the plan's models train and test on (loaded before the folder is touched)."""
    if plan.kind == CLASSIFIER:
        assert plan.dataset is not None
        train = load(plan.dataset, "train", data_dir)
        if plan.training.train_subset is not None and plan.training.train_subset < len(train):
            train = train.subset(plan.training.train_subset, seed=derive_seed(plan.seed, "subset"))
        return {"train": train, "test": load(plan.dataset, "test", data_dir)}
    if plan.kind == INR_IMAGE:
        assert plan.dataset is not None
        images = load(plan.dataset, INR_IMAGE_SPLIT, data_dir)
        n_targets = -(-plan.n // plan.views)
        if n_targets > len(images):
            raise DeepAlignError(
                f"{plan.task}: {n_targets} images needed but {plan.dataset} has {len(images)}"
            )
        return {"images": images}
    return {}


def targets_for(plan: ZooPlan, rows: list[dict[str, Any]], data: dict[str, Any]) -> InrTargets:
    """The INR targets of the models ``rows`` (one value row per model)."""
    if plan.kind == INR_IMAGE:
        images: Dataset = data["images"]
        return image_targets(images, [r["target"] for r in rows])
    return sine_targets([r["frequency"] for r in rows])


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def train_shard(
    plan: ZooPlan,
    k: int,
    data: dict[str, Any],
    device: torch.device,
    progress: Callable[[float], None] | None = None,
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Train shard ``k``'s models; returns their stacked weights and metric rows."""
    base = plan.base_rows()
    rows = [base[i] for i in plan.shard_indices(k)]
    seeds = [r["seed"] for r in rows]
    init = init_states(plan.arch, seeds)
    forward = make_forward(plan.arch, device)
    t = plan.training
    out: list[dict[str, Any]] = []
    if plan.kind == CLASSIFIER:
        train, test = data["train"].to(device), data["test"].to(device)
        params, train_loss = train_classifiers(
            forward,
            init,
            train.x,
            train.y,
            [order_seed(s) for s in seeds],
            t.epochs,
            int(t.batch_size or len(train)),
            t.lr,
            progress,
        )
        test_loss, test_acc = evaluate_classifiers(forward, params, test.x, test.y)
        for j, r in enumerate(rows):
            out.append(
                {
                    "index": r["index"],
                    "train_loss": _finite(train_loss[j].item()),
                    "test_loss": _finite(test_loss[j].item()),
                    "test_accuracy": float(test_acc[j].item()),
                }
            )
    else:
        tg = targets_for(plan, rows, data).to(device)
        params, mse = fit_inrs(forward, init, tg.coords, tg.values, t.epochs, t.lr, progress)
        out = [
            {"index": r["index"], "test_loss": _finite(mse[j].item())} for j, r in enumerate(rows)
        ]
    finite = torch.stack([torch.isfinite(v.flatten(1)).all(1) for v in params.values()]).all(0)
    for j, stats in enumerate(out):
        stats["finite"] = bool(finite[j])
    return params, out


def build_zoo(
    plan: ZooPlan,
    out: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    shard: ShardSlice = ShardSlice(),
    device: str | torch.device = "cpu",
    on_progress: Callable[[float], None] | None = None,
    data: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train the shards of ``shard``'s slice that are not on disk yet; returns every model's row.

    ``on_progress(models)`` receives the number of this slice's models done so far (fractional
    while a shard trains). Existing shards are checked, never rewritten. ``data`` is what
    :func:`prepare_zoo` returned (it is called here when omitted).
    """
    folder = Path(out)
    device = torch.device(device)
    if data is None:
        data = prepare_zoo(plan, folder, data_dir)
    done = 0.0
    for k in shard.shards(plan):
        size = len(plan.shard_indices(k))
        if storage.read_shard_rows(folder, k, plan) is None:
            start = done

            def step(frac: float, start: float = start, size: int = size) -> None:
                if on_progress is not None:
                    on_progress(start + frac * size)

            params, rows = train_shard(plan, k, data, device, step)
            storage.write_shard(folder, k, plan, params, rows)
            with storage.folder_lock(folder):
                storage.write_manifest(folder, plan, _data_dir_of(folder))
        done += size
        if on_progress is not None:
            on_progress(done)
    with storage.folder_lock(folder):
        rows = storage.write_manifest(folder, plan, _data_dir_of(folder))
        if all(r["trained"] for r in rows):
            storage.remove_stale_temporaries(folder)
    return rows


def prepare_zoo(
    plan: ZooPlan, out: str | os.PathLike, data_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Load the task's data, then create the folder or check it holds this zoo; returns the data.

    A missing data set or a folder holding something else fails here, before any training.
    """
    data = task_data(plan, data_dir)
    resolved = resolve_dir(plan.dataset, data_dir) if plan.dataset else None
    storage.open_folder(Path(out), plan, str(resolved) if resolved else None)
    return data


def already_trained(plan: ZooPlan, out: str | os.PathLike, shard: ShardSlice = ShardSlice()) -> int:
    """How many models of ``shard``'s slice are on disk already."""
    folder = Path(out)
    return sum(
        len(plan.shard_indices(k))
        for k in shard.shards(plan)
        if storage.read_shard_rows(folder, k, plan) is not None
    )


def _data_dir_of(folder: Path) -> str | None:
    return storage.read_manifest(folder).get("data_dir")
