"""One plane's objects and the pixel overlaps between two planes (NumPy only).

A plane's objects are its distinct non-zero label values. :func:`plane_objects` numbers them
0..k-1 in order of first appearance (raster order) and measures them; the overlap functions
count, for every pair of objects of two planes, the pixels they share (optionally after
shifting each object of the first plane by its own displacement). Time and memory are linear in
the plane's pixels: ids are compacted with a lookup table (small ids) or a sort (large ids),
pairs are counted with ``np.bincount`` (few objects) or ``np.unique`` (many).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "PlaneObjects",
    "check_label_dtype",
    "overlaps",
    "plane_objects",
    "relabel_plane",
    "shifted_overlaps",
]

#: ids up to this value, or up to the plane's pixel count, are compacted with a lookup table;
#: larger ones by sorting
LUT_MAX = 2**16
#: pair tables up to this many cells are counted with ``np.bincount``
BINCOUNT_MAX = 2**22


@dataclass(frozen=True)
class PlaneObjects:
    """The objects of one 2-D plane, numbered 0..k-1 in order of first appearance.

    Attributes:
        ids: (k,) input label value of each object.
        area: (k,) pixels of each object.
        centroid: (k, 2) mean (row, column) of each object's pixels.
        compact: the plane with object ``i`` painted ``i + 1`` and background 0 (int32).
    """

    ids: np.ndarray
    area: np.ndarray
    centroid: np.ndarray
    compact: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def check_label_dtype(dtype: np.dtype) -> None:
    """Raise ``ValueError`` unless ``dtype`` is an integer or bool label type."""
    if np.dtype(dtype).kind not in "biu":
        raise ValueError(
            f"labels must be an integer (or bool) array, got dtype {np.dtype(dtype)}: "
            "convert them explicitly, e.g. labels.astype(np.uint32)"
        )


def _compact(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted non-zero values, int32 plane of 1-based positions in them, 0 for background)."""
    if flat.dtype.kind == "b":
        flat = flat.view(np.uint8)
    if flat.size == 0:
        return np.empty(0, np.int64), np.zeros(0, np.int32)
    if flat.dtype.kind == "i" and int(flat.min()) < 0:
        raise ValueError(f"labels must be non-negative, found {int(flat.min())}")
    top = int(flat.max())
    if top <= max(LUT_MAX, flat.size):
        present = np.flatnonzero(np.bincount(flat, minlength=top + 1))
        present = present[present != 0]
        lut = np.zeros(top + 1, np.int32)
        lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
        return present.astype(np.int64), lut[flat]
    values = np.unique(flat)  # a plain sort, then a binary search: faster than an argsort
    inverse = np.searchsorted(values, flat).astype(np.int32)
    if values[0] == 0:
        return values[1:].astype(np.int64), inverse
    return values.astype(np.int64), inverse + 1


def plane_objects(plane: np.ndarray) -> PlaneObjects:
    """Number and measure the objects of a 2-D label plane (any integer or bool dtype).

    Args:
        plane: (H, W) labels; 0 is background; values must be non-negative.

    Returns:
        The plane's :class:`PlaneObjects`, objects in order of first appearance in raster order.
    """
    plane = np.asarray(plane)
    check_label_dtype(plane.dtype)
    if plane.ndim != 2:
        raise ValueError(f"a label plane must be 2-D, got shape {plane.shape}")
    h, w = plane.shape
    values, code = _compact(plane.reshape(-1))
    k = len(values)
    if k == 0:
        return PlaneObjects(np.empty(0, np.int64), np.empty(0, np.int64),
                            np.empty((0, 2)), np.zeros((h, w), np.int32))
    nz = np.flatnonzero(code)
    obj = code[nz]
    first = np.full(k + 1, code.size, np.int64)
    np.minimum.at(first, obj, nz)
    order = np.argsort(first[1:], kind="stable")  # sorted-value index -> appearance rank
    rank = np.empty(k + 1, np.int32)
    rank[0] = 0
    rank[order + 1] = np.arange(1, k + 1, dtype=np.int32)
    obj = rank[obj]
    compact = np.zeros(code.size, np.int32)
    compact[nz] = obj
    area = np.bincount(obj, minlength=k + 1)[1:]
    rows, cols = np.divmod(nz, w)
    centroid = np.stack([np.bincount(obj, rows, minlength=k + 1)[1:],
                         np.bincount(obj, cols, minlength=k + 1)[1:]], axis=1) / area[:, None]
    return PlaneObjects(values[order], area.astype(np.int64), centroid, compact.reshape(h, w))


