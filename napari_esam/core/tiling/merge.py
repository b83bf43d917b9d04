"""Segment everything on images far larger than the model input, tile by tile.

:func:`segment_everything_tiled` runs :func:`~napari_esam.core.plane.everything.segment_everything`
on every tile of the grid (:class:`~napari_esam.core.tiling.grid.TileGrid`: tile + overlap
``halo``) and merges the tiles' masks into one labels array, written tile window by tile
window (Zarr or NumPy). Peak memory is that of one tile's work plus one tile window of labels.

The work has two steps:

* the **map step** (:func:`segment_tile`, heavy, independent per tile): segment everything on
  one tile (its embedding from a :class:`TiledPredictor`: LRU cache, embedding store or the
  encoder) and keep the masks the ownership rule (1 below) gives the tile, each cropped to
  its bounding box (:class:`TileMasks`);
* the **merge step** (:class:`_PlaneMerger`, cheap, sequential): paint the kept masks tile by
  tile in raster order, uniting objects across seams (rules 2-4), then relabel. It is
  sequential because rule 2 compares a tile's masks with the labels earlier tiles wrote;
  painting order decides which tile keeps contested pixels, so the merge must see the tiles
  in one fixed order for the result not to depend on scheduling.

In-process (the default) the two steps alternate tile by tile. With ``executor=`` (a
:class:`LocalTileExecutor`, or :class:`~napari_esam.core.runs.cluster.DaskExecutor` for one Dask
task per tile) the map step runs as picklable :class:`TileTask` s that write their
:class:`TileMasks` into a scratch Zarr group (:class:`TileScratch`, one group per tile) and
return only counts; the client records finished tiles (a rerun skips them), then merges from
the scratch group in the same raster order, so the labels are identical to the in-process
run, and deletes the scratch group.

**Seam rule** (one label per object, no duplicates, no seam lines):

1. *Ownership.* A mask found in tile T is kept when the centre of its bounding box lies in
   T's core. A mask centred in another tile's core O is dropped when O sees all of it (its
   box lies inside O's window, away from O's inner edges): O segments that object itself.
   Otherwise (O would see it cut) it is kept too, as a piece to merge.
2. *Merging.* Tiles are processed in raster order. A kept mask is compared with the labels
   already written by other tiles *inside the overlap of the two tile windows* (the region
   both tiles saw): when the IoU there is at least ``merge_iou`` the two are the same object
   and become one label (union of pixels, union-find over provisional ids). Small objects are
   thus handled by rule 1 alone; objects larger than the overlap (cut in every tile) by rule 2.
3. *Painting.* Within a tile, larger masks are painted first and smaller ones on top. A mask
   never overwrites pixels of another tile's unrelated object (first come keeps them).
4. *Ids.* Provisional ids are resolved after each plane by one chunk-by-chunk pass that maps
   them to consecutive final ids (``id_scope="stack"``: unique over the stack; ``"slice"``:
   1..n per 2-D plane); objects whose merged area is outside ``min_size``..``max_size``
   become background.

Stacks are tiled per 2-D plane. Embeddings come from a :class:`TiledPredictor` (its LRU cache
and optional :class:`~napari_esam.core.tiling.store.EmbeddingStore`, so a precomputed store
skips the encoder entirely).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_esam.core.plane.predictor import Predictor
from napari_esam.core.tiling.grid import (
    HALO,
    TILE,
    Tile,
    TileGrid,
    Window,
    content_hash,
    full_resolution,
    global_contrast_limits,
    global_sample,
    is_rgb_shape,
    iter_planes,
    leading_shape,
    plane_shape,
)
from napari_esam.core.tiling.predictor import TiledPredictor
from napari_esam.core.tiling.store import EmbeddingStore, StoreSignature
from napari_esam.models.base import PromptableModel

__all__ = [
    "LocalTileExecutor",
    "TileDone",
    "TileMasks",
    "TileScratch",
    "TileTask",
    "create_labels_output",
    "keep_tile_masks",
    "segment_everything_tiled",
    "segment_tile",
    "tile_count",
]

LABEL_DTYPE = np.uint32
#: group attribute of a scratch group (the run's record and the finished tiles)
SCRATCH_ATTR = "napari-esam-tiles"
SCRATCH_FORMAT = 1
#: the client writes the finished-tile record at most this often (seconds), and at the end
RECORD_INTERVAL = 2.0
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


def create_labels_output(
    output: Any,
    shape: Sequence[int],
    *,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
) -> Any:
    """The labels array to write into: ``None`` → NumPy zeros (fits-in-RAM images only);
    a path → a new Zarr array (uint32, chunks ``(1, ..., 1, 1024, 1024)``); an array → it."""
    shape = tuple(int(s) for s in shape)
    if output is None:
        return np.zeros(shape, dtype=LABEL_DTYPE)
    if isinstance(output, (str, os.PathLike)):
        import zarr
        from zarr.codecs import BloscCodec

        path = Path(output)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        if chunks is None:
            chunks = (*(1,) * (len(shape) - 2), min(1024, shape[-2]), min(1024, shape[-1]))
        return zarr.create_array(
            store=str(path), shape=shape, chunks=tuple(int(c) for c in chunks),
            dtype=LABEL_DTYPE, fill_value=0, overwrite=overwrite,
            compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
        )
    if tuple(int(s) for s in output.shape) != shape:
        raise ValueError(f"the output has shape {tuple(output.shape)}, expected {shape}")
    if np.dtype(output.dtype).kind not in "iu":
        raise ValueError(f"the output must be an integer labels array, not {output.dtype}")
    return output


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) half-open bounding box of a bool mask, or None when empty."""
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _keep(grid: TileGrid, tile: Tile, box: Window) -> tuple[bool, str]:
    """Rule 1 of the module doc for a mask with full-image bounding ``box``."""
    cy, cx = (box.y0 + box.y1 - 1) / 2, (box.x0 + box.x1 - 1) / 2
    owner = grid.tile_of(cy, cx)
    if owner.key == tile.key:
        return True, "owned"
    if grid.inner_margin(owner, box) >= 1:
        return False, "dropped"
    return True, "piece"


