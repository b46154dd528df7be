"""CIFAR-10's binary version: records of 1 label byte + 3072 pixel bytes (never the pickled one)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from deepalign.errors import DeepAlignError

RECORD = 1 + 3 * 32 * 32


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 3, 32, 32), labels uint8 (N,))`` from one ``*.bin`` batch."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DeepAlignError(f"{path}: cannot read ({exc})") from None
    if len(raw) == 0 or len(raw) % RECORD:
        raise DeepAlignError(
            f"{path}: not a CIFAR-10 binary batch ({len(raw)} bytes is not a multiple of {RECORD})"
        )
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD)
    labels = rec[:, 0].copy()
    if labels.max() > 9:
        raise DeepAlignError(f"{path}: label {int(labels.max())} out of range for CIFAR-10")
    return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), labels
