"""Opening inputs: image files and arrays as lazy arrays (no Qt, no torch).

:func:`open_input` opens NumPy / Dask / Zarr arrays, ``.zarr`` folders, TIFFs (lazily,
through tifffile's Zarr store), ``.npy`` (memory-mapped) and PNG/JPEG files;
:func:`opened` does it once per process and file version (a path is what travels to other
processes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from napari_esam.core.io.sizes import format_bytes

__all__ = [
    "IMAGE_SUFFIXES",
    "TIFF_SUFFIXES",
    "check_tiff",
    "input_axes",
    "is_zarr_folder",
    "open_input",
    "open_tiff",
    "opened",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")


def open_input(source: Any) -> Any:
    """A lazy (H, W[, C]) / N-D array for a path or an array-like.

    Arrays (NumPy, Dask, Zarr, anything with ``shape``/``dtype``/``__getitem__``) are
    returned as they are. Paths: ``.tif``/``.tiff`` (first series, full resolution) open
    lazily, memory-mapped when the pixels are uncompressed and contiguous, else as Zarr over
    the file; ``.zarr`` (array, OME-Zarr group or a group with one array) lazily, ``.npy``
    memory-mapped, PNG/JPEG read into memory (palette/LA images are converted to
    RGB/gray). Missing files raise ``FileNotFoundError``, unreadable ones ``ValueError``, as
    do inputs with a chunk larger than half the available memory
    (:func:`~napari_esam.core.io.sizes.check_chunks_fit`).
    """
    from napari_esam.core.io.chunks import checked
    from napari_esam.core.io.sizes import check_chunks_fit

    if not isinstance(source, (str, os.PathLike)):
        if all(hasattr(source, a) for a in ("shape", "dtype", "__getitem__")):
            check_chunks_fit(source, f"the input {type(source).__name__}")
            return source
        raise TypeError(f"cannot use a {type(source).__name__} as an image; pass an array")

    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {str(path)!r}")
    suffix = path.suffix.lower()
    if path.is_dir() and not is_zarr_folder(path):
        raise ValueError(
            f"{str(path)!r} is a folder, not an image: give an image file (TIFF, .npy, PNG, "
            "JPEG) or a Zarr store (a folder with a zarr.json)"
        )
    if suffix in TIFF_SUFFIXES:
        check_tiff(path)  # names the file and what is wrong with it
    try:
        if suffix in TIFF_SUFFIXES:
            arr = checked(open_tiff(path), path)
        elif suffix == ".zarr" or path.is_dir():
            arr = checked(_open_zarr(path), path)
        else:
            arr = None
        if arr is not None:
            check_chunks_fit(arr, path)
            return arr
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if suffix in IMAGE_SUFFIXES:
            return _open_picture(path)
    except (FileNotFoundError, PermissionError):
        raise
    except ValueError as exc:
        if str(path) in str(exc):  # our own message, naming the file already
            raise
        raise ValueError(f"cannot read {str(path)!r} as an image: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any reader failure is "unreadable"
        raise ValueError(f"cannot read {str(path)!r} as an image: {exc}") from exc
    raise ValueError(
        f"unsupported input format {suffix or '(no extension)'!r} for {str(path)!r}: use a "
        "TIFF, Zarr, NumPy .npy, PNG or JPEG file"
    )


def is_zarr_folder(path: Path) -> bool:
    """Whether the folder ``path`` is a Zarr store (v3 ``zarr.json`` or v2 metadata)."""
    return any((path / m).is_file() for m in ("zarr.json", ".zarray", ".zgroup"))


@contextlib.contextmanager
def _tifffile_warnings() -> Iterator[list[str]]:
    """Collect tifffile's logged warnings instead of printing them (yields their texts)."""
    logger = logging.getLogger("tifffile")
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record.getMessage())

    handler = Collect(logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def check_tiff(path: str | os.PathLike[str]) -> None:
    """Refuse, naming the file, a TIFF that tifffile cannot parse or whose pages' data run
    past the end of the file (an incomplete copy), before any of it is read.

    Reads only the page directories (about 20 µs a page). tifffile's warnings about a
    damaged structure become part of the message instead of lines on the terminal.
    """
    import tifffile

    path = Path(path)
    size = path.stat().st_size
    with _tifffile_warnings() as warned:
        try:
            with tifffile.TiffFile(path) as tif:
                pages = tif.pages
                pages.useframes = True
                for i, page in enumerate(pages):
                    ends = [int(o) + int(n) for o, n in
                            zip(page.dataoffsets, page.databytecounts, strict=False) if n]
                    if ends and max(ends) > size:
                        raise _Truncated(
                            f"{str(path)!r} is truncated: page {i} needs {max(ends)} bytes but "
                            f"the file has {size}; copy or save the file again"
                        )
        except _Truncated:
            raise
        except Exception as exc:  # noqa: BLE001 - tifffile raises many kinds
            raise ValueError(_tiff_damage(path, exc, warned)) from None
    # a broken chain of page directories is only logged by tifffile (it then reads fewer
    # pages than the file holds)
    damaged = [w for w in warned if any(k in w.lower() for k in _DAMAGE_WORDS)]
    if damaged:
        raise ValueError(_tiff_damage(path, None, damaged))


class _Truncated(ValueError):
    """A TIFF whose page data run past the end of the file."""


#: tifffile warnings that mean the page structure is damaged
_DAMAGE_WORDS = ("page offset", "corrupt", "ifd")


def _tiff_damage(path: Path, exc: BaseException | None, warned: list[str]) -> str:
    detail = str(exc) if exc is not None else ""
    if warned:
        detail = f"{detail}; {warned[0]}" if detail else warned[0]
    return f"{str(path)!r} is not a readable TIFF (damaged or truncated?): {detail}"


def open_tiff(path: Path) -> Any:
    """Uncompressed contiguous pixel data memory-mapped (lazy at any size), else tifffile's
    Zarr store (chunks = strips or tiles); a file shorter than the pixel data it declares is
    refused naming both sizes."""
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        level = tif.series[0].levels[0]
        offset = level.dataoffset  # None unless the pixels are contiguous and uncompressed
        if offset is not None:
            size = os.path.getsize(path)
            if offset + level.nbytes > size:
                raise ValueError(
                    f"{str(path)!r} declares {level.shape} {level.dtype} pixels "
                    f"({format_bytes(level.nbytes)}) but the file holds only "
                    f"{format_bytes(size)}: it is truncated or damaged"
                )
    if offset is not None:
        try:
            return tifffile.memmap(path, series=0, level=0, mode="r")
        except ValueError:  # not mappable after all: read it through the Zarr store
            pass
    store = tifffile.imread(path, aszarr=True)
    node = zarr.open(store, mode="r")
    if isinstance(node, zarr.Group):  # pyramid: level 0 is full resolution
        node = node["0"]
    return node


def _open_zarr(path: Path) -> Any:
    import zarr

    from napari_esam.core.io.ngff import full_resolution_array

    node = zarr.open(path, mode="r")
    if isinstance(node, zarr.Array):
        return node
    level = full_resolution_array(node, path)
    if level is not None:
        return level
    arrays = list(node.array_keys())
    if len(arrays) == 1:
        return node[arrays[0]]
    raise ValueError(
        f"the Zarr group holds {len(arrays)} arrays and no OME-NGFF 'multiscales'; "
        "point at one array (e.g. path/to/group.zarr/name)"
    )


def _open_picture(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGB")
        elif img.mode == "LA":
            img = img.convert("L")
        elif img.mode == "1":
            img = img.convert("L")
        return np.asarray(img)


def input_axes(source: Any) -> str | None:
    """Axis letters of a TIFF input (tifffile's series axes, lower case), else ``None``."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source).expanduser()
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tif.series[0].axes.lower()
    except Exception:  # noqa: BLE001 - metadata is optional
        return None


def _version(path: str) -> tuple:
    """(mtime, size) of a file, (None, None) when missing: what tells a changed file."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_mtime_ns, st.st_size


_OPENED: dict[tuple, Any] = {}
_OPENED_LOCK = threading.Lock()
_OPENED_MAX = 8


def opened(path: str) -> Any:
    """``open_input(path)`` once per process and file version (a path is what travels to
    other processes; a changed file, or a Zarr folder with a changed ``zarr.json``, is
    opened again)."""
    key = (path, *_version(path), *_version(os.path.join(path, "zarr.json")))
    with _OPENED_LOCK:
        arr = _OPENED.get(key)
        if arr is None:
            arr = open_input(path)
            while len(_OPENED) >= _OPENED_MAX:
                _OPENED.pop(next(iter(_OPENED)))
            _OPENED[key] = arr
    return arr


