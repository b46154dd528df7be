"""Train a Deep-Align aligner on a zoo: pairs, losses, AdamW, validation, resumable checkpoints.

Each step draws B networks of the train split as view A. The supervised pair is
``(A, t # aug(A))`` with a fresh random permutation ``t`` (label ``t⁻¹``); the unsupervised pair is
``(A, A')`` with ``A'`` another train network. Both go through the model in one batch. Randomness
is derived from ``(seed, epoch)``, so resuming from an epoch checkpoint replays exactly what an
uninterrupted run does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deepalign.core import permutation as P
from deepalign.core.io import atomic_path, atomic_write_text
from deepalign.errors import DeepAlignError
from deepalign.training.augment import Augment
from deepalign.training.distributed import Ranks
from deepalign.training.losses import alignment_loss, lmc_loss, supervised_loss
from deepalign.training.pairs import PairTask


@dataclass
class TrainConfig:
    """Optimisation settings (paper defaults where CPU allows; see PAPER §4.3)."""

    epochs: int = 30
    batch: int = 32
    steps_per_epoch: int | None = None  # default: len(train split) // batch
    lr: float = 3e-3
    schedule: str = "cosine"  # "cosine" (to 5% of lr over all epochs) or "constant"
    weight_decay: float = 5e-4
    grad_clip: float = 1.0
    w_supervised: float = 1.0
    w_alignment: float = 1.0
    w_lmc: float = 1.0
    data_batch: int = 32
    val_pairs: int = 64
    val_points: int = 5
    seed: int = 0
    augment: dict = field(default_factory=lambda: asdict(Augment()))

    def validate(self) -> None:
        """One-line errors for settings no run can use (named as the CLI flags)."""

        def finite(x: float) -> bool:
            return isinstance(x, int | float) and math.isfinite(x)

        if not (finite(self.lr) and self.lr > 0):
            raise DeepAlignError(f"--lr {self.lr}: must be a positive number")
        weights = {
            "--w-supervised": self.w_supervised,
            "--w-alignment": self.w_alignment,
            "--w-lmc": self.w_lmc,
        }
        for flag, w in weights.items():
            if not (finite(w) and w >= 0):
                raise DeepAlignError(f"{flag} {w}: loss weights must be finite and >= 0")
        if not any(weights.values()):
            raise DeepAlignError("every loss weight is 0: nothing to train")
        if self.schedule not in ("cosine", "constant"):
            raise DeepAlignError(
                f"unknown learning-rate schedule {self.schedule!r} (cosine or constant)"
            )
        counts = {
            "--epochs": self.epochs,
            "--batch": self.batch,
            "data batch": self.data_batch,
            "validation pairs": self.val_pairs,
        }
        if self.steps_per_epoch is not None:
            counts["--steps"] = self.steps_per_epoch
        for flag, n in counts.items():
            if not isinstance(n, int) or n < 1:
                raise DeepAlignError(f"{flag} {n}: must be a positive integer")
        if self.val_points < 2:
            raise DeepAlignError(f"validation points {self.val_points}: need at least 2")
        if not (finite(self.grad_clip) and self.grad_clip > 0):
            raise DeepAlignError(f"gradient clip {self.grad_clip}: must be a positive number")
        if not (finite(self.weight_decay) and self.weight_decay >= 0):
            raise DeepAlignError(f"weight decay {self.weight_decay}: must be >= 0")


def learning_rate(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate at ``step`` of ``total``: cosine decay to 5% of ``cfg.lr``, or constant."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule != "cosine":
        raise DeepAlignError(
            f"unknown learning-rate schedule {cfg.schedule!r} (cosine or constant)"
        )
    floor = 0.05 * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (
        1 + math.cos(math.pi * min(step, total) / max(total, 1))
    )


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def save_training_state(
    path: Path, model, optimizer, epoch: int, best: float, history: list[dict], settings: str = "{}"
) -> None:
    """Everything needed to resume, as tensors + JSON (loaded back with weights_only=True)."""
    state = {
        "settings": settings,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": torch.tensor(epoch),
        "best": torch.tensor(best),
        "history": json.dumps(history),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the checkpoint is unusable
        raise DeepAlignError(
            f"{path}: corrupt training checkpoint ({exc.__class__.__name__})"
        ) from None


@dataclass
class TrainGroup:
    """The training networks of one architecture (one width of a zoo set): a step draws all its
    pairs from one group, since pairs are aligned within one architecture."""

    layout: Any  # deepalign.nn.weight_space.WeightSpaceLayout
    module: torch.nn.Module
    states: dict[str, Tensor]
    task: PairTask

    @property
    def spec(self):
        return self.layout.spec

    @property
    def size(self) -> int:
        return next(iter(self.states.values())).shape[0]


def train_epoch(
    model,
    optimizer,
    groups: list[TrainGroup],
    cfg: TrainConfig,
    epoch: int,
    device: torch.device,
    on_step: Callable[[int, dict], None] | None = None,
    ranks: Ranks | None = None,
    net=None,
) -> dict:
    """One epoch of steps; returns the mean of each loss term (of this rank's pairs).

    Every step draws the whole global batch's randomness (the group when there are several,
    pairs, planted permutations, augmentations, the data batch, lam), then computes the loss of
    this rank's slice of the pairs (``ranks``; all of them in a single process) with ``net`` (the
    model, or its DDP wrapper)."""
    ranks = ranks or Ranks()
    net = net if net is not None else model
    g = _epoch_generator(cfg.seed, epoch)
    torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout inside the model
    augment = Augment(**cfg.augment)
    sizes = torch.tensor([float(grp.size) for grp in groups])
    steps = cfg.steps_per_epoch or max(1, int(sizes.sum()) // cfg.batch)
    # one shuffled order per group (a single group: exactly the order a one-zoo run always drew)
    orders = [torch.randperm(grp.size, generator=g) for grp in groups]
    used = [0] * len(groups)
    sums = {"loss": 0.0, "supervised": 0.0, "alignment": 0.0, "lmc": 0.0}
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, epoch * steps + step, cfg.epochs * steps)
        k = 0 if len(groups) == 1 else int(torch.multinomial(sizes, 1, generator=g))
        grp = groups[k]
        spec, task, states = grp.spec, grp.task, grp.states
        n_train = grp.size
        idx = orders[k][(torch.arange(cfg.batch) + used[k] * cfg.batch) % n_train]
        used[k] += 1
        other = task.partner(idx, g)
        a = {key: v[idx].to(device) for key, v in states.items()}
        b = {key: v[other].to(device) for key, v in states.items()}
        t = P.random_permutation(spec, generator=g, batch=cfg.batch)
        planted = P.apply(spec, t, augment(a, spec, g), batch_dims=1)
        target = {key: v.to(device) for key, v in P.invert(t).items()}
        if cfg.w_lmc:
            x, y, criterion = task.batch(idx, g, device)
            lam = torch.rand(cfg.batch, generator=g)
        mine = ranks.share(cfg.batch)  # this rank's pairs
        a, b, planted = ({key: v[mine] for key, v in s.items()} for s in (a, b, planted))
        target = {key: v[mine] for key, v in target.items()}
        n = a[next(iter(a))].shape[0]
        both_a = {key: torch.cat([a[key], a[key]]) for key in a}
        both_b = {key: torch.cat([planted[key], b[key]]) for key in b}
        scores = net(both_a, both_b, grp.layout)
        sup_scores = {key: q[:n] for key, q in scores.items()}
        soft = model.soft({key: q[n:] for key, q in scores.items()})
        terms = {"supervised": supervised_loss(sup_scores, target)}
        if cfg.w_alignment:
            terms["alignment"] = alignment_loss(spec, a, b, soft)
        if cfg.w_lmc:
            if task.inr:  # per-pair targets: this rank's rows
                y = y[mine]
            terms["lmc"] = lmc_loss(
                spec, grp.module, a, b, soft, x, y, None, criterion, lam=lam[mine]
            )
        weights = {"supervised": cfg.w_supervised, "alignment": cfg.w_alignment, "lmc": cfg.w_lmc}
        loss = sum(weights[key] * v for key, v in terms.items())
        if not torch.isfinite(loss):
            raise DeepAlignError(
                f"training diverged at epoch {epoch} step {step} (loss {loss.item()})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        sums["loss"] += loss.item()
        for key, v in terms.items():
            sums[key] += v.item()
        if on_step is not None:
            on_step(step, {key: v / (step + 1) for key, v in sums.items()})
    return {key: v / steps for key, v in sums.items()}


def write_metrics(path: Path, history: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in history))


def plot_history(path: Path, history: list[dict]) -> None:
    """Training curves: the loss terms and the validation barrier per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("loss", "supervised", "alignment", "lmc"):
        vals = [r["train"].get(key, math.nan) for r in history]
        axes[0].plot(epochs, vals, label=key)
    axes[0].set_xlabel("epoch")
    axes[0].set_title("training losses")
    axes[0].legend()
    for key in ("val_barrier", "val_loss_mid", "val_perm_accuracy"):
        axes[1].plot(epochs, [r.get(key, math.nan) for r in history], label=key)
    axes[1].set_xlabel("epoch")
    axes[1].set_title("validation")
    axes[1].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
