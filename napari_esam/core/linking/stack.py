"""Linking a label stack: :func:`link_labels` reads the stack a few slices at a time, links the
objects of neighbouring slices (pass 1, :class:`~napari_esam.core.linking.assign.Linker`) and
writes the relabelled stack slice by slice (pass 2) into memory, an array or a label file.

Memory: the slices being read (one chunk along the linking axis, at most
:data:`BLOCK_BYTES`), the ``gap + 2`` planes the linker keeps, and a few numbers per 2-D object.
Time: linear in the number of slices.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_esam.core.linking.assign import (
    IOU_THRESHOLD,
    MAX_STEP,
    SPLIT_RATIO,
    Linker,
    LinkParams,
)
from napari_esam.core.linking.overlaps import check_label_dtype, plane_objects, relabel_plane

__all__ = ["BLOCK_BYTES", "LinkCancelled", "LinkResult", "link_labels", "output_dtype"]

#: largest block read at once along the linking axis (one chunk of the input, capped)
BLOCK_BYTES = 64 * 2**20

ProgressCallback = Callable[[int, int], None]


class LinkCancelled(RuntimeError):
    """Raised when ``cancel()`` returned true; nothing was written to a file output."""


@dataclass
class LinkResult:
    """What :func:`link_labels` produced.

    Attributes:
        labels: the linked labels: a NumPy array (``output=None``), the given output array,
            or the written file's path.
        n_objects: number of linked objects (ids 1..n_objects).
        dtype: dtype of the linked labels.
        mode, axis, shape: the linking mode, the linking axis and the stack's shape.
        nodes: one row per 2-D object (order of first appearance): ``id`` (final id),
            ``stack`` (flat index over the leading axes other than ``axis``), ``slice``
            (index along ``axis``), ``area`` (pixels), ``cy``, ``cx`` (centroid row, column).
    """

    labels: Any
    n_objects: int
    dtype: np.dtype
    mode: str
    axis: int
    shape: tuple[int, ...]
    nodes: dict[str, np.ndarray] = field(repr=False)

    @property
    def outer_axes(self) -> tuple[int, ...]:
        """Leading axes other than ``axis`` (each index along them is an independent stack)."""
        return tuple(d for d in range(len(self.shape) - 2) if d != self.axis)


def output_dtype(n: int) -> np.dtype:
    """The smallest of uint16/uint32/uint64 that holds ``n``."""
    for dtype in (np.uint16, np.uint32, np.uint64):
        if n <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{n} objects do not fit in uint64")


def _check_stack(labels: Any, axis: int) -> tuple[Any, int]:
    if isinstance(labels, (str, os.PathLike)):
        from napari_esam.core.io.inputs import open_input

        labels = open_input(labels)
    elif not all(hasattr(labels, a) for a in ("shape", "dtype", "__getitem__")):
        labels = np.asarray(labels)
    check_label_dtype(labels.dtype)
    ndim = len(labels.shape)
    if ndim < 3:
        raise ValueError(f"labels to link must be a stack of planes (3-D or more), got shape "
                         f"{tuple(labels.shape)}")
    if 0 in labels.shape:
        raise ValueError(f"labels array is empty (shape {tuple(labels.shape)})")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) \
            or not -ndim <= axis < ndim:
        raise ValueError(f"axis must be an integer in [{-ndim}, {ndim - 1}], got {axis!r}")
    axis = int(axis) % ndim
    if axis >= ndim - 2:
        raise ValueError(f"axis {axis} is a plane axis (y or x) of the {ndim}-D labels: link "
                         f"along one of the leading axes 0..{ndim - 3}")
    return labels, axis


def _block_bounds(labels: Any, axis: int) -> list[int]:
    """Start of each block read along ``axis`` (whole input chunks, capped at BLOCK_BYTES)."""
    n = int(labels.shape[axis])
    plane_bytes = math.prod(labels.shape[-2:]) * np.dtype(labels.dtype).itemsize
    cap = max(1, BLOCK_BYTES // max(1, plane_bytes))
    chunks = getattr(labels, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == len(labels.shape):
        c = chunks[axis]
        if isinstance(c, tuple):  # Dask: the actual chunk boundaries, split where too large
            bounds = [0]
            for size in c:
                end = bounds[-1] + int(size)
                while bounds[-1] + cap < end:
                    bounds.append(bounds[-1] + cap)
                bounds.append(end)
            return bounds
        step = max(1, min(int(c), cap))
    else:
        step = 1
    return [*range(0, n, step), n]


def _read_blocks(labels: Any, axis: int, outer: tuple[int, ...], outer_axes: tuple[int, ...],
                 bounds: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(first slice, block with the linking axis first) along ``axis`` for one outer index."""
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        index: list[Any] = [slice(None)] * len(labels.shape)
        for d, i in zip(outer_axes, outer, strict=True):
            index[d] = i
        index[axis] = slice(start, stop)
        block = labels[tuple(index)]
        if hasattr(block, "compute"):
            block = block.compute()
        yield start, np.asarray(block)  # the leading axes left: only the linking axis


