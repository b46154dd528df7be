"""The Typer app, shared options, printing, and what every command that reads networks shares:
loading checkpoints, data and an aligner, and checking a method before any work."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

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
from torch import nn

from deepalign.core.checkpoint import load_checkpoint
from deepalign.core.io import atomic_path
from deepalign.core.spec import PermutationSpec, StateDict
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


METHOD = typer.Option(
    "wm",
    "--method",
    "-m",
    help="identity, wm, am (needs --data), sinkhorn, deepalign (needs --aligner), or a chain "
    "such as wm+sinkhorn (the first answer starts the second).",
)
DATA = typer.Option(
    None,
    "--data",
    help="Data set for methods that use data: digits, fashion-mnist, mnist, cifar10.",
)
DATA_DIR = typer.Option(None, "--data-dir", help="Folder holding the data set's files.")
OPTS = typer.Option(
    [], "--opt", "-o", help="Method option KEY=VALUE, repeatable (e.g. -o steps=500 -o lr=0.05)."
)
ALIGNER = typer.Option(None, "--aligner", help="Trained Deep-Align folder (methods deepalign*).")


class Checkpoints:
    """Checkpoints of one architecture on one device: ``states[0]`` is A, ``states[1]`` is B."""

    def __init__(self, paths: list[Path], device: torch.device) -> None:
        state, config, module, spec, _ = load_checkpoint(paths[0])
        self.states = [{k: v.to(device) for k, v in state.items()}]
        for p in paths[1:]:
            other, other_config, _, _, _ = load_checkpoint(p)
            if other_config != config:
                raise DeepAlignError(
                    f"{paths[0]} and {p} have different architectures; both must be the same"
                )
            self.states.append({k: v.to(device) for k, v in other.items()})
        self.paths = list(paths)
        self.config: dict = config
        self.module: nn.Module = module.to(device)
        self.spec: PermutationSpec = spec
        self.device = device

    @property
    def a(self) -> StateDict:
        return self.states[0]

    @property
    def b(self) -> StateDict:
        return self.states[1]


@contextlib.contextmanager
def claim(*paths: Path | None) -> Iterator[list[Path | None]]:
    """Temporary files for every output, claimed before any work: all are written or none."""
    with contextlib.ExitStack() as stack:
        yield [None if p is None else stack.enter_context(atomic_path(p)) for p in paths]


def say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def parse_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict; values are JSON when they parse, else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DeepAlignError(f"--opt {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def fit_data(ds: Any, nets: Checkpoints) -> Any:
    """``ds`` as the model reads it: images as they are, or flattened for MLPs without Flatten."""
    ds = ds.to(nets.device)
    for candidate in (ds, (ds.x.flatten(1), ds.y)):
        x = candidate.x if candidate is ds else candidate[0]
        try:
            with torch.no_grad():
                nets.module(x[:2])
            return candidate
        except RuntimeError:
            continue
    raise DeepAlignError(
        f"data set {ds.name} (images {tuple(ds.x.shape[1:])}) does not fit the model in {nets.paths[0]}"
    )


def load_data(
    name: str,
    split: str,
    data_dir: Path | None,
    nets: Checkpoints,
    examples: int | None = None,
    seed: int = 0,
) -> Any:
    """Split ``split`` of data set ``name`` (a seeded subset of ``examples`` when given), fitted."""
    from deepalign.data import load

    ds = load(name, split=split, data_dir=data_dir)
    if examples is not None and examples < len(ds):
        ds = ds.subset(examples, seed=seed)
    return fit_data(ds, nets)


def check_method(method: str, data: str | None, aligner: Path | None, options: dict[str, Any]):
    """The method's chain, checked before any work or file: known names, data and an aligner
    where a stage needs them, options it declares."""
    from deepalign.solvers import Chain

    chain = Chain.parse(method)
    if chain.needs_aligner and aligner is None:
        raise DeepAlignError(f"method {method!r} needs a trained aligner (--aligner DIR)")
    if data is None and chain.needs_data:
        raise DeepAlignError(f"method {method!r} needs data: pass --data NAME (e.g. --data digits)")
    chain.check_options(options)
    return chain


def load_aligner(chain: Any, aligner: Path | None, nets: Checkpoints) -> Any:
    """The trained aligner when a stage of ``chain`` uses one, checked against the networks."""
    if not chain.needs_aligner:
        return None
    from deepalign.nn import DeepAlign
    from deepalign.solvers.deepalign import check_aligner

    assert aligner is not None
    model = DeepAlign.from_pretrained(aligner, nets.device)
    check_aligner(model, nets.spec, str(aligner), nets.config)
    return model
