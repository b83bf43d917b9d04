"""Segment everything on images far larger than the model input, tile by tile.

:func:`segment_everything_tiled` runs :func:`~napari_esam.core.everything.segment_everything`
on every tile of the grid (:class:`~napari_esam.core.tiling.TileGrid`: tile + overlap
``halo``) and merges the tiles' masks into one labels array, written tile window by tile
window (Zarr or NumPy). Peak memory is that of one tile's work plus one tile window of labels.

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
and optional :class:`~napari_esam.core.embedding_store.EmbeddingStore`, so a precomputed store
skips the encoder entirely).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..models.base import PromptableModel
from .embedding_store import EmbeddingStore
from .predictor import Predictor
from .tiled_predictor import TiledPredictor
from .tiling import HALO, TILE, Tile, TileGrid, Window, iter_planes, leading_shape, plane_shape

__all__ = ["segment_everything_tiled", "create_labels_output", "tile_count"]

LABEL_DTYPE = np.uint32


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
        win = tile.window
        key = self.index + win.slices
        region = np.asarray(self.out[key]).astype(np.int64)
        before = region.copy()
        kept = []
        for m in masks:
            b = _mask_box(m)
            if b is None:
                continue
            box = Window(win.y0 + b[0], win.x0 + b[1], win.y0 + b[2], win.x0 + b[3])
            keep, why = _keep(self.grid, tile, box)
            self.stats[why] += 1
            if keep:
                kept.append((int(m.sum()), b, m))
        kept.sort(key=lambda t: -t[0])  # large first, small on top
        first_own = len(self.uf) + 1  # this tile's provisional ids are >= first_own
        for _, (y0, x0, y1, x1), m in kept:
            sub = region[y0:y1, x0:x1]
            mm = m[y0:y1, x0:x1]
            matched = self._matches(tile, region, m, np.unique(sub[mm]), first_own)
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
        self, tile: Tile, region: np.ndarray, m: np.ndarray, ids: np.ndarray, first_own: int
    ) -> list[int]:
        """Ids of other tiles' objects that are the same object as ``m`` (rule 2)."""
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
            sl = shared.relative_to(tile.window)
            a, other = m[sl], region[sl] == lab
            union = np.count_nonzero(a | other)
            if union and np.count_nonzero(a & other) / union >= self.merge_iou:
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


