"""``train_aligner``: the whole training run on a zoo, resumable, writing an aligner folder.

The output folder holds the aligner (``config.json`` + ``model.safetensors``, the best epoch by
validation barrier), ``metrics.jsonl``, ``training.png`` and ``train_state.pt`` (the latest epoch,
for ``--resume``; read back with ``weights_only=True``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deepalign.core import permutation as P
from deepalign.core.functional import batched_forward
from deepalign.errors import DeepAlignError
from deepalign.lmc.curves import lmc_curves
from deepalign.lmc.metrics import barrier
from deepalign.nn.model import DeepAlign, DeepAlignConfig
from deepalign.nn.weight_space import WeightSpaceLayout
from deepalign.training.augment import Augment
from deepalign.training.distributed import local_device, setup
from deepalign.training.loop import (
    TrainConfig,
    TrainGroup,
    load_training_state,
    plot_history,
    save_training_state,
    train_epoch,
    write_metrics,
)
from deepalign.training.losses import interpolate_pairs
from deepalign.training.pairs import PairTask, pair_task
from deepalign.zoo.loader import Zoo, open_zoos

STATE_FILE = "train_state.pt"


def _pairs(task: PairTask, n: int, seed: int) -> tuple[list[int], list[int]]:
    """``n`` fixed validation pairs (positions in ``task.indices``) under the task's pairing rule."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, len(task.indices), (n,), generator=g)
    return first.tolist(), task.partner(first, g).tolist()


