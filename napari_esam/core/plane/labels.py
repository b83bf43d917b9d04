"""Turn overlapping segment-everything masks into one non-overlapping instance labels image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["labels_dtype", "masks_to_labels", "paint_order", "size_kept"]


def labels_dtype(n_objects: int) -> np.dtype:
    """The smallest of uint16 / uint32 / uint64 that holds ids 0..n_objects."""
    for dt in (np.uint16, np.uint32):
        if n_objects <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _bbox_slices(record: dict[str, Any], shape: tuple[int, int]) -> tuple[slice, slice]:
    """Rows/cols covering the mask, from the record's XYWH ``bbox`` (inclusive) if present."""
    bbox = record.get("bbox")
    if bbox is None:
        return slice(0, shape[0]), slice(0, shape[1])
    x, y, w, h = (int(v) for v in bbox)
    return slice(max(y, 0), min(y + h + 1, shape[0])), slice(max(x, 0), min(x + w + 1, shape[1]))


def paint_order(areas: Sequence[int], scores: Sequence[float]) -> np.ndarray:
    """The paint order of masks (first painted .. last; the last is on top where they
    overlap): larger masks first, smaller ones on top; among equal areas the higher predicted
    IoU on top, then the earlier mask (``docs/rules/labels.md``); shared by
    :func:`masks_to_labels` and the tile merge."""
    pos = np.arange(len(areas))
    return np.lexsort((-pos, np.asarray(scores, dtype=np.float64),
                       -np.asarray(areas, dtype=np.int64)))


def size_kept(visible: np.ndarray, min_size: int = 0, max_size: int | None = None) -> np.ndarray:
    """Which objects survive the size filter, from their visible (final) areas in pixels:
    at least ``max(min_size, 1)`` and at most ``max_size``."""
    keep = visible >= max(int(min_size), 1)
    if max_size is not None:
        keep &= visible <= int(max_size)
    return keep


def masks_to_labels(
    records: Sequence[dict[str, Any]],
    shape: Sequence[int],
    *,
    min_size: int = 0,
    max_size: int | None = None,
    order: str = "area",
    dtype: Any = None,
) -> np.ndarray:
    """Paint mask records (``segmentation`` (H, W) bool, optional ``area``, ``bbox``,
    ``predicted_iou``) into an (H, W) labels image with ids 1..N (0 = background).

    The rules (paint order, size filter, ids) are the label rules of the docs
    (``docs/rules/labels.md``), the same as a segment-everything run's:

    * ``order="area"`` (default): :func:`paint_order`, larger masks first and smaller ones
      on top, ties by the higher ``predicted_iou`` on top, then the earlier record;
      ``"score"``: lowest ``predicted_iou`` first (best on top), ties by the earlier record.
    * Size filter: objects whose *visible* area after painting is below
      ``max(min_size, 1)`` or above ``max_size`` become background (0).
    * Ids are consecutive, 1..N, in the order of ``records`` (for segment-everything output:
      best predicted IoU first).

    A record's ``bbox`` (SAM's XYWH of the inclusive box), when present, must enclose its
    mask: only that window is painted. ``dtype``: the smallest of uint16/uint32/uint64 that
    fits N, or the given integer dtype (``ValueError`` if N does not fit).
    """
    if order not in ("area", "score"):
        raise ValueError(f"order must be 'area' or 'score', not {order!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise ValueError(f"shape must be (H, W), got {shape}")
    if min_size < 0 or (max_size is not None and max_size < 0):
        raise ValueError("min_size and max_size must be >= 0")
    if max_size is not None and max_size < max(1, min_size):
        raise ValueError(
            f"max_size ({max_size}) must be >= 1 and >= min_size ({min_size}): no object "
            "could be kept"
        )

    areas: list[int] = []
    scores: list[float] = []
    for i, r in enumerate(records):
        seg = r["segmentation"]
        if tuple(np.shape(seg)) != shape:
            raise ValueError(f"record {i}: segmentation shape {np.shape(seg)} != {shape}")
        areas.append(int(r["area"]) if "area" in r else int(np.count_nonzero(seg)))
        scores.append(float(r.get("predicted_iou", 0.0)))

    n = len(records)
    if order == "area":
        paint = paint_order(areas, scores)
    else:  # score asc, record index desc
        paint = np.lexsort((-np.arange(n), np.asarray(scores)))

    work = np.zeros(shape, dtype=np.int64 if n >= 2**31 - 1 else np.int32)
    for k in paint.tolist():
        r = records[k]
        rows, cols = _bbox_slices(r, shape)
        seg = np.asarray(r["segmentation"])[rows, cols].astype(bool, copy=False)
        work[rows, cols][seg] = k + 1

    visible = np.bincount(work.ravel(), minlength=n + 1)
    survive = size_kept(visible[1:], min_size, max_size)
    lut = np.zeros(n + 1, dtype=np.int64)
    lut[1:][survive] = np.arange(1, int(survive.sum()) + 1)
    n_out = int(survive.sum())

    if dtype is None:
        out_dtype = labels_dtype(n_out)
    else:
        out_dtype = np.dtype(dtype)
        if out_dtype.kind not in "ui":
            raise ValueError(f"dtype must be an integer type, got {out_dtype}")
        if n_out > np.iinfo(out_dtype).max:
            raise ValueError(f"{n_out} objects do not fit in {out_dtype}")
    return lut[work].astype(out_dtype, copy=False)
