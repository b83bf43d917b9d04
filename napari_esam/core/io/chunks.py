"""Damaged chunks: finding the chunk of a Zarr array (or a TIFF read through tifffile's Zarr
store) that cannot be decoded, and naming it.

A read that fails inside a codec (``RuntimeError: error during blosc decompression``, a
truncated strip...) says nothing about which file is damaged. :class:`CheckedArray` wraps an
array so that such a failure becomes a :class:`CorruptChunkError` (a ``ValueError``) naming
the array, the chunk and, for a local store, the chunk's file; :func:`bad_chunks` lists the
unreadable chunks of a region (used to repair run outputs and embedding stores).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

__all__ = ["CheckedArray", "CorruptChunkError", "bad_chunks", "chunk_file", "checked"]

#: what to do about a damaged chunk (the default advice)
ADVICE = ("the file is damaged: restore it, or recompute it (a napari-esam 'everything' "
          "output: run the same command again, it recomputes the damaged slices)")


class CorruptChunkError(ValueError):
    """A chunk of an array cannot be read or decoded."""

    def __init__(self, message: str, coords: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.coords = coords


def _grid(array: Any) -> tuple[int, ...]:
    """The storage unit of ``array``: its shards when sharded, else its chunks."""
    shards = getattr(array, "shards", None)
    return tuple(int(c) for c in (shards or array.chunks))


def chunk_file(array: Any, coords: tuple[int, ...]) -> str | None:
    """The file holding chunk ``coords`` of a Zarr array in a local store (``None`` when
    not known, e.g. a TIFF or a remote store)."""
    try:
        root = getattr(array.store_path.store, "root", None)
        if root is None:
            return None
        key = array.metadata.encode_chunk_key(tuple(int(c) for c in coords))
        return str(Path(root) / array.store_path.path / key)
    except Exception:  # noqa: BLE001 - naming the file is best effort
        return None


def _describe(array: Any, where: Any, coords: tuple[int, ...], exc: BaseException) -> str:
    name = chunk_file(array, coords)
    place = f"{name!r} (chunk {coords} of {str(where)!r})" if name else (
        f"chunk {coords} of {str(where)!r}")
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{place} cannot be decoded ({detail}); {ADVICE}"


def _read_block(array: Any, coords: tuple[int, ...], plain: bool = False) -> None:
    grid = _grid(array)
    key = tuple(slice(c * g, min((c + 1) * g, s)) for c, g, s in
                zip(coords, grid, array.shape, strict=True))
    np.asarray(zarr.Array.__getitem__(array, key) if plain else array[key])


def _region(key: Any, shape: tuple[int, ...]) -> list[range] | None:
    """The index range along every axis that basic indexing ``key`` touches (``None`` for
    keys other than integers, slices and ``...``)."""
    key = key if isinstance(key, tuple) else (key,)
    if sum(k is Ellipsis for k in key) > 1:
        return None
    if any(k is Ellipsis for k in key):
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1:]
    key = key + (slice(None),) * (len(shape) - len(key))
    if len(key) != len(shape):
        return None
    out = []
    for k, n in zip(key, shape, strict=True):
        if isinstance(k, (int, np.integer)):
            i = int(k) + n if int(k) < 0 else int(k)
            out.append(range(i, i + 1))
        elif isinstance(k, slice):
            start, stop, _ = k.indices(n)
            out.append(range(start, max(start, stop)))
        else:
            return None
    return out


def bad_chunks(array: Any, key: Any = Ellipsis, limit: int | None = None,
               plain: bool = False) -> list[tuple]:
    """``(coords, exception)`` of the chunks touched by ``array[key]`` that cannot be read
    (at most ``limit`` of them); basic indexing only. ``plain``: read through
    ``zarr.Array.__getitem__`` (from :class:`CheckedArray` itself)."""
    region = _region(key, tuple(int(s) for s in array.shape))
    if region is None or not all(len(r) for r in region):
        return []
    grid = _grid(array)
    spans = [range(r.start // g, (r.stop - 1) // g + 1) for r, g in zip(region, grid,
                                                                         strict=True)]
    found = []
    for coords in itertools.product(*spans):
        try:
            _read_block(array, coords, plain)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - any codec or I/O failure
            found.append((tuple(coords), exc))
            if limit is not None and len(found) >= limit:
                break
    return found


class CheckedArray(zarr.Array):
    """A Zarr array whose reads name the damaged chunk on failure (module doc): the same
    array (``isinstance(a, zarr.Array)``, same store, lazy), made by :func:`checked`."""

    where: Any = None

    def __getitem__(self, selection: Any) -> Any:
        try:
            return super().__getitem__(selection)
        except (KeyboardInterrupt, MemoryError, IndexError, TypeError):
            raise
        except Exception as exc:  # noqa: BLE001 - find the chunk, else re-raise
            found = bad_chunks(self, selection, limit=1, plain=True)
            if not found:
                raise
            coords, first = found[0]
            raise CorruptChunkError(_describe(self, self.where, coords, first),
                                    coords) from exc


def checked(array: Any, where: str | os.PathLike | None = None) -> Any:
    """``array`` as a :class:`CheckedArray` when it is a Zarr array (else as it is);
    ``where`` names it in messages (default: its store path)."""
    if isinstance(array, CheckedArray) or not isinstance(array, zarr.Array):
        return array
    out = CheckedArray(array._async_array)
    out.where = where if where is not None else str(array.store_path)
    return out
