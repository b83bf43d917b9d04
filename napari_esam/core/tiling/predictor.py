"""Prompts on images far larger than the model input: lazily embedded, cached tiles.

:class:`TiledPredictor` has :class:`~napari_esam.core.plane.predictor.Predictor`'s ``set_image`` /
``predict`` / ``predict_batch`` in **full-image coordinates** ((x, y) pixels, boxes XYXY).
``set_image`` reads nothing but a small global sample (the content hash, with a store);
a tile's embedding is computed the first time a prompt needs it, then kept in an in-memory
LRU cache and, with ``store=``, in an on-disk :class:`EmbeddingStore` (reused next session).

Routing rule for one object (its *extent* = bounding box of its points and box corners):

1. the tile whose **core** contains the extent's centre answers it when its window holds the
   extent grown by ``context`` (default ``halo // 2``) pixels: always the case for a click,
   so a click costs one tile's embedding (none when cached/stored);
2. else the grid tile with the largest inner margin around the grown extent (a cached tile);
3. else (a box bigger than a tile can hold) an ad-hoc window centred on the extent, as large
   as needed (the model resizes it to its input; cached in memory, not stored).

Objects crossing tile borders: when the best mask touches an inner edge of its window (the
object continues outside it), the object is decoded once more on a window chosen by the same
rule for the extent grown to the mask's bounding box (``refine=True``). Masks are returned at
full resolution for the answering window (``last_window``) and placed with :func:`paste_mask`.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from napari_esam.core.io.chunks import CorruptChunkError
from napari_esam.core.plane.engine import ModelInfoMixin
from napari_esam.core.plane.image import check_contrast_limits
from napari_esam.core.plane.predictor import Predictor
from napari_esam.core.tiling.grid import (
    HALO,
    TILE,
    Tile,
    TileGrid,
    Window,
    centred_window,
    check_tile_memory,
    full_resolution,
    is_rgb_shape,
    leading_shape,
    plane_contrast_limits,
    plane_shape,
    read_window,
    tile_hash,
)
from napari_esam.core.tiling.store import EmbeddingStore, StaleEmbeddingStoreError, StoreSignature
from napari_esam.models.base import PromptableModel

__all__ = ["TiledPredictor", "TiledMask", "TiledEngine", "paste_mask"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Serialise a method on the instance's lock (a worker thread and the GUI share it)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class TiledMask:
    """Masks of one object at full resolution inside ``window`` (full-image pixels)."""

    masks: np.ndarray  # (K, h, w) bool, or float logits
    scores: np.ndarray  # (K,)
    low_res: np.ndarray  # (K, 256, 256) logits in the window's frame
    window: Window

    @property
    def best(self) -> np.ndarray:
        """The highest-scoring mask (h, w)."""
        return self.masks[int(np.argmax(self.scores))]


def paste_mask(
    target: Any,
    mask: np.ndarray,
    window: Window,
    value: int,
    *,
    index: tuple[int, ...] = (),
    preserve: bool = False,
) -> None:
    """Write ``value`` where ``mask`` (h, w, of ``window``) is set into a labels array.

    Only ``window`` of plane ``index`` is read and written (NumPy, Zarr; any array
    supporting slice assignment). ``preserve=True`` only paints background (0) pixels.
    """
    key = tuple(int(i) for i in index) + window.slices
    region = np.array(target[key])
    paint = np.asarray(mask, dtype=bool)
    if preserve:
        paint = paint & (region == 0)
    region[paint] = value
    target[key] = region


def _one_object_prompts(
    point_coords: Any, point_labels: Any, box: Any
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """One object's points (N, 2), labels (N,) and box (4,) as a batch of one (None stays)."""
    pts = None if point_coords is None else np.asarray(point_coords, dtype=np.float64)[None]
    lbl = None if point_labels is None else np.asarray(point_labels)[None]
    bx = None if box is None else np.asarray(box, dtype=np.float64).reshape(1, -1)
    return pts, lbl, bx


