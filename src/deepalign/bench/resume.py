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


class PartialRuns:
    """The finished runs of one bench (by key), saved after each run when ``out`` is given."""

    def __init__(self, out: Path | None, key: str) -> None:
        self.path = None if out is None else Path(out) / PARTIAL
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
