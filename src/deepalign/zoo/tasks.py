"""The zoo tasks by name: architecture builder, data, and training defaults.

Classifier tasks train on a labelled image data set; INR tasks fit SIRENs to images or 1-D sine
waves (several independent fits -- "views" -- per target, as the paper's INR zoos).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepalign.errors import DeepAlignError

if TYPE_CHECKING:
    from torch import nn

CLASSIFIER, INR_IMAGE, INR_SINE = "classifier", "inr-image", "inr-sine"


@dataclass(frozen=True)
class Task:
    """One zoo task. ``epochs`` counts passes over the data (for INRs, full-batch steps)."""

    name: str
    kind: str
    dataset: str | None
    hidden: tuple[int, ...]
    make: Callable[[Sequence[int]], nn.Module]
    epochs: int
    lr: float
    batch_size: int | None  # None: full batch (INRs)
    train_subset: int | None = None  # a fixed subset of the training split (None: all of it)
    views: int = 1  # independent fits per INR target
    shard_size: int = 256  # models per shard file (and per batched training run)
    help: str = ""

    def module(self, hidden: Sequence[int] | None = None) -> nn.Module:
        widths = tuple(self.hidden if hidden is None else hidden)
        if not widths or any(w <= 0 for w in widths):
            raise DeepAlignError(f"--hidden for {self.name}: widths must be positive integers")
        return self.make(widths)


def _arch() -> Any:
    from deepalign.core import arch  # torch: loaded when a model is built, not to list the tasks

    return arch


def _mlp(d_in: int) -> Callable[[Sequence[int]], nn.Module]:
    return lambda h: _arch().mlp([d_in, *h, 10], flatten_input=True)


def _cnn(c: int, size: int) -> Callable[[Sequence[int]], nn.Module]:
    return lambda h: _arch().cnn(c, list(h), 10, size)


def _vit(
    c: int, size: int, patch: int, depth: int, heads: int
) -> Callable[[Sequence[int]], nn.Module]:
    """``hidden = (dim, mlp_dim)``: the residual width and the MLP's hidden width."""

    def make(h: Sequence[int]) -> nn.Module:
        from deepalign.core.layers import ViT

        dim, mlp_dim = (h[0], h[1]) if len(h) > 1 else (h[0], 2 * h[0])
        if dim % heads:
            raise DeepAlignError(
                f"--hidden: the ViT's width {dim} must be a multiple of {heads} heads"
            )
        return ViT(size, patch, c, dim, depth, heads, mlp_dim, 10)

    return make


def _siren(d_in: int, w0: float = 30.0) -> Callable[[Sequence[int]], nn.Module]:
    return lambda h: _arch().siren([d_in, *h, 1], w0=w0)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "mlp-digits", CLASSIFIER, "digits", (32, 32, 32), _mlp(64), 10, 3e-3, 64,
            shard_size=500, help="MLP 64-32-32-32-10 on the 8x8 digits (the default)",
        ),
        Task(
            "mlp-digits-wide", CLASSIFIER, "digits", (128, 128, 128), _mlp(64), 10, 3e-3, 64,
            shard_size=250,
            help="MLP 64-128-128-128-10 on digits (the paper's regime: wide layers, low barriers)",
        ),
        Task(
            "mlp-fashion8", CLASSIFIER, "fashion-mnist-8x8", (32, 32, 32), _mlp(64), 2, 3e-3, 64,
            train_subset=10_000, shard_size=500,
            help="MLP 64-32-32-32-10 on Fashion-MNIST pooled to 8x8: the digits MLP's "
            "architecture on other data (out-of-distribution pairs for a digits aligner)",
        ),
        Task(
            "cnn-digits", CLASSIFIER, "digits", (16, 32), _cnn(1, 8), 10, 3e-3, 64,
            shard_size=128, help="conv 16-32 (3x3, max-pool after each) + linear head on digits",
        ),
        Task(
            "vit-digits", CLASSIFIER, "digits", (32, 64), _vit(1, 8, 2, 2, 4), 30, 3e-3, 64,
            shard_size=64,
            help="ViT on digits: 2x2 patches, 2 pre-norm blocks of width 32 with 4 heads, MLP 64 "
            "(--hidden DIM,MLP)",
        ),
        Task(
            "mlp-fashion", CLASSIFIER, "fashion-mnist", (128, 128, 128), _mlp(784), 2, 2e-3, 128,
            train_subset=10_000, shard_size=50,
            help="MLP 784-128-128-128-10 on Fashion-MNIST (fixed 10k training subset)",
        ),
        Task(
            "cnn-fashion", CLASSIFIER, "fashion-mnist", (16, 32, 32), _cnn(1, 28), 2, 2e-3, 64,
            train_subset=10_000, shard_size=32,
            help="conv 16-32-32 + linear head on Fashion-MNIST (fixed 10k training subset)",
        ),
        Task(
            "mlp-mnist", CLASSIFIER, "mnist", (128, 128, 128), _mlp(784), 2, 2e-3, 128,
            train_subset=10_000, shard_size=50, help="MLP 784-128-128-128-10 on MNIST (--data-dir)",
        ),
        Task(
            "cnn-cifar10", CLASSIFIER, "cifar10", (16, 32, 32), _cnn(3, 32), 2, 2e-3, 64,
            train_subset=10_000, shard_size=32, help="conv 16-32-32 + linear head on CIFAR-10 (--data-dir)",
        ),
        Task(
            "siren-fashion", INR_IMAGE, "fashion-mnist", (32, 32),
            _siren(2), 300, 1e-3, None, views=2, shard_size=256,
            help="SIREN 2-32-32-1 fitting Fashion-MNIST images, 2 views per image",
        ),
        Task(
            "siren-sine", INR_SINE, None, (32, 32), _siren(1), 300, 1e-3,
            None, views=2, shard_size=256,
            help="SIREN 1-32-32-1 fitting sin(a x), a ~ U(0.5, 10), 2 views per wave",
        ),
        Task(
            "siren-sine-w3", INR_SINE, None, (32, 32), _siren(1, w0=3.0), 300, 1e-3,
            None, views=2, shard_size=256,
            help="the same with w0 = 3 (instead of 30): views land in basins alignment connects",
        ),
    ]
}  # fmt: skip
DEFAULT_TASK = "mlp-digits"


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DeepAlignError(f"unknown zoo task {name!r} (choose from {', '.join(TASKS)})")
    return TASKS[name]
