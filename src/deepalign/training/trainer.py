"""``train_aligner``: the whole training run on a zoo, resumable, writing an aligner folder.

The output folder holds the aligner (``config.json`` + ``model.safetensors``, the best epoch by
validation barrier), ``metrics.jsonl``, ``training.png`` and ``train_state.pt`` (the latest epoch,
for ``--resume``; read back with ``weights_only=True``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deepalign.core import permutation as P
from deepalign.core.weight_space import WeightSpaceLayout
from deepalign.errors import DeepAlignError
from deepalign.lmc.curves import lmc_curves
from deepalign.nn.model import DeepAlign, DeepAlignConfig
from deepalign.nn.pretrained import save_pretrained
from deepalign.training.augment import Augment
from deepalign.training.loop import (
    TrainConfig,
    load_training_state,
    plot_history,
    save_training_state,
    train_epoch,
    write_metrics,
)
from deepalign.zoo.loader import Zoo

STATE_FILE = "train_state.pt"


def _pairs(indices: list[int], n: int, seed: int) -> tuple[list[int], list[int]]:
    """``n`` fixed pairs of distinct networks from ``indices``."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, len(indices), (n,), generator=g)
    shift = 1 + torch.randint(0, len(indices) - 1, (n,), generator=g)
    second = (first + shift) % len(indices)
    return [indices[i] for i in first.tolist()], [indices[i] for i in second.tolist()]


@torch.no_grad()
def planted_accuracy(
    model: DeepAlign, spec, states: dict[str, Tensor], augment: Augment, seed: int
) -> float:
    """Fraction of neurons whose planted permutation ``(v, t # aug(v))`` the model recovers."""
    g = torch.Generator().manual_seed(seed)
    n = next(iter(states.values())).shape[0]
    t = P.random_permutation(spec, generator=g, batch=n)
    moved = P.apply(spec, t, augment(states, spec, g), batch_dims=1)
    pred = model.align(states, moved)
    want = P.invert(t)
    hits = sum(int((pred[k].cpu() == want[k]).sum()) for k in want)
    total = sum(v.numel() for v in want.values())
    return hits / total


@torch.no_grad()
def validate(
    model: DeepAlign, zoo: Zoo, val: tuple[dict, dict], data, cfg: TrainConfig, device
) -> dict[str, float]:
    """Hard permutations on the fixed validation pairs: barrier, loss at λ=0.5, planted accuracy."""
    spec = zoo.spec
    a, b = val
    perm = model.align(a, b)
    aligned = P.apply(spec, perm, b, batch_dims=1)
    curves = lmc_curves(zoo.module(), a, aligned, data, points=cfg.val_points)
    mid = curves["loss"][:, curves["loss"].shape[1] // 2]
    return {
        "val_barrier": float(torch.as_tensor(curves["barrier"]).mean()),
        "val_loss_mid": float(mid.mean()),
        "val_perm_accuracy": planted_accuracy(model, spec, a, Augment(**cfg.augment), cfg.seed + 7),
    }


def train_aligner(
    zoo_path: str | Path,
    out: str | Path,
    model_config: DeepAlignConfig | None = None,
    cfg: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> dict[str, Any]:
    """Train a Deep-Align aligner on ``zoo_path``'s train split; returns the final history row."""
    cfg = cfg or TrainConfig()
    model_config = model_config or DeepAlignConfig()
    device = torch.device(device)
    out = Path(out)
    zoo = Zoo(zoo_path)
    if zoo.kind != "classifier":
        raise DeepAlignError(
            f"{zoo_path}: training on {zoo.task} zoos is not supported yet (classifier zoos only)"
        )
    train_idx, val_idx = zoo.indices("train"), zoo.indices("val")
    if len(train_idx) < 2 or len(val_idx) < 2:
        raise DeepAlignError(f"{zoo_path}: needs at least 2 train and 2 val networks")
    state_path = out / STATE_FILE
    settings = {  # what must not change across --resume (the epoch count may grow)
        "train": {k: v for k, v in asdict(cfg).items() if k != "epochs"},
        "model": model_config.to_dict(),
        "zoo": str(Path(zoo_path).resolve()),
    }
    if state_path.exists() and not resume:
        raise DeepAlignError(
            f"{out}: already holds a training run; pass --resume or choose another --out"
        )
    torch.manual_seed(cfg.seed)
    layout = WeightSpaceLayout.from_config(zoo.config)
    model = DeepAlign(layout, model_config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True
    )
    start, best, history = 0, float("inf"), []
    if resume and state_path.exists():
        saved = load_training_state(state_path)
        stored = json.loads(saved.get("settings", "{}"))
        if stored and stored != json.loads(json.dumps(settings)):
            raise DeepAlignError(
                f"{out}: --resume with different settings than the interrupted run"
            )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start, best = int(saved["epoch"]) + 1, float(saved["best"])
        history = json.loads(saved["history"])
    train_states = zoo.load(train_idx)
    data = zoo.dataset("train")
    data_x, data_y = data.x, data.y
    val_a, val_b = _pairs(val_idx, min(cfg.val_pairs, 4 * len(val_idx)), cfg.seed + 1)
    val = (zoo.load(val_a, device), zoo.load(val_b, device))
    val_data = data.subset(min(512, len(data)), seed=cfg.seed)
    info = {
        "zoo": str(zoo_path),
        "task": zoo.task,
        "n_train_networks": len(train_idx),
        "train": asdict(cfg),
    }
    for epoch in range(start, cfg.epochs):
        row_train = train_epoch(
            model,
            optimizer,
            layout.spec,
            zoo.module().to(device),
            train_states,
            data_x,
            data_y,
            cfg,
            epoch,
            device,
            on_step=(lambda s, m, e=epoch: on_step(e, s, m)) if on_step else None,
        )
        row = {
            "epoch": epoch,
            "train": row_train,
            **validate(model, zoo, val, val_data, cfg, device),
        }
        history.append(row)
        if row["val_barrier"] < best:
            best = row["val_barrier"]
            save_pretrained(model, out, zoo.config, {**info, "epoch": epoch, "metrics": row})
        write_metrics(out / "metrics.jsonl", history)
        plot_history(out / "training.png", history)
        save_training_state(
            state_path, model, optimizer, epoch, best, history, json.dumps(settings)
        )
        if on_epoch is not None:
            on_epoch(row)
    if not (out / "config.json").exists():
        raise DeepAlignError(f"{out}: no epoch was trained (epochs={cfg.epochs})")
    return history[-1] if history else {}