def segment_everything_tiled(
    source: Any,
    model_or_predictor: PromptableModel | Predictor | TiledPredictor,
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
    **everything_kwargs: Any,
) -> Any:
    """Segment everything in ``source`` tile by tile into a labels array (module doc).

    ``source``: a 2-D/RGB image or a stack (NumPy, Dask, Zarr, multiscale → level 0, or a
    path opened lazily by :func:`napari_esam.core.batch.open_input`); never read whole.
    ``model_or_predictor``: a model, a :class:`Predictor` (its model is used) or a
    :class:`TiledPredictor` (its tile, halo, caches and store are used).
    ``output``: ``None`` (NumPy, for images that fit in RAM), a Zarr path (created, uint32,
    chunked per 1024² and per plane) or an integer array of the labels' shape (written in
    place). ``embedding_store``: a store path/object reused and filled (created if missing;
    a store of another image/model/grid raises
    :class:`~napari_esam.core.embedding_store.StaleEmbeddingStoreError`). ``planes``: the 2-D
    planes of a stack to segment (default all). Ids: ``id_scope="stack"`` numbers objects
    1..n over all planes processed, ``"slice"`` 1..n per plane; ``id_stride`` overrides
    both with the batch module's scheme (plane ``i`` in C order gets ``i * id_stride + 1...``,
    independent of which planes ran before). ``min_size``/``max_size`` drop objects by
    their final (merged, visible) area in pixels. ``everything_kwargs`` go to
    ``segment_everything`` per tile (``points_per_side`` is per tile; no crops).
    ``progress(done, total)`` after each tile; ``cancel()`` polled between tiles and batches
    (:class:`~napari_esam.core.everything.Cancelled`; the output is then incomplete).
    Returns the labels array.
    """
    from .everything import Cancelled, segment_everything

    if everything_kwargs.get("crop_n_layers"):
        raise ValueError("crops (crop_n_layers > 0) are not supported in tiled mode")
    everything_kwargs.pop("crop_n_layers", None)
    given = everything_kwargs.pop("contrast_limits", None)
    if contrast_limits is None and given is not None:
        contrast_limits = tuple(given)
    if id_scope not in ("stack", "slice"):
        raise ValueError(f"id_scope must be 'stack' or 'slice', not {id_scope!r}")
    if id_stride is not None and id_stride < 1:
        raise ValueError(f"id_stride must be >= 1, got {id_stride}")
    if not 0.0 < merge_iou <= 1.0:
        raise ValueError(f"merge_iou must be in (0, 1], got {merge_iou}")
    if isinstance(source, (str, os.PathLike)):
        from .batch import open_input

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
        tp = TiledPredictor(model, tile=tile, halo=halo, cache_size=2, store=embedding_store)
    tp.set_image(source, contrast_limits, rgb=rgb)
    grid = tp.grid
    shape = tuple(int(s) for s in tp.data.shape)
    lead = leading_shape(shape, tp.rgb)
    out_shape = (*lead, *plane_shape(shape, tp.rgb))
    out = create_labels_output(output, out_shape, chunks=chunks, overwrite=overwrite)
    fresh = output is None or isinstance(output, (str, os.PathLike))
    plane_list = list(planes) if planes is not None else list(iter_planes(shape, tp.rgb))
    total = len(plane_list) * grid.n_tiles
    done = 0
    predictor = Predictor(tp.model)
    stats = {"tiles": 0, "owned": 0, "piece": 0, "dropped": 0, "merged": 0, "objects": 0}
    enc0, hits0 = tp.encoder_calls, tp.store_hits
    next_id = 1
    per_plane: dict[tuple[int, ...], int] = {}
    for plane in plane_list:
        tp.set_index(plane)
        merger = _PlaneMerger(out, tuple(plane), grid, merge_iou)
        if not fresh:
            merger.clear()  # the merge reads the output: old labels must not look like ids
        for t in grid:
            if cancel is not None and cancel():
                raise Cancelled("tiled segment everything was cancelled")
            feats, input_size = tp.tile_embedding(t)
            predictor.set_embedding(feats, t.window.shape, input_size)
            records = segment_everything(None, predictor, cancel=cancel, **everything_kwargs)
            merger.add_tile(t, [r["segmentation"] for r in records])
            del records
            done += 1
            stats["tiles"] += 1
            if progress is not None:
                progress(done, total)
        if id_stride is not None:
            first = int(np.ravel_multi_index(plane, lead)) * id_stride + 1 if lead else 1
        else:
            first = next_id if id_scope == "stack" else 1
        n = merger.relabel(first, min_size, max_size)
        if id_stride is not None and n >= id_stride:
            raise OverflowError(f"plane {plane} has {n} objects, more than id_stride allows")
        next_id += n
        stats["objects"] += n
        per_plane[tuple(plane)] = n
        for k in ("owned", "piece", "dropped", "merged"):
            stats[k] += merger.stats[k]
    if details is not None:
        details.update(stats)
        details["objects_per_plane"] = per_plane
        details["encoder_calls"] = tp.encoder_calls - enc0
        details["store_hits"] = tp.store_hits - hits0
        details["grid"] = grid
    return out


def tile_count(
    shape: Sequence[int], tile: int = TILE, halo: int = HALO, rgb: bool | None = None
) -> int:
    """Number of tiles (all planes) of an array of ``shape``."""
    return math.prod(leading_shape(shape, rgb)) * TileGrid(
        plane_shape(shape, rgb), tile, halo
    ).n_tiles
