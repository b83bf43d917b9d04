"""Merge: the masks of a plane's tiles become one labels plane (the seam rule).

A plane is cut by a :class:`~napari_esam.core.tiling.grid.TileGrid`; a plane that is one
tile is the grid's simplest case, and goes through the same two steps:

* :func:`keep_tile_masks` (per tile, where the tile was segmented): keep the masks the
  ownership rule gives the tile, each cropped to its bounding box, in paint order
  (:class:`TileMasks`);
* :class:`PlaneMerger` (per plane, sequential over its tiles in raster order): paint the kept
  masks, uniting objects across seams, then give the objects their final ids and apply the
  size filter.

The rules (ownership, merging across seams, painting, ids, size filter) are written once, in
``docs/rules/tiling.md`` (seams) and ``docs/rules/labels.md`` (paint order, ids, size
filter). In short: a mask is kept by the tile whose core holds the centre of its box (or as a
piece when the owner would see it cut); a kept mask that overlaps another tile's object
inside the two tiles' shared window with IoU >= ``merge_iou`` is the same object; within a
tile larger masks are painted first and smaller ones on top (ties: higher predicted IoU on
top, then the earlier record), never over another tile's unrelated object; ids are
consecutive in tile raster order, then record order; objects whose final visible area is
outside ``min_size``..``max_size`` become background.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_esam.core.plane.labels import paint_order, size_kept
from napari_esam.core.tiling.grid import Tile, TileGrid, Window

__all__ = ["PlaneMerger", "PlaneView", "TileMasks", "keep_tile_masks"]

_RULE1 = ("owned", "piece", "dropped")


class _UnionFind:
    """Union-find over provisional ids 1..n (0 = background, never merged)."""

    def __init__(self) -> None:
        self.parent = [0]

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def __len__(self) -> int:
        return len(self.parent) - 1


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) half-open bounding box of a bool mask, or None when empty."""
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _keep(grid: TileGrid, tile: Tile, box: Window) -> tuple[bool, str]:
    """The ownership rule for a mask with full-plane bounding ``box``."""
    cy, cx = (box.y0 + box.y1 - 1) / 2, (box.x0 + box.x1 - 1) / 2
    owner = grid.tile_of(cy, cx)
    if owner.key == tile.key:
        return True, "owned"
    if grid.inner_margin(owner, box) >= 1:
        return False, "dropped"
    return True, "piece"


@dataclass
class TileMasks:
    """The masks one tile keeps, in paint order (first painted first).

    ``boxes`` (n, 4) int: each mask's half-open (y0, x0, y1, x1) box in the tile window;
    ``masks``: n bool crops (the mask inside its box); ``scores``: predicted IoUs;
    ``order``: each mask's record index in the tile (the id order). ``stats``: how many
    masks the ownership rule found owned, kept as pieces or dropped.
    """

    plane: tuple[int, ...]
    iy: int
    ix: int
    boxes: np.ndarray
    masks: list[np.ndarray]
    scores: np.ndarray
    order: np.ndarray
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_RULE1, 0))

    @property
    def key(self) -> tuple[int, int]:
        return self.iy, self.ix

    def __len__(self) -> int:
        return len(self.masks)


def _record_crop(record: Mapping[str, Any]) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """(box, crop) of a record's mask: its tight half-open box in the tile and the mask in it."""
    seg = np.asarray(record["segmentation"])
    bbox = record.get("bbox")
    y0 = x0 = 0
    if bbox is not None:  # SAM's XYWH of the inclusive box: only look inside it
        x, y, w, h = (int(v) for v in bbox)
        y0, x0 = max(y, 0), max(x, 0)
        seg = seg[y0 : y + h + 1, x0 : x + w + 1]
    seg = seg.astype(bool, copy=False)
    b = _mask_box(seg)
    if b is None:
        return None
    crop = np.ascontiguousarray(seg[b[0] : b[2], b[1] : b[3]])
    return (y0 + b[0], x0 + b[1], y0 + b[2], x0 + b[3]), crop


