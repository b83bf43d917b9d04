"""Safe export and re-import of label masks as OME-Zarr (NGFF 0.5) or TIFF (ImageJ / OME-TIFF).

No Qt and no napari here: the npe2 writer/reader and the CLI are thin adapters over this module.

Formats (chosen by the file extension):

* ``.zarr``: a Zarr v3 group laid out as an OME-NGFF **0.5** label image: one multiscale
  level ``"0"`` (chunked, compressed), ``attributes["ome"]`` with ``multiscales`` (axes,
  ``scale``/``translation``) and ``image-label`` (``colors`` for at most :data:`MAX_COLORS`
  labels), plus our own ``attributes["napari-esam"]`` marker.
* ``.tif``/``.tiff``: an ImageJ hyperstack when the dtype is uint8/uint16, the file is not
  BigTIFF, the compression is zlib/none and the axes fit ImageJ's TZCYX order; otherwise an
  OME-TIFF (uint8 to uint32, BigTIFF when needed); uint64 labels (OME-XML has no 64-bit
  integers) as a plain TIFF with tifffile's JSON shape description. Our metadata (scale,
  translate, axes, units, name) is stored as JSON in the private TIFF tag :data:`TIFF_TAG`.

Safety: data is written to a hidden temporary sibling and renamed into place only when
complete; on any exception (including ``KeyboardInterrupt`` and ``ENOSPC``) the temporary
output is removed and an existing target is left untouched. ``overwrite`` replaces only a
labels store written by napari-esam or a TIFF file; the writer holds the target's lock file
(one export per target) and removes the temporaries a killed export of it left
(``docs/rules/outputs.md``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from napari_esam.core.io.inputs import check_tiff
from napari_esam.core.io.locks import hold
from napari_esam.core.io.replacing import (
    is_own_store,
    move_into_place,
    remove_path,
    remove_stale_temporaries,
)
from napari_esam.core.io.sizes import check_chunks_fit, check_fits_in_memory

__all__ = [
    "MAX_COLORS",
    "NGFF_VERSION",
    "TIFF_TAG",
    "check_tiff_limits",
    "default_axes",
    "is_labels_export",
    "label_color",
    "needs_bigtiff",
    "read_labels",
    "smallest_label_dtype",
    "write_labels",
]

MARKER = "napari-esam"
FORMAT_VERSION = 1
NGFF_VERSION = "0.5"
#: ``image-label`` colours are written only when at most this many distinct labels occur.
MAX_COLORS = 4096
#: Private TIFF tag holding our JSON metadata.
TIFF_TAG = 65420
#: Above this (uncompressed) size a TIFF is written as BigTIFF: 4 GiB minus 32 MiB for tags.
BIGTIFF_THRESHOLD = 2**32 - 2**25
TILE = 512
#: TIFFs up to this many (uncompressed) bytes are read into memory, larger ones lazily.
EAGER_TIFF_BYTES = 2**30

ProgressCallback = Callable[[int, int], None]

_AXES_ORDER = "tczyx"
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_NGFF_SPACE_UNITS = {
    "angstrom", "attometer", "centimeter", "decimeter", "exameter", "femtometer", "foot",
    "gigameter", "hectometer", "inch", "kilometer", "megameter", "meter", "micrometer", "mile",
    "millimeter", "nanometer", "parsec", "petameter", "picometer", "terameter", "yard",
    "yoctometer", "yottameter", "zeptometer", "zettameter",
}  # fmt: skip
_NGFF_TIME_UNITS = {
    "attosecond", "centisecond", "day", "decisecond", "exasecond", "femtosecond", "gigasecond",
    "hectosecond", "hour", "kilosecond", "megasecond", "microsecond", "millisecond", "minute",
    "nanosecond", "petasecond", "picosecond", "second", "terasecond", "yoctosecond",
    "yottasecond", "zeptosecond", "zettasecond",
}  # fmt: skip
_IMAGEJ_UNITS = {"micrometer": "micron", "nanometer": "nm", "millimeter": "mm",
                 "centimeter": "cm", "meter": "m", "angstrom": "A", "inch": "inch"}  # fmt: skip
_OME_UNITS = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm",
              "meter": "m", "angstrom": "Å", "picometer": "pm", "inch": "in"}  # fmt: skip


# --------------------------------------------------------------------------- small helpers


def smallest_label_dtype(max_label: int) -> np.dtype:
    """Return the smallest unsigned integer dtype (uint8/16/32/64) that holds ``max_label``."""
    max_label = int(max_label)
    if max_label < 0:
        raise ValueError(f"labels must be non-negative, got maximum {max_label}")
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label {max_label} does not fit in uint64")


def needs_bigtiff(shape: Sequence[int], dtype: Any) -> bool:
    """Whether a TIFF of this shape/dtype must be BigTIFF (estimated size above ~4 GB).

    The estimate is the uncompressed size: compression usually shrinks labels a lot, but a
    classic TIFF that overflows 4 GiB cannot be repaired, so we stay on the safe side.
    """
    nbytes = math.prod(int(s) for s in shape) * np.dtype(dtype).itemsize
    return nbytes > BIGTIFF_THRESHOLD


def check_tiff_limits(shape: Sequence[int], dtype: Any) -> None:
    """``ValueError`` when labels of ``shape``/``dtype`` cannot be written as a TIFF: more than
    5 dimensions (TIFF axes are TZCYX at most), or a 2-D page (written whole) larger than
    half the available memory (:func:`~napari_esam.core.io.sizes.check_fits_in_memory`).
    Checked before anything is computed."""
    shape = tuple(int(s) for s in shape)
    if not 2 <= len(shape) <= 5:
        raise ValueError(
            f"a TIFF holds 2-D to 5-D labels (TZCYX), these have {len(shape)} dimensions "
            f"{shape}: write them to .zarr instead"
        )
    h, w = shape[-2:]
    check_fits_in_memory(
        2 * h * w * np.dtype(dtype).itemsize,
        f"a TIFF page of {h} x {w} {np.dtype(dtype)} labels (written whole)",
        "write them to .zarr instead (written chunk by chunk)",
    )


def default_axes(ndim: int) -> str:
    """Default axis names for ``ndim`` dimensions: yx, zyx, tzyx, tczyx."""
    axes = {2: "yx", 3: "zyx", 4: "tzyx", 5: "tczyx"}.get(ndim)
    if axes is None:
        raise ValueError(f"labels must have 2 to 5 dimensions, got {ndim}")
    return axes


def label_color(value: int) -> list[int]:
    """A deterministic, well-spread RGBA colour (0-255) for a label value (golden-ratio hues)."""
    import colorsys

    hue = (int(value) * 0.618033988749895) % 1.0
    sat = 0.55 + 0.45 * ((int(value) * 0.381966) % 1.0)
    r, g, b = colorsys.hsv_to_rgb(hue, sat, 0.95)
    return [round(r * 255), round(g * 255), round(b * 255), 255]


def _check_axes(axes: str | None, ndim: int) -> str:
    if axes is None:
        return default_axes(ndim)
    axes = str(axes).lower()
    it = iter(_AXES_ORDER)
    in_order = all(ch in it for ch in axes)  # subsequence of "tczyx"
    if len(axes) != ndim or not in_order or len(set(axes)) != len(axes) or axes[-2:] != "yx":
        raise ValueError(
            f"axes {axes!r} do not fit {ndim}-D labels: use {ndim} distinct letters from "
            f"'tczyx' in that order, ending in 'yx' (e.g. {default_axes(max(2, min(ndim, 5)))!r})"
        )
    return axes


def _check_vector(name: str, values: Sequence[float] | None, ndim: int, default: float) -> list:
    if values is None:
        return [default] * ndim
    out = [float(v) for v in values]
    if len(out) != ndim:
        raise ValueError(f"{name} has {len(out)} values but the labels have {ndim} dimensions")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} values must be finite, got {out}")
    if name == "scale" and not all(v > 0 for v in out):
        raise ValueError(f"scale values must be positive, got {out}")
    return out


def _check_units(units: Sequence[str | None] | None, ndim: int) -> list[str | None]:
    if units is None:
        return [None] * ndim
    out = [None if u in (None, "", "pixel") else str(u) for u in units]
    if len(out) != ndim:
        raise ValueError(f"units has {len(out)} values but the labels have {ndim} dimensions")
    return out


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".zarr":
        return "zarr"
    if suffix in (".tif", ".tiff"):
        return "tiff"
    raise ValueError(f"cannot tell the format of {str(path)!r}: use a .zarr, .tif or .tiff name")


def _default_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# ------------------------------------------------------------------- input normalisation


def _as_dask(data: Any, fmt: str):
    """Wrap labels (NumPy, Dask, Zarr or any array-like) as a lazy Dask array.

    Non-Dask input gets blocks that match the output layout: Zarr chunks, or single TIFF pages.
    """
    import dask.array as da

    if isinstance(data, (list, tuple)) and data and all(hasattr(d, "shape") for d in data):
        data = data[0]  # multiscale: export the full-resolution level
    if isinstance(data, da.Array):
        return data
    if not (hasattr(data, "shape") and hasattr(data, "dtype") and hasattr(data, "__getitem__")):
        data = np.asarray(data)
    shape = tuple(data.shape)
    if len(shape) < 2:
        raise ValueError(f"labels must have 2 to 5 dimensions, got {len(shape)}")
    if 0 in shape:
        raise ValueError(f"labels array is empty (shape {shape})")
    chunks = _zarr_chunks(shape) if fmt == "zarr" else (1,) * (len(shape) - 2) + shape[-2:]
    # name=False: do not hash the whole array to make a key
    return da.from_array(data, chunks=chunks, name=False, lock=False)


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind not in "biu":
        raise ValueError(
            f"labels must be an integer (or bool) array, got dtype {dtype}: "
            "convert them explicitly, e.g. data.astype(np.uint32)"
        )


def _block_range(block: np.ndarray) -> np.ndarray:
    return np.array([block.min(), block.max()], dtype=block.dtype).reshape((1,) * block.ndim + (2,))


def _value_range(x, pool: ThreadPoolExecutor) -> tuple[int, int]:
    """Minimum and maximum of a Dask array; each chunk is reduced as soon as it is computed."""
    ranges = x.map_blocks(
        _block_range, chunks=(1,) * x.ndim + (2,), new_axis=x.ndim, dtype=x.dtype
    ).compute(scheduler="threads", pool=pool)
    return int(ranges[..., 0].min()), int(ranges[..., 1].max())


def _convert_block(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Check one block (non-negative, fits ``dtype``) and cast it to ``dtype``."""
    block = np.asarray(block)
    if block.dtype.kind == "b":
        return block.astype(dtype)
    _check_dtype(block.dtype)
    if block.size:
        if block.dtype.kind == "i":
            lo = int(block.min())
            if lo < 0:
                raise ValueError(f"labels must be non-negative, found {lo}")
        hi = int(block.max())
        if hi > np.iinfo(dtype).max:
            raise ValueError(f"label {hi} does not fit the output dtype {dtype}")
    return block.astype(dtype, copy=False)


