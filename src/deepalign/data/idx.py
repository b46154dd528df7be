"""IDX files (MNIST, Fashion-MNIST): a strict reader that checks magic numbers and sizes."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from deepalign.errors import DeepAlignError

# IDX type code -> big-endian numpy dtype
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """The array in an IDX file (``.gz`` or not); an error names the file if it is malformed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DeepAlignError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DeepAlignError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dims = raw[3]
    if ndim is not None and dims != ndim:
        raise DeepAlignError(f"{path}: IDX file has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DeepAlignError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=dims, offset=4))
    dtype = _DTYPES[raw[2]]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DeepAlignError(
            f"{path}: IDX size mismatch: header says {shape} ({expected} bytes), file has {len(raw)}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzipped when the name ends in ``.gz``); used by tests and tools."""
    from deepalign.core.io import atomic_path

    codes = {v.newbyteorder("="): k for k, v in _DTYPES.items()}
    arr = np.ascontiguousarray(array)
    code = codes.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise DeepAlignError(f"IDX cannot store dtype {arr.dtype}")
    head = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    body = head + arr.astype(_DTYPES[code]).tobytes()
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(body, mtime=0) if path.suffix == ".gz" else body)
