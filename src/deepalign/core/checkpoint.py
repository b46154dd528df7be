"""Self-describing checkpoints: safetensors whose metadata carry the architecture.

``save_model`` writes any module built from supported layers; ``load_model`` rebuilds it from the
file alone. Plain state dicts (safetensors without metadata, ``.pt``/``.pth`` read with
``torch.load(weights_only=True)``) load when the caller names the architecture. Nothing else is
ever unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deepalign.core.arch import Config, build, describe
from deepalign.core.io import atomic_path
from deepalign.errors import DeepAlignError

FORMAT = "deepalign/1"
ARCH_KEY = "deepalign.arch"


def _check_finite(state: Mapping[str, Tensor], where: str) -> None:
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DeepAlignError(f"{where}: tensor {key} holds NaN or inf values")


def save_state(
    state: Mapping[str, Tensor],
    path: str | os.PathLike,
    arch: Config | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write tensors (and the architecture) to a safetensors file, atomically."""
    metadata = {"format": FORMAT}
    if arch is not None:
        metadata[ARCH_KEY] = json.dumps(arch)
    for k, v in (meta or {}).items():
        metadata[f"deepalign.{k}"] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_model(
    module: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any] | None = None
) -> None:
    """Save ``module`` as a self-describing safetensors checkpoint (weights + architecture)."""
    save_state(module.state_dict(), path, describe(module), meta)


def parse_arch(text: str) -> Config:
    """An architecture given on the command line: a JSON file, a JSON string, or ``mlp:64-32-10``."""
    from deepalign.core import arch as _arch

    m = re.fullmatch(r"mlp:(\d+(?:-\d+)+)(?::(\w+))?", text.strip())
    if m:
        widths = [int(w) for w in m.group(1).split("-")]
        return describe(_arch.mlp(widths, m.group(2) or "relu"))
    p = Path(text)
    try:
        is_file = p.is_file()
    except OSError:  # e.g. JSON text longer than a file name may be
        is_file = False
    try:
        raw = p.read_text() if is_file else text
        config = json.loads(raw)
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise DeepAlignError(
            f"--arch {shown!r}: not a JSON file, JSON text or 'mlp:IN-H-...-OUT'"
        ) from None
    build(config, where="--arch")  # validates
    return config


def load_state(path: str | os.PathLike) -> tuple[dict[str, Tensor], Config | None, dict[str, str]]:
    """Read tensors, the architecture (None when the file has none) and the raw metadata."""
    path = Path(path)
    if not path.exists():
        raise DeepAlignError(f"{path}: no such file")
    if path.is_dir():
        raise DeepAlignError(f"{path}: is a folder, expected a checkpoint file")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            with warnings.catch_warnings():  # a corrupt file can trigger unpickler warnings
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise DeepAlignError(
                f"{path}: refused to unpickle (not a plain tensor state dict)"
            ) from None
        except Exception as exc:  # noqa: BLE001  (a corrupt pickle can fail in any way)
            raise DeepAlignError(
                f"{path}: not a readable torch file ({exc.__class__.__name__})"
            ) from None
        if (
            isinstance(obj, Mapping)
            and "state_dict" in obj
            and isinstance(obj["state_dict"], Mapping)
        ):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise DeepAlignError(f"{path}: expected a state dict of tensors")
        state, arch, metadata = dict(obj), None, {}
    else:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DeepAlignError(
                f"{path}: not a safetensors file ({str(exc).splitlines()[0][:80]})"
            ) from None
        arch = None
        if ARCH_KEY in metadata:
            try:
                arch = json.loads(metadata[ARCH_KEY])
            except json.JSONDecodeError:
                raise DeepAlignError(f"{path}: corrupt architecture metadata") from None
    _check_finite(state, str(path))
    return state, arch, metadata


def load_checkpoint(
    path: str | os.PathLike, arch: Config | str | None = None
) -> tuple[dict[str, Tensor], Config, nn.Module, Any, dict[str, str]]:
    """Tensors, architecture config, loaded module (eval mode), spec and metadata, all checked.

    ``arch`` (a config or ``parse_arch`` text) is needed only for plain state dicts.
    """
    from deepalign.core.spec_builders import spec_for_module

    state, stored, meta = load_state(path)
    if isinstance(arch, str):
        arch = parse_arch(arch)
    config = arch if arch is not None else stored
    if config is None:
        raise DeepAlignError(
            f"{path}: the file does not describe its architecture; pass one (--arch)"
        )
    module = build(config, where=f"{path}: architecture")
    spec = spec_for_module(module)
    spec.check(state, where=str(path))
    own = module.state_dict()
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise DeepAlignError(
                f"{path}: {k} has shape {tuple(v.shape)}, the architecture expects {tuple(own[k].shape)}"
            )
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return state, config, module.eval(), spec, meta


def load_model(path: str | os.PathLike, arch: Config | str | None = None) -> nn.Module:
    """Rebuild the module stored in ``path``; ``arch`` is needed only for plain state dicts."""
    return load_checkpoint(path, arch)[2]