def _count_pairs(a: np.ndarray, b: np.ndarray, ka: int, kb: int) -> tuple[np.ndarray, ...]:
    """(i, j, count) of the pairs of 1-based object numbers ``a``, ``b`` (0-based out)."""
    if a.size == 0:
        empty = np.empty(0, np.int64)
        return empty, empty, empty
    code = a.astype(np.int64) * (kb + 1) + b
    if (ka + 1) * (kb + 1) <= BINCOUNT_MAX:
        counts = np.bincount(code, minlength=(ka + 1) * (kb + 1))
        pairs = np.flatnonzero(counts)
        counts = counts[pairs]
    else:
        pairs, counts = np.unique(code, return_counts=True)
    i, j = np.divmod(pairs, kb + 1)
    return i - 1, j - 1, counts.astype(np.int64)


def overlaps(a: PlaneObjects, b: PlaneObjects) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels shared by each pair of objects of two planes of the same shape.

    Returns:
        ``(i, j, count)``: object ``i`` of ``a`` and object ``j`` of ``b`` share ``count``
        pixels; pairs that share none are left out.
    """
    both = (a.compact != 0) & (b.compact != 0)
    return _count_pairs(a.compact[both], b.compact[both], len(a), len(b))


def shifted_overlaps(
    a: PlaneObjects, b: PlaneObjects, shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`overlaps`, with object ``i`` of ``a`` first moved by ``shift[i]``.

    Args:
        a, b: the two planes' objects.
        shift: (len(a), 2) displacement (rows, columns) of each object of ``a``; rounded to
            whole pixels; pixels moved outside the plane are dropped.
    """
    h, w = a.compact.shape
    flat = a.compact.reshape(-1)
    nz = np.flatnonzero(flat)
    obj = flat[nz]
    step = np.rint(np.asarray(shift, dtype=np.float64)).astype(np.int64)
    rows, cols = np.divmod(nz, w)
    rows = rows + step[obj - 1, 0]
    cols = cols + step[obj - 1, 1]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    target = b.compact[rows[inside], cols[inside]]
    hit = target != 0
    return _count_pairs(obj[inside][hit], target[hit], len(a), len(b))


def relabel_plane(plane: np.ndarray, ids: np.ndarray, values: np.ndarray,
                  dtype: np.dtype) -> np.ndarray:
    """Replace each label ``ids[n]`` of ``plane`` by ``values[n]`` (0 stays 0).

    Args:
        plane: 2-D labels whose non-zero values are all in ``ids`` (else ``ValueError``).
        ids: (k,) distinct non-zero label values, any order.
        values: (k,) their new values.
        dtype: output dtype.
    """
    plane = np.asarray(plane)
    if plane.dtype.kind == "b":
        plane = plane.view(np.uint8)
    ids = np.asarray(ids, np.int64)
    new = np.asarray(values).astype(dtype)
    flat = plane.reshape(-1)
    top = int(flat.max()) if flat.size else 0
    if top == 0:
        return np.zeros(plane.shape, dtype)
    if len(ids) and top <= max(LUT_MAX, flat.size) and top <= int(ids.max()):
        lut = np.zeros(top + 1, dtype)
        known = np.zeros(top + 1, bool)
        inside = ids <= top
        lut[ids[inside]] = new[inside]
        known[ids[inside]] = True
        known[0] = True
        if not known[flat].all():
            raise ValueError("the plane holds labels that are not in ids")
        return lut[plane]
    order = np.argsort(ids)
    sorted_ids, mapped = ids[order], new[order]
    nz = np.flatnonzero(flat)
    v = flat[nz]
    pos = np.minimum(np.searchsorted(sorted_ids, v), max(len(ids) - 1, 0))
    if len(ids) == 0 or not np.array_equal(sorted_ids[pos], v):
        raise ValueError("the plane holds labels that are not in ids")
    out = np.zeros(flat.size, dtype)
    out[nz] = mapped[pos]
    return out.reshape(plane.shape)
