"""The one unit of work of a run: segment everything on one tile of one plane.

A :class:`TileTask` is picklable (paths and small values), so it runs the same in this
process or on a Dask worker. Called with a flat tile index (plane in C order over the stack
axes, then the tile in raster order), it takes the tile's embedding (memory LRU, the
embedding store, or the encoder), segments everything on it and keeps the masks the
ownership rule gives the tile. Then:

* a plane that is **one tile** is painted at once (:func:`merge_plane`, the same merge as
  for many tiles) and written by region into a Zarr output, or returned;
* a tile of a plane cut into **several tiles** writes its kept masks into the run's scratch
  group (or returns them), and the driver merges the plane when all its tiles are done.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_esam.core.plane.image import to_model_rgb
from napari_esam.core.plane.predictor import Predictor, _image_key
from napari_esam.core.runs.outputs import TileScratch, ZarrOutput
from napari_esam.core.runs.settings import (
    BatchSettings,
    EverythingParams,
    get_model,
    output_dtype,
)
from napari_esam.core.runs.sources import StackSource
from napari_esam.core.tiling.grid import Tile, TileGrid
from napari_esam.core.tiling.merge import PlaneMerger, TileMasks, keep_tile_masks
from napari_esam.core.tiling.predictor import TiledPredictor

__all__ = ["TaskResult", "TileTask", "merge_plane", "tile_object_prompts"]


@dataclass
class TaskResult:
    """What one :class:`TileTask` reports.

    ``index``: the flat tile index; ``plane``: its flat plane index. A one-tile plane gives
    ``n_objects`` and its ``labels`` (``None`` when the task wrote them into the output);
    a tile of a several-tile plane gives ``masks`` (``None`` when written into the scratch
    group). ``encoder_calls`` / ``store_hits``: where the embedding came from;
    ``embedding``: (input_size, pixel hash) of an embedding the task wrote into the store
    (the driver records it there).
    """

    index: int
    plane: int
    seconds: float
    n_objects: int | None = None
    labels: np.ndarray | None = None
    masks: TileMasks | None = None
    n_masks: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    encoder_calls: int = 0
    store_hits: int = 0
    store_repairs: int = 0
    embedding: tuple[tuple[int, int], str] | None = None


def merge_plane(
    out: Any,
    grid: TileGrid,
    tiles: Iterable[TileMasks],
    settings: BatchSettings,
    plane: int,
    *,
    clear: bool = False,
) -> tuple[int, dict[str, int]]:
    """Paint a plane's kept masks (``tiles`` in raster order) into ``out`` (a 2-D array or
    :class:`~napari_esam.core.tiling.merge.PlaneView`) and give the objects their final ids
    (``docs/rules/labels.md``); returns (objects, merge statistics)."""
    merger = PlaneMerger(out, grid, settings.tiling.merge_iou)
    if clear:
        merger.clear()
    for kept in tiles:
        merger.add(kept)
    stride = settings.id_stride(grid)
    first = plane * stride + 1 if settings.id_scope == "stack" else 1
    p = settings.params
    n = merger.relabel(first, p.min_size, p.max_size)
    if n >= stride:  # cannot happen with the bound; guards against a changed algorithm
        raise OverflowError(f"plane {plane} has {n} objects, more than its id range {stride}")
    return n, merger.stats


def tile_object_prompts(
    grid: TileGrid,
    tile: Tile,
    pixels: np.ndarray,
    params: EverythingParams,
    contrast_limits: tuple[float, float] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The object prompts of one tile: (points (N, 2) (x, y) in the tile's frame, blob radii
    (N,)), detected in the tile's ``pixels`` under the plane's ``contrast_limits``.

    A tile keeps the objects whose point lies in its core grown by half the largest object
    diameter (clipped to the tile): an object near a seam is prompted by both tiles, one far
    inside a neighbour's core only by the neighbour (which sees it whole); the ownership
    and seam rules then keep each object once (``docs/rules/tiling.md``).
    """
    from napari_esam.core.plane.object_prompts import detect_object_prompts

    points, found = detect_object_prompts(pixels, contrast_limits=contrast_limits,
                                          return_details=True, **params.object_kwargs())
    radii = found["radius"]
    if grid.n_tiles > 1 and len(points):
        win, core = tile.window, tile.core
        m = float(params.object_diameter[1]) / 2
        x, y = points[:, 0] + win.x0, points[:, 1] + win.y0  # plane frame
        keep = ((x >= core.x0 - m) & (x < core.x1 + m) & (y >= core.y0 - m)
                & (y < core.y1 + m))
        points, radii = points[keep], radii[keep]
    return points, radii


_PREDICTORS: OrderedDict[tuple, TiledPredictor] = OrderedDict()
_PREDICTORS_LOCK = threading.Lock()
_PREDICTORS_MAX = 2


def forget_predictors(token: str) -> None:
    """Drop this process's cached :class:`TiledPredictor` s of the run ``token``."""
    with _PREDICTORS_LOCK:
        for key in [k for k in _PREDICTORS if k[0] == token]:
            del _PREDICTORS[key]