class TiledPredictor:
    """A drop-in for :class:`Predictor` on huge images (module doc for the rules)."""

    def __init__(
        self,
        model: PromptableModel,
        *,
        tile: int = TILE,
        halo: int = HALO,
        cache_size: int = 16,
        store: EmbeddingStore | str | os.PathLike[str] | None = None,
        store_mode: str = "a",
        store_space_check: bool = True,
        verify_tiles: bool = False,
        context: int | None = None,
        refine: bool = True,
    ) -> None:
        self.model = model
        self.tile, self.halo = int(tile), int(halo)
        TileGrid((self.tile, self.tile), self.tile, self.halo)  # validate tile/halo early
        self.cache_size = int(cache_size)
        self.store_arg = store
        self.store_mode = store_mode
        self.store_space_check = store_space_check
        self.verify_tiles = verify_tiles
        self.context = self.halo // 2 if context is None else int(context)
        self.refine = refine
        self._predictor = Predictor(model)
        #: encoder runs (tiles and ad-hoc windows), for tests and diagnostics
        self.encoder_calls = 0
        #: tiles whose embedding came from the on-disk store
        self.store_hits = 0
        #: stored tiles that could not be decoded (damaged chunks) and were recomputed
        self.store_repairs = 0
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, tuple[int, int]]] = OrderedDict()
        self._lock = threading.RLock()
        self.reset_image()

    # ------------------------------------------------------------------ image
    def reset_image(self) -> None:
        self.data: Any = None
        self.grid: TileGrid | None = None
        self.store: EmbeddingStore | None = None
        self.signature: StoreSignature | None = None
        self.contrast_limits: tuple[float, float] | None = None
        self.rgb = False
        self.index: tuple[int, ...] = ()
        self.last_window: Window | None = None
        self.lead: tuple[int, ...] = ()
        self._given: tuple | None = None
        self._cache.clear()

    @property
    def is_image_set(self) -> bool:
        return self.grid is not None

    @property
    def original_size(self) -> tuple[int, int] | None:
        """(H, W) of the full-resolution plane."""
        return None if self.grid is None else self.grid.shape

    @property
    def device(self) -> torch.device:
        return self.model.device

    @_locked
    def set_image(
        self,
        image: Any,
        contrast_limits: tuple[float, float] | None = None,
        *,
        rgb: bool | None = None,
        index: tuple[int, ...] | None = None,
    ) -> None:
        """Use ``image`` (2-D, RGB or a stack; NumPy/Dask/Zarr; multiscale → level 0).

        Reads only a global sample (the content hash, when a
        store is used). ``index`` selects the 2-D plane of a stack (see :meth:`set_index`;
        default: the first plane, or the current one when the same array is set again).
        Setting the same array object again keeps the cached tiles.
        """
        data = full_resolution(image)
        contrast_limits = check_contrast_limits(contrast_limits)
        if data is self.data and (contrast_limits, rgb) == self._given:
            if index is not None:
                self.set_index(index)
            return
        self.reset_image()
        try:
            self._set_image(data, contrast_limits, rgb, index)
        except BaseException:
            self.reset_image()
            raise

    def _set_image(
        self,
        data: Any,
        contrast_limits: tuple[float, float] | None,
        rgb: bool | None,
        index: tuple[int, ...] | None,
    ) -> None:
        shape = tuple(int(s) for s in data.shape)
        is_rgb = is_rgb_shape(shape, rgb)
        plane_hw = plane_shape(shape, is_rgb)
        if min(plane_hw) < 2:
            raise ValueError(f"the image is too small to segment (shape {shape})")
        given = (contrast_limits, rgb)
        grid = TileGrid(plane_hw, self.tile, self.halo)
        check_tile_memory(grid)
        store = None
        if self.store_arg is not None:
            self.signature = StoreSignature.for_image(
                data, self.model, tile=self.tile, halo=self.halo, rgb=is_rgb,
                contrast_limits=contrast_limits,
            )
            if isinstance(self.store_arg, EmbeddingStore):
                store = self.store_arg
                diff = store.signature.differences(self.signature)
                if diff:
                    raise StaleEmbeddingStoreError(
                        f"the embedding store {store.path} does not match this image/model/"
                        "grid: " + "; ".join(diff)
                    )
            else:
                store = EmbeddingStore.open(self.store_arg, self.signature, self.store_mode,
                                            check_space=self.store_space_check)
        self.data, self.rgb, self.grid, self.store = data, is_rgb, grid, store
        self.contrast_limits = contrast_limits
        self._plane_limits: dict[tuple[int, ...], tuple[float, float] | None] = {}
        self.lead = leading_shape(shape, is_rgb)
        self._given = given
        self.set_index((0,) * len(self.lead) if index is None else index)

    @_locked
    def set_index(self, index: tuple[int, ...] = ()) -> None:
        """Select the 2-D plane (leading indices) of a stack; cached tiles stay cached."""
        index = tuple(int(i) for i in index)
        if self.grid is None:
            raise RuntimeError("no image is set; call set_image(image) first")
        if len(index) != len(self.lead) or any(
            not 0 <= i < n for i, n in zip(index, self.lead, strict=True)
        ):
            raise ValueError(
                f"index {index} does not select a 2-D plane of the stack (stack axes "
                f"{self.lead}); give one index per leading axis"
            )
        self.index = index

    def _require_image(self) -> TileGrid:
        if self.grid is None:
            raise RuntimeError("no image is set; call set_image(image) before predicting")
        return self.grid

    # ------------------------------------------------------------------ embeddings
    def _remember(self, key: tuple, value: tuple[torch.Tensor, tuple[int, int]]) -> None:
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > max(1, self.cache_size):
            self._cache.popitem(last=False)

    def plane_limits(self, index: tuple[int, ...] | None = None) -> tuple[float, float] | None:
        """The contrast limits of plane ``index`` (default: the current one): the given
        limits, else the plane's own (``docs/rules/tiling.md#contrast``)."""
        if self.contrast_limits is not None:
            return self.contrast_limits
        index = self.index if index is None else tuple(int(i) for i in index)
        if index not in self._plane_limits:
            self._plane_limits[index] = plane_contrast_limits(self.data, index, self.rgb)
        return self._plane_limits[index]

    def read(self, window: Window) -> np.ndarray:
        """The pixels of ``window`` in the current plane (reads only that region)."""
        return read_window(self.data, window, self.index, self.rgb)

    def _encode_window(
        self, window: Window, pixels: np.ndarray | None = None
    ) -> tuple[torch.Tensor, tuple[int, int], str]:
        if pixels is None:
            pixels = self.read(window)
        p = self._predictor
        before = p.encoder_calls
        p._set_image(pixels, self.plane_limits())
        self.encoder_calls += p.encoder_calls - before
        return p.get_image_embedding().detach().cpu(), p.input_size, tile_hash(pixels)

    @_locked
    def tile_embedding(
        self, tile: Tile, pixels: np.ndarray | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """(embedding (1, 256, 64, 64) on CPU, input_size) of a grid tile of the current plane:
        from the LRU cache, else the store, else the encoder (then cached and stored).
        ``pixels``: the tile's pixels when already read."""
        self._require_image()
        key = ("tile", self.index, tile.iy, tile.ix)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        value = None
        store = self.store
        if store is not None and store.has(self.index, tile.iy, tile.ix):
            ok = True
            if self.verify_tiles:
                if pixels is None:
                    pixels = self.read(tile.window)
                ok = tile_hash(pixels) == store.stored_tile_hash(self.index, tile.iy, tile.ix)
            if ok:
                try:
                    feats, input_size = store.load(self.index, tile.iy, tile.ix)
                except CorruptChunkError:  # a cache: recompute (and rewrite) the tile
                    self.store_repairs += 1
                else:
                    value = (torch.from_numpy(feats)[None], input_size)
                    self.store_hits += 1
        if value is None:
            feats, input_size, phash = self._encode_window(tile.window, pixels)
            value = (feats, input_size)
            if store is not None and store.writable:
                store.save(self.index, tile.iy, tile.ix, feats.numpy()[0], input_size, phash)
        self._remember(key, value)
        return value

    @_locked
    def window_embedding(self, window: Window) -> tuple[torch.Tensor, tuple[int, int]]:
        """Embedding of an ad-hoc window (not a grid tile); cached in memory only."""
        key = ("window", self.index, tuple(window))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        feats, input_size, _ = self._encode_window(window)
        self._remember(key, (feats, input_size))
        return feats, input_size

    def _embedding_for(self, window: Window, tile: Tile | None):
        if tile is not None:
            return self.tile_embedding(tile)
        return self.window_embedding(window)

    # ------------------------------------------------------------------ routing
    def route(self, extent: Window) -> tuple[Window, Tile | None]:
        """The window answering an object of this ``extent`` and its grid tile (or None)."""
        grid = self._require_image()
        h, w = grid.shape
        c = self.context
        grown = Window(
            max(0, extent.y0 - c), max(0, extent.x0 - c),
            min(h, extent.y1 + c), min(w, extent.x1 + c),
        )
        owner = grid.tile_of((extent.y0 + extent.y1) / 2, (extent.x0 + extent.x1) / 2)
        if owner.window.contains(grown):
            return owner.window, owner
        best, best_margin = None, -math.inf
        for t in grid:
            if t.window.contains(grown):
                m = grid.inner_margin(t, grown)
                if m > best_margin:
                    best, best_margin = t, m
        if best is not None:
            return best.window, best
        size = (max(grid.tile_h, grown.shape[0]), max(grid.tile_w, grown.shape[1]))
        side = max(size)  # square windows keep the model's resolution isotropic
        return centred_window(grown, grid.shape, (side, side)), None

    @staticmethod
    def _extent(coords: np.ndarray, labels: np.ndarray, shape: tuple[int, int]) -> Window:
        """Pixel bounding box of an object's prompt points and box corners (not padding)."""
        pts = coords[labels != -1]
        if pts.size == 0:
            raise ValueError("an object has no prompt points")
        h, w = shape
        x0, y0 = np.floor(pts.min(0)).astype(int)
        x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
        x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
        return Window(int(y0), int(x0), int(min(max(y1, y0 + 1), h)), int(min(max(x1, x0 + 1), w)))

    def _touches_inner_edge(self, mask: np.ndarray, window: Window) -> bool:
        h, w = self.grid.shape
        return bool(
            (window.y0 > 0 and mask[0].any())
            or (window.x0 > 0 and mask[:, 0].any())
            or (window.y1 < h and mask[-1].any())
            or (window.x1 < w and mask[:, -1].any())
        )

    # ------------------------------------------------------------------ decoding
    def _decode(
        self,
        coords: np.ndarray,
        labels: np.ndarray,
        window: Window,
        tile: Tile | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Decode prepared full-image prompts (B, N, 2) on one window → window logits."""
        feats, input_size = self._embedding_for(window, tile)
        p = self._predictor
        p.set_embedding(feats, window.shape, input_size)
        local = (coords - window.offset_xy[None, None, :].astype(np.float32)).astype(np.float32)
        local[labels == -1] = 0.0
        low_res, iou = p.decode_torch(
            torch.from_numpy(local), torch.from_numpy(labels), multimask_output
        )
        logits = p.upsample(low_res)
        return logits, iou.cpu().numpy(), low_res.cpu().numpy()

    @_locked
    def predict_objects(
        self,
        point_coords: Any = None,
        point_labels: Any = None,
        boxes: Any = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> list[TiledMask]:
        """One :class:`TiledMask` per object; prompts as :meth:`Predictor.predict_batch`."""
        grid = self._require_image()
        # validated against the full plane (the inner predictor only knows one window)
        coords, labels = self._prepare(point_coords, point_labels, boxes)
        extents = [self._extent(coords[b], labels[b], grid.shape) for b in range(len(coords))]
        routes = [self.route(e) for e in extents]
        results: list[TiledMask | None] = [None] * len(coords)
        groups: dict[Window, list[int]] = {}
        for b, (window, _) in enumerate(routes):
            groups.setdefault(window, []).append(b)
        for window, rows in groups.items():
            tile = routes[rows[0]][1]
            logits, iou, low = self._decode(
                coords[rows], labels[rows], window, tile, multimask_output
            )
            masks = self.model.threshold(logits).cpu().numpy()
            for j, b in enumerate(rows):
                results[b] = self._finish(
                    b, coords, labels, extents[b], window, masks[j], logits[j], iou[j], low[j],
                    multimask_output, return_logits,
                )
        return results  # type: ignore[return-value]

    @_locked
    def prefetch(
        self, point_coords: Any = None, point_labels: Any = None, boxes: Any = None
    ) -> int:
        """Compute (off the GUI thread) the embeddings these prompts will be decoded on;
        returns how many were encoded. Refinement windows are only known after decoding."""
        coords, labels = self._prepare(point_coords, point_labels, boxes)
        before = self.encoder_calls
        for b in range(len(coords)):
            window, tile = self.route(self._extent(coords[b], labels[b], self.grid.shape))
            self._embedding_for(window, tile)
        return self.encoder_calls - before

    def _prepare(self, point_coords: Any, point_labels: Any, boxes: Any):
        """Validate prompts against the full plane → (coords (B, N, 2), labels (B, N))."""
        grid = self._require_image()
        p = self._predictor
        p.original_size = grid.shape
        p.features = torch.zeros(1)  # only marks "an image is set" for prepare_prompts
        try:
            return p.prepare_prompts(point_coords, point_labels, boxes)
        finally:
            p.features = None

    def _finish(
        self, b, coords, labels, extent, window, masks, logits, iou, low, multimask, as_logits
    ) -> TiledMask:
        best = masks[int(np.argmax(iou))]
        if self.refine and self._touches_inner_edge(best, window):
            ys, xs = np.nonzero(best)
            seen = Window(
                window.y0 + int(ys.min()), window.x0 + int(xs.min()),
                window.y0 + int(ys.max()) + 1, window.x0 + int(xs.max()) + 1,
            )
            grown = extent.union(seen)
            c = self.context
            # the object continues past the window: make room for it on every side it touches
            new_window, tile = self.route(
                Window(grown.y0 - c, grown.x0 - c, grown.y1 + c, grown.x1 + c)
            )
            if new_window != window:
                logits2, iou2, low2 = self._decode(
                    coords[b : b + 1], labels[b : b + 1], new_window, tile, multimask
                )
                window, logits, iou, low = new_window, logits2[0], iou2[0], low2[0]
                masks = self.model.threshold(logits).cpu().numpy()
        out = logits.cpu().numpy() if as_logits else masks
        return TiledMask(out, iou, low, window)

    def predict_batch(
        self,
        point_coords: Any = None,
        point_labels: Any = None,
        boxes: Any = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        *,
        full_size: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`Predictor.predict_batch`, prompts in full-image coordinates.

        Masks (B, K, h, w) cover ``last_window`` (the union of the objects' windows), or the
        whole image with ``full_size=True`` (only for images that fit in memory). Low-res
        logits are in each object's own window frame.
        """
        objs = self.predict_objects(
            point_coords, point_labels, boxes, multimask_output, return_logits
        )
        if full_size:
            h, w = self.grid.shape
            frame = Window(0, 0, h, w)
        else:
            frame = objs[0].window
            for o in objs[1:]:
                frame = frame.union(o.window)
        k = objs[0].masks.shape[0]
        fill = -np.inf if return_logits else False
        dtype = np.float32 if return_logits else bool
        out = np.full((len(objs), k, *frame.shape), fill, dtype=dtype)
        for b, o in enumerate(objs):
            out[(b, slice(None), *o.window.relative_to(frame))] = o.masks
        self.last_window = frame
        scores = np.stack([o.scores for o in objs])
        low = np.stack([o.low_res for o in objs])
        return out, scores, low

    def predict(
        self,
        point_coords: Any = None,
        point_labels: Any = None,
        box: Any = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        *,
        full_size: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`Predictor.predict` in full-image (x, y): masks (K, h, w) of
        ``last_window`` (``full_size=True``: (K, H, W)), scores (K,), low-res (K, 256, 256)."""
        pts, lbl, bx = _one_object_prompts(point_coords, point_labels, box)
        if pts is not None and (pts.ndim != 3 or pts.shape[-1] != 2):
            raise ValueError(f"point_coords must be (N, 2), got {pts.shape[1:]}")
        masks, scores, low = self.predict_batch(
            pts, lbl, bx, multimask_output, return_logits, full_size=full_size
        )
        return masks[0], scores[0], low[0]

    def predict_object(
        self,
        point_coords: Any = None,
        point_labels: Any = None,
        box: Any = None,
        multimask_output: bool = True,
    ) -> TiledMask:
        """One object → :class:`TiledMask` (masks, scores, low-res, window): the widget API."""
        pts, lbl, bx = _one_object_prompts(point_coords, point_labels, box)
        obj = self.predict_objects(pts, lbl, bx, multimask_output)[0]
        self.last_window = obj.window
        return obj

    # ------------------------------------------------------------------ precompute
    @_locked
    def embed_all(self, progress: Any = None, planes: Any = None) -> int:
        """Compute (and store) every tile of the given planes (default: all); returns the
        number of tiles encoded. ``progress(done, total)`` after each tile."""
        from napari_esam.core.tiling.grid import iter_planes

        grid = self._require_image()
        plane_list = list(planes) if planes is not None else list(
            iter_planes(self.data.shape, self.rgb)
        )
        total, done, encoded = len(plane_list) * grid.n_tiles, 0, 0
        saved = self.index
        try:
            for plane in plane_list:
                self.set_index(plane)
                for tile in grid:
                    stored = self.store is not None and self.store.has(plane, tile.iy, tile.ix)
                    if not stored:
                        before = self.encoder_calls
                        self.tile_embedding(tile)
                        encoded += self.encoder_calls - before
                    done += 1
                    if progress is not None:
                        progress(done, total)
        finally:
            self.index = saved
        return encoded


# ---------------------------------------------------------------------- widget adapter


@dataclass(frozen=True, eq=False)
class TiledEmbedding:
    """The opaque "embedding" :class:`TiledEngine` hands to the prompt widget: the source
    array and plane (tiles are embedded lazily, on the first prompt that needs them)."""

    data: Any
    index: tuple[int, ...]
    contrast_limits: tuple[float, float] | None
    rgb: bool | None
    shape: tuple[int, int]


class TiledEngine(ModelInfoMixin):
    """The prompt widget's ``Engine`` (see ``widgets/prompt/controller.py``) for large images.

    Same protocol as ``SamEngine``: ``embed(image, contrast_limits)`` in a worker thread (here
    it only reads the global sample and opens the store: tiles are encoded when a prompt
    needs them, or ahead of time with :meth:`prefetch`), ``predict(embedding, coords, labels,
    boxes)`` → masks (B, K, H, W) for the whole plane and scores (B, K). ``embed`` also
    accepts the whole lazy layer array with ``index=`` (the plane's leading indices), so the
    plane is never read whole; :meth:`predict_windowed` returns per-object windows instead of
    whole-plane masks, for planes too large to hold B x K full masks.
    """

    tiled = True

    def __init__(
        self,
        model: PromptableModel,
        *,
        tile: int = TILE,
        halo: int = HALO,
        cache_size: int = 16,
        store: EmbeddingStore | str | os.PathLike[str] | None = None,
        store_mode: str = "a",
        refine: bool = True,
    ) -> None:
        self.model = model
        self.predictor = TiledPredictor(
            model, tile=tile, halo=halo, cache_size=cache_size, store=store,
            store_mode=store_mode, refine=refine,
        )

    @property
    def encoder_calls(self) -> int:
        return self.predictor.encoder_calls

    def embed(
        self,
        image: Any,
        contrast_limits: tuple[float, float] | None = None,
        *,
        index: tuple[int, ...] | None = None,
        rgb: bool | None = None,
    ) -> TiledEmbedding:
        """Set the image (a 2-D plane, or a lazy stack with ``index``); encodes nothing."""
        tp = self.predictor
        with tp._lock:
            tp.set_image(image, contrast_limits, rgb=rgb, index=index)
            return TiledEmbedding(tp.data, tp.index, contrast_limits, tp.rgb, tp.grid.shape)

    def _use(self, embedding: TiledEmbedding) -> TiledPredictor:
        tp = self.predictor
        tp.set_image(embedding.data, embedding.contrast_limits, rgb=embedding.rgb,
                     index=embedding.index)
        return tp

    def prefetch(
        self,
        embedding: TiledEmbedding,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        boxes: np.ndarray | None,
    ) -> int:
        """Encode the tiles these prompts need (call from a worker before :meth:`predict`)."""
        with self.predictor._lock:
            return self._use(embedding).prefetch(point_coords, point_labels, boxes)

    def predict(
        self,
        embedding: TiledEmbedding,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        boxes: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prompts of B objects in plane (x, y) → masks (B, K, H, W) bool, scores (B, K)."""
        with self.predictor._lock:
            tp = self._use(embedding)
            masks, scores, _ = tp.predict_batch(
                point_coords, point_labels, boxes, multimask_output=True, full_size=True
            )
        return masks, scores

    def predict_windowed(
        self,
        embedding: TiledEmbedding,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        boxes: np.ndarray | None,
    ) -> list[TiledMask]:
        """Like :meth:`predict` but one :class:`TiledMask` (masks of its window) per object."""
        with self.predictor._lock:
            return self._use(embedding).predict_objects(
                point_coords, point_labels, boxes, multimask_output=True
            )