def _present_labels(block: np.ndarray) -> np.ndarray:
    """Non-zero label values occurring in ``block``."""
    if block.size == 0:
        return np.empty(0, dtype=np.int64)
    top = int(block.max())
    if top >= 2**16:
        values = np.unique(block)
        return values[values != 0]
    flat = block.reshape(-1)
    counts = np.zeros(top + 1, dtype=np.int64)
    step = 2**16  # bincount converts to intp: keep that copy small
    for start in range(0, flat.size, step):
        counts += np.bincount(flat[start : start + step], minlength=top + 1)
    counts[0] = 0
    return np.flatnonzero(counts)


class _BlockConverter:
    """Validates/casts blocks (possibly from worker threads), tracks labels and progress."""

    def __init__(self, dtype: np.dtype, total: int, progress: ProgressCallback | None) -> None:
        self.dtype = dtype
        self.total = total
        self.progress = progress
        self.done = 0
        self.labels: set[int] | None = set()
        self.cancelled = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, block: np.ndarray, units: int = 1) -> np.ndarray:
        if self.cancelled.is_set():
            raise RuntimeError("labels export cancelled")
        out = _convert_block(block, self.dtype)
        present = _present_labels(out) if self.labels is not None else None
        with self._lock:
            if present is not None and self.labels is not None:
                self.labels.update(int(v) for v in present[: MAX_COLORS + 1])
                if len(self.labels) > MAX_COLORS:
                    self.labels = None  # too many labels for a colour table
            self.done += units
            if self.progress is not None:
                self.progress(self.done, self.total)
        return out


