"""The user's own data: a labelled set in an ``.npz`` (arrays ``x``, ``y``) or a ``.pt`` file (a
dict of tensors ``x``, ``y``, read with ``torch.load(weights_only=True)``), used exactly as given.
Integer inputs are token indices; labels are one per example, or one per position (next tokens)."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from deepalign.data.dataset import Dataset
from deepalign.errors import DeepAlignError

SUFFIXES = (".npz", ".pt", ".pth")


def is_data_file(name: str | os.PathLike) -> bool:
    """Whether ``--data`` names a file (by its suffix) rather than a built-in data set."""
    return Path(name).suffix.lower() in SUFFIXES


def load_file(path: str | os.PathLike) -> Dataset:
    """``x`` (float, one example per row: vectors or images) and ``y`` (integer class labels)."""
    path = Path(path)
    if not path.is_file():
        raise DeepAlignError(f"{path}: no such data file")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            found = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise DeepAlignError(f"{path}: expected a dict with tensors x and y")
            found = obj
    except DeepAlignError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError) as exc:
        raise DeepAlignError(f"{path}: not a readable data file ({type(exc).__name__})") from None
    for key in ("x", "y"):
        if key not in found:
            raise DeepAlignError(
                f"{path}: no array {key!r} (expected x: inputs, y: labels; has {sorted(found)})"
            )
    x, y = found["x"], found["y"]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DeepAlignError(f"{path}: x and y must be tensors or arrays")
    per_position = y.dim() >= 2 and tuple(y.shape) == tuple(x.shape[: y.dim()])
    if x.dim() < 2 or not (y.dim() == 1 or per_position) or x.shape[0] != y.shape[0]:
        raise DeepAlignError(
            f"{path}: x must hold one example per row and y one label per example, or one per "
            f"position (next tokens) (got x {tuple(x.shape)}, y {tuple(y.shape)})"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DeepAlignError(f"{path}: y must hold integer class labels (got {y.dtype})")
    if x.is_floating_point():
        x = x.float()
        if not bool(torch.isfinite(x).all()):
            raise DeepAlignError(f"{path}: x holds NaN or inf values")
    elif x.dtype != torch.bool and not x.is_complex():
        x = x.long()  # token indices (a language model's input) stay integers
    else:
        raise DeepAlignError(f"{path}: x must hold numbers or token indices (got {x.dtype})")
    y = y.long()
    if len(y) == 0 or int(y.min()) < 0:
        raise DeepAlignError(f"{path}: y must hold class labels 0, 1, ... (and not be empty)")
    return Dataset(x.contiguous(), y, int(y.max()) + 1, path.name, "as given")