# ------------------------------------------------------------------------------ map step


@dataclass
class TileMasks:
    """The map step's result for one tile: the masks rule 1 keeps, in painting order.

    ``boxes`` (n, 4) int: each mask's half-open (y0, x0, y1, x1) box in the tile window;
    ``masks``: n bool crops (the mask inside its box); larger masks first (ties in
    ``segment_everything``'s order). ``stats``: how many masks rule 1 found owned, kept as
    pieces or dropped.
    """

    plane: tuple[int, ...]
    iy: int
    ix: int
    boxes: np.ndarray
    masks: list[np.ndarray]
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_RULE1, 0))

    @property
    def key(self) -> tuple[int, int]:
        return self.iy, self.ix

    def __len__(self) -> int:
        return len(self.masks)


def keep_tile_masks(
    grid: TileGrid, tile: Tile, masks: Iterable[np.ndarray], plane: tuple[int, ...] = ()
) -> TileMasks:
    """Rule 1 on one tile's masks (each (h, w) bool in the tile window) → :class:`TileMasks`."""
    win = tile.window
    stats = dict.fromkeys(_RULE1, 0)
    kept = []
    for m in masks:
        m = np.asarray(m, dtype=bool)
        b = _mask_box(m)
        if b is None:
            continue
        box = Window(win.y0 + b[0], win.x0 + b[1], win.y0 + b[2], win.x0 + b[3])
        keep, why = _keep(grid, tile, box)
        stats[why] += 1
        if keep:
            crop = np.ascontiguousarray(m[b[0] : b[2], b[1] : b[3]])
            kept.append((int(crop.sum()), b, crop))
    kept.sort(key=lambda t: -t[0])  # large first, small on top (stable: ties keep order)
    boxes = np.array([k[1] for k in kept], dtype=np.int64).reshape(len(kept), 4)
    return TileMasks(tuple(int(i) for i in plane), tile.iy, tile.ix, boxes,
                     [k[2] for k in kept], stats)


def _everything_on_tile(
    predictor: Predictor,
    embedding: tuple[Any, tuple[int, int]],
    grid: TileGrid,
    tile: Tile,
    plane: tuple[int, ...],
    cancel: Callable[[], bool] | None,
    everything_kwargs: dict[str, Any],
) -> TileMasks:
    from napari_esam.core.plane.everything import segment_everything

    feats, input_size = embedding
    predictor.set_embedding(feats, tile.window.shape, input_size)
    records = segment_everything(None, predictor, cancel=cancel, **everything_kwargs)
    return keep_tile_masks(grid, tile, (r["segmentation"] for r in records), plane)


def segment_tile(
    tp: TiledPredictor,
    tile: Tile,
    *,
    predictor: Predictor | None = None,
    cancel: Callable[[], bool] | None = None,
    **everything_kwargs: Any,
) -> TileMasks:
    """The map step: segment everything on ``tile`` of ``tp``'s current plane (embedding
    from ``tp``: cache, store or encoder) and keep its masks by rule 1 (module doc).

    ``everything_kwargs`` go to ``segment_everything`` (no crops); ``predictor`` (a
    :class:`Predictor` of ``tp.model``) may be reused between calls.
    """
    embedding = tp.tile_embedding(tile)
    predictor = predictor if predictor is not None else Predictor(tp.model)
    return _everything_on_tile(
        predictor, embedding, tp.grid, tile, tp.index, cancel, everything_kwargs
    )


# ---------------------------------------------------------------------------- merge step


