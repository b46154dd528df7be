"""The offline data sets by name: where their files live, how to read them, their fixed statistics.

Nothing downloads. ``digits`` ships with scikit-learn; the others load from a folder the user names
(Fashion-MNIST defaults to where Debian's ``dataset-fashion-mnist`` package installs it).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepalign.data.cifar import read_cifar_batch
from deepalign.data.dataset import Dataset
from deepalign.data.idx import read_idx
from deepalign.errors import DeepAlignError

SPLITS = ("train", "test")
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Source:
    """A data set: its reader ``(split, folder) -> (uint8-or-float pixels (N,C,H,W) in [0,1], labels)``."""

    name: str
    read: Callable[[str, Path | None], tuple[np.ndarray, np.ndarray]]
    mean: tuple[float, ...]  # of the training pixels in [0, 1], per channel (fixed constants)
    std: tuple[float, ...]
    n_classes: int
    default_dir: Path | None
    hint: str  # what to install / pass when the files are missing


def _read_digits(split: str, folder: Path | None) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = round(len(y) * DIGITS_TEST_FRACTION)
    idx = order[n_test:] if split == "train" else order[:n_test]
    idx = idx.sort().values.numpy()
    return x[idx], y[idx]


_IDX_STEMS = {"train": "train", "test": "t10k"}


def _find(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        for cand in (folder / n, folder / f"{n}.gz"):
            if cand.is_file():
                return cand
    return None


def _idx_reader(name: str) -> Callable[[str, Path | None], tuple[np.ndarray, np.ndarray]]:
    def read(split: str, folder: Path | None) -> tuple[np.ndarray, np.ndarray]:
        stem = _IDX_STEMS[split]
        assert folder is not None
        img = _find(folder, [f"{stem}-images-idx3-ubyte", f"{stem}-images.idx3-ubyte"])
        lab = _find(folder, [f"{stem}-labels-idx1-ubyte", f"{stem}-labels.idx1-ubyte"])
        if img is None or lab is None:
            missing = f"{stem}-images-idx3-ubyte" if img is None else f"{stem}-labels-idx1-ubyte"
            raise FileNotFoundError(f"{missing}[.gz]")
        images, labels = read_idx(img, ndim=3), read_idx(lab, ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise DeepAlignError(
                f"{name}: {img.name} holds {images.shape[0]} images but {lab.name} {labels.shape[0]} labels"
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DeepAlignError(f"{lab}: labels outside 0..9")
        return images[:, None], labels.astype(np.int64)

    return read


def _pooled(
    read: Callable, size: int
) -> Callable[[str, Path | None], tuple[np.ndarray, np.ndarray]]:
    """``read``'s images average-pooled to ``size`` x ``size`` (floats in [0, 1])."""

    def pooled(split: str, folder: Path | None) -> tuple[np.ndarray, np.ndarray]:
        x, y = read(split, folder)
        t = torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0
        small = torch.nn.functional.adaptive_avg_pool2d(t, size)
        return small.numpy(), y

    return pooled


