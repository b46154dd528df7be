"""Aligner folders on disk: ``config.json`` (what it aligns, its hyper-parameters, provenance) and
``model.safetensors``. Only reading and writing; :meth:`deepalign.nn.DeepAlign.from_pretrained`
builds the model."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from deepalign.core.checkpoint import save_state
from deepalign.core.io import atomic_write_text
from deepalign.errors import DeepAlignError

FORMAT = "deepalign-aligner/1"


def write_folder(
    folder: str | os.PathLike,
    state: Mapping[str, Tensor],
    arch: Mapping[str, Any],
    model_config: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
) -> None:
    """Write an aligner folder; ``arch`` is the config of the networks it aligns."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state(dict(state), folder / "model.safetensors")
    config = {"format": FORMAT, "arch": dict(arch), "model": dict(model_config), **dict(info or {})}
    atomic_write_text(folder / "config.json", json.dumps(config, indent=1))


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The aligner's ``config.json``, checked."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise DeepAlignError(f"{folder}: no such aligner folder")
    if not path.is_file():
        raise DeepAlignError(f"{folder}: not an aligner folder (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DeepAlignError(f"{path}: corrupt aligner config") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or "arch" not in config:
        raise DeepAlignError(f"{path}: not a deepalign aligner config")
    return config


def read_weights(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The aligner's ``model.safetensors``."""
    weights = Path(folder) / "model.safetensors"
    if not weights.is_file():
        raise DeepAlignError(f"{folder}: aligner weights model.safetensors are missing")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise DeepAlignError(f"{weights}: not a safetensors file ({str(exc)[:60]})") from None