class _PlaneMerger:
    """Paints one plane's tiles into the output and merges objects across seams."""

    def __init__(self, out: Any, index: tuple[int, ...], grid: TileGrid, merge_iou: float):
        self.out, self.index, self.grid = out, index, grid
        self.merge_iou = merge_iou
        self.uf = _UnionFind()
        self.src: list[tuple[int, int] | None] = [None]  # provisional id -> source tile key
        self.count = [0]  # provisional id -> visible pixels
        self.stats = {"owned": 0, "piece": 0, "dropped": 0, "merged": 0}

    def add_tile(self, tile: Tile, masks: list[np.ndarray]) -> None:
        """Paint one tile's masks (each (h, w) bool in the tile window), merging seams."""
        self.add_kept(keep_tile_masks(self.grid, tile, masks, self.index))

    def add_kept(self, kept: TileMasks) -> None:
        """Paint one tile's kept masks (the map step's :class:`TileMasks`), merging seams."""
        tile = self.grid.tile_at(kept.iy, kept.ix)
        key = self.index + tile.window.slices
        region = np.asarray(self.out[key]).astype(np.int64)
        before = region.copy()
        for k in _RULE1:
            self.stats[k] += int(kept.stats.get(k, 0))
        first_own = len(self.uf) + 1  # this tile's provisional ids are >= first_own
        for box, mm in zip(kept.boxes.tolist(), kept.masks, strict=True):
            y0, x0, y1, x1 = box
            sub = region[y0:y1, x0:x1]
            matched = self._matches(tile, region, mm, box, np.unique(sub[mm]), first_own)
            gid = self.uf.add()
            self.src.append(tile.key)
            self.count.append(0)
            for other in matched:
                self.uf.union(gid, other)
            self.stats["merged"] += len(matched)
            free = (sub == 0) | (sub >= first_own)
            if matched:
                free |= np.isin(sub, matched)
            sub[mm & free] = gid
        self._count(before, region)
        if len(self.uf) > np.iinfo(np.dtype(self.out.dtype)).max:
            raise OverflowError(
                f"{len(self.uf)} masks do not fit in a {self.out.dtype} output; use uint32"
            )
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
        ``box`` (tile-window pixels) (rule 2: IoU inside the two windows' overlap)."""
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
        """Provisional → final ids (consecutive from ``first_id``); returns (lut, n_objects).

        Objects (merged ids) with no visible pixel, fewer than ``min_size`` or more than
        ``max_size`` pixels map to 0.
        """
        n = len(self.uf)
        roots = np.array([self.uf.find(i) for i in range(n + 1)], dtype=np.int64)
        area = np.bincount(roots, weights=np.asarray(self.count, dtype=np.float64), minlength=n + 1)
        keep = (area > 0) & (area >= min_size)
        if max_size is not None:
            keep &= area <= max_size
        keep[0] = False
        final = np.zeros(n + 1, dtype=np.int64)
        ordered = np.flatnonzero(keep)
        final[ordered] = np.arange(first_id, first_id + len(ordered))
        return final[roots], len(ordered)

    def clear(self, block: int = 2048) -> None:
        """Zero this plane of the output (block by block) before writing it."""
        h, w = self.grid.shape
        for y in range(0, h, block):
            for x in range(0, w, block):
                key = self.index + (slice(y, min(h, y + block)), slice(x, min(w, x + block)))
                if np.asarray(self.out[key]).any():
                    self.out[key] = 0

    def relabel(
        self, first_id: int, min_size: int = 0, max_size: int | None = None, block: int = 2048
    ) -> int:
        """Resolve provisional ids in place, block by block; returns the object count."""
        lut, n = self.lookup(first_id, min_size, max_size)
        if first_id + n - 1 > np.iinfo(np.dtype(self.out.dtype)).max:
            raise OverflowError(f"{first_id + n - 1} objects do not fit in {self.out.dtype}")
        h, w = self.grid.shape
        for y in range(0, h, block):
            for x in range(0, w, block):
                key = self.index + (slice(y, min(h, y + block)), slice(x, min(w, x + block)))
                part = np.asarray(self.out[key])
                if part.any():
                    self.out[key] = lut[part].astype(self.out.dtype, copy=False)
        return n


def _merge_planes(
    out: Any,
    grid: TileGrid,
    plane_list: Sequence[tuple[int, ...]],
    lead: tuple[int, ...],
    tiles_of: Callable[[tuple[int, ...]], Iterable[TileMasks]],
    *,
    fresh: bool,
    merge_iou: float,
    min_size: int,
    max_size: int | None,
    id_scope: str,
    id_stride: int | None,
    stats: dict[str, Any],
) -> dict[tuple[int, ...], int]:
    """The sequential merge of every plane: ``tiles_of(plane)`` yields the plane's
    :class:`TileMasks` in raster order. Returns the objects per plane; adds to ``stats``."""
    next_id = 1
    per_plane: dict[tuple[int, ...], int] = {}
    for plane in plane_list:
        plane = tuple(int(i) for i in plane)
        merger = _PlaneMerger(out, plane, grid, merge_iou)
        if not fresh:
            merger.clear()  # the merge reads the output: old labels must not look like ids
        for kept in tiles_of(plane):
            merger.add_kept(kept)
            stats["tiles"] += 1
        if id_stride is not None:
            first = int(np.ravel_multi_index(plane, lead)) * id_stride + 1 if lead else 1
        else:
            first = next_id if id_scope == "stack" else 1
        n = merger.relabel(first, min_size, max_size)
        if id_stride is not None and n >= id_stride:
            raise OverflowError(f"plane {plane} has {n} objects, more than id_stride allows")
        next_id += n
        stats["objects"] += n
        per_plane[plane] = n
        for k in ("owned", "piece", "dropped", "merged"):
            stats[k] += merger.stats[k]
    return per_plane


# ------------------------------------------------------------------------------ driver


def _check_everything_kwargs(everything_kwargs: dict[str, Any]) -> None:
    if everything_kwargs.get("crop_n_layers"):
        raise ValueError("crops (crop_n_layers > 0) are not supported in tiled mode")
    everything_kwargs.pop("crop_n_layers", None)


def segment_everything_tiled(
    source: Any,
    model_or_predictor: Any,
    output: Any = None,
    *,
    tile: int = TILE,
    halo: int = HALO,
    embedding_store: EmbeddingStore | str | os.PathLike[str] | None = None,
    contrast_limits: tuple[float, float] | None = None,
    rgb: bool | None = None,
    planes: Sequence[tuple[int, ...]] | None = None,
    merge_iou: float = 0.5,
    min_size: int = 0,
    max_size: int | None = None,
    id_scope: str = "stack",
    id_stride: int | None = None,
    overwrite: bool = False,
    chunks: Sequence[int] | None = None,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Callable[[], bool] | None = None,
    details: dict | None = None,
    executor: Any = None,
    scratch: str | os.PathLike[str] | None = None,
    keep_scratch: bool = False,
    merge_progress: Callable[[int, int], Any] | None = None,
    **everything_kwargs: Any,
) -> Any:
    """Segment everything in ``source`` tile by tile into a labels array (module doc).

    ``source``: a 2-D/RGB image or a stack (NumPy, Dask, Zarr, multiscale → level 0, or a
    path opened lazily by :func:`napari_esam.core.runs.pipeline.open_input`); never read whole.
    ``model_or_predictor``: a model, a :class:`Predictor` (its model is used) or a
    :class:`TiledPredictor` (its tile, halo, caches and store are used); with ``executor``
    a :class:`~napari_esam.core.runs.pipeline.ModelSpec` (each worker builds the model once).
    ``output``: ``None`` (NumPy, for images that fit in RAM), a Zarr path (created, uint32,
    chunked per 1024² and per plane) or an integer array of the labels' shape (written in
    place). ``embedding_store``: a store path/object reused and filled (created if missing;
    a store of another image/model/grid raises
    :class:`~napari_esam.core.tiling.store.StaleEmbeddingStoreError`). ``planes``: the 2-D
    planes of a stack to segment (default all). Ids: ``id_scope="stack"`` numbers objects
    1..n over all planes processed, ``"slice"`` 1..n per plane; ``id_stride`` overrides
    both with the batch module's scheme (plane ``i`` in C order gets ``i * id_stride + 1...``,
    independent of which planes ran before). ``min_size``/``max_size`` drop objects by
    their final (merged, visible) area in pixels. ``everything_kwargs`` go to
    ``segment_everything`` per tile (``points_per_side`` is per tile; no crops).
    ``progress(done, total)`` after each tile; ``cancel()`` polled between tiles and batches
    (:class:`~napari_esam.core.plane.everything.Cancelled`; the output is then incomplete).

    Distributed map step: with ``executor`` (an object with ``map_tiles(task, indices, *,
    cancel)``: :class:`LocalTileExecutor`, or a
    :class:`~napari_esam.core.runs.cluster.DaskExecutor` for one Dask task per tile), ``source``
    must be a file path (an array too for an executor with ``in_process = True``, such as
    :class:`LocalTileExecutor`) and the tiles' kept masks go through the scratch Zarr group
    ``scratch`` (default: ``OUTPUT.tiles.zarr`` next to a path output; required for other
    outputs). Tiles recorded there are not recomputed by a rerun (a path output that exists
    is then reused); ``overwrite=True`` starts over. After the map step the client merges
    (``merge_progress(done, total)`` per tile) and deletes the scratch group, unless
    ``keep_scratch``. The labels are identical to the in-process run's.
    Returns the labels array.
    """
    _check_everything_kwargs(everything_kwargs)
    given = everything_kwargs.pop("contrast_limits", None)
    if contrast_limits is None and given is not None:
        contrast_limits = tuple(given)
    if id_scope not in ("stack", "slice"):
        raise ValueError(f"id_scope must be 'stack' or 'slice', not {id_scope!r}")
    if id_stride is not None and id_stride < 1:
        raise ValueError(f"id_stride must be >= 1, got {id_stride}")
    if not 0.0 < merge_iou <= 1.0:
        raise ValueError(f"merge_iou must be in (0, 1], got {merge_iou}")
    merge_kw = dict(merge_iou=merge_iou, min_size=min_size, max_size=max_size,
                    id_scope=id_scope, id_stride=id_stride)
    if executor is not None:
        return _segment_with_executor(
            source, model_or_predictor, output, executor, tile=tile, halo=halo,
            embedding_store=embedding_store, contrast_limits=contrast_limits, rgb=rgb,
            planes=planes, overwrite=overwrite, chunks=chunks, progress=progress,
            merge_progress=merge_progress, cancel=cancel, details=details, scratch=scratch,
            keep_scratch=keep_scratch, merge_kw=merge_kw, everything_kwargs=everything_kwargs,
        )
    from napari_esam.core.plane.everything import Cancelled

    if isinstance(source, (str, os.PathLike)):
        from napari_esam.core.runs.pipeline import open_input

        source = open_input(source)
    if isinstance(model_or_predictor, TiledPredictor):
        tp = model_or_predictor
        if embedding_store is not None and tp.store_arg is None:
            tp.store_arg = embedding_store
            tp.reset_image()  # re-open the image with the store
    else:
        model = (
            model_or_predictor.model
            if isinstance(model_or_predictor, Predictor)
            else model_or_predictor
        )
        if not isinstance(model, PromptableModel):
            raise TypeError(
                f"expected a model, a Predictor or a TiledPredictor, not {type(model).__name__}"
                " (a ModelSpec needs executor=)"
            )
        tp = TiledPredictor(model, tile=tile, halo=halo, cache_size=2, store=embedding_store)
    tp.set_image(source, contrast_limits, rgb=rgb)
    grid = tp.grid
    shape = tuple(int(s) for s in tp.data.shape)
    lead = leading_shape(shape, tp.rgb)
    out = create_labels_output(output, (*lead, *grid.shape), chunks=chunks, overwrite=overwrite)
    fresh = output is None or isinstance(output, (str, os.PathLike))
    plane_list = list(planes) if planes is not None else list(iter_planes(shape, tp.rgb))
    total = len(plane_list) * grid.n_tiles
    predictor = Predictor(tp.model)
    stats = _new_stats()
    enc0, hits0 = tp.encoder_calls, tp.store_hits
    done = 0

    def tiles_of(plane: tuple[int, ...]) -> Iterator[TileMasks]:
        nonlocal done
        tp.set_index(plane)
        for t in grid:
            if cancel is not None and cancel():
                raise Cancelled("tiled segment everything was cancelled")
            yield segment_tile(tp, t, predictor=predictor, cancel=cancel, **everything_kwargs)
            done += 1
            if progress is not None:
                progress(done, total)

    per_plane = _merge_planes(out, grid, plane_list, lead, tiles_of, fresh=fresh, stats=stats,
                              **merge_kw)
    if details is not None:
        details.update(stats)
        details["objects_per_plane"] = per_plane
        details["encoder_calls"] = tp.encoder_calls - enc0
        details["store_hits"] = tp.store_hits - hits0
        details["grid"] = grid
    return out


def _new_stats() -> dict[str, Any]:
    return {"tiles": 0, "owned": 0, "piece": 0, "dropped": 0, "merged": 0, "objects": 0}


def _tile_index(
    index: int, lead: tuple[int, ...], grid: TileGrid
) -> tuple[tuple[int, ...], int, int]:
    """Flat tile index (plane in C order, then the tile in raster order) → (plane, iy, ix)."""
    plane_flat, t = divmod(int(index), grid.n_tiles)
    iy, ix = divmod(t, grid.n_x)
    plane = tuple(int(i) for i in np.unravel_index(plane_flat, lead)) if lead else ()
    return plane, iy, ix


def _flat_plane(plane: Sequence[int], lead: tuple[int, ...]) -> int:
    if not lead:
        return 0
    return int(np.ravel_multi_index(tuple(int(i) for i in plane), lead))


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples → lists, NumPy scalars → numbers)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item")
                                 else str(o)))


