"""`deepalign train`: train a Deep-Align aligner on a zoo (resumable)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import typer

from deepalign.cli.common import DEVICE, SEED, app, console, progress, resolve_device
from deepalign.errors import DeepAlignError
from deepalign.nn.sizes import MODEL_SIZES


def describe_aligner(path: Path, as_json: bool) -> None:
    """`inspect` on an aligner folder."""
    from deepalign.nn.model import DeepAlign

    model = DeepAlign.from_pretrained(path)
    info = model.info
    summary = {
        "aligner": str(path),
        "parameters": model.n_parameters(),
        "aligns": model.signature.describe() + ", any hidden widths",
        "trained_on_widths": info.get("widths_seen"),
        "model": info["model"],
        "zoo": info.get("zoo"),
        "task": info.get("task"),
        "epoch": info.get("epoch"),
        "metrics": info.get("metrics"),
    }
    if as_json:
        console.print_json(json.dumps(summary))
        return
    console.print(f"[bold]{path}[/bold]  Deep-Align aligner, {summary['parameters']:,} parameters")
    console.print(f"  aligns {summary['aligns']}")
    if summary["trained_on_widths"]:
        seen = ", ".join("-".join(map(str, w)) for w in summary["trained_on_widths"])
        console.print(f"  trained on hidden widths {seen}")
    console.print(
        f"  trained on {summary['zoo']} ({summary['task']}), best epoch {summary['epoch']}"
    )
    metrics = summary["metrics"] or {}
    for key in ("val_barrier", "val_loss_mid", "val_perm_accuracy"):
        if key in metrics:
            console.print(f"  {key}: {metrics[key]:.4f}")


@app.command()
def train(
    zoo: Path = typer.Option(
        ...,
        "--zoo",
        help="Zoo folder to train on (its train split); a zoo set (zoo --widths) trains one "
        "aligner on every width.",
    ),
    out: Path = typer.Option(..., "--out", help="Aligner folder to write."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="Epochs."),
    batch: int = typer.Option(32, "--batch", min=1, help="Network pairs per step."),
    steps: int | None = typer.Option(
        None, "--steps", min=1, help="Steps per epoch (default: train networks / batch)."
    ),
    lr: float = typer.Option(3e-3, "--lr", help="AdamW learning rate."),
    size: str = typer.Option("cpu", "--size", help="Model size: tiny, cpu or paper."),
    downsample: int | None = typer.Option(
        None, "--downsample", min=1, help="Compress wide inputs (e.g. 784 pixels) to K probes."
    ),
    probes: int | None = typer.Option(
        None,
        "--probes",
        min=0,
        help="Probe features: each neuron's activations on K learned inputs (MLP and SIREN zoos; "
        "default 64 there, 0 elsewhere; 0 = the paper's model).",
    ),
    w_sup: float = typer.Option(1.0, "--w-supervised", help="Weight of the supervised loss."),
    w_align: float = typer.Option(1.0, "--w-alignment", help="Weight of the L2 alignment loss."),
    w_lmc: float = typer.Option(1.0, "--w-lmc", help="Weight of the LMC (task) loss."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    seed: int = SEED,
    device: str = DEVICE,
) -> None:
    """Train a Deep-Align aligner on a zoo; the best epoch (validation barrier) is kept.

    Example: deepalign train --zoo zoos/mlp-digits --out aligners/mlp-digits --epochs 20
    """
    from deepalign.nn.model import DeepAlignConfig
    from deepalign.training.loop import TrainConfig
    from deepalign.training.trainer import train_aligner

    if size not in MODEL_SIZES:
        raise DeepAlignError(f"--size {size!r}: choose from {', '.join(MODEL_SIZES)}")
    dev = resolve_device(device)
    from deepalign.nn.sizes import default_probes
    from deepalign.zoo.loader import open_zoos

    model = {
        **MODEL_SIZES[size],
        **({"downsample": downsample} if downsample else {}),
        "probes": default_probes(open_zoos(zoo)[0].config) if probes is None else probes,
    }
    DeepAlignConfig(**model)  # a bad combination fails here, before the progress bar
    cfg = TrainConfig(
        epochs=epochs,
        batch=batch,
        steps_per_epoch=steps,
        lr=lr,
        w_supervised=w_sup,
        w_alignment=w_align,
        w_lmc=w_lmc,
        seed=seed,
    )
    cfg.validate()  # before the progress bar starts
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    with progress() if main else contextlib.nullcontext(_Silent()) as bar:
        task = bar.add_task("epoch 1", total=None)

        def on_step(epoch: int, step: int, means: dict) -> None:
            total = steps or None
            bar.update(
                task,
                description=f"epoch {epoch + 1}/{epochs} loss {means['loss']:.3f}",
                completed=step + 1,
                total=total,
            )

        def on_epoch(row: dict) -> None:
            console.print(
                f"epoch {row['epoch'] + 1}: loss {row['train']['loss']:.4f}  "
                f"val barrier {row['val_barrier']:.4f}  val planted acc {row['val_perm_accuracy']:.3f}"
            )

        train_aligner(
            zoo,
            out,
            DeepAlignConfig(**model),
            cfg,
            dev,
            resume,
            on_epoch=on_epoch,
            on_step=on_step,
        )
    if main:
        console.print(f"aligner written to {out} (config.json + model.safetensors)")


class _Silent:
    """A progress bar that draws nothing (the other ranks of a torchrun)."""

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def update(self, *args: object, **kwargs: object) -> None:
        pass
