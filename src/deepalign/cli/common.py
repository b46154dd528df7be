"""The Typer app, shared options, and printing helpers used by every command module."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from deepalign.errors import DeepAlignError

app = typer.Typer(
    name="deepalign",
    help="Align, merge and compare neural-network weights; learn to align with Deep-Align.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)

T = TypeVar("T")

SEED = typer.Option(0, "--seed", help="Random seed; the same seed gives the same result.")
DEVICE = typer.Option("cpu", "--device", help="torch device: cpu, cuda, cuda:1, ...")


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device``, with a one-line error when it is not available."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeepAlignError(f"--device {name!r}: not a torch device name") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeepAlignError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeepAlignError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeepAlignError(f"--device {name}: MPS is not available on this machine")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (seeds third-party code that uses the global RNG)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress() -> Progress:
    """The progress bar every long command uses (on stderr, so stdout stays parseable)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar."""
    with progress() as bar:
        task = bar.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            bar.advance(task)


def fail(message: str) -> None:
    """Raise the one-line user error."""
    raise DeepAlignError(message)