def _segment_with_executor(
    source: Any,
    spec: Any,
    output: Any,
    executor: Any,
    *,
    tile: int,
    halo: int,
    embedding_store: Any,
    contrast_limits: tuple[float, float] | None,
    rgb: bool | None,
    planes: Sequence[tuple[int, ...]] | None,
    overwrite: bool,
    chunks: Sequence[int] | None,
    progress: Callable[[int, int], Any] | None,
    merge_progress: Callable[[int, int], Any] | None,
    cancel: Callable[[], bool] | None,
    details: dict | None,
    scratch: Any,
    keep_scratch: bool,
    merge_kw: dict[str, Any],
    everything_kwargs: dict[str, Any],
) -> Any:
    """``segment_everything_tiled`` with the map step as :class:`TileTask` s (module doc)."""
    import dataclasses

    from napari_esam.core.plane.everything import Cancelled
    from napari_esam.core.runs.pipeline import ModelSpec, _factory_name, get_model, open_input

    if not isinstance(spec, ModelSpec):
        raise TypeError(
            "with executor=, give the model as a ModelSpec (each worker builds its own), not "
            f"a {type(spec).__name__}"
        )
    if isinstance(source, (str, os.PathLike)) and Path(source).expanduser().exists():
        path: str | None = str(Path(source).expanduser().resolve())
        data = full_resolution(open_input(path))
        task_source: Any = path
    elif getattr(executor, "in_process", False) and not isinstance(source, (str, os.PathLike)):
        # an executor running the tasks in this process (LocalTileExecutor) can take the
        # array itself: the tasks are not pickled
        path = None
        data = full_resolution(open_input(source))
        task_source = data
    else:
        raise ValueError(
            "a distributed tiled run reads the input from a file every worker can open (TIFF, "
            "Zarr, .npy, PNG/JPEG), not an in-memory array: save the image to a file, or run "
            "in-process"
        )
    shape = tuple(int(s) for s in data.shape)
    is_rgb = is_rgb_shape(shape, rgb)
    grid = TileGrid(plane_shape(shape, is_rgb), tile, halo)
    lead = leading_shape(shape, is_rgb)
    sample = global_sample(data, is_rgb)
    if contrast_limits is None:
        contrast_limits = global_contrast_limits(data, is_rgb, sample)
    else:
        contrast_limits = (float(contrast_limits[0]), float(contrast_limits[1]))
    store, store_path = None, None
    if embedding_store is not None:
        # the client checks (or creates) the store before any task, and alone records its
        # finished tiles; the workers only write each tile's embedding chunk
        model = get_model(dataclasses.replace(spec, device="cpu"))  # for the fingerprint
        signature = StoreSignature.for_image(
            data, model, tile=tile, halo=halo, rgb=is_rgb, contrast_limits=contrast_limits,
            sample=sample,
        )
        if isinstance(embedding_store, EmbeddingStore):
            store_path = str(Path(embedding_store.path).resolve())
        else:
            store_path = str(Path(embedding_store).expanduser().resolve())
        store = EmbeddingStore.open(store_path, signature, "a")
    if scratch is None:
        if not isinstance(output, (str, os.PathLike)):
            raise ValueError("give scratch= (a folder for the tiles' results) when the output "
                             "is not a path")
        scratch = str(output) + ".tiles.zarr"
    scratch_path = str(Path(scratch).expanduser().resolve())
    record = _jsonable({
        "input": {"path": path, "shape": list(shape), "dtype": str(np.dtype(data.dtype)),
                  "content_hash": content_hash(data, is_rgb, sample)},
        "model": {"name": spec.name, "checkpoint": spec.checkpoint,
                  "factory": _factory_name(spec.factory)},
        "tile": grid.tile, "halo": grid.halo, "rgb": is_rgb,
        "contrast_limits": None if contrast_limits is None else list(contrast_limits),
        "everything": {k: v for k, v in sorted(everything_kwargs.items())
                       if k != "points_per_batch"},
    })
    resume = (not overwrite and isinstance(output, (str, os.PathLike))
              and Path(output).exists() and TileScratch.matches(scratch_path, record))
    sc = TileScratch.open(scratch_path, record, overwrite=overwrite)
    if resume:
        import zarr

        out = create_labels_output(zarr.open_array(str(output), mode="r+"),
                                   (*lead, *grid.shape))
    else:
        out = create_labels_output(output, (*lead, *grid.shape), chunks=chunks,
                                   overwrite=overwrite)
    fresh = not resume and (output is None or isinstance(output, (str, os.PathLike)))
    plane_list = ([tuple(int(i) for i in p) for p in planes] if planes is not None
                  else list(iter_planes(shape, is_rgb)))
    n = grid.n_tiles
    wanted = [_flat_plane(p, lead) * n + t for p in plane_list for t in range(n)]
    finished = sc.done()
    todo = [i for i in wanted if i not in finished]
    total, done = len(wanted), len(wanted) - len(todo)
    task = TileTask(task_source, spec, grid.tile, grid.halo, contrast_limits, is_rgb,
                    scratch_path, dict(everything_kwargs), store_path, token=uuid.uuid4().hex)
    run = {"tasks": 0, "encoder_calls": 0, "store_hits": 0, "skipped": done}
    cancel_fn = cancel or (lambda: False)
    if progress is not None and done:
        progress(done, total)
    pending: list[int] = []
    last = time.monotonic()
    results = executor.map_tiles(task, todo, cancel=cancel_fn) if todo else iter(())
    try:
        for res in results:
            pending.append(res.index)
            if store is not None and res.embedding is not None:
                plane, iy, ix = _tile_index(res.index, lead, grid)
                store.record(plane, iy, ix, *res.embedding)
            run["tasks"] += 1
            run["encoder_calls"] += res.encoder_calls
            run["store_hits"] += res.store_hits
            done += 1
            if progress is not None:
                progress(done, total)
            if time.monotonic() - last > RECORD_INTERVAL:
                sc.record(pending)
                pending, last = [], time.monotonic()
            if cancel_fn():
                break
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
        sc.record(pending)
        _forget_predictors(task.token)  # this process's (in-process tasks): free the image
    if done < total:
        raise Cancelled(
            f"tiled segment everything was stopped after {done} of {total} tiles; the "
            f"finished ones are kept in {scratch_path}: run again to resume"
        )
    merged = 0

    def tiles_of(plane: tuple[int, ...]) -> Iterator[TileMasks]:
        nonlocal merged
        base = _flat_plane(plane, lead) * n
        for t in range(n):
            if cancel_fn():
                raise Cancelled("tiled segment everything was cancelled while merging")
            yield sc.read(base + t, lead, grid)
            merged += 1
            if merge_progress is not None:
                merge_progress(merged, total)

    stats = _new_stats()
    per_plane = _merge_planes(out, grid, plane_list, lead, tiles_of, fresh=fresh, stats=stats,
                              **merge_kw)
    if not keep_scratch:
        sc.remove()
    if details is not None:
        details.update(stats)
        details.update(run)
        details["objects_per_plane"] = per_plane
        details["grid"] = grid
        details["scratch"] = scratch_path
    return out


