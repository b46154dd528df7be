"""Checkpoints: self-describing safetensors (the architecture in their metadata) and the user's
plain state dicts.

``save_model`` writes any module built from our layers (:mod:`deepalign.core.arch`); ``load_model``
rebuilds it from the file alone. Plain state dicts (safetensors without metadata, ``.pt``/``.pth``
read with ``torch.load(weights_only=True)``) load with the user's own class
(:func:`load_network` with ``model="file.py:Name"``) or a named architecture. Outputs are written
in the format their file name says (``.pt``: a plain ``torch.save`` state dict) with the input's
parameter names. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
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


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def file_format(path: str | os.PathLike) -> str:
    """``"torch"`` for ``.pt``/``.pth``/``.bin``/``.ckpt`` names, else ``"safetensors"``."""
    return "torch" if Path(path).suffix.lower() in TORCH_SUFFIXES else "safetensors"


def write_state(
    state: Mapping[str, Tensor],
    path: str | os.PathLike,
    fmt: str = "safetensors",
    arch: Config | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write a state dict in ``fmt``: safetensors (with ``arch`` and ``meta`` as metadata) or a
    plain ``torch.save`` dict of tensors (what ``model.load_state_dict(torch.load(f))`` reads)."""
    if fmt == "torch":
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        with atomic_path(path) as tmp:
            torch.save(tensors, tmp)
    else:
        save_state(state, path, arch, meta)


def save_model(
    module: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any] | None = None
) -> None:
    """Save ``module`` as a self-describing safetensors checkpoint (weights + architecture).

    Only modules built from the layers of :mod:`deepalign.core.arch` describe themselves; save
    your own class's ``state_dict()`` (``torch.save`` or :func:`write_state`) and trace it with
    :func:`deepalign.spec_from_model`.
    """
    try:
        arch = describe(module)
    except DeepAlignError as exc:
        raise DeepAlignError(
            f"save_model: {exc}; for your own class save module.state_dict() and get its spec "
            "with deepalign.spec_from_model(module, example_input)"
        ) from None
    save_state(module.state_dict(), path, arch, meta)


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
            f"{path}: a plain state dict that does not describe its architecture; give its "
            "class (load_network(path, model='file.py:Name'); CLI --model file.py:Name) or one "
            "of ours (arch=, --arch)"
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


def first_difference(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], names: tuple[str, str] = ("A", "B")
) -> str | None:
    """The first tensor (and axis) where two state dicts' structures differ, in words; None when
    they have the same keys and shapes."""
    for k in a:
        if k not in b:
            return f"{k} is in {names[0]} but not in {names[1]}"
        sa, sb = tuple(a[k].shape), tuple(b[k].shape)
        if len(sa) != len(sb):
            return f"{k} has {len(sa)} axes in {names[0]} and {len(sb)} in {names[1]}"
        for d, (x, y) in enumerate(zip(sa, sb, strict=True)):
            if x != y:
                return f"{k} axis {d} has size {x} in {names[0]} and {y} in {names[1]}"
    extra = [k for k in b if k not in a]
    if extra:
        return f"{extra[0]} is in {names[1]} but not in {names[0]}"
    return None


@dataclass
class Network:
    """A checkpoint loaded with what it takes to use it: weights, module, spec, and where its
    architecture came from (``arch``: our config; ``model``: the user's class reference)."""

    path: Path
    state: dict[str, Tensor]
    module: nn.Module
    spec: Any
    meta: dict[str, str]
    arch: Config | None = None
    model: dict[str, Any] | None = None  # {"model": ref, "model_args": {...}, "input_shape": [...]}
    example: Tensor | None = None

    @property
    def architecture(self) -> dict[str, Any]:
        """What two checkpoints must share to be aligned: the config, or the class reference."""
        return dict(self.arch) if self.arch is not None else dict(self.model or {})

    def write(
        self,
        state: Mapping[str, Tensor],
        tmp: str | os.PathLike,
        out: str | os.PathLike,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Write ``state`` (this network's names) to ``tmp``, in the format ``out``'s name says;
        safetensors of our architectures keep describing themselves."""
        fmt = file_format(out)
        write_state(state, tmp, fmt, self.arch if fmt == "safetensors" else None, meta)


def load_network(
    path: str | os.PathLike,
    *,
    arch: Config | str | None = None,
    model: str | None = None,
    model_args: Mapping[str, Any] | str | None = None,
    input_shape: str | tuple[int, ...] | None = None,
) -> Network:
    """A checkpoint as a :class:`Network`: a self-describing file alone, or a plain state dict
    with the user's class (``model="file.py:Name"`` or ``"package.module:Name"``, built with
    ``model_args``; traced on one example of ``input_shape``) or a named architecture (``arch``)."""
    from deepalign.core.user_model import build_model, example_batch, parse_shape, spec_of

    if model is None:
        if input_shape is not None or model_args is not None:
            raise DeepAlignError(
                "an input shape or model arguments need a model class (model=, CLI --model)"
            )
        state, config, module, spec, meta = load_checkpoint(path, arch)
        return Network(Path(path), state, module, spec, meta, arch=config)
    if arch is not None:
        raise DeepAlignError(
            "give either a model class (model=, --model) or an architecture (arch=, --arch)"
        )
    state, stored, meta = load_state(path)
    module = build_model(model, model_args)
    own = module.state_dict()
    where = f"{path} vs {model}"
    diff = first_difference(state, own, (str(path), model))
    if diff is not None:
        raise DeepAlignError(f"{where}: the file does not fit the class: {diff}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    shape = parse_shape(input_shape) if input_shape is not None else None
    example = example_batch(shape, module=module) if shape is not None else None
    spec = spec_of(module, example)
    spec.check(state, where=str(path))
    ref = {
        "model": model,
        "model_args": json.loads(model_args)
        if isinstance(model_args, str)
        else dict(model_args or {}),
        "input_shape": list(shape) if shape else None,
    }
    return Network(Path(path), state, module.eval(), spec, meta, model=ref, example=example)