def _read_cifar10(split: str, folder: Path | None) -> tuple[np.ndarray, np.ndarray]:
    assert folder is not None
    if (folder / "cifar-10-batches-bin").is_dir():
        folder = folder / "cifar-10-batches-bin"
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(missing[0])
    parts = [read_cifar_batch(folder / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(
        np.int64
    )


SOURCES: dict[str, Source] = {
    "digits": Source(
        "digits", _read_digits, (0.30526,), (0.37605,), 10, None, "scikit-learn is required"
    ),
    "fashion-mnist": Source(
        "fashion-mnist",
        _idx_reader("fashion-mnist"),
        (0.28604,),
        (0.35302,),
        10,
        FASHION_MNIST_DIR,
        "install it with `apt-get install dataset-fashion-mnist` or pass --data-dir FOLDER "
        "holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-*",
    ),
    "fashion-mnist-8x8": Source(
        "fashion-mnist-8x8",
        _pooled(_idx_reader("fashion-mnist"), 8),
        (0.28865,),
        (0.30161,),
        10,
        FASHION_MNIST_DIR,
        "Fashion-MNIST average-pooled to 8x8 (the digits' size): install "
        "dataset-fashion-mnist or pass --data-dir FOLDER with its IDX files",
    ),
    "mnist": Source(
        "mnist",
        _idx_reader("mnist"),
        (0.13066,),
        (0.30811,),
        10,
        None,
        "pass --data-dir FOLDER holding MNIST's train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
    ),
    "cifar10": Source(
        "cifar10",
        _read_cifar10,
        (0.49139, 0.48216, 0.44653),
        (0.24703, 0.24349, 0.26159),
        10,
        None,
        "pass --data-dir FOLDER holding CIFAR-10's binary version "
        "(data_batch_1.bin ... data_batch_5.bin, test_batch.bin)",
    ),
}
NAMES = tuple(SOURCES)


def resolve_dir(name: str, data_dir: str | os.PathLike | None) -> Path | None:
    """The folder ``name`` loads from (None for bundled data sets)."""
    src = _source(name)
    if name == "digits":
        return None
    return Path(data_dir).expanduser().resolve() if data_dir is not None else src.default_dir


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise DeepAlignError(f"unknown data set {name!r} (choose from {', '.join(SOURCES)})")
    return SOURCES[name]


def load(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    normalize: bool = True,
) -> Dataset:
    """Data set ``name`` (digits, fashion-mnist, mnist, cifar10), ``split`` train or test.

    Pixels are scaled to [0, 1], then (``normalize``, the default) standardised per channel with
    the data set's fixed training mean and std (:data:`SOURCES`); ``normalize=False`` keeps them
    in [0, 1]. Arrays are cached in-process, so repeated loads are free.
    """
    src = _source(name)
    if split not in SPLITS:
        raise DeepAlignError(f"{name}: unknown split {split!r} (choose from {', '.join(SPLITS)})")
    x, y = _load_cached(name, split, resolve_dir(name, data_dir))
    if not normalize:
        mean = torch.tensor(src.mean).view(1, -1, 1, 1)
        std = torch.tensor(src.std).view(1, -1, 1, 1)
        return Dataset(x * std + mean, y, src.n_classes, name, split)
    return Dataset(x, y, src.n_classes, name, split, src.mean, src.std)


def normalization_help() -> str:
    """How the built-in data sets are normalised, in one line (for ``--help``)."""
    parts = [
        f"{n}: mean {'/'.join(f'{m:.3f}' for m in s.mean)}, std {'/'.join(f'{d:.3f}' for d in s.std)}"
        for n, s in SOURCES.items()
    ]
    return "pixels in [0, 1], then standardised per channel (" + "; ".join(parts) + ")"


@functools.lru_cache(maxsize=16)
def _load_cached(name: str, split: str, folder: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    src = SOURCES[name]
    if name != "digits":
        if folder is None:
            raise DeepAlignError(f"{name}: no data folder given; {src.hint}")
        if not folder.is_dir():
            raise DeepAlignError(f"{name}: folder {folder} does not exist; {src.hint}")
    try:
        pixels, labels = src.read(split, folder)
    except FileNotFoundError as exc:
        raise DeepAlignError(f"{name}: {exc.args[0]} not found in {folder}; {src.hint}") from None
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float()
    if pixels.dtype == np.uint8:
        x = x / 255.0
    mean = torch.tensor(src.mean).view(1, -1, 1, 1)
    std = torch.tensor(src.std).view(1, -1, 1, 1)
    if x.shape[1] != mean.shape[1]:
        raise DeepAlignError(f"{name}: images have {x.shape[1]} channels, expected {mean.shape[1]}")
    x = ((x - mean) / std).contiguous()
    return x, torch.from_numpy(np.ascontiguousarray(labels)).long()
