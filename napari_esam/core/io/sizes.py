"""Sizes checked before any allocation or write: free memory, free disk space, and the
refusals of inputs and outputs too large for them (the rules are in
``docs/troubleshooting-inputs.md``).

* An input whose single chunk (a TIFF strip or tile, a Zarr chunk) is larger than half the
  available memory is refused: any read of it, however small, decodes the whole chunk.
* A TIFF page (one 2-D plane of labels, written whole) larger than half the available memory
  is refused before anything is computed: export to ``.zarr`` instead.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

import numpy as np

__all__ = [
    "available_memory",
    "check_chunks_fit",
    "check_fits_in_memory",
    "format_bytes",
    "free_disk",
    "largest_chunk_bytes",
]

#: assumed when the available memory cannot be read
DEFAULT_MEMORY = 4 * 2**30


def available_memory() -> int:
    """Bytes of memory available to this process now (``MemAvailable`` on Linux, psutil
    elsewhere when installed, else :data:`DEFAULT_MEMORY`)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil is optional
        return DEFAULT_MEMORY


def free_disk(path: str | os.PathLike) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(os.fspath(path))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return int(shutil.disk_usage(path).free)


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human size (``"9.3 GiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def largest_chunk_bytes(array: Any) -> int:
    """Bytes of the largest chunk of ``array`` (Zarr chunks/shards, Dask blocks; an array
    without chunks (NumPy, memory-mapped .npy) counts as chunks of one element)."""
    itemsize = np.dtype(array.dtype).itemsize
    chunks = getattr(array, "shards", None) or getattr(array, "chunks", None)
    if not chunks:
        return itemsize
    sides = [max(c) if isinstance(c, tuple) else int(c) for c in chunks]
    return math.prod(sides) * itemsize


def check_fits_in_memory(nbytes: int, what: str, advice: str) -> None:
    """``ValueError`` when ``nbytes`` (needed in one piece) exceed half the available
    memory; the message gives both sizes, ``what`` needs them and ``advice``."""
    limit = available_memory() // 2
    if nbytes > limit:
        raise ValueError(
            f"{what} needs {format_bytes(nbytes)} of memory in one piece, more than half of "
            f"the {format_bytes(2 * limit)} available; {advice}"
        )


def check_chunks_fit(array: Any, where: Any) -> None:
    """Refuse an input whose single chunk would not fit in memory (module doc)."""
    shape = tuple(int(s) for s in array.shape)
    chunks = getattr(array, "shards", None) or getattr(array, "chunks", None)
    if not chunks:
        return
    sides = tuple(max(c) if isinstance(c, tuple) else int(c) for c in chunks)
    check_fits_in_memory(
        largest_chunk_bytes(array),
        f"{str(where)!r} (shape {shape}, {np.dtype(array.dtype)}) is stored in chunks of "
        f"{sides}: reading any part of one",
        "rewrite it with smaller chunks or tiles (e.g. a tiled TIFF, or a Zarr array chunked "
        "1024 x 1024)",
    )
