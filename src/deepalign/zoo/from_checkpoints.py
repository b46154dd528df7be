"""A zoo from the user's own checkpoint files, in the format every consumer reads (no training).

The files are state dicts of one class (``.pt`` or ``.safetensors``, the usual wrappers
accepted); each must fit the class. Files of other hidden widths than the class builds form
members of a zoo set (one member per width). Each file's split is a hash of its name and the
seed, and files keep their index once in the zoo, so a rerun with more files appends them and
keeps the rest (only the last, partly filled shard is rewritten). Shards are written atomically.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deepalign.core.arch import build
from deepalign.core.checkpoint import load_state
from deepalign.core.functional import batched_forward
from deepalign.core.user_model import USER_MODEL, config_example, spec_of, user_arch
from deepalign.data import Dataset, is_data_file, load, load_file
from deepalign.errors import DeepAlignError
from deepalign.zoo import storage
from deepalign.zoo.plan import CHECKPOINTS, Training, ZooPlan
from deepalign.zoo.zoo_set import SET_FORMAT, SET_MANIFEST, is_set, member_folders

SHARD_SIZE = 256
EVAL_CHUNK = 64  # networks per batched forward pass when measuring test loss and accuracy


def checkpoint_zoo_data(
    plan: ZooPlan, split: str, data_dir: str | os.PathLike | None = None
) -> Dataset:
    """The data a zoo from checkpoints was given (``--data``): a built-in set's split, or the
    user's file (the same examples for every split), shaped as the class reads them."""
    ref = plan.dataset
    if ref is None:
        raise DeepAlignError(
            f"this zoo was made from checkpoints without data: rebuild it with --data "
            f"(a data set name or FILE.npz) to train or bench on it ({plan.arch.get('model')})"
        )
    if is_data_file(ref):
        ds = load_file(ref)
    else:
        ds = load(ref, split, data_dir, normalize=bool(plan.extra.get("normalize", True)))
    if plan.extra.get("flatten"):
        ds = replace(ds, x=ds.x.flatten(1))
    return ds


def _files(sources: str | Sequence[str | os.PathLike]) -> list[Path]:
    patterns = [sources] if isinstance(sources, str | os.PathLike) else list(sources)
    found: list[Path] = []
    for p in patterns:
        hits = sorted(glob.glob(str(p))) if glob.has_magic(str(p)) else [str(p)]
        found += [Path(h) for h in hits if Path(h).is_file() or not glob.has_magic(str(p))]
    if not found:
        raise DeepAlignError(f"--from {sources}: no checkpoint files match")
    out, seen = [], set()
    for f in found:
        if not f.is_file():
            raise DeepAlignError(f"{f}: no such file")
        key = str(f.resolve())
        if key not in seen:
            seen.add(key)
            out.append(f.resolve())
    return out


def _fit(path: Path, state: Mapping[str, Tensor], template: Mapping[str, Tensor], model: str):
    """The file's shapes when it fits the class (same tensors, same ranks; sizes may differ)."""
    where = f"{path} vs {model}"
    for k, t in template.items():
        if k not in state:
            raise DeepAlignError(f"{where}: the file lacks tensor {k}")
        if state[k].dim() != t.dim():
            raise DeepAlignError(
                f"{where}: tensor {k} has shape {tuple(state[k].shape)}, the class {tuple(t.shape)}"
            )
    extra = [k for k in state if k not in template]
    if extra:
        raise DeepAlignError(f"{where}: tensor {extra[0]} is not in the class")
    return tuple((k, tuple(state[k].shape)) for k in template)


def _flatten_needed(module: torch.nn.Module, x: Tensor) -> bool:
    with torch.no_grad():
        try:
            module(x[:2])
            return False
        except RuntimeError:
            pass
        try:
            module(x[:2].flatten(1))
            return True
        except RuntimeError:
            raise DeepAlignError(
                f"data (examples of shape {tuple(x.shape[1:])}) does not fit the model"
            ) from None


def _hidden_name(config: Mapping[str, Any], module: torch.nn.Module) -> str:
    spec = spec_of(module, config_example(config, module))
    return "w" + "-".join(str(n) for n in spec.groups.values())


def _metrics(plan: ZooPlan, module, stacked: dict[str, Tensor], data_dir) -> list[dict[str, Any]]:
    n = next(iter(stacked.values())).shape[0]
    finite = torch.stack([torch.isfinite(v.flatten(1)).all(1) for v in stacked.values()]).all(0)
    rows: list[dict[str, Any]] = [{"finite": bool(finite[i])} for i in range(n)]
    if plan.dataset is None:
        return rows
    ds = checkpoint_zoo_data(plan, "test", data_dir)
    x, y = ds.x[:2048], ds.y[:2048]
    with torch.no_grad():
        for s in range(0, n, EVAL_CHUNK):
            part = {k: v[s : s + EVAL_CHUNK] for k, v in stacked.items()}
            out = batched_forward(module, part, x)
            logp = torch.log_softmax(out.float(), -1)
            loss = -logp.gather(-1, y.expand(out.shape[0], -1).unsqueeze(-1)).squeeze(-1).mean(1)
            acc = (out.argmax(-1) == y).float().mean(1)
            for j in range(out.shape[0]):
                rows[s + j]["test_loss"] = float(loss[j])
                rows[s + j]["test_accuracy"] = float(acc[j])
    return rows