# --------------------------------------------------------------------- distributed pieces


@dataclass
class TileDone:
    """What one tile task reports (never masks): flat tile ``index``, kept masks ``n_masks``,
    rule-1 ``stats``, this task's encoder runs and store hits, and ``embedding``: the
    (input_size, pixel hash) of an embedding it wrote into the store (the client records
    it there), else ``None``."""

    index: int
    n_masks: int
    stats: dict[str, int]
    encoder_calls: int = 0
    store_hits: int = 0
    embedding: tuple[tuple[int, int], str] | None = None
    seconds: float = 0.0


_PREDICTORS: OrderedDict[tuple, TiledPredictor] = OrderedDict()
_PREDICTORS_LOCK = threading.Lock()
_PREDICTORS_MAX = 2


def _forget_predictors(token: str) -> None:
    """Drop this process's cached :class:`TiledPredictor` s of the run ``token``."""
    with _PREDICTORS_LOCK:
        for key in [k for k in _PREDICTORS if k[0] == token]:
            del _PREDICTORS[key]


@dataclass(frozen=True, eq=False)
class TileTask:
    """``task(index)`` → :class:`TileDone`: the map step on flat tile ``index`` (plane in C
    order, then the tile in raster order), written into the scratch group.

    Picklable (paths and small values only), so a Dask worker can run it: the worker opens
    the input lazily from ``source`` (for an in-process executor only, ``source`` may be
    the array itself), builds the model once (the per-process cache of
    :func:`napari_esam.core.runs.pipeline.get_model`) and keeps one :class:`TiledPredictor` per run
    (``token``). With ``store``, embeddings are read from the store or written into their own
    chunk of it (their ``done`` flags are recorded by the client). Running a tile twice is
    harmless (its scratch group is rewritten whole).
    """

    source: Any  # a path (str); the array itself for in-process executors
    model: Any  # batch.ModelSpec
    tile: int
    halo: int
    contrast_limits: tuple[float, float] | None
    rgb: bool
    scratch: str
    everything_kwargs: dict[str, Any]
    store: str | None = None
    token: str = ""

    def predictor(self) -> TiledPredictor:
        """This process's :class:`TiledPredictor` for the run (built on first use)."""
        from napari_esam.core.runs.pipeline import _opened, get_model

        by_path = isinstance(self.source, str)
        key = (self.token, self.source if by_path else id(self.source), self.model.key(),
               self.store)
        with _PREDICTORS_LOCK:
            tp = _PREDICTORS.get(key)
            if tp is not None:
                _PREDICTORS.move_to_end(key)
                return tp
        tp = TiledPredictor(get_model(self.model), tile=self.tile, halo=self.halo,
                            cache_size=1, store=self.store, store_mode="a")
        data = _opened(self.source) if by_path else self.source
        tp.set_image(full_resolution(data), self.contrast_limits, rgb=self.rgb)
        if tp.store is not None:
            tp.store.defer_records = True
        with _PREDICTORS_LOCK:
            _PREDICTORS[key] = tp
            while len(_PREDICTORS) > _PREDICTORS_MAX:
                _PREDICTORS.popitem(last=False)
        return tp

    def __call__(self, index: int, cancel: Callable[[], bool] | None = None) -> TileDone:
        t0 = time.perf_counter()
        tp = self.predictor()
        grid = tp.grid
        plane, iy, ix = _tile_index(index, tp.lead, grid)
        tile = grid.tile_at(iy, ix)
        with tp._lock:  # the plane and the embedding together (threads share tp)
            tp.set_index(plane)
            enc0, hits0 = tp.encoder_calls, tp.store_hits
            embedding = tp.tile_embedding(tile)
            enc, hits = tp.encoder_calls - enc0, tp.store_hits - hits0
            written = None
            if tp.store is not None:
                written = tp.store.deferred.pop((plane, iy, ix), None)
        kept = _everything_on_tile(Predictor(tp.model), embedding, grid, tile, plane, cancel,
                                   self.everything_kwargs)
        TileScratch(self.scratch).write(index, kept)
        return TileDone(int(index), len(kept), dict(kept.stats), enc, hits, written,
                        time.perf_counter() - t0)


