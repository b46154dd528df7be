"""Aligner folders: ``config.json`` (what it aligns, its hyper-parameters, provenance) + ``model.safetensors``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from deepalign.core.checkpoint import save_state
from deepalign.core.io import atomic_write_text
from deepalign.core.weight_space import WeightSpaceLayout
from deepalign.errors import DeepAlignError
from deepalign.nn.model import DeepAlign, DeepAlignConfig

FORMAT = "deepalign-aligner/1"


def save_pretrained(
    model: DeepAlign,
    folder: str | os.PathLike,
    arch: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
) -> None:
    """Write the aligner folder; ``arch`` is the config of the networks it aligns."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state(model.state_dict(), folder / "model.safetensors")
    config = {
        "format": FORMAT,
        "arch": dict(arch),
        "model": model.config.to_dict(),
        **dict(info or {}),
    }
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


def load_pretrained(folder: str | os.PathLike, device: torch.device | str = "cpu") -> DeepAlign:
    """Rebuild a trained aligner (eval mode) from its folder."""
    folder = Path(folder)
    config = read_config(folder)
    layout = WeightSpaceLayout.from_config(config["arch"])
    model = DeepAlign(layout, DeepAlignConfig.from_dict(config["model"]))
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise DeepAlignError(f"{folder}: aligner weights model.safetensors are missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise DeepAlignError(f"{weights}: not a safetensors file ({str(exc)[:60]})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise DeepAlignError(f"{weights}: weights do not match the aligner's config.json") from None
    model.arch = config["arch"]
    model.info = config
    return model.to(device).eval()


def check_arch(model: DeepAlign, arch: Mapping[str, Any], where: str) -> None:
    """Refuse to align networks of another architecture than the aligner was trained for."""
    from deepalign.core.arch import build
    from deepalign.core.spec_builders import spec_for_module

    mine = getattr(model, "arch", None)
    if mine is None or dict(mine) == dict(arch):
        return
    ours = WeightSpaceLayout.from_config(mine).widths
    try:
        theirs = WeightSpaceLayout.from_config(arch).widths
    except DeepAlignError:
        theirs = tuple(spec_for_module(build(arch)).groups.values())
    raise DeepAlignError(
        f"{where}: the aligner was trained for networks of widths {'-'.join(map(str, ours))}, "
        f"got {'-'.join(map(str, theirs))}"
    )