def zoo_from_checkpoints(
    sources: str | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    model: str,
    *,
    model_args: Mapping[str, Any] | str | None = None,
    input_shape: str | Sequence[int] | None = None,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    normalize: bool = True,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    shard_size: int = SHARD_SIZE,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write (or extend) a zoo from checkpoint files of the user's class ``model``; returns the
    zoo folders written (``out``, or its members when the files hold several widths)."""
    out = Path(out)
    files = _files(sources)
    fr = tuple(float(f) for f in split_fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise DeepAlignError(
            f"--split {list(fr)}: expected three non-negative fractions summing to 1"
        )
    if shard_size <= 0:
        raise DeepAlignError(f"--shard-size must be positive, got {shard_size}")
    base = user_arch(model, model_args, input_shape)
    template_module = build(base)
    template = template_module.state_dict()
    data_ref = data
    if data is not None and is_data_file(data):
        data_ref = str(Path(data).resolve())
    # what the folder holds already: its members and their files, by width
    existing: dict[str, list[str]] = {}
    if is_set(out):
        for folder in member_folders(out):
            existing[folder.name] = list(storage.read_plan(folder).extra.get("sources", []))
    elif (out / storage.MANIFEST).exists():
        existing[""] = list(storage.read_plan(out).extra.get("sources", []))
    known = {s for srcs in existing.values() for s in srcs}
    new = [f for f in files if str(f) not in known]
    # every new file must fit the class; group them by shapes (one member per width)
    groups: dict[tuple, list[tuple[Path, dict[str, Tensor]]]] = {}
    for f in new:
        state, _, _ = load_state(f)
        shapes = _fit(f, state, template, model)
        groups.setdefault(shapes, []).append((f, state))
    own_shapes = tuple((k, tuple(t.shape)) for k, t in template.items())
    members: dict[str, tuple[dict[str, Any], list[tuple[Path, dict[str, Tensor]]]]] = {}
    for shapes, items in groups.items():
        config = dict(base, shapes=None if shapes == own_shapes else dict(shapes))
        if config["shapes"] is not None:
            config["shapes"] = {k: list(v) for k, v in shapes}
        name = _hidden_name(config, build(config))
        members[name] = (config, items)
    if "" in existing:  # one width so far: new files must be of that width
        there = storage.read_plan(out).arch
        if any(config != there for config, _ in members.values()):
            raise DeepAlignError(
                f"{out}: holds a zoo of one width; the new files have other widths: use a new --out"
            )
        single = True
    else:
        single = not existing and len(members) <= 1
    flatten = None
    if data_ref is not None:
        probe = checkpoint_zoo_data(
            ZooPlan(
                CHECKPOINTS,
                base,
                data_ref,
                1,
                seed,
                1,
                Training(0, 0.0, None, None, "none"),
                extra={"normalize": normalize, "sources": []},
            ),
            "test",
            data_dir,
        )
        flatten = _flatten_needed(template_module, probe.x)
    written: list[Path] = []
    total = sum(len(items) for _, items in members.values())
    done = 0
    if not single:
        _write_set_manifest(out, sorted(set(members) | set(existing)), base)
    for name, (config, items) in members.items():
        folder = out if single else out / name
        old = existing.get("" if "" in existing else name, [])
        sources = old + [str(f) for f, _ in items]
        extra = {"sources": sources, "normalize": normalize, "flatten": flatten}
        plan = ZooPlan(
            task=CHECKPOINTS,
            arch=config,
            dataset=data_ref,
            n=len(sources),
            seed=seed,
            shard_size=shard_size,
            training=Training(0, 0.0, None, None, "none"),
            split_fractions=fr,  # type: ignore[arg-type]
            extra=extra,
        )
        if old and len(old) % shard_size:  # the partly filled last shard takes new files too
            storage.shard_path(folder, len(old) // shard_size).unlink(missing_ok=True)
        storage.open_folder(folder, plan, str(data_dir) if data_dir is not None else None)
        module = build(config)
        states = {str(f): s for f, s in items}
        for k in range(plan.n_shards):
            if storage.read_shard_rows(folder, k, plan) is not None:
                continue
            idx = list(plan.shard_indices(k))
            loaded = [
                states[sources[i]] if sources[i] in states else load_state(sources[i])[0]
                for i in idx
            ]
            stacked = {
                key: torch.stack([s[key].to(t.dtype) for s in loaded])
                for key, t in module.state_dict().items()
            }
            rows = _metrics(plan, module, stacked, data_dir)
            for i, row in zip(idx, rows, strict=True):
                row.update({"index": i, "source": sources[i]})
            storage.write_shard(folder, k, plan, stacked, rows)
            with storage.folder_lock(folder):
                storage.write_manifest(folder, plan, _data_dir(folder))
            done += sum(sources[i] in states for i in idx)
            if on_progress is not None:
                on_progress(done, total)
        with storage.folder_lock(folder):
            storage.write_manifest(folder, plan, _data_dir(folder))
        written.append(folder)
    return written


def _data_dir(folder: Path) -> str | None:
    return storage.read_manifest(folder).get("data_dir")


def _write_set_manifest(out: Path, names: list[str], base: Mapping[str, Any]) -> None:
    import json

    from deepalign.core.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    if (out / storage.MANIFEST).exists():
        raise DeepAlignError(f"{out}: holds a zoo of one width; use a new --out")
    doc = {
        "format": SET_FORMAT,
        "source": "checkpoints",
        "model": base["model"],
        "members": [{"folder": n} for n in names],
    }
    atomic_write_text(out / SET_MANIFEST, json.dumps(doc, indent=1) + "\n")


__all__ = ["USER_MODEL", "checkpoint_zoo_data", "zoo_from_checkpoints"]
