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

__all__ = [
    "MaskPrompt", "PlaneEmbedding", "PromptEngine", "RegionMask", "TiledMask", "TiledPredictor",
    "paste_mask",
]

_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Serialise a method on the instance's lock (a worker thread and the GUI share it)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class MaskPrompt:
    """A previous prediction as a mask prompt: (256, 256) low-res logits of ``window``."""

    logits: np.ndarray
    window: Window


@dataclass(frozen=True)
class RegionMask:
    """A drawn mask as a mask prompt: ``mask`` (h, w) bool covering plane region ``window``;
    brought into the frame of whatever window decodes the object
    (:func:`~napari_esam.core.plane.mask_prompts.mask_to_logits`)."""

    mask: np.ndarray
    window: Window

    def logits_in(self, window: Window) -> np.ndarray:
        """(256, 256) mask-prompt logits of this mask as seen by ``window``."""
        from napari_esam.core.plane.mask_prompts import region_logits

        return region_logits(
            self.mask, (self.window.y0, self.window.x0), (window.y0, window.x0), window.shape
        )


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

    def remember_tile(self, tile: Tile, value: tuple[torch.Tensor, tuple[int, int]]) -> None:
        """Keep ``value`` (embedding, input size) as tile ``tile`` of the current plane."""
        self._remember(("tile", self.index, tile.iy, tile.ix), value)

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
        mask_input: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Decode prepared full-image prompts (B, N, 2) on one window → window logits
        (``mask_input``: (B, 1, 256, 256) logits in this window's frame)."""
        feats, input_size = self._embedding_for(window, tile)
        p = self._predictor
        p.set_embedding(feats, window.shape, input_size)
        local = (coords - window.offset_xy[None, None, :].astype(np.float32)).astype(np.float32)
        local[labels == -1] = 0.0
        low_res, iou = p.decode_torch(
            torch.from_numpy(local), torch.from_numpy(labels), multimask_output,
            p.prepare_mask_input(mask_input, len(coords)),
        )
        logits = p.upsample(low_res)
        return logits, iou.cpu().numpy(), low_res.cpu().numpy()

    def _routes(
        self, coords: np.ndarray, labels: np.ndarray, mask_prompts: Any
    ) -> tuple[list[Window], list[tuple[Window, Tile | None]], list[np.ndarray | None]]:
        """Per object: its extent, (window, tile) and mask input (logits in that window).

        An object with a :class:`MaskPrompt` is decoded on the prompt's window when that
        window still holds the object's grown extent (so the logits are in its frame);
        otherwise it is routed as usual and the mask prompt is dropped. A
        :class:`RegionMask` is brought into the frame of the object's usual window.
        """
        grid = self._require_image()
        n = len(coords)
        if mask_prompts is not None and len(mask_prompts) != n:
            raise ValueError(f"{len(mask_prompts)} mask prompts for {n} objects")
        extents = [self._extent(coords[b], labels[b], grid.shape) for b in range(n)]
        routes, masks = [], []
        for b, extent in enumerate(extents):
            prompt = None if mask_prompts is None else mask_prompts[b]
            route = self.route(extent)
            if isinstance(prompt, RegionMask):
                routes.append(route)
                masks.append(prompt.logits_in(route[0])[None])
                continue
            if prompt is not None and route[0] != prompt.window:
                c = self.context
                grown = Window(
                    max(0, extent.y0 - c), max(0, extent.x0 - c),
                    min(grid.shape[0], extent.y1 + c), min(grid.shape[1], extent.x1 + c),
                )
                if prompt.window.contains(grown):
                    tile = next((t for t in grid if t.window == prompt.window), None)
                    route = (prompt.window, tile)
            routes.append(route)
            use = prompt is not None and route[0] == prompt.window
            masks.append(np.asarray(prompt.logits, np.float32).reshape(1, 256, 256) if use
                         else None)
        return extents, routes, masks

    @_locked
    def predict_objects(
        self,
        point_coords: Any = None,
        point_labels: Any = None,
        boxes: Any = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        mask_prompts: Any = None,
    ) -> list[TiledMask]:
        """One :class:`TiledMask` per object; prompts as :meth:`Predictor.predict_batch`.

        ``mask_prompts``: per object a :class:`MaskPrompt` or ``None`` (models with a mask
        prompt only; see :meth:`_routes` for the window it is decoded on).
        """
        # validated against the full plane (the inner predictor only knows one window)
        coords, labels = self._prepare(point_coords, point_labels, boxes)
        extents, routes, masks = self._routes(coords, labels, mask_prompts)
        results: list[TiledMask | None] = [None] * len(coords)
        groups: dict[tuple[Window, bool], list[int]] = {}
        for b, (window, _) in enumerate(routes):
            groups.setdefault((window, masks[b] is not None), []).append(b)
        for (window, with_mask), rows in groups.items():
            tile = routes[rows[0]][1]
            mask_input = np.stack([masks[b] for b in rows]) if with_mask else None
            logits, iou, low = self._decode(
                coords[rows], labels[rows], window, tile, multimask_output, mask_input
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
        self, point_coords: Any = None, point_labels: Any = None, boxes: Any = None,
        mask_prompts: Any = None,
    ) -> int:
        """Compute (off the GUI thread) the embeddings these prompts will be decoded on;
        returns how many were encoded. Refinement windows are only known after decoding."""
        coords, labels = self._prepare(point_coords, point_labels, boxes)
        before = self.encoder_calls
        for window, tile in self._routes(coords, labels, mask_prompts)[1]:
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


# ---------------------------------------------------------------------- the prompt engine


@dataclass(frozen=True, eq=False)
class PlaneEmbedding:
    """What :meth:`PromptEngine.embed` hands to the prompt widget for one plane.

    The source array and plane, and for a plane that is **one tile** the tile's embedding
    itself (computed by ``embed``, so every click decodes at once and the widget's LRU cache
    owns it); the tiles of a larger grid are embedded on the first prompt that needs them.
    """

    data: Any
    index: tuple[int, ...]
    contrast_limits: tuple[float, float] | None
    rgb: bool | None
    shape: tuple[int, int]
    n_tiles: int
    features: tuple[torch.Tensor, tuple[int, int]] | None = None

    @property
    def ready(self) -> bool:
        """Whether decoding needs no encoder run (the plane is one tile, already embedded)."""
        return self.features is not None


class PromptEngine:
    """The prompt widget's one engine: prompts on a plane of any size, through a tile grid.

    A plane that fits the grid's one tile (the widget's whole-plane mode: ``tile`` = the
    plane's longer side, ``halo`` 0) is embedded by :meth:`embed` (in a worker) and decoded
    on the GUI thread at each click; a plane of several tiles (tiled mode) is opened by
    :meth:`embed` without encoding, and its prompts are decoded in a worker after
    :meth:`prefetch` has encoded the tiles under them (routing rules: module doc). Either way
    :meth:`predict_windowed` returns one :class:`TiledMask` per object, at full resolution
    in its window.

    Args:
        model: the promptable model.
        tile, halo: the grid (``docs/rules/tiling.md``).
        cache_size: tile embeddings kept in memory.
        store: an embedding store (path or :class:`EmbeddingStore`) or ``None``.
        store_mode: how the store is opened (``"a"``, ``"r"``).
        refine: re-decode objects that leave their tile (module doc).
    """

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
    def name(self) -> str:
        return self.model.name

    @property
    def max_points(self) -> int | None:
        return self.model.max_points

    @property
    def has_negative_point_embedding(self) -> bool:
        return bool(self.model.has_negative_point_embedding)

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
    ) -> PlaneEmbedding:
        """Open the plane (a 2-D image, or a lazy stack with ``index``); encode it when it is
        one tile (call from a worker).

        Args:
            image: (H, W[, C]) plane or a (..., H, W[, C]) stack (NumPy, Dask, Zarr).
            contrast_limits: applied to every tile (``None``: the plane's own).
            index: the plane's leading indices in a stack.
            rgb: whether the last axis is colour (``None``: guessed).
        """
        tp = self.predictor
        with tp._lock:
            tp.set_image(image, contrast_limits, rgb=rgb, index=index)
            grid = tp.grid
            features = tp.tile_embedding(grid.tile_at(0, 0)) if grid.n_tiles == 1 else None
            return PlaneEmbedding(
                tp.data, tp.index, contrast_limits, tp.rgb, grid.shape, grid.n_tiles, features
            )

    def _use(self, embedding: PlaneEmbedding) -> TiledPredictor:
        tp = self.predictor
        tp.set_image(embedding.data, embedding.contrast_limits, rgb=embedding.rgb,
                     index=embedding.index)
        if embedding.features is not None:
            tp.remember_tile(tp.grid.tile_at(0, 0), embedding.features)
        return tp

    def prefetch(
        self,
        embedding: PlaneEmbedding,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        boxes: np.ndarray | None,
        mask_prompts: list[MaskPrompt | RegionMask | None] | None = None,
    ) -> int:
        """Encode the tiles these prompts need (from a worker); returns how many were encoded.

        Args:
            embedding: from :meth:`embed`.
            point_coords, point_labels, boxes: B objects' prompts in plane (x, y) pixels, as
                :meth:`TiledPredictor.predict_batch`.
            mask_prompts: per object a previous prediction (:class:`MaskPrompt`), a drawn
                mask (:class:`RegionMask`) or None; models with a mask prompt only.
        """
        with self.predictor._lock:
            return self._use(embedding).prefetch(
                point_coords, point_labels, boxes, mask_prompts
            )

    def predict_windowed(
        self,
        embedding: PlaneEmbedding,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        boxes: np.ndarray | None,
        mask_prompts: list[MaskPrompt | RegionMask | None] | None = None,
    ) -> list[TiledMask]:
        """One :class:`TiledMask` (K candidate masks of its window, scores) per object.

        Args:
            embedding: from :meth:`embed`.
            point_coords, point_labels, boxes, mask_prompts: as :meth:`prefetch`.
        """
        with self.predictor._lock:
            return self._use(embedding).predict_objects(
                point_coords, point_labels, boxes, multimask_output=True,
                mask_prompts=mask_prompts,
            )

    def predict(
        self,
        embedding: PlaneEmbedding,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        boxes: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`predict_windowed`, as whole-plane masks (B, K, H, W) bool and scores
        (B, K) (only for planes whose B x K masks fit in memory)."""
        with self.predictor._lock:
            tp = self._use(embedding)
            masks, scores, _ = tp.predict_batch(
                point_coords, point_labels, boxes, multimask_output=True, full_size=True
            )
        return masks, scores