def keep_tile_masks(
    grid: TileGrid,
    tile: Tile,
    records: Iterable[Mapping[str, Any]],
    plane: tuple[int, ...] = (),
) -> TileMasks:
    """The ownership rule on one tile's segment-everything ``records`` (``segmentation``
    (h, w) bool in the tile window, optional ``bbox``, ``predicted_iou``) →
    :class:`TileMasks` in paint order."""
    win = tile.window
    stats = dict.fromkeys(_RULE1, 0)
    boxes, crops, scores, order = [], [], [], []
    for i, rec in enumerate(records):
        found = _record_crop(rec)
        if found is None:
            continue
        b, crop = found
        keep, why = _keep(grid, tile, Window(win.y0 + b[0], win.x0 + b[1],
                                             win.y0 + b[2], win.x0 + b[3]))
        stats[why] += 1
        if keep:
            boxes.append(b)
            crops.append(crop)
            scores.append(float(rec.get("predicted_iou", 0.0)))
            order.append(i)
    areas = [int(c.sum()) for c in crops]
    paint = paint_order(areas, scores) if crops else np.zeros(0, np.int64)
    n = len(crops)
    return TileMasks(
        tuple(int(i) for i in plane), tile.iy, tile.ix,
        np.asarray(boxes, dtype=np.int64).reshape(n, 4)[paint],
        [crops[k] for k in paint.tolist()],
        np.asarray(scores, dtype=np.float64)[paint],
        np.asarray(order, dtype=np.int64)[paint],
        stats,
    )


class PlaneView:
    """One 2-D plane of a labels array, read and written by (rows, cols) keys: ``region`` is
    the index that selects the plane (ints for the stack axes, ``slice(None)`` for the two
    plane axes, in the array's axis order)."""

    def __init__(self, array: Any, region: tuple) -> None:
        self.array, self.region = array, tuple(region)
        self.dtype = np.dtype(array.dtype)
        self._axes = [i for i, r in enumerate(self.region) if isinstance(r, slice)]
        if len(self._axes) != 2:
            raise ValueError(f"region {region} does not select a 2-D plane")

    def _key(self, key: tuple[slice, slice]) -> tuple:
        full = list(self.region)
        full[self._axes[0]], full[self._axes[1]] = key
        return tuple(full)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return np.asarray(self.array[self._key(key)])

    def __setitem__(self, key: tuple[slice, slice], value: Any) -> None:
        self.array[self._key(key)] = value