def link_labels(
    labels: Any,
    *,
    mode: str = "3d",
    axis: int = 0,
    iou_threshold: float = IOU_THRESHOLD,
    gap: int = 1,
    max_step: float = MAX_STEP,
    split_ratio: float | None = SPLIT_RATIO,
    output: Any = None,
    overwrite: bool = False,
    write_options: Mapping[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> LinkResult:
    """Link per-slice labels into 3-D objects (``mode="3d"``) or tracks (``mode="track"``).

    The ids of different slices may be unrelated or repeated; objects of neighbouring slices
    that the rule of ``docs/rules/linking.md`` links get one id. Output ids are 1..n in order
    of first appearance (slice by slice, raster order within a slice).

    Args:
        labels: a 3-D or larger integer/bool stack (NumPy, Dask, Zarr, array-like, or a path to a
            TIFF/Zarr/.npy), read a few slices at a time. The last two axes are the planes;
            every index along the leading axes other than ``axis`` is an independent stack.
        mode: ``"3d"`` or ``"track"`` (motion-compensated, with a distance fallback).
        axis: the axis to link along (z or t), one of the leading axes.
        iou_threshold: smallest IoU of a link.
        gap: bridge up to this many consecutive slices where an object is missing.
        max_step: track mode: distance fallback gate in equivalent radii (0 turns it off).
        split_ratio: 3-D mode: cut chains at area valleys this deep (None: never).
        output: None (a new NumPy array), an array of the input's shape (NumPy, Zarr) written
            slice by slice, or a ``.zarr``/``.tif``/``.tiff`` path written by
            :func:`~napari_esam.core.io.label_files.write_labels` (temporary sibling renamed
            into place when complete: an interrupted link leaves an old file intact).
        overwrite: replace an existing output file.
        write_options: more keyword arguments of ``write_labels`` (``scale``, ``translate``,
            ``axes``, ``units``, ``name``, ``compression``).
        progress: ``progress(done, total)`` over both passes (``total`` = 2 × slices); while
            a file is written, possibly from a worker thread.
        cancel: polled between slices; when it returns true, :class:`LinkCancelled` is raised.

    Returns:
        A :class:`LinkResult` (the labels, the number of objects, the per-object table).
    """
    params = LinkParams(mode, float(iou_threshold), gap, float(max_step),
                        None if split_ratio is None else float(split_ratio))
    params.validate()
    source = labels if isinstance(labels, (str, os.PathLike)) else None
    labels, axis = _check_stack(labels, axis)
    shape = tuple(int(s) for s in labels.shape)
    target = _check_output(output, shape, overwrite, source)
    outer_axes = tuple(d for d in range(len(shape) - 2) if d != axis)
    outer_shape = tuple(shape[d] for d in outer_axes)
    n_slices = shape[axis]
    total = 2 * math.prod(outer_shape) * n_slices
    bounds = _block_bounds(labels, axis)
    done = 0

    def step() -> None:
        nonlocal done
        if cancel is not None and cancel():
            raise LinkCancelled("linking cancelled")
        done += 1
        if progress is not None:
            progress(done, total)

    # pass 1: link, keeping each plane's label values per node
    linker = Linker(params)
    values: list[np.ndarray] = []
    for stack, outer in enumerate(np.ndindex(*outer_shape)):
        for start, block in _read_blocks(labels, axis, outer, outer_axes, bounds):
            for offset, plane in enumerate(block):
                objs = plane_objects(plane)
                linker.add_plane(stack, start + offset, objs)
                values.append(objs.ids)
                step()
    final = linker.finish()
    n_objects = int(final.max()) if len(final) else 0
    dtype = output_dtype(n_objects)
    ids = np.concatenate(values) if values else np.empty(0, np.int64)
    counts = np.array([len(v) for v in values], np.int64)
    plane_start = np.concatenate([[0], np.cumsum(counts)])
    nodes = linker.nodes
    table = {"id": final, "stack": nodes.stack.copy(), "slice": nodes.slice.copy(),
             "area": nodes.area.copy(), "cy": nodes.cy.copy(), "cx": nodes.cx.copy()}

    relabel = _Relabeller(ids, final, plane_start, n_slices, dtype)
    # pass 2: write
    if isinstance(target, Path):
        result_labels: Any = _write_file(labels, axis, outer_axes, bounds, relabel, target,
                                         overwrite, write_options, (done, total), progress,
                                         cancel)
    else:
        out = np.zeros(shape, dtype) if target is None else target
        if target is not None:
            _check_output_dtype(np.dtype(out.dtype), n_objects)
        for stack, outer in enumerate(np.ndindex(*outer_shape)):
            for start, block in _read_blocks(labels, axis, outer, outer_axes, bounds):
                linked = np.stack([relabel(stack, start + k, p) for k, p in enumerate(block)])
                index: list[Any] = [slice(None)] * len(shape)
                for d, i in zip(outer_axes, outer, strict=True):
                    index[d] = i
                index[axis] = slice(start, start + len(block))
                out[tuple(index)] = linked.astype(out.dtype, copy=False)
                for _ in range(len(block)):
                    step()
        result_labels = out
        dtype = np.dtype(out.dtype)
    return LinkResult(result_labels, n_objects, dtype, mode, axis, shape, table)


def _check_output(output: Any, shape: tuple[int, ...], overwrite: bool,
                  source: str | os.PathLike[str] | None) -> Any:
    if output is None:
        return None
    if isinstance(output, (str, os.PathLike)):
        path = Path(os.fspath(output)).expanduser()
        if source is not None and path.resolve() == Path(os.fspath(source)).expanduser().resolve():
            raise ValueError("the output is the input: write the linked labels to another path")
        if path.suffix.lower() not in (".zarr", ".tif", ".tiff"):
            raise ValueError(f"cannot tell the format of {str(path)!r}: use a .zarr, .tif or "
                             ".tiff name")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"directory {str(path.parent)!r} does not exist")
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise FileExistsError(f"{str(path)!r} already exists; pass overwrite=True "
                                  "(CLI: --overwrite) to replace it")
        return path
    if not all(hasattr(output, a) for a in ("shape", "dtype", "__setitem__")):
        raise TypeError(f"output must be None, an array or a path, not {type(output).__name__}")
    if tuple(output.shape) != shape:
        raise ValueError(f"output shape {tuple(output.shape)} differs from the labels' {shape}")
    if np.dtype(output.dtype).kind not in "iu":
        raise ValueError(f"output dtype must be an integer type, got {np.dtype(output.dtype)}")
    return output


def _check_output_dtype(dtype: np.dtype, n: int) -> None:
    if n > np.iinfo(dtype).max:
        raise ValueError(f"{n} linked objects do not fit the output dtype {dtype}")


class _Relabeller:
    """Pass 2: the linked ids of one plane from its input labels."""

    def __init__(self, ids: np.ndarray, final: np.ndarray, plane_start: np.ndarray,
                 n_slices: int, dtype: np.dtype) -> None:
        self.ids, self.final, self.plane_start = ids, final, plane_start
        self.n_slices, self.dtype = n_slices, dtype

    def __call__(self, stack: int, slice_: int, plane: np.ndarray) -> np.ndarray:
        p = stack * self.n_slices + slice_
        rows = slice(int(self.plane_start[p]), int(self.plane_start[p + 1]))
        try:
            return relabel_plane(plane, self.ids[rows], self.final[rows], self.dtype)
        except ValueError:
            raise ValueError("the input labels changed while they were being linked") from None


def _write_file(labels: Any, axis: int, outer_axes: tuple[int, ...], bounds: list[int],
                relabel: _Relabeller, target: Path, overwrite: bool,
                write_options: Mapping[str, Any] | None,
                position: tuple[int, int], progress: ProgressCallback | None,
                cancel: Callable[[], bool] | None) -> Path:
    """Pass 2 into a label file: a lazy Dask array relabelled block by block, written by
    ``write_labels``."""
    import dask.array as da

    from napari_esam.core.io.label_files import write_labels

    shape = tuple(labels.shape)
    if isinstance(labels, da.Array):
        x = labels
    else:
        chunks = [1] * len(shape)
        chunks[-2:] = shape[-2:]
        sizes = tuple(np.diff(bounds).tolist())
        chunks[axis] = sizes  # type: ignore[call-overload]
        x = da.from_array(labels, chunks=tuple(chunks), name=False,
                          lock=not isinstance(labels, np.ndarray))
    outer_shape = tuple(shape[d] for d in outer_axes)

    def block_fn(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        if cancel is not None and cancel():
            raise LinkCancelled("linking cancelled")
        loc = block_info[0]["array-location"]  # type: ignore[index]
        out = np.empty(block.shape, relabel.dtype)
        lead = [range(a, b) for a, b in loc[:-2]]
        for idx in np.ndindex(*block.shape[:-2]):
            coords = [lead[d][i] for d, i in enumerate(idx)]
            outer = tuple(coords[d] for d in outer_axes)
            stack = int(np.ravel_multi_index(outer, outer_shape)) if outer else 0
            out[idx] = relabel(stack, coords[axis], block[idx])
        return out

    linked = x.map_blocks(block_fn, dtype=relabel.dtype,
                          meta=np.empty((0,) * len(shape), relabel.dtype))
    done0, total = position

    def on_progress(done: int, blocks: int) -> None:
        if progress is not None:
            progress(min(total, done0 + (done * (total - done0)) // max(1, blocks)), total)

    options = dict(write_options or {})
    return write_labels(target, linked, overwrite=overwrite, dtype=relabel.dtype,
                        progress=on_progress, **options)
