"""The Typer app, shared options, printing, and what every command that reads networks shares:
loading checkpoints (ours, or plain state dicts with the user's class), data (built-in or the
user's file) and an aligner, and checking a method before any work.

Heavy modules (torch and the library) are imported inside functions, so ``deepalign --help``
starts without loading torch.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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

if TYPE_CHECKING:
    import torch

    from deepalign.core.checkpoint import Network

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
    help="Data for methods that use data: a built-in set (digits, fashion-mnist, mnist, cifar10; "
    "see --normalize) or your own file: FILE.npz with arrays x and y, or FILE.pt with a dict of "
    "tensors x and y, used exactly as given.",
)
DATA_DIR = typer.Option(None, "--data-dir", help="Folder holding a built-in data set's files.")
NORMALIZE = typer.Option(
    "standard",
    "--normalize",
    help="Built-in data sets: 'standard' scales pixels to [0, 1], then standardises each channel "
    "with the set's fixed mean and std (digits 0.305/0.376, fashion-mnist 0.286/0.353, mnist "
    "0.131/0.308, cifar10 per channel); 'none' keeps pixels in [0, 1]. Use what your models were "
    "trained on.",
)
OPTS = typer.Option(
    [], "--opt", "-o", help="Method option KEY=VALUE, repeatable (e.g. -o steps=500 -o lr=0.05)."
)
ALIGNER = typer.Option(None, "--aligner", help="Trained Deep-Align folder (methods deepalign*).")
MODEL = typer.Option(
    None,
    "--model",
    help="Your class, for plain state dicts (.pt or .safetensors): FILE.py:NAME or "
    "package.module:NAME (a class, or a function returning an nn.Module).",
)
MODEL_ARGS = typer.Option(
    None, "--model-args", help="Keyword arguments for --model as JSON, e.g. '{\"hidden\": 128}'."
)
INPUT_SHAPE = typer.Option(
    None,
    "--input-shape",
    help="One example's shape, to trace --model: e.g. 64 or 1,28,28 (default: the input size of "
    "its first Linear layer); for a model that starts with an Embedding, the number of tokens "
    "(e.g. 8: token indices).",
)


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device``, with a one-line error when it is not available."""
    import torch

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
    import random

    import numpy as np
    import torch

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


@contextlib.contextmanager
def stage_bars() -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback that draws one bar per stage as it reports."""
    with progress() as bar:
        tasks: dict[str, Any] = {}

        def tell(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield tell


def fail(message: str) -> None:
    """Raise the one-line user error."""
    raise DeepAlignError(message)


def say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def note(text: str) -> None:
    err_console.print(f"note: {text}", markup=False, highlight=False, soft_wrap=True)


class Checkpoints:
    """Checkpoints of one architecture on one device: ``states[0]`` is A, ``states[1]`` is B.

    Self-describing files load alone; plain state dicts need ``model`` (the user's class, traced on
    one example of ``input_shape``) or ``arch``.
    """

    def __init__(
        self,
        paths: list[Path],
        device: torch.device,
        model: str | None = None,
        model_args: str | None = None,
        input_shape: str | None = None,
        arch: str | None = None,
    ) -> None:
        from deepalign.core.checkpoint import first_difference, load_network

        def one(p: Path) -> Network:
            return load_network(
                p, arch=arch, model=model, model_args=model_args, input_shape=input_shape
            )

        first = one(paths[0])
        self.networks = [first]
        for p in paths[1:]:
            other = one(p)
            diff = first_difference(first.state, other.state, (str(paths[0]), str(p)))
            if diff is not None or other.architecture != first.architecture:
                raise DeepAlignError(
                    f"{paths[0]} and {p} have different architectures: "
                    + (diff or "their architecture configs differ")
                )
            self.networks.append(other)
        self.states = [{k: v.to(device) for k, v in n.state.items()} for n in self.networks]
        self.paths = list(paths)
        self.first = first
        self.config: dict = first.architecture
        self.module = first.module.to(device)
        self.spec = first.spec
        self.device = device

    @property
    def a(self) -> dict:
        return self.states[0]

    @property
    def b(self) -> dict:
        return self.states[1]

    def write(self, state: dict, tmp: Path, out: Path, meta: dict[str, Any]) -> None:
        """Write a state of this architecture in the format ``out``'s name says (same names)."""
        self.first.write(state, tmp, out, meta)


@contextlib.contextmanager
def claim(*paths: Path | None) -> Iterator[list[Path | None]]:
    """Temporary files for every output, claimed before any work: all are written or none."""
    from deepalign.core.io import atomic_path

    with contextlib.ExitStack() as stack:
        yield [None if p is None else stack.enter_context(atomic_path(p)) for p in paths]


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


def check_normalize(normalize: str) -> bool:
    if normalize not in ("standard", "none"):
        raise DeepAlignError(f"--normalize {normalize!r}: choose standard or none")
    return normalize == "standard"


def fit_data(ds: Any, nets: Checkpoints) -> Any:
    """``ds`` as the model reads it: images as they are, or flattened for MLPs without Flatten."""
    import torch

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
        f"data {ds.name} (examples of shape {tuple(ds.x.shape[1:])}) does not fit the model in "
        f"{nets.paths[0]}"
    )


def load_data(
    name: str,
    split: str,
    data_dir: Path | None,
    nets: Checkpoints,
    normalize: str = "standard",
    examples: int | None = None,
    seed: int = 0,
) -> Any:
    """``split`` of a built-in data set, or the user's file as given (both splits), fitted to the
    model; a seeded subset of ``examples`` when given."""
    from deepalign.data import is_data_file, load, load_file

    if is_data_file(name):
        ds = load_file(name)
    else:
        ds = load(name, split=split, data_dir=data_dir, normalize=check_normalize(normalize))
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
        raise DeepAlignError(
            f"method {method!r} needs data: pass --data NAME or --data FILE.npz (e.g. --data digits)"
        )
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
    check_aligner(
        model,
        nets.spec,
        str(aligner),
        nets.first.arch,
        state=nets.first.state,
        module=nets.first.module,
    )
    return model