@torch.no_grad()
def planted_accuracy(
    model: DeepAlign, spec, states: dict[str, Tensor], augment: Augment, seed: int
) -> float:
    """Fraction of neurons whose planted permutation ``(v, t # aug(v))`` the model recovers."""
    g = torch.Generator().manual_seed(seed)
    n = next(iter(states.values())).shape[0]
    t = P.random_permutation(spec, generator=g, batch=n)
    moved = P.apply(spec, t, augment(states, spec, g), batch_dims=1)
    pred = model.align(states, moved, spec)
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
    perm = model.align(a, b, spec)
    aligned = P.apply(spec, perm, b, batch_dims=1)
    if isinstance(data, tuple):  # INRs: MSE to the shared target (two views of one target)
        coords, target = (t.to(device) for t in data)
        lambdas = torch.linspace(0, 1, cfg.val_points, dtype=torch.float64)
        losses = []
        for lam in lambdas.tolist():
            merged = interpolate_pairs(a, aligned, torch.full((target.shape[0],), lam))
            out = batched_forward(zoo.module().to(device), merged, coords)
            losses.append(((out - target) ** 2).flatten(1).mean(1).double().cpu())
        loss = torch.stack(losses, dim=1)
        curves = {"loss": loss, "barrier": barrier(lambdas, loss)}
    else:
        curves = lmc_curves(zoo.module(), a, aligned, data, points=cfg.val_points)
    mid = curves["loss"][:, curves["loss"].shape[1] // 2]
    return {
        "val_barrier": float(torch.as_tensor(curves["barrier"]).mean()),
        "val_loss_mid": float(mid.mean()),
        "val_perm_accuracy": planted_accuracy(model, spec, a, Augment(**cfg.augment), cfg.seed + 7),
    }


def _validate_all(model: DeepAlign, vals: list, cfg: TrainConfig, device) -> dict[str, float]:
    """:func:`validate` on every width's pairs, averaged by their numbers of pairs (and per width
    when there are several)."""
    rows = [(validate(model, z, pair, data, cfg, device), n, z) for z, pair, data, n in vals]
    total = sum(n for _, n, _ in rows)
    out = {k: sum(r[k] * n for r, n, _ in rows) / total for k in rows[0][0]}
    if len(rows) > 1:
        out["val_barrier_by_zoo"] = {z.path.name: r["val_barrier"] for r, _, z in rows}
    return out


def probe_inputs(zoo: Zoo, k: int, seed: int) -> Tensor:
    """``k`` seeded training inputs of the zoo's task: images of its data set, or INR coordinates."""
    if zoo.kind == "classifier":
        data = zoo.dataset("train")
        x = data.x
    else:
        x = zoo.targets(zoo.indices("train")[:1]).coords
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(x.shape[0], generator=g)[:k]
    if len(pick) < k:  # fewer examples than probes (e.g. a short INR grid): repeat them
        pick = pick.repeat(-(-k // len(pick)))[:k]
    return x[pick].reshape(k, -1).float()


def _positively_homogeneous(module: torch.nn.Module) -> bool:
    """True when every activation satisfies ``f(s x) = s f(x)`` for ``s > 0`` (ReLU, LeakyReLU)."""
    from torch import nn

    from deepalign.core.layers import Sine

    bad = (nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, Sine)
    return not any(isinstance(m, bad) for m in module.modules())


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
    """Train a Deep-Align aligner on ``zoo_path``'s train split; returns the final history row.

    Under ``torchrun`` the global batch ``cfg.batch`` is split over the processes
    (:mod:`deepalign.training.distributed`); rank 0 writes every file, every rank returns the
    same row."""
    cfg = cfg or TrainConfig()
    cfg.validate()
    model_config = model_config or DeepAlignConfig()
    device = local_device(torch.device(device))
    ranks = setup(device)
    ranks.share(cfg.batch)  # refuse a batch that does not split evenly, before any work
    out = Path(out)
    zoos = open_zoos(zoo_path)
    for z in zoos:
        if len(z.indices("train")) < 2 or len(z.indices("val")) < 2:
            raise DeepAlignError(f"{z.path}: needs at least 2 train and 2 val networks")
    zoo = zoos[0]
    layouts = [WeightSpaceLayout.from_config(z.config) for z in zoos]
    for z, lay in zip(zoos[1:], layouts[1:], strict=True):
        diff = layouts[0].signature.differences(lay.signature)
        if diff:
            raise DeepAlignError(
                f"{z.path}: not the architecture of {zoo.path} apart from widths ({'; '.join(diff)})"
            )
    tasks = [pair_task(z, "train", cfg.data_batch) for z in zoos]
    val_tasks = [pair_task(z, "val", cfg.data_batch) for z in zoos]
    if cfg.augment.get("scaling", 0) and not _positively_homogeneous(zoo.module()):
        # Rescaling neurons keeps the function only for ReLU-like activations (not SIREN's sine).
        cfg = replace(cfg, augment={**cfg.augment, "scaling": 0.0})
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
    layout = layouts[0]
    model = DeepAlign(layout, model_config).to(device)
    if model.probes is not None:  # start the probe inputs at real examples (then learned)
        model.probes.init_inputs(probe_inputs(zoo, model_config.probes, cfg.seed).to(device))
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
    groups = [
        TrainGroup(lay, z.module().to(device), z.load(t.indices), t)
        for z, lay, t in zip(zoos, layouts, tasks, strict=True)
    ]
    # validation pairs: the requested number, shared out over the widths by their val sizes
    n_val = [len(t.indices) for t in val_tasks]
    want = [max(1, round(cfg.val_pairs * k / sum(n_val))) for k in n_val]
    vals = []
    for z, t, count in zip(zoos, val_tasks, want, strict=True):
        pos_a, pos_b = _pairs(t, min(count, 4 * len(t.indices)), cfg.seed + 1)
        pair = (
            z.load([t.indices[p] for p in pos_a], device),
            z.load([t.indices[p] for p in pos_b], device),
        )
        if t.inr:
            data = (t.x, t.y[pos_a])
        else:
            data = z.dataset("train").subset(min(512, len(z.dataset("train"))), seed=cfg.seed)
        vals.append((z, pair, data, len(pos_a)))
    widths_seen = [list(lay.hidden_widths) for lay in layouts]
    info = {
        "zoo": str(zoo_path),
        "task": zoo.task,
        "n_train_networks": sum(len(t.indices) for t in tasks),
        "widths_seen": widths_seen,
        "train": asdict(cfg),
    }
    if ranks.active:
        info["processes"] = ranks.world
    net = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if ranks.active
        else model
    )
    report = on_step if ranks.main else None
    for epoch in range(start, cfg.epochs):
        started = time.perf_counter()
        row_train = train_epoch(
            model,
            optimizer,
            groups,
            cfg,
            epoch,
            device,
            on_step=(lambda s, m, e=epoch: report(e, s, m)) if report else None,
            ranks=ranks,
            net=net,
        )
        trained = time.perf_counter() - started
        row = {
            "epoch": epoch,
            "train": row_train,
            "train_seconds": trained,
            **_validate_all(model, vals, cfg, device),
        }
        history.append(row)
        improved = row["val_barrier"] < best
        best = min(best, row["val_barrier"])
        if ranks.main:  # one writer; the others wait for its files before the next epoch
            if improved:
                model.save_pretrained(out, zoo.config, {**info, "epoch": epoch, "metrics": row})
            write_metrics(out / "metrics.jsonl", history)
            plot_history(out / "training.png", history)
            save_training_state(
                state_path, model, optimizer, epoch, best, history, json.dumps(settings)
            )
            if on_epoch is not None:
                on_epoch(row)
        ranks.barrier()
    if not (out / "config.json").exists():
        raise DeepAlignError(f"{out}: no epoch was trained (epochs={cfg.epochs})")
    return history[-1] if history else {}
