"""The user's own model classes: build one from ``FILE.py:NAME`` or ``package.module:NAME``, make an
example input from a shape, and derive its spec (hand rules for our layer trees, else the tracer).

Importing the user's file runs their code, as ``python FILE.py`` would; nothing is unpickled.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deepalign.core.spec import PermutationSpec
from deepalign.errors import DeepAlignError

_IMPORTED: dict[tuple[str, int, str], Callable[..., Any]] = {}  # a file's class, until it changes


def import_factory(ref: str) -> Callable[..., Any]:
    """The class or function ``NAME`` of ``FILE.py:NAME`` or ``package.module:NAME``."""
    where, sep, name = str(ref).rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise DeepAlignError(f"model {ref!r}: expected FILE.py:NAME or package.module:NAME")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise DeepAlignError(f"model {ref!r}: no such file {where}")
        key = (str(path.resolve()), path.stat().st_mtime_ns, name)
        if key in _IMPORTED:
            return _IMPORTED[key]
        mod_name = f"deepalign_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise DeepAlignError(f"model {ref!r}: cannot import {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickle-free reflection need it there
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001  (the user's code can fail in any way)
            sys.modules.pop(mod_name, None)
            raise DeepAlignError(
                f"model {ref!r}: importing {where} failed ({type(exc).__name__}: {_line(exc)})"
            ) from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:  # noqa: BLE001
            raise DeepAlignError(
                f"model {ref!r}: cannot import {where} ({type(exc).__name__}: {_line(exc)})"
            ) from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise DeepAlignError(f"model {ref!r}: {where} has no class or function {name!r}")
    if where.endswith(".py") or "/" in where or "\\" in where:
        _IMPORTED[(str(Path(where).resolve()), Path(where).stat().st_mtime_ns, name)] = factory
    return factory


def build_model(ref: str, args: Mapping[str, Any] | str | None = None) -> nn.Module:
    """``NAME(**args)`` from :func:`import_factory`: a class built with keyword arguments, or a
    factory returning an ``nn.Module`` (eval mode)."""
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise DeepAlignError(f"model arguments {args!r}: not valid JSON") from None
    if args is not None and not isinstance(args, Mapping):
        raise DeepAlignError("model arguments: expected a JSON object of keyword arguments")
    factory = import_factory(ref)
    try:
        model = factory(**dict(args or {}))
    except Exception as exc:  # noqa: BLE001
        raise DeepAlignError(
            f"model {ref!r}: building it failed ({type(exc).__name__}: {_line(exc)})"
        ) from None
    if not isinstance(model, nn.Module):
        raise DeepAlignError(f"model {ref!r}: returned {type(model).__name__}, not an nn.Module")
    return model.eval()


USER_MODEL = "UserModel"  # the architecture config type of a user's class (zoos from checkpoints)


def user_arch(
    model: str,
    model_args: Mapping[str, Any] | str | None = None,
    input_shape: str | tuple[int, ...] | list[int] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """An architecture config for the user's class: the reference (a file path made absolute),
    its keyword arguments, one example's shape, and -- for other widths than the class builds --
    every tensor's shape."""
    where, sep, name = str(model).rpartition(":")
    if sep and (where.endswith(".py") or "/" in where) and Path(where).is_file():
        model = f"{Path(where).resolve()}:{name}"
    if isinstance(model_args, str):
        try:
            model_args = json.loads(model_args)
        except json.JSONDecodeError:
            raise DeepAlignError(f"model arguments {model_args!r}: not valid JSON") from None
    return {
        "type": USER_MODEL,
        "model": model,
        "model_args": dict(model_args or {}),
        "input_shape": None if input_shape is None else list(parse_shape(input_shape)),
        "shapes": None if shapes is None else {k: list(v) for k, v in shapes.items()},
    }


def build_user_arch(config: Mapping[str, Any]) -> nn.Module:
    """The module a :func:`user_arch` config describes (resized to its ``shapes`` when given)."""
    module = build_model(str(config["model"]), config.get("model_args") or {})
    shapes = config.get("shapes")
    return resized(module, shapes) if shapes else module


