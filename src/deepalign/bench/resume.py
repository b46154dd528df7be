"""Resume a killed bench: every finished (method, seed) run is kept in ``bench.partial.pt``.

The file lives in the output folder, holds only tensors and plain containers (read back with
``weights_only=True``) and a key of everything the results depend on (zoo, aligner weights,
methods, pairs, seeds, solver settings, device). A rerun with the same key skips the finished runs;
any other key, or an unreadable file, starts over. The file is removed once the outputs are
written. Failed runs are not kept (a rerun tries them again).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepalign.core.io import atomic_path

PARTIAL = "bench.partial.pt"


def run_key(parts: Any) -> str:
    """A short digest of JSON-able ``parts``."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def model_digest(model: nn.Module | None) -> str | None:
    """Digest of a model's weights (None for no model)."""
    if model is None:
        return None
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def _cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, Mapping):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


def shard_file(index: int, count: int) -> str:
    """The partial-runs file of shard ``index`` of ``count``."""
    return f"bench.partial.shard-{index}-of-{count}.pt"


class PartialRuns:
    """The finished runs of one bench (by key), saved after each run when ``out`` is given;
    ``name``: the file (a shard's runs live in :func:`shard_file`)."""

    def __init__(self, out: Path | None, key: str, name: str = PARTIAL) -> None:
        self.path = None if out is None else Path(out) / name
        self.key = key
        self.runs: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.is_file():
            try:
                saved = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - an unreadable partial file only means: start over
                saved = None
            if isinstance(saved, dict) and saved.get("key") == key:
                self.runs = dict(saved.get("runs", {}))

    @staticmethod
    def _name(method: str, seed: int) -> str:
        return f"{method}|{seed}"

    def get(self, method: str, seed: int) -> dict[str, Any] | None:
        return self.runs.get(self._name(method, seed))

    def put(self, method: str, seed: int, record: dict[str, Any]) -> None:
        self.runs[self._name(method, seed)] = _cpu(record)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save({"key": self.key, "runs": self.runs}, tmp)

    def finish(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


def merge_records(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One (method, seed) run from its shards' runs, in shard order (pairs concatenated)."""
    first = parts[0]
    n = [len(p["rows"]) for p in parts]
    merged = dict(first)
    merged["rows"] = [r for p in parts for r in p["rows"]]
    for key in ("loss", "accuracy"):
        merged[key] = None if first[key] is None else torch.cat([p[key] for p in parts])
    merged["trajectories"] = [t for p in parts for t in p["trajectories"]]
    merged["timing"] = next((p["timing"] for p in parts if p["rows"]), first["timing"])
    total = max(sum(n), 1)
    merged["first_seconds"] = (
        sum(p["first_seconds"] * k for p, k in zip(parts, n, strict=True)) / total
    )
    return merged


def gather_shards(out: Path, key: str, partial: PartialRuns) -> tuple[int, int]:
    """Merge the runs every shard of one sharded bench (same key) has finished into ``partial``;
    returns ``(runs merged, shard count)`` (0 shards: none found)."""
    found: dict[int, dict[int, dict[str, Any]]] = {}
    for path in sorted(Path(out).glob("bench.partial.shard-*-of-*.pt")):
        try:
            index, count = (int(x) for x in path.stem.split("shard-")[1].split("-of-"))
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - not one of ours, or unreadable: not a shard of this bench
            continue
        if isinstance(saved, dict) and saved.get("key") == key:
            found.setdefault(count, {})[index] = dict(saved.get("runs", {}))
    merged = 0
    for count, shards in found.items():
        if len(shards) != count:
            continue
        for name in set.intersection(*(set(r) for r in shards.values())):
            if name not in partial.runs:
                method, seed = name.rsplit("|", 1)
                partial.put(
                    method, int(seed), merge_records([shards[i][name] for i in range(count)])
                )
                merged += 1
    return merged, max(found, default=0)
