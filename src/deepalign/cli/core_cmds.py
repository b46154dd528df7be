"""`deepalign inspect` and `deepalign permute`."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import typer

from deepalign.cli.common import SEED, app, console
from deepalign.core import permutation as P
from deepalign.core.arch import build
from deepalign.core.checkpoint import (  # load_checkpoint: used by every command
    load_checkpoint,
    save_state,
)
from deepalign.core.io import atomic_path
from deepalign.errors import DeepAlignError

ARCH = typer.Option(
    None, "--arch", help="Architecture for plain state dicts: JSON file/text or 'mlp:64-32-10'."
)


def example_input(
    module: torch.nn.Module, config: dict, n: int = 64, seed: int = 0
) -> torch.Tensor:
    """Random inputs of the shape the module's first layer expects (images for conv nets)."""
    g = torch.Generator().manual_seed(seed)
    first = next(m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    if isinstance(first, torch.nn.Linear):
        return torch.randn(n, first.in_features, generator=g)
    size = int(config.get("image_size", 0)) or _guess_image_size(module, first.in_channels)
    return torch.randn(n, first.in_channels, size, size, generator=g)


def _guess_image_size(module: torch.nn.Module, channels: int) -> int:
    for size in (8, 28, 32, 16, 64, 12, 24, 96):
        try:
            with torch.no_grad():
                module(torch.zeros(1, channels, size, size))
            return size
        except RuntimeError:
            continue
    raise DeepAlignError("could not infer the input image size of this conv net")


def inspect_dir(path: Path, as_json: bool) -> None:
    """`inspect` on a folder: a zoo or an aligner, described by the module that owns it."""
    if (path / "manifest.json").is_file():
        from deepalign.cli.zoo_cmds import describe_zoo

        describe_zoo(path, as_json)
    elif (path / "config.json").is_file():
        from deepalign.cli.train_cmds import describe_aligner

        describe_aligner(path, as_json)
    else:
        raise DeepAlignError(
            f"{path}: a folder, but neither a zoo (manifest.json) nor an aligner (config.json)"
        )


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A checkpoint file, or a zoo folder."),
    arch: str | None = ARCH,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Describe a checkpoint: architecture, parameter count, permutation groups.

    Example: deepalign inspect model.safetensors
    """
    if path.is_dir():
        inspect_dir(path, as_json)
        return
    state, config, module, spec, meta = load_checkpoint(path, arch)
    n_params = sum(v.numel() for v in state.values() if v.is_floating_point())
    info = {
        "file": str(path),
        "parameters": n_params,
        "architecture": config,
        "groups": spec.describe(),
    }
    if as_json:
        console.print_json(json.dumps(info))
        return
    console.print(
        f"[bold]{path}[/bold]  {n_params:,} parameters, {len(spec.groups)} permutation groups"
    )
    console.print(str(module), markup=False, highlight=False)
    for row in spec.describe():
        console.print(
            f"  {row['group']:>6}  size {row['size']:>5}  {', '.join(row['axes'])}", markup=False
        )


@app.command()
def permute(
    path: Path = typer.Argument(..., help="Checkpoint to shuffle."),
    out: Path = typer.Option(..., "--out", help="Where to write the permuted checkpoint."),
    seed: int = SEED,
    perm_out: Path | None = typer.Option(
        None, "--perm-out", help="Also write the permutation as JSON."
    ),
    arch: str | None = ARCH,
) -> None:
    """Apply a random neuron permutation: the same function with shuffled neurons.

    Example: deepalign permute model.safetensors --seed 1 --out shuffled.safetensors
    """
    state, config, module, spec, _ = load_checkpoint(path, arch)
    perm = P.random_permutation(spec, seed=seed)
    moved = P.apply(spec, perm, state)
    other = build(config)
    other.load_state_dict(moved)
    other.eval()
    x = example_input(module, config)
    with torch.no_grad():
        diff = float((other(x) - module(x)).abs().max())
    # both targets are claimed before either is written: one bad path leaves no output at all
    perm_target = atomic_path(perm_out) if perm_out is not None else contextlib.nullcontext()
    with atomic_path(out) as tmp_out, perm_target as tmp_perm:
        save_state(moved, tmp_out, config, {"permuted_from": str(path), "seed": seed})
        if tmp_perm is not None:
            P.save_json(perm, tmp_perm)
    console.print(f"wrote {out}  ({len(spec.groups)} groups permuted, seed {seed})")
    console.print(f"largest output difference on 64 random inputs: {diff:.3g}")
