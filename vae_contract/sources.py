"""Readers of image arrays that training (`vae-train`) and batch scoring (`vae-score`) share, torch-free.

IDX (MNIST's format, gzipped or not) and numpy files; each gives integer images (N, H, W[, C]) and raises
SourceError with the file and what is wrong. An uncompressed IDX or a .npy file can be memory-mapped, so a
reader that goes through it in slices holds one slice at a time, whatever the file's size.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np


class SourceError(ValueError):
    """A data file that cannot be read or does not hold images."""


def read_idx(path: Path, mmap: bool = False) -> np.ndarray:
    """An IDX unsigned-byte image file, gzipped or not, as (N, H, W) uint8: a copy in memory, or with `mmap`
    a read-only memory map where the file is not gzipped."""
    try:
        with path.open("rb") as f:
            head = f.read(2)
        gzipped = head == b"\x1f\x8b"
        raw = path.read_bytes() if gzipped or not mmap else None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if raw is not None and gzipped:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise SourceError(f"{path}: corrupt gzip stream: {exc}") from exc
    if raw is None:
        with path.open("rb") as f:
            header_bytes = f.read(4 + 4 * 3)
        size = path.stat().st_size
    else:
        header_bytes, size = raw[:16], len(raw)
    if len(header_bytes) < 4 or header_bytes[0] != 0 or header_bytes[1] != 0:
        raise SourceError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = header_bytes[2], header_bytes[3]
    if dtype_code != 0x08:
        raise SourceError(f"{path}: IDX element type 0x{dtype_code:02x} is not unsigned byte (0x08)")
    if ndim != 3:
        raise SourceError(f"{path}: IDX holds {ndim}-dimensional data; images need 3 (N, H, W)")
    header = 4 + 4 * ndim
    if len(header_bytes) < header:
        raise SourceError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, header_bytes[4:header])
    expected = int(np.prod(dims))
    if size - header != expected:
        raise SourceError(
            f"{path}: IDX header declares {dims} = {expected} bytes of data but the file holds {size - header}"
        )
    if raw is None:
        return np.memmap(path, dtype=np.uint8, mode="r", offset=header, shape=dims)
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def load_array_file(path: Path, mmap: bool = False) -> Any:
    """np.load without pickles: an array (memory-mapped with `mmap`, .npy only) or an .npz archive."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as exc:
        raise SourceError(f"{path}: cannot read as a numpy file: {exc}") from exc
