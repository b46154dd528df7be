"""`deepalign inspect` and `deepalign permute`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from deepalign.cli.common import (
    INPUT_SHAPE,
    MODEL,
    MODEL_ARGS,
    SEED,
    Checkpoints,
    app,
    claim,
    console,
    say,
)
from deepalign.errors import DeepAlignError

if TYPE_CHECKING:
    import torch

ARCH = typer.Option(
    None,
    "--arch",
    help="Our architecture for plain state dicts with Sequential names: JSON file/text or "
    "'mlp:64-32-10' (your own class: --model).",
)


def example_input(nets: Checkpoints, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Random inputs of the shape the model takes: the traced example's shape, else what the first
    layer expects (images for conv nets)."""
    import torch

    from deepalign.core.user_model import example_batch

    g = torch.Generator().manual_seed(seed)
    if nets.first.example is not None:
        return example_batch(tuple(nets.first.example.shape[1:]), n, seed, module=nets.module)
    module = nets.module
    first = next(m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    if isinstance(first, torch.nn.Linear):
        return torch.randn(n, first.in_features, generator=g)
    size = int(nets.config.get("image_size", 0)) or _guess_image_size(module, first.in_channels)
    return torch.randn(n, first.in_channels, size, size, generator=g)


def _guess_image_size(module: Any, channels: int) -> int:
    import torch

    for size in (8, 28, 32, 16, 64, 12, 24, 96, 224):
        try:
            with torch.no_grad():
                module(torch.zeros(1, channels, size, size))
            return size
        except RuntimeError:
            continue
    raise DeepAlignError("could not infer the input image size of this conv net (--input-shape)")


def inspect_dir(path: Path, as_json: bool) -> None:
    """`inspect` on a folder: a zoo or an aligner, described by the module that owns it."""
    from deepalign.zoo.zoo_set import is_set, member_folders

    if (path / "manifest.json").is_file():
        from deepalign.cli.zoo_cmds import describe_zoo

        describe_zoo(path, as_json)
    elif is_set(path):
        from deepalign.cli.zoo_cmds import describe_zoo

        for member in member_folders(path):
            describe_zoo(member, as_json)
    elif (path / "config.json").is_file():
        from deepalign.cli.train_cmds import describe_aligner

        describe_aligner(path, as_json)
    else:
        raise DeepAlignError(
            f"{path}: a folder, but neither a zoo (manifest.json) nor an aligner (config.json)"
        )


def _load(path: Path, arch, model, model_args, input_shape) -> Checkpoints:
    import torch

    return Checkpoints([path], torch.device("cpu"), model, model_args, input_shape, arch)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A checkpoint file, or a zoo or aligner folder."),
    arch: str | None = ARCH,
    model: str | None = MODEL,
    model_args: str | None = MODEL_ARGS,
    input_shape: str | None = INPUT_SHAPE,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Describe a checkpoint: architecture, parameter count, permutation groups.

    Example: deepalign inspect model.safetensors

    Example: deepalign inspect my_weights.pt --model my_model.py:MyMLP
    """
    if path.is_dir():
        inspect_dir(path, as_json)
        return
    nets = _load(path, arch, model, model_args, input_shape)
    state, spec = nets.a, nets.spec
    n_params = sum(v.numel() for v in state.values() if v.is_floating_point())
    info = {
        "file": str(path),
        "parameters": n_params,
        "architecture": nets.config,
        "groups": spec.describe(),
    }
    if as_json:
        console.print_json(json.dumps(info))
        return
    console.print(
        f"[bold]{path}[/bold]  {n_params:,} parameters, {len(spec.groups)} permutation groups"
    )
    console.print(str(nets.module), markup=False, highlight=False)
    for row in spec.describe():
        shape = f"  heads x units: {row['heads']}" if "heads" in row else ""
        if "orders heads of" in row:
            shape = f"  head order of {row['orders heads of']}"
        console.print(
            f"  {row['group']:>6}  size {row['size']:>5}{shape}  {', '.join(row['axes'])}",
            markup=False,
        )


@app.command()
def permute(
    path: Path = typer.Argument(..., help="Checkpoint to shuffle."),
    out: Path = typer.Option(
        ..., "--out", help="Where to write the permuted checkpoint (.pt: a plain state dict)."
    ),
    seed: int = SEED,
    perm_out: Path | None = typer.Option(
        None, "--perm-out", help="Also write the permutation as JSON."
    ),
    arch: str | None = ARCH,
    model: str | None = MODEL,
    model_args: str | None = MODEL_ARGS,
    input_shape: str | None = INPUT_SHAPE,
) -> None:
    """Apply a random neuron permutation: the same function with shuffled neurons.

    Example: deepalign permute model.safetensors --seed 1 --out shuffled.safetensors

    Example: deepalign permute a.pt --model my_model.py:MyMLP --seed 1 --out shuffled.pt
    """
    import copy

    import torch

    from deepalign.core import permutation as P

    with claim(out, perm_out) as (tmp_out, tmp_perm):  # both claimed before either is written
        nets = _load(path, arch, model, model_args, input_shape)
        state, spec, module = nets.a, nets.spec, nets.module
        perm = P.random_permutation(spec, seed=seed)
        moved = P.apply(spec, perm, state)
        other = copy.deepcopy(module)
        other.load_state_dict(moved)
        other.eval()
        x = example_input(nets)
        with torch.no_grad():
            diff = float((other(x) - module(x)).abs().max())
        nets.write(moved, tmp_out, out, {"permuted_from": str(path), "seed": seed})
        if tmp_perm is not None:
            P.save_json(perm, tmp_perm)
    console.print(f"wrote {out}  ({len(spec.groups)} groups permuted, seed {seed})")
    say(f"largest output difference on 64 random inputs: {diff:.3g}")