# ---------------------------------------------------------------------------- writing


def write_labels(
    path: str | os.PathLike[str],
    data: Any,
    *,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    axes: str | None = None,
    units: Sequence[str | None] | None = None,
    name: str | None = None,
    overwrite: bool = False,
    compression: str | None = "auto",
    dtype: Any = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Write a label mask to ``path`` (``.zarr`` → OME-Zarr, ``.tif``/``.tiff`` → TIFF).

    Args:
        path: target; its parent directory must exist.
        data: 2-D to 5-D integer or bool labels (NumPy, Dask, Zarr or array-like); more
            dimensions only to ``.zarr`` (our marker, no OME-NGFF metadata, which stops at
            5-D). Bool is stored as 0/1; floats and negative values raise ``ValueError``.
        scale, translate: per-axis pixel size and origin (e.g. a napari layer's).
        axes: letters from ``tczyx`` in that order, ending in ``yx`` (default by ndim:
            ``yx``, ``zyx``, ``tzyx``, ``tczyx``).
        units: per-axis unit names (``"micrometer"``, ``"second"``; None/"pixel" = none).
        name: label layer name stored in the metadata (default: the file name stem).
        overwrite: replace an existing ``path``; otherwise ``FileExistsError``.
        compression: ``"auto"`` (zstd for Zarr, zlib for TIFF), ``"zstd"``, ``"zlib"`` or
            None/``"none"``. zstd TIFFs need imagecodecs and are not ImageJ-readable.
        dtype: force an unsigned output dtype (skips the min/max pre-pass over Dask input);
            by default the smallest of uint8/16/32/64 that holds the largest label.
        progress: ``progress(done, total)`` called after each block (Zarr: chunks, TIFF:
            pages), possibly from a worker thread; raising from it cancels the export.

    Returns:
        The written path. Data is written chunk by chunk (Zarr) or page by page (TIFF) into a
        hidden temporary sibling that is renamed into place only once complete.
    """
    target = Path(os.fspath(path)).expanduser()
    fmt = _format_of(target)
    compression = _check_compression(compression, fmt)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"directory {str(target.parent)!r} does not exist")
    _check_target(target, overwrite)

    if hasattr(data, "shape") and hasattr(data, "dtype"):
        check_chunks_fit(data, "the labels")
    x = _as_dask(data, fmt)
    ndim = x.ndim
    if fmt == "tiff":
        check_tiff_limits(x.shape, x.dtype)
    if ndim > 5:  # beyond OME-NGFF: a Zarr group with our marker only (read_labels opens it)
        if axes is not None:
            raise ValueError(f"axes cannot be given for {ndim}-D labels (at most 5: tczyx)")
    else:
        axes = _check_axes(axes, ndim)
    _check_dtype(np.dtype(x.dtype))
    if 0 in x.shape:
        raise ValueError(f"labels array is empty (shape {tuple(x.shape)})")
    meta = {
        "name": name if name is not None else _default_name(target),
        "axes": axes,
        "scale": _check_vector("scale", scale, ndim, 1.0),
        "translate": _check_vector("translate", translate, ndim, 0.0),
        "units": _check_units(units, ndim),
    }

    with hold(target):  # one writer per target; then no live export owns a .tmp-* of it
        remove_stale_temporaries(target)
        _write_into_place(target, fmt, x, dtype, meta, compression, overwrite, progress)
    return target


def _write_into_place(target: Path, fmt: str, x, dtype: Any, meta: dict,
                      compression: str | None, overwrite: bool,
                      progress: ProgressCallback | None) -> None:
    """Write into a hidden temporary sibling, then move it onto ``target``."""
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    converter: _BlockConverter | None = None
    try:
        out_dtype = _output_dtype(x, dtype, pool)
        if fmt == "zarr":
            chunks = _zarr_chunks(x.shape)
            nblocks = math.prod(math.ceil(s / c) for s, c in zip(x.shape, chunks, strict=True))
            converter = _BlockConverter(out_dtype, nblocks, progress)
            _write_zarr(tmp, x.rechunk(chunks), chunks, converter, meta, compression, pool)
        else:
            converter = _BlockConverter(out_dtype, math.prod(x.shape[:-2]), progress)
            _write_tiff(tmp, x, converter, meta, compression, pool)
        _check_target(target, overwrite)  # re-check: it may have appeared while we wrote
        move_into_place(tmp, target)
    except BaseException:
        if converter is not None:
            converter.cancelled.set()
        pool.shutdown(wait=True, cancel_futures=True)  # no worker may still write into tmp
        remove_path(tmp, strict=False)
        raise
    finally:
        pool.shutdown(wait=True)


def _check_compression(compression: str | None, fmt: str) -> str | None:
    value = "none" if compression is None else str(compression).lower()
    if value == "auto":
        value = "zstd" if fmt == "zarr" else "zlib"
    if value not in ("zstd", "zlib", "none"):
        raise ValueError(f"unknown compression {compression!r}: use 'zstd', 'zlib' or None")
    if fmt == "tiff" and value == "zstd":
        try:
            import imagecodecs  # noqa: F401
        except ImportError:
            raise ValueError("zstd compression of TIFF needs 'imagecodecs'; use 'zlib'") from None
    return None if value == "none" else value


def _check_target(target: Path, overwrite: bool) -> None:
    """An existing target is replaced only with ``overwrite`` and only when it is ours to
    replace: a TIFF file for a TIFF, a labels store written by napari-esam for a Zarr."""
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{str(target)!r} already exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    if _format_of(target) == "tiff":
        if target.is_dir():
            raise IsADirectoryError(f"{str(target)!r} is a directory, not a TIFF file")
        if not _is_tiff_file(target):
            raise FileExistsError(
                f"refusing to replace {str(target)!r}: it is not a TIFF file (move it away or "
                "choose another name)"
            )
    elif not is_own_store(target, (MARKER,)) or not is_labels_export(target):
        raise FileExistsError(
            f"refusing to replace {str(target)!r}: it is not a labels store written by "
            "napari-esam (move it away or choose another name)"
        )


def _is_tiff_file(path: Path) -> bool:
    """Whether ``path`` is a file that starts like a TIFF (classic or BigTIFF)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _output_dtype(x, dtype: Any, pool: ThreadPoolExecutor) -> np.dtype:
    if dtype is not None:
        out = np.dtype(dtype)
        if out.kind != "u":
            raise ValueError(f"dtype must be an unsigned integer type, got {out}")
        return out  # values are checked block by block while writing
    if x.dtype.kind == "b":
        return np.dtype(np.uint8)
    lo, hi = _value_range(x, pool)
    if lo < 0:
        raise ValueError(f"labels must be non-negative, found {lo}")
    return smallest_label_dtype(hi)


def _zarr_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """≤512×512 tiles in YX, 1 along leading axes (more along the last one for small tiles)."""
    cy, cx = min(shape[-2], TILE), min(shape[-1], TILE)
    lead = [1] * (len(shape) - 2)
    if lead:
        lead[-1] = max(1, min(shape[-3], TILE * TILE // (cy * cx)))
    return (*lead, cy, cx)


def _zarr_compressors(compression: str | None):
    from zarr.codecs import BloscCodec, GzipCodec

    if compression == "zstd":
        return (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),)
    if compression == "zlib":
        return (GzipCodec(level=6),)
    return None


def _ngff_attrs(meta: dict, labels: set[int] | None) -> dict:
    axes = []
    for ax, unit in zip(meta["axes"], meta["units"], strict=True):
        entry: dict[str, Any] = {"name": ax, "type": _AXIS_TYPES[ax]}
        allowed = _NGFF_TIME_UNITS if ax == "t" else _NGFF_SPACE_UNITS
        if unit in allowed:
            entry["unit"] = unit
        axes.append(entry)
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": meta["scale"]}]
    if any(meta["translate"]):
        transforms.append({"type": "translation", "translation": meta["translate"]})
    image_label: dict[str, Any] = {}
    if labels is not None:
        image_label["colors"] = [{"label-value": v, "rgba": label_color(v)} for v in sorted(labels)]
    return {
        "version": NGFF_VERSION,
        "multiscales": [
            {
                "name": meta["name"],
                "axes": axes,
                "datasets": [{"path": "0", "coordinateTransformations": transforms}],
            }
        ],
        "image-label": image_label,
    }


def _marker(meta: dict, dtype: np.dtype) -> dict:
    return {"format_version": FORMAT_VERSION, "kind": "labels", "dtype": str(dtype), **meta}


def _write_zarr(
    tmp: Path,
    x,
    chunks: tuple[int, ...],
    converter: _BlockConverter,
    meta: dict,
    compression: str | None,
    pool: ThreadPoolExecutor,
) -> None:
    import dask.array as da
    import zarr

    group = zarr.open_group(tmp, mode="w-", zarr_format=3)
    array = group.create_array(
        "0",
        shape=x.shape,
        dtype=converter.dtype,
        chunks=chunks,
        compressors=_zarr_compressors(compression),
        fill_value=0,
        dimension_names=list(meta["axes"]) if meta["axes"] else None,
        config={"write_empty_chunks": False},
    )
    checked = x.map_blocks(
        converter, dtype=converter.dtype, meta=np.empty((0,) * x.ndim, dtype=converter.dtype)
    )
    # chunk-aligned blocks: each task writes whole chunks, so no lock is needed
    da.store(checked, array, lock=False, scheduler="threads", pool=pool)
    attrs = {MARKER: _marker(meta, converter.dtype)}
    if meta["axes"]:
        attrs["ome"] = _ngff_attrs(meta, converter.labels)
    group.attrs.update(attrs)


def _tiff_pages(x, converter: _BlockConverter, pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """Yield YX pages in C order, computing one Dask chunk of the innermost leading axis."""
    if x.ndim == 2:
        yield converter(x.compute(scheduler="threads", pool=pool))
        return
    for outer in np.ndindex(*x.shape[:-3]):
        start = 0
        for size in x.chunks[-3]:
            slab = x[(*outer, slice(start, start + size))].compute(scheduler="threads", pool=pool)
            yield from converter(slab, units=size)
            start += size


def _imagej_ok(meta: dict, dtype: np.dtype, bigtiff: bool, compression: str | None) -> bool:
    axes = meta["axes"]
    return (
        dtype in (np.dtype(np.uint8), np.dtype(np.uint16))
        and not bigtiff
        and compression in ("zlib", None)
        and not ("c" in axes and "z" in axes)  # ImageJ order is TZCYX, NGFF's is TCZYX
    )


def _write_tiff(
    tmp: Path,
    x,
    converter: _BlockConverter,
    meta: dict,
    compression: str | None,
    pool: ThreadPoolExecutor,
) -> None:
    import tifffile

    from napari_esam import __version__

    dtype = converter.dtype
    bigtiff = needs_bigtiff(x.shape, dtype)
    imagej = _imagej_ok(meta, dtype, bigtiff, compression)
    axes, scale, units = meta["axes"], meta["scale"], meta["units"]
    sy, sx = scale[-2], scale[-1]
    xunit = units[-1]
    kwargs: dict[str, Any] = {}
    if imagej:
        md: dict[str, Any] = {"axes": axes.upper()}
        if "z" in axes:
            md["spacing"] = scale[axes.index("z")]
        if "t" in axes:
            md["finterval"] = scale[axes.index("t")]
        if xunit in _IMAGEJ_UNITS:
            md["unit"] = _IMAGEJ_UNITS[xunit]
        kwargs.update(imagej=True, metadata=md)
    elif dtype == np.dtype(np.uint64):  # OME-XML has no 64-bit integers: tifffile's own JSON
        md = {"axes": axes.upper(), "Name": meta["name"]}
        kwargs.update(ome=False, imagej=False, metadata=md)
    else:
        md = {"axes": axes.upper(), "Name": meta["name"], "PhysicalSizeX": sx, "PhysicalSizeY": sy}
        if xunit in _OME_UNITS:
            md["PhysicalSizeXUnit"] = md["PhysicalSizeYUnit"] = _OME_UNITS[xunit]
        if "z" in axes:
            md["PhysicalSizeZ"] = scale[axes.index("z")]
            zunit = units[axes.index("z")]
            if zunit in _OME_UNITS:
                md["PhysicalSizeZUnit"] = _OME_UNITS[zunit]
        if "t" in axes:
            md["TimeIncrement"] = scale[axes.index("t")]
        kwargs.update(ome=True, metadata=md)
    description = json.dumps({MARKER: _marker(meta, dtype)})
    with open(tmp, "xb") as fh:
        tifffile.imwrite(
            fh,
            _tiff_pages(x, converter, pool),
            shape=tuple(x.shape),
            dtype=dtype,
            bigtiff=bigtiff,
            photometric="minisblack",
            compression=compression,
            resolution=(1.0 / sx, 1.0 / sy),
            software=f"napari-esam {__version__}",
            extratags=[(TIFF_TAG, "s", 0, description, True)],
            **kwargs,
        )
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------------------- reading


def is_labels_export(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a label export written by napari-esam (cheap metadata check)."""
    p = Path(os.fspath(path))
    try:
        fmt = _format_of(p)
    except ValueError:
        return False
    try:
        if fmt == "zarr":
            with open(p / "zarr.json", encoding="utf-8") as fh:
                meta = json.load(fh)
            attrs = meta.get("attributes") if isinstance(meta, dict) else None
            marker = attrs.get(MARKER) if isinstance(attrs, dict) else None
            return isinstance(marker, dict) and marker.get("kind") == "labels"
        return _tiff_marker(p) is not None
    except (OSError, ValueError):
        return False


def _tag_marker(tag: Any) -> dict | None:
    """Our marker in the private TIFF tag (``None``: absent, not JSON or not a mapping)."""
    if tag is None or not isinstance(tag.value, (str, bytes)):
        return None
    try:
        value = json.loads(tag.value)
    except ValueError:
        return None
    value = value.get(MARKER) if isinstance(value, dict) else None
    return value if isinstance(value, dict) else None


def _tiff_marker(path: Path) -> dict | None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return _tag_marker(tif.pages.first.tags.get(TIFF_TAG))


def read_labels(path: str | os.PathLike[str]) -> tuple[Any, dict]:
    """Open labels written by :func:`write_labels`, or a plain Zarr array / OME-Zarr / TIFF.

    Returns ``(array, meta)`` with ``meta`` keys ``name``, ``axes``, ``scale``,
    ``translate``, ``units`` and ``napari_esam`` (whether it is our export). Zarr data is
    returned as a read-only ``zarr.Array`` (lazy; a run output whose planes are not its last
    two axes, e.g. of ``--axis 2``, as a lazy Dask view with the planes moved last, so that
    napari shows and the exports write them as planes); TIFF data as NumPy, or lazily (memory-
    mapped, or through tifffile's Zarr store) when larger than :data:`EAGER_TIFF_BYTES`.
    Data whose single chunk would not fit in memory is refused (``ValueError``).
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: {str(p)!r}")
    if p.is_dir() or p.suffix.lower() == ".zarr":
        data, meta = _read_zarr(p)
    else:
        if p.suffix.lower() not in (".tif", ".tiff"):
            raise ValueError(
                f"unsupported labels format {p.suffix or '(no extension)'!r} for {str(p)!r}: "
                "labels are read from Zarr (.zarr) or TIFF (.tif, .tiff)"
            )
        check_tiff(p)
        try:
            data, meta = _read_tiff(p)
        except (MemoryError, FileNotFoundError, PermissionError):
            raise
        except Exception as exc:  # noqa: BLE001 - tifffile raises many kinds
            raise ValueError(f"cannot read {str(p)!r} as TIFF labels: {exc}") from None
    check_chunks_fit(data, p)
    return data, meta


def _meta(path: Path, ndim: int, **given: Any) -> dict:
    meta = {
        "name": _default_name(path),
        "axes": default_axes(ndim) if 2 <= ndim <= 5 else None,
        "scale": [1.0] * ndim,
        "translate": [0.0] * ndim,
        "units": [None] * ndim,
        "napari_esam": False,
    }
    meta.update({k: v for k, v in given.items() if v is not None})
    return meta


def _clean_marker(value: Any, ndim: int, path: Path) -> dict:
    """Our marker's metadata fields that are valid for ``ndim``-D labels (the marker of a TIFF
    tag or a Zarr group may have been edited or damaged: an invalid field is dropped with a
    warning naming it, and the default is used)."""
    if not isinstance(value, dict):
        return {}
    checks = {
        "name": lambda v: v if isinstance(v, str) else _bad(),
        "axes": lambda v: _check_axes(v, ndim) if isinstance(v, str) else _bad(),
        "scale": lambda v: _check_vector("scale", _seq(v), ndim, 1.0),
        "translate": lambda v: _check_vector("translate", _seq(v), ndim, 0.0),
        "units": lambda v: _check_units(
            [u if u is None or isinstance(u, str) else _bad() for u in _seq(v)], ndim),
    }
    out: dict[str, Any] = {"kind": value.get("kind")}
    bad = []
    for key, check in checks.items():
        if value.get(key) is None:
            continue
        try:
            out[key] = check(value[key])
        except (TypeError, ValueError):
            bad.append(f"{key!r} ({value[key]!r})")
    if bad:
        warnings.warn(f"{str(path)!r}: ignoring its malformed napari-esam metadata "
                      f"{', '.join(bad)}; the defaults are used instead", stacklevel=4)
    return out


def _bad() -> Any:
    raise ValueError("malformed")


def _seq(value: Any) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError("not a list")
    return list(value)


def _ngff_meta(multiscale: dict, dataset: dict, ndim: int) -> dict:
    """Name, axes, units, scale and translation of an NGFF multiscale entry; malformed or
    mismatched entries are left out (the defaults are used)."""
    out: dict[str, Any] = {}
    if isinstance(multiscale.get("name"), str):
        out["name"] = multiscale["name"]
    transforms = dataset.get("coordinateTransformations")
    for transform in transforms if isinstance(transforms, list) else []:
        kind = transform.get("type") if isinstance(transform, dict) else None
        key = {"scale": "scale", "translation": "translate"}.get(kind)
        if key is None:
            continue
        with contextlib.suppress(TypeError, ValueError):
            out[key] = _check_vector(key, _seq(transform.get(kind)), ndim, 0.0)
    axes_meta = multiscale.get("axes")
    if isinstance(axes_meta, list) and len(axes_meta) == ndim:
        names = [a.get("name") if isinstance(a, dict) else a for a in axes_meta]
        if all(isinstance(n, str) for n in names):
            with contextlib.suppress(ValueError):
                out["axes"] = _check_axes("".join(names).lower(), ndim)
            units = [a.get("unit") if isinstance(a, dict) else None for a in axes_meta]
            out["units"] = [u if isinstance(u, str) else None for u in units]
    return out


def _read_zarr(path: Path) -> tuple[Any, dict]:
    import zarr

    from napari_esam.core.io.chunks import checked
    from napari_esam.core.io.ngff import first_multiscale, full_resolution_array

    try:
        node = zarr.open(path, mode="r")
    except zarr.errors.NodeNotFoundError as exc:
        raise ValueError(f"{str(path)!r} is not a Zarr array or group") from exc
    if isinstance(node, zarr.Array):
        return checked(node, path), _meta(path, node.ndim)
    attrs = node.attrs.asdict()
    found = first_multiscale(attrs, path)
    ours_raw = attrs.get(MARKER)
    if found is not None:
        array = full_resolution_array(node, path)
        ngff = _ngff_meta(*found, array.ndim)
    elif isinstance(ours_raw, dict) and isinstance(node.get("0"), zarr.Array):
        array, ngff = node["0"], {}  # our output without NGFF (> 5-D, or planes not last)
    else:
        raise ValueError(f"{str(path)!r} is a Zarr group without OME-NGFF 'multiscales'")
    ours = _clean_marker(ours_raw, array.ndim, path)
    array = checked(array, path)
    planes = _plane_axes(ours_raw, array.ndim)
    if planes is not None:  # a run output whose planes are not the last two axes
        import dask.array as da

        order = [a for a in range(array.ndim) if a not in planes] + list(planes)
        array = da.from_array(array, chunks=array.chunks, name=False).transpose(order)
        ours = {k: [v[a] for a in order] if k in ("scale", "translate", "units") else v
                for k, v in ours.items() if k != "axes"}
    meta = _meta(
        path,
        array.ndim,
        name=ours.get("name") or ngff.get("name"),
        axes=ours.get("axes") or ngff.get("axes"),
        scale=ours.get("scale") or ngff.get("scale"),
        translate=ours.get("translate") or ngff.get("translate"),
        units=ours.get("units") or ngff.get("units"),
        napari_esam=isinstance(ours_raw, dict),
    )
    return array, meta


def _plane_axes(marker: Any, ndim: int) -> tuple[int, int] | None:
    """The ``plane_axes`` our marker records for a run output whose 2-D planes are not its
    last two axes (``None``: they are, or the field is missing or malformed)."""
    planes = marker.get("plane_axes") if isinstance(marker, dict) else None
    if (isinstance(planes, list) and len(planes) == 2
            and all(isinstance(a, int) and 0 <= a < ndim for a in planes)
            and planes[0] < planes[1] and planes != [ndim - 2, ndim - 1]):
        return planes[0], planes[1]
    return None


def _read_tiff(path: Path) -> tuple[Any, dict]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        ours_raw = _tag_marker(tif.pages.first.tags.get(TIFF_TAG))
        shape, dtype = series.shape, series.dtype
        tiff_axes = series.axes.lower()
        eager = math.prod(shape) * dtype.itemsize <= EAGER_TIFF_BYTES
        data = series.asarray() if eager else None
    if data is None:  # lazily: memory-mapped, or through tifffile's Zarr store
        from napari_esam.core.io.chunks import checked
        from napari_esam.core.io.inputs import open_tiff

        data = checked(open_tiff(path), path)
    ours = _clean_marker(ours_raw, len(shape), path)
    axes = ours.get("axes")
    if axes is None and len(tiff_axes) == len(shape):
        with contextlib.suppress(ValueError):
            axes = _check_axes(tiff_axes, len(shape))
    meta = _meta(
        path,
        len(shape),
        name=ours.get("name"),
        axes=axes,
        scale=ours.get("scale"),
        translate=ours.get("translate"),
        units=ours.get("units"),
        napari_esam=ours_raw is not None,
    )
    return data, meta
