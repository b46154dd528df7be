"""A zoo folder on disk: ``manifest.json`` plus ``shard-KKKKK.safetensors`` files.

A shard holds its models' tensors stacked along dim 0 (one safetensors tensor per state-dict key)
and, in its metadata, the zoo fingerprint, its shard number and its models' metric rows. Shards are
written atomically and never rewritten, so the shard files are the truth; ``manifest.json`` is
rebuilt from them under a file lock after every shard (workers of one zoo may run concurrently).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from deepalign.core.io import atomic_path, atomic_write_text
from deepalign.errors import DeepAlignError
from deepalign.zoo.plan import FORMAT, ZooPlan

MANIFEST = "manifest.json"
LOCK = ".zoo.lock"


def shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.safetensors"


def write_shard(
    folder: Path, k: int, plan: ZooPlan, stacked: Mapping[str, Tensor], rows: list[dict[str, Any]]
) -> None:
    """Write shard ``k`` atomically: stacked tensors + fingerprint + metric rows in the metadata."""
    meta = {
        "format": FORMAT,
        "fingerprint": plan.fingerprint,
        "shard": str(k),
        "rows": json.dumps(rows, sort_keys=True),
    }
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in stacked.items()}
    with atomic_path(shard_path(folder, k)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_shard_rows(folder: Path, k: int, plan: ZooPlan) -> list[dict[str, Any]] | None:
    """Shard ``k``'s metric rows (header only), None when it is not written yet; errors if corrupt."""
    path = shard_path(folder, k)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DeepAlignError(
            f"{path}: corrupt zoo shard ({exc}); delete it to retrain it"
        ) from None
    if meta.get("fingerprint") != plan.fingerprint or meta.get("shard") != str(k):
        raise DeepAlignError(
            f"{path}: shard belongs to a different zoo than {folder / MANIFEST}; move it away"
        )
    count = len(plan.shard_indices(k))
    if any(s[:1] != (count,) for s in shapes.values()) or not keys:
        raise DeepAlignError(f"{path}: corrupt zoo shard (expected {count} models per tensor)")
    try:
        rows = json.loads(meta["rows"])
        assert [r["index"] for r in rows] == list(plan.shard_indices(k))
    except (KeyError, json.JSONDecodeError, AssertionError, TypeError):
        raise DeepAlignError(
            f"{path}: corrupt zoo shard metadata; delete it to retrain it"
        ) from None
    return rows


def read_shard_tensors(folder: Path, k: int) -> dict[str, Tensor]:
    path = shard_path(folder, k)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DeepAlignError(
            f"{path}: corrupt zoo shard ({exc}); delete it to retrain it"
        ) from None


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DeepAlignError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeepAlignError(f"{path}: corrupt zoo manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DeepAlignError(f"{path}: not a deepalign zoo manifest (format {FORMAT} expected)")
    return data


def read_plan(folder: Path) -> ZooPlan:
    data = read_manifest(folder)
    plan = ZooPlan.from_json(data, where=str(folder / MANIFEST))
    if data.get("fingerprint") not in (None, plan.fingerprint):
        raise DeepAlignError(f"{folder / MANIFEST}: corrupt zoo manifest (fingerprint mismatch)")
    return plan


def collect_rows(folder: Path, plan: ZooPlan) -> list[dict[str, Any]]:
    """Every model's row: the plan's facts, plus ``trained`` and the metrics from written shards."""
    rows = plan.base_rows()
    for k in range(plan.n_shards):
        done = read_shard_rows(folder, k, plan)
        for i in plan.shard_indices(k):
            rows[i]["trained"] = done is not None
            if done is not None:
                rows[i].update(done[i - k * plan.shard_size])
    return rows


def write_manifest(folder: Path, plan: ZooPlan, data_dir: str | None) -> list[dict[str, Any]]:
    """Rebuild ``manifest.json`` from the plan and the shards on disk; returns the rows."""
    rows = collect_rows(folder, plan)
    n_done = sum(r["trained"] for r in rows)
    doc = {
        **plan.to_json(),
        "fingerprint": plan.fingerprint,
        "data_dir": data_dir,
        "n_shards": plan.n_shards,
        "n_trained": n_done,
        "complete": n_done == plan.n,
        "models": rows,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(doc, indent=1) + "\n")
    return rows


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the zoo folder (advisory ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def open_folder(folder: Path, plan: ZooPlan, data_dir: str | None) -> None:
    """Create the zoo folder for ``plan``, or check that it already holds this very zoo."""
    if folder.exists() and not folder.is_dir():
        raise DeepAlignError(f"--out {folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    _refuse_foreign(folder)
    with folder_lock(folder):
        if (folder / MANIFEST).exists():
            there = read_plan(folder)
            if there.fingerprint != plan.fingerprint:
                diff = "; ".join(there.differences(plan)[:3])
                raise DeepAlignError(
                    f"{folder} holds a different zoo ({diff}); use another --out or the same options"
                )
            old = read_manifest(folder).get("data_dir")
            write_manifest(folder, plan, data_dir if data_dir is not None else old)
            return
        _refuse_foreign(folder)
        write_manifest(folder, plan, data_dir)


def _refuse_foreign(folder: Path) -> None:
    """A folder without a manifest must be empty (hidden files aside): never write into others' files."""
    if (folder / MANIFEST).exists():
        return
    visible = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if visible:
        raise DeepAlignError(
            f"{folder} is not empty and has no {MANIFEST} (holds {visible[0]}); use an empty or new folder"
        )


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temp files left by killed writers (call only when no writer can be active)."""
    for p in folder.glob(".shard-*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()