class LocalTileExecutor:
    """Runs :class:`TileTask` s in this process, in order (the scratch-group path without a
    cluster: resumable, and the reference for the Dask executor). Being in-process, it also
    takes an in-memory source (the tasks are never pickled)."""

    #: the tasks run in this process (``segment_everything_tiled`` may give them an array)
    in_process = True

    def map_tiles(
        self, task: TileTask, indices: Sequence[int], *, cancel: Callable[[], bool]
    ) -> Iterator[TileDone]:
        for i in indices:
            if cancel():
                return
            yield task(i, cancel=cancel)


class TileScratch:
    """The scratch Zarr group of a distributed tiled run.

    One subgroup ``t{index}`` per tile, written whole by the task that computed it (no two
    tasks share a chunk): ``boxes`` (n, 4) int32 and ``bits`` (the masks' crops, raveled,
    concatenated and bit-packed), attributes ``n`` and ``stats``. The root attribute
    ``napari-esam-tiles`` holds the run's record (what must match to reuse the tiles) and
    the finished tiles, written by the client only.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)

    @staticmethod
    def _attrs(path: str | os.PathLike[str]) -> dict | None:
        try:
            with open(Path(path) / "zarr.json", encoding="utf-8") as fh:
                return json.load(fh).get("attributes", {}).get(SCRATCH_ATTR)
        except (OSError, ValueError):
            return None

    @classmethod
    def matches(cls, path: str | os.PathLike[str], record: dict) -> bool:
        """Whether ``path`` is a scratch group of a run with this record."""
        attrs = cls._attrs(path)
        return attrs is not None and attrs.get("record") == record

    @classmethod
    def open(cls, path: str | os.PathLike[str], record: dict, *,
             overwrite: bool = False) -> TileScratch:
        """Reuse the scratch group of the same run, or create it (``overwrite``: anew)."""
        import zarr

        target = Path(path)
        if target.exists() or target.is_symlink():
            attrs = cls._attrs(target)
            if attrs is None:
                raise FileExistsError(
                    f"{str(target)!r} exists and is not a napari-esam scratch group; move it "
                    "away or choose another scratch path"
                )
            if not overwrite:
                if attrs.get("record") == record:
                    return cls(target)
                from napari_esam.core.runs.pipeline import _diff

                diffs = _diff(attrs.get("record", {}), record, "")
                raise ValueError(
                    f"the scratch group {str(target)!r} holds the tiles of another run ("
                    + "; ".join(diffs[:4]) + "); delete it, or start over (overwrite=True, "
                    "CLI --overwrite)"
                )
            shutil.rmtree(target)
        group = zarr.open_group(str(target), mode="w", zarr_format=3)
        group.attrs[SCRATCH_ATTR] = {"format": SCRATCH_FORMAT, "record": record, "done": []}
        return cls(target)

    def done(self) -> set[int]:
        """The recorded (finished) tiles."""
        attrs = self._attrs(self.path) or {}
        return {int(i) for i in attrs.get("done", [])}

    def record(self, indices: Iterable[int]) -> None:
        """Record finished tiles (the client only: it rewrites the root attributes)."""
        indices = [int(i) for i in indices]
        if not indices:
            return
        import zarr

        group = zarr.open_group(self.path, mode="r+")
        rec = dict(group.attrs[SCRATCH_ATTR])
        rec["done"] = sorted(set(rec.get("done", [])) | set(indices))
        group.attrs[SCRATCH_ATTR] = rec

    def write(self, index: int, kept: TileMasks) -> None:
        """Write one tile's kept masks (a task; only this tile's own subgroup)."""
        import zarr

        n = len(kept)
        bits = (np.packbits(np.concatenate([m.ravel() for m in kept.masks])) if n
                else np.zeros(0, np.uint8))
        group = zarr.open_group(str(Path(self.path) / f"t{int(index)}"), mode="w",
                                zarr_format=3)
        group.create_array("boxes", data=np.asarray(kept.boxes, np.int32).reshape(n, 4))
        group.create_array("bits", data=bits, chunks=(max(1, min(bits.size, 1 << 22)),))
        group.attrs.update({"n": n, "stats": {k: int(v) for k, v in kept.stats.items()}})

    def read(self, index: int, lead: tuple[int, ...], grid: TileGrid) -> TileMasks:
        """One tile's :class:`TileMasks` back from the scratch group."""
        import zarr

        group = zarr.open_group(str(Path(self.path) / f"t{int(index)}"), mode="r")
        n = int(group.attrs["n"])
        boxes = np.asarray(group["boxes"][...], dtype=np.int64).reshape(n, 4)
        sizes = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        flat = np.unpackbits(np.asarray(group["bits"][...]), count=int(sizes.sum()))
        flat = flat.astype(bool)
        masks, start = [], 0
        for (y0, x0, y1, x1), size in zip(boxes.tolist(), sizes.tolist(), strict=True):
            masks.append(flat[start : start + size].reshape(y1 - y0, x1 - x0))
            start += size
        plane, iy, ix = _tile_index(index, lead, grid)
        stats = {k: int(v) for k, v in dict(group.attrs["stats"]).items()}
        return TileMasks(plane, iy, ix, boxes, masks, stats)

    def remove(self) -> None:
        """Delete the scratch group (after the merge)."""
        if self._attrs(self.path) is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def tile_count(
    shape: Sequence[int], tile: int = TILE, halo: int = HALO, rgb: bool | None = None
) -> int:
    """Number of tiles (all planes) of an array of ``shape``."""
    return math.prod(leading_shape(shape, rgb)) * TileGrid(
        plane_shape(shape, rgb), tile, halo
    ).n_tiles
