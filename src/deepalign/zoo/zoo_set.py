"""A zoo of several hidden widths: one member zoo per width under one folder.

Networks of different widths cannot be stacked into one tensor, and pairs are only ever aligned
within one architecture, so each width is an ordinary zoo (``w16/``, ``w32/``, ...) with its own
shards, manifest and splits; ``zoo-set.json`` lists the members and the options that made them.
Deep-Align training draws each step's pairs from one member
(:func:`deepalign.zoo.loader.open_zoos` gives them all).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepalign.core.io import atomic_write_text
from deepalign.core.seeds import derive_seed
from deepalign.errors import DeepAlignError
from deepalign.zoo import storage
from deepalign.zoo.plan import ZooPlan, make_plan
from deepalign.zoo.tasks import get_task

SET_MANIFEST = "zoo-set.json"
SET_FORMAT = "deepalign-zoo-set/1"


def parse_widths(text: str | Sequence[int]) -> list[int]:
    """``"16,24,32"`` (or a list) as distinct positive widths, in the order given."""
    if isinstance(text, str):
        try:
            widths = [int(p) for p in text.replace(" ", "").split(",") if p]
        except ValueError:
            raise DeepAlignError(f"--widths {text!r}: expected widths like 16,32,64") from None
    else:
        widths = [int(w) for w in text]
    if not widths or any(w <= 0 for w in widths):
        raise DeepAlignError(f"--widths {text!r}: expected positive widths like 16,32,64")
    if len(set(widths)) != len(widths):
        raise DeepAlignError(f"--widths {text!r}: a width is listed twice")
    return widths


def member_name(width: int) -> str:
    return f"w{width}"


def plan_set(
    task: str, n: int, widths: Sequence[int], seed: int = 0, **options: Any
) -> list[tuple[str, ZooPlan]]:
    """One plan per width: ``n`` networks split evenly (the first widths take the remainder),
    every hidden layer of the task ``width`` wide, each member with a seed of its own."""
    if "hidden" in options and options["hidden"] is not None:
        raise DeepAlignError("give either --hidden (one architecture) or --widths (several)")
    options.pop("hidden", None)
    widths = parse_widths(widths)
    if n < 2 * len(widths):
        raise DeepAlignError(f"--n {n}: too few networks for {len(widths)} widths (2 per width)")
    depth = len(get_task(task).hidden)
    out = []
    for i, w in enumerate(widths):
        count = n // len(widths) + (i < n % len(widths))
        member_seed = derive_seed(seed, "width", w)
        plan = make_plan(task, count, member_seed, hidden=[w] * depth, **options)
        out.append((member_name(w), plan))
    return out


def open_set(folder: str | os.PathLike, members: list[tuple[str, ZooPlan]], args: dict) -> None:
    """Create the set folder, or check it holds this very set (same options)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DeepAlignError(f"--out {folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": SET_FORMAT,
        **args,
        "members": [{"folder": name, "fingerprint": p.fingerprint} for name, p in members],
    }
    path = folder / SET_MANIFEST
    if path.exists():
        there = read_set(folder)
        if there != json.loads(json.dumps(doc)):
            raise DeepAlignError(
                f"{folder} holds a different zoo set; use another --out or the same options"
            )
        return
    if (folder / storage.MANIFEST).exists() or any(
        not p.name.startswith(".") for p in folder.iterdir()
    ):
        raise DeepAlignError(f"{folder} is not empty; use an empty or new folder for a zoo set")
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def read_set(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / SET_MANIFEST
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise DeepAlignError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeepAlignError(f"{path}: corrupt zoo set manifest ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != SET_FORMAT or "members" not in doc:
        raise DeepAlignError(f"{path}: not a deepalign zoo set (format {SET_FORMAT} expected)")
    return doc


def is_set(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SET_MANIFEST).is_file()


def member_folders(folder: str | os.PathLike) -> list[Path]:
    """The member zoo folders of a set, in the set's order."""
    doc = read_set(folder)
    try:
        return [Path(folder) / str(m["folder"]) for m in doc["members"]]
    except (TypeError, KeyError):
        raise DeepAlignError(f"{Path(folder) / SET_MANIFEST}: malformed member list") from None