@dataclass(frozen=True, eq=False)
class TileTask:
    """``task(index)`` → :class:`TaskResult` (module doc).

    ``output``: a Zarr output one-tile planes are written into (else their labels are
    returned); ``scratch``: the scratch group tiles of several-tile planes are written into
    (else their masks are returned); ``store``: an embedding store path (read, and filled
    chunk by chunk; its ``done`` flags are recorded by the driver); ``token``: the run (the
    per-process embedding cache belongs to it); ``model``: the loaded model, for runs in
    this process only (never sent to workers).
    """

    source: StackSource
    settings: BatchSettings
    output: ZarrOutput | None = None
    scratch: str | None = None
    store: str | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    model: Any = None

    @property
    def grid(self) -> TileGrid:
        return self.settings.tiling.grid(self.source.plane_shape)

    def locate(self, index: int) -> tuple[int, Tile]:
        """Flat tile index → (flat plane index, tile)."""
        grid = self.grid
        plane, t = divmod(int(index), grid.n_tiles)
        return plane, grid.tile_at(*divmod(t, grid.n_x))

    def read(self, index: int) -> np.ndarray:
        """The pixels of tile ``index`` (for reading ahead)."""
        plane, tile = self.locate(index)
        return self.source.read(plane, tile.window)

    def predictor(self) -> TiledPredictor:
        """This process's :class:`TiledPredictor` for the run (built on first use)."""
        spec = self.settings.model
        key = (self.token, spec.key(), self.store)
        with _PREDICTORS_LOCK:
            tp = _PREDICTORS.get(key)
            if tp is not None:
                _PREDICTORS.move_to_end(key)
                return tp
        grid = self.grid
        model = self.model if self.model is not None else get_model(spec)
        tp = TiledPredictor(model, tile=grid.tile, halo=grid.halo, cache_size=1,
                            store=self.store, store_mode="a",
                            store_space_check=False)  # the driver checked it
        tp.set_image(self.source.planes(), self.settings.params.contrast_limits,
                     rgb=self.source.rgb)
        if tp.store is not None:
            tp.store.defer_records = True
        with _PREDICTORS_LOCK:
            _PREDICTORS[key] = tp
            while len(_PREDICTORS) > _PREDICTORS_MAX:
                _PREDICTORS.popitem(last=False)
        return tp

    def __call__(
        self,
        index: int,
        cancel: Callable[[], bool] | None = None,
        progress: Callable[[int, int], Any] | None = None,
        pixels: np.ndarray | None = None,
    ) -> TaskResult:
        from napari_esam.core.plane.everything import segment_everything

        t0 = time.perf_counter()
        plane, tile = self.locate(index)
        grid = self.grid
        coords = self.source.coords(plane)
        tp = self.predictor()
        with tp._lock:  # the plane and the embedding together (threads share tp)
            tp.set_index(coords)
            enc0, hits0, fixed0 = tp.encoder_calls, tp.store_hits, tp.store_repairs
            feats, input_size = tp.tile_embedding(tile, pixels)
            limits = tp.plane_limits()
            enc, hits = tp.encoder_calls - enc0, tp.store_hits - hits0
            fixed = tp.store_repairs - fixed0
            written = None
            if tp.store is not None:
                written = tp.store.deferred.pop((coords, tile.iy, tile.ix), None)
        predictor = Predictor(tp.model)
        predictor.set_embedding(feats, tile.window.shape, input_size)
        params = self.settings.params
        kwargs = params.everything_kwargs()
        kwargs.pop("contrast_limits")
        image = None
        if params.prompts == "objects":  # detected in the tile's own pixels
            from napari_esam.core.plane.object_prompts import segment_detected_objects

            image = pixels if pixels is not None else self.source.read(plane, tile.window)
            points, radii = tile_object_prompts(grid, tile, image, params, limits)
            kwargs.pop("points_per_side")
            records = segment_detected_objects(None, predictor, points, radii,
                                               decoding=params.object_decoding, cancel=cancel,
                                               progress=progress, **kwargs)
        else:
            if params.crop_n_layers:  # crops re-encode parts of the tile: they need its pixels
                image = pixels if pixels is not None else self.source.read(plane, tile.window)
                image = to_model_rgb(image, limits)  # the model's 8-bit RGB: no limits to pass
                predictor.image_key = _image_key(image)
            records = segment_everything(image, predictor, cancel=cancel, progress=progress,
                                         **kwargs)
        kept = keep_tile_masks(grid, tile, records, coords)
        res = TaskResult(int(index), plane, 0.0, n_masks=len(kept), stats=dict(kept.stats),
                         encoder_calls=enc, store_hits=hits, store_repairs=fixed,
                         embedding=written)
        if grid.n_tiles == 1:
            dtype = output_dtype(self.source.n_slices, self.settings, grid)
            labels = np.zeros(grid.shape, dtype=dtype)
            res.n_objects, _ = merge_plane(labels, grid, [kept], self.settings, plane)
            if self.output is not None:
                self.output.write(self.source.out_region(plane), labels)
            else:
                res.labels = labels
        elif self.scratch is not None:
            TileScratch(self.scratch).write(index, kept)
        else:
            res.masks = kept
        res.seconds = time.perf_counter() - t0
        return res