class PlaneMerger:
    """Paints one plane's tiles into ``out`` (a 2-D array or :class:`PlaneView`, zero or
    cleared with :meth:`clear`) and merges objects across seams (module doc)."""

    def __init__(self, out: Any, grid: TileGrid, merge_iou: float = 0.5) -> None:
        self.out, self.grid = out, grid
        self.merge_iou = merge_iou
        self.uf = _UnionFind()
        self.src: list[tuple[int, int] | None] = [None]  # provisional id -> source tile key
        self.count = [0]  # provisional id -> visible pixels
        self.rank = [0]  # provisional id -> (tile in raster order, record index), flattened
        self.stats = {"owned": 0, "piece": 0, "dropped": 0, "merged": 0}

    def add(self, kept: TileMasks) -> None:
        """Paint one tile's kept masks, merging them with other tiles' objects."""
        tile = self.grid.tile_at(kept.iy, kept.ix)
        key = tile.window.slices
        region = np.asarray(self.out[key]).astype(np.int64)
        before = region.copy()
        for k in _RULE1:
            self.stats[k] += int(kept.stats.get(k, 0))
        first_own = len(self.uf) + 1  # this tile's provisional ids are >= first_own
        seq = kept.iy * self.grid.n_x + kept.ix
        for box, mm, order in zip(kept.boxes.tolist(), kept.masks, kept.order.tolist(),
                                  strict=True):
            y0, x0, y1, x1 = box
            sub = region[y0:y1, x0:x1]
            matched = self._matches(tile, region, mm, box, np.unique(sub[mm]), first_own)
            gid = self.uf.add()
            self.src.append(tile.key)
            self.count.append(0)
            self.rank.append(seq * (1 << 32) + int(order))
            for other in matched:
                self.uf.union(gid, other)
            self.stats["merged"] += len(matched)
            free = (sub == 0) | (sub >= first_own)
            if matched:
                free |= np.isin(sub, matched)
            sub[mm & free] = gid
        self._count(before, region)
        if self.out.dtype.kind in "ui" and len(self.uf) > np.iinfo(self.out.dtype).max:
            raise OverflowError(f"{len(self.uf)} masks do not fit in a {self.out.dtype} plane")
        self.out[key] = region.astype(self.out.dtype, copy=False)

    def _matches(
        self,
        tile: Tile,
        region: np.ndarray,
        crop: np.ndarray,
        box: Sequence[int],
        ids: np.ndarray,
        first_own: int,
    ) -> list[int]:
        """Ids of other tiles' objects that are the same object as the mask ``crop`` at
        ``box`` (tile-window pixels): IoU inside the two windows' overlap."""
        by0, bx0, by1, bx1 = box
        out = []
        for lab in ids.tolist():
            if lab == 0 or lab >= first_own:
                continue
            src = self.src[lab]
            if src is None or src == tile.key:
                continue
            shared = tile.window.intersect(self.grid.tile_at(*src).window)
            if shared is None:
                continue
            sy, sx = shared.relative_to(tile.window)
            n_other = np.count_nonzero(region[sy, sx] == lab)
            iy0, ix0 = max(sy.start, by0), max(sx.start, bx0)
            iy1, ix1 = min(sy.stop, by1), min(sx.stop, bx1)
            n_mask = inter = 0
            if iy1 > iy0 and ix1 > ix0:  # the part of the mask inside the overlap
                a = crop[iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0]
                n_mask = np.count_nonzero(a)
                inter = np.count_nonzero(a & (region[iy0:iy1, ix0:ix1] == lab))
            union = n_mask + n_other - inter
            if union and inter / union >= self.merge_iou:
                out.append(lab)
        return out

    def _count(self, before: np.ndarray, after: np.ndarray) -> None:
        changed = before != after
        if not changed.any():
            return
        for lab, n in zip(*np.unique(before[changed], return_counts=True), strict=True):
            if lab:
                self.count[int(lab)] -= int(n)
        for lab, n in zip(*np.unique(after[changed], return_counts=True), strict=True):
            if lab:
                self.count[int(lab)] += int(n)

    def lookup(
        self, first_id: int, min_size: int = 0, max_size: int | None = None
    ) -> tuple[np.ndarray, int]:
        """Provisional → final ids; returns (lut, n_objects).

        Objects (merged provisional ids) get consecutive ids from ``first_id`` in the order
        of their first mask (tile raster order, then record order); objects whose visible
        area fails the size filter map to 0.
        """
        n = len(self.uf)
        roots = np.array([self.uf.find(i) for i in range(n + 1)], dtype=np.int64)
        area = np.bincount(roots, weights=np.asarray(self.count, dtype=np.float64),
                           minlength=n + 1)
        keep = size_kept(area, min_size, max_size)
        keep[0] = False
        first = np.full(n + 1, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, roots, np.asarray(self.rank, dtype=np.int64))
        kept = np.flatnonzero(keep)
        kept = kept[np.argsort(first[kept], kind="stable")]
        final = np.zeros(n + 1, dtype=np.int64)
        final[kept] = np.arange(first_id, first_id + len(kept))
        return final[roots], len(kept)

    def _blocks(self, block: int) -> Iterable[tuple[slice, slice]]:
        h, w = self.grid.shape
        for y in range(0, h, block):
            for x in range(0, w, block):
                yield slice(y, min(h, y + block)), slice(x, min(w, x + block))

    def clear(self, block: int = 2048) -> None:
        """Zero the plane (block by block) before merging into it (an output resumed after
        a stop mid-merge holds provisional ids that must not look like objects)."""
        for key in self._blocks(block):
            if np.asarray(self.out[key]).any():
                self.out[key] = 0

    def relabel(
        self, first_id: int, min_size: int = 0, max_size: int | None = None, block: int = 2048
    ) -> int:
        """Resolve provisional ids in place, block by block; returns the object count."""
        lut, n = self.lookup(first_id, min_size, max_size)
        if self.out.dtype.kind in "ui" and first_id + n - 1 > np.iinfo(self.out.dtype).max:
            raise OverflowError(f"{first_id + n - 1} objects do not fit in {self.out.dtype}")
        for key in self._blocks(block):
            part = np.asarray(self.out[key])
            if part.any():
                self.out[key] = lut[part].astype(self.out.dtype, copy=False)
        return n