def config_example(config: Mapping[str, Any], module: nn.Module) -> Tensor | None:
    """An example batch for the module a config describes, when the config records its input
    shape (a user's class); None otherwise (our layer trees need none)."""
    shape = config.get("input_shape") if config.get("type") == USER_MODEL else None
    return example_batch(tuple(shape), module=module) if shape else None


def resized(module: nn.Module, shapes: Mapping[str, Any]) -> nn.Module:
    """``module`` with every parameter and buffer of ``shapes`` (other hidden widths than its
    constructor made), the size attributes of torch's layers updated to match."""
    own = module.state_dict()
    for key, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if key not in own or tuple(own[key].shape) == shape:
            continue
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        old = getattr(owner, leaf)
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else shape[0]
        gen = torch.Generator().manual_seed(len(key))
        new = (torch.rand(shape, generator=gen) * 2 - 1).to(old.dtype) / fan_in**0.5
        if leaf == "running_var":
            new = torch.ones(shape, dtype=old.dtype)
        elif leaf == "running_mean":
            new = torch.zeros(shape, dtype=old.dtype)
        if isinstance(old, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(leaf, new)
        if leaf == "weight" and len(shape) >= 2:
            for attr, dim in (("out_features", 0), ("in_features", 1), ("out_channels", 0)):
                if hasattr(owner, attr):
                    setattr(owner, attr, shape[dim])
            if hasattr(owner, "in_channels") and len(shape) > 2:
                owner.in_channels = shape[1] * getattr(owner, "groups", 1)
        elif len(shape) == 1:
            if hasattr(owner, "num_features"):
                owner.num_features = shape[0]
            if isinstance(owner, nn.LayerNorm):
                owner.normalized_shape = (shape[0],)
    return module


def parse_shape(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """One example's shape: ``"64"``, ``"1,28,28"`` (or ``1x28x28``), or a tuple."""
    if isinstance(text, tuple | list):
        dims = list(text)
    else:
        parts = str(text).replace("x", ",").replace(" ", "").strip("()").split(",")
        try:
            dims = [int(p) for p in parts if p]
        except ValueError:
            raise DeepAlignError(
                f"input shape {text!r}: expected sizes like 64 or 1,28,28"
            ) from None
    if not dims or any(not isinstance(d, int) or d <= 0 for d in dims):
        raise DeepAlignError(f"input shape {text!r}: expected positive sizes like 64 or 1,28,28")
    return tuple(dims)


def _first_layer(module: nn.Module) -> nn.Module | None:
    kinds = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Embedding
    return next((m for m in module.modules() if isinstance(m, kinds)), None)


def example_batch(
    shape: tuple[int, ...], n: int = 2, seed: int = 0, module: nn.Module | None = None
) -> Tensor:
    """``n`` random examples of one example's ``shape`` (tracing only looks at shapes): token
    indices when ``module`` starts with an ``nn.Embedding`` (a language model), else floats."""
    gen = torch.Generator().manual_seed(seed)
    first = _first_layer(module) if module is not None else None
    if isinstance(first, nn.Embedding):
        return torch.randint(0, first.num_embeddings, (n, *shape), generator=gen)
    return torch.randn(n, *shape, generator=gen)


def guess_example(module: nn.Module) -> Tensor | None:
    """An example batch when the first layer says what it takes (a Linear: its input size)."""
    first = _first_layer(module)
    if isinstance(first, nn.Linear):
        return example_batch((first.in_features,))
    return None


def spec_of(
    module: nn.Module, example_input: Tensor | tuple[Tensor, ...] | None = None
) -> PermutationSpec:
    """The permutation spec of any module: hand rules for the layer trees of
    :mod:`deepalign.core.arch`, else traced on ``example_input`` (guessed for a model whose first
    layer is a Linear)."""
    from deepalign.core.spec_builders import spec_for_module
    from deepalign.core.trace import spec_from_model

    if example_input is None:
        try:
            return spec_for_module(module)
        except DeepAlignError:
            example_input = guess_example(module)
        if example_input is None:
            raise DeepAlignError(
                f"{type(module).__name__}: pass example_input (one batch of inputs) so its "
                "permutation spec can be traced"
            )
    return spec_from_model(module, example_input)


def _line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else ""
